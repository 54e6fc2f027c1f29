"""Every error the server returns, in OpenAI's shape, so that OpenAI clients raise their usual exceptions."""

import json
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

INVALID_REQUEST = "invalid_request_error"
SERVER_ERROR = "server_error"


class ApiError(Exception):
    """An error answered to the client: HTTP status, message, the request field at fault (if any), a code, headers."""

    def __init__(
        self,
        status: int,
        message: str,
        param: str | None = None,
        code: str | None = None,
        type: str = INVALID_REQUEST,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.type = type
        self.headers = headers

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        return _AsciiJSON(self.body(), status_code=self.status, headers=self.headers)


class _AsciiJSON(JSONResponse):
    """JSON with non-ASCII characters escaped: a message quoting what UTF-8 cannot encode is still sendable."""

    def render(self, content: Any) -> bytes:
        return json.dumps(content, separators=(",", ":")).encode("ascii")


def bad_request(message: str, param: str | None = None) -> ApiError:
    return ApiError(400, message, param)


def install_error_handlers(app: FastAPI) -> None:
    """Replace FastAPI's default error bodies (and its 422 for validation) with OpenAI's shape."""

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, error: ApiError) -> JSONResponse:
        return error.response()

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, error: RequestValidationError) -> JSONResponse:
        return validation_error(error.errors()).response()

    @app.exception_handler(HTTPException)
    async def _http(request: Request, error: HTTPException) -> JSONResponse:
        if error.status_code == 404:
            message = f"{request.method} {request.url.path}: no such endpoint; see /v1/models, /v1/completions, "
            message += "/v1/chat/completions and /v1/classify"
            return ApiError(404, message, code="not_found").response()
        if error.status_code == 405:
            return ApiError(405, f"{request.url.path} does not accept {request.method}").response()
        kind = INVALID_REQUEST if error.status_code < 500 else SERVER_ERROR
        return ApiError(error.status_code, str(error.detail), type=kind).response()


def server_failure(error: Exception) -> ApiError:
    """A 500 that tells the client only that it was not its fault; the traceback goes to the log."""
    return ApiError(
        500, f"the server failed on this request ({type(error).__name__}); see the server log", type=SERVER_ERROR
    )


def validation_error(errors: Any) -> ApiError:
    """The most telling pydantic error as a 400 naming the field at fault (`messages[0].content`)."""
    error = _most_telling(list(errors))
    kind = error.get("type")
    if kind == "json_invalid":
        detail = (error.get("ctx") or {}).get("error", "")
        return bad_request(f"the request body is not valid JSON{': ' + detail if detail else ''}")
    location = [part for part in error.get("loc", ()) if part != "body"]
    if not location and kind == "missing":
        return bad_request("the request body is empty: send a JSON object")
    if not location or kind == "model_attributes_type":
        return bad_request("the request body must be a JSON object, sent with Content-Type: application/json")
    param = field_path(location)
    message = "field required" if kind == "missing" else str(error.get("msg", "invalid value"))
    return bad_request(f"{param}: {message}" if param else message, param)


def _most_telling(errors: list[Any]) -> dict[str, Any]:
    """Skip 'not a string' from the string member of a union (`str | list[str]`) when its other member said more."""

    def field(error: Any) -> Any:
        return next((part for part in error.get("loc", ()) if part != "body"), None)

    for error in errors:
        said_more = any(other is not error and field(other) == field(error) for other in errors)
        string_member = any(_is_string_member(part) for part in error.get("loc", ()))
        if error.get("type") == "string_type" and string_member and said_more:
            continue
        return dict(error)
    return dict(errors[0]) if errors else {}


def _is_string_member(part: Any) -> bool:
    """`str`, or a validated string (`Text`), as pydantic names a union's string member in an error's location."""
    return part == "str" or (isinstance(part, str) and part.startswith("function-after[") and part.endswith(" str]"))


def field_path(location: list[Any]) -> str | None:
    """Pydantic's location as a field path: ['messages', 0, 'content'] -> messages[0].content.

    Union members that pydantic names in the location (str, list[str], function-after[...]) are left out.
    """
    path = ""
    for part in location:
        if isinstance(part, int):
            path += f"[{part}]"
        elif _is_field_name(part):
            path += f".{part}" if path else part
    return path or None


def _is_field_name(part: Any) -> bool:
    return isinstance(part, str) and part.replace("_", "").isalnum() and part not in ("str", "int", "list", "dict")
