"""Hostile inputs, faults and DICOM header mutants through `spinenet run` (issue 12): figures, not a test.

    python benchmarks/hostile_sweep.py [--mutants 257] [--seed 0] [--keep DIR] [--only CATEGORY[,CATEGORY]]
                                       [--timeout 120] [--max-seconds 30] [--memory-gb 4] [--list] [--served]

Every case is built (``benchmarks/hostile_cases.py``) in a temporary folder from a small synthetic
lumbar phantom (192 x 160 pixels of 1.6 mm, 5 sagittal slices: a run that gets through to the
networks takes a few seconds),
and runs as ``python -m SpineNetLib run INPUT -o OUT --threads 1 --quiet [options]`` in a process
of its own, under a wall-clock limit (``--timeout``), an address-space limit (RLIMIT_AS,
``--memory-gb``) and, when the sweep runs as root, without the two capabilities that let root read
and write any file (so that the permission cases mean something).

A case FAILS when its exit status is not 0 or 2 (1 is an internal error; a signal or the timeout
is a kill), a traceback appears, an error exit prints more than one line on stderr, anything but
``spinenet: warning:`` lines (and progress lines) reaches stderr, an input the issue says must be
refused exits 0 (or, where a warning is enough, exits 0 without one), a valid input does not exit
0, an error exit leaves result files (or changes an earlier result set in the output folder), a
temporary file (``.part``, staging folders) is left behind, a successful run's set is incomplete,
the run takes longer than ``--max-seconds`` or its peak RSS is above the memory limit.

Categories: files (empty, garbage, truncated files of every supported type), geometry (absurd
spacings and sizes, decompression bombs, MetaImage data files), voxels (NaN/Inf, constant, 2D,
4D, vector, label maps, extreme values), nothing (images without a spine: "0 vertebrae" must say
why), dicom (broken series), permissions (unreadable inputs, unwritable outputs, a full disk),
options (bad command-line values, weights that must not be trusted), valid (full default runs)
and mutants (seeded random corruptions of the phantom's DICOM headers).

``--served`` sends the same inputs instead, one request each, to one worker process kept running as
the Slicer module keeps it (``python -m SpineNetLib.apps.worker --serve``, under the same limits):
the cases that need command-line options, an environment or a file-size limit of their own are left
out.  A case then FAILS when its answer does not end with ``END 0`` or ``END 2`` (the process must
live on: one that died is started again and the case counts as failed), an ``END 2`` does not follow
exactly one ``ERROR`` line, a traceback or numpy repr appears in a line, the expectations above do not
hold (a refused input answered 0, a warning missing, a valid input refused, 0 vertebrae without
saying why), the output folder is left partial or changed, or the run is slower than
``--max-seconds``.  Last, the phantom is run again in that process and must give the result a fresh
process gives it: no failed run may leave state behind.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import re
import resource
import shutil
import signal
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from hostile_cases import CATEGORIES, OK, REFUSE, RESULT_SET, ROOT, WARN, Base, Case, build_cases
from script_errors import InputError, at_least
from served_worker import ServedWorker

PROGRESS_LINE = re.compile(r"^[A-Za-z][^:]*: \d+/\d+$")


@dataclass
class Outcome:
    case: Case
    status: int
    seconds: float
    peak_mb: float
    stderr: list[str]
    failures: list[str]


# --------------------------------------------------------------------------- running and judging

_LIBC = ctypes.CDLL(None, use_errno=True)
_PR_CAPBSET_DROP, _CAP_DAC_OVERRIDE, _CAP_DAC_READ_SEARCH = 24, 1, 2


def _limits(memory_bytes: int, file_size: int | None):
    def apply():
        resource.setrlimit(resource.RLIMIT_AS, (memory_bytes, memory_bytes))
        if file_size is not None:
            resource.setrlimit(resource.RLIMIT_FSIZE, (file_size, file_size))
        if os.geteuid() == 0:      # root reads and writes anything: drop that, so permissions count
            for cap in (_CAP_DAC_OVERRIDE, _CAP_DAC_READ_SEARCH):
                _LIBC.prctl(_PR_CAPBSET_DROP, cap, 0, 0, 0)
    return apply


def _snapshot(folder: Path) -> dict[str, bytes] | None:
    try:
        if not folder.is_dir():
            return None
        return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}
    except OSError:
        return None


def run_case(case: Case, index: int, work: Path, settings) -> Outcome:
    import subprocess

    out = case.output or work / "out" / f"c{index:04d}"
    before = _snapshot(out)
    command = [sys.executable, "-m", "SpineNetLib", "run", case.input, "-o", str(out)]
    command += (["--threads", "1"] if case.threads else []) + (["--quiet"] if case.quiet else []) + list(case.options)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "SPINENET_CACHE": str(work / "empty_cache"), **case.env}
    logs = work / "logs"
    logs.mkdir(exist_ok=True)
    with open(logs / f"c{index:04d}.out", "wb") as stdout, open(logs / f"c{index:04d}.err", "wb") as stderr:
        start = time.perf_counter()
        child = subprocess.Popen(command, cwd=ROOT, env=env, stdout=stdout, stderr=stderr, stdin=subprocess.DEVNULL,
                                 preexec_fn=_limits(settings.memory_gb << 30, case.file_size_limit),
                                 start_new_session=True)
        status, usage = None, None
        while status is None:
            pid, raw_status, usage = os.wait4(child.pid, os.WNOHANG)
            if pid:
                status = os.waitstatus_to_exitcode(raw_status)
            elif time.perf_counter() - start > settings.timeout:
                os.killpg(child.pid, signal.SIGKILL)
                os.wait4(child.pid, 0)
                status, usage = 124, None
            else:
                time.sleep(0.02)
        child.returncode = status
        seconds = time.perf_counter() - start
    err = (logs / f"c{index:04d}.err").read_text(errors="replace").splitlines()
    peak_mb = usage.ru_maxrss / 1024 if usage is not None else float("nan")
    failures = judge(case, status, err, seconds, peak_mb, out, before, settings)
    return Outcome(case, status, seconds, peak_mb, err, failures)


def judge(case: Case, status: int, err: list[str], seconds: float, peak_mb: float, out: Path,
          before: dict | None, settings) -> list[str]:
    """Why the case failed (empty: it passed)."""
    failures = []
    lines = [ln for ln in err if ln.strip() and not PROGRESS_LINE.match(ln.strip())]
    warnings = [ln for ln in lines if ln.startswith("spinenet: warning:")]
    if status not in (0, 2):
        failures.append({1: "exit 1 (internal error)", 124: "timed out"}.get(status, f"exit status {status}"))
    if any("Traceback" in ln for ln in err):
        failures.append("traceback")
    if status == 2 and len(lines) != 1:
        failures.append(f"{len(lines)} stderr lines on an error exit")
    stray = [ln for ln in lines if not ln.startswith(("spinenet: warning:", "spinenet: error:", "spinenet run: error:"))]
    if stray and status in (0, 2):
        failures.append(f"stray stderr line: {stray[0][:80]!r}")
    if any(re.search(r"np\.(float|int)\d*\(", ln) for ln in lines):
        failures.append("numpy repr in a message")
    failures += _expectations(case, status, warnings, out, seconds, settings, "exit 0")
    if peak_mb > settings.memory_gb * 1024:
        failures.append(f"peak RSS {peak_mb:.0f} MB")
    failures += _output_problems(status, out, before)
    if case.check is not None and (problem := case.check()):
        failures.append(problem)
    return failures


def _expectations(case: Case, status: int, warnings: list[str], out: Path, seconds: float, settings,
                  success: str) -> list[str]:
    """The failures of what the case expects, however it ran (``success``: how a successful end reads)."""
    failures = []
    if case.expect == REFUSE and status == 0:
        failures.append(f"accepted ({success}) where it must be refused")
    if case.expect == WARN and status == 0 and not any(case.warning in ln for ln in warnings):
        failures.append(f"{success} without a warning{f' saying {case.warning!r}' if case.warning else ''}")
    if status == 0 and _found_nothing(out) and not any("no vertebra" in ln for ln in warnings):
        failures.append("0 vertebrae without a warning saying why")
    if case.expect == OK and status != 0:
        failures.append("a valid input was not processed")
    if seconds > settings.max_seconds:
        failures.append(f"took {seconds:.0f} s")
    return failures


def _found_nothing(out: Path) -> bool:
    try:
        return not json.loads((out / "vertebrae.json").read_text())["vertebrae"]
    except (OSError, ValueError, KeyError, TypeError):
        return False


def _output_problems(status: int, out: Path, before: dict | None) -> list[str]:
    after = _snapshot(out)
    if after is None:
        return [] if status != 0 else ["no output folder after exit 0"]
    leftovers = sorted(name for name in after if any(part.startswith(".") for part in Path(name).parts))
    problems = [f"left behind: {', '.join(leftovers[:3])}"] if leftovers else []
    if status != 0:
        if after != (before or {}):
            problems.append("an error exit changed the output folder" + (" (partial or mixed set)" if before else ""))
        return problems
    missing = [n for n in RESULT_SET if n not in after]
    if missing:
        problems.append(f"incomplete result set: no {', '.join(missing)}")
    return problems


# --------------------------------------------------------------------------- the served worker

def start_served_worker(work: Path, settings) -> ServedWorker:
    """The served worker under the sweep's limits, as ``run_case`` starts each process."""
    served = ServedWorker(env={**os.environ, "OMP_NUM_THREADS": "1", "SPINENET_CACHE": str(work / "empty_cache")},
                          stderr=open(work / "served.err", "ab"), start_new_session=True,
                          preexec_fn=_limits(settings.memory_gb << 30, None))
    served.start()
    return served


def servable(case: Case) -> bool:
    """A case the served worker can answer: the input (and output) only, no options, environment or limits."""
    return not case.options and not case.env and case.file_size_limit is None


def run_served_case(case: Case, index: int, work: Path, served: ServedWorker, settings) -> Outcome:
    out = case.output or work / "out" / f"c{index:04d}"
    before = _snapshot(out)
    lines, seconds = served.ask(["--input", case.input, "--output", str(out)])
    status = int(lines[-1].split()[1]) if lines and lines[-1].startswith("END ") else 137
    failures = judge_served(case, status, lines, seconds, out, before, settings)
    return Outcome(case, status, seconds, served.peak_mb(), [ln for ln in lines if not ln.startswith("PROGRESS")],
                   failures)


def judge_served(case: Case, status: int, lines: list[str], seconds: float, out: Path, before: dict | None,
                 settings) -> list[str]:
    """Why a served case failed (empty: it passed)."""
    failures = []
    errors = [ln for ln in lines if ln.startswith("ERROR")]
    warnings = [ln for ln in lines if ln.startswith("WARNING")]
    if status not in (0, 2):
        failures.append("no END: the process died" if status == 137 else f"END {status}")
    if status == 2 and len(errors) != 1:
        failures.append(f"{len(errors)} ERROR lines on END 2")
    if status == 0 and errors:
        failures.append("an ERROR line on END 0")
    if any("Traceback" in ln or re.search(r"np\.(float|int)\d*\(", ln) for ln in lines):
        failures.append("traceback or numpy repr in a line")
    failures += _expectations(case, status, warnings, out, seconds, settings, "END 0")
    failures += _output_problems(status, out, before)
    if case.check is not None and (problem := case.check()):
        failures.append(problem)
    return failures


def served_state_check(base: Base, work: Path, served: ServedWorker) -> list[str]:
    """The phantom through the served worker after every case, against a fresh worker process: the same
    vertebrae (timings aside), or why not."""
    import subprocess

    nii = str(base.files[".nii.gz"])
    lines, _ = served.ask(["--input", nii, "--output", str(work / "state_served")])
    fresh = subprocess.run([sys.executable, "-m", "SpineNetLib.apps.worker", "--input", nii, "--output",
                            str(work / "state_fresh")], cwd=ROOT, capture_output=True, text=True,
                           env={**os.environ, "OMP_NUM_THREADS": "1"})
    if not lines or lines[-1] != "END 0" or fresh.returncode != 0:
        return [f"the phantom failed: served {lines[-1:]}, fresh exit {fresh.returncode}"]

    def vertebrae(folder):
        doc = json.loads((folder / "vertebrae.json").read_text())
        doc.pop("timings_s", None)
        return json.dumps(doc).replace(str(folder), "<out>")

    if vertebrae(work / "state_served") != vertebrae(work / "state_fresh"):
        return ["the served worker's phantom result differs from a fresh process's"]
    return []


# --------------------------------------------------------------------------- report

def print_report(outcomes: list[Outcome], seconds: float) -> int:
    print(f"\n{'category':<12} {'cases':>5} {'exit 0':>6} {'exit 2':>6} {'other':>5} {'fail':>5} "
          f"{'max s':>6} {'max MB':>7}")
    for category in CATEGORIES:
        rows = [o for o in outcomes if o.case.category == category]
        if not rows:
            continue
        peak = max((o.peak_mb for o in rows if o.peak_mb == o.peak_mb), default=0.0)
        print(f"{category:<12} {len(rows):>5} {sum(o.status == 0 for o in rows):>6} "
              f"{sum(o.status == 2 for o in rows):>6} {sum(o.status not in (0, 2) for o in rows):>5} "
              f"{sum(bool(o.failures) for o in rows):>5} {max(o.seconds for o in rows):>6.1f} {peak:>7.0f}")
    failed = [o for o in outcomes if o.failures]
    for o in failed:
        message = next((ln for ln in reversed(o.stderr) if ln.strip()), "")
        print(f"FAIL [{o.case.category}] {o.case.name}: {'; '.join(o.failures)}\n     exit {o.status}, "
              f"{o.seconds:.1f} s: {message[:300]}")
    print(f"{len(outcomes)} cases, {len(failed)} failures ({seconds / 60:.1f} min)")
    return 1 if failed else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mutants", type=at_least(0), default=257, help="DICOM header mutants (default 257)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the mutants (default 0)")
    parser.add_argument("--keep", metavar="DIR", help="build and keep everything in DIR (must not exist)")
    parser.add_argument("--only", metavar="CATEGORY[,CATEGORY]", help=f"only these of: {', '.join(CATEGORIES)}")
    parser.add_argument("--timeout", type=at_least(1, float), default=120.0,
                        help="seconds before a run is killed (default 120)")
    parser.add_argument("--max-seconds", type=at_least(1, float), default=30.0, help="a slower run fails (default 30)")
    parser.add_argument("--memory-gb", type=at_least(1), default=4,
                        help="address-space limit of a run, GiB (default 4)")
    parser.add_argument("--list", action="store_true", help="list the cases, run none")
    parser.add_argument("--served", action="store_true",
                        help="send the inputs to one served worker, as the Slicer module does (module docstring)")
    args = parser.parse_args(argv)
    only = set(args.only.split(",")) if args.only else set(CATEGORIES)
    if only - set(CATEGORIES):
        parser.error(f"unknown categories: {', '.join(sorted(only - set(CATEGORIES)))}")
    if args.keep and os.path.lexists(args.keep):
        raise InputError(f"--keep {args.keep} already exists: give a folder that does not (the sweep fills it)")
    work = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="hostile_sweep."))
    work.mkdir(parents=True, exist_ok=bool(not args.keep))
    os.chmod(work, 0o755)
    start = time.perf_counter()
    try:
        base = Base(work)
        cases = build_cases(base, work, only, args.mutants, args.seed)
        if args.served:
            cases = [case for case in cases if servable(case)]
        print(f"{len(cases)} cases built in {time.perf_counter() - start:.0f} s under {work}", flush=True)
        if args.list:
            for case in cases:
                print(f"[{case.category}] {case.name} ({case.expect})")
            return 0
        outcomes = []
        served = start_served_worker(work, args) if args.served else None
        for i, case in enumerate(cases):
            outcome = run_served_case(case, i, work, served, args) if served else run_case(case, i, work, args)
            outcomes.append(outcome)
            mark = "FAIL " + "; ".join(outcome.failures) if outcome.failures else "ok"
            print(f"{i + 1:>4}/{len(cases)} [{case.category}] {case.name[:90]}: exit {outcome.status}, "
                  f"{outcome.seconds:.1f} s, {outcome.peak_mb:.0f} MB: {mark}", flush=True)
        if served is None:
            return print_report(outcomes, time.perf_counter() - start)
        state = served_state_check(base, work, served)
        served.close()
        print(f"served worker: started {served.starts} time(s); after every case the phantom "
              + ("; ".join(state) if state else "gives a fresh process's result"))
        return max(print_report(outcomes, time.perf_counter() - start), 1 if state else 0)
    finally:
        if not args.keep:
            for _ in range(3):      # the permission cases took access away: give it back, level by level
                for path in work.rglob("*"):
                    if path.is_dir() and not path.is_symlink():
                        path.chmod(0o755)
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    from script_errors import run_main   # benchmarks/ is on the path of a script run directly

    run_main(main)
