"""Typed errors: the core raises them, the CLI's one error boundary turns each into a line + code."""


def first_line(e: BaseException) -> str:
    """A library exception's message reduced to one line (its type name when it has none)."""
    lines = str(e).splitlines()
    return lines[0] if lines else type(e).__name__


class NewLLMError(Exception):
    """A problem the user can fix; printed as one line."""

    exit_code = 1


class UsageError(NewLLMError):
    """Bad settings, options or input files (exit 2)."""

    exit_code = 2


class RefusedError(NewLLMError):
    """A stage refused to run: missing or mismatched upstream artifacts, the Phase-1 gate (exit 3)."""

    exit_code = 3


class GateRefused(RefusedError):
    """The Phase-1 gate refused the contexts (exit 3): a verdict of the run, not a broken input."""


class NumericalError(NewLLMError):
    """A NaN or Inf appeared; nothing non-finite is saved (exit 4)."""

    exit_code = 4


class Interrupted(NewLLMError):
    """Ctrl-C at a safe point, after saving what can be resumed (exit 130)."""

    exit_code = 130


class RankFailed(NewLLMError):
    """Another process of a distributed job stopped, or the job could not be joined (exit 1)."""

    exit_code = 1
