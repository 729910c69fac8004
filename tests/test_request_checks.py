"""The request checks on SGLang's own ``GenerateReqInput`` (no server): what would kill the
scheduler or fail with a 500 is refused with a message naming the field and the allowed values;
ordinary requests (``/generate`` and what the OpenAI layer builds) pass untouched."""

import math

import pytest
from sglang.srt.managers.io_struct import GenerateReqInput

from sglang_dsv4.request_checks import (
    MAX_TOP_LOGPROBS,
    Limits,
    RequestError,
    check_generate_request,
    check_prompt,
)

LIM = Limits(vocab_size=6144, context_len=4096, has_grammar=True)


def req(**kw) -> GenerateReqInput:
    kw.setdefault("text", "To be, or not to be")
    kw.setdefault("sampling_params", {"max_new_tokens": 4})
    return GenerateReqInput(**kw)


def refused(r: GenerateReqInput, *words: str, lim: Limits = LIM) -> str:
    with pytest.raises(RequestError) as e:
        check_generate_request(r, lim)
    msg = str(e.value)
    assert all(w in msg for w in words), msg
    return msg


def sp(**params) -> GenerateReqInput:
    return req(sampling_params={"max_new_tokens": 4, **params})


def test_the_two_crashes_of_issue_19_and_nan_temperature_are_refused():
    refused(req(return_logprob=True, top_logprobs_num=10_000_000), "top_logprobs_num", "[0, 1024]")
    refused(sp(temperature=math.nan), "temperature", "finite")
    refused(sp(temperature="NaN"), "temperature")
    refused(sp(temperature=math.inf), "temperature")
    # the scheduler packs top_k into int32 (a RuntimeError there killed the server)
    refused(sp(top_k=10**12), "top_k", "[1, 1073741824]")


def test_valid_requests_pass():
    openai_like = {  # what SGLang's OpenAI layer builds: unset values are None
        "temperature": 0.7, "max_new_tokens": 8, "min_new_tokens": None, "stop": None,
        "stop_token_ids": None, "stop_regex": None, "top_p": 1.0, "top_k": -1, "min_p": 0.0,
        "presence_penalty": None, "frequency_penalty": None, "repetition_penalty": 1.0,
        "regex": None, "ebnf": None, "n": 2, "no_stop_trim": False, "ignore_eos": False,
        "skip_special_tokens": True, "logit_bias": {"5": -100, "7": 2.5}, "custom_params": None,
        "sampling_seed": 3, "spaces_between_special_tokens": True,
        "json_schema": '{"type": "object"}',
    }  # fmt: skip
    ok = [
        req(),
        req(sampling_params=openai_like, return_logprob=True, top_logprobs_num=20),
        req(text=None, input_ids=[5, 6, 7], return_logprob=True, logprob_start_len=0,
            top_logprobs_num=MAX_TOP_LOGPROBS, token_ids_logprob=[1, 2]),
        req(text=["a", "b"], sampling_params=[{"max_new_tokens": 1}, {"stop": ["\n", "."]}],
            return_logprob=[True, False], rid=["x", "y"]),
        req(text=None, input_ids=[[5], [6, 7]], token_ids_logprob=[[1], [2, 3]]),
        req(sampling_params={"top_k": 2**30, "stop_regex": "[a-z]+\\.", "stream_interval": 1}),
        req(sampling_params=None, stream=True, priority=3),
    ]  # fmt: skip
    for r in ok:
        check_generate_request(r, LIM)


@pytest.mark.parametrize(
    ("params", "words"),
    [
        ({"top_p": 0}, ("top_p", "(0, 1]")),
        ({"top_p": math.nan}, ("top_p",)),
        ({"min_p": 1.5}, ("min_p", "[0, 1]")),
        ({"repetition_penalty": 0}, ("repetition_penalty", "(0, 2]")),
        ({"frequency_penalty": -math.inf}, ("frequency_penalty",)),
        ({"max_new_tokens": 2.5}, ("max_new_tokens", "integer")),
        ({"max_new_tokens": True}, ("max_new_tokens", "integer")),
        ({"max_new_tokens": 2, "min_new_tokens": 3}, ("min_new_tokens", "max_new_tokens=2")),
        ({"n": 0}, ("n", "[1, 64]")),
        ({"n": 65}, ("n", "[1, 64]")),
        ({"stop": [1]}, ("stop", "string")),
        ({"stop": [""]}, ("stop", "non-empty")),
        ({"stop": ["a"] * 65}, ("stop", "at most 64")),
        ({"stop_regex": "("}, ("stop_regex", "regular expression")),
        ({"stop_token_ids": [6144]}, ("stop_token_ids", "[0, 6144)")),
        ({"stop_token_ids": ["1"]}, ("stop_token_ids",)),
        ({"stream_interval": 0}, ("stream_interval", "[1,")),
        ({"logit_bias": {"5": "x"}}, ("logit_bias[5]",)),
        ({"logit_bias": {"5": 1e300}}, ("logit_bias[5]", "[-100, 100]")),
        ({"logit_bias": {"6144": 1}}, ("logit_bias token id", "[0, 6143]")),
        ({"logit_bias": {"x": 1}}, ("logit_bias keys",)),
        ({"sampling_seed": 2**63}, ("sampling_seed",)),
        ({"custom_params": [1]}, ("custom_params",)),
        ({"custom_params": {"__req__": 1}}, ("custom_params",)),
        ({"json_schema": "{"}, ("json_schema", "JSON")),
        ({"json_schema": "[]"}, ("json_schema", "object")),
        ({"regex": ""}, ("regex", "non-empty")),
        ({"regex": "a", "ebnf": 'root ::= "a"'}, ("only one of",)),
        ({"bogus": 1}, ("unknown key", "bogus", "temperature")),
        ({"is_normalized": True}, ("unknown key", "is_normalized")),
        ({"ignore_eos": "yes"}, ("ignore_eos", "true or false")),
    ],
)
def test_sampling_params_are_refused_with_field_and_range(params, words):
    refused(req(sampling_params=params), *words)


def test_structured_output_without_a_grammar_backend_is_refused():
    lim = Limits(vocab_size=6144, context_len=4096, has_grammar=False)
    refused(sp(json_schema='{"type": "object"}'), "json_schema", "grammar backend", lim=lim)


def test_request_fields_and_batch_shapes():
    refused(req(return_logprob=True, top_logprobs_num=-1), "top_logprobs_num")
    small = Limits(vocab_size=16, context_len=64, has_grammar=True)
    refused(req(top_logprobs_num=17), "top_logprobs_num", "[0, 16]", lim=small)
    refused(req(logprob_start_len=-2), "logprob_start_len", "[-1, 4096]")
    refused(req(token_ids_logprob=[6144]), "token_ids_logprob", "[0, 6144)")
    refused(req(return_logprob=[True]), "return_logprob", "single value")
    refused(req(text=["a", "b"], return_logprob=[True]), "return_logprob", "batch of 2")
    refused(req(text=["a", "b"], sampling_params=[{}]), "sampling_params", "list of 1")
    refused(req(sampling_params=[{}]), "sampling_params")
    refused(req(text=["a", "b"], sampling_params=[{"n": 1}, {"n": 2}]), "n must be the same")
    refused(req(rid=["a", "b"]), "rid", "single value")
    refused(req(text=""), "text", "non-empty")
    refused(req(text=[]), "text")
    refused(req(text=None, input_ids=[[5], []]), "input_ids")
    refused(req(text=None, input_ids=[5, -1]), "input_ids", "-1", "[0, 6144)")
    refused(req(text=None, input_ids=[5, None]), "input_ids", "None")
    refused(req(text=None, input_ids=[5, True]), "input_ids", "True")
    refused(req(text=None, input_ids=None), "text and input_ids")
    refused(req(priority=2**40), "priority")


@pytest.mark.parametrize(
    "field",
    ["lora_path", "session_params", "session_id", "image_data", "input_embeds",
     "return_routed_experts", "return_indexer_topk", "positional_embed_overrides",
     "bootstrap_room", "multi_item_delimiter_indices"],
)  # fmt: skip
def test_unsupported_fields_are_refused_by_name(field):
    value = {"session_params": {"id": "s"}, "input_embeds": [[0.0]]}.get(field, True)
    refused(req(**{field: value}), field, "not accepted")


def test_prompt_checks_after_tokenization():
    check_prompt(req(return_logprob=True, logprob_start_len=3), [5, 6, 7], LIM)
    with pytest.raises(RequestError, match=r"logprob_start_len must be in \[-1, 3\]"):
        check_prompt(req(return_logprob=True, logprob_start_len=4), [5, 6, 7], LIM)
    with pytest.raises(RequestError, match=r"token id 6144, outside the vocabulary \[0, 6144\)"):
        check_prompt(req(), [5, 6144], LIM)  # a text prompt whose tokenizer outgrows the model


def test_every_sampling_param_of_sglang_is_known():
    """A field SGLang adds to its API would be refused as unknown: this fails first."""
    import msgspec
    from sglang.srt.sampling.sampling_params import SamplingParams

    from sglang_dsv4.request_checks import _SAMPLING

    internal = {"stop_strs", "stop_regex_strs", "stop_str_max_len", "stop_regex_max_len",
                "is_normalized"}  # fmt: skip
    api = {f.name for f in msgspec.structs.fields(SamplingParams)} - internal
    assert api == set(_SAMPLING)


def test_speculative_cpu_server_takes_greedy_requests_only():
    lim = Limits(vocab_size=6144, context_len=4096, has_grammar=True, greedy_only=True)
    check_generate_request(sp(temperature=0), lim)
    check_generate_request(sp(temperature=0.7, top_k=1), lim)
    refused(sp(temperature=0.7), "temperature", "greedily", lim=lim)
    refused(req(), "temperature 1.0", lim=lim)  # SGLang's default
    check_generate_request(sp(temperature=0.7), LIM)  # without speculation: any
