"""Domain errors. The CLI turns each into one line and a non-zero exit, never a traceback."""


class QcalError(Exception):
    """A runtime failure the user can act on (exit 1)."""


class UsageProblem(QcalError):
    """The invocation itself is wrong: a bad option value or an impossible combination (exit 2)."""


class Problems(QcalError):
    """Every problem a check of a whole configuration found, one line each (exit 2 when one of
    them is a bad invocation, else 1)."""

    def __init__(self, errors):
        self.errors = list(errors)
        super().__init__("\n".join(str(e) for e in self.errors))

    @property
    def usage(self) -> bool:
        return any(isinstance(e, UsageProblem) for e in self.errors)


def raise_problems(errors):
    """Raise nothing, the one error, or ``Problems`` of them all."""
    errors = list(errors)
    if len(errors) == 1:
        raise errors[0]
    if errors:
        raise Problems(errors)


# Ctrl-C as the command line saw it (``qcal.cli.params`` sets it from its SIGINT handler). A
# KeyboardInterrupt raised inside Python code that a library calls back from C++ (TVMScript
# parsing during a TVM build) can be turned into another error, or swallowed; qcal's own loops ask
# here between steps, so an interrupt always stops the run at the next one.
_interrupt = {"seen": False}


def note_interrupt(seen: bool = True):
    _interrupt["seen"] = seen


def interrupt_seen() -> bool:
    return _interrupt["seen"]


def stop_if_interrupted():
    """Raise KeyboardInterrupt when Ctrl-C arrived but did not stop the work."""
    if _interrupt["seen"]:
        raise KeyboardInterrupt
