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
from typing import Any


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
