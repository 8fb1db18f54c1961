"""OpenAI-shaped errors: `{"error": {"message", "type", "param", "code"}}` for every non-2xx answer.

Client mistakes are 4xx and never 5xx: validation errors (malformed JSON included) are 400 with `param` naming the
offending field; unknown model 404; unknown route 404; wrong method 405; auth 401/403; overload 429 with
Retry-After; a request the engine aborted because the server is stopping is a 503 (an error event in a stream).
Anything unexpected is a 500 with the same shape (and a log line), and the server keeps running and
keeps the client's connection open.
"""

from __future__ import annotations

import logging
from http import HTTPStatus
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from lkserve.engine.types import EngineStopped
from lkserve.gateway.protocol import ErrorInfo, ErrorResponse

log = logging.getLogger("lkserve.gateway")

# OpenAI's `type` values.
INVALID_REQUEST = "invalid_request_error"
AUTHENTICATION = "authentication_error"
PERMISSION = "permission_error"
NOT_FOUND = "not_found_error"
RATE_LIMIT = "rate_limit_error"
SERVER = "server_error"
UNAVAILABLE = "service_unavailable_error"


class APIError(Exception):
    """Raise anywhere in a handler to answer with an OpenAI-shaped error."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str = INVALID_REQUEST,
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ):
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.param = param
        self.code = code
        self.headers = headers


def bad_request(message: str, param: str | None = None, code: str | None = None) -> APIError:
    return APIError(400, message, param=param, code=code)


def _utf8(text: str | None) -> str | None:
    """A param can hold a client's invalid text (a dict key with a lone surrogate): escape it, or the body could
    not be encoded."""
    return None if text is None else text.encode("utf-8", "backslashreplace").decode("utf-8")


def error_body(message: str, type: str, param: str | None = None, code: str | None = None) -> dict[str, Any]:
    info = ErrorInfo(message=_utf8(message), type=type, param=_utf8(param), code=code)
    return ErrorResponse(error=info).model_dump()


def error_response(
    status: int,
    message: str,
    *,
    type: str = INVALID_REQUEST,
    param: str | None = None,
    code: str | None = None,
    headers: dict[str, str] | None = None,
) -> JSONResponse:
    return JSONResponse(error_body(message, type, param, code), status_code=status, headers=headers)


def api_error_response(exc: APIError) -> JSONResponse:
    return error_response(
        exc.status, exc.message, type=exc.type, param=exc.param, code=exc.code, headers=exc.headers
    )


def shutting_down(exc: BaseException) -> BaseException:
    """The engine aborted or refused a request because the server is stopping: a 503 the client may retry
    elsewhere (other exceptions pass through)."""
    if isinstance(exc, EngineStopped):
        return APIError(503, f"The server is shutting down ({exc}); retry the request.", type=UNAVAILABLE,
                        code="server_shutting_down")
    return exc


# pydantic's loc contains union-member tags ("str", "list[int]", "function-after[...]"); they are not params.
_TAG_PREFIXES = ("function-", "constrained-", "lax-", "json-", "tagged-union")
_TYPE_TAGS = {"str", "int", "float", "bool", "list", "dict", "none", "null", "json-or-python", "lax-or-strict"}


def _loc_to_param(loc: tuple[Any, ...]) -> str | None:
    parts: list[str] = []
    for item in loc[1:] if loc and loc[0] in ("body", "query", "path", "header") else loc:
        if isinstance(item, int):
            parts.append(f"[{item}]")
        elif isinstance(item, str):
            if "[" in item or "(" in item or item in _TYPE_TAGS or item.startswith(_TAG_PREFIXES):
                continue
            parts.append(("." if parts else "") + item)
    return "".join(parts) or None


_INVALID_TEXT = ("invalid_unicode", "string_unicode")


def _unicode_error(e: dict[str, Any]) -> dict[str, Any]:
    if e.get("type") == "string_unicode":  # "unable to parse raw data as a unicode string"
        return {**e, "msg": "text must be valid Unicode, found a lone UTF-16 surrogate"}
    return e


def _validation_message(errors: list[dict[str, Any]]) -> tuple[str, str | None, str | None]:
    """(message, param, code) from FastAPI/pydantic validation errors: the first error decides."""
    if not errors:
        return "invalid request", None, None
    # Text that is not valid Unicode is the most specific problem: a union's other members (list of token ids...)
    # only add "should be a list" noise. pydantic finds it itself in constrained strings (string_unicode), the
    # protocol's ValidUnicode in the others (invalid_unicode).
    errors = [_unicode_error(e) for e in errors if e.get("type") in _INVALID_TEXT] or errors
    first = errors[0]
    etype = first.get("type", "")
    if etype == "json_invalid":
        ctx = first.get("ctx") or {}
        detail = ctx.get("error")
        return f"We could not parse the JSON body of your request ({detail or 'invalid JSON'}).", None, "invalid_json"
    loc = tuple(first.get("loc", ()))
    param = _loc_to_param(loc)
    if etype == "missing" and loc == ("body",):
        return "The request body must be a JSON object.", None, "invalid_json"
    if loc == ("body",) and etype in ("model_attributes_type", "dict_type", "model_type"):
        return "The request body must be a JSON object.", None, "invalid_json"
    # A union reports one error per member; they all name the same param: list them together.
    same = [e for e in errors if _loc_to_param(tuple(e.get("loc", ()))) == param]
    msgs: list[str] = []
    for e in same:
        m = e.get("msg", "invalid value")
        if m not in msgs:
            msgs.append(m)
    if param is None:
        text = "; ".join(msgs[:3])
    elif etype == "missing":
        text = f"Missing required parameter: '{param}'."
    else:
        text = f"Invalid value for '{param}': " + "; or ".join(msgs[:4])
    others = {_loc_to_param(tuple(e.get("loc", ()))) for e in errors} - {param}
    if others:
        text += f" (and {len(others)} more invalid parameter{'s' if len(others) > 1 else ''})"
    return text, param, "invalid_value" if etype != "missing" else "missing_required_parameter"


def install_exception_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError) -> JSONResponse:
        return api_error_response(exc)

    @app.exception_handler(EngineStopped)
    async def _stopped(request: Request, exc: EngineStopped) -> JSONResponse:
        return api_error_response(shutting_down(exc))

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        message, param, code = _validation_message(list(exc.errors()))
        return error_response(400, message, param=param, code=code)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        status = exc.status_code
        try:
            phrase = HTTPStatus(status).phrase
        except ValueError:
            phrase = "error"
        message = exc.detail if isinstance(exc.detail, str) and exc.detail else phrase
        if status == 404:
            etype, code = NOT_FOUND, "not_found"
            message = f"{request.method} {request.url.path}: not found"
        elif status == 405:
            etype, code = INVALID_REQUEST, "method_not_allowed"
            message = f"method {request.method} not allowed on {request.url.path}"
        elif status < 500:
            etype, code = INVALID_REQUEST, None
        else:
            etype, code = SERVER, None
        return error_response(status, message, type=etype, code=code, headers=getattr(exc, "headers", None))


class UnexpectedErrors:
    """Outermost middleware: an unexpected exception becomes a 500 OpenAI-shaped body. Starlette's own last-resort
    handler answers 500 too but then re-raises, and uvicorn drops the keep-alive connection, so the client's next
    request on it fails with "connection reset". A response already started can only be cut short."""

    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        sent = {"started": False, "done": False}

        async def watched(message: Message) -> None:
            if message["type"] == "http.response.start":
                sent["started"] = True
            elif message["type"] == "http.response.body" and not message.get("more_body", False):
                sent["done"] = True
            await send(message)

        try:
            await self.app(scope, receive, watched)
        except Exception:
            log.exception("unhandled error on %s %s", scope.get("method"), scope.get("path"))
            if sent["done"]:
                return  # the client has its whole answer: keep the connection
            if sent["started"]:
                raise
            await error_response(500, "The server had an error while processing your request.", type=SERVER)(
                scope, receive, send)
