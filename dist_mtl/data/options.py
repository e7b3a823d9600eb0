"""Validation of data-set options; every message starts with the dotted config path ``data.<option>``.

The errors are ``ConfigError`` (a ``UserError``), so entry points report them as one line with exit
code 2 instead of a traceback: a wrong option is the user's input, not a bug.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from dist_mtl.errors import ConfigError


def require_int(option: str, value: Any, *, minimum: int, maximum: int | None = None, where: str = "") -> int:
    """Return ``value`` if it is an int in ``[minimum, maximum]``; otherwise name the option and the range.

    ``where`` names the component whose limit ``maximum`` is (e.g. "multidigits with tasks 'binary'"),
    so a message about a data-dependent bound says where the bound comes from.
    """
    valid = f">= {minimum}" if maximum is None else f"in [{minimum}, {maximum}]"
    prefix = f"data.{option}: {where}: " if where else f"data.{option}: "
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(f"{prefix}expected an integer {valid}, got {value!r}")
    if value < minimum or (maximum is not None and value > maximum):
        raise ConfigError(f"{prefix}expected an integer {valid}, got {value}")
    return value


def require_float(
    option: str, value: Any, *, low: float, high: float, open_low: bool, open_high: bool
) -> float:
    """Return ``value`` as a float inside the stated interval; otherwise name the option and the interval."""
    interval = f"{'(' if open_low else '['}{low}, {high}{')' if open_high else ']'}"
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(f"data.{option}: expected a number in {interval}, got {value!r}")
    value = float(value)
    above = value > low if open_low else value >= low
    below = value < high if open_high else value <= high
    if not (above and below):
        raise ConfigError(f"data.{option}: expected a number in {interval}, got {value}")
    return value


def require_choice(option: str, value: Any, choices: Sequence[str]) -> str:
    """Return ``value`` if it is one of ``choices``; otherwise list them."""
    if value not in choices:
        raise ConfigError(f"data.{option}: expected one of {', '.join(map(repr, choices))}, got {value!r}")
    return value
