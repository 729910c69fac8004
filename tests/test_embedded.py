import pytest
import requests
import torch

from sglang_dsv4.embedded import PUBLIC, embedded_checkpoint, resolve_model_name


def test_public_names_map_to_repo_ids():
    assert resolve_model_name("dsv4-flash") == "deepseek-ai/DeepSeek-V4-Flash"
    assert resolve_model_name("dsv4-pro") == PUBLIC["dsv4-pro"]
    assert resolve_model_name("/some/local/dir") is None
    assert resolve_model_name("dsv4") == str(embedded_checkpoint())


def test_embedded_checkpoint_is_the_shipped_trained_model():
    """All three layer kinds, hash + scored MoE, >= 16 indexer heads, in <= 27 MiB (the main
    model 23.6 MB, its MTP layer 2.7 MB), inside the package; the tokenizer is an HF fast
    tokenizer with the DSV4 chat markers."""
    from transformers import AutoTokenizer

    from sglang_dsv4.config import AttnKind, DSV4Config

    path = embedded_checkpoint()
    assert path.parent.name == "models" and path.parent.parent.name == "sglang_dsv4"
    assert sum(f.stat().st_size for f in path.iterdir()) <= 27 * 1024 * 1024
    cfg = DSV4Config.from_json(path)
    kinds = {s.attn for s in cfg.layers}
    assert kinds == {AttnKind.SWA, AttnKind.CSA, AttnKind.HCA}
    assert {s.hash_moe for s in cfg.layers} == {True, False}
    assert cfg.index_n_heads >= 16 and cfg.index_topk < 4096 // 4
    tok = AutoTokenizer.from_pretrained(path)
    assert len(tok) == cfg.vocab_size and (tok.bos_token_id, tok.eos_token_id) == (0, 1)
    text = "To be, or not to be: that is the question."
    assert tok.decode(tok.encode(text, add_special_tokens=False)) == text
    for marker in ("<｜User｜>", "<｜Assistant｜>", "</think>", "<think>"):
        assert len(tok.encode(marker, add_special_tokens=False)) == 1


def test_chat_template_equals_sglang_dsv4_encoding():
    from sglang.srt.entrypoints.openai import encoding_dsv4
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(embedded_checkpoint())
    messages = [
        {"role": "system", "content": "Speak in verse."},
        {"role": "user", "content": "Who goes there?"},
        {"role": "assistant", "content": "Nay, answer me."},
        {"role": "user", "content": "Long live the king!"},
    ]
    ours = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert ours == encoding_dsv4.encode_messages(messages, thinking_mode="chat")


def test_shipped_weights_give_the_same_logits_in_hf_and_the_reference():
    """HF transformers loads the shipped (sharded, released-name) checkpoint as is; in fp32 its
    logits over held-out text equal our reference forward's (c4 top-k selection active)."""
    from transformers import AutoTokenizer, DeepseekV4ForCausalLM

    from sglang_dsv4.checkpoint import load_state_dict
    from sglang_dsv4.config import DSV4Config
    from sglang_dsv4.evals.perplexity import TEXT
    from sglang_dsv4.ref.model import RefDSV4

    path = embedded_checkpoint()
    tok = AutoTokenizer.from_pretrained(path)
    ids = tok.encode(TEXT.read_text()[:20000], add_special_tokens=False)[:384]
    weights = {
        k: v.float() if v.is_floating_point() else v for k, v in load_state_dict(path).items()
    }
    ref = RefDSV4(DSV4Config.from_json(path), weights)(torch.tensor(ids))
    hf = DeepseekV4ForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    with torch.no_grad():
        theirs = hf(torch.tensor([ids]), use_cache=False).logits[0]
    assert (ref - theirs).abs().max().item() <= 1e-4
    # a trained model: far better than uniform (ln 6144 = 8.7 nats) on text it never saw
    nll = torch.nn.functional.cross_entropy(ref[:-1], torch.tensor(ids[1:])).item()
    assert nll < 6.0


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
        assert r["choices"][0]["message"]["content"]
        assert requests.get(srv.url + "/v1/models", timeout=30).json()["data"][0]["id"] == "dsv4"
        assert "sglang-dsv4 active:" in srv.log
    finally:
        srv.stop()
