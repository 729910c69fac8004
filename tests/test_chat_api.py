"""The OpenAI chat API on ``--model dsv4`` through the ``openai`` client: SGLang's DSV4
reasoning and tool-call parsers are on by default, and the shipped model was fine-tuned on the
thinking and DSML tool-call turns of ``sglang_dsv4/train/turns.py``: thinking mode answers with
``reasoning_content`` and then ``content``, ``tools`` alone get ``tool_calls`` (streamed too),
a required tool call (``tool_choice`` naming the function, decoded under SGLang's DSV4
structural-tag constraint) streams as ``tool_calls``, and a plain chat has neither."""

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
    yield openai.OpenAI(base_url=srv.url + "/v1", api_key="none", timeout=600, max_retries=0)
    srv.stop()


def chat(client, content, **kw):
    messages = [{"role": "user", "content": content}]
    return client.chat.completions.create(
        model="dsv4", messages=messages, max_tokens=96, temperature=0, **kw
    )


@pytest.mark.server
def test_thinking_gives_reasoning_content_then_content(client):
    """Thinking mode: the model closes its thinking; the text between ``<think>`` and
    ``</think>`` comes back as ``reasoning_content``, the answer after it as ``content``."""
    msg = chat(client, "Who goes there?", extra_body=THINKING).choices[0].message
    assert msg.reasoning_content and "think>" not in msg.reasoning_content, msg
    assert msg.content and "think>" not in msg.content, msg


@pytest.mark.server
def test_thinking_streams_reasoning_then_content(client):
    reasoning, content = "", ""
    for chunk in chat(client, "What news from Verona?", extra_body=THINKING, stream=True):
        delta = chunk.choices[0].delta if chunk.choices else None
        reasoning += (getattr(delta, "reasoning_content", None) or "") if delta else ""
        content += (delta.content or "") if delta else ""
    assert reasoning and content and "think>" not in reasoning + content


@pytest.mark.server
@pytest.mark.parametrize(
    "question", ["Is it raining in Padua today?", "What is the weather in Rome?"]
)
def test_tools_alone_give_tool_calls(client, question):
    """``tools`` without ``tool_choice``: the model itself writes a DSML tool call, which the
    deepseekv4 parser returns as ``tool_calls`` with JSON arguments (the tiny model does not
    reliably copy the city: only the call's shape is checked)."""
    msg = chat(client, question, tools=WEATHER).choices[0].message
    assert msg.tool_calls and msg.tool_calls[0].function.name == "get_weather", msg
    assert set(json.loads(msg.tool_calls[0].function.arguments)) == {"city"}, msg


@pytest.mark.server
def test_tools_alone_stream_as_tool_calls(client):
    name, arguments = "", ""
    for chunk in chat(client, "Tell me the weather of Athens.", tools=WEATHER, stream=True):
        calls = (chunk.choices[0].delta.tool_calls if chunk.choices else None) or []
        name += "".join(call.function.name or "" for call in calls)
        arguments += "".join(call.function.arguments or "" for call in calls)
    assert name == "get_weather" and set(json.loads(arguments)) == {"city"}


@pytest.mark.server
def test_plain_chat_has_neither(client):
    msg = chat(client, "What news from Verona?").choices[0].message
    assert msg.content and not msg.reasoning_content and not msg.tool_calls, msg


@pytest.mark.server
def test_required_tool_call_streams_as_tool_calls(client):
    """A required tool call (structural-tag constrained decoding, which on CPU needs the
    plugin's bitmask hooks) streams through the deepseekv4 parser as ``tool_calls`` deltas."""
    name = ""
    question = "Is it raining in Padua today?"
    for chunk in chat(client, question, tools=WEATHER, tool_choice=CALL, stream=True):
        calls = (chunk.choices[0].delta.tool_calls if chunk.choices else None) or []
        name += "".join(call.function.name or "" for call in calls)
    assert name == "get_weather"
