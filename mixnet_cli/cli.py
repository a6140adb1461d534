"""The ``mixnet`` command: parse arguments, call the library, render its results. Nothing else lives here.

Only this module imports click. Library errors (:class:`~mixnet_cli.base.errors.MixnetError`) become one-line
``Error: ...`` messages with exit code 1 (2 for usage errors); tracebacks only with ``MIXNET_DEBUG=1``.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import json
import logging
import os
import sys
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator, Sequence, TypeVar

import click

from .base import settings
from .base.errors import DeviceError, MixnetError, UsageError
from .engines import ENGINES, engine_names
from .output import FORMATS

if TYPE_CHECKING:
    from .base.manifest import ModelSpec

F = TypeVar("F", bound=Callable[..., Any])

CONTEXT_SETTINGS = {"help_option_names": ["-h", "--help"]}


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("mixnet-cli")
    except PackageNotFoundError:
        from . import __version__

        return __version__


_OUTPUT_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EIO, errno.EROFS}


def _interrupted() -> None:
    click.echo("Interrupted.", err=True)
    sys.exit(130)


def _caused_by_interrupt(exc: BaseException) -> bool:
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        if isinstance(current, KeyboardInterrupt):
            return True
        seen.add(id(current))
        current = current.__cause__ or current.__context__
    return False


def user_errors(func: F) -> F:
    """Turn library errors into click errors: one line on stderr, the right exit code, no traceback."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return func(*args, **kwargs)
        except MixnetError as exc:
            if settings.debug():
                raise
            if isinstance(exc, UsageError):
                raise click.UsageError(str(exc)) from None
            message = str(exc)
            context = click.get_current_context(silent=True)
            variable = context.meta.get("mixnet.device_from") if context is not None else None
            if isinstance(exc, DeviceError) and variable:
                message += f" (the device came from the environment variable {variable})"
            error = click.ClickException(message)
            error.exit_code = exc.exit_code
            raise error from None
        except BrokenPipeError:
            # The reader of our stdout went away (`| head`): stop quietly, as a shell tool killed by SIGPIPE would.
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())
            sys.exit(141)
        except KeyboardInterrupt:
            if settings.debug():
                raise
            _interrupted()
        except (click.ClickException, click.exceptions.Exit, click.Abort, SystemExit):
            raise
        except OSError as exc:
            if settings.debug():
                raise
            if exc.errno not in _OUTPUT_ERRNOS:
                raise click.ClickException(f"unexpected {type(exc).__name__}: {exc} (a bug; rerun with "
                                           "MIXNET_DEBUG=1 and report the traceback)") from None
            # Library errors on the cache and inputs are MixnetErrors already: this is the results' destination.
            raise click.ClickException(f"cannot write the results ({exc.strerror}); free space or write them "
                                       "elsewhere (-o FILE)") from None
        except Exception as exc:  # a bug: still one line, unless debugging
            if settings.debug():
                raise
            if _caused_by_interrupt(exc):
                _interrupted()  # e.g. numpy turns a Ctrl-C during its import into an ImportError
            raise click.ClickException(
                f"unexpected {type(exc).__name__}: {exc} (a bug; rerun with MIXNET_DEBUG=1 and report the traceback)"
            ) from None

    return wrapper  # type: ignore[return-value]


def _model_names_help() -> str:
    return "S, M, L (or MixNet_S, mixnet_m, ...)"


def _complete_model(ctx: click.Context, param: click.Parameter, incomplete: str) -> list[str]:
    """Shell completion for model names (the manifest is small and cheap to read)."""
    from .base.manifest import load_manifest

    names = [name for spec in load_manifest().models.values() for name in (spec.short_name, spec.name)]
    return [name for name in names if name.lower().startswith(incomplete.lower())]


def _complete_models(ctx: click.Context, param: click.Parameter, incomplete: str) -> list[str]:
    """Shell completion where several models, or ``all``, may be named."""
    return _complete_model(ctx, param, incomplete) + (["all"] if "all".startswith(incomplete.lower()) else [])


def output_options(func: F | None = None, *, json_help: str = "One JSON array (same as --format json).",
                   jsonl_help: str = "One JSON object per line, printed as each finishes.") -> Any:
    """The same output flags on every command that prints rows (``@output_options``, or with its own words for
    what JSON and JSON lines hold: ``@output_options(json_help=...)``)."""

    def decorate(func: F) -> F:
        func = click.option("--csv", "fmt", flag_value="csv", help="CSV with a header line (same as --format csv).")(func)
        func = click.option("--jsonl", "fmt", flag_value="jsonl", help=jsonl_help)(func)
        func = click.option("--json", "fmt", flag_value="json", help=json_help)(func)
        return click.option(
            "--format",
            "fmt",
            type=click.Choice(list(FORMATS)),
            default="table",
            show_default=True,
            help="Output format.",
        )(func)

    return decorate(func) if func is not None else decorate


def _complete_device(ctx: click.Context, param: click.Parameter, incomplete: str) -> list[str]:
    return [name for name in ("auto", "cpu", "gpu", "gpu:0") if name.startswith(incomplete.lower())]


def _complete_engine(ctx: click.Context, param: click.Parameter, incomplete: str) -> list[str]:
    return [name for name in engine_names() if name.startswith(incomplete.lower())]


def device_option(func: F) -> F:
    return click.option(
        "--device",
        default=None,
        shell_complete=_complete_device,
        metavar="auto|cpu|gpu|gpu:N",
        help="Where to run: a GPU when onnxruntime-gpu or a CUDA build of paddle is installed and sees one, else "
        "the CPU (default auto; MIXNET_DEVICE).",
    )(func)


def engine_option(func: F) -> F:
    return click.option(
        "--engine",
        default=None,
        shell_complete=_complete_engine,
        metavar="|".join(engine_names()),
        help="What runs the network: auto picks the fastest installed for the device (ONNX Runtime on the CPU, "
        "and on a GPU with onnxruntime-gpu); "
        + "; ".join(f"{info.name}: {info.summary} [{info.devices}]" for info in ENGINES.values())
        + " (default auto; MIXNET_ENGINE).",
    )(func)


def custom_weights_options(func: F) -> F:
    """``--weights`` and ``--labels``: your own fine-tuned MixNet instead of a released one."""
    func = click.option(
        "--labels", type=click.Path(dir_okay=False, path_type=Path), metavar="FILE",
        help="Class names for --weights: PaddleClas's class_id_map_file ('<id> <name>' per line) or one name per "
        "line; their count must equal the weights' classes.",
    )(func)
    return click.option(
        "--weights", type=click.Path(dir_okay=False, path_type=Path), metavar="FILE",
        help="Your own fine-tuned MixNet (.pdparams saved by PaddleClas, any number of classes) instead of the "
        "released weights; S, M or L is read from it unless -m says.",
    )(func)


def threads_option(func: F) -> F:
    return click.option(
        "--threads", type=click.IntRange(1, 1024), default=None,
        help="CPU threads per forward pass (default: OMP_NUM_THREADS when set, else the physical cores).",
    )(func)


def _specs(names: Sequence[str]) -> list["ModelSpec"]:
    """The models named on the command line (``all`` for every one), each once, in order."""
    from .base.manifest import model_names, resolve_model

    wanted = model_names() if any(n.strip().lower() == "all" for n in names) else [resolve_model(n).name for n in names]
    return [resolve_model(name) for name in dict.fromkeys(wanted)]


def _device_and_engine(device: str | None, engine: str | None) -> tuple[str, str]:
    """``--device`` and ``--engine``: the flag, else MIXNET_DEVICE / MIXNET_ENGINE, else auto; all checked."""
    from .engines.choice import check_device_name, check_engine_name

    context = click.get_current_context(silent=True)
    if context is not None and device is None and os.environ.get("MIXNET_DEVICE", "").strip():
        # A device error later says where the device came from (user_errors reads this).
        context.meta["mixnet.device_from"] = "MIXNET_DEVICE"
    return (settings.choose(device, "MIXNET_DEVICE", check_device_name, "auto"),
            settings.choose(engine, "MIXNET_ENGINE", check_engine_name, "auto"))


def _checked_mirrors(ctx: click.Context, param: click.Parameter, value: tuple[str, ...]) -> tuple[str, ...]:
    """--mirror is checked as it is parsed, so a bad one is a usage error even when the weights are cached."""
    from .weights.store import check_mirrors

    try:
        return tuple(check_mirrors(value))
    except UsageError as exc:
        raise click.UsageError(str(exc), ctx=ctx) from None


def _checked_server(ctx: click.Context, param: click.Parameter, value: str | None) -> str | None:
    """--server is checked as it is parsed: requests would refuse a URL without http(s):// only at the first
    request, with an exception that does not name the option."""
    from .service.remote import check_server_url

    try:
        return None if value is None else check_server_url(value)
    except UsageError as exc:
        raise click.UsageError(str(exc), ctx=ctx) from None


def network_options(func: F) -> F:
    func = click.option(
        "--offline",
        is_flag=True,
        default=None,
        help="Never use the network; only cached weights (also MIXNET_OFFLINE=1).",
    )(func)
    func = click.option(
        "--mirror",
        "mirrors",
        multiple=True,
        metavar="URL",
        callback=_checked_mirrors,
        help="Fetch weights from URL/<file name> instead of PaddleClas's server; repeat to give fallbacks "
        "(also MIXNET_MIRROR).",
    )(func)
    return func


class _StderrHandler(logging.Handler):
    """Library messages on whatever ``sys.stderr`` is when they are logged (tests swap it per command): notices as
    ``mixnet: ...``, warnings as ``Warning: ...``, one line each."""

    def emit(self, record: logging.LogRecord) -> None:
        prefix = "Warning: " if record.levelno >= logging.WARNING else "mixnet: "
        try:
            sys.stderr.write(prefix + record.getMessage() + "\n")
            sys.stderr.flush()
        except Exception:  # noqa: BLE001 (logging must never take the command down)
            self.handleError(record)


def _messages(quiet: bool = False) -> None:
    """Show the library's notices and warnings on stderr (only errors with ``quiet``, which raise anyway)."""
    logger = logging.getLogger("mixnet_cli")
    if not any(isinstance(handler, _StderrHandler) for handler in logger.handlers):
        logger.addHandler(_StderrHandler())
    logger.setLevel(logging.ERROR if quiet else logging.INFO)


class _OneLineErrors(click.Group):
    """click shows a usage error as a usage block, a hint and the error; here it is one line, like every error."""

    def main(self, args: Any = None, prog_name: str | None = None, complete_var: str | None = None,
             standalone_mode: bool = True, **extra: Any) -> Any:
        if not standalone_mode:
            return super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        try:
            result = super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        except click.UsageError as exc:
            command = exc.ctx.command_path if exc.ctx is not None else "mixnet"
            message = " ".join(exc.format_message().split())  # click lists choices on several lines
            click.echo(f"Error: {message} (see `{command} --help`)", err=True)
            sys.exit(exc.exit_code)
        except click.ClickException as exc:
            exc.show()
            sys.exit(exc.exit_code)
        except click.Abort:
            click.echo("Aborted.", err=True)
            sys.exit(1)
        sys.exit(result if isinstance(result, int) else 0)


@click.group(name="mixnet", cls=_OneLineErrors, context_settings=CONTEXT_SETTINGS)
@click.version_option(version=None, package_name="mixnet-cli", prog_name="mixnet", message="%(prog)s %(version)s")
def main() -> None:
    """Classify images with PaddleClas's MixNet models (MixNet_S, MixNet_M, MixNet_L, ImageNet-1k).

    \b
      mixnet classify cat.jpg --model L
      mixnet classify photos/ --jsonl | jq -r '.predictions[0].label'
      mixnet download all

    Weights are downloaded on first use and cached (see `mixnet download --help`).
    """
    _messages()
    if not settings.debug():
        # Libraries' Python warnings (Pillow on odd files, among others) are not for the person at the terminal:
        # each input's trouble is already its one-line error. MIXNET_DEBUG=1 shows them.
        import warnings

        warnings.simplefilter("ignore")


@main.command(context_settings=CONTEXT_SETTINGS)
@click.argument("images", nargs=-1, metavar="[IMAGE|DIR|GLOB|URL|-]...", type=click.Path())
@click.option("-m", "--model", default=None, shell_complete=_complete_model,
              help=f"Model: {_model_names_help()} (default MixNet_S; with --weights, read from the file).")
@custom_weights_options
@click.option("-k", "--topk", default=None, type=click.IntRange(1), metavar="N",
              help="How many labels per image (default 5, or every class of a model with fewer).")
@output_options
@click.option("-o", "--output", type=click.Path(dir_okay=False, writable=True, allow_dash=True), help="Write results to this file instead of stdout.")
@click.option("--embed", is_flag=True,
              help="Also give each image's pooled features (1536 floats, what the classifier reads) in the JSON "
              "objects, for retrieval and clustering (--json or --jsonl).")
@click.option("--embed-npy", type=click.Path(dir_okay=False, writable=True, path_type=Path), metavar="FILE.npy",
              help="Write every image's features to FILE.npy: float32, one row per input in order, NaN rows for "
              "inputs that failed.")
@click.option(
    "--files-from",
    metavar="FILE",
    help="Also classify the paths or URLs listed in FILE, one per line ('-' reads the list from stdin).",
)
@click.option(
    "--recursive/--no-recursive",
    default=True,
    show_default=True,
    help="Look for images in sub-directories of a directory argument.",
)
@device_option
@engine_option
# 4: the fastest batch for OpenVINO on the CPU, and the one that keeps decoding and inference overlapped on 2 cores
# (BENCHMARKS.md); smaller last batches run padded on the same model.
@click.option("-b", "--batch-size", default=4, show_default=True, type=click.IntRange(1, 1024), help="Images per forward pass.")
@threads_option
@network_options
@click.option("--server", metavar="URL", callback=_checked_server,
              help="Classify through a running `mixnet serve` at URL (http://127.0.0.1:8080) instead of loading the "
              "model here; the output is the same (the service's own --device, --engine and weights apply).")
@click.option("-q", "--quiet", is_flag=True, help="Print nothing but the results (no progress, no per-image errors on stderr).")
@click.option("-v", "--verbose", is_flag=True, help="Say on stderr which model, weights, device and engine ran.")
@user_errors
def classify(
    images: tuple[str, ...],
    model: str | None,
    weights: Path | None,
    labels: Path | None,
    topk: int | None,
    fmt: str,
    output: str | None,
    embed: bool,
    embed_npy: Path | None,
    files_from: str | None,
    recursive: bool,
    device: str | None,
    engine: str | None,
    batch_size: int,
    threads: int | None,
    mirrors: tuple[str, ...],
    offline: bool | None,
    server: str | None,
    quiet: bool,
    verbose: bool,
) -> None:
    """Print the top-k ImageNet labels of each image.

    Images can be files (JPEG, PNG, WebP, BMP, GIF, TIFF...), directories (their image files, sorted),
    glob patterns, http(s) URLs, or - for one image on stdin.

    \b
      mixnet classify cat.jpg
      mixnet classify cat.jpg dog.png --model L --json
      mixnet classify photos/ --jsonl | jq -r '.predictions[0].label'
      find . -name '*.jpg' | mixnet classify --files-from - --csv
      mixnet classify cat.jpg --server http://127.0.0.1:8080 --json

    A failed image gets an error in its place (in JSON, an "error" object), the others are still classified,
    and the exit code is 1.
    """
    from .classifier import ClassificationResult, Classifier
    from .images.inputs import expand_inputs, read_list_file
    from .base.manifest import resolve_model
    from .output import write_classifications

    if files_from == "-" and "-" in images:
        raise UsageError("stdin can carry either the list of files (--files-from -) or one image (-), not both")
    arguments = list(images) + (read_list_file(files_from) if files_from else [])
    if not arguments and not files_from:
        raise UsageError("no images given: name image files, directories, globs or URLs (or use --files-from)")
    if model is not None:
        resolve_model(model)  # a bad name is a usage error before anything slow happens
    if labels is not None and not labels.expanduser().is_file():
        raise UsageError(f"--labels {labels}: no such file")
    if weights is not None and not weights.expanduser().is_file():
        raise UsageError(f"--weights {weights}: no such file")
    if server is not None and (weights or labels or embed or embed_npy):
        raise UsageError("--server classifies with the service's own models (to use your own weights there, start "
                         "it with `mixnet serve --weights FILE --labels FILE`): --weights, --labels, --embed and "
                         "--embed-npy work only without --server")
    if embed and fmt not in ("json", "jsonl"):
        raise UsageError("--embed puts the features in the JSON objects: add --json or --jsonl, or use --embed-npy FILE")
    device_name, engine_name = _device_and_engine(device, engine)
    _check_output_path(output)
    if embed_npy is not None:
        _check_output_path(str(embed_npy))
    items = expand_inputs(arguments, recursive=recursive)
    if not items:  # an empty --files-from list (`find` matched nothing): an empty result, not an error
        with _open_output(output) as stream:
            write_classifications(iter(()), fmt, stream)
        return
    click.get_current_context().with_resource(_interrupt_ends_at_once())
    # --quiet: not even the one-time notices (download progress, "converting ... (once)"); errors still raise.
    _messages(quiet)
    if all(item.problem is not None for item in items):
        # Nothing here can be classified (missing files, empty directories, globs matching nothing): say so now,
        # not after a download and a conversion, and not a network error in its place when offline.
        spec = resolve_model(model or "MixNet_S")
        known = [ClassificationResult(input=item.name, model=spec.name, error=item.problem) for item in items]
        with _open_output(output) as stream:
            write_classifications((result.to_dict() for result in known), fmt, stream)
        if not quiet:
            for result in known:
                click.echo(f"Error: {result.error}", err=True)
            click.echo(f"Error: none of the {len(items)} input(s) can be classified; the model was not loaded",
                       err=True)
        sys.exit(1)
    results: Iterator[tuple[dict[str, Any], Any]]  # each input's object and its features (None: not asked for)
    if server is not None:
        from .service.remote import classify_remote

        if verbose and not quiet:
            click.echo(f"model {model or 'MixNet_S'}, through the service at {server}, {len(items)} image(s)",
                       err=True)
        results = ((row, None) for row in classify_remote(server, items, model=model or "MixNet_S", topk=topk,
                                                          batch_size=batch_size))
    else:
        classifier = Classifier(model, device=device_name, engine=engine_name, mirrors=mirrors or None,
                                offline=offline, progress=None if not quiet else False, threads=threads,
                                weights=weights, labels=labels, features=embed or embed_npy is not None)
        results = ((result.to_dict(), result.features)
                   for result in classifier.classify_many(items, topk=topk, batch_size=batch_size))
    if verbose and not quiet and server is None:
        weights = classifier.weights
        engine = classifier.engine_for(len(items), batch_size)
        click.echo(
            f"model {classifier.model_name}, weights {weights.path} (sha256 {weights.record.sha256[:12]}), "
            f"device {classifier.device_choice.device} ({classifier.device_choice.reason}), "
            f"engine {engine.name} ({engine.detail}; {classifier.engine_choice.engine_reason}), "
            f"{len(items)} image(s)",
            err=True,
        )
    failures = 0
    features: list[Any] = []

    def rows() -> Iterator[dict[str, Any]]:
        nonlocal failures
        # A bar would interleave with results printed to the same terminal: only when they go elsewhere.
        with _progress(len(items), enabled=not quiet and (output not in (None, "-") or not sys.stdout.isatty())) as bar:
            for row, row_features in results:
                bar.update(1)
                if "error" in row:
                    failures += 1
                    if not quiet:
                        bar.write(f"Error: {row['error']['message']}", file=sys.stderr)
                if embed_npy is not None:
                    features.append(row_features)
                if not embed:
                    row.pop("features", None)
                yield row

    with _open_output(output) as stream:
        write_classifications(rows(), fmt, stream)
    if embed_npy is not None:
        _write_features(embed_npy, features)
    if failures:
        if not quiet and len(items) > 1:
            click.echo(f"Error: {failures} of {len(items)} image(s) failed", err=True)
        sys.exit(1)


@main.command(context_settings=CONTEXT_SETTINGS)
@click.option("-m", "--model", "models", multiple=True, metavar="MODEL", shell_complete=_complete_model,
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
              help="Let requests name an image URL (?url=...) that the service fetches; off by default.")
@click.option("--workers", type=click.IntRange(1, 1024), help="Threads decoding images (default: the physical cores).")
@click.option("--threads", type=click.IntRange(1, 1024), help="CPU threads per forward pass (default: the physical cores).")
@device_option
@engine_option
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
    workers: int | None,
    threads: int | None,
    device: str | None,
    engine: str | None,
    log_format: str,
    no_access_log: bool,
    mirrors: tuple[str, ...],
    offline: bool | None,
) -> None:
    """Serve the models over HTTP, with dynamic batching, limits and metrics (needs the [serve] extra).

    \b
      mixnet serve --model S --model L --port 8080
      curl --data-binary @cat.jpg 'http://127.0.0.1:8080/v1/classify?model=L&topk=3'
      curl -F image=@cat.jpg -F image=@dog.png http://127.0.0.1:8080/v1/classify
      mixnet classify cat.jpg --server http://127.0.0.1:8080 --json
      mixnet serve --weights best_model.pdparams --labels flowers_label_list.txt

    Answers are the objects `mixnet classify --json` prints. Endpoints: POST /v1/classify, GET /healthz,
    /readyz (503 until the models are loaded), /metrics (Prometheus), /openapi.json. SIGTERM or Ctrl-C stops
    accepting, finishes the requests in flight and exits 0.
    """
    from .service import serve as service

    missing = service.serve_missing()
    if missing is not None:
        raise MixnetError(missing)
    # None named: MixNet_S, or with --weights the architecture read from the file (ServeOptions).
    names = [spec.name for spec in _specs(models)] if models else []
    device_name, engine_name = _device_and_engine(device, engine)
    defaults = service.ServeOptions()
    options = service.ServeOptions(
        models=tuple(names), weights=weights, labels=labels, host=host, port=port,
        max_batch_size=max_batch_size or defaults.max_batch_size,
        max_wait_ms=defaults.max_wait_ms if max_wait_ms is None else max_wait_ms,
        max_queue=max_queue or defaults.max_queue,
        deadline_s=deadline or defaults.deadline_s,
        max_body_bytes=int(max_body_mb * 1024 * 1024) if max_body_mb else defaults.max_body_bytes,
        allow_urls=allow_urls, workers=workers, threads=threads, device=device_name, engine=engine_name,
        mirrors=mirrors or None, offline=offline, log_format=log_format, access_log=not no_access_log,
    )
    _messages()
    service.run(options)


def _write_features(path: Path, rows: list[Any]) -> None:
    """The features as one float32 ``inputs x width`` .npy file, NaN rows for inputs that failed (so row i is
    always input i), written atomically."""
    import io

    import numpy as np

    from .base.files import write_bytes

    width = next((len(row) for row in rows if row is not None), 0)
    table = np.full((len(rows), width), np.nan, dtype=np.float32)
    for index, row in enumerate(rows):
        if row is not None:
            table[index] = row
    buffer = io.BytesIO()
    np.save(buffer, table)
    try:
        write_bytes(path.expanduser(), buffer.getvalue())
    except OSError as exc:
        raise MixnetError(f"--embed-npy {path}: cannot write ({exc.strerror or exc}); choose another path") from None


@main.command("classify-dataset", context_settings=CONTEXT_SETTINGS)
@click.argument("sources", nargs=-1, required=True, metavar="SRC...")
@click.option("-o", "--output", "out", required=True, metavar="DIR",
              help="Directory for the results (local, or any URI pyarrow writes: s3://, gs://, hdfs://); created "
              "if absent; must be empty unless --resume.")
@click.option("-m", "--model", default="MixNet_S", show_default=True, shell_complete=_complete_model,
              help=f"Model: {_model_names_help()}.")
@click.option("-k", "--topk", default=5, show_default=True, type=click.IntRange(1, 1000), help="How many labels per image.")
@click.option("--resume", is_flag=True, help="Skip the inputs already in DIR (after a killed or failed run) and add the rest.")
@click.option("--jsonl", is_flag=True, help="Also write each part as JSON lines (the objects `mixnet classify --jsonl` prints).")
@click.option("--address", metavar="auto|HOST:PORT|ray://...",
              help="The Ray cluster to run on (default: RAY_ADDRESS, else a cluster of this machine alone, on 127.0.0.1, "
              "for this run).")
@click.option("--actors", type=click.IntRange(1), help="Most actors (model copies) at once (default: one per node).")
@click.option("--cpus-per-actor", type=click.FloatRange(0, min_open=True),
              help="CPUs each actor asks Ray for, fractions allowed; its engine runs that many threads, rounded up "
              "(default: the cluster's CPUs less 0.5 per node, shared between the actors).")
@click.option("--images-per-task", default=64, show_default=True, type=click.IntRange(1, 100_000),
              help="Images per actor call (Ray's batch): what a killed actor redoes.")
@click.option("--rows-per-file", default=10_000, show_default=True, type=click.IntRange(1),
              help="Rows per output part: at most what a killed job redoes after --resume (a part is also written "
              "every minute).")
@click.option("--recursive/--no-recursive", default=True, show_default=True,
              help="Look for images in sub-directories of a directory argument.")
@device_option
@engine_option
@click.option("-b", "--batch-size", default=4, show_default=True, type=click.IntRange(1, 1024), help="Images per forward pass.")
@network_options
@click.option("-q", "--quiet", is_flag=True, help="No per-image error lines on stderr; the summary stays.")
@user_errors
def classify_dataset(
    sources: tuple[str, ...],
    out: str,
    model: str,
    topk: int,
    resume: bool,
    jsonl: bool,
    address: str | None,
    actors: int | None,
    cpus_per_actor: float | None,
    images_per_task: int,
    rows_per_file: int,
    recursive: bool,
    device: str | None,
    engine: str | None,
    batch_size: int,
    mirrors: tuple[str, ...],
    offline: bool | None,
    quiet: bool,
) -> None:
    """Classify a dataset on a Ray cluster into Parquet files ([ray] extra), resumably.

    SRC: image files, directories, globs (as `mixnet classify` takes them, with the same extension filter) or
    URIs pyarrow reads (s3://bucket/photos/, gs://..., hdfs://...). Each row is the object `mixnet classify
    --jsonl` prints (input, model, predictions or error), with the same top-k ids and scores.

    \b
      mixnet classify-dataset photos/ -o results/ --model L
      mixnet classify-dataset s3://bucket/photos/ -o s3://bucket/results/ --address auto --actors 8
      mixnet classify-dataset photos/ -o results/ --resume      # after a killed run: the rest, each once

    A missing or unreadable image is a row with an error; the summary on stderr counts them and the exit code
    is 1. Without --address (or RAY_ADDRESS) Ray runs on this machine alone: for one machine, `mixnet classify`
    is faster.
    """
    from .distributed import run_job
    from .base.manifest import resolve_model

    resolve_model(model)
    device_name, engine_name = _device_and_engine(device, engine)
    _messages(quiet)

    def on_error(row: dict[str, Any]) -> None:
        if not quiet:
            click.echo(f"Error: {row['error']['message']}", err=True)

    summary = run_job(
        list(sources), out, model, resume=resume, jsonl=jsonl, address=address, rows_per_file=rows_per_file,
        on_error=on_error, topk=topk, batch_size=batch_size, device=device_name, engine=engine_name,
        mirrors=list(mirrors) or None, offline=offline, actors=actors, cpus_per_actor=cpus_per_actor,
        images_per_task=images_per_task, recursive=recursive,
    )
    already = f"; {summary.skipped} already in {out}" if summary.skipped else ""
    click.echo(f"{summary.images} image(s) classified in {summary.seconds:.1f} s ({summary.images_per_s:.1f} images/s), "
               f"{summary.failed} failed{already}", err=True)
    if summary.total_failed:
        before = f" ({summary.failed_before} in earlier runs)" if summary.failed_before else ""
        click.echo(f"Error: {summary.total_failed} image(s) failed{before}; their rows in {out} say why", err=True)
        sys.exit(1)


def _check_output_path(output: str | None) -> None:
    """Fail before any work when ``-o`` cannot be written, rather than after classifying everything."""
    if output in (None, "-"):
        return
    parent = Path(output).expanduser().resolve().parent
    if not parent.is_dir():
        raise UsageError(f"-o {output}: directory {parent} does not exist; create it or choose another path")
    if not os.access(parent, os.W_OK):
        raise UsageError(f"-o {output}: directory {parent} is not writable; choose another path")


def _open_output(output: str | None) -> Any:
    """stdout, or ``-o FILE`` via :class:`~mixnet_cli.output.AtomicOutput`."""
    if output in (None, "-"):
        return click.open_file("-", "w", encoding="utf-8")
    from .output import AtomicOutput

    return AtomicOutput(Path(output).expanduser())


@contextlib.contextmanager
def _interrupt_ends_at_once() -> Iterator[None]:
    """For commands that run engines: Ctrl-C ends the process at once. Results already written stay, a
    half-written ``-o`` file goes, and nothing waits for OpenVINO's threads, whose teardown from an interrupt
    could hang or abort the process. What the cache may hold then is what it was built to survive: a ``.part``
    download that resumes, a conversion directory the next conversion removes; the files of the locks held are
    deleted."""
    import signal

    def stop(signum: int, frame: object) -> None:
        with contextlib.suppress(Exception):
            sys.stdout.flush()
        from .output import UNFINISHED_OUTPUTS

        for path in list(UNFINISHED_OUTPUTS):
            with contextlib.suppress(OSError):
                path.unlink()
        from .base.locks import delete_held_lock_files

        delete_held_lock_files()  # os._exit skips the releases
        os.write(2, b"Interrupted.\n")
        os._exit(130)

    if settings.debug() or threading.current_thread() is not threading.main_thread():
        yield  # a debugger wants the traceback; signal handlers belong to the main thread
        return
    previous = signal.signal(signal.SIGINT, stop)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


class _NoProgress:
    """The part of a tqdm bar the commands use, for runs that show none (so tqdm is not even imported)."""

    def __enter__(self) -> "_NoProgress":
        return self

    def __exit__(self, *exc: object) -> None:
        return None

    def update(self, n: int = 1) -> None:
        return None

    @staticmethod
    def write(message: str, file: Any = None) -> None:
        print(message, file=file or sys.stdout)


def _progress(total: int, *, enabled: bool) -> Any:
    """A tqdm bar on stderr for runs of more than a handful of images, when stderr is a terminal."""
    show = enabled and total > 8 and sys.stderr.isatty()
    if not show:
        return _NoProgress()
    from tqdm import tqdm

    return tqdm(total=total, unit="img", file=sys.stderr, leave=False, dynamic_ncols=True)


@main.command(context_settings=CONTEXT_SETTINGS)
@click.argument("models", nargs=-1, required=True, metavar="MODEL...", shell_complete=_complete_models)
@click.option("--force", is_flag=True, help="Download again even if the cache holds a verified copy.")
@click.option(
    "--sha256", "sha256", metavar="HEX", default=None,
    help="Accept only a file with this sha256 (one MODEL); a mismatch is deleted, not installed.",
)
@click.option(
    "--from", "from_path", metavar="FILE", default=None,
    type=click.Path(exists=True, path_type=Path),
    help="Install a copy of the weights file you fetched yourself (or a directory holding it), with the same "
    "checks as a download; no network. FILE is copied, never moved.",
)
@network_options
@user_errors
def download(
    models: tuple[str, ...],
    force: bool,
    sha256: str | None,
    from_path: Path | None,
    mirrors: tuple[str, ...],
    offline: bool | None,
) -> None:
    """Download and verify the weights of MODEL (S, M, L or all) into the cache.

    \b
      mixnet download S
      mixnet download all --mirror https://my-mirror.example/paddleclas
      mixnet download S --from ~/Downloads/MixNet_S_pretrained.pdparams
      mixnet download S --sha256 <64 hex digits>

    A second run uses the cache and does not touch the network. Weights land in the cache only after they
    are complete and verified: checksum where one is published (or pinned with --sha256), a safe parse of the
    whole file, and every parameter name and shape of the architecture. An interrupted download resumes on
    the next run; several processes needing the same file share one download.
    """
    from .weights.store import ensure_weights, install_from_file, normalise_sha256

    specs = _specs(models)
    pinned = normalise_sha256(sha256)
    if pinned and len(specs) > 1:
        raise UsageError("--sha256 pins one file: give exactly one MODEL")
    if from_path is not None and len(specs) > 1 and not from_path.is_dir():
        raise UsageError("--from FILE installs one model: give exactly one MODEL, or a directory holding the files")
    failed: list[MixnetError] = []
    for spec in specs:
        try:
            if from_path is not None:
                weights = install_from_file(spec, from_path, sha256=pinned)
            else:
                weights = ensure_weights(spec, mirrors=mirrors or None, offline=offline, force=force, sha256=pinned)
            state = "installed" if from_path is not None else weights.how
        except MixnetError as exc:
            if len(specs) == 1 or settings.debug():
                raise
            # `all`: one model that cannot be had does not keep the others from being downloaded.
            click.echo(f"Error: {exc}", err=True)
            failed.append(exc)
            continue
        click.echo(f"{spec.name}: {state} {weights.path} ({weights.record.size} bytes, sha256 {weights.record.sha256})", err=True)
    if failed:
        click.echo(f"Error: {len(failed)} of {len(specs)} model(s) failed", err=True)
        sys.exit(1)


@main.command(context_settings=CONTEXT_SETTINGS)
@output_options
@user_errors
def models(fmt: str) -> None:
    """List the models: PaddleClas's accuracy and speed figures, and whether each is cached.

    \b
      mixnet models
      mixnet models --json | jq '.[] | {model, top1}'

    Accuracy is ImageNet-1k validation top-1/top-5 (%), as published by PaddleClas; latency is PaddleClas's
    V100 TensorRT FP32 figure in ms at batch 1/4/8.
    """
    from .base.cache import weights_path
    from .base.manifest import load_manifest
    from .output import write_rows

    rows = []
    for spec in load_manifest().models.values():
        path = weights_path(spec)
        metrics = spec.metrics
        rows.append({
            "model": spec.name,
            "top1": metrics.top1,
            "top5": metrics.top5,
            "paper_top1": metrics.paper_top1,
            "flops_m": metrics.flops_m,
            "params_m": metrics.params_m,
            "v100_ms_bs1_4_8": " / ".join(f"{v:.2f}" for v in metrics.v100_trt_fp32_latency_ms.values()),
            "cached": path.is_file(),
            "size_bytes": path.stat().st_size if path.is_file() else None,
        })
    for row, spec in zip(rows, load_manifest().models.values()):
        if fmt in ("json", "jsonl"):
            row["v100_ms_bs1_4_8"] = spec.metrics.v100_trt_fp32_latency_ms
            row["url"] = spec.url
        else:  # the published precision, as in PaddleClas's table
            row.update({key: f"{row[key]:.2f}" for key in ("top1", "top5")})
            row.update({key: f"{row[key]:.1f}" for key in ("paper_top1",)})
            row.update({key: f"{row[key]:.3f}" for key in ("flops_m", "params_m")})
    write_rows(rows, fmt, click.get_text_stream("stdout"))


@main.command(context_settings=CONTEXT_SETTINGS)
@output_options
@user_errors
def doctor(fmt: str) -> None:
    """Check this setup and print what a bug report needs.

    Versions, whether paddle has CUDA and which GPUs it sees, the device `auto` picks and why, the cache
    directory and whether it is writable, offline and mirror settings, and whether the weights URLs answer
    (skipped when offline). Exits 1 when a check fails.

    \b
      mixnet doctor
      mixnet doctor --json
    """
    from .doctor import run_checks
    from .output import write_rows

    failed = 0

    def rows() -> Iterator[dict[str, Any]]:
        nonlocal failed
        for check in run_checks():
            failed += check.status == "fail"
            yield check.to_dict()

    write_rows(rows(), fmt, click.get_text_stream("stdout"), headers=["check", "value", "status", "hint"])
    if failed:
        sys.exit(1)


@main.command(name="eval", context_settings=CONTEXT_SETTINGS)
@click.argument("dataset", required=False, type=click.Path(file_okay=False, path_type=Path))
@click.option("--list", "list_file", type=click.Path(dir_okay=False, path_type=Path),
              help="A PaddleClas list file: '<image path> <class id>' per line.")
@click.option("--root", type=click.Path(file_okay=False, path_type=Path),
              help="Directory the list file's paths are relative to (default: DATASET, else the list's directory).")
@click.option("-m", "--model", default=None, shell_complete=_complete_model,
              help=f"Model: {_model_names_help()} (default MixNet_S; with --weights, read from the file).")
@custom_weights_options
@click.option("--limit", type=click.IntRange(1), help="Evaluate only N images, evenly spaced through the set.")
@output_options(json_help="The summary as one JSON object.",
                jsonl_help="One JSON line per misclassified image; summary on stderr.")
@device_option
@engine_option
@click.option("-b", "--batch-size", default=4, show_default=True, type=click.IntRange(1, 1024), help="Images per forward pass.")
@threads_option
@network_options
@click.option("-q", "--quiet", is_flag=True, help="No progress bar.")
@user_errors
def evaluate_command(
    dataset: Path | None,
    list_file: Path | None,
    root: Path | None,
    model: str | None,
    weights: Path | None,
    labels: Path | None,
    limit: int | None,
    fmt: str,
    device: str | None,
    engine: str | None,
    batch_size: int,
    threads: int | None,
    mirrors: tuple[str, ...],
    offline: bool | None,
    quiet: bool,
) -> None:
    """Measure top-1 and top-5 accuracy on a labelled image set (e.g. ImageNet's validation set).

    \b
      mixnet eval ILSVRC2012/val --model L            # sub-folders named by synset: n01440764/ ...
      mixnet eval --list val_list.txt --root ILSVRC2012/ --json
      mixnet eval ILSVRC2012/val --limit 1000 --jsonl > mistakes.jsonl

    PaddleClas publishes top-1 / top-5 on the 50,000 validation images: see `mixnet models`.
    """
    from .classifier import Classifier
    from .evaluate import evaluate, evenly_spaced, read_image_folder, read_labelled_list
    from .images.labels import imagenet_synsets
    from .base.manifest import resolve_model
    from .output import write_rows

    if model is not None:
        resolve_model(model)
    if list_file is not None:
        samples = read_labelled_list(list_file, root or dataset)
    elif dataset is not None:
        if weights is not None:
            raise UsageError("with --weights, give the labelled images as a list file (--list FILE): folders named "
                             "by ImageNet synset id map to ImageNet's classes only")
        samples = read_image_folder(dataset, imagenet_synsets())
    else:
        raise UsageError("name an ImageFolder directory (sub-folders by synset id) or give --list FILE")
    samples = evenly_spaced(samples, limit)
    device_name, engine_name = _device_and_engine(device, engine)
    click.get_current_context().with_resource(_interrupt_ends_at_once())
    _messages(quiet)
    classifier = Classifier(model, device=device_name, engine=engine_name, mirrors=mirrors or None, offline=offline,
                            threads=threads, weights=weights, labels=labels)
    class_names = classifier.labels
    outside = next((s for s in samples if s.class_id >= len(class_names)), None)
    if outside is not None:
        raise UsageError(f"{outside.path} is labelled class {outside.class_id}, but the model has "
                         f"{len(class_names)} classes (0-{len(class_names) - 1})")
    stdout = click.get_text_stream("stdout")

    from tqdm import tqdm

    with tqdm(total=len(samples), unit="img", file=sys.stderr, leave=False,
              disable=quiet or not sys.stderr.isatty()) as bar:
        def on_result(result: Any, sample: Any) -> None:
            bar.update(1)
            if not result.ok and fmt != "jsonl":
                bar.write(f"Error: {result.error}", file=sys.stderr)
            if fmt != "jsonl" or (result.ok and result.predictions[0].class_id == sample.class_id):
                return
            row = result.to_dict()
            row["expected"] = {"class_id": sample.class_id, "label": class_names[sample.class_id]}
            stdout.write(json.dumps(row, ensure_ascii=False) + "\n")
            stdout.flush()

        summary = evaluate(classifier, samples, batch_size=batch_size, on_result=on_result)

    if summary.images == 0:
        raise MixnetError(f"none of the {summary.failed} image(s) could be read, so there is no accuracy to report")
    if fmt == "json":
        stdout.write(json.dumps(summary.to_dict()) + "\n")
    else:
        row = {"model": summary.model, "images": summary.images, "failed": summary.failed,
               "top1 %": f"{summary.top1 * 100:.2f}", "top5 %": f"{summary.top5 * 100:.2f}",
               "images/s": f"{summary.images_per_s:.1f}"}
        # With JSON lines on stdout (the mistakes), the summary table goes to stderr.
        write_rows([row], "table" if fmt == "jsonl" else fmt, sys.stderr if fmt == "jsonl" else stdout)
    if summary.failed:
        click.echo(f"Error: {summary.failed} image(s) could not be read and were not scored", err=True)
        sys.exit(1)


@main.group("cache", context_settings=CONTEXT_SETTINGS)
def cache_group() -> None:
    """Show and manage the downloaded weights (the cache: MIXNET_HOME or the user cache directory).

    \b
      mixnet cache list
      mixnet cache path
      mixnet cache rm S
      mixnet cache clear --yes
    """


_CACHE_COLUMNS = ["model", "kind", "status", "size", "sha256", "source", "fetched_at"]


@cache_group.command("list", context_settings=CONTEXT_SETTINGS)
@output_options
@user_errors
def cache_list(fmt: str) -> None:
    """List the cached weights (and the models converted from them): model, kind, status, size, sha256, source, when.

    \b
      mixnet cache list
      mixnet cache list --json | jq -r '.[] | select(.status == "verified") | .path'

    Status: verified (matches the record written when it was checked), unverified (no record: checked in full
    on first use), corrupt (changed since: `mixnet download MODEL --force`), partial (an interrupted download;
    the next `mixnet download` resumes it).
    """
    from .base.cache import cache_root, inventory
    from .output import write_rows

    rows = [item.to_dict() for item in inventory()]
    count = write_rows(rows, fmt, click.get_text_stream("stdout"), headers=_CACHE_COLUMNS)
    if not count and fmt == "table":
        click.echo(f"Nothing cached in {cache_root()}.", err=True)


@cache_group.command("path", context_settings=CONTEXT_SETTINGS)
@click.argument("model", required=False, shell_complete=_complete_model)
@user_errors
def cache_path(model: str | None) -> None:
    """Print the cache directory, or with MODEL the path its weights file has (or will have).

    \b
      mixnet cache path
      mixnet cache path S
    """
    from .base.cache import cache_root, weights_path
    from .base.manifest import resolve_model

    click.echo(str(weights_path(resolve_model(model)) if model else cache_root()))


@cache_group.command("rm", context_settings=CONTEXT_SETTINGS)
@click.argument("models", nargs=-1, required=True, metavar="MODEL...", shell_complete=_complete_models)
@user_errors
def cache_rm(models: tuple[str, ...]) -> None:
    """Delete the cached weights of MODEL (S, M, L or all), with their record, any partial download, a lock file
    a killed run left, and the models converted from them.

    \b
      mixnet cache rm S
    """
    from .base.cache import execute, plan_removal

    for spec in _specs(models):
        removed = execute(plan_removal([spec]))
        click.echo(f"{spec.name}: " + (f"removed {len(removed)} file(s) and folder(s)" if removed else "nothing cached"),
                   err=True)


@cache_group.command("clear", context_settings=CONTEXT_SETTINGS)
@click.option("-y", "--yes", is_flag=True, help="Do not ask for confirmation.")
@user_errors
def cache_clear(yes: bool) -> None:
    """Delete every cached weights file, record, partial download and lock, and the converted models.

    \b
      mixnet cache clear
      mixnet cache clear --yes

    Only the cache's own files are deleted: anything else under MIXNET_HOME stays.
    """
    from .base.cache import cache_root, execute, plan_clear

    plan = plan_clear()
    if not plan:
        click.echo(f"Nothing to delete in {cache_root()}.", err=True)
        return
    counts = [f"{plan.weights_files} weights file(s)"] + ([f"{len(plan.locks)} lock file(s)"] if plan.locks else [])
    counts.append(f"{len(plan.folders)} converted-model folder(s)")
    question = f"Delete {', '.join(counts[:-1])} and {counts[-1]}, {plan.size / 1e6:.1f} MB, from {cache_root()}?"
    try:
        confirmed = yes or click.confirm(question, default=False, err=True)
    except click.Abort:
        if sys.stdin.isatty():
            raise  # Ctrl-C or Ctrl-D at the prompt: the person stopped it
        # stdin ended before an answer (a script, `< /dev/null`): click's bare "Aborted." would not say why.
        click.echo("", err=True)  # end the prompt's line, so the error is a line of its own
        raise UsageError("cache clear needs confirmation, and stdin ended without an answer (nothing was deleted); "
                         "pass --yes to delete without asking") from None
    if not confirmed:
        click.echo("Nothing deleted.", err=True)
        sys.exit(1)
    removed = execute(plan)
    click.echo(f"Deleted {len(removed)} file(s) and folder(s) from {cache_root()}.", err=True)


@main.command(context_settings=CONTEXT_SETTINGS)
@click.option("-m", "--model", "models", multiple=True, metavar="MODEL",
              help="Model to time: S, M, L or all; repeat for several (default S).")
@click.option("-b", "--batch-size", "batch_sizes", multiple=True, type=click.IntRange(1, 1024),
              help="Batch size; repeat for several (default 1, 4 and 8).")
@device_option
@engine_option
@threads_option
@click.option("--precision", "precisions", multiple=True, metavar="fp32|tf32|bf16|fp16",
              help="Arithmetic to time; repeat for several (default fp32). Other than fp32 needs an engine that "
              "offers it (torch); each row then says how far its answers are from the same engine's fp32.")
@click.option("--compile", "compiled", is_flag=True,
              help="Also time the network compiled (torch.compile; torch engine): each precision twice.")
@click.option("--weights", type=click.Path(dir_okay=False, path_type=Path), metavar="FILE",
              help="Time your own fine-tuned MixNet (.pdparams) instead of the released weights.")
@click.option("--warmup", default=3, show_default=True, type=click.IntRange(0, 10_000), help="Untimed runs first.")
@click.option("--repeats", default=20, show_default=True, type=click.IntRange(1, 100_000), help="Timed runs per batch size.")
@output_options
@network_options
@user_errors
def benchmark(
    models: tuple[str, ...],
    batch_sizes: tuple[int, ...],
    device: str | None,
    engine: str | None,
    threads: int | None,
    precisions: tuple[str, ...],
    compiled: bool,
    weights: Path | None,
    warmup: int,
    repeats: int,
    fmt: str,
    mirrors: tuple[str, ...],
    offline: bool | None,
) -> None:
    """Time one forward pass of each model: median and spread over repeated runs, per batch size.

    \b
      mixnet benchmark
      mixnet benchmark --model all --json
      mixnet benchmark -m L --engine paddle -b 1 --repeats 50
      mixnet benchmark -m all --device gpu --precision fp32 --precision fp16

    The input is a random batch (no image decoding), host-to-device copy and the logits' way back included, so
    this is the engine alone; weights are downloaded first when they are not cached. Milliseconds are wall time
    per batch; p10/p90 show the spread. The last column is PaddleClas's published figure for the same model
    (V100, TensorRT, FP32), for comparison.
    """
    from .classifier import Classifier
    from .engines.conversion import validation_batch
    from .engines.choice import check_precision, choose_engine, measure_agreement, measure_latency
    from .output import write_rows

    if weights is not None and len(models) > 1:
        raise UsageError("--weights times one model: give at most one -m (or none, to read it from the file)")
    names = [spec.name for spec in _specs(list(models) or ["S"])]
    device_name, engine_name = _device_and_engine(device, engine)
    arithmetic = list(dict.fromkeys(check_precision(p, engine_name) for p in precisions or ("fp32",)))
    variants = [(p, False) for p in arithmetic] + ([(p, True) for p in arithmetic] if compiled else [])
    for precision, compile in variants:  # a combination no engine here runs is refused before any download
        choose_engine(engine_name, device_name, precision, compile)
    # Ascending: an engine may run a small batch on a model made for a larger one (OpenVINO pads up to 2x).
    sizes = sorted(set(batch_sizes or (1, 4, 8)))

    def load(target: str | None, precision: str, compile: bool, *, on: Any = None) -> Classifier:
        """The classifier timed for ``target``, or (``on``: an engine) its fp32 twin on the same engine and device."""
        common: dict[str, Any] = dict(device=on.device if on else device_name, engine=on.name if on else engine_name,
                                      threads=threads, precision=precision, compile=compile)
        if weights is not None:
            return Classifier(target, weights=weights, **common)
        return Classifier(target, mirrors=mirrors or None, offline=offline, **common)

    # Every model ready (downloaded, converted, loaded) before the first row: a model that cannot be had stops
    # the command before any output, rather than leaving a JSON array half-written.
    targets = [models[0] if models else None] if weights is not None else list(dict.fromkeys(names))
    loaded = {(target, variant): load(target, *variant) for target in targets for variant in variants}
    # A faster variant is compared with the same engine in plain fp32 (loaded for that when not timed).
    references: dict[str | None, Classifier] = {}
    if variants != [("fp32", False)]:
        for target in targets:
            references[target] = loaded.get((target, ("fp32", False))) or \
                load(target, "fp32", False, on=loaded[(target, variants[0])].engine)

    def rows() -> Iterator[dict[str, Any]]:
        for (target, (precision, compile)), classifier in loaded.items():
            name = classifier.model_name
            runner = classifier.engine
            reference = references.get(target)
            agreement = None
            if reference is not None and reference is not classifier:
                agreement = measure_agreement(runner, reference.engine,
                                              validation_batch(classifier.spec.preprocessing.crop_size, 16, seed=1))
            click.echo(f"timing {name} on {runner.name} ({runner.detail})...", err=True)
            for size in sizes:
                latency = measure_latency(runner, size, classifier.spec.preprocessing.crop_size,
                                          warmup=warmup, repeats=repeats)
                yield {
                    "model": name,
                    "engine": runner.name,
                    "device": runner.device,
                    "threads": runner.threads,
                    "precision": precision,
                    "compiled": compile,
                    "batch_size": size,
                    "median_ms": round(latency.median_ms, 3),
                    "p10_ms": round(latency.p10_ms, 3),
                    "p90_ms": round(latency.p90_ms, 3),
                    "min_ms": round(latency.min_ms, 3),
                    "max_ms": round(latency.max_ms, 3),
                    "images_per_s": round(latency.images_per_s, 2),
                    "warmup": warmup,
                    "repeats": repeats,
                    # Against the same engine in fp32, on 16 random images (None: this is fp32).
                    "max_prob_diff_vs_fp32": None if agreement is None else agreement.max_abs_probability_diff,
                    "top1_agreement_vs_fp32": None if agreement is None else agreement.top1_agreement,
                    "top5_agreement_vs_fp32": None if agreement is None else agreement.top5_agreement,
                    "detail": runner.detail,
                    # PaddleClas's published figure for the same network (V100, TensorRT, FP32), where it has one:
                    # the architecture's cost, so your own weights with 1000 classes get it too.
                    "paddleclas_v100_trt_ms": None if classifier.spec.num_classes != 1000 else
                    classifier.spec.metrics.v100_trt_fp32_latency_ms.get(f"bs{size}"),
                }

    headers = ["model", "engine", "device", "threads", "batch_size", "median_ms", "p10_ms", "p90_ms",
               "images_per_s", "paddleclas_v100_trt_ms"]
    if variants != [("fp32", False)]:
        headers[4:4] = ["precision", "compiled"]
        headers += ["max_prob_diff_vs_fp32", "top1_agreement_vs_fp32"]
    write_rows(rows(), fmt, click.get_text_stream("stdout"), headers=headers)


_EXPORT_USAGE = {
    "paddle": """Use it with Paddle Inference 3 (Python, or its C++ API with the same two files):
  import paddle.inference as pi
  config = pi.Config("{dir}/inference.json", "{dir}/inference.pdiparams")
  predictor = pi.create_predictor(config)
Input "x": float32 N x 3 x {size} x {size}, preprocessed as `mixnet classify` does (resize short side {resize}, centre crop {size},
/255, mean {mean}, std {std}, RGB, CHW). Output: logits N x {classes} (apply softmax for probabilities).
PaddleClas's tools, Paddle Lite's opt and Paddle Inference before 3.0 read --format paddle-legacy instead.""",
    "paddle-legacy": """Use it with PaddleClas's tools (on paddle 3, set FLAGS_enable_pir_api=0 for them), Paddle Lite or Paddle Inference:
  paddleclas --inference_model_dir {dir} --infer_imgs cat.jpg --use_gpu False
  paddle_lite_opt --model_file={dir}/inference.pdmodel --param_file={dir}/inference.pdiparams --valid_targets=arm --optimize_out={name}
  pi.Config("{dir}/inference.pdmodel", "{dir}/inference.pdiparams")   # import paddle.inference as pi
Input "x": float32 N x 3 x {size} x {size}, preprocessed as `mixnet classify` does (resize short side {resize}, centre crop {size},
/255, mean {mean}, std {std}, RGB, CHW). Output: probabilities N x {classes} (a softmax last, as in PaddleClas's own exports).""",
    "onnx": """Use it with ONNX Runtime (or any ONNX runtime):
  import onnxruntime as ort
  session = ort.InferenceSession("{dir}/{name}.onnx")
  logits = session.run(None, {{"x": batch}})[0]
Input "x": float32 N x 3 x {size} x {size}, preprocessed as `mixnet classify` does (resize short side {resize}, centre crop {size},
/255, mean {mean}, std {std}, RGB, CHW). Output: logits N x {classes} (apply softmax for probabilities).""",
}


@main.command(name="export", context_settings=CONTEXT_SETTINGS)
@click.argument("model", metavar="MODEL", required=False, shell_complete=_complete_model)
@click.option("--weights", type=click.Path(dir_okay=False, path_type=Path), metavar="FILE",
              help="Export your own fine-tuned MixNet (.pdparams) instead of MODEL's released weights.")
@click.option("--format", "fmt", type=click.Choice(["paddle", "paddle-legacy", "onnx"]), required=True,
              help="paddle: a Paddle 3 inference model (inference.json + inference.pdiparams); paddle-legacy: the "
                   "format PaddleClas's tools, Paddle Lite's opt and Paddle Inference < 3 read (inference.pdmodel + "
                   "inference.pdiparams, softmax output); onnx: an ONNX model.")
@click.option("-o", "--output", "out_dir", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="Directory to write the model into (created if needed).")
@network_options
@user_errors
def export_command(model: str | None, weights: Path | None, fmt: str, out_dir: Path, mirrors: tuple[str, ...],
                   offline: bool | None) -> None:
    """Export MODEL (S, M, L) for deployment: a Paddle inference model or an ONNX model.

    \b
      mixnet export S --format paddle -o mixnet_s_infer/
      mixnet export S --format paddle-legacy -o MixNet_S_infer/
      mixnet export L --format onnx -o models/

    The ONNX model is mixnet's own graph of the network (no paddle needed); the paddle formats need the
    [paddle] extra. The export is checked before it is written: loaded back from the output directory and run
    on a test batch, it must give the reference's logits (or, for paddle-legacy, whose output is probabilities,
    their softmax). Prints the files written (stdout) and how to use them (stderr).
    """
    from .export import check_output_directory, export_to_directory
    from .base.manifest import resolve_model
    from .weights.store import custom_weights, ensure_weights

    if model is None and weights is None:
        raise UsageError("name the MODEL to export (S, M or L), or give --weights FILE")
    named = resolve_model(model) if model is not None else None
    check_output_directory(out_dir)  # before any download or conversion
    verified = custom_weights(weights, named) if weights is not None else \
        ensure_weights(named, mirrors=mirrors or None, offline=offline)  # type: ignore[arg-type]
    spec = verified.spec
    written, check = export_to_directory(spec, verified.path, verified.record.sha256, fmt, out_dir)
    for path in written:
        click.echo(str(path))
    pre = spec.preprocessing
    logits = ("logit", check["max_abs_logit_diff"]) if "max_abs_logit_diff" in check else \
        ("log-probability", check["max_abs_log_probability_diff"])
    click.echo(
        f"{spec.name} exported as {fmt} to {out_dir}: loaded back and checked against {check['reference'] or 'the reference'} "
        f"(max {logits[0]} difference {logits[1]:.2g}, probabilities {check['max_abs_probability_diff']:.2g}).",
        err=True,
    )
    click.echo(
        _EXPORT_USAGE[fmt].format(dir=out_dir, name=spec.name, size=pre.crop_size, resize=pre.resize_short,
                                  mean=list(pre.mean), std=list(pre.std), classes=spec.num_classes),
        err=True,
    )
