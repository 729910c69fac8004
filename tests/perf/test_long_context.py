"""``perf.long_context``: per-request pool bytes from the schema's own page sizes, the weight
bytes equal to what a released-format checkpoint of the tiny model stores, the fit arithmetic,
and docs/long_context.md up to date with the code."""

import sys
from pathlib import Path

import pytest
from safetensors import safe_open

from sglang_dsv4.config import load_config
from sglang_dsv4.perf.long_context import (
    GPUS,
    fits,
    request_memory,
    schema_of,
    weight_bytes,
)

ROOT = Path(__file__).resolve().parents[2]


def test_request_memory_from_page_bytes():
    schema = schema_of(load_config(ROOT / "configs/dsv4-flash-dims.json"))
    m = request_memory(schema, 1 << 20, 8192)
    blocks = (1 << 20) // 128
    page = sum(
        (schema.entry_page_bytes(lc) if lc.entries_per_block else 0)
        + (schema.index_page_bytes(lc) if lc.index_keys_per_block else 0)
        for lc in schema.layers
    )
    assert m.full == blocks * page
    raw_pages = -(-(128 + 8192) // 128) + 1  # window + chunk, plus the partial page
    assert m.swa_prefill == round(raw_pages * 128 * schema.swa_bytes_per_token)
    assert m.tail == schema.tail_bytes and m.total == m.full + m.swa_prefill + m.tail
    # one request more than a page's worth of tokens costs a whole block more
    assert request_memory(schema, (1 << 20) + 1, 8192).full == m.full + page


def test_fit_arithmetic():
    schema = schema_of(load_config(ROOT / "configs/dsv4-flash-dims.json"))
    m = request_memory(schema, 1 << 17, 8192)
    gpu = GPUS["H100 80GB (HBM3)"]
    assert fits(schema, m, gpu, 0, 0.5, None) == pytest.approx(gpu * 0.5 / m.total)
    assert fits(schema, m, gpu, gpu, 0.9, None) == 0.0  # the weights take everything
    at_ratio = fits(schema, m, gpu, 0, 0.5, 0.1)
    swa = 0.1 * m.full / schema.full_bytes_per_token * schema.swa_bytes_per_token
    assert at_ratio == pytest.approx(gpu * 0.5 / (m.full + swa + m.tail))
    assert at_ratio < fits(schema, m, gpu, 0, 0.5, None)  # the ratio reserves more swa


def test_weight_bytes_equal_a_released_checkpoint(tmp_path):
    from hf_tiny import tiny_config_dict

    from sglang_dsv4.weights.make import make_checkpoints

    _, released = make_checkpoints(tiny_config_dict(), tmp_path, expert_dtype="fp4")
    stored = 0
    for f in released.glob("*.safetensors"):
        with safe_open(f, "pt") as st:
            for name in st.keys():  # noqa: SIM118 (safe_open has no __iter__)
                if not name.startswith("mtp."):
                    t = st.get_tensor(name)
                    stored += t.numel() * t.element_size()
    assert weight_bytes(load_config(released / "config.json")) == stored


def test_doc_is_generated_from_the_code():
    sys.path.insert(0, str(ROOT / "scripts"))
    import long_context

    doc = (ROOT / "docs/long_context.md").read_text()
    fresh = long_context.document(0.9, 8192, 0.1)
    # everything but the generation date
    assert doc.split("\n", 4)[4] == fresh.split("\n", 4)[4]
