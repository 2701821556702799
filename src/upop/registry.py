"""One registry idiom for every "name -> thing" table of the project (tasks, presets, data formats,
project-built architectures).

    TASKS: Registry[type[Task]] = Registry("task")

    @TASKS.register("caption")
    class CaptionTask(Task): ...

    TASKS["caption"]        # the entry; an unknown name raises one line listing the known names
    TASKS.get("x")          # None when unknown (dict semantics, for optional look-ups)
    TASKS.names()           # ("caption", ...) in registration order

An entry is added once: registering a second, different object under a taken name is a bug (two
modules claiming one name) and raises at import time.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Generic, TypeVar, overload

T = TypeVar("T")
D = TypeVar("D")


class UnknownNameError(LookupError):
    """A name that no entry of a registry carries."""


class Registry(Generic[T]):
    """name -> entry. `kind` names the table in error messages (e.g. "task" or "data.format");
    `error` is the exception class an unknown name raises (e.g. a ConfigError for config keys)."""

    def __init__(self, kind: str, error: type[Exception] = UnknownNameError) -> None:
        self.kind = kind
        self.error = error
        self._entries: dict[str, T] = {}

    def add(self, name: str, entry: T) -> T:
        """Register `entry` under `name` and return it."""
        if not isinstance(name, str) or not name:
            raise ValueError(f"{self.kind} names are non-empty strings, got {name!r}")
        old = self._entries.get(name)
        if old is not None and old is not entry:
            raise ValueError(f"{self.kind} {name!r} is registered twice ({old!r} and {entry!r})")
        self._entries[name] = entry
        return entry

    def register(self, name: str) -> Callable[[T], T]:
        """Decorator form of `add`: `@REGISTRY.register("name")`."""
        def decorate(entry: T) -> T:
            return self.add(name, entry)
        return decorate

    def __getitem__(self, name: str) -> T:
        try:
            return self._entries[name]
        except (KeyError, TypeError):  # TypeError: an unhashable name read from a config
            known = ", ".join(self._entries) or "none"
            raise self.error(f"unknown {self.kind} {name!r}; known: {known}") from None

    @overload
    def get(self, name: str) -> T | None: ...
    @overload
    def get(self, name: str, default: D) -> T | D: ...
    def get(self, name, default=None):
        try:
            return self._entries.get(name, default)
        except TypeError:
            return default

    def __contains__(self, name: object) -> bool:
        try:
            return name in self._entries
        except TypeError:
            return False

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)

    def remove(self, name: str) -> T | None:
        """Take `name` out again (a plugin unloaded, a test's toy entry); returns its entry or None."""
        return self._entries.pop(name, None)

    def names(self) -> tuple[str, ...]:
        return tuple(self._entries)

    def items(self) -> list[tuple[str, T]]:
        return list(self._entries.items())

    def __repr__(self) -> str:
        return f"Registry({self.kind!r}: {', '.join(self._entries)})"


# The model classes built outside transformers (this project's twin-branch NLVR2 BLIP, Segmenter, a user's
# own), so that `upop.from_pretrained` rebuilds them by class name as transformers' own classes. The
# engine owns the table; the modules named in ARCHITECTURE_PROVIDERS fill it when imported, and are
# imported on the first look-up that misses (a fresh process that loads a folder before anything else).
ARCHITECTURES: Registry[type] = Registry("architecture")
ARCHITECTURE_PROVIDERS: list[str] = ["upop.models"]


def architecture(name: str) -> type | None:
    """The registered class called `name`, importing the providers once if needed; None if unknown."""
    if name not in ARCHITECTURES:
        import importlib

        for module in ARCHITECTURE_PROVIDERS:
            importlib.import_module(module)
    return ARCHITECTURES.get(name)
