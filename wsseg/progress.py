"""Progress reporting without a UI dependency: stages take a callback, the CLI passes a rich one."""

from __future__ import annotations

from typing import Iterable, Optional, Protocol, TypeVar

T = TypeVar("T")


class ProgressFn(Protocol):
    def __call__(self, iterable: Iterable[T], total: Optional[int] = None, description: str = "") -> Iterable[T]: ...


def no_progress(iterable: Iterable[T], total: Optional[int] = None, description: str = "") -> Iterable[T]:
    """The default: iterate silently (library use, tests)."""
    return iterable
