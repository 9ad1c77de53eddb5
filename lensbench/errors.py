"""User-facing errors.

A `LensbenchError` is a problem with the user's input or environment that one sentence can
explain, together with the fix. The CLI prints it on one line (no traceback) and exits non-zero;
library callers can catch it like any exception.
"""


class LensbenchError(Exception):
    """Bad input or a missing prerequisite; the message names the problem and the fix."""


class UnknownArchitectureError(LensbenchError):
    """No adapter is registered for a model class."""


class ProfileError(LensbenchError):
    """A profile file is unreadable, of another schema, or for another model."""


class PlanError(LensbenchError):
    """A plan is unreadable, for another model, names units the model lacks, or cannot be met."""
