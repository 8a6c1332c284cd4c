"""Ranges of numeric settings: every int/float field of a config dataclass declares one.

A field is declared with :func:`ranged` (``seed: int = ranged(0, ge=0, le=2**32 - 1)``),
which puts a :class:`Range` in the field's metadata; :func:`check_ranges` walks a schema --
nested config dataclasses included -- and raises :class:`runner.errors.ConfigError` with one
line naming the key, the value and the range for the first value outside it:

    executor.start_timeout_s=0 is out of range: allowed a number > 0

``runner.config.validate`` checks the runner's groups with it; ``TaskConfig.__post_init__``
(runner/tasks/base.py) checks a task's own fields, so any task whose config dataclass
extends TaskConfig gets the check. :func:`numeric_fields` is what tests/test_bounds.py
enumerates to make sure no numeric field goes without a range.
"""
from __future__ import annotations

import collections.abc
import functools
import math
import typing
from dataclasses import MISSING, dataclass, field, fields, is_dataclass
from typing import Any

from runner.errors import ConfigError


@dataclass(frozen=True)
class Range:
    """The values a numeric setting may take. ``ge``/``gt``: lower bound (inclusive /
    exclusive), ``le``/``lt``: upper bound; None: unbounded on that side. ``none``: what
    null means, for an Optional field (shown in the error)."""

    ge: float | None = None
    gt: float | None = None
    le: float | None = None
    lt: float | None = None
    none: str = ""

    def contains(self, v: float) -> bool:
        return ((self.ge is None or v >= self.ge) and (self.gt is None or v > self.gt)
                and (self.le is None or v <= self.le) and (self.lt is None or v < self.lt))

    def describe(self, integer: bool, nullable: bool) -> str:
        """``an integer >= 1``, ``a number > 0, or null (no limit)``, ``an integer in 0..9``."""
        kind = "an integer" if integer else "a number"
        if self.ge is not None and self.le is not None:
            text = f"{kind} in {show_number(self.ge)}..{show_number(self.le)}"
        else:
            ends = [f"{op} {show_number(v)}" for op, v in ((">=", self.ge), (">", self.gt),
                                                      ("<=", self.le), ("<", self.lt))
                    if v is not None]
            text = f"{kind} {' and '.join(ends)}" if ends else kind
        if nullable:
            text += f", or null ({self.none})" if self.none else ", or null"
        return text


def ranged(default: Any = MISSING, *, ge: float | None = None, gt: float | None = None,
           le: float | None = None, lt: float | None = None, none: str = "",
           default_factory: Any = MISSING) -> Any:
    """A numeric config field with its declared range (``dataclasses.field`` metadata),
    which :func:`check_ranges` enforces: ``beam_size: int = ranged(5, ge=1)``. Every int and
    float field of a config dataclass declares one (tests/test_bounds.py enumerates them)."""
    return field(default=default, default_factory=default_factory,
                 metadata={"range": Range(ge, gt, le, lt, none)})


def show_number(v: Any) -> str:
    """A number as a user would type it: -1 for -1.0, 4294967295, 0.083."""
    if isinstance(v, float) and math.isfinite(v) and v.is_integer() and abs(v) < 1e16:
        return str(int(v))
    return repr(v)


@dataclass(frozen=True)
class NumericField:
    """A numeric field of a config dataclass, as :func:`numeric_fields` finds it."""

    name: str
    integer: bool  # int (else float)
    nullable: bool  # Optional[...]: null allowed
    is_list: bool  # list[int] / list[float]: each element is checked
    range: Range | None  # None: none declared (a test refuses that)


def _numeric(tp: Any) -> tuple[bool, bool, bool] | None:
    """(integer, nullable, is_list) for an int/float annotation, else None (bool is not)."""
    nullable = False
    args = typing.get_args(tp)
    if typing.get_origin(tp) is typing.Union and type(None) in args:
        rest = [a for a in args if a is not type(None)]
        if len(rest) != 1:
            return None
        tp, nullable = rest[0], True
    is_list = typing.get_origin(tp) in (list, tuple, collections.abc.Sequence)
    if is_list:
        inner = typing.get_args(tp)
        tp = inner[0] if inner else None
    if tp is int or tp is float:
        return tp is int, nullable, is_list
    return None


@functools.lru_cache(maxsize=None)
def numeric_fields(schema: type) -> tuple[NumericField, ...]:
    """Every int/float field of the config dataclass ``schema`` (nested dataclasses are not
    entered: see :func:`check_ranges`)."""
    hints = typing.get_type_hints(schema)
    out = []
    for f in fields(schema):
        kind = _numeric(hints.get(f.name))
        if kind is not None:
            out.append(NumericField(f.name, *kind, f.metadata.get("range")))
    return tuple(out)


def range_problem(key: str, value: Any, nf: NumericField) -> str | None:
    """The one line for ``key=value`` outside ``nf``'s range (or of the wrong kind), or None."""
    rng = nf.range or Range()
    allowed = rng.describe(nf.integer, nf.nullable)
    if value is None:
        return None if nf.nullable else f"{key}=null is not allowed: allowed {allowed}"
    if nf.is_list:
        allowed = "a list of " + allowed.replace("an integer", "integers").replace(
            "a number", "numbers")
        if isinstance(value, (str, bytes)) or not isinstance(value, collections.abc.Sequence):
            return f"{key}={_shown(value)} is not a list: allowed {allowed}"
    for v in (list(value) if nf.is_list else [value]):
        if isinstance(v, bool) or not isinstance(v, int if nf.integer else (int, float)):
            kind = "an integer" if nf.integer else "a number"
            return f"{key}={_shown(value)} is not {kind}: allowed {allowed}"
        if not math.isfinite(v) or not rng.contains(v):
            return f"{key}={_shown(value)} is out of range: allowed {allowed}"
    return None


def _shown(value: Any) -> str:
    if isinstance(value, collections.abc.Sequence) and not isinstance(value, (str, bytes)):
        return "[" + ", ".join(_shown(v) for v in value) + "]"
    return show_number(value) if isinstance(value, (int, float)) and not isinstance(value, bool) \
        else repr(value)


@functools.lru_cache(maxsize=None)
def _nested(schema: type) -> tuple[tuple[str, type], ...]:
    """The fields of ``schema`` that are config dataclasses themselves (its groups)."""
    hints = typing.get_type_hints(schema)
    return tuple((f.name, hints[f.name]) for f in fields(schema)
                 if isinstance(hints.get(f.name), type) and is_dataclass(hints[f.name]))


def check_ranges(schema: type, values: Any, prefix: str = "") -> None:
    """Raise ConfigError for the first numeric field of ``schema`` whose value in ``values``
    (an instance, or Hydra's DictConfig of it) is outside its declared range; nested config
    dataclasses are walked too (``devices.count``). ``prefix``: ``"task."`` for a task."""
    for name, sub_schema in _nested(schema):
        sub = getattr(values, name, None)
        if sub is not None:
            check_ranges(sub_schema, sub, f"{prefix}{name}.")
    for nf in numeric_fields(schema):
        problem = range_problem(prefix + nf.name, getattr(values, nf.name, None), nf)
        if problem:
            raise ConfigError(problem)
