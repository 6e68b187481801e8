"""tcompile: a compiler that makes transformer models touch fewer tokens.

``tcompile.optimize(model, budget=...)`` captures the model with ``torch.export``, chooses
token-reduction rewrites with a cost model, verifies and applies them as graph passes, lowers
the result to an engine and explains it in a report. Importing tcompile changes no global state
of torch or transformers.
"""
from __future__ import annotations

from tcompile.api import optimize
from tcompile.budget import Budget
from tcompile.capture import capture
from tcompile.cost import DeviceProfile
from tcompile.errors import (
    ArtifactError, BackendUnavailableError, BudgetError, BudgetUnreachableError, CaptureError, ModelNotFoundError,
    NoAttentionError, PassFailedError, PassOptionError, PipelineSyntaxError, TCompileError, UnknownPassError,
    VerificationError,
)
from tcompile.optimized import OptimizedModel, load
from tcompile.registry import PassSpec, available, format_pipeline, parse_pipeline

__version__ = "0.1.0"

__all__ = [
    "optimize", "load", "capture", "Budget", "DeviceProfile", "OptimizedModel", "PassSpec", "available",
    "parse_pipeline", "format_pipeline", "TCompileError", "CaptureError", "NoAttentionError", "PassOptionError",
    "UnknownPassError", "PipelineSyntaxError", "PassFailedError", "VerificationError", "BudgetError",
    "BudgetUnreachableError", "BackendUnavailableError", "ArtifactError", "ModelNotFoundError",
]
