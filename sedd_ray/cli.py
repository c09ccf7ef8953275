"""Command-line values parsed in one place: list-valued flags and ``--set KEY=VALUE``.

    seeds = int_list(args.seeds, "--seeds", example="0,1,2")       # "0,1" -> [0, 1]
    graphs = name_list(args.graphs, "--graphs", choices=GRAPHS)     # "absorb,uniform"
    custom = name_values(args.worker_resources, "--worker-resources")  # "tpu=1" -> {"tpu": 1.0}
    fixed = set_pairs(args.set)                                     # ["lr=1e-3"] -> {"lr": "1e-3"}

Every script's list flag (``--seeds``, level lists such as ``--sizes`` or ``--graphs``,
comma-separated sections) goes through :func:`parse_list`; every ``--set`` through
:func:`set_pairs`. A bad value raises :class:`FlagError` (a :class:`ConfigError`), whose
message names the flag, the bad item and an example of the right form; the CLIs print it
as one ``error:`` line and exit with code 2.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any, TypeVar

from sedd_ray.config import ConfigError

T = TypeVar("T")


class FlagError(ConfigError):
    """A command-line value that cannot be parsed; the message says the right form."""


def parse_list(value: str | Sequence[Any], flag: str, item: Callable[[str], T], *,
               kind: str, example: str) -> list[T]:
    """Split a comma-separated flag value and convert each item with ``item``.

    Blank items (``"0,,1"``, a trailing comma) are skipped, so ``","`` is an empty list
    (the caller decides whether that is allowed). An item that ``item`` rejects raises
    ``FlagError("--seeds: 'a' is not a valid integer; expected comma-separated integers,
    e.g. --seeds 0,1,2")``. A value that is already a list (a default given as one) is
    converted item by item the same way."""
    items = value.split(",") if isinstance(value, str) else [str(v) for v in value]
    out: list[T] = []
    for raw in items:
        text = raw.strip()
        if not text:
            continue
        try:
            out.append(item(text))
        except (TypeError, ValueError) as e:
            why = str(e) if isinstance(e, FlagError) else f"{text!r} is not a valid {kind}"
            raise FlagError(f"{flag}: {why}; expected comma-separated {kind}s, "
                            f"e.g. {flag} {example}") from None
    return out


def int_list(value: str | Sequence[Any], flag: str, example: str = "0,1,2") -> list[int]:
    """Comma-separated integers (``--seeds 0,1,2``)."""
    return parse_list(value, flag, int, kind="integer", example=example)


def name_list(value: str | Sequence[Any], flag: str, *, choices: Iterable[str] | None = None,
              example: str | None = None) -> list[str]:
    """Comma-separated names; with ``choices``, each must be one of them (``--graphs``)."""
    valid = list(choices) if choices is not None else None

    def name(text: str) -> str:
        if valid is not None and text not in valid:
            raise FlagError(f"unknown {text!r} (valid: {', '.join(valid)})")
        return text

    example = example or (",".join(valid[:2]) if valid else "a,b")
    return parse_list(value, flag, name, kind="name", example=example)


def name_values(value: str | Sequence[Any], flag: str, example: str = "tpu=1") -> dict[str, float]:
    """Comma-separated ``NAME=NUMBER`` pairs (``--worker-resources tpu=1,ssd=0.5``)."""

    def pair(text: str) -> tuple[str, float]:
        name, sep, number = text.partition("=")
        if not sep or not name.strip():
            raise ValueError(text)
        return name.strip(), float(number)

    return dict(parse_list(value, flag, pair, kind="NAME=NUMBER pair", example=example))


def set_pairs(items: Iterable[str], flag: str = "--set") -> dict[str, str]:
    """``["lr=1e-3", "train.eval_draws=8"]`` -> ``{"lr": "1e-3", "train.eval_draws": "8"}``;
    the values stay strings (the config coerces them to the field's type)."""
    pairs: dict[str, str] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise FlagError(f"{flag} expects KEY=VALUE, got {item!r}; e.g. {flag} lr=3e-4")
        pairs[key.strip()] = value.strip()
    return pairs
