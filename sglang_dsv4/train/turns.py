"""Synthetic thinking and tool-call conversations for the embedded model, written by SGLang's own
DSV4 chat encoder (``encoding_dsv4``) so that training text and served prompts are the same
strings.

* thinking turns: a speech of a training play as the user turn, ``<think>`` + a short
  reasoning that quotes its first words + ``</think>``, the next speech as the answer;
* tool-call turns: 1-3 of :data:`TOOLS` offered in the system message (rendered exactly as the
  server renders an OpenAI ``tools`` list), a user question built from a template, and the
  assistant's DSML tool call with the arguments copied from the question (half of them in
  thinking mode, with a reasoning before the call).

The tools and questions are a fixed, small set: the point is that ``reasoning_content`` and
``tool_calls`` of the OpenAI API come back from a real model, not that the model generalizes.
"""

from __future__ import annotations

import copy
import json

import numpy as np

__all__ = ["QUESTIONS", "TOOLS", "thinking_turn", "tool_call_turn"]


def _tool(name: str, description: str, **params: str) -> dict:
    return {
        "type": "function",
        "function": {
            "name": name,
            "description": description,
            "parameters": {
                "type": "object",
                "properties": {p: {"type": "string", "description": d} for p, d in params.items()},
                "required": list(params),
            },
        },
    }


TOOLS = {
    "get_weather": _tool("get_weather", "The weather in a city", city="name of the city"),
    "find_speech": _tool(
        "find_speech", "Find a speech of a character", character="the speaker's name"
    ),
    "send_letter": _tool(
        "send_letter", "Send a letter", to="the receiver's name", message="the letter's text"
    ),
}
# (tool, question template); the fields are filled from _VALUES and copied into the call
QUESTIONS = (
    ("get_weather", "What is the weather in {city}?"),
    ("get_weather", "Is it raining in {city} today?"),
    ("get_weather", "Tell me the weather of {city}."),
    ("find_speech", "Find me a speech of {character}."),
    ("find_speech", "What did {character} say?"),
    ("send_letter", "Send a letter to {to} saying {message}"),
    ("send_letter", "Write to {to}: {message}"),
)
_VALUES = {
    "city": ("Verona", "Padua", "Milan", "Venice", "Rome", "Athens", "Mantua", "Vienna"),
    "character": ("Romeo", "Juliet", "Othello", "Portia", "Macbeth", "Lear", "Rosalind", "Puck"),
    "to": ("Romeo", "Juliet", "Antonio", "Portia", "Bianca", "Benedick", "Olivia", "Orlando"),
    "message": (
        "come home at once.",
        "the king is dead.",
        "I shall be there by night.",
        "beware the ides of March.",
        "all is well in Padua.",
    ),
}  # fmt: skip


def _encoder():
    from sglang.srt.entrypoints.openai import encoding_dsv4

    return encoding_dsv4


def _served_tools(tools: list[dict]) -> list[dict]:
    """The tools as the server passes them to the encoder (``Tool.model_dump()``: key order and
    defaults such as ``strict`` appear in the rendered schema)."""
    from sglang.srt.entrypoints.openai.protocol import Tool

    return [Tool(**copy.deepcopy(t)).model_dump() for t in tools]


def tool_call_turn(rng: np.random.Generator, thinking: bool) -> str:
    """One encoded conversation: tools, a question, the assistant's tool call (+ EOS)."""
    name, template = QUESTIONS[int(rng.integers(len(QUESTIONS)))]
    fields = [f for f in _VALUES if "{" + f + "}" in template]
    args = {f: str(rng.choice(_VALUES[f])) for f in fields}
    others = [t for t in TOOLS if t != name]
    offered = [name, *rng.choice(others, size=int(rng.integers(0, 3)), replace=False)]
    offered = [TOOLS[t] for t in rng.permutation(offered)]
    call = {"type": "function", "function": {"name": name, "arguments": json.dumps(args)}}
    assistant = {"role": "assistant", "content": "", "tool_calls": [call]}
    if thinking:
        described = ", ".join(f"{k} {v}" for k, v in args.items())
        assistant["reasoning_content"] = f"The user asks for {name} with {described}."
    messages = [
        {"role": "system", "content": "", "tools": _served_tools(offered)},
        {"role": "user", "content": template.format(**args)},
        assistant,
    ]
    return _encoder().encode_messages(messages, thinking_mode="thinking" if thinking else "chat")


def thinking_turn(speech: str, reply: str) -> str:
    """One encoded thinking-mode conversation: speech, a reasoning quoting it, the reply."""
    opening = " ".join(speech.split()[:5])
    reasoning = f'The speech begins "{opening}". I answer it in verse.'
    messages = [
        {"role": "user", "content": speech},
        {"role": "assistant", "content": reply, "reasoning_content": reasoning},
    ]
    return _encoder().encode_messages(messages, thinking_mode="thinking")
