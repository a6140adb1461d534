"""``mixnet serve``: parse the options into :class:`~mixnet_cli.service.serve.ServeOptions` and run the service."""

from __future__ import annotations

from pathlib import Path

import click

from ..base.errors import MixnetError
from .common import (
    CONTEXT_SETTINGS,
    complete_model,
    device_and_engine,
    device_option,
    engine_option,
    precision_option,
    network_options,
    show_messages,
    specs_for,
    user_errors,
)


@click.command(context_settings=CONTEXT_SETTINGS)
@click.option("-m", "--model", "models", multiple=True, metavar="MODEL", shell_complete=complete_model,
              help="Model to serve: S, M, L or all; repeat for several (default S; the first is a request's default). "
              "With --weights, the one architecture of that file (default: read from it).")
@click.option("--weights", type=click.Path(dir_okay=False, path_type=Path), metavar="FILE",
              help="Serve your own fine-tuned MixNet (.pdparams saved by PaddleClas, any number of classes) instead "
              "of the released weights, as the only model, named as classify names it (its architecture: "
              "?model=MixNet_S, also the default). At most one -m with it: -m then names the file's architecture, "
              "as for classify, so a second one would mean nothing; serve released models from another process.")
@click.option("--labels", type=click.Path(dir_okay=False, path_type=Path), metavar="FILE",
              help="Class names for --weights: PaddleClas's class_id_map_file ('<id> <name>' per line) or one name per "
              "line; their count must equal the weights' classes.")
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on (0.0.0.0: every interface).")
@click.option("--port", default=8080, show_default=True, type=click.IntRange(0, 65535), help="Port to listen on.")
@click.option("--max-batch-size", default=None, type=click.IntRange(1, 1024),
              help="Most images in one forward pass (default 4).")
@click.option("--max-wait-ms", default=None, type=click.FloatRange(0, 10_000),
              help="How long a batch waits for more images after its first (default 2).")
@click.option("--max-queue", default=None, type=click.IntRange(1, 1_000_000),
              help="Images per model admitted and not yet answered; beyond, 503 with Retry-After (default 64).")
@click.option("--deadline", default=None, type=click.FloatRange(0.001, 3600),
              help="Seconds a request may take before it is answered 504 (default 30).")
@click.option("--max-body-mb", default=None, type=click.FloatRange(0.001, 4096),
              help="Largest request body in MB (2^20 bytes); larger ones are answered 413 (default 32).")
@click.option("--allow-urls", is_flag=True,
              help="Let requests name an image URL (?url=...) that the service fetches; off by default. Only public "
              "addresses are fetched (checked after DNS and at every redirect).")
@click.option("--allow-private-urls", is_flag=True,
              help="With --allow-urls, also fetch from loopback, private and link-local addresses (an intranet).")
@click.option("--token-file", type=click.Path(dir_okay=False, path_type=Path), metavar="FILE",
              help="Require 'Authorization: Bearer <token>' on every request but /healthz and /readyz; the token is "
              "the file's first line (default: MIXNET_SERVE_TOKEN; neither: no token).")
@click.option("--public-metrics", is_flag=True, help="Answer /metrics without the token.")
@click.option("--header-timeout", default=5.0, show_default=True, type=click.FloatRange(0.1, 3600),
              help="Seconds a connection has to send a request's complete headers; then it is closed.")
@click.option("--keep-alive", default=5.0, show_default=True, type=click.FloatRange(0.1, 3600),
              help="Seconds an idle connection is kept open between requests.")
@click.option("--graceful-timeout", default=20.0, show_default=True, type=click.FloatRange(0.1, 3600),
              help="Seconds from SIGTERM to exit: requests in flight are answered within it.")
@click.option("--max-connections", default=4096, show_default=True, type=click.IntRange(1, 1_000_000),
              help="Connections open at once; at the ceiling, the one idle longest (no request in progress) is "
              "closed for a newcomer, which is refused only when every connection carries a request.")
@click.option("--workers", type=click.IntRange(1, 1024), help="Threads decoding images (default: the physical cores).")
@click.option("--threads", type=click.IntRange(1, 1024), help="CPU threads per forward pass (default: the physical cores).")
@device_option
@engine_option
@precision_option
@click.option("--log-format", type=click.Choice(["text", "json"]), default="text", show_default=True,
              help="Access log on stderr: a line per request, as text or as a JSON object.")
@click.option("--no-access-log", is_flag=True, help="No line per request.")
@network_options
@user_errors
def serve(
    models: tuple[str, ...],
    weights: Path | None,
    labels: Path | None,
    host: str,
    port: int,
    max_batch_size: int | None,
    max_wait_ms: float | None,
    max_queue: int | None,
    deadline: float | None,
    max_body_mb: float | None,
    allow_urls: bool,
    allow_private_urls: bool,
    token_file: Path | None,
    public_metrics: bool,
    header_timeout: float,
    keep_alive: float,
    graceful_timeout: float,
    max_connections: int,
    workers: int | None,
    threads: int | None,
    device: str | None,
    engine: str | None,
    precision: str,
    log_format: str,
    no_access_log: bool,
    mirrors: tuple[str, ...],
    offline: bool | None,
) -> None:
    """Serve the models over HTTP, with dynamic batching, limits and metrics (needs the [serve] extra).

    \b
      mixnet serve --model S --model L --port 8080
      curl --data-binary @cat.jpg \\
          'http://127.0.0.1:8080/v1/classify?model=L&topk=3'
      curl -F image=@cat.jpg -F image=@dog.png http://127.0.0.1:8080/v1/classify
      mixnet classify cat.jpg --server http://127.0.0.1:8080 --json
      mixnet serve --weights best_model.pdparams --labels flowers_label_list.txt

    Answers are the objects `mixnet classify --json` prints. Endpoints: POST /v1/classify, GET /healthz,
    /readyz (503 until the models are loaded, and from SIGTERM), /metrics (Prometheus), /v1/limits,
    /openapi.json. SIGTERM or Ctrl-C stops accepting, answers the requests in flight within --graceful-timeout
    and exits 0; a second Ctrl-C answers them 503 and exits at once.
    """
    from ..service import serve as service

    missing = service.serve_missing()
    if missing is not None:
        raise MixnetError(missing)
    # None named: MixNet_S, or with --weights the architecture read from the file (ServeOptions).
    names = [spec.name for spec in specs_for(models)] if models else []
    device_name, engine_name = device_and_engine(device, engine)
    if precision.lower() != "fp32":  # refused now (a CPU without bf16), not once the service is up
        from ..engines.choice import choose_engine

        choose_engine(engine_name, device_name, precision.lower())
    defaults = service.ServeOptions()
    options = service.ServeOptions(
        models=tuple(names), weights=weights, labels=labels, host=host, port=port,
        max_batch_size=max_batch_size or defaults.max_batch_size,
        max_wait_ms=defaults.max_wait_ms if max_wait_ms is None else max_wait_ms,
        max_queue=max_queue or defaults.max_queue,
        deadline_s=deadline or defaults.deadline_s,
        max_body_bytes=int(max_body_mb * 1024 * 1024) if max_body_mb else defaults.max_body_bytes,
        allow_urls=allow_urls, workers=workers, threads=threads, device=device_name, engine=engine_name,
        precision=precision.lower(), mirrors=mirrors or None, offline=offline, log_format=log_format,
        access_log=not no_access_log,
        allow_private_urls=allow_private_urls, token=service.load_token(token_file), public_metrics=public_metrics,
        header_timeout_s=header_timeout, keep_alive_s=keep_alive, graceful_timeout_s=graceful_timeout,
        max_connections=max_connections,
    )
    show_messages()
    service.run(options)


