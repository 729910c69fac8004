"""JsonObjectBody on a small FastAPI app with the failure of SGLang 0.5.17's OpenAI request
models (a ``mode="before"`` validator calling ``.get`` on the body): non-object JSON bodies get
a 400 naming the problem, everything else reaches the app unchanged (body, streaming,
disconnect), and other routes and methods are not looked at."""

import json

import pytest
from fastapi import FastAPI, Request
from fastapi.responses import StreamingResponse
from pydantic import BaseModel, model_validator
from starlette.testclient import TestClient

from sglang_dsv4.http_body import OBJECT_ROUTES, JsonObjectBody, is_json_type, not_an_object


class ChatLike(BaseModel):
    messages: list

    @model_validator(mode="before")
    @classmethod
    def _peek(cls, values):
        values.get("tool_choice")  # as SGLang's ChatCompletionRequest: AttributeError on a list
        return values


def _app(with_middleware: bool) -> FastAPI:
    app = FastAPI()

    @app.post("/v1/chat/completions")
    async def chat(req: ChatLike):
        return {"n": len(req.messages)}

    @app.post("/v1/completions")
    async def stream(raw: Request):
        body = await raw.json()

        async def chunks():
            for i in range(body["n"]):
                yield f"data: {i}\n\n"

        return StreamingResponse(chunks(), media_type="text/event-stream")

    @app.post("/other")
    async def other(raw: Request):
        return {"echo": await raw.json()}

    if with_middleware:
        app.add_middleware(JsonObjectBody)
    return app


NOT_OBJECTS = [
    ("[1, 2]", "array"),
    ('"x"', "string"),
    ("3", "number"),
    ("-2.5e3", "number"),
    ("null", "null"),
    ("true", "boolean"),
    (" \n [ ]", "array"),
    ("[{}]", "array"),
]
JSON = {"content-type": "application/json"}


@pytest.mark.parametrize("body,kind", NOT_OBJECTS)
def test_not_an_object_names_the_json_type(body, kind):
    assert not_an_object(body.encode()) == kind


@pytest.mark.parametrize("body", ['{"a": 1}', " {", "", "[1, 2", "nan", "\xff[", "{[}", "[" * 5000])
def test_objects_and_invalid_json_are_passed_on(body):
    assert not_an_object(body.encode("utf-8", "surrogateescape")) is None


def test_without_the_middleware_the_gap_is_a_500():
    client = TestClient(_app(False), raise_server_exceptions=False)
    assert client.post("/v1/chat/completions", content="[1, 2]", headers=JSON).status_code == 500


@pytest.mark.parametrize("body,kind", NOT_OBJECTS)
@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/completions"])
def test_non_object_bodies_get_a_400_naming_the_problem(path, body, kind):
    client = TestClient(_app(True), raise_server_exceptions=False)
    r = client.post(path, content=body, headers=JSON)
    assert r.status_code == 400
    assert r.json() == {
        "object": "error",
        "message": f"request body must be a JSON object, got {kind}",
        "type": "BadRequestError",
        "param": None,
        "code": 400,
    }


def test_objects_reach_the_app_unchanged():
    client = TestClient(_app(True), raise_server_exceptions=False)
    r = client.post("/v1/chat/completions", json={"messages": [1, 2, 3]})
    assert r.status_code == 200 and r.json() == {"n": 3}
    # FastAPI's own answers for invalid JSON and a wrong field stay as they were
    assert client.post("/v1/chat/completions", content="[1,", headers=JSON).status_code == 422
    assert client.post("/v1/chat/completions", json={"messages": 5}).status_code == 422


@pytest.mark.parametrize(
    "ctype,ok",
    [("application/json", True), ("Application/JSON; charset=utf-8", True),
     ("application/vnd.api+json", True), ("", False), ("text/plain", False),
     ("application/x-www-form-urlencoded", False), ("text/json", False)],
)  # fmt: skip
def test_json_content_types(ctype, ok):
    assert is_json_type(ctype) is ok


def test_a_content_type_that_is_not_json_gets_a_400_naming_it():
    form = {"content-type": "application/x-www-form-urlencoded"}  # what curl -d sends
    body = '{"messages": [1]}'
    # FastAPI hands the validator the raw bytes (strict content type): SGLang's 500
    bare = TestClient(_app(False), raise_server_exceptions=False)
    assert bare.post("/v1/chat/completions", content=body, headers=form).status_code == 500
    client = TestClient(_app(True), raise_server_exceptions=False)
    r = client.post("/v1/chat/completions", content=body, headers=form)
    assert r.status_code == 400
    assert r.json()["message"] == (
        "request body must be a JSON object sent as application/json, "
        "got Content-Type 'application/x-www-form-urlencoded'"
    )
    r = client.post("/v1/completions", content=body)
    assert r.status_code == 400 and r.json()["message"].endswith("got no Content-Type")
    r = client.post("/v1/chat/completions", content=body, headers={"content-type": "a/b+json"})
    assert r.status_code == 400  # only application/*+json is JSON to FastAPI


def test_streaming_response_after_replay():
    client = TestClient(_app(True))
    with client.stream("POST", "/v1/completions", json={"n": 4}) as r:
        text = "".join(r.iter_text())
    assert r.status_code == 200 and text == "".join(f"data: {i}\n\n" for i in range(4))


def test_other_routes_and_methods_are_not_looked_at():
    client = TestClient(_app(True))
    assert "/other" not in OBJECT_ROUTES
    assert client.post("/other", content="[1, 2]").json() == {"echo": [1, 2]}
    assert client.get("/v1/chat/completions").status_code == 405


async def _run(chunks, tail):
    """Drive the middleware by hand: the body arrives in ``chunks``; ``tail`` is what the
    server's receive returns afterwards. Returns what the app received and what was sent."""
    incoming = [{"type": "http.request", "body": c, "more_body": i < len(chunks) - 1}
                for i, c in enumerate(chunks)] + tail  # fmt: skip
    seen, sent = [], []

    async def receive():
        return incoming.pop(0)

    async def send(message):
        sent.append(message)

    async def app(scope, receive, send):
        while True:
            message = await receive()
            seen.append(message)
            if message["type"] == "http.disconnect":
                return

    scope = {"type": "http", "method": "POST", "path": "/v1/chat/completions",
             "headers": [(b"content-type", b"application/json")]}  # fmt: skip
    await JsonObjectBody(app)(scope, receive, send)
    return seen, sent


def test_chunked_body_and_disconnect_are_replayed_in_order():
    import asyncio

    chunks = [b'{"messages"', b": [1", b", 2]}"]
    seen, sent = asyncio.run(_run(chunks, [{"type": "http.disconnect"}]))
    assert [m.get("body") for m in seen[:3]] == chunks
    assert seen[3] == {"type": "http.disconnect"} and sent == []
    seen, sent = asyncio.run(_run([b"[1", b", 2]"], []))
    assert seen == [] and sent[0]["status"] == 400
    assert json.loads(sent[1]["body"])["message"].endswith("got array")
