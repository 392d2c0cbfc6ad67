"""Errors the API answers with: JSON ``{"error": code, "detail": message}`` and a status."""

from __future__ import annotations

from fastapi.responses import JSONResponse


class ApiError(Exception):
    """An error the client caused (or overload); becomes ``{"error", "detail"}`` JSON."""

    def __init__(self, status: int, code: str, detail: str) -> None:
        super().__init__(detail)
        self.status, self.code, self.detail = status, code, detail


def error_response(status: int, code: str, detail: str) -> JSONResponse:
    """The JSON response of an error."""
    return JSONResponse({"error": code, "detail": detail}, status_code=status)
