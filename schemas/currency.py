"""Currencies: the active ISO 4217 codes and their minor units, from the ``iso4217`` package.

The table comes from a maintained library, never a hand-written list. "Active" means a code
with a defined minor unit (``exponent``): that leaves out the funds, precious metals and
testing codes (XAU, XDR, XTS, XXX, ...) that no one is billed in.

``CurrencyCode`` is the annotated type event models use: it is validated entirely in
pydantic-core (no Python call on the hot path), upper-casing ``"eur"`` to ``"EUR"`` first.
"""

from __future__ import annotations

from types import MappingProxyType
from typing import Annotated, Any

from iso4217 import Currency
from pydantic import GetCoreSchemaHandler, GetJsonSchemaHandler
from pydantic.json_schema import JsonSchemaValue
from pydantic_core import CoreSchema, core_schema

_EXPONENTS: MappingProxyType[str, int] = MappingProxyType(
    {c.code: c.exponent for c in Currency if c.exponent is not None}
)

ACTIVE_CURRENCIES: frozenset[str] = frozenset(_EXPONENTS)
"""Every active ISO 4217 alphabetic code, upper case."""

CURRENCY_DESCRIPTION = (
    "An active ISO 4217 alphabetic code (funds, precious-metal and testing codes such as "
    "XAU, XDR, XTS and XXX are refused). Lower case is accepted and normalised to upper case. "
    "Amounts in this currency are integers in its minor unit (EUR cents, JPY yen, KWD fils)."
)


def normalise_currency(code: str) -> str:
    """Return ``code`` upper-cased if it is an active ISO 4217 code; else raise ValueError."""
    upper = code.upper()
    if upper not in _EXPONENTS:
        raise ValueError(f"{code[:16]!r} is not an active ISO 4217 currency code")
    return upper


def minor_unit_exponent(code: str) -> int:
    """Digits after the decimal point in ``code``'s minor unit: JPY 0, EUR 2, KWD 3."""
    return _EXPONENTS[normalise_currency(code)]


class _ActiveCurrency:
    """Core schema: a JSON string, upper-cased, then one of ``ACTIVE_CURRENCIES`` (all Rust)."""

    def __get_pydantic_core_schema__(
        self, source: Any, handler: GetCoreSchemaHandler
    ) -> CoreSchema:
        return core_schema.custom_error_schema(
            core_schema.chain_schema(
                [
                    core_schema.str_schema(strict=True, to_upper=True, max_length=3),
                    core_schema.literal_schema(sorted(ACTIVE_CURRENCIES)),
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
            "pattern": "^[A-Za-z]{3}$",
            "description": CURRENCY_DESCRIPTION,
            "examples": ["EUR", "USD", "JPY"],
        }


CurrencyCode = Annotated[str, _ActiveCurrency()]
"""An active ISO 4217 code; lower case is normalised to upper case."""
