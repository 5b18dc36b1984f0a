"""Ids in paths: one segment each, whatever they hold.

An id may hold "/" (it is printable), sent in a path as %2F. The server decodes the path
before routing, so ``/v1/flows/team%2Fa`` would be ``/v1/flows/team/a``, no route. Each %2F
within a segment becomes ``SLASH_IN_SEGMENT`` instead, a character no id holds (it is not
printable), and the ``{name:id}`` convertor of the routes' paths turns it back into "/".
"""

from __future__ import annotations

from urllib.parse import unquote

from starlette.convertors import StringConvertor, register_url_convertor
from starlette.types import Scope

SLASH_IN_SEGMENT = "\ue000"


def keep_encoded_slashes(scope: Scope) -> None:
    """Route a request's path with each %2F kept within its segment."""
    raw: bytes = scope.get("raw_path") or b""
    if b"%2F" not in raw and b"%2f" not in raw:
        return
    path = raw.split(b"?", 1)[0].decode("ascii", "replace")
    scope["path"] = "/".join(
        unquote(segment).replace("/", SLASH_IN_SEGMENT) for segment in path.split("/")
    )


class IdConvertor(StringConvertor):
    """A path parameter: one segment, with the slashes it was sent with."""

    def convert(self, value: str) -> str:
        return value.replace(SLASH_IN_SEGMENT, "/")

    def to_string(self, value: str) -> str:
        return value.replace("/", SLASH_IN_SEGMENT)


# Before any route is declared: a path is compiled, convertors included, when its route is.
register_url_convertor("id", IdConvertor())
