"""Ctrl-C at any moment of a run once the command line is loaded: "Interrupted." and exit code 130, never click's
"Aborted." nor a traceback (a Ctrl-C inside the interpreter's own start-up, before that, is Python's: README)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import pytest

# The command line, run as the console script runs it, with a real SIGINT sent to the process the moment a given
# module starts importing: a deterministic "early" Ctrl-C (a fixed delay lands anywhere on a loaded machine).
_RUN_WITH_CTRL_C_AT_IMPORT = """
import os, signal, sys

module = sys.argv[1]

class CtrlCAt:
    def find_spec(self, name, path=None, target=None):
        if name == module:
            os.kill(os.getpid(), signal.SIGINT)
        return None

sys.meta_path.insert(0, CtrlCAt())
sys.argv = ["mixnet"] + sys.argv[2:]
from mixnet_cli.cli import main
main()
"""


@pytest.mark.parametrize("module, arguments", [
    # while the command line's own modules load, before click runs
    ("mixnet_cli.cli.classify", ["models"]),
    # while click parses the options (--mirror's check imports its module)
    ("mixnet_cli.weights.store", ["classify", "--mirror", "http://127.0.0.1:9/", "missing.png"]),
    # while the group's callback runs, outside any command
    ("mixnet_cli.base.third_party", ["models"]),
    # inside a command
    ("mixnet_cli.base.manifest", ["models"]),
], ids=["loading", "parsing", "group", "command"])
def test_an_early_ctrl_c_is_interrupted_and_130(module, arguments, tmp_path):
    process = subprocess.run(
        [sys.executable, "-c", _RUN_WITH_CTRL_C_AT_IMPORT, module, *arguments], capture_output=True, text=True,
        timeout=120, cwd=tmp_path, env={**os.environ, "MIXNET_OFFLINE": "1"},
        # As from a terminal: a shell that starts the test run in the background has SIGINT ignored.
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    assert process.returncode == 130, process.stderr
    assert process.stderr.strip() == "Interrupted.", process.stderr
    assert process.stdout == ""


def test_sigterm_after_paddle_loads_is_the_default_not_paddles_stack_dump(tmp_path):
    """Paddle's core installs its own C handler of SIGTERM when it loads, which prints a "FatalError: Termination
    signal" block on stdout (into a JSON lines output): after mixnet's import of paddle, SIGTERM is the process's
    own again (here the default: the process ends with the signal, stdout untouched)."""
    from mixnet_cli.base.third_party import paddle_missing

    if paddle_missing() is not None:
        pytest.skip(paddle_missing() or "")
    script = ("import os, signal\n"
              "from mixnet_cli.base.third_party import import_quietly\n"
              "import_quietly('paddle')\n"
              "print('loaded', flush=True)\n"
              "os.kill(os.getpid(), signal.SIGTERM)\n")
    environment = {**os.environ, "MIXNET_HOME": str(tmp_path / "home")}
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                            env=environment)
    assert result.returncode == -signal.SIGTERM, (result.returncode, result.stdout[-500:])
    assert result.stdout == "loaded\n", result.stdout[-500:]
