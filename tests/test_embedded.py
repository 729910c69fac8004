import json

import pytest
import requests

from sglang_dsv4.embedded import PUBLIC, embedded_checkpoint, resolve_model_name


def test_public_names_map_to_repo_ids():
    assert resolve_model_name("dsv4-flash") == "deepseek-ai/DeepSeek-V4-Flash"
    assert resolve_model_name("dsv4-pro") == PUBLIC["dsv4-pro"]
    assert resolve_model_name("/some/local/dir") is None


def test_embedded_checkpoint_has_config_weights_and_real_tokenizer():
    from transformers import PreTrainedTokenizerFast

    path = embedded_checkpoint()
    config = json.loads((path / "config.json").read_text())
    assert config["model_type"] == "deepseek_v4" and config["vocab_size"] == 129280
    assert config["compress_ratios"] == [0, 0, 4, 128, 4, 128, 0]
    tok = PreTrainedTokenizerFast(tokenizer_file=str(path / "tokenizer.json"))
    assert (
        len(tok) == 129280
        and tok.decode(tok.encode("To be, or not to be")) == "To be, or not to be"
    )
    assert embedded_checkpoint() == path  # built once, then reused


@pytest.mark.server
def test_model_dsv4_serves_text_completions_and_chat(tmp_path):
    """``--model dsv4`` with no device flag: CPU is chosen, the three endpoints answer."""
    from server import Server

    srv = Server(["--model", "dsv4", "--max-total-tokens", "8192"], tmp_path / "log")
    try:
        r = requests.post(
            srv.url + "/generate",
            json={
                "text": "To be, or not to be",
                "sampling_params": {"max_new_tokens": 8, "temperature": 0},
            },
            timeout=120,
        ).json()
        assert r["meta_info"]["completion_tokens"] == 8 and r["text"]
        r = requests.post(
            srv.url + "/v1/completions",
            json={"model": "dsv4", "prompt": "Hello", "max_tokens": 4},
            timeout=120,
        ).json()
        assert r["choices"][0]["text"]
        chat = {"model": "dsv4", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4}
        r = requests.post(srv.url + "/v1/chat/completions", json=chat, timeout=120).json()
        assert r["choices"][0]["message"]["content"] is not None
        assert requests.get(srv.url + "/v1/models", timeout=30).json()["data"][0]["id"] == "dsv4"
        assert "sglang-dsv4 active:" in srv.log
    finally:
        srv.stop()
