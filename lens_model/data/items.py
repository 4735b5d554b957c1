"""The unit every data source yields before it is checked: one raw input item."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class RawItem:
    """One input as read, before decoding; ``problems`` are reasons found while reading.

    ``key`` is unique in a dataset and safe as a tar member stem (no '.' or '/').
    ``source`` says where it came from (a path, ``tar::member``, ``parquet#row`` or ``shapes``).
    ``image`` / ``caption`` are the original bytes, or None where that half is missing.
    ``problems`` holds ``(reason_code, detail)`` pairs found before decoding (a symlink, an
    unsafe tar path, a missing caption, ...); an item with problems goes to quarantine.
    """

    key: str
    source: str
    image: bytes | None
    caption: bytes | None
    meta: dict[str, Any] | None = None
    problems: list[tuple[str, str]] = field(default_factory=list)
