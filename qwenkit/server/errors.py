"""API errors in OpenAI's shape, `{"error": {"message", "type", "param", "code"}}`, and safe request reading.

`APIError` is raised anywhere in the server (it needs no web framework); app.py turns it into a response.
`read_request` reads a JSON body with a size limit and validates it against a pydantic model, so every kind of
bad input (size, content type, JSON, schema) becomes a 4xx with the offending field named, never a 500.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, TypeVar

from pydantic import BaseModel, ValidationError

if TYPE_CHECKING:
    from starlette.requests import Request

M = TypeVar("M", bound=BaseModel)

# Parts of a pydantic error location that name a type tried in a union, not a field ("str", "list[str]", ...).
_TYPE_TAGS = {"str", "int", "float", "bool", "dict", "list", "none"}


class APIError(Exception):
    """An error answered to the client: HTTP `status` plus OpenAI's error fields (and optional headers)."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.param = param
        self.code = code
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return error_body(self.message, self.type, self.param, self.code)


def error_body(message: str, type: str, param: str | None = None, code: str | None = None) -> dict[str, Any]:
    """The JSON body of every error this server sends."""
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def bad_request(message: str, param: str | None = None, code: str | None = None) -> APIError:
    return APIError(400, message, param=param, code=code)


def param_path(loc: tuple[int | str, ...]) -> str | None:
    """`("messages", 0, "content", "str")` -> `"messages[0].content"` (union member tags are dropped)."""
    path = ""
    for part in loc:
        if isinstance(part, int):
            path += f"[{part}]"
        elif part in _TYPE_TAGS or "[" in part or "-" in part or part[:1].isupper():
            continue
        else:
            path += f".{part}" if path else part
    return path or None


def from_validation_error(exc: ValidationError) -> APIError:
    """A 400 naming the first invalid field, with pydantic's reason.

    When a field accepts several types (e.g. a string or a list of strings) pydantic reports one error per type;
    the deepest of them names the offending element best (`stop[0]` rather than `stop`).
    """
    errors = exc.errors(include_url=False)
    first = errors[0]
    if first["type"] == "json_invalid":
        return bad_request(f"The request body is not valid JSON: {first['msg']}", code="invalid_json")
    top = first["loc"][:1]
    same_field = [e for e in errors if e["loc"][:1] == top]
    best = max(same_field, key=lambda e: len(param_path(tuple(e["loc"])) or ""))
    param = param_path(tuple(best["loc"]))
    if param is None:
        return bad_request(f"Invalid request body: {first['msg']}; send a JSON object.")
    return bad_request(f"Invalid value for '{param}': {best['msg']}.", param=param)


async def read_body(request: Request, max_bytes: int) -> bytes:
    """The raw body, refused with 413 past `max_bytes` (by Content-Length, or while reading a chunked body)."""
    declared = request.headers.get("content-length")
    too_big = APIError(
        413,
        f"The request body is larger than this server's limit of {max_bytes} bytes; send a smaller request.",
        code="request_too_large",
    )
    if declared is not None and declared.isdigit() and int(declared) > max_bytes:
        raise too_big
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > max_bytes:
            raise too_big
        chunks.append(chunk)
    return b"".join(chunks)


async def read_request(request: Request, model: type[M], max_bytes: int) -> M:
    """Read and validate a JSON request body as `model`."""
    content_type = request.headers.get("content-type", "")
    if content_type.split(";")[0].strip().lower() != "application/json":
        raise bad_request(
            f"Unsupported Content-Type {content_type[:80]!r}; send the body as JSON with "
            "'Content-Type: application/json'.",
            code="unsupported_content_type",
        )
    body = await read_body(request, max_bytes)
    try:
        return model.model_validate_json(body)
    except ValidationError as exc:
        raise from_validation_error(exc) from None
