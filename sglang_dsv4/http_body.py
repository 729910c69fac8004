"""An ASGI middleware that answers 400 to a JSON request body that is not an object.

SGLang 0.5.17's ``ChatCompletionRequest`` (and other OpenAI request models) have
``model_validator(mode="before")`` validators that call ``values.get(...)``. FastAPI runs them
while it validates the body, before any route handler or tokenizer-manager hook sees the
request, so a body such as ``[1, 2]``, ``"x"``, ``3`` or ``null`` raises ``AttributeError``
and the client gets a 500 (docs/robustness.md). Every route listed in :data:`OBJECT_ROUTES`
takes an object, so this middleware refuses any other JSON value there with an OpenAI-style
error. FastAPI (strict content type, as 0.165 defaults to) hands the same validators the raw
bytes when the content type is not JSON (``curl -d`` sends
``application/x-www-form-urlencoded``), another 500, so a POST there without a JSON content
type gets a 400 naming it as well. Why a middleware and not an exception handler for
``AttributeError``: the handler would also turn genuine server bugs on those routes into 400s;
this check looks at the body and its content type only.

Only the first non-blank byte is looked at for the common case: a body starting with ``{`` is
passed on without parsing (it is an object or invalid JSON, which FastAPI already answers).
Other bodies are parsed once; a body that is not valid JSON is passed on unchanged, so FastAPI
keeps its own 400 / 422 for it. The body is replayed to the app, and every later ``receive``
goes to the server's, so disconnect detection during streaming responses is unchanged.

No SGLang import: :mod:`sglang_dsv4.plugin` installs it on SGLang's app.
"""

import json

__all__ = ["OBJECT_ROUTES", "JsonObjectBody", "is_json_type", "not_an_object"]

# POST routes of SGLang 0.5.17's HTTP server whose body is one request object.
OBJECT_ROUTES = frozenset(
    {
        "/generate",
        "/v1/completions",
        "/v1/chat/completions",
        "/v1/embeddings",
        "/v1/responses",
        "/v1/score",
        "/v1/rerank",
        "/v1/tokenize",
        "/v1/detokenize",
        "/v1/messages",
        "/v1/messages/count_tokens",
        "/invocations",
    }
)

_BLANK = b" \t\r\n"


def not_an_object(body: bytes) -> str | None:
    """The JSON type of ``body`` when it is valid JSON but not an object, else None."""
    head = body.lstrip(_BLANK)[:1]
    if head in (b"", b"{"):
        return None
    try:
        value = json.loads(body)
    except (ValueError, RecursionError):  # not JSON: FastAPI answers it
        return None
    if isinstance(value, dict):
        return None
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, (int, float)):
        return "number"
    return "string" if isinstance(value, str) else "array"


def is_json_type(content_type: str) -> bool:
    """``application/json`` or ``application/*+json`` (parameters ignored): the content types
    FastAPI parses as JSON."""
    media = content_type.split(";", 1)[0].strip().lower()
    return media == "application/json" or (
        media.startswith("application/") and media.endswith("+json")
    )


class JsonObjectBody:
    """ASGI middleware: a POST to one of ``routes`` whose body is JSON but not an object gets
    400 ``{"object": "error", "message": "request body must be a JSON object, got <type>",
    "type": "BadRequestError", "param": null, "code": 400}`` (SGLang's ``ErrorResponse``); a
    POST there whose content type is not JSON gets the same 400 naming the content type."""

    def __init__(self, app, routes=OBJECT_ROUTES):
        self.app = app
        self.routes = routes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["method"] != "POST" or scope["path"] not in self.routes:
            await self.app(scope, receive, send)
            return
        ctype = dict(scope.get("headers") or []).get(b"content-type", b"").decode("latin-1")
        if not is_json_type(ctype):
            got = f"Content-Type {ctype!r}" if ctype else "no Content-Type"
            await _send_error(
                send, f"request body must be a JSON object sent as application/json, got {got}"
            )
            return
        messages, chunks = [], []
        while True:  # the whole body, as the route would read it anyway
            message = await receive()
            messages.append(message)
            if message["type"] != "http.request":
                break  # a disconnect: replayed as is
            chunks.append(message.get("body", b""))
            if not message.get("more_body", False):
                break
        kind = not_an_object(b"".join(chunks))
        if kind is not None:
            await _send_error(send, f"request body must be a JSON object, got {kind}")
            return

        async def replay():
            return messages.pop(0) if messages else await receive()

        await self.app(scope, replay, send)


async def _send_error(send, message: str) -> None:
    error = {"object": "error", "message": message, "type": "BadRequestError", "code": 400}
    body = json.dumps({**error, "param": None}).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": 400, "headers": headers})
    await send({"type": "http.response.body", "body": body})
