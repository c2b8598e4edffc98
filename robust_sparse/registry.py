"""A name -> factory registry: the one mechanism behind models, attacks and strategies."""

from __future__ import annotations

from typing import Callable, Generic, Iterator, TypeVar

from robust_sparse.errors import UserError

T = TypeVar("T")


class Registry(Generic[T]):
    """Maps names to factories. Registering a name twice is a programming error and raises."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._entries: dict[str, T] = {}

    def register(self, name: str) -> Callable[[T], T]:
        def decorator(factory: T) -> T:
            if name in self._entries:
                raise ValueError(f"{self.kind} {name!r} is already registered")
            self._entries[name] = factory
            return factory

        return decorator

    def get(self, name: str) -> T:
        try:
            return self._entries[name]
        except KeyError:
            raise UserError(
                f"unknown {self.kind} {name!r}; choose one of: {', '.join(self.names())}"
            ) from None

    def names(self) -> list[str]:
        return sorted(self._entries)

    def entries(self) -> list[tuple[str, T]]:
        """(name, entry) pairs in registration order (built-ins first, as their module lists them)."""
        return list(self._entries.items())

    def remove(self, name: str) -> T:
        """Take a registration back (a test's, or a plugin's being reloaded); unknown names raise UserError."""
        entry = self.get(name)
        del self._entries[name]
        return entry

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())
