"""Errors a user can act on.

Every problem with the user's input is raised as :class:`InputError` with a
one-line message that names the problem (and, where it helps, the file).  The
command line prints ``spinenet: error: <message>`` and exits with status 2;
the Slicer module shows the message in its status line.  Anything else is a
bug and may surface as a traceback.
"""


class SpineNetError(Exception):
    """Base class for all errors SpineNetLib raises on purpose."""


class InputError(SpineNetError, ValueError):
    """The input scan (or an override given with it) cannot be used.

    The message is a single line, suitable for showing to a user as is.
    """


class WeightsError(SpineNetError):
    """Network weights are missing, corrupt, of the wrong shape or not trusted."""
