"""The pass registry and the textual pipeline form.

A pass is ``(GraphModule, PassContext) -> PassResult`` registered under a unique name with a
frozen options dataclass (TVM's PassInfo, MLIR's registration). Pipelines are data: the text
``token_merging{r=8,method=tome},token_pruning{keep=0.7}`` parses to a list of :class:`PassSpec`
and every spec prints back to text that replays it.
"""
from __future__ import annotations

import dataclasses
import difflib
import typing
from dataclasses import dataclass
from typing import Any, Callable

from tcompile.errors import PassOptionError, PipelineSyntaxError, UnknownPassError


@dataclass(frozen=True)
class PassInfo:
    name: str
    fn: Callable[..., Any]
    options: type
    exact: bool          # True when the pass must not change outputs (verified numerically)
    family: str
    description: str


_REGISTRY: dict[str, PassInfo] = {}


def register_pass(name: str, *, options: type, exact: bool = False, family: str | None = None) -> Callable:
    """Decorator: register ``fn(gm, ctx) -> PassResult`` under ``name`` (duplicates raise)."""
    if not dataclasses.is_dataclass(options) or not options.__dataclass_params__.frozen:  # type: ignore[attr-defined]
        raise TypeError(f"options of pass {name!r} must be a frozen dataclass")

    def deco(fn: Callable) -> Callable:
        if name in _REGISTRY:
            raise ValueError(f"pass {name!r} is already registered (by {_REGISTRY[name].fn.__module__})")
        doc = (fn.__doc__ or "").strip().splitlines()
        _REGISTRY[name] = PassInfo(name, fn, options, exact, family or name, doc[0] if doc else "")
        return fn

    return deco


def _ensure_builtin_passes() -> None:
    import tcompile.passes  # noqa: F401  (registers the built-in families)


def get_pass(name: str) -> PassInfo:
    _ensure_builtin_passes()
    if name not in _REGISTRY:
        close = difflib.get_close_matches(name, _REGISTRY, n=3)
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        raise UnknownPassError(f"unknown pass {name!r}{hint} Registered passes: {', '.join(sorted(_REGISTRY))}")
    return _REGISTRY[name]


def available() -> dict[str, dict[str, Any]]:
    """Registered pass names with their options and defaults (``tcompile passes`` prints this)."""
    _ensure_builtin_passes()
    out: dict[str, dict[str, Any]] = {}
    for name, info in sorted(_REGISTRY.items()):
        opts = {}
        for f in dataclasses.fields(info.options):
            default = f.default if f.default is not dataclasses.MISSING else (
                f.default_factory() if f.default_factory is not dataclasses.MISSING else None)  # type: ignore[misc]
            opts[f.name] = {"default": default, "type": str(f.type)}
        out[name] = {"description": info.description, "exact": info.exact, "family": info.family, "options": opts}
    return out


@dataclass(frozen=True)
class PassSpec:
    """A registered pass name plus a validated options object."""

    name: str
    options: Any

    @classmethod
    def make(cls, name: str, **options: Any) -> "PassSpec":
        info = get_pass(name)
        valid = {f.name for f in dataclasses.fields(info.options)}
        unknown = set(options) - valid
        if unknown:
            raise PassOptionError(
                f"pass {name!r} has no option(s) {sorted(unknown)}; valid options: {sorted(valid)}")
        hints = typing.get_type_hints(info.options)
        coerced = {k: _coerce(name, k, v, hints.get(k)) for k, v in options.items()}
        try:
            return cls(name, info.options(**coerced))
        except PassOptionError:
            raise
        except (TypeError, ValueError) as exc:
            raise PassOptionError(f"pass {name!r}: {exc}") from exc

    def __str__(self) -> str:
        return format_spec(self)


def _coerce(pass_name: str, key: str, value: Any, hint: Any) -> Any:
    """Coerce values parsed from text (ints where floats are wanted, lists to tuples)."""
    if isinstance(value, list):
        value = tuple(value)
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    return value


def format_spec(spec: PassSpec) -> str:
    """Text form listing options that differ from their defaults: ``name{k=v,...}``."""
    parts = []
    for f in dataclasses.fields(spec.options):
        value = getattr(spec.options, f.name)
        default = f.default if f.default is not dataclasses.MISSING else (
            f.default_factory() if f.default_factory is not dataclasses.MISSING else dataclasses.MISSING)  # type: ignore[misc]
        if value != default:
            parts.append(f"{f.name}={_format_value(value)}")
    return f"{spec.name}{{{','.join(parts)}}}" if parts else spec.name


def _format_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(_format_value(v) for v in value) + "]"
    if isinstance(value, float):
        return repr(round(value, 6))
    if value is None:
        return "none"
    return str(value)


def format_pipeline(specs: list[PassSpec]) -> str:
    return ",".join(format_spec(s) for s in specs)


def parse_pipeline(text: str) -> list[PassSpec]:
    """Parse ``a{k=v},b`` into specs; raises PipelineSyntaxError / UnknownPassError / PassOptionError."""
    specs: list[PassSpec] = []
    for chunk in _split_top(text.strip(), ","):
        chunk = chunk.strip()
        if not chunk:
            continue
        if "{" in chunk:
            if not chunk.endswith("}"):
                raise PipelineSyntaxError(f"pass spec {chunk!r} must end with '}}', e.g. token_merging{{r=8}}")
            name, body = chunk[:chunk.index("{")].strip(), chunk[chunk.index("{") + 1:-1]
        else:
            name, body = chunk, ""
        if not name.replace("_", "").isalnum():
            raise PipelineSyntaxError(f"bad pass name {name!r} in pipeline {text!r}")
        options: dict[str, Any] = {}
        for item in _split_top(body, ","):
            if not item.strip():
                continue
            if "=" not in item:
                raise PipelineSyntaxError(f"option {item.strip()!r} of pass {name!r} must look like key=value")
            key, _, raw = item.partition("=")
            options[key.strip()] = _parse_value(raw.strip())
        specs.append(PassSpec.make(name, **options))
    return specs


def _split_top(text: str, sep: str) -> list[str]:
    out, depth, cur = [], 0, []
    for ch in text:
        if ch in "{[":
            depth += 1
        elif ch in "}]":
            depth -= 1
            if depth < 0:
                raise PipelineSyntaxError(f"unbalanced brackets in {text!r}")
        if ch == sep and depth == 0:
            out.append("".join(cur))
            cur = []
        else:
            cur.append(ch)
    if depth != 0:
        raise PipelineSyntaxError(f"unbalanced brackets in {text!r}")
    out.append("".join(cur))
    return out


def _parse_value(raw: str) -> Any:
    if raw.startswith("[") and raw.endswith("]"):
        return [_parse_value(x.strip()) for x in _split_top(raw[1:-1], ",") if x.strip()]
    low = raw.lower()
    if low in ("true", "false"):
        return low == "true"
    if low in ("none", "null"):
        return None
    for conv in (int, float):
        try:
            return conv(raw)
        except ValueError:
            pass
    return raw.strip("'\"")


def as_specs(passes: "str | list[Any] | None") -> list[PassSpec] | None:
    """Normalise the ``passes=`` argument: text, or a list of specs / text / options objects."""
    if passes is None:
        return None
    if isinstance(passes, str):
        return parse_pipeline(passes)
    out: list[PassSpec] = []
    for p in passes:
        if isinstance(p, PassSpec):
            out.append(p)
        elif isinstance(p, str):
            out.extend(parse_pipeline(p))
        elif dataclasses.is_dataclass(p):
            _ensure_builtin_passes()
            names = [n for n, info in _REGISTRY.items() if isinstance(p, info.options)]
            if not names:
                raise UnknownPassError(f"no registered pass takes options of type {type(p).__name__}")
            out.append(PassSpec(names[0], p))
        else:
            raise PipelineSyntaxError(f"cannot use {p!r} as a pass spec; pass 'name{{k=v}}' or an options object")
    return out
