"""The OpenAI chat API on ``--model dsv4`` through the ``openai`` client, streaming and not:
SGLang's DSV4 reasoning and tool-call parsers are on by default, so thinking mode answers with
``reasoning_content`` and a required tool call (``tool_choice`` naming the function, decoded
under SGLang's DSV4 structural-tag constraint) comes back as ``tool_calls``; a plain chat has
neither."""

import json

import pytest

from sglang_dsv4.train.turns import TOOLS

WEATHER = [TOOLS["get_weather"]]
THINKING = {"chat_template_kwargs": {"thinking": True}}
CALL = {"type": "function", "function": {"name": "get_weather"}}


@pytest.fixture(scope="module")
def client(tmp_path_factory):
    import openai
    from server import Server

    log = tmp_path_factory.mktemp("logs") / "chat_api.log"
    srv = Server(["--model", "dsv4", "--sleep-on-idle"], log, timeout=900)
    yield openai.OpenAI(base_url=srv.url + "/v1", api_key="none", timeout=300)
    srv.stop()


def chat(client, content, **kw):
    messages = [{"role": "user", "content": content}]
    return client.chat.completions.create(
        model="dsv4", messages=messages, max_tokens=96, temperature=0, **kw
    )


def check_weather_call(name: str, arguments: str) -> None:
    assert name == "get_weather"
    args = json.loads(arguments)
    assert set(args) == {"city"} and args["city"], arguments


@pytest.mark.server
def test_required_tool_gives_tool_calls(client):
    msg = chat(client, "What is the weather in Verona?", tools=WEATHER, tool_choice=CALL)
    msg = msg.choices[0]
    assert msg.finish_reason == "tool_calls", msg
    (call,) = msg.message.tool_calls
    check_weather_call(call.function.name, call.function.arguments)
    print("tool call:", call.function.arguments)


@pytest.mark.server
def test_thinking_gives_reasoning_content(client):
    msg = chat(client, "Who goes there?", extra_body=THINKING).choices[0].message
    assert msg.reasoning_content and "</think>" not in msg.reasoning_content, msg
    assert msg.content and "<think>" not in msg.content, msg
    print("reasoning:", msg.reasoning_content, "| answer:", msg.content)


@pytest.mark.server
def test_plain_chat_has_neither(client):
    msg = chat(client, "What news from Verona?").choices[0].message
    assert msg.content and not msg.reasoning_content and not msg.tool_calls, msg


@pytest.mark.server
def test_streaming_tool_calls_and_reasoning(client):
    name, arguments = "", ""
    question = "Is it raining in Padua today?"
    for chunk in chat(client, question, tools=WEATHER, tool_choice=CALL, stream=True):
        calls = (chunk.choices[0].delta.tool_calls if chunk.choices else None) or []
        for call in calls:
            name += call.function.name or ""
            arguments += call.function.arguments or ""
    check_weather_call(name, arguments)
    reasoning, content = "", ""
    for chunk in chat(client, "Who goes there?", stream=True, extra_body=THINKING):
        delta = chunk.choices[0].delta if chunk.choices else None
        reasoning += getattr(delta, "reasoning_content", None) or ""
        content += (delta.content or "") if delta else ""
    assert reasoning and content and "</think>" not in reasoning + content
