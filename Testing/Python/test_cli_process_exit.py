"""Ctrl-C and the `spinenet` process (core/process.py::run_as_process, apps/cli.py::program): an interrupt
during the work is reported on one line with exit 130; once the work is done, one during the interpreter's
exit changes nothing and prints no traceback."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _python(code: str) -> subprocess.CompletedProcess:
    """Run ``code`` in a new interpreter with Ctrl-C handled as in a terminal: a test run in the
    background (``cmd &``, some CI runners) passes SIGINT on ignored, and Python then ignores it too."""
    as_in_a_terminal = "import signal\nsignal.signal(signal.SIGINT, signal.default_int_handler)\n"
    return subprocess.run([sys.executable, "-c", as_in_a_terminal + code], cwd=ROOT, capture_output=True,
                          text=True, timeout=120)


def test_ctrl_c_during_the_exit_after_the_work_is_ignored():
    done = _python("import atexit, os, signal, sys, time\n"
                   "from SpineNetLib.apps import cli\n"
                   "def finished(args):\n"
                   "    # as torch's finalisers or an exit callback run while the user presses Ctrl-C\n"
                   "    atexit.register(lambda: (os.kill(os.getpid(), signal.SIGINT), time.sleep(0.5),\n"
                   "                             print('the exit went on')))\n"
                   "    print('results written')\n"
                   "cli.command_run = finished\n"
                   "sys.argv = ['spinenet', 'run', 'scan.nii.gz', '-o', 'out']\n"
                   "sys.exit(cli.program())\n")
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["results", "written", "the", "exit", "went", "on"]
    assert done.stderr == ""


def test_ctrl_c_during_the_work_is_one_line_and_exit_130():
    done = _python("import os, signal, sys, time\n"
                   "from SpineNetLib.apps import cli\n"
                   "def interrupted(args):\n"
                   "    os.kill(os.getpid(), signal.SIGINT)\n"
                   "    time.sleep(10)\n"
                   "cli.command_run = interrupted\n"
                   "sys.argv = ['spinenet', 'run', 'scan.nii.gz', '-o', 'out']\n"
                   "sys.exit(cli.program())\n")
    assert done.returncode == 130
    assert done.stderr.splitlines() == ["spinenet: interrupted"]
