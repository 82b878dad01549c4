"""A tiny name -> builder registry, one per kind of thing (datasets, map methods, ...)."""

from __future__ import annotations

from typing import Callable, Dict, Generic, List, TypeVar

from wsseg.errors import UnknownNameError

T = TypeVar("T")


class Registry(Generic[T]):
    """Maps names to builders. The CLI's choices and the tests' parameters read `names()`."""

    def __init__(self, kind: str):
        self.kind = kind
        self._entries: Dict[str, T] = {}

    def register(self, name: str) -> Callable[[T], T]:
        def decorator(obj: T) -> T:
            if name in self._entries:
                raise ValueError(f"{self.kind} '{name}' is registered twice")
            self._entries[name] = obj
            return obj

        return decorator

    def unregister(self, name: str) -> T:
        """Remove and return an entry (a plug-in's tests clean up after themselves)."""
        return self._entries.pop(name)

    def get(self, name: str) -> T:
        try:
            return self._entries[name]
        except KeyError:
            raise UnknownNameError(
                f"unknown {self.kind} '{name}'; valid names: {', '.join(self.names())}"
            ) from None

    def names(self) -> List[str]:
        return sorted(self._entries)

    def __contains__(self, name: object) -> bool:
        return name in self._entries
