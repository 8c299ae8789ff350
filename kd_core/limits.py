"""Bounds on the names and class lists users can make the studio store; the engine and the web app share them."""

from __future__ import annotations

import unicodedata

# A dataset, checkpoint or experiment name, a class name, a CSV column name: one line a person reads.
MAX_NAME_CHARS = 200
# Classes of one dataset or model (labels 0 .. MAX_CLASSES - 1).
MAX_CLASSES = 10_000


def name_problem(value: str, what: str, *, limit: int = MAX_NAME_CHARS) -> str | None:
    """Why `value` cannot be a name (too long, or holding control characters), else None.

    `what` says which name, e.g. "class name 3" or "'name'". The value itself is never echoed, as a
    refused name may be megabytes long; control characters (NUL above all, which PostgreSQL refuses in
    text) would break CSV exports and labels.
    """
    if len(value) > limit:
        return f"{what} is {len(value):,} characters long; at most {limit} are allowed"
    for ch in value:
        if unicodedata.category(ch) == "Cc":
            return f"{what} holds a control character ({ch!r}); names must be plain text"
    return None
