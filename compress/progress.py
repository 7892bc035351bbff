"""The one progress helper: per-step bars with an ETA, silenced by `-q`."""
from __future__ import annotations

import sys
from typing import Iterable, TypeVar

T = TypeVar("T")

_ENABLED = {"on": True}


def set_enabled(on: bool) -> None:
    _ENABLED["on"] = on


def progress(items: Iterable[T], desc: str, unit: str = "it", total: int | None = None) -> Iterable[T]:
    from tqdm.auto import tqdm

    return tqdm(
        items, desc=desc, unit=unit, total=total, disable=not _ENABLED["on"], file=sys.stderr,
        dynamic_ncols=True, leave=False,
    )
