"""The worker process kept running, as the Slicer module keeps it (``python -m SpineNetLib.apps.worker
--serve``; docs/SLICER.md, "For developers"), for the benchmark scripts that send it requests."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


class ServedWorker:
    """A served worker: :meth:`start` waits for its ``READY``; :meth:`ask` sends one request and reads its
    answer; started again by :meth:`ask` when it has died.  ``popen`` holds extra ``subprocess.Popen``
    arguments (``env``, ``stderr``, ``preexec_fn``, ...)."""

    def __init__(self, **popen):
        self.popen, self.process, self.starts, self.ready_seconds = popen, None, 0, None

    def start(self) -> None:
        start = time.perf_counter()
        self.process = subprocess.Popen([sys.executable, "-m", "SpineNetLib.apps.worker", "--serve"], cwd=ROOT,
                                        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, bufsize=1,
                                        **{"stderr": subprocess.DEVNULL, **self.popen})
        self.starts += 1
        ready = self.process.stdout.readline()
        if not ready.startswith("READY"):
            raise SystemExit(f"the served worker did not start: {ready.strip() or 'no output'}")
        self.ready_seconds = time.perf_counter() - start

    def ask(self, arguments: list[str]) -> tuple[list[str], float]:
        """The answer's lines (the last one ``END <status>``, unless the process died) and its seconds,
        from writing the request to reading its ``END``."""
        if self.process is None or self.process.poll() is not None:
            self.start()
        start = time.perf_counter()
        lines = []
        try:
            self.process.stdin.write(json.dumps(arguments) + "\n")
            self.process.stdin.flush()
            while not lines or not lines[-1].startswith("END"):
                line = self.process.stdout.readline()
                if not line:
                    break
                lines.append(line.rstrip("\n"))
        except BrokenPipeError:
            pass
        return lines, time.perf_counter() - start

    def peak_mb(self) -> float:
        """The process's largest resident memory so far (Linux; NaN elsewhere)."""
        status = Path(f"/proc/{self.process.pid}/status")
        for line in (status.read_text().splitlines() if status.is_file() else []):
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
        return float("nan")

    def close(self) -> None:
        """Close its input (it ends by itself) and wait for it."""
        if self.process is not None and self.process.poll() is None:
            self.process.stdin.close()
            self.process.wait(timeout=60)
