"""Hypothesis strategies for the tests that search: events generated from the published JSON
Schema files, and values on the edge of each field's rule.

- ``GENERATED``: for each input schema in ``schemas/json/`` (one per event type, and
  ``input_event.schema.json``), events drawn from the file itself, so that a search follows
  what is published rather than the worker's models (``schema_strategy``: objects assembled
  here, each property's value from hypothesis-jsonschema);
- ``ODD_FOR_FIELD``: for each field, the values most likely to sit on the edge of its rule
  (timestamps with a field at or past its bound, identifiers with invisible or look-alike
  characters and trailing newlines, currency codes in any case or with a look-alike letter,
  numbers at their bounds); ``odd_values`` for any field, ``json_values`` for any JSON;
- ``dumps``: an instance as the record value that carries it.

They live here, not in a test module, because both the unit tests of
``tests/unit/test_schema_parity.py`` (the schema's verdict against the worker's) and the
integration tests of ``tests/integration/test_generated_events.py`` (generated records
through the real apply path) draw from them.
"""

from __future__ import annotations

import json
from functools import cache
from typing import Any

from hypothesis import strategies as st
from hypothesis_jsonschema import from_schema

from schemas.currency import ACTIVE_CURRENCIES
from schemas.export import SCHEMA_DIR

# The input schemas as published (one per event type, and their union), and the identifiers.
TYPES = ("charge", "usage", "credit_grant", "credit_void")
INPUT_FILES = (*(f"{kind}.schema.json" for kind in TYPES), "input_event.schema.json")
SCHEMAS: dict[str, dict[str, Any]] = {
    name: json.loads((SCHEMA_DIR / name).read_text(encoding="utf-8")) for name in INPUT_FILES
}
IDENTIFIERS = ("reference", "customer_ref", "flow_id", "feature", "grant_reference")


def dumps(instance: Any, *, ascii_only: bool = False) -> bytes:
    """``instance`` as a record value: UTF-8 JSON (escapes only where UTF-8 cannot hold an
    unpaired surrogate, or when asked)."""
    try:
        return json.dumps(instance, ensure_ascii=ascii_only).encode("utf-8")
    except UnicodeEncodeError:
        return json.dumps(instance, ensure_ascii=True).encode("utf-8")


# --- Events generated from the published schemas -----------------------------------------------

# Keys and values of metadata: any JSON (64-bit integers mostly, beyond sometimes).
json_scalars: st.SearchStrategy[Any] = (
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**63 - 1)
    | st.integers(-(2**70), 2**70)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=12)
)
json_values: st.SearchStrategy[Any] = st.recursive(
    json_scalars,
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=12,
)
json_objects = st.dictionaries(st.text(max_size=8), json_values, max_size=5)


def _resolve(node: Any, defs: dict[str, Any]) -> Any:
    """``node`` with each local ``$ref`` replaced by its definition, merged with the keywords
    beside it (all our schemas need)."""
    if isinstance(node, list):
        return [_resolve(item, defs) for item in node]
    if not isinstance(node, dict):
        return node
    resolved = {key: _resolve(value, defs) for key, value in node.items() if key != "$ref"}
    if "$ref" in node:
        target = _resolve(defs[node["$ref"].removeprefix("#/$defs/")], defs)
        for key, value in target.items():
            resolved.setdefault(key, value)
    return resolved


def schema_strategy(node: dict[str, Any]) -> st.SearchStrategy[Any]:
    """Instances of a resolved schema node: objects assembled here, each property's value
    from hypothesis-jsonschema.

    hypothesis-jsonschema 0.23.1 builds objects through a Hypothesis internal
    (``many.more()``) that Hypothesis 6.170 no longer has; its strings, numbers, constants
    and enums (the patterns and formats the searches are about) are used as they are.
    """
    for combinator in ("oneOf", "anyOf"):
        if combinator in node:
            return st.one_of([schema_strategy(branch) for branch in node[combinator]])
    if node.get("type") == "object":
        properties = node.get("properties")
        if properties is None:
            return json_objects  # metadata: an open object
        required = set(node.get("required", ()))
        return st.fixed_dictionaries(
            {key: schema_strategy(properties[key]) for key in properties if key in required},
            optional={
                key: schema_strategy(value)
                for key, value in properties.items()
                if key not in required
            },
        )
    # One strategy per distinct rule: hypothesis-jsonschema builds a pattern's at once.
    return _leaf(
        json.dumps({k: v for k, v in node.items() if k not in _ANNOTATIONS}, sort_keys=True)
    )


_ANNOTATIONS = {"title", "description", "examples", "default"}


@cache
def _leaf(node: str) -> st.SearchStrategy[Any]:
    return from_schema(json.loads(node))


def _generated(name: str) -> st.SearchStrategy[Any]:
    schema = SCHEMAS[name]
    return st.deferred(lambda: schema_strategy(_resolve(schema, schema.get("$defs", {}))))


GENERATED = {name: _generated(name) for name in SCHEMAS}


# --- Values on the edge of each field's rule ---------------------------------------------------

ODD_CHARACTERS = (
    "\n\t\r\x00\x07\x1f\x7f\x85\u00a0\u00ad\u0131\u017f\u0378\u061c\u200b\u200d\u2028\u2029"
    "\u202e\u212a\u3000\ufeff\ue000\uffff\uff25\U0001f6dc\U000e0001\U000f0000\U0010fffd"
)
odd_characters = st.sampled_from(ODD_CHARACTERS) | st.characters()


@st.composite
def odd_strings(draw: st.DrawFn, like: str = "") -> str:
    """``like`` (or some text) with odd characters put in, or a final newline."""
    base = like or draw(st.text(min_size=1, max_size=8))
    for _ in range(draw(st.integers(0, 2))):
        at = draw(st.integers(0, len(base)))
        base = base[:at] + draw(odd_characters) + base[at:]
    if draw(st.booleans()):
        base += "\n"
    return base


# Each field of a timestamp at, or just past, its bounds.
TIMESTAMP_BOUNDS = {
    "year": [0, 1, 9999],
    "month": [0, 1, 12, 13],
    "day": [0, 1, 28, 29, 30, 31, 32],
    "hour": [0, 23, 24],
    "minute": [0, 59, 60],
    "second": [0, 59, 60, 61],
    "offset_hour": [0, 23, 24, 25],
    "offset_minute": [0, 59, 60],
}


@st.composite
def near_timestamps(draw: st.DrawFn) -> str:
    """An RFC 3339 timestamp with up to two of its fields moved to (or past) a bound, and
    sometimes another form of fraction, offset or separator."""
    parts = {
        "year": draw(st.integers(1, 9999)),
        "month": draw(st.integers(1, 12)),
        "day": draw(st.integers(1, 28)),
        "hour": draw(st.integers(0, 23)),
        "minute": draw(st.integers(0, 59)),
        "second": draw(st.integers(0, 59)),
        "offset_hour": draw(st.integers(0, 23)),
        "offset_minute": draw(st.integers(0, 59)),
    }
    for _ in range(draw(st.integers(0, 2))):
        name = draw(st.sampled_from(sorted(TIMESTAMP_BOUNDS)))
        parts[name] = draw(st.sampled_from(TIMESTAMP_BOUNDS[name]))
    fraction = draw(st.sampled_from(["", "", ".5", ".123456789", ".1234567891", ".", ",5"]))
    sign = draw(st.sampled_from(["Z", "z", "+", "-", "", "+"]))
    offset = sign if sign in {"Z", "z", ""} else (
        f"{sign}{parts['offset_hour']:02d}"
        + draw(st.sampled_from([":", ":", ":", ""]))
        + f"{parts['offset_minute']:02d}"
    )  # fmt: skip
    separator = draw(st.sampled_from("TTTt "))
    return (
        f"{parts['year']:04d}-{parts['month']:02d}-{parts['day']:02d}{separator}"
        f"{parts['hour']:02d}:{parts['minute']:02d}:{parts['second']:02d}{fraction}{offset}"
    )


# Letters that upper-case (or lower-case) to an ASCII letter of a currency code.
LOOK_ALIKES = {"I": ["\u0131", "\u0130"], "S": ["\u017f"], "K": ["\u212a"]}


@st.composite
def odd_currencies(draw: st.DrawFn) -> str:
    """A code (active, or not: funds, testing, withdrawn) in any case, sometimes with a
    look-alike letter in place of an ASCII one."""
    code = draw(st.sampled_from([*sorted(ACTIVE_CURRENCIES), "XXX", "XTS", "XAU", "ZWL", "HRK"]))
    letters = [draw(st.sampled_from([c, c.lower()])) for c in code]
    swappable = [at for at, letter in enumerate(code) if letter in LOOK_ALIKES]
    swap = draw(st.booleans())
    if swappable and swap:
        at = draw(st.sampled_from(swappable))
        letters[at] = draw(st.sampled_from(LOOK_ALIKES[code[at]]))
    return "".join(letters)


odd_values: st.SearchStrategy[Any] = st.one_of(
    json_values,
    odd_strings(),
    odd_strings("user_123"),
    near_timestamps(),
    odd_currencies(),
    st.sampled_from([0, 1, -1, 1000, 1001, 10**12, 10**12 + 1, 2**63, 100.0, 1.5, True, "1"]),
    st.integers(-(2**64), 2**64),
    st.floats(),
    st.sampled_from(["0", "0.0001", "01", "1e-4", "purchase", "gift", "charge", "usage"]),
)
# The odd values most likely to sit on the edge of each field's rule.
ODD_FOR_FIELD: dict[str, st.SearchStrategy[Any]] = {
    **{field: near_timestamps() for field in ("occurred_at", "expires_at", "effective_at")},
    **{field: odd_strings("user_123") | odd_strings() for field in IDENTIFIERS},
    "currency": odd_currencies(),
    **{
        field: st.sampled_from([0, 1, -1, 1000, 1001, 10**12, 10**12 + 1, 1.0, 1.5, True])
        | st.integers(-2, 10**12 + 2)
        for field in ("amount", "tokens", "priority")
    },
    "cost_basis": st.from_regex(r"[-+ ]?[0-9]{0,20}(\.[0-9]{0,20})?\n?", fullmatch=True)
    | odd_strings("0.0001"),
    "description": st.text(max_size=3) | st.text(min_size=499, max_size=502),
    "reason": st.text(max_size=3) | st.text(min_size=499, max_size=502),
    "type": st.sampled_from([*TYPES, "Charge", "refund", ""]) | odd_strings("usage"),
    "source": st.sampled_from(["purchase", "plan", "Plan", "gift"]) | odd_strings("plan"),
}
