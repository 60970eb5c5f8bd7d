"""Headers: the header fields of a request as a read-only, case-insensitive mapping."""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping


class Headers(Mapping[str, str]):
    """Headers maps header names to values, ignoring case (RFC 7230 section 3.2).

    ``headers["X-Token"]`` is the first value of that field (KeyError when absent) and
    ``get_all(name)`` every value in the order received; iteration gives each name once,
    spelled as it first arrived; ``raw_items()`` every field in order, repeats included.
    It owns its strings (copies), so it stays valid after the hook returns; it cannot be
    changed.
    """

    __slots__ = ("_fields", "_values", "_names")

    def __init__(self, fields: Iterable[tuple[str, str]] = ()) -> None:
        self._fields = tuple(fields)
        self._values: dict[str, list[str]] = {}
        self._names: list[str] = []
        for name, value in self._fields:
            key = name.lower()
            if key not in self._values:
                self._values[key] = []
                self._names.append(name)
            self._values[key].append(value)

    def __getitem__(self, name: str) -> str:
        return self._values[name.lower()][0]

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and name.lower() in self._values

    def __iter__(self) -> Iterator[str]:
        return iter(self._names)

    def __len__(self) -> int:
        return len(self._names)

    def get_all(self, name: str) -> list[str]:
        """get_all returns every value of the field called name, in order; [] when absent."""
        return list(self._values.get(name.lower(), ()))

    def raw_items(self) -> tuple[tuple[str, str], ...]:
        """raw_items returns every (name, value) in the order received, repeats included."""
        return self._fields

    def __repr__(self) -> str:
        return f"Headers({list(self._fields)!r})"


__all__ = ["Headers"]
