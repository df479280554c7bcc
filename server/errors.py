"""One error type for the API, and the one place where engine errors become HTTP statuses.

Every error body, JSON or SSE, has OpenAI's shape: {"error": {"message", "type", "param", "code"}}.
"""

from __future__ import annotations

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

from runtime.engine.async_llm import ClientTooSlowError, EngineShuttingDownError
from runtime.engine.core_client import EngineDeadError
from runtime.engine.params import ParamError
from runtime.engine.scheduler import OverloadedError


class APIError(Exception):
    def __init__(self, status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers or {}

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param,
                          "code": self.code or str(self.status)}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


def api_error(e: Exception) -> APIError:
    """The HTTP form of anything a request can raise; an unexpected exception is a 500."""
    if isinstance(e, APIError):
        return e
    if isinstance(e, ParamError):  # RequestTooLongError too
        return APIError(400, str(e), param=e.param)
    if isinstance(e, OverloadedError):
        return APIError(429, f"server overloaded: {e or 'too many waiting requests'}; retry later",
                        "overloaded_error", code="429", headers={"Retry-After": "1"})
    if isinstance(e, EngineShuttingDownError):
        return APIError(503, str(e), "service_unavailable", code="503", headers={"Retry-After": "5"})
    if isinstance(e, ClientTooSlowError):
        return APIError(408, str(e), "timeout_error", code="408")
    if isinstance(e, EngineDeadError):
        return APIError(503, str(e), "engine_dead_error", code="503")
    return APIError(500, f"internal error: {type(e).__name__}: {e}", "internal_error", code="500")


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def _api_error(request: Request, e: APIError) -> JSONResponse:
        return e.response()

    @app.exception_handler(HTTPException)  # routing errors (unknown path, wrong method), OpenAI-shaped too
    async def _http_error(request: Request, e: HTTPException) -> JSONResponse:
        kind = "not_found_error" if e.status_code == 404 else "invalid_request_error"
        return APIError(e.status_code, str(e.detail), kind, headers=dict(e.headers or {})).response()  # e.g. Allow on a 405

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, e: RequestValidationError) -> JSONResponse:
        first = e.errors()[0] if e.errors() else {}
        param = ".".join(str(p) for p in first.get("loc", ())[1:]) or None
        return APIError(400, f"{param or 'body'}: {first.get('msg', 'invalid request')}", param=param).response()
