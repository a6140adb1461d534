"""The ``mixnet`` command: parse arguments, call the library, render its results. Nothing else lives here.

Only this module imports click. Library errors (:class:`~mixnet_cli.errors.MixnetError`) become one-line
``Error: ...`` messages with exit code 1 (2 for usage errors); tracebacks only with ``MIXNET_DEBUG=1``.
"""

from __future__ import annotations

import functools
import sys
from pathlib import Path
from typing import Any, Callable, Iterator, TypeVar

import click

from . import settings
from .errors import MixnetError, UsageError

F = TypeVar("F", bound=Callable[..., Any])

CONTEXT_SETTINGS = {"help_option_names": ["-h", "--help"]}


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("mixnet-cli")
    except PackageNotFoundError:
        from . import __version__

        return __version__


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
            error = click.ClickException(str(exc))
            error.exit_code = exc.exit_code
            raise error from None
        except KeyboardInterrupt:
            if settings.debug():
                raise
            click.echo("Interrupted.", err=True)
            sys.exit(130)
        except (click.ClickException, click.exceptions.Exit, click.Abort, SystemExit):
            raise
        except Exception as exc:  # a bug: still one line, unless debugging
            if settings.debug():
                raise
            raise click.ClickException(
                f"unexpected {type(exc).__name__}: {exc} (a bug; rerun with MIXNET_DEBUG=1 and report the traceback)"
            ) from None

    return wrapper  # type: ignore[return-value]


def _model_names_help() -> str:
    return "S, M, L (or MixNet_S, mixnet_m, ...)"


def output_options(func: F) -> F:
    """The same output flags on every command that prints rows."""
    func = click.option(
        "--jsonl", "fmt", flag_value="jsonl", help="One JSON object per line, printed as each finishes."
    )(func)
    func = click.option("--json", "fmt", flag_value="json", help="One JSON array.")(func)
    func = click.option(
        "--format",
        "fmt",
        type=click.Choice(["table", "json", "jsonl"]),
        default="table",
        show_default=True,
        help="Output format.",
    )(func)
    return func


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
        help="Fetch weights from URL/<file name> instead of PaddleClas's server; repeat to give fallbacks "
        "(also MIXNET_MIRROR).",
    )(func)
    return func


@click.group(context_settings=CONTEXT_SETTINGS)
@click.version_option(version=None, package_name="mixnet-cli", prog_name="mixnet", message="%(prog)s %(version)s")
def main() -> None:
    """Classify images with PaddleClas's MixNet models (MixNet_S, MixNet_M, MixNet_L, ImageNet-1k).

    \b
      mixnet classify cat.jpg --model L
      mixnet classify photos/ --jsonl | jq -r .predictions[0].label
      mixnet download all

    Weights are downloaded on first use and cached (see `mixnet download --help`).
    """


def _expand_inputs(paths: tuple[str, ...]) -> Iterator[tuple[str, Path]]:
    from .inputs import expand_paths

    yield from expand_paths(paths)


@main.command(context_settings=CONTEXT_SETTINGS)
@click.argument("images", nargs=-1, required=True, metavar="IMAGE...")
@click.option("-m", "--model", default="MixNet_S", show_default=True, help=f"Model: {_model_names_help()}.")
@click.option("-k", "--topk", default=5, show_default=True, type=click.IntRange(1, 1000), help="How many labels per image.")
@output_options
@click.option(
    "--device",
    default=None,
    metavar="auto|cpu|gpu|gpu:N",
    help="Where to run: the GPU when paddle has CUDA and sees one, else the CPU (default auto; MIXNET_DEVICE).",
)
@click.option("-b", "--batch-size", default=8, show_default=True, type=click.IntRange(1, 1024), help="Images per forward pass.")
@network_options
@click.option("-v", "--verbose", is_flag=True, help="Say on stderr which model, weights, device and engine ran.")
@user_errors
def classify(
    images: tuple[str, ...],
    model: str,
    topk: int,
    fmt: str,
    device: str | None,
    batch_size: int,
    mirrors: tuple[str, ...],
    offline: bool | None,
    verbose: bool,
) -> None:
    """Print the top-k ImageNet labels of each IMAGE (files or directories).

    \b
      mixnet classify cat.jpg
      mixnet classify cat.jpg dog.png --model L --json
      mixnet classify photos/ --jsonl | jq -r '.predictions[0].label'

    A failed image prints an error in its place (JSON: an "error" object), the others are still classified,
    and the exit code is 1.
    """
    from .classifier import Classifier
    from .engine import check_device_name
    from .manifest import resolve_model
    from .output import classification_tables, write_rows

    resolve_model(model)  # a bad name is a usage error before anything slow happens
    device_name = check_device_name(device or settings.device() or "auto")
    classifier = Classifier(model, device=device_name, mirrors=mirrors or None, offline=offline)
    if verbose:
        weights = classifier.weights
        click.echo(
            f"model {classifier.model_name}, weights {weights.path} (sha256 {weights.record.sha256[:12]}), "
            f"device {classifier.device_choice.device} ({classifier.device_choice.reason}), "
            f"engine {classifier.engine.name}",
            err=True,
        )
    failures = 0

    def rows() -> Iterator[dict[str, Any]]:
        nonlocal failures
        for result in classifier.classify_many(_expand_inputs(images), topk=topk, batch_size=batch_size):
            if not result.ok:
                failures += 1
                if fmt != "table":
                    click.echo(f"Error: {result.error}", err=True)
            yield result.to_dict()

    write_rows(rows(), fmt, click.get_text_stream("stdout"), table=classification_tables)
    if failures:
        sys.exit(1)


@main.command(context_settings=CONTEXT_SETTINGS)
@click.argument("models", nargs=-1, required=True, metavar="MODEL...")
@click.option("--force", is_flag=True, help="Download again even if the cache holds a verified copy.")
@network_options
@user_errors
def download(models: tuple[str, ...], force: bool, mirrors: tuple[str, ...], offline: bool | None) -> None:
    """Download and verify the weights of MODEL (S, M, L or all) into the cache.

    \b
      mixnet download S
      mixnet download all --mirror https://my-mirror.example/paddleclas

    A second run uses the cache and does not touch the network. Weights land in the cache only after they
    are complete and verified: checksum where one is published, and every parameter name and shape of the
    architecture.
    """
    from .cache import weights_path
    from .manifest import model_names, resolve_model
    from .weights import ensure_weights

    wanted = model_names() if any(m.lower() == "all" for m in models) else [resolve_model(m).name for m in models]
    specs = [resolve_model(name) for name in dict.fromkeys(wanted)]
    for spec in specs:
        already = weights_path(spec).is_file() and not force
        weights = ensure_weights(spec, mirrors=mirrors or None, offline=offline, force=force)
        state = "cached" if already else "downloaded"
        click.echo(f"{spec.name}: {state} {weights.path} ({weights.record.size} bytes, sha256 {weights.record.sha256})", err=True)
