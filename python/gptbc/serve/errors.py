"""The server's error model: every failure is an `ApiError`, answered in OpenAI's shape
{"error": {"message", "type", "param", "code"}} with the field at fault named; request bodies are parsed and
validated into the declared schema (schema.py) here, so a bad body is always one 400."""

from __future__ import annotations

import json
from typing import Any

from pydantic import BaseModel, ValidationError

from gptbc.runtime.async_engine import EngineDead, EngineStepError
from gptbc.serve import schema as S


class ApiError(Exception):
    """An HTTP error answered as {"error": {"message", "type", "param", "code"}}."""

    TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "invalid_request_error",
             405: "invalid_request_error", 413: "invalid_request_error", 422: "invalid_request_error"}

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.headers = headers or {}

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.TYPES.get(self.status, "server_error"),
                          "param": self.param, "code": self.code}}


def bad(param: str, message: str, code: str = "invalid_value") -> ApiError:
    return ApiError(400, f"{param}: {message}", param=param, code=code)


UNION_HELP = {"prompt": "must be a string, a list of strings, a list of token ids or a list of such lists",
              "stop": f"must be a string or a list of at most {S.MAX_STOPS} strings"}


def validation_error(errors: list[dict]) -> ApiError:
    """pydantic's errors as one 400 naming the first field at fault."""
    first = errors[0]
    loc = [x for x in first.get("loc", ()) if x != "body"]
    if first.get("type") == "json_invalid":
        return ApiError(400, f"request body: not valid JSON ({first.get('ctx', {}).get('error', '')})",
                        code="invalid_json")
    if not loc:
        return ApiError(400, "request body: must be a JSON object", code="invalid_json")
    param = str(loc[0])
    if len([e for e in errors if [x for x in e.get("loc", ()) if x != "body"][:1] == loc[:1]]) > 1:
        message = UNION_HELP.get(param, "has the wrong type")
    elif first.get("type") == "missing":
        message = "is required"
    else:
        inner = ".".join(str(x) for x in loc[1:] if not (isinstance(x, str) and "[" in x))
        message = (f"{inner}: " if inner else "") + first.get("msg", "is not valid")
        given = first.get("input")
        if isinstance(given, (int, float, bool)) or (isinstance(given, str) and len(given) < 40):
            message += f" (got {json.dumps(given)[:60]})"
    return bad(param, message)


def parse_json(raw: bytes) -> Any:
    """JSON → Python, any failure (bad UTF-8, nesting deeper than the parser's stack, a 5000-digit integer)
    a 400 instead of a 500."""
    try:
        return json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ApiError(400, f"request body: not valid JSON ({err})", code="invalid_json") from None
    except RecursionError:
        raise ApiError(400, "request body: JSON nested too deeply", code="invalid_json") from None
    except ValueError as err:  # e.g. an integer literal past Python's digit limit
        raise ApiError(400, f"request body: {err}", code="invalid_json") from None


def validate(model: type[BaseModel], body: Any) -> Any:
    if not isinstance(body, dict):
        raise ApiError(400, "request body: must be a JSON object", code="invalid_json")
    try:
        return model.model_validate(body)
    except ValidationError as err:
        raise validation_error(err.errors(include_url=False)) from None
    except RecursionError:
        raise ApiError(400, "request body: nested too deeply", code="invalid_json") from None


def engine_dead() -> ApiError:
    return ApiError(503, "the engine failed and the server is stopping; retry against a restarted server",
                    code="engine_dead")


def engine_error(err: Exception) -> ApiError:
    if isinstance(err, EngineDead):
        return engine_dead()
    if isinstance(err, EngineStepError):
        return ApiError(500, str(err), code="engine_step_failed")
    return ApiError(500, f"{type(err).__name__}: {err}", code="internal_error")
