"""Errors tcompile raises. Each message says what was found and what to do about it.

Every error derives from :class:`TCompileError`; where a builtin category fits, the error also
derives from it (an out-of-range option is a ``ValueError``), so callers can catch either.
"""
from __future__ import annotations


class TCompileError(Exception):
    """Base class of every error tcompile raises on purpose."""


class CaptureError(TCompileError, RuntimeError):
    """``torch.export`` could not capture the model, or the inputs do not fit it."""


class NoAttentionError(TCompileError, ValueError):
    """The captured graph holds no attention site, so no token rewrite can apply."""


class PassOptionError(TCompileError, ValueError):
    """A pass option is unknown, has the wrong type, or is out of range."""


class UnknownPassError(TCompileError, KeyError):
    """A pipeline names a pass that is not registered."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


class PipelineSyntaxError(TCompileError, ValueError):
    """A textual pipeline such as ``token_merging{r=8}`` could not be parsed."""


class PassFailedError(TCompileError, RuntimeError):
    """A pass raised or produced an invalid graph; the message names it and the passes before it."""


class VerificationError(PassFailedError):
    """A pass declared exact changed the numerics, or its graph failed lint."""


class BudgetError(TCompileError, ValueError):
    """A budget field is malformed or out of range."""


class BudgetUnreachableError(TCompileError, RuntimeError):
    """No candidate plan meets the budget; the message gives the best reachable figures."""

    def __init__(self, message: str, best: dict | None = None) -> None:
        super().__init__(message)
        self.best = best or {}


class BackendUnavailableError(TCompileError, ImportError):
    """A backend's package is not installed or its device is absent; the message says how to fix it."""


class ArtifactError(TCompileError, RuntimeError):
    """An exported artifact is missing files, tampered with, or was made by incompatible versions."""


class ModelNotFoundError(TCompileError, LookupError):
    """A model zoo name is unknown, or the package that ships its weights is not installed."""
