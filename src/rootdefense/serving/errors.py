"""Errors in OpenAI's shape: an HTTP status and ``{"error": {message, type, param, code}}``."""

from __future__ import annotations

from fastapi.responses import JSONResponse

# the OpenAI error type for each status the server answers with
TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
         405: "invalid_request_error", 408: "timeout_error", 413: "invalid_request_error",
         429: "rate_limit_error", 500: "server_error", 503: "service_unavailable"}


class APIError(Exception):
    """A request the server will not answer, said the way OpenAI says it."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.headers = headers or {}

    def body(self) -> dict:
        return error_body(self.status, self.message, self.param, self.code)

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


def error_body(status: int, message: str, param: str | None = None, code: str | None = None) -> dict:
    return {"error": {"message": message, "type": TYPES.get(status, "invalid_request_error"), "param": param,
                      "code": code}}


def bad(message: str, param: str | None = None, code: str | None = None) -> APIError:
    """A 400 naming the field at fault."""
    return APIError(400, message, param, code)
