"""The ``mixnet`` command: parse arguments, call the library, render its results. Nothing else lives here.

The command line is the only layer that imports click: this package, one module per command group (``classify``,
``serve``, ``dataset``, ``models``, ``measure``) and what they share (``common``). Library errors
(:class:`~mixnet_cli.base.errors.MixnetError`) become one-line ``Error: ...`` messages with exit code 1 (2 for
usage errors); tracebacks only with ``MIXNET_DEBUG=1``.
"""

from __future__ import annotations

import sys
from typing import Any

import click

from ..base import settings
from .common import CONTEXT_SETTINGS, show_messages


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
    show_messages()
    if not settings.debug():
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
