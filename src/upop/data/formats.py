"""The data formats a run config's `data.format` can name: one registered entry per reader module.

Each reader module registers its own format (`FORMATS.add(DataFormat(...))` next to its
reader); a task lists the names it reads in `Task.formats`; the run config takes the known names
from this registry.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..registry import Registry
from ._common import DataError


@dataclass(frozen=True)
class DataFormat:
    name: str
    needs: tuple[str, ...]  # the data.* keys the format cannot do without
    description: str
    lists: tuple[str, ...] = ()  # the data.* keys that may name a list of files (read as one split)

    def check(self, data: Any) -> None:
        """One-line DataError naming the data.* keys this format needs and the config left empty."""
        missing = [k for k in self.needs if getattr(data, k, None) is None]
        if missing:
            raise DataError(f"data.format {self.name} needs data.{', data.'.join(missing)}")


FORMATS: Registry[DataFormat] = Registry("data.format")


def add_format(name: str, needs: tuple[str, ...], description: str, lists: tuple[str, ...] = ()) -> DataFormat:
    return FORMATS.add(name, DataFormat(name, needs, description, lists))
