"""The `spinenet` process (core/process.py::run_as_process and exit_process, apps/cli.py::command_line): an
interrupt during the work is reported on one line with exit 130; once the work is done, one during the
exit changes nothing and prints no traceback.  The exit skips the interpreter's teardown but keeps what a
user sees of it: the exit status, all output, the exit callbacks, and the threads still running."""

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
                   "cli.command_line()\n")
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
                   "cli.command_line()\n")
    assert done.returncode == 130
    assert done.stderr.splitlines() == ["spinenet: interrupted"]


def test_the_exit_keeps_the_status_the_output_and_the_exit_callbacks():
    done = _python("import atexit, sys\n"
                   "from SpineNetLib.core.process import exit_process\n"
                   "atexit.register(lambda: print('callback ran'))\n"
                   "sys.stdout.write('buffered, no newline; ')\n"
                   "sys.stderr.write('a warning')\n"
                   "exit_process(3)\n"
                   "print('never reached')\n")
    assert done.returncode == 3
    assert done.stdout == "buffered, no newline; callback ran\n"
    assert done.stderr == "a warning"


def test_the_exit_waits_for_a_thread_still_running():
    done = _python("import threading, time\n"
                   "from SpineNetLib.core.process import exit_process\n"
                   "def late():\n"
                   "    time.sleep(0.3)\n"
                   "    print('thread finished', flush=True)\n"
                   "threading.Thread(target=late).start()\n"
                   "exit_process(0)\n")
    assert done.returncode == 0 and done.stdout == "thread finished\n" and done.stderr == ""


def test_the_command_exits_with_one_line_and_status_2_on_a_missing_scan(tmp_path):
    done = subprocess.run([sys.executable, "-m", "SpineNetLib", "run", str(tmp_path / "missing.nii.gz"), "-o",
                           str(tmp_path / "out")], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and len(done.stderr.splitlines()) == 1 and "missing.nii.gz" in done.stderr


def test_a_reader_that_stops_reading_ends_the_command_quietly_with_141():
    """``spinenet demo | head -1``: the demo had written its files, then said "error: cannot access: Broken pipe"
    and exit 2, which reads as a problem with the input."""
    done = _python("import os, sys\n"
                   "from SpineNetLib.core.errors import exit_status\n"
                   "from SpineNetLib.core.process import exit_process\n"
                   "read, write = os.pipe()\n"
                   "os.close(read)\n"
                   "os.dup2(write, sys.stdout.fileno())\n"
                   "def summary():\n"
                   "    for k in range(10000):\n"
                   "        print('a line of the results table', k)\n"
                   "exit_process(exit_status('spinenet', summary))\n")
    assert done.returncode == 141 and done.stderr == ""
    other = _python("from SpineNetLib.core.errors import exit_status\n"
                    "def fails():\n"
                    "    raise BrokenPipeError(32, 'Broken pipe')   # another pipe than the output's\n"
                    "raise SystemExit(exit_status('spinenet', fails))\n")
    assert other.returncode == 2 and other.stderr.startswith("spinenet: error:")
