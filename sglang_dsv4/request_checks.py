"""Checks of a generate request before it can reach the scheduler (issue 19).

SGLang 0.5.17 hands most per-request fields to the scheduler with no type or range check: the
scheduler decodes its input with typed msgspec structs and builds sampling / logprob tensors
from the values, and any exception there (``torch.topk`` past the vocabulary, an int32
overflow of ``top_k``, a wrongly typed field failing to decode) kills the scheduler, which takes
the whole server and every request in flight with it. These checks run in the tokenizer
manager (the plugin calls them, see :mod:`sglang_dsv4.plugin`) and raise :class:`RequestError`,
a ``ValueError``, which SGLang answers with HTTP 400; every message names the field and the
allowed values. docs/robustness.md lists each check and the gap it covers.

* :func:`check_generate_request`: the whole request as it arrives (before SGLang normalizes a
  batch, which itself fails with a 500 on a malformed shape), so a batch is refused as a whole
  before any of its prompts is sent;
* :func:`check_prompt`: one request after tokenization (token ids, logprob start vs prompt).

Nothing here imports SGLang: a request is read through the attribute names of its
``GenerateReqInput``.
"""

import json
import math
import re
from dataclasses import dataclass

__all__ = [
    "MAX_N",
    "MAX_TOP_LOGPROBS",
    "Limits",
    "RequestError",
    "check_generate_request",
    "check_prompt",
]

INT32_MAX = 2**31 - 1
INT64_MAX = 2**63 - 1
TOP_K_ALL = 1 << 30  # SGLang's "whole vocabulary" top_k (sampling_params.TOP_K_ALL)
# Top logprobs come back for every returned position: a cap keeps an answer's size bounded
# (top_logprobs_num = vocab over a long prompt is gigabytes of JSON).
MAX_TOP_LOGPROBS = 1024
MAX_N = 64  # parallel samples per prompt: each one is a request of its own in the scheduler
MAX_STOPS = 64  # stop strings / stop regexes per request
MAX_LOGIT_BIAS = 100.0  # as OpenAI: |bias| <= 100


class RequestError(ValueError):
    """A request the server refuses; SGLang turns a ``ValueError`` into HTTP 400."""


@dataclass(frozen=True)
class Limits:
    """What a request is checked against, read from the running server."""

    vocab_size: int
    context_len: int
    has_grammar: bool  # a grammar backend (structured output) is loaded
    greedy_only: bool = False  # speculative decoding on CPU: SGLang samples it on CUDA only

    @property
    def max_top_logprobs(self) -> int:
        return min(self.vocab_size, MAX_TOP_LOGPROBS)


# --- value checks -------------------------------------------------------------------------


def _show(v) -> str:
    s = repr(v)
    return s if len(s) <= 60 else s[:57] + "..."


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def check_int(name: str, v, lo: int, hi: int) -> None:
    if not (_is_int(v) and lo <= v <= hi):
        raise RequestError(f"{name} must be an integer in [{lo}, {hi}], got {_show(v)}")


def check_number(name: str, v, lo: float, hi: float, *, lo_open: bool = False) -> None:
    """A finite real in [lo, hi] (or (lo, hi]); NaN and +-inf are refused."""
    ok = isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
    ok = ok and (lo < v if lo_open else lo <= v) and v <= hi
    if not ok:
        bound = "(" if lo_open else "["
        hi_s = "inf)" if math.isinf(hi) else f"{hi:g}]"
        raise RequestError(
            f"{name} must be a finite number in {bound}{lo:g}, {hi_s}, got {_show(v)}"
        )


def check_bool(name: str, v) -> None:
    if not isinstance(v, bool):
        raise RequestError(f"{name} must be true or false, got {_show(v)}")


def check_str(name: str, v, *, empty: bool = False) -> None:
    if not isinstance(v, str) or (not empty and not v):
        raise RequestError(
            f"{name} must be a {'' if empty else 'non-empty '}string, got {_show(v)}"
        )


def check_token_ids(name: str, ids, vocab: int, *, empty: bool = False) -> None:
    if not isinstance(ids, list) or (not empty and not ids):
        raise RequestError(f"{name} must be a non-empty list of token ids, got {_show(ids)}")
    # builtins first: prompts of many thousand ids come through here
    if all(type(t) is int for t in ids) and (not ids or (min(ids) >= 0 and max(ids) < vocab)):
        return
    bad = next(t for t in ids if not (_is_int(t) and 0 <= t < vocab))
    raise RequestError(
        f"{name} contains token id {_show(bad)}, outside the vocabulary [0, {vocab})"
    )


def _str_list(name: str, v, check_one) -> None:
    """A string or a list of at most ``MAX_STOPS`` strings, each passing ``check_one``."""
    items = [v] if isinstance(v, str) else v
    if not isinstance(items, list) or len(items) > MAX_STOPS:
        raise RequestError(
            f"{name} must be a string or a list of at most {MAX_STOPS} strings, got {_show(v)}"
        )
    for s in items:
        check_str(name, s)
        check_one(s)


def _regex(name: str):
    def one(s: str) -> None:
        try:
            re.compile(s)
        except (re.error, RecursionError, OverflowError) as e:
            raise RequestError(
                f"{name} {_show(s)} is not a valid regular expression: {e}"
            ) from None

    return one


def _json_text(name: str, v) -> None:
    check_str(name, v)
    try:
        spec = json.loads(v)
    except (ValueError, RecursionError) as e:
        raise RequestError(
            f"{name} must be a JSON document (a string), got invalid JSON: {e}"
        ) from None
    if not isinstance(spec, (dict, bool)):
        raise RequestError(f"{name} must be a JSON object, got {_show(spec)}")


# --- sampling parameters ------------------------------------------------------------------


def _logit_bias(name: str, v, lim: Limits) -> None:
    if not isinstance(v, dict) or len(v) > lim.vocab_size:
        raise RequestError(f"{name} must be an object {{token id: bias}}, got {_show(v)}")
    for key, bias in v.items():
        if not (isinstance(key, str) and key.isascii() and key.isdigit() and len(key) <= 9):
            raise RequestError(f"{name} keys must be token ids (decimal strings), got {_show(key)}")
        check_int(f"{name} token id", int(key), 0, lim.vocab_size - 1)
        check_number(f"{name}[{key}]", bias, -MAX_LOGIT_BIAS, MAX_LOGIT_BIAS)


def _scalar(v) -> bool:
    ok_num = not isinstance(v, float) or math.isfinite(v)
    return ok_num and (v is None or isinstance(v, (bool, int, float, str)))


def _custom_params(name: str, v, lim: Limits) -> None:
    """SGLang's ``CustomParamValue``: a JSON scalar, a list of scalars or an object of scalars
    (the scheduler decodes it with that type and adds its own ``__req__`` key to the dict)."""
    ok = isinstance(v, dict) and all(isinstance(k, str) and k != "__req__" for k in v)
    for x in v.values() if ok else ():
        nested = x if isinstance(x, list) else list(x.values()) if isinstance(x, dict) else [x]
        ok = ok and all(_scalar(y) for y in nested)
        ok = ok and (not isinstance(x, dict) or all(isinstance(k, str) for k in x))
    if not ok:
        raise RequestError(
            f"{name} must be an object of JSON scalars, lists or objects of scalars, got {_show(v)}"
        )


def _stop_token_ids(name: str, v, lim: Limits) -> None:
    # SGLang's min_new_tokens penalizer scatters these into a vocabulary-sized row
    check_token_ids(name, v, lim.vocab_size, empty=True)


def _top_k(name: str, v, lim: Limits) -> None:
    # the scheduler packs top_k into an int32 tensor; larger than the vocabulary means all
    if v != -1:
        check_int(name, v, 1, TOP_K_ALL)


_GRAMMARS = ("json_schema", "regex", "ebnf", "structural_tag")

# key -> check(name, value, limits); None values mean "SGLang's default" and are not checked
_SAMPLING = {
    "max_new_tokens": lambda n, v, lim: check_int(n, v, 0, INT32_MAX),
    "min_new_tokens": lambda n, v, lim: check_int(n, v, 0, INT32_MAX),
    "temperature": lambda n, v, lim: check_number(n, v, 0.0, math.inf),
    "top_p": lambda n, v, lim: check_number(n, v, 0.0, 1.0, lo_open=True),
    "top_k": _top_k,
    "min_p": lambda n, v, lim: check_number(n, v, 0.0, 1.0),
    "frequency_penalty": lambda n, v, lim: check_number(n, v, -2.0, 2.0),
    "presence_penalty": lambda n, v, lim: check_number(n, v, -2.0, 2.0),
    "repetition_penalty": lambda n, v, lim: check_number(n, v, 0.0, 2.0, lo_open=True),
    "n": lambda n, v, lim: check_int(n, v, 1, MAX_N),
    "stop": lambda n, v, lim: _str_list(n, v, lambda s: None),
    "stop_regex": lambda n, v, lim: _str_list(n, v, _regex(n)),
    "stop_token_ids": _stop_token_ids,
    "json_schema": lambda n, v, lim: _json_text(n, v),
    "structural_tag": lambda n, v, lim: _json_text(n, v),
    "regex": lambda n, v, lim: check_str(n, v),
    "ebnf": lambda n, v, lim: check_str(n, v),
    "ignore_eos": lambda n, v, lim: check_bool(n, v),
    "skip_special_tokens": lambda n, v, lim: check_bool(n, v),
    "spaces_between_special_tokens": lambda n, v, lim: check_bool(n, v),
    "no_stop_trim": lambda n, v, lim: check_bool(n, v),
    # the scheduler streams when len(output) % stream_interval hits: a positive int
    "stream_interval": lambda n, v, lim: check_int(n, v, 1, INT32_MAX),
    "logit_bias": _logit_bias,
    "sampling_seed": lambda n, v, lim: check_int(n, v, 0, INT64_MAX),
    "custom_params": _custom_params,
}


def check_sampling_params(params, lim: Limits, name: str = "sampling_params") -> None:
    """One request's ``sampling_params`` object: known keys only (an unknown key fails in
    SGLang's constructor with a 500; the internal ``stop_strs`` / ``is_normalized`` ones would
    skip its normalization), each value of the type the scheduler decodes and in range."""
    if not isinstance(params, dict):
        raise RequestError(f"{name} must be an object, got {_show(params)}")
    unknown = sorted(k for k in params if k not in _SAMPLING)
    if unknown:
        raise RequestError(
            f"{name} has unknown key(s) {_show(unknown)}; allowed: {', '.join(_SAMPLING)}"
        )
    for key, value in params.items():
        if value is not None:
            _SAMPLING[key](f"{name}.{key}" if name != "sampling_params" else key, value, lim)
    lo, hi = params.get("min_new_tokens"), params.get("max_new_tokens")
    if lo is not None and hi is not None and lo > hi:
        raise RequestError(f"min_new_tokens must be in [0, max_new_tokens={hi}], got {lo}")
    grammars = [k for k in _GRAMMARS if params.get(k) is not None]
    if len(grammars) > 1:
        raise RequestError(f"only one of {', '.join(_GRAMMARS)} can be set, got {grammars}")
    if grammars and not lim.has_grammar:
        raise RequestError(
            f"{grammars[0]} (structured output) needs a grammar backend, and this server has "
            "none (it runs with --skip-tokenizer-init or --grammar-backend none)"
        )


# --- the request as a whole ---------------------------------------------------------------

_TEXT_ONLY = "DSV4 models take text only (no image, video or audio input)"
_NO_DISAGG = "prefill / decode disaggregation is not supported by the DSV4 plugin"
_INTERNAL = "an internal field of SGLang's encoder disaggregation, not part of the API"
# field -> why it is refused whenever it is set (not None / False / empty)
_UNSUPPORTED = {
    "input_embeds": "the DSV4 model takes token ids (send text or input_ids)",
    "image_data": _TEXT_ONLY,
    "video_data": _TEXT_ONLY,
    "audio_data": _TEXT_ONLY,
    "mm_hashes": _TEXT_ONLY,
    "lora_path": "LoRA adapters are not supported by the DSV4 plugin",
    "lora_id": "LoRA adapters are not supported by the DSV4 plugin",
    "session_params": "sessions are not supported by the DSV4 plugin",
    "session_id": "sessions are not supported by the DSV4 plugin",
    "positional_embed_overrides": "the DSV4 model takes token ids, not embedding overrides",
    "multi_item_delimiter_indices": "multi-item scoring is not supported by the DSV4 plugin",
    "return_routed_experts": "the DSV4 plugin's MoE does not record routed experts",
    "return_indexer_topk": "the DSV4 plugin's indexer does not record its top-k",
    "bootstrap_host": _NO_DISAGG,
    "bootstrap_port": _NO_DISAGG,
    "bootstrap_room": _NO_DISAGG,
    "bootstrap_pair_key": _NO_DISAGG,
    "decode_tp_size": _NO_DISAGG,
    "disagg_prefill_dp_rank": _NO_DISAGG,
    "need_wait_for_mm_inputs": _INTERNAL,
    "num_items_assigned": _INTERNAL,
    "mm_data_mooncake": _INTERNAL,
    "encoder_urls": _INTERNAL,
}


def _is_set(v) -> bool:
    if isinstance(v, (list, tuple)):
        return any(_is_set(x) for x in v)
    return v is not None and v is not False and v != {} and v != ""


def _batch_size(req, lim: Limits) -> int | None:
    """The number of prompts of a batch, None for a single prompt (whose token ids, when given,
    are checked here too)."""
    text, ids = getattr(req, "text", None), getattr(req, "input_ids", None)
    if (text is None) == (ids is None):
        raise RequestError("exactly one of text and input_ids must be given")
    if text is not None:
        if isinstance(text, str):
            check_str("text", text)
            return None
        if not isinstance(text, list) or not text:
            raise RequestError(
                f"text must be a string or a non-empty list of strings, got {_show(text)}"
            )
        for t in text:
            check_str("text (each prompt)", t)
        return len(text)
    if isinstance(ids, list) and ids and all(isinstance(x, list) for x in ids):
        for one in ids:
            check_token_ids("input_ids (each prompt)", one, lim.vocab_size)
        return len(ids)
    check_token_ids("input_ids", ids, lim.vocab_size)
    return None


def _per_prompt(req, name: str, batch: int | None) -> list:
    """The values of a field that is one value, or one per prompt of a batch."""
    v = getattr(req, name, None)
    if not isinstance(v, list):
        return [v]
    if batch is None:
        raise RequestError(f"{name} must be a single value for a single prompt, got a list")
    if len(v) != batch:
        raise RequestError(f"{name} has {len(v)} values for a batch of {batch} prompts")
    return v


def _check_logprob_fields(req, batch: int | None, lim: Limits) -> None:
    for v in _per_prompt(req, "return_logprob", batch):
        if v is not None:
            check_bool("return_logprob", v)
    for v in _per_prompt(req, "return_sampling_mask", batch):
        if v is not None:
            check_bool("return_sampling_mask", v)
    for v in _per_prompt(req, "logprob_start_len", batch):
        if v is not None:
            check_int("logprob_start_len", v, -1, lim.context_len)
    for v in _per_prompt(req, "top_logprobs_num", batch):
        if v is not None:
            check_int("top_logprobs_num", v, 0, lim.max_top_logprobs)
    ids = getattr(req, "token_ids_logprob", None)
    if ids:
        nested = isinstance(ids, list) and all(isinstance(x, list) for x in ids)
        if nested and (batch is None or len(ids) != batch):
            raise RequestError(
                "token_ids_logprob must be one list of token ids, or one list per prompt"
            )
        for one in ids if nested else [ids]:
            check_token_ids("token_ids_logprob", one, lim.vocab_size, empty=True)
            if len(one) > lim.max_top_logprobs:
                raise RequestError(
                    f"token_ids_logprob may hold at most {lim.max_top_logprobs} ids, got {len(one)}"
                )


def check_generate_request(req, lim: Limits) -> None:
    """The whole ``GenerateReqInput`` before SGLang normalizes it (module docstring)."""
    for name, why in _UNSUPPORTED.items():
        if _is_set(getattr(req, name, None)):
            raise RequestError(f"{name} is not accepted: {why}")
    batch = _batch_size(req, lim)
    params = getattr(req, "sampling_params", None)
    if isinstance(params, list):
        if batch is None or len(params) != batch:
            raise RequestError(
                "sampling_params must be one object, or a list of one object per prompt "
                f"({batch or 1} here), got a list of {len(params)}"
            )
        if len({repr(p.get("n", 1)) if isinstance(p, dict) else None for p in params}) > 1:
            raise RequestError("n must be the same in every sampling_params of a batch")
    for i, p in enumerate(params if isinstance(params, list) else [params]):
        if p is not None:
            check_sampling_params(
                p, lim, "sampling_params" if batch is None else f"sampling_params[{i}]"
            )
    if lim.greedy_only:
        for p in params if isinstance(params, list) else [params or {}]:
            _check_greedy(p)
    _check_logprob_fields(req, batch, lim)
    for name in ("rid", "custom_logit_processor", "extra_key"):
        for v in _per_prompt(req, name, batch):
            if v is not None:
                check_str(name, v)
    priority = getattr(req, "priority", None)
    if priority is not None:
        check_int("priority", priority, -INT32_MAX, INT32_MAX)


def _check_greedy(p) -> None:
    """Greedy = temperature 0 or top_k 1 (SGLang's ``is_all_greedy``); the default is 1.0."""
    p = p if isinstance(p, dict) else {}
    temperature = 1.0 if p.get("temperature") is None else p["temperature"]
    if temperature != 0 and p.get("top_k") != 1:
        raise RequestError(
            "temperature: this CPU server decodes speculatively and samples greedily only "
            f"(temperature 0 or top_k 1), got temperature {temperature}"
        )


def check_prompt(req, input_ids, lim: Limits) -> None:
    """One request once its prompt is token ids (text requests are tokenized by now; ids sent
    as ``input_ids`` were checked with the whole request)."""
    if input_ids and getattr(req, "input_ids", None) is None:
        check_token_ids("input_ids", list(input_ids), lim.vocab_size)
    start = getattr(req, "logprob_start_len", None)
    n = len(input_ids or ())
    if getattr(req, "return_logprob", False) and _is_int(start) and start > n:
        raise RequestError(
            f"logprob_start_len must be in [-1, {n}] (the prompt length), got {start}"
        )
