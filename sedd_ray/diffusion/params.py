"""The typed parameters a graph or noise schedule declares: its constructor's keywords.

A component declares its parameters by its ``__init__`` signature, with a type annotation
(``float``, ``int``, ``bool`` or ``str``) and a default on each:

    class Geometric(Noise):
        def __init__(self, sigma_min: float = 1e-4, sigma_max: float = 20.0) -> None: ...

and validates their values there, raising ``ValueError`` with the fix. The config
(:class:`sedd_ray.config.DiffusionConfig`) reads the declaration to accept, type and
check ``diffusion.noise_params`` / ``diffusion.graph_params``; nothing else needs editing
when a component is registered from outside the package.
"""

from __future__ import annotations

import difflib
import inspect
import typing
from dataclasses import dataclass
from typing import Any

SCALAR_TYPES = (bool, int, float, str)


@dataclass(frozen=True)
class Param:
    """One declared parameter: its name, scalar type and default (``REQUIRED`` if none)."""

    name: str
    type: type
    default: Any


REQUIRED = inspect.Parameter.empty


def declared_params(cls: type, fixed: tuple[str, ...] = ()) -> dict[str, Param]:
    """``name -> Param`` of ``cls.__init__``'s parameters, less ``self`` and ``fixed``.

    ``fixed`` names the arguments the builder supplies itself (a graph's ``vocab_size``).
    A parameter without a scalar annotation raises ``TypeError`` naming the fix.
    """
    sig = inspect.signature(cls.__init__)
    hints = typing.get_type_hints(cls.__init__)
    out: dict[str, Param] = {}
    for name, p in list(sig.parameters.items())[1:]:
        if name in fixed or p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
            continue
        typ = hints.get(name)
        if typ not in SCALAR_TYPES:
            raise TypeError(
                f"{cls.__name__}.__init__ parameter {name!r} needs a scalar annotation "
                f"(float, int, bool or str), got {typ!r}"
            )
        out[name] = Param(name, typ, p.default)
    return out


def check_param_names(kind: str, name: str, given: typing.Iterable[str],
                      params: dict[str, Param]) -> None:
    """Raise ``TypeError`` for the first of ``given`` that ``params`` does not declare.

    The message names the closest declared one ("did you mean") and all valid ones.
    """
    for key in given:
        if key not in params:
            close = difflib.get_close_matches(key, list(params), n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise TypeError(
                f"{name} {kind} takes no argument {key!r}{hint}; valid arguments: "
                f"{', '.join(params) or '(none)'}"
            )
