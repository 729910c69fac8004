"""Synthetic training turns are what SGLang's DSV4 encoder and parsers expect."""

import json

import numpy as np

from sglang_dsv4.train.turns import QUESTIONS, TOOLS, thinking_turn, tool_call_turn


def test_tool_call_turn_parses_back_with_sglangs_deepseekv4_detector():
    from sglang.srt.entrypoints.openai.protocol import Tool
    from sglang.srt.function_call.deepseekv4_detector import DeepSeekV4Detector

    tools = [Tool(**t) for t in TOOLS.values()]
    rng = np.random.default_rng(0)
    for thinking in (False, True):
        for _ in range(5):
            text = tool_call_turn(rng, thinking)
            prompt, _, answer = text.rpartition("<｜Assistant｜>")
            assert "## Tools" in prompt and prompt.startswith("<｜begin▁of▁sentence｜>")
            head, _, call = answer.partition("</think>")
            assert head.startswith("<think>The user asks for") if thinking else head == ""
            call = call.removesuffix("<｜end▁of▁sentence｜>")
            parsed = DeepSeekV4Detector().detect_and_parse(call, tools)
            (item,) = parsed.calls
            args = json.loads(item.parameters)
            question = prompt.rpartition("<｜User｜>")[2]
            assert item.name in {name for name, _ in QUESTIONS}
            assert all(v in question for v in args.values()), (question, args)


def test_thinking_turn_wraps_the_reasoning():
    text = thinking_turn("Who goes there? Stand and unfold yourself.", "Long live the king!")
    assert text.endswith(
        '<｜Assistant｜><think>The speech begins "Who goes there? Stand and". '
        "I answer it in verse.</think>Long live the king!<｜end▁of▁sentence｜>"
    )
