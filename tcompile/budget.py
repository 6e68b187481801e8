"""The user's budget: fractions of the unoptimized model on the same target.

``Budget(latency=0.5, quality=0.99)`` reads "at most half the latency, at least 0.99 fidelity".
A float is a latency budget; a string ``"latency=0.5,quality=0.99"`` parses to the same object.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from tcompile.errors import BudgetError

_COST_FIELDS = ("latency", "flops", "memory", "kv_cache")


@dataclass(frozen=True)
class Budget:
    """Each field is optional; cost fields are fractions in (0, 1], quality is in [0, 1]."""

    latency: float | None = None
    flops: float | None = None
    memory: float | None = None
    kv_cache: float | None = None
    quality: float | None = None

    def __post_init__(self) -> None:
        for name in _COST_FIELDS:
            value = getattr(self, name)
            if value is None:
                continue
            if not isinstance(value, (int, float)) or isinstance(value, bool):
                raise BudgetError(f"budget {name}={value!r} must be a number in (0, 1]")
            if not 0.0 < float(value) <= 1.0:
                raise BudgetError(
                    f"budget {name}={value} is out of range: it is a fraction of the unoptimized "
                    f"model and must lie in (0, 1], e.g. {name}=0.5 for half"
                )
        if self.quality is not None:
            if not isinstance(self.quality, (int, float)) or not 0.0 <= float(self.quality) <= 1.0:
                raise BudgetError(
                    f"budget quality={self.quality!r} must lie in [0, 1] "
                    "(least acceptable fidelity against the unoptimized model)"
                )

    @property
    def cost_fields(self) -> dict[str, float]:
        """The cost constraints that are set, e.g. ``{"flops": 0.7}``."""
        return {k: float(getattr(self, k)) for k in _COST_FIELDS if getattr(self, k) is not None}

    def to_dict(self) -> dict[str, float]:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if getattr(self, f.name) is not None}

    def __str__(self) -> str:
        return ",".join(f"{k}={v}" for k, v in self.to_dict().items())

    @classmethod
    def parse(cls, value: "Budget | float | int | str | dict | None") -> "Budget | None":
        """Accept every form the public API allows and return a validated Budget (or None)."""
        if value is None or isinstance(value, Budget):
            return value
        if isinstance(value, bool):
            raise BudgetError(f"budget={value!r} is not a budget; pass e.g. 0.5 or 'latency=0.5,quality=0.99'")
        if isinstance(value, (int, float)):
            return cls(latency=float(value))
        if isinstance(value, dict):
            unknown = set(value) - {f.name for f in dataclasses.fields(cls)}
            if unknown:
                raise BudgetError(f"unknown budget field(s) {sorted(unknown)}; valid: {_valid()}")
            return cls(**value)
        if isinstance(value, str):
            fields: dict[str, float] = {}
            for part in filter(None, (p.strip() for p in value.split(","))):
                if "=" not in part:
                    raise BudgetError(f"budget part {part!r} must look like name=value, e.g. latency=0.5")
                key, _, raw = part.partition("=")
                key = key.strip()
                if key not in {f.name for f in dataclasses.fields(cls)}:
                    raise BudgetError(f"unknown budget field {key!r}; valid: {_valid()}")
                try:
                    fields[key] = float(raw)
                except ValueError:
                    raise BudgetError(f"budget {key}={raw.strip()!r} is not a number") from None
            if not fields:
                raise BudgetError("empty budget string; pass e.g. 'latency=0.5' or 'flops=0.7,quality=0.98'")
            return cls(**fields)
        raise BudgetError(f"budget of type {type(value).__name__} is not supported; pass a Budget, float or str")


def _valid() -> str:
    return ", ".join(f.name for f in dataclasses.fields(Budget))
