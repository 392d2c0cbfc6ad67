"""Errors the API answers with: JSON ``{"error": code, "detail": message}`` and a status.

A request FastAPI refuses before the endpoint runs (a query parameter of the wrong type or out
of its range) gets the same shape: 422 with ``bad_<name>`` for the parameters listed in
``FIELD_CODES`` (``bad_beam``), else ``bad_request``, and one sentence per bad parameter naming
it, the value given and what it accepts.
"""

from __future__ import annotations

import types
import typing
from collections.abc import Sequence
from typing import Any

from fastapi.responses import JSONResponse

FIELD_CODES = {"beam": "bad_beam"}  # the codes the endpoints use for the same parameters
_PLACES = {
    "query": "query parameter",
    "path": "path parameter",
    "header": "header",
    "cookie": "cookie",
    "body": "body field",
}
_TYPES = {int: "an integer", float: "a number", str: "a string", bool: "true or false"}
_BOUNDS = {"ge": ">=", "gt": ">", "le": "<=", "lt": "<"}  # Query(ge=1), Field(lt=...), ...
_MAX_VALUE_CHARS = 60


class ApiError(Exception):
    """An error the client caused (or overload); becomes ``{"error", "detail"}`` JSON."""

    def __init__(self, status: int, code: str, detail: str) -> None:
        super().__init__(detail)
        self.status, self.code, self.detail = status, code, detail


def error_response(status: int, code: str, detail: str) -> JSONResponse:
    """The JSON response of an error."""
    return JSONResponse({"error": code, "detail": detail}, status_code=status)


def validation_error(errors: Sequence[dict], dependant: Any = None) -> ApiError:
    """The 422 ``ApiError`` of FastAPI's validation ``errors`` (``RequestValidationError
    .errors()``); the route's ``dependant`` (its parameters) says what each one accepts."""
    fields = _parameters(dependant)
    names = {_name(e.get("loc", ())) for e in errors}
    code = FIELD_CODES.get(names.pop(), "bad_request") if len(names) == 1 else "bad_request"
    sentences = dict.fromkeys(_sentence(e, fields) for e in errors)  # in order, no repeats
    return ApiError(422, code, "; ".join(sentences) or "the request is not valid")


def _parameters(dependant: Any) -> dict[tuple[str, str], Any]:
    """``(place, name) -> field`` of a route's parameters and its dependencies' parameters."""
    out: dict[tuple[str, str], Any] = {}
    if dependant is None:
        return out
    for place in ("query", "path", "header", "cookie"):
        for field in getattr(dependant, f"{place}_params", ()):
            out[(place, field.alias)] = field
    for sub in getattr(dependant, "dependencies", ()):
        out = _parameters(sub) | out
    return out


def _name(loc: Sequence[Any]) -> str:
    """The parameter an error's ``loc`` points at: ``("query", "beam")`` -> ``beam``."""
    return ".".join(str(part) for part in loc[1:]) or str(loc[0] if loc else "request")


def _sentence(error: dict, fields: dict[tuple[str, str], Any]) -> str:
    loc = tuple(error.get("loc", ()))
    if len(loc) < 2:  # the whole body, or no location
        subject = "the request body" if loc == ("body",) else "the request"
    else:
        subject = f"{_PLACES.get(str(loc[0]), str(loc[0]))} {_name(loc)}"
    if error.get("type") == "missing":
        return f"{subject} is required"
    allowed = _accepts(fields.get((str(loc[0]), str(loc[1])))) if len(loc) == 2 else None
    given = repr(error.get("input"))
    if len(given) > _MAX_VALUE_CHARS:
        given = given[: _MAX_VALUE_CHARS - 3] + "..."
    if allowed:
        return f"{subject} must be {allowed}, got {given}"
    return f"{subject} {_lower(error.get('msg', 'is not valid'))}, got {given}"


def _lower(msg: str) -> str:
    """Pydantic's "Input should be ..." as "should be ..."."""
    msg = msg.removeprefix("Input ")
    return msg[:1].lower() + msg[1:]


def _accepts(field: Any) -> str | None:
    """What a parameter accepts, from its type and bounds ("an integer >= 1"), or
    None when its type is not a plain int, float, str or bool."""
    if field is None:
        return None
    info = field.field_info
    kinds = [t for t in typing.get_args(info.annotation) if t is not type(None)]
    plain = kinds[0] if _is_union(info.annotation) and len(kinds) == 1 else info.annotation
    what = _TYPES.get(plain)
    if what is None:
        return None
    bounds = [
        f"{sign} {getattr(m, attr)}"
        for m in info.metadata  # annotated_types' Ge(ge=1), Le(le=10), ...
        for attr, sign in _BOUNDS.items()
        if getattr(m, attr, None) is not None
    ]
    return f"{what} {' and '.join(bounds)}" if bounds else what


def _is_union(annotation: Any) -> bool:
    return typing.get_origin(annotation) in (typing.Union, types.UnionType)
