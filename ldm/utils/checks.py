"""Argument checks shared by the configurable classes: an error names the config key and what it expects."""

from __future__ import annotations

from typing import Any


def require_int(key: str, value: Any, least: int, optional: bool = False) -> None:
    """``value`` must be an integer >= ``least`` (or None when ``optional``); else a ValueError naming ``key``."""
    if value is None and optional:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < least:
        raise ValueError(f"{key}={value!r}: expected an integer >= {least}" + (" or null" if optional else ""))
