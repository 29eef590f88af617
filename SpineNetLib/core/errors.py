"""Errors a user can act on.

Every problem with the user's input is raised as :class:`InputError` with a
one-line message that names the problem (and, where it helps, the file).  The
command line prints ``spinenet: error: <message>`` and exits with status 2;
the Slicer module shows the message in its status line.  Anything else is a
bug: :func:`exit_status`, which the command line and the batch script run
their work through, prints it as one line too (exit 1), with a traceback only
on request.
"""

import os
import select
import sys
import warnings

#: Exit statuses of the programs: success, a bug, a problem the user can act on, an interruption.
EXIT_OK, EXIT_INTERNAL, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130
#: The reader of the standard output went away (``spinenet demo | head -1``): the status a shell gives a
#: program that SIGPIPE ended (128 + 13), as other command-line tools end there, quietly.
EXIT_BROKEN_PIPE = 141


class SpineNetError(Exception):
    """Base class for all errors SpineNetLib raises on purpose."""


class InputError(SpineNetError, ValueError):
    """The input scan (or an override given with it) cannot be used.

    The message is a single line, suitable for showing to a user as is.
    """


class WeightsError(SpineNetError):
    """Network weights are missing, corrupt, of the wrong shape or not trusted."""


def one_line(message: object) -> str:
    """The message on one line (runs of white space, newlines included, become one space)."""
    return " ".join(str(message).split())


def error_line(error: BaseException) -> str:
    """One line saying what went wrong, for a user: the message of a :class:`SpineNetError`, the file
    and reason of an ``OSError``, ``internal error: <type>: <message>`` for anything else (a bug).

    Shared by :func:`exit_status` and ``spinenet cohort``, which records it per failed study
    instead of stopping.
    """
    if isinstance(error, SpineNetError):
        return one_line(error)
    if isinstance(error, OSError):
        target = f" {error.filename}" if getattr(error, "filename", None) else ""
        return f"cannot access{target}: {one_line(error.strerror or error)}"
    return f"internal error: {type(error).__name__}: {one_line(error)}"


def _stdout_gone() -> bool:
    """Whether the standard output is a pipe whose reader went away (its write end polls as an error);
    if so, what is left of the output goes to the null device, so that the exit's own flush raises
    nothing more.  False where this cannot be told (no ``poll``, not a file)."""
    try:
        fd = sys.stdout.fileno()
        poller = select.poll()
        poller.register(fd, select.POLLOUT)
        gone = any(events & select.POLLERR for _, events in poller.poll(0))
    except (AttributeError, OSError, ValueError):   # no poll (Windows), no file descriptor
        return False
    if gone:
        null = os.open(os.devnull, os.O_WRONLY)
        os.dup2(null, fd)
        os.close(null)
    return gone


def exit_status(program: str, action, *, debug: bool = False,
                internal_hint: str = "run with --debug for the traceback and please report it") -> int:
    """Run ``action()`` and turn its outcome into an exit status, every problem into one stderr line.

    ``action`` returns the status (None = success).  A user's problem
    (:class:`SpineNetError`, or a file that cannot be accessed) is exit 2, an
    interruption 130, a reader of the standard output that went away 141 (nothing printed),
    anything else a bug: exit 1, with a traceback only with ``debug``.  Library warnings are not
    printed unless ``debug``: the program says what matters in its own lines.  Shared by ``spinenet`` and the batch script.
    """
    try:
        with warnings.catch_warnings():
            if not debug:
                warnings.simplefilter("ignore")
            return int(action() or EXIT_OK)
    except (SpineNetError, OSError) as error:
        if isinstance(error, BrokenPipeError) and _stdout_gone():
            return EXIT_BROKEN_PIPE
        print(f"{program}: error: {error_line(error)}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print(f"{program}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except Exception as error:  # a bug: one line, unless debug
        if debug:
            raise
        print(f"{program}: {error_line(error)} ({internal_hint})", file=sys.stderr)
        return EXIT_INTERNAL
