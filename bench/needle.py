"""The needle-in-a-haystack prompts live in ``models/needle.py`` (``tcompile.models.needle``).

This shim loads that file by path, so that the kvpress peer venv, which does not install
tcompile, and tcompile's benchmarks share one implementation: ``import needle`` from bench/.
"""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

_PATH = Path(__file__).resolve().parent.parent / "models" / "needle.py"
_spec = importlib.util.spec_from_file_location("needle", _PATH)
assert _spec is not None and _spec.loader is not None, f"cannot load {_PATH}"
_module = importlib.util.module_from_spec(_spec)
sys.modules[__name__] = _module
_spec.loader.exec_module(_module)
