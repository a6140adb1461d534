"""The ``mixnet`` command: parse arguments, call the library, render its results. Nothing else lives here.

The command line is the only layer that imports click: this package, one module per command group (``classify``,
``serve``, ``dataset``, ``models``, ``measure``) and what they share (``common``). Library errors
(:class:`~mixnet_cli.base.errors.MixnetError`) become one-line ``Error: ...`` messages with exit code 1 (2 for
usage errors); tracebacks only with ``MIXNET_DEBUG=1``.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
from typing import Any, MutableMapping, NoReturn


def _interrupted_while_loading(signum: int, frame: object) -> None:
    os.write(2, b"Interrupted.\n")
    os._exit(130)


# A Ctrl-C while the command line's modules load (a few tenths of a second on a busy machine) would print a
# KeyboardInterrupt traceback from inside some import: it ends the process as a later one does. Only where SIGINT
# has Python's default handler (a shell that starts a job in the background ignores it), and only until the end of
# this module, when the default handler is put back.
_LOADING_HANDLER = (threading.current_thread() is threading.main_thread()
                    and signal.getsignal(signal.SIGINT) is signal.default_int_handler)
if _LOADING_HANDLER:
    signal.signal(signal.SIGINT, _interrupted_while_loading)

import click  # noqa: E402 (after the handler above, like everything below)

from ..base import settings  # noqa: E402
from .common import CONTEXT_SETTINGS, interrupted, show_messages  # noqa: E402


# numpy's BLAS (OpenBLAS in numpy's wheels) starts a pool of threads when numpy is imported, and they spin on
# the other cores for a while, competing with the process's own start-up (29% of a one-image run's CPU on 2 cores).
# The command line does no BLAS work of size (engines bring their own thread pools: ONNX Runtime's, OpenVINO's
# TBB, paddle's MKL), so one BLAS thread is enough. Only OpenBLAS's variables: OMP_NUM_THREADS is the user's
# thread count for the engines (settings.cpu_threads) and MKL's is paddle's. Set in this process before numpy
# loads, never when the user set them, and only by the program (``__call__``), not when ``main`` is imported.
BLAS_THREAD_VARIABLES = ("OPENBLAS_NUM_THREADS",)


def quiet_blas_threads(environ: MutableMapping[str, str]) -> None:
    """One BLAS thread in ``environ`` (this process's environment) unless the user chose a number already."""
    for name in BLAS_THREAD_VARIABLES:
        if not environ.get(name, "").strip():
            environ[name] = "1"


def exit_without_teardown(code: Any) -> NoReturn:
    """End the program with ``code`` (``sys.exit``'s meaning) once what it wrote is out, skipping the interpreter's
    teardown: freeing every module and engine (ONNX Runtime's session, OpenVINO's plugins) takes ~40 ms that a
    user waits for and nothing needs. Commands close their output files (``-o``: complete, renamed into place)
    before they return. What exit handlers do still happens: threads that are not daemons are waited for (e.g. a
    cache record being written) and ``atexit`` handlers run (held lock files are deleted, Ray is shut down)."""
    if code is None:
        status = 0
    elif isinstance(code, int):
        status = code
    else:  # sys.exit("message"): the message on stderr, status 1
        print(code, file=sys.stderr)
        status = 1
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except Exception:  # noqa: BLE001 (a closed pipe: nothing more can be said on it)
            pass
    import atexit
    import threading

    shutdown = getattr(threading, "_shutdown", None)  # joins non-daemon threads, as the interpreter does first
    run_exit_handlers = getattr(atexit, "_run_exitfuncs", None)
    if shutdown is None or run_exit_handlers is None:  # not CPython: the usual exit
        sys.exit(status)
    shutdown()
    run_exit_handlers()
    from ..base.locks import delete_held_lock_files

    delete_held_lock_files()  # atexit's already did; here too in case a handler above failed first
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except Exception:  # noqa: BLE001
            pass
    os._exit(status)


class _OneLineErrors(click.Group):
    """click shows a usage error as a usage block, a hint and the error; here it is one line, like every error.
    Run as the program (``mixnet``, ``python -m mixnet_cli``: called with no arguments, so they come from
    ``sys.argv``), it ends without the interpreter's teardown (:func:`exit_without_teardown`); called with
    arguments or ``standalone_mode=False``, as tests and programs embedding it do, it behaves as click's."""

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if args or kwargs.get("args") is not None or kwargs.get("standalone_mode") is False:
            return self.main(*args, **kwargs)
        quiet_blas_threads(os.environ)
        try:
            self.main(**kwargs)
            code: Any = 0
        except SystemExit as exc:
            code = exc.code
        exit_without_teardown(code)

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
        except click.Abort as exc:
            if isinstance(exc.__cause__ or exc.__context__, KeyboardInterrupt):  # not Ctrl-D at a prompt
                interrupted()
            click.echo("Aborted.", err=True)
            sys.exit(1)
        sys.exit(result if isinstance(result, int) else 0)

    def invoke(self, ctx: click.Context) -> Any:
        # click turns a Ctrl-C outside the commands' own handling (while the group's callback or a command's
        # imports run) into Abort, printing "Aborted." and exiting 1: here it is "Interrupted." and 130, as later.
        try:
            return super().invoke(ctx)
        except KeyboardInterrupt:
            if settings.debug():
                raise
            interrupted()


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
    show_messages()
    if not settings.debug():
        # Python's stderr on its own descriptor, so that C libraries' writes to descriptor 2 (libpng's warnings)
        # can be silenced while images decode without ever losing a line of mixnet's (base/third_party.py).
        from ..base.third_party import separate_native_stderr

        separate_native_stderr()
        # Libraries' Python warnings (Pillow on odd files, among others) are not for the person at the terminal:
        # each input's trouble is already its one-line error. MIXNET_DEBUG=1 shows them.
        import warnings

        warnings.simplefilter("ignore")




def _register() -> None:
    from . import classify, dataset, measure, models, serve

    for command in (classify.classify, serve.serve, dataset.classify_dataset, models.download, models.models,
                    models.cache_group, models.export_command, measure.doctor, measure.evaluate_command,
                    measure.benchmark):
        main.add_command(command)


_register()
if _LOADING_HANDLER and signal.getsignal(signal.SIGINT) is _interrupted_while_loading:
    signal.signal(signal.SIGINT, signal.default_int_handler)
