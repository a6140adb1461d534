"""What every command shares: the options that several commands take, the decorator that turns library
errors into one-line messages and exit codes, output files, progress and interrupts."""

from __future__ import annotations

import contextlib
import errno
import functools
import logging
import os
import sys
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator, NoReturn, Sequence, TypeVar

import click

from ..base import settings
from ..base.errors import DeviceError, MixnetError, UsageError
from ..engines import ENGINES, engine_names, ranked
from ..output import FORMATS

if TYPE_CHECKING:
    from ..base.manifest import ModelSpec



F = TypeVar("F", bound=Callable[..., Any])

CONTEXT_SETTINGS = {"help_option_names": ["-h", "--help"]}


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("mixnet-cli")
    except PackageNotFoundError:
        from .. import __version__

        return __version__


_OUTPUT_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EIO, errno.EROFS}


def interrupted() -> NoReturn:
    """Say "Interrupted." and exit 130, as a command stopped by Ctrl-C does."""
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
            interrupted()
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
                interrupted()  # e.g. numpy turns a Ctrl-C during its import into an ImportError
            raise click.ClickException(
                f"unexpected {type(exc).__name__}: {exc} (a bug; rerun with MIXNET_DEBUG=1 and report the traceback)"
            ) from None

    return wrapper  # type: ignore[return-value]


def model_names_help() -> str:
    return "S, M, L (or MixNet_S, mixnet_m, ...)"


def complete_model(ctx: click.Context, param: click.Parameter, incomplete: str) -> list[str]:
    """Shell completion for model names (the manifest is small and cheap to read)."""
    from ..base.manifest import load_manifest

    names = [name for spec in load_manifest().models.values() for name in (spec.short_name, spec.name)]
    return [name for name in names if name.lower().startswith(incomplete.lower())]


def complete_models(ctx: click.Context, param: click.Parameter, incomplete: str) -> list[str]:
    """Shell completion where several models, or ``all``, may be named."""
    return complete_model(ctx, param, incomplete) + (["all"] if "all".startswith(incomplete.lower()) else [])


# The format a results file's extension names, when no format flag says otherwise (-o results.csv).
FORMAT_BY_EXTENSION = {".json": "json", ".jsonl": "jsonl", ".csv": "csv"}


def _format_flag(name: str) -> str:
    """The option that asks for format ``name``: ``--json``, ``--jsonl``, ``--csv``; table has only ``--format``."""
    return "--format table" if name == "table" else f"--{name}"


def output_format(chosen: Sequence[str], output: str | None) -> str:
    """The output format from the format flags given (``--format X``, ``--json``, ``--jsonl``, ``--csv``) and
    ``-o``: the flags when they agree, else the extension of ``-o`` when it is a known one (``.json``, ``.jsonl``,
    ``.csv``), else ``table``. Two different formats asked for are a :class:`UsageError`."""
    wanted = list(dict.fromkeys(chosen))
    if len(wanted) > 1:
        raise UsageError(f"{' and '.join(_format_flag(name) for name in wanted)} ask for different output "
                         "formats: give one")
    if wanted:
        return wanted[0]
    if output not in (None, "-"):
        return FORMAT_BY_EXTENSION.get(Path(str(output)).suffix.lower(), "table")
    return "table"


def output_options(func: F | None = None, *, json_help: str = "One JSON array (same as --format json).",
                   jsonl_help: str = "One JSON object per line, printed as each finishes.",
                   output_file: bool = False) -> Any:
    """The same output flags on every command that prints rows (``@output_options``, or with its own words for
    what JSON and JSON lines hold: ``@output_options(json_help=...)``). The command receives ``fmt``: what the
    flags ask for (two different ones are a usage error), else, for a command with ``-o``, the format its
    extension names, else ``table`` (:func:`output_format`). ``output_file``: the command has ``-o FILE``
    (its help says so)."""

    def decorate(func: F) -> F:
        @functools.wraps(func)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            flags = [kwargs.pop("fmt_format")] + [name for name in FORMATS if kwargs.pop(f"fmt_{name}", False)]
            try:
                kwargs["fmt"] = output_format([flag for flag in flags if flag], kwargs.get("output"))
            except UsageError as exc:
                raise click.UsageError(str(exc)) from None
            return func(*args, **kwargs)

        wrapped: Any = wrapper
        wrapped = click.option("--csv", "fmt_csv", is_flag=True, help="CSV with a header line (same as --format csv).")(wrapped)
        wrapped = click.option("--jsonl", "fmt_jsonl", is_flag=True, help=jsonl_help)(wrapped)
        wrapped = click.option("--json", "fmt_json", is_flag=True, help=json_help)(wrapped)
        return click.option(
            "--format",
            "fmt_format",
            type=click.Choice(list(FORMATS)),
            default=None,
            help="Output format (default table, or with -o the one its extension names: .json, .jsonl, .csv)."
            if output_file else "Output format (default table).",
        )(wrapped)

    return decorate(func) if func is not None else decorate


def _complete_device(ctx: click.Context, param: click.Parameter, incomplete: str) -> list[str]:
    return [name for name in ("auto", "cpu", "gpu", "gpu:0") if name.startswith(incomplete.lower())]


def _complete_engine(ctx: click.Context, param: click.Parameter, incomplete: str) -> list[str]:
    return [name for name in engine_names() if name.startswith(incomplete.lower())]


def gpu_engines_help() -> str:
    """What makes ``auto`` pick a GPU, in ``auto``'s order, from the table of engines: "a CUDA build of torch,
    onnxruntime-gpu or a CUDA build of paddle"."""
    import re

    needs = []
    for info in ranked("gpu"):
        found = re.search(r"gpu \(with (.+?)\)", info.devices)
        needs.append(found.group(1) if found else info.name)
    return ", ".join(needs[:-1]) + " or " + needs[-1] if len(needs) > 1 else "".join(needs)


def auto_engines_help() -> str:
    """``auto``'s order of engines on each device, from the table of engines."""
    return (f"on the CPU {', '.join(info.name for info in ranked('cpu'))}; "
            f"on a GPU {', '.join(info.name for info in ranked('gpu'))}")


def device_option(func: F) -> F:
    return click.option(
        "--device",
        default=None,
        shell_complete=_complete_device,
        metavar="auto|cpu|gpu|gpu:N",
        help=f"Where to run: a GPU when {gpu_engines_help()} is installed and sees one, else the CPU (default "
        "auto; MIXNET_DEVICE). cuda and cuda:N mean gpu and gpu:N.",
    )(func)


def engine_option(func: F) -> F:
    return click.option(
        "--engine",
        default=None,
        shell_complete=_complete_engine,
        metavar="|".join(engine_names()),
        help="What runs the network: auto picks the fastest installed for the device: on the CPU, this machine's "
        "measurement when `mixnet doctor --measure` made one, else OpenVINO first on AVX-512 CPUs; otherwise the "
        f"first installed that runs there, {auto_engines_help()} (`mixnet doctor` says which and why); "
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


def precision_option(func: F) -> F:
    return click.option(
        "--precision", type=click.Choice(["fp32", "bf16"], case_sensitive=False), default="fp32", show_default=True,
        help="Arithmetic of the forward pass. fp32: every engine gives the reference answers (within 1e-4). bf16 "
        "(opt-in): OpenVINO in bf16 on a CPU with bf16 arithmetic (avx512_bf16 or AMX; refused elsewhere), "
        "1.45-1.75x fp32's throughput at batch 8, answers close to fp32's but not the same (README, Precision).",
    )(func)


def threads_option(func: F) -> F:
    return click.option(
        "--threads", type=click.IntRange(1, 1024), default=None,
        help="CPU threads per forward pass (default: OMP_NUM_THREADS when set, else the physical cores).",
    )(func)


def specs_for(names: Sequence[str]) -> list["ModelSpec"]:
    """The models named on the command line (``all`` for every one), each once, in order."""
    from ..base.manifest import model_names, resolve_model

    wanted = model_names() if any(n.strip().lower() == "all" for n in names) else [resolve_model(n).name for n in names]
    return [resolve_model(name) for name in dict.fromkeys(wanted)]


def device_and_engine(device: str | None, engine: str | None) -> tuple[str, str]:
    """``--device`` and ``--engine``: the flag, else MIXNET_DEVICE / MIXNET_ENGINE, else auto; all checked."""
    from ..engines.choice import check_device_name, check_engine_name

    context = click.get_current_context(silent=True)
    if context is not None and device is None and os.environ.get("MIXNET_DEVICE", "").strip():
        # A device error later says where the device came from (user_errors reads this).
        context.meta["mixnet.device_from"] = "MIXNET_DEVICE"
    return (settings.choose(device, "MIXNET_DEVICE", check_device_name, "auto"),
            settings.choose(engine, "MIXNET_ENGINE", check_engine_name, "auto"))


def _checked_mirrors(ctx: click.Context, param: click.Parameter, value: tuple[str, ...]) -> tuple[str, ...]:
    """--mirror is checked as it is parsed, so a bad one is a usage error even when the weights are cached."""
    if not value:
        return value  # without importing the weights layer (numpy), which `classify --server` never needs
    from ..weights.store import check_mirrors

    try:
        return tuple(check_mirrors(value))
    except UsageError as exc:
        raise click.UsageError(str(exc), ctx=ctx) from None


def checked_server(ctx: click.Context, param: click.Parameter, value: str | None) -> str | None:
    """--server is checked as it is parsed: requests would refuse a URL without http(s):// only at the first
    request, with an exception that does not name the option."""
    if value is None:
        return None  # a local run: the client's module is not even imported
    from ..service.remote import check_server_url

    try:
        return check_server_url(value)
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


def show_messages(quiet: bool = False) -> None:
    """Show the library's notices and warnings on stderr (only errors with ``quiet``, which raise anyway)."""
    logger = logging.getLogger("mixnet_cli")
    if not any(isinstance(handler, _StderrHandler) for handler in logger.handlers):
        logger.addHandler(_StderrHandler())
    # Said here alone: a library that gives the root logger a handler as it loads (paddleclas, under the paddle
    # engine) would print each notice a second time, in its own format.
    logger.propagate = False
    logger.setLevel(logging.ERROR if quiet else logging.INFO)


def check_output_path(output: str | None, option: str = "-o") -> None:
    """Fail before any work when ``-o`` cannot be written, rather than after classifying everything: a file is
    created and removed in its directory, which finds what permissions alone do not (``/proc``, a read-only
    mount, a full quota)."""
    import tempfile

    if output in (None, "-"):
        return
    parent = Path(output).expanduser().resolve().parent
    if not parent.is_dir():
        raise UsageError(f"{option} {output}: directory {parent} does not exist; create it or choose another path")
    try:
        with tempfile.TemporaryFile(dir=parent, prefix=".mixnet-probe-"):
            pass
    except OSError as exc:
        raise UsageError(f"{option} {output}: cannot write a file in {parent} ({exc.strerror or exc}); choose "
                         "another path") from None


def open_output(output: str | None) -> Any:
    """stdout, or ``-o FILE`` via :class:`~mixnet_cli.output.AtomicOutput`."""
    if output in (None, "-"):
        return click.open_file("-", "w", encoding="utf-8")
    from ..output import AtomicOutput

    try:
        return AtomicOutput(Path(output).expanduser())
    except OSError as exc:  # the directory changed since check_output_path
        raise MixnetError(f"-o {output}: cannot write ({exc.strerror or exc}); choose another path") from None


@contextlib.contextmanager
def interrupt_ends_at_once() -> Iterator[None]:
    """For commands that run engines: Ctrl-C ends the process at once. Results already written stay, a
    half-written ``-o`` file goes, and nothing waits for OpenVINO's threads, whose teardown from an interrupt
    could hang or abort the process. What the cache may hold then is what it was built to survive: a ``.part``
    download that resumes, a conversion directory the next conversion removes; the files of the locks held are
    deleted."""
    import signal

    def stop(signum: int, frame: object) -> None:
        with contextlib.suppress(Exception):
            sys.stdout.flush()
        from ..output import UNFINISHED_OUTPUTS

        for path in list(UNFINISHED_OUTPUTS):
            with contextlib.suppress(OSError):
                path.unlink()
        from ..base.locks import delete_held_lock_files

        delete_held_lock_files()  # os._exit skips the releases
        from ..base.third_party import stderr_fileno

        os.write(stderr_fileno(), b"Interrupted.\n")
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


def progress_bar(total: int, *, enabled: bool) -> Any:
    """A tqdm bar on stderr for runs of more than a handful of images, when stderr is a terminal."""
    show = enabled and total > 8 and sys.stderr.isatty()
    if not show:
        return _NoProgress()
    from tqdm import tqdm

    return tqdm(total=total, unit="img", file=sys.stderr, leave=False, dynamic_ncols=True)


