"""Whole numbers read from text someone else wrote: query parameters, HTTP headers, JSON numbers of a request.

Python's ``int()`` and ``str.isdigit()`` take more than a client should send: ``int("1_000")``, ``int("٣")``
(any Unicode decimal digit) and ``int(" 7 ")`` succeed, ``"²".isdigit()`` is true but ``int("²")`` fails, and
``int()`` of 4,301 digits raises and of 400 digits gives a number no float holds. Here a whole number is ASCII
digits only, at most :data:`MAX_DIGITS` of them, within a range the caller names; anything else is refused with
one line that names the input, never an exception from deep inside.
"""

from __future__ import annotations

from .errors import UsageError

# 18 digits hold every count, byte size and duration a request may name (an int64 holds 18 digits), and keep
# int() far from the standard library's 4,300-digit limit.
MAX_DIGITS = 18


def ascii_whole_number(text: str | bytes | None) -> int | None:
    """``text`` as a whole number when it is 1 to :data:`MAX_DIGITS` ASCII digits (no sign, space or
    underscore), else None."""
    if isinstance(text, bytes):
        text = text.decode("latin-1")
    if not text or len(text) > MAX_DIGITS or not (text.isascii() and text.isdigit()):
        return None
    return int(text)


def whole_number(text: str | bytes | None, name: str, lowest: int = 0, highest: int | None = None) -> int:
    """``text`` (named ``name`` in the message) as a whole number from ``lowest`` to ``highest`` (None: any
    of up to :data:`MAX_DIGITS` digits, for a caller that checks the range itself with its own words).
    Raises :class:`UsageError` for anything else: not ASCII digits, a sign, out of range."""
    value = ascii_whole_number(text)
    if value is None or value < lowest or (highest is not None and value > highest):
        shown = text if text is None or len(text) <= 24 else text[:20] + (b"..." if isinstance(text, bytes) else "...")
        within = f"from {lowest} to {highest}" if highest is not None else f"of at most {MAX_DIGITS} digits"
        raise UsageError(f"{name} must be a whole number {within} (ASCII digits), got {shown!r}")
    return value
