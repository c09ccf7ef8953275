"""Plain values shared by every room: the one coercion of a text/number to a field's
type (config files and flags, synthetic specs, Parquet columns) and perplexity from nll.

Imports nothing of sedd_ray, torch or Ray.
"""

from __future__ import annotations

import math
import operator
import os
from typing import Any

__all__ = ["coerce", "perplexity"]

_TRUE, _FALSE = ("true", "1", "yes"), ("false", "0", "no")
_WANT = {bool: "a bool (true/false/yes/no/1/0)", int: "int (a whole number)",
         float: "a number", str: "a string"}
# exp(700) is near float64's largest value; a larger nll is an infinite perplexity anyway.
_MAX_LOG = 700.0


def perplexity(nll: float) -> float:
    """``exp(nll)`` (nats per token -> perplexity), capped to stay finite."""
    return math.exp(min(nll, _MAX_LOG))


def _unwrap(value: Any) -> Any:
    """numpy / torch scalars (anything with ``.item()``) -> the Python value."""
    if isinstance(value, (bool, int, float, str)) or not hasattr(value, "item"):
        return value
    try:
        return value.item()
    except (TypeError, ValueError, RuntimeError):  # an array of several values
        return value


def _to_bool(value: Any) -> bool | None:
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.strip().lower() in _TRUE + _FALSE:
        return value.strip().lower() in _TRUE
    return None


def _to_int(value: Any) -> int | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, str):
        try:
            value = float(value.strip())
        except ValueError:
            return None
    if isinstance(value, float):
        return int(value) if value.is_integer() else None
    try:
        return operator.index(value)
    except TypeError:
        return None


def _to_float(value: Any) -> float | None:
    if isinstance(value, bool):
        return None
    try:
        return float(value.strip() if isinstance(value, str) else value)
    except (TypeError, ValueError):
        return None


def _to_str(value: Any) -> str | None:
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    return value if isinstance(value, str) else None


_PARSE = {bool: _to_bool, int: _to_int, float: _to_float, str: _to_str}


def coerce(value: Any, typ: Any, where: str, error: type[Exception] = ValueError) -> Any:
    """``value`` (a Python, numpy or torch scalar, or text as on a command line) as
    ``typ`` (bool, int, float or str); any other ``typ`` returns ``value`` unchanged.

    Bools read ``true/false/yes/no/1/0`` (any case) and 0/1; ints read whole floats and
    ``"1e3"``, never bools or fractions; floats read numbers and numeric text, never
    bools. Anything else raises ``error("<where> must be <type>, got <value>")``.
    """
    parse = _PARSE.get(typ)
    if parse is None:
        return value
    out = parse(_unwrap(value))
    if out is None:
        raise error(f"{where} must be {_WANT[typ]}, got {value!r}")
    return out
