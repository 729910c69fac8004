"""Generated requests over the ``/generate`` and OpenAI schemas, for the robustness fuzz check
(:func:`sglang_dsv4.server_checks.fuzz_server`).

Each :class:`Case` starts from a valid request of one endpoint (``/generate`` by text, by token
ids, as a batch; ``/v1/completions``; ``/v1/chat/completions``) and changes one to three of its
fields: a value of the wrong type, NaN / inf (as the JSON tokens ``NaN`` / ``Infinity`` and as
strings), huge / negative / zero numbers, empty and nested lists, invalid UTF-8 bytes, lone
surrogates, unknown fields, a missing required field, or a body that is not an object. Values
that would be valid and slow (a long generation, a long prompt) are kept out of the pools so
that every accepted request finishes in a few decode steps; the cases are a pure function of
the seed.
"""

import json
import random
from dataclasses import dataclass

__all__ = ["Case", "fuzz_cases"]

_RAW = "@@raw-bytes@@"  # replaced by invalid UTF-8 in the encoded body


@dataclass(frozen=True)
class Case:
    path: str
    body: bytes
    stream: bool
    note: str  # what was changed, for the report


_NAN, _INF = float("nan"), float("inf")
_HUGE = [2**31, 2**63, 2**64, 10**30, -(2**63) - 1]
_ANY = [
    None,
    True,
    0,
    -1,
    1.5,
    -0.0,
    _NAN,
    _INF,
    -_INF,
    "",
    "NaN",
    "Infinity",
    "x" * 300,
    [],
    [[]],
    [1, [2, [3]]],
    {},
    {"a": {"b": [None]}},
    _RAW,
    "\ud800",
    "🦜 ∂",
    *_HUGE,
]


def _nested(depth: int):
    v: list = []
    for _ in range(depth):
        v = [v]
    return v


def _pools(vocab: int, context: int) -> dict:
    """Field-specific edge values (added to the generic ones); large valid generation lengths
    are left out on purpose (module docstring)."""
    tiny = [0, 1, 2, 8, -1, -2, 2**31 - 1 + 1, "4", 4.0]  # max-tokens-like
    return {
        "max_new_tokens": tiny,
        "max_tokens": tiny,
        "min_new_tokens": [0, 1, 2, 3, 9, -1],
        "min_tokens": [0, 1, 9, -1],
        "temperature": [0, 1e-7, 1e-300, 1e300, 2, -0.5],
        "top_p": [0, 1e-9, 1, 1.01, -1],
        "top_k": [-1, 0, 1, vocab, vocab + 1, 2**30, 2**31],
        "min_p": [0, 1, 1.5, -0.1],
        "frequency_penalty": [-2, 2, 2.5],
        "presence_penalty": [-2, 2, -3],
        "repetition_penalty": [0, 1e-9, 2, 2.1],
        "n": [1, 2, 0, 65, 10**9, "2"],
        "stop": ["\n", ["\n", "."], [""], [1], ["a"] * 65, "x" * 2000, [None]],
        "stop_token_ids": [[1], [vocab], [-1], [], [1.5], ["1"]],
        "stop_regex": ["[a-z]+", "(", ["a|b"], "(a+)+$"],
        "logit_bias": [{"5": 100}, {"5": -101}, {"-1": 1}, {"x": 1}, {str(vocab): 1}, {"5": "x"}],
        "sampling_seed": [0, 2**63 - 1, 2**63, -5],
        "seed": [0, 2**63, -5],
        "stream_interval": [1, 0, -1],
        "json_schema": ['{"type": "string", "maxLength": 3}', "{", "[]", "true", '{"type": 5}'],
        "regex": ["[a-z]{1,3}", "(", "a**", ""],
        "ebnf": ['root ::= "ab" | "c"', "root ::= ", "nonsense"],
        "structural_tag": ["{}", "{", '{"type": "x"}'],
        "custom_params": [{"a": 1}, {"__req__": 1}, {"a": {"b": {"c": 1}}}, [1]],
        "return_logprob": [True, False, "yes"],
        "logprob_start_len": [-1, 0, 3, 4, 5, -2, context + 1],
        "top_logprobs_num": [0, 5, 1024, 1025, vocab, vocab + 1, 10**7],
        "token_ids_logprob": [[1, 2], [vocab], [[1], [2]], [-1]],
        "logprobs": [True, 0, 5, 21, 10**7],
        "top_logprobs": [0, 5, 20, 21, 10**7],
        "input_ids": [[5] * (context + 1), [vocab], [-1], [[5], []], [[5, 6], [7]], []],
        "text": ["", [], [""], ["a", "b"], "\x00\x01", "\ud800\udfff"],
        "prompt": ["", [], [5, 6], [[5], [6]], [vocab], [""]],
        "messages": [
            [],
            [{"role": "user"}],
            [{"role": "nobody", "content": "x"}],
            [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}],
            [{"role": "user", "content": 5}],
        ],
        "response_format": [
            {"type": "json_object"},
            {"type": "json_schema"},
            {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "integer"}}},
            {"type": "nope"},
        ],
        "rid": ["r", ["a", "b"], 5],
        "stream": [True],
        "lora_path": ["x", ["x", None]],
        "session_params": [{"id": "x"}, {"id": 5, "bogus": 1}],
        "image_data": ["x", ["x"]],
        "input_embeds": [[[0.0] * 4]],
        "priority": [0, 2**40],
        "return_hidden_states": [True, "full"],
        "custom_logit_processor": ["x"],
        "positional_embed_overrides": [{"a": 1}],
        "return_routed_experts": [True],
        "return_indexer_topk": [True],
        "bootstrap_room": [1, 2**70],
    }  # fmt: skip


_GEN_FIELDS = [
    "text", "input_ids", "return_logprob", "logprob_start_len", "top_logprobs_num",
    "token_ids_logprob", "stream", "rid", "lora_path", "session_params", "image_data",
    "input_embeds", "priority", "return_hidden_states", "custom_logit_processor",
    "positional_embed_overrides", "return_routed_experts", "return_indexer_topk", "bootstrap_room",
]  # fmt: skip
_SAMPLING_KEYS = [
    "max_new_tokens", "min_new_tokens", "temperature", "top_p", "top_k", "min_p",
    "frequency_penalty", "presence_penalty", "repetition_penalty", "n", "stop", "stop_token_ids",
    "stop_regex", "logit_bias", "sampling_seed", "stream_interval", "json_schema", "regex", "ebnf",
    "structural_tag", "custom_params", "ignore_eos", "skip_special_tokens", "no_stop_trim",
]  # fmt: skip
_OPENAI_FIELDS = [
    "max_tokens", "min_tokens", "temperature", "top_p", "top_k", "min_p", "frequency_penalty",
    "presence_penalty", "repetition_penalty", "n", "stop", "stop_token_ids", "logit_bias", "seed",
    "regex", "ebnf", "json_schema", "stream", "rid", "lora_path",
]  # fmt: skip


def _bases(model: str) -> list[tuple[str, dict, list[str]]]:
    """(path, a valid body, its mutable fields)."""
    sp = {"max_new_tokens": 2, "temperature": 0}
    gen = _GEN_FIELDS + [f"sampling_params.{k}" for k in _SAMPLING_KEYS]
    return [
        ("/generate", {"text": "To be, or not to be", "sampling_params": dict(sp)}, gen),
        ("/generate", {"input_ids": [5, 6, 7, 8], "sampling_params": dict(sp),
                       "return_logprob": True, "logprob_start_len": 0, "top_logprobs_num": 2}, gen),
        ("/generate", {"text": ["Once more", "unto the breach"],
                       "sampling_params": [dict(sp), dict(sp)]}, gen),
        ("/generate", {"input_ids": [[5, 6], [7, 8, 9]], "sampling_params": dict(sp)}, gen),
        ("/v1/completions", {"model": model, "prompt": "KING HENRY:", "max_tokens": 2,
                             "temperature": 0}, [*_OPENAI_FIELDS, "prompt", "logprobs"]),
        ("/v1/chat/completions", {"model": model, "max_tokens": 2,
                                  "messages": [{"role": "user", "content": "Who goes there?"}]},
         [*_OPENAI_FIELDS, "messages", "logprobs", "top_logprobs", "response_format"]),
    ]  # fmt: skip


def _value(rng: random.Random, field: str, pools: dict):
    key = field.rsplit(".", 1)[-1]
    own = pools.get(key, [])
    if key in ("max_new_tokens", "max_tokens"):  # never None: that means "to the context end"
        return rng.choice(own + [v for v in _ANY if v is not None])
    if own and rng.random() < 0.6:
        return rng.choice(own)
    return rng.choice([*_ANY, _nested(64)])


def _set(body: dict, field: str, value) -> None:
    if field.startswith("sampling_params."):
        key = field.split(".", 1)[1]
        params = body.get("sampling_params")
        if not isinstance(params, (dict, list)):  # the OpenAI schemas: a top-level field
            body[key] = value
        for p in params if isinstance(params, list) else [params]:
            if isinstance(p, dict):
                p[key] = value
    else:
        body[field] = value


def _mutate(rng: random.Random, body: dict, fields: list[str], pools: dict) -> list[str]:
    notes = []
    for _ in range(rng.choice((1, 1, 2, 3))):
        kind = rng.random()
        if kind < 0.8:
            field = rng.choice(fields)
            value = _value(rng, field, pools)
            _set(body, field, value)
            notes.append(f"{field}={_short(value)}")
        elif kind < 0.9:
            name = rng.choice(
                ["unknown_field", "sampling_params.unknown_key", "sampling_params.is_normalized"]
            )
            _set(body, name, rng.choice(_ANY))
            notes.append(f"+{name}")
        else:
            # never sampling_params / max_tokens: without them a request generates for long
            required = [
                k for k in ("text", "input_ids", "prompt", "messages", "model") if k in body
            ]
            gone = rng.choice(required or ["x"])
            body.pop(gone, None)
            notes.append(f"-{gone}")
    return notes


def _short(v) -> str:
    s = repr(v)
    return s if len(s) <= 40 else s[:37] + "..."


def _encode(body) -> bytes:
    raw = json.dumps(body, allow_nan=True, ensure_ascii=False).encode("utf-8", "surrogatepass")
    return raw.replace(f'"{_RAW}"'.encode(), b'"\xff\xfe bad utf-8 \xc3"')


def fuzz_cases(seed: int, count: int, vocab_size: int, context_len: int, model: str) -> list[Case]:
    rng = random.Random(seed)
    pools = _pools(vocab_size, context_len)
    bases = _bases(model)
    cases = []
    for _ in range(count):
        path, base, fields = rng.choice(bases)
        body = json.loads(json.dumps(base))
        if rng.random() < 0.03:
            body, notes = rng.choice([[], "x", None, 5, [body]]), ["body not an object"]
        else:
            notes = _mutate(rng, body, fields, pools)
        stream = isinstance(body, dict) and body.get("stream") is True
        cases.append(Case(path, _encode(body), stream, "; ".join(notes)))
    return cases
