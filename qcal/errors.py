"""Domain errors. The CLI turns each into one line and a non-zero exit, never a traceback."""


class QcalError(Exception):
    """A runtime failure the user can act on (exit 1)."""


class UsageProblem(QcalError):
    """The invocation itself is wrong: a bad option value or an impossible combination (exit 2)."""
