"""One registry pattern for graphs, noises, predictors and data sources.

    GRAPHS = Registry("graph")

    @GRAPHS.register("uniform")
    class Uniform(Graph): ...

    GRAPHS.get("unifrom")   # ValueError: unknown graph 'unifrom'; valid graphs: absorb, uniform

A registry refuses duplicate names, and an unknown name lists the valid ones.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Generic, TypeVar

T = TypeVar("T")


class Registry(Generic[T]):
    """A name -> object mapping that refuses duplicates and explains unknown names."""

    def __init__(self, kind: str, plural: str | None = None) -> None:
        self.kind = kind
        self.plural = plural or f"{kind}s"
        self._items: dict[str, T] = {}

    def register(self, name: str) -> Callable[[T], T]:
        def deco(obj: T) -> T:
            if name in self._items:
                raise ValueError(f"{self.kind} {name!r} is already registered")
            self._items[name] = obj
            return obj

        return deco

    def unregister(self, name: str) -> T:
        """Remove ``name`` (e.g. a plug-in registered for one test) and return its object."""
        self.get(name)  # an unknown name lists the valid ones
        return self._items.pop(name)

    def get(self, name: str) -> T:
        if name not in self._items:
            raise ValueError(
                f"unknown {self.kind} {name!r}; valid {self.plural}: {', '.join(sorted(self._items))}"
            )
        return self._items[name]

    def names(self) -> list[str]:
        return sorted(self._items)

    def __contains__(self, name: object) -> bool:
        return name in self._items

    def __iter__(self) -> Iterator[str]:
        return iter(sorted(self._items))

    def __len__(self) -> int:
        return len(self._items)
