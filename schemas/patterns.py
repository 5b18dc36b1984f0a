"""Regular expressions written for two engines: pydantic-core's and JSON Schema's.

The worker checks a pattern in pydantic-core, whose engine is Rust's ``regex`` crate: ``$``
is the end of the text, code points are written ``\\x{...}``, there is no lookaround and no
surrogate code point. The published JSON Schema is read by ECMA 262 engines (with the ``u``
flag, as JSON Schema 2020-12 asks) and by Python's ``re`` (jsonschema,
hypothesis-jsonschema), in which ``$`` also matches before a final newline, so ``"EUR\\n"``
would match ``^[A-Za-z]{3}$``. Each rule is therefore written once and rendered for each:

- ``json_schema_pattern`` turns a Rust pattern's final ``$`` into ``$(?!\\n)``, the end of
  the text in both ECMA 262 and Python;
- ``rust_class`` and ``json_class`` render one set of code point ranges as the inside of a
  character class: Rust escapes (surrogates left out, as no Rust string can hold one), and
  for JSON Schema the characters themselves, which both Python and ECMA 262 (``u`` flag) read
  as code points, where no regular expression escape is common to the two beyond U+FFFF
  (the JSON file escapes them instead: ``\\ud835\\udd18``).
"""

from __future__ import annotations

import re
from collections.abc import Iterable

Ranges = tuple[tuple[int, int], ...]
"""Inclusive (first, last) code point ranges, sorted and disjoint."""

JSON_SCHEMA_END = r"$(?!\n)"
"""The end of the text, in a pattern read by ECMA 262 or by Python's ``re``."""

_SURROGATES = (0xD800, 0xDFFF)
_MAX_CODE_POINT = 0x10FFFF


def json_schema_pattern(rust_pattern: str) -> str:
    """``rust_pattern`` (anchored ``^...$``) as a JSON Schema pattern that lets no final
    newline through a Python-based validator."""
    if not (rust_pattern.startswith("^") and rust_pattern.endswith("$")):
        raise ValueError(f"pattern should be anchored with ^ and $: {rust_pattern[:40]!r}")
    return rust_pattern[:-1] + JSON_SCHEMA_END


def complement(ranges: Ranges) -> Ranges:
    """Every code point (U+0000-U+10FFFF) not in ``ranges``."""
    gaps: list[tuple[int, int]] = []
    start = 0
    for first, last in ranges:
        if first > start:
            gaps.append((start, first - 1))
        start = last + 1
    if start <= _MAX_CODE_POINT:
        gaps.append((start, _MAX_CODE_POINT))
    return tuple(gaps)


def without_surrogates(ranges: Iterable[tuple[int, int]]) -> Ranges:
    """``ranges`` less U+D800-U+DFFF, which no Rust (or UTF-8) string can hold.

    A range across the surrogates is kept whole (Rust reads it as the scalar values it
    spans), and ranges meeting across them are merged: the ``regex`` crate negates a class
    holding U+D7FF and U+E000 as separate ranges wrongly, the empty gap between them turned
    into a range covering both, so ``[^\\x{D7FF}\\x{E000}]`` would match U+E000.
    """
    low, high = _SURROGATES
    kept: list[tuple[int, int]] = []
    for first, last in ranges:
        start = high + 1 if low <= first <= high else first
        end = low - 1 if low <= last <= high else last
        if start > end:
            continue
        if kept and start in (kept[-1][1] + 1, high + 1 if kept[-1][1] == low - 1 else -1):
            kept[-1] = (kept[-1][0], end)
        else:
            kept.append((start, end))
    return tuple(kept)


def rust_class(ranges: Iterable[tuple[int, int]]) -> str:
    """The inside of a Rust ``regex`` character class holding ``ranges``."""
    return "".join(
        _rust_char(first) if first == last else f"{_rust_char(first)}-{_rust_char(last)}"
        for first, last in without_surrogates(ranges)
    )


def json_class(ranges: Iterable[tuple[int, int]]) -> str:
    """The inside of an ECMA 262 (``u`` flag) or Python character class holding ``ranges``:
    the characters themselves (``schemas.export`` writes every one beyond ASCII as a JSON
    escape)."""
    for first, last in ranges:
        for end in (first, last):
            if chr(end) in _CLASS_SYNTAX:
                raise ValueError(f"U+{end:04X} has a meaning inside a character class")
    rendered = "".join(
        chr(first) if first == last else f"{chr(first)}-{chr(last)}" for first, last in ranges
    )
    # ECMA 262 reads a high surrogate followed by a low one as one code point beyond U+FFFF.
    if _SURROGATE_PAIR.search(rendered):
        raise ValueError("a high surrogate followed by a low one would read as one character")
    return rendered


_SURROGATE_PAIR = re.compile("[\ud800-\udbff][\udc00-\udfff]")
_CLASS_SYNTAX = frozenset("\\]^-[")


def _rust_char(code_point: int) -> str:
    return f"\\x{{{code_point:X}}}"
