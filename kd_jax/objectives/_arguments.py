"""The objectives' argument checks: the constraints a term declares on its numeric arguments."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any


def _hashable(value):
    if isinstance(value, list | tuple):
        return tuple(_hashable(v) for v in value)
    if isinstance(value, Mapping):
        return tuple(sorted((k, _hashable(v)) for k, v in value.items()))
    return value


# ------------------------------------------------------------------ argument checks

# The constraints a term may declare on a numeric argument (``register_term(checks=...)``):
# the test and what the error says when it fails. A numeric argument without one must be >= 0.
_CHECKS: dict[str, tuple[Callable[[float], bool], str]] = {
    "positive": (lambda v: v > 0, "must be > 0"),
    "unit": (lambda v: 0 <= v <= 1, "must be in [0, 1]"),
    "nonnegative": (lambda v: v >= 0, "must be >= 0"),
}
# The keywords of :func:`kd_jax.objectives.resolve` that set an argument of the terms that
# declare it (``register_term(shorthands=...)``).
_SHORTHANDS = frozenset({"temperature"})


def _is_number(value) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _check_argument(term: str, key: str, value, default, check: str = "nonnegative") -> None:
    """A numeric argument must be a finite number of its default's kind (an integer for an
    integer default) passing ``check``; any other one of its default's type."""
    where = f"term {term!r}: {key}"
    if not _is_number(default):
        if not isinstance(value, type(default)):
            raise ValueError(f"{where} must be a {type(default).__name__} like its default "
                             f"{default!r}, got {value!r}.")
        return
    if not _is_number(value) or not math.isfinite(value):
        raise ValueError(f"{where} must be a finite number, got {value!r}.")
    if isinstance(default, int) and not isinstance(value, int):
        raise ValueError(f"{where} must be an integer, got {value!r}.")
    holds, requirement = _CHECKS[check]
    if not holds(value):
        raise ValueError(f"{where} {requirement}, got {value}.")


def _declared_checks(name: str, defaults: Mapping[str, Any],
                     checks: Mapping[str, str]) -> dict[str, str]:
    """Every numeric argument's check: the declared one, else ``"nonnegative"``."""
    for key, check in checks.items():
        if key not in defaults:
            raise ValueError(f"term {name!r}: checks names {key!r}, which is not one of its "
                             f"arguments ({', '.join(sorted(defaults)) or 'none'}).")
        if check not in _CHECKS:
            raise ValueError(f"term {name!r}: the check of {key} must be one of "
                             f"{', '.join(sorted(_CHECKS))}, got {check!r}.")
        if not _is_number(defaults[key]):
            raise ValueError(f"term {name!r}: checks apply to numeric arguments; {key}'s "
                             f"default is {defaults[key]!r}.")
        _check_argument(name, key, defaults[key], defaults[key], check)  # a default meets it
    return {key: checks.get(key, "nonnegative") for key, default in defaults.items()
            if _is_number(default)}
