"""Typed helpers that read settings from environment variables and stop start-up on a bad value."""

from __future__ import annotations

import os

from django.core.exceptions import ImproperlyConfigured

_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off", ""}


class EnvError(ImproperlyConfigured):
    """A variable is missing or malformed; the message names it and says what was expected."""


def _raw(name: str) -> str | None:
    value = os.environ.get(name)
    return None if value is None else value.strip()


def env_str(
    name: str, default: str | None = None, *, required: bool = False, choices: tuple[str, ...] = ()
) -> str:
    """A string; `required` makes an unset or empty variable an error, `choices` limits the values."""
    value = _raw(name)
    if not value:
        if required:
            raise EnvError(f"environment variable {name} is required but not set")
        if default is None:
            return ""
        value = default
    if choices and value not in choices:
        raise EnvError(f"environment variable {name} must be one of {', '.join(choices)}; got {value!r}")
    return value


def env_bool(name: str, default: bool) -> bool:
    """true/false, yes/no, on/off or 1/0 (any case); unset means `default`."""
    value = _raw(name)
    if value is None:
        return default
    lowered = value.lower()
    if lowered in _TRUE:
        return True
    if lowered in _FALSE:
        return False
    raise EnvError(f"environment variable {name} must be a boolean (true/false, 1/0, yes/no); got {value!r}")


def env_int(name: str, default: int, *, minimum: int | None = None, maximum: int | None = None) -> int:
    """A whole number within [minimum, maximum] when those are given; unset or empty means `default`."""
    value = _raw(name)
    if not value:
        return default
    try:
        number = int(value)
    except ValueError:
        raise EnvError(f"environment variable {name} must be an integer; got {value!r}") from None
    if minimum is not None and number < minimum:
        raise EnvError(f"environment variable {name} must be >= {minimum}; got {number}")
    if maximum is not None and number > maximum:
        raise EnvError(f"environment variable {name} must be <= {maximum}; got {number}")
    return number


def env_list(name: str, default: list[str] | None = None) -> list[str]:
    """A comma-separated list with blanks dropped; unset means `default`."""
    value = _raw(name)
    if value is None:
        return list(default or [])
    return [item.strip() for item in value.split(",") if item.strip()]
