"""Exception types shared by every part of repsim.

The CLI maps :class:`UsageError` to one line on stderr and exit code 2; any other exception is a bug and
shows its traceback with ``--debug``.
"""


class RepsimError(Exception):
    """Base class of repsim's own exceptions."""


class UsageError(RepsimError):
    """Bad user input: the CLI prints the message on one line and exits with code 2."""


class NewerFormatError(UsageError):
    """A store written in a newer format than this repsim reads: not damage, so ``repsim verify`` exits 2 too."""


class NumericalError(RepsimError):
    """A NaN, an Inf, a negative or zero self-HSIC: the value would be meaningless, so none is returned."""
