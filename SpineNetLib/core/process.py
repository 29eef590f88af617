"""Settings of the library's own processes: the ``spinenet`` command and the Slicer module's worker
(:func:`run_as_process`), and glibc's malloc and OpenMP of ``spinenet cohort``'s local Dask workers
(:func:`environment_keeping_freed_memory`, :func:`environment_spinning_briefly`).  Code that calls the
library in a process of its own (Slicer, a notebook) keeps the interpreter's, malloc's and OpenMP's
settings as they are.

Garbage collection: while a program runs, the youngest objects are collected every 20,000 instead of
700 new ones (most of the 430 collections of a ``spinenet run`` walked torch's objects from its import
again: 0.10 s in all, 0.05 s so), and before the exit every object is frozen out of the exit's
collections, which would only walk what torch and the networks made (0.26 of a 3.4 s ``spinenet run``,
0.1 s after ``gc.freeze``; benchmarks/RESULTS.md, twenty-first session).

malloc: by default glibc maps each large block (above 128 kB at first, a threshold that rises with the
blocks freed up to 32 MB; a network layer's output is often larger) afresh from the kernel and unmaps it
when it is freed, so each layer of every network call pays its page faults again.  Our processes let the
heap serve blocks up to :data:`MALLOC_HEAP_BYTES` and keep that much freed memory for reuse
(benchmarks/RESULTS.md, "Bundled networks end to end, about 10 % faster": a bundled ``spinenet run``
about 0.1 s faster).  A user who set glibc's malloc variables (``MALLOC_*``, ``GLIBC_TUNABLES``) keeps
them, and other C libraries are left alone.

OpenMP's idle threads: torch runs its operations on OpenMP threads (libgomp in the Linux wheels), and a
thread that has done its share of one spins, by libgomp's default 300,000 times, before it sleeps.  On a
machine whose cores are busy with other work (a second run, the user's other programs) the spinning
threads take the cores from the very threads they wait for: a bundled ``spinenet run`` of chu_02 that
takes 6-7 s alone took about 29 s beside a second one.  Our processes let them spin
:data:`OPENMP_SPIN_COUNT` times (:func:`spin_briefly_in_openmp`), which keeps nearly all of what waiting
passively gains on a busy machine without its cost on an idle one (benchmarks/RESULTS.md, "A busy
machine"; ``benchmarks/bench_busy_machine.py``), unless the user set how OpenMP waits.  Other OpenMP
runtimes (Intel's and LLVM's, in torch's Windows and macOS wheels) read other variables and are left
as they are: not measured here.
"""

from __future__ import annotations

import atexit
import gc
import os
import signal
import sys
import threading
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from typing import NoReturn

#: Blocks up to this size come from the heap, and this much freed memory stays there.  256 MB made the
#: official-size lumbar run 1-3 s faster, but its peak reached 2.17 GB, over issue 16's 2 GB.
MALLOC_HEAP_BYTES = 64 << 20

_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3   # mallopt parameters, glibc's malloc.h


#: Threads (or local workers times their threads) above this many per CPU core are refused: more only
#: slows the networks down, and a huge count makes torch fail to start its threads.
MAX_THREADS_PER_CORE = 4


def too_many_threads(threads: int, what: str) -> str | None:
    """Why ``threads`` torch threads on this machine are too many (``what``: how the user asked for them,
    e.g. "--threads 64"), or None when they are not (:data:`MAX_THREADS_PER_CORE`)."""
    cores = os.cpu_count() or 1
    if threads <= MAX_THREADS_PER_CORE * cores:
        return None
    return (f"{what} is more than {MAX_THREADS_PER_CORE} threads per CPU core of this machine ({cores} cores: "
            f"at most {MAX_THREADS_PER_CORE * cores})")


def user_tuned_malloc(environ: Mapping[str, str] = os.environ) -> bool:
    """True when ``environ`` sets any of glibc's malloc variables."""
    return any(name.startswith("MALLOC_") or name == "GLIBC_TUNABLES" for name in environ)


def _is_glibc() -> bool:
    try:
        return bool(os.confstr("CS_GNU_LIBC_VERSION"))
    except (AttributeError, ValueError, OSError):
        return False


def keep_freed_memory_for_reuse() -> bool:
    """This process's glibc malloc keeps freed memory for reuse (``mallopt`` M_MMAP_THRESHOLD and
    M_TRIM_THRESHOLD at :data:`MALLOC_HEAP_BYTES`); False, changing nothing, where the C library is not
    glibc or the user set glibc's malloc variables."""
    if user_tuned_malloc() or not _is_glibc():
        return False
    import ctypes

    mallopt = ctypes.CDLL(None).mallopt
    return bool(mallopt(_M_MMAP_THRESHOLD, MALLOC_HEAP_BYTES)) and bool(mallopt(_M_TRIM_THRESHOLD, MALLOC_HEAP_BYTES))


def return_freed_memory() -> bool:
    """Give the memory this process's glibc malloc keeps freed back to the system (``malloc_trim``);
    False, changing nothing, where the C library is not glibc.  For a process that waits between runs
    (the served worker, ``apps/worker.py``): what it kept for the next layer's output is the idle
    process's memory otherwise."""
    if not _is_glibc():
        return False
    import ctypes

    return bool(ctypes.CDLL(None).malloc_trim(0))


def environment_keeping_freed_memory(environ: Mapping[str, str]) -> dict[str, str]:
    """``environ`` for a child process started with it, whose glibc malloc then keeps freed memory for
    reuse as :func:`keep_freed_memory_for_reuse` does; unchanged where this process's user set glibc's
    malloc variables (``environ`` is what the child gets on top of this process's environment)."""
    if user_tuned_malloc():
        return dict(environ)
    others = {name: value for name, value in environ.items() if not name.startswith("MALLOC_")}
    return {**others, "MALLOC_MMAP_THRESHOLD_": str(MALLOC_HEAP_BYTES),
            "MALLOC_TRIM_THRESHOLD_": str(MALLOC_HEAP_BYTES)}


#: The environment variables that set how OpenMP's idle threads wait: a user who set one keeps it.
OPENMP_WAIT_VARIABLES = ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")

#: How many times libgomp's idle threads spin before they sleep in our processes (``GOMP_SPINCOUNT``; its
#: default is 300,000).  Chosen on chu_02's bundled run in a process with the networks loaded (2 cores;
#: benchmarks/RESULTS.md, "A busy machine"), against libgomp's default, passive waiting (0), 1000 and
#: 10,000: alone 2.04 s (default 2.00, passive 2.35), beside a second such process 3.7-4.0 s (default
#: 8-20, passive 3.3-4.0, 10,000 4.8-5.6).
OPENMP_SPIN_COUNT = 3000


def environment_spinning_briefly(environ: Mapping[str, str]) -> dict[str, str]:
    """``environ`` with libgomp's spin count at :data:`OPENMP_SPIN_COUNT` (module docstring), unless it or
    this process's environment sets how OpenMP's threads wait (:data:`OPENMP_WAIT_VARIABLES`)."""
    if any(name in environ or name in os.environ for name in OPENMP_WAIT_VARIABLES):
        return dict(environ)
    return {**environ, "GOMP_SPINCOUNT": str(OPENMP_SPIN_COUNT)}


def spin_briefly_in_openmp() -> bool:
    """Let this process's idle OpenMP threads sleep soon (module docstring), and the processes it starts
    inherit that; True when it takes effect here.

    libgomp reads the variable once, when it is loaded with torch: so nothing changes in this process
    where torch is imported already (False), nor where the user set how OpenMP waits (False)."""
    setting = environment_spinning_briefly({})   # empty where the user chose
    os.environ.update(setting)
    return bool(setting) and "torch" not in sys.modules


def ignore_interrupts() -> None:
    """Ignore Ctrl-C (SIGINT) from now on in this process; nothing where this is no main thread."""
    try:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
    except ValueError:   # signal handlers can only be set in the main thread
        pass


class DeferredInterrupt:
    """What :func:`deferred_interrupts` saw: ``interrupted`` is True once Ctrl-C came during its block."""

    interrupted = False


@contextmanager
def deferred_interrupts() -> Iterator[DeferredInterrupt]:
    """Hold Ctrl-C (SIGINT) back during the block: it only sets ``interrupted`` of the object yielded, and
    the caller ends what it started before it stops.

    For starting a Dask cluster: interrupted half way, its workers are left half started, and Dask's exit
    callback then fails on them with a traceback.  SIGINT is also blocked in this thread during the block
    (where the platform can, ``pthread_sigmask``), and the threads and processes started in it inherit
    that: a local cluster's nannies and workers never receive a terminal's Ctrl-C, which reaches every
    process of the group (a worker still starting printed a traceback; the cluster is closed through
    Dask), and one held pending here is noted when the block ends.  Nothing is held where this is no main
    thread or Ctrl-C is ignored already."""
    seen = DeferredInterrupt()
    try:
        previous = signal.getsignal(signal.SIGINT)
        if previous in (signal.SIG_IGN, None):
            raise ValueError("Ctrl-C is ignored or not Python's")

        def note(signum, frame):
            seen.interrupted = True

        signal.signal(signal.SIGINT, note)
    except ValueError:   # not the main thread, or nothing to hold back
        yield seen
        return
    can_block = hasattr(signal, "pthread_sigmask")
    mask = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT}) if can_block else None
    try:
        yield seen
    finally:
        try:
            if can_block:   # a Ctrl-C held pending runs `note` as the mask is restored
                signal.pthread_sigmask(signal.SIG_SETMASK, mask)
        finally:
            signal.signal(signal.SIGINT, previous)


def run_as_process(main: Callable[[], int]) -> int:
    """``main()``'s exit status, run with this module's settings of the garbage collector, malloc and
    OpenMP's idle threads (before ``main`` imports torch);
    output is flushed and every object frozen before the interpreter's exit.

    Once ``main`` has returned, its work is done (a run's files are written): Ctrl-C is then ignored
    (:func:`ignore_interrupts`), so that an interrupt during the interpreter's exit (its exit callbacks,
    torch's finalisers) prints no traceback and leaves ``main``'s status as it is.  An interrupt before
    that is ``main``'s to report (``spinenet: interrupted``, exit 130).
    """
    gc.set_threshold(20_000, *gc.get_threshold()[1:])
    keep_freed_memory_for_reuse()
    spin_briefly_in_openmp()
    status = main()
    ignore_interrupts()
    sys.stdout.flush()
    sys.stderr.flush()
    gc.freeze()
    return status


def exit_process(status: int) -> NoReturn:
    """End this process with exit ``status`` (what :func:`run_as_process` returned), skipping the
    interpreter's teardown where nothing needs it (module docstring).

    The usual ``sys.exit`` where another Python thread is alive (the interpreter joins it first) or
    the output cannot be flushed (e.g. a closed pipe: the interpreter reports that as usual)."""
    try:
        sys.stdout.flush()
        sys.stderr.flush()
    except (OSError, ValueError):
        sys.exit(status)
    if threading.active_count() > 1:
        sys.exit(status)
    atexit._run_exitfuncs()   # the callbacks the interpreter's exit runs (a private name, in CPython since 3.0)
    try:
        sys.stdout.flush()
        sys.stderr.flush()
    finally:
        os._exit(status)
