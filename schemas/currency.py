"""Currencies: the active ISO 4217 codes and their minor units, from the ``iso4217`` package.

The table comes from a maintained library, never a hand-written list. "Active" means a code
with a defined minor unit (``exponent``): that leaves out the funds, precious metals and
testing codes (XAU, XDR, XTS, XXX, ...) that no one is billed in.

``CurrencyCode`` is the annotated type event models use: it is validated entirely in
pydantic-core (no Python call on the hot path). Any letter case is accepted, but only ASCII
letters: the code must be one of the active codes written in any mix of cases (a literal
lookup) before it is upper-cased, since Unicode upper-casing turns look-alikes into codes
("\u0131nr", with a dotless i, into "INR"; "\u017fek", with a long s, into "SEK"). The
exported JSON Schema states the same set exactly, as a case-insensitive alternation of the
codes (JSON Schema patterns have no case-insensitive flag).
"""

from __future__ import annotations

from itertools import product
from types import MappingProxyType
from typing import Annotated, Any

from iso4217 import Currency
from pydantic import GetCoreSchemaHandler, GetJsonSchemaHandler
from pydantic.json_schema import JsonSchemaValue
from pydantic_core import CoreSchema, core_schema

from schemas.patterns import json_schema_pattern

_EXPONENTS: MappingProxyType[str, int] = MappingProxyType(
    {c.code: c.exponent for c in Currency if c.exponent is not None}
)

ACTIVE_CURRENCIES: frozenset[str] = frozenset(_EXPONENTS)
"""Every active ISO 4217 alphabetic code, upper case."""

CURRENCY_DESCRIPTION = (
    "An active ISO 4217 alphabetic code (funds, precious-metal and testing codes such as "
    "XAU, XDR, XTS and XXX are refused). Lower and mixed case ASCII letters are accepted and "
    "normalised to upper case. Amounts in this currency are integers in its minor unit "
    "(EUR cents, JPY yen, KWD fils)."
)

ANY_CASE_CURRENCIES: frozenset[str] = frozenset(
    "".join(letters)
    for code in ACTIVE_CURRENCIES
    for letters in product(*((letter, letter.lower()) for letter in code))
)
"""Every active code with each of its letters in either case: "EUR", "eur", "Eur", "eUR"..."""


def _any_case(code: str) -> str:
    return "".join(f"[{letter}{letter.lower()}]" for letter in code)


CURRENCY_JSON_SCHEMA_PATTERN = json_schema_pattern(
    f"^(?:{'|'.join(_any_case(code) for code in sorted(ACTIVE_CURRENCIES))})$"
)
"""``ANY_CASE_CURRENCIES`` as a JSON Schema pattern: each code, each letter in either case."""


def normalise_currency(code: str) -> str:
    """Return ``code`` upper-cased if it is an active ISO 4217 code (ASCII letters, any
    case); else raise ValueError."""
    if code not in ANY_CASE_CURRENCIES:
        raise ValueError(f"{code[:16]!r} is not an active ISO 4217 currency code")
    return code.upper()


def minor_unit_exponent(code: str) -> int:
    """Digits after the decimal point in ``code``'s minor unit: JPY 0, EUR 2, KWD 3."""
    return _EXPONENTS[normalise_currency(code)]


class _ActiveCurrency:
    """Core schema: a JSON string in ``ANY_CASE_CURRENCIES``, then upper-cased (all Rust).

    One hash lookup does what a pattern ``^[A-Za-z]{3}$`` and a lookup of the upper-case
    code would do in three steps (pydantic-core upper-cases a string before it matches its
    pattern, so the pattern would need a step of its own).
    """

    def __get_pydantic_core_schema__(
        self, source: Any, handler: GetCoreSchemaHandler
    ) -> CoreSchema:
        return core_schema.custom_error_schema(
            core_schema.chain_schema(
                [
                    core_schema.literal_schema(sorted(ANY_CASE_CURRENCIES)),
                    core_schema.str_schema(strict=True, to_upper=True),
                ]
            ),
            custom_error_type="currency_code",
            custom_error_message="Input should be an active ISO 4217 currency code such as EUR",
        )

    def __get_pydantic_json_schema__(
        self, schema: CoreSchema, handler: GetJsonSchemaHandler
    ) -> JsonSchemaValue:
        return {
            "type": "string",
            "pattern": CURRENCY_JSON_SCHEMA_PATTERN,
            "description": CURRENCY_DESCRIPTION,
            "examples": ["EUR", "USD", "JPY"],
        }


CurrencyCode = Annotated[str, _ActiveCurrency()]
"""An active ISO 4217 code; lower case is normalised to upper case."""
