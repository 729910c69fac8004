import pytest


@pytest.mark.server
def test_running_server_uses_our_classes(tiny_server):
    """The backend logs, from inside the scheduler, the classes that really serve."""
    line = next((ln for ln in tiny_server.log.splitlines() if "sglang-dsv4 active:" in ln), None)
    assert line is not None, tiny_server.log[-3000:]
    assert "model=sglang_dsv4.model.deepseek_v4.DeepseekV4ForCausalLM" in line
    assert "backend=DSV4AttnBackend" in line and "pool=DSV4KVPool" in line
    assert "allocator=sglang_dsv4.mem.allocator.DSV4SWAAllocator" in line
    # fp32 model on CPU: exact fp32 rows, decode through the torch twin
    assert "rows=fp32 index_keys=fp32 decode=DecodeTorch" in line
    assert "sglang-dsv4 pools: fp32 rows, fp32 indexer keys;" in tiny_server.log
    # SGLang's own radix tree, with its swa component (window-aware matching and eviction)
    assert "impl=UnifiedRadixCache hybrid_swa=True" in tiny_server.log


def test_plugin_is_declared_as_entry_point():
    from importlib.metadata import entry_points

    (ep,) = [e for e in entry_points(group="sglang.srt.plugins") if e.name == "dsv4"]
    assert ep.value == "sglang_dsv4.plugin:register"


@pytest.mark.server
def test_parallel_layout_the_model_cannot_split_stops_startup(tmp_path):
    """``--tp 3`` for a 4-head model: the launcher exits before any scheduler starts, naming
    the dimension (:func:`sglang_dsv4.arg_rules.check_parallel`)."""
    from server import launch_and_expect_failure

    log = launch_and_expect_failure(["--model", "dsv4", "--tp", "3"], tmp_path / "log")
    assert "DSV4 --tp 3: num_attention_heads = 4 is not divisible by the TP size" in log
    assert "Scheduler" not in log


def test_import_error_in_our_model_stops_sglang_instead_of_falling_back():
    """SGLang logs and swallows plugin exceptions (then serves its built-in DSV4); ours must
    turn them into a process exit that names the error."""
    import subprocess
    import sys

    code = (
        "import sys; sys.modules['sglang_dsv4.model.deepseek_v4'] = None\n"
        "from sglang.srt.plugins import load_plugins\n"
        "load_plugins()\n"
        "print('SERVING ANYWAY')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode != 0 and "SERVING ANYWAY" not in out.stdout
    assert "sglang-dsv4 plugin failed to register" in out.stderr
    assert "ModuleNotFoundError" in out.stderr or "ImportError" in out.stderr


def test_server_args_resolution_for_dsv4():
    """``--model dsv4`` resolves before any Hub access: embedded checkpoint, CPU without CUDA,
    our backend with page = block, and eager decode unless the user asks for graphs."""
    import subprocess
    import sys

    code = (
        "from sglang.srt.plugins import load_plugins; load_plugins()\n"
        "from sglang.srt.server_args import prepare_server_args\n"
        "a = prepare_server_args(['--model', 'dsv4'])\n"
        "print('A', a.model_path, a.served_model_name, a.device, a.attention_backend, a.page_size,"
        " a.cuda_graph_config.decode.backend, a.kv_cache_dtype)\n"
        "b = prepare_server_args(['--model', 'dsv4', '--cuda-graph-backend-decode', 'full',"
        " '--context-length', '2048', '--max-running-requests', '3'])\n"
        "print('B', b.cuda_graph_config.decode.backend, b.context_length, b.max_running_requests)\n"
        "print('C', a.context_length, a.max_running_requests)\n"
        "print('D', a.reasoning_parser, a.tool_call_parser)\n"
        "e = prepare_server_args(['--model', 'dsv4', '--reasoning-parser', 'deepseek-r1'])\n"
        "print('E', e.reasoning_parser, e.tool_call_parser)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    lines = {
        ln.split()[0]: ln.split()[1:]
        for ln in out.stdout.splitlines()
        if ln[:2] in ("A ", "B ", "C ", "D ", "E ")
    }
    assert "A" in lines, out.stderr[-3000:]
    path, served, device, backend, page, decode, kv_dtype = lines["A"]
    assert path.endswith("models/dsv4-tiny") and served == "dsv4"
    assert (device, backend, page, decode) == ("cpu", "dsv4_plugin", "128", "disabled")
    assert kv_dtype == "bfloat16"  # CPU pools keep plain rows (mem.sizing.row_format)
    # CPU: the embedded model's trained context and a few requests, unless the user says
    from sglang_dsv4.embedded import EMBEDDED_CONTEXT
    from sglang_dsv4.mem.sizing import CPU_MAX_RUNNING_REQUESTS

    assert lines["C"] == [str(EMBEDDED_CONTEXT), str(CPU_MAX_RUNNING_REQUESTS)]
    assert lines["B"] == ["full", "2048", "3"]
    # SGLang's DSV4 parsers by default; the user's flag wins
    assert lines["D"] == ["deepseek-v4", "deepseekv4"]
    assert lines["E"] == ["deepseek-r1", "deepseekv4"]


@pytest.mark.skipif(
    __import__("torch").cuda.is_available(), reason="the CPU grammar path (no CUDA driver)"
)
def test_grammar_bitmask_on_cpu_is_unpinned_and_applied_on_the_logits_device():
    """SGLang 0.5.17 pins xgrammar's bitmask ("Found no NVIDIA driver" without CUDA) and has
    GPU-only kernels to apply it; ours: an unpinned mask, applied by xgrammar's CPU kernel
    (bit ``t % 32`` of word ``t // 32`` allows token ``t``), other masks left to SGLang."""
    import torch
    from sglang.srt.constrained.base_grammar_backend import GrammarMask

    from sglang_dsv4.plugin import _apply_grammar_mask, _grammar_bitmask

    vocab, allowed = 70, (0, 31, 33, 69)
    mask = _grammar_bitmask(lambda *a: pytest.fail("SGLang's pinned allocation"), vocab, 2)
    assert mask.shape == (2, 3) and mask.dtype == torch.int32 and not mask.is_pinned()
    assert (mask == -1).all()  # all allowed until a grammar fills it
    words = [0, 0, 0]
    for t in allowed:
        words[t // 32] |= 1 << (t % 32)
    mask[0] = torch.tensor([w - (1 << 32) if w >= 1 << 31 else w for w in words])
    logits = torch.randn(2, vocab)
    want = logits.clone()
    want[0, [t for t in range(vocab) if t not in allowed]] = float("-inf")
    out = _apply_grammar_mask(
        lambda *a: pytest.fail("SGLang's GPU path"), GrammarMask(None, mask), logits
    )
    assert out is None and torch.equal(logits, want)

    seen = []
    bool_mask = GrammarMask(None, torch.ones(2, vocab, dtype=torch.bool))  # e.g. outlines
    _apply_grammar_mask(lambda *a: seen.append(a), bool_mask, logits)
    assert len(seen) == 1


def test_disconnect_watcher_skips_requests_refused_before_normalization():
    """A refused streamed request has no ``is_single``: SGLang's watcher raised on it."""
    import asyncio
    from types import SimpleNamespace

    from starlette.background import BackgroundTasks

    from sglang_dsv4.plugin import _abort_task

    ran = []

    def original(tm, obj):
        tasks = BackgroundTasks()
        tasks.add_task(lambda: ran.append(obj.is_single))
        return tasks

    refused, served = SimpleNamespace(), SimpleNamespace(is_single=True)
    asyncio.run(_abort_task(original, None, refused)())
    assert ran == []
    asyncio.run(_abort_task(original, None, served)())
    assert ran == [True]


@pytest.mark.server
def test_hf_saved_checkpoint_serves_hf_logprobs(hf_model, tmp_path):
    """A checkpoint written by HF transformers' ``save_pretrained`` (config spelled
    ``layer_types`` + ``compress_rates``, no ``compress_ratios``; HF tensor names) starts
    through SGLang's own ModelConfig and serves HF's logprobs (fp32, CPU)."""
    import json

    from conftest import SERVER_ARGS
    from hf_parity import assert_served_equals_hf, seeded_prompt
    from server import Server

    ckpt = tmp_path / "hf_saved"
    hf_model.save_pretrained(ckpt)
    raw = json.loads((ckpt / "config.json").read_text())
    assert "compress_ratios" not in raw and "layer_types" in raw and "compress_rates" in raw
    prompts = {n: seeded_prompt(n, seed=3000) for n in (5, 129, 300)}
    srv = Server(["--model-path", str(ckpt), *SERVER_ARGS], tmp_path / "log")
    try:
        outs = {n: srv.generate(ids, 8) for n, ids in prompts.items()}
        assert "DSV4: HF-transformers config spelling" in srv.log
    finally:
        srv.stop()
    assert_served_equals_hf(hf_model, prompts, outs)


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="the CPU speculative twins")
def test_speculative_hooks_call_the_twins_however_sglang_passes_arguments():
    """Without CUDA the tree-build / greedy-verify / verify-slot hooks answer with the torch
    twins, whether SGLang passes arguments by position or by name; top-k > 1 falls through."""
    import functools

    import torch
    from sglang.kernels.ops.speculative.cache_locs import assign_extend_cache_locs_func
    from sglang.srt.speculative.eagle_utils import (
        TreeMaskMode,
        build_tree_kernel_efficient,
        verify_tree_greedy_func,
    )

    from sglang_dsv4.plugin import _build_tree, _extend_cache_locs, _verify_greedy
    from sglang_dsv4.spec_torch import build_chain

    bonus, drafts, seq_lens = (
        torch.tensor([1, 2]),
        torch.tensor([[10, 11], [20, 21]]),
        torch.tensor([7, 3]),
    )
    want = build_chain(bonus, drafts, seq_lens, 3, full_mask=False)
    pos = (bonus, None, None, drafts, seq_lens, 10, 1, 2, 3, TreeMaskMode.QLEN_ONLY)
    for args, kwargs in [(pos, {}), (pos[:9], {"tree_mask_mode": TreeMaskMode.QLEN_ONLY})]:
        got = _build_tree(build_tree_kernel_efficient, *args, **kwargs)
        assert all(torch.equal(g, w) for g, w in zip(got, want, strict=True))
    full = _build_tree(build_tree_kernel_efficient, *pos[:9])  # default: FULL_MASK
    assert full[0].numel() == (7 + 3 + 3 + 3) * 3

    cand = want[5].view(2, 3)
    target = torch.tensor([[10, 11, 12], [20, 99, 98]])

    def verify(**named):
        out = (torch.zeros(6, dtype=torch.int32), torch.full((2, 3), -1, dtype=torch.int32))
        num = torch.empty(2, dtype=torch.int32)
        unused = torch.zeros(2, 3, dtype=torch.long)
        _verify_greedy(
            verify_tree_greedy_func, *out, num, cand, unused, unused, unused, target, **named
        )
        return num.tolist(), out[1].tolist()

    assert verify(topk=1) == ([2, 1], [[0, 1, 2], [3, 4, -1]])
    # top-k > 1 is SGLang's own path (CUDA / CPU kernel build): the original is called
    for original, hook, kwargs in [
        (verify_tree_greedy_func, _verify_greedy, {}),
        (build_tree_kernel_efficient, _build_tree, {"spec_steps": 2, "num_verify_tokens": 3}),
    ]:
        spy = functools.wraps(original)(lambda *a, **k: "original")  # its signature
        positional = range(8 if hook is _verify_greedy else 6)
        assert hook(spy, *positional, topk=2, **kwargs) == "original"

    req_to_token = torch.arange(40, dtype=torch.int32).view(4, 10)
    idx, start, end = torch.tensor([2, 0]), torch.tensor([5, 1]), torch.tensor([8, 4])
    locs = _extend_cache_locs(
        assign_extend_cache_locs_func, idx, req_to_token, start, end, 2, 3, "cpu"
    )
    named = _extend_cache_locs(
        assign_extend_cache_locs_func, idx, req_to_token, start_offset=start, end_offset=end,
        batch_size=2, draft_token_num=3, device="cpu",
    )  # fmt: skip
    assert locs.tolist() == named.tolist() == [25, 26, 27, 1, 2, 3]


def test_prefill_batches_carry_their_request_slots_on_the_host():
    """``ForwardBatch.init_new``'s hook: EXTEND / MIXED batches carry each request's slot on
    their host prefix lengths (the extend plan then reads nothing back), a field that survives
    the runners' ``dataclasses.replace``; draft / verify batches keep the device read."""
    import dataclasses
    from types import SimpleNamespace

    from sglang.srt.model_executor.forward_batch_info import ForwardBatch, ForwardMode

    from sglang_dsv4.attention.plan_facts import SlottedLens, host_slots
    from sglang_dsv4.plugin import _host_slots

    batch = SimpleNamespace(reqs=[SimpleNamespace(req_pool_idx=i) for i in (5, 2, 9)])
    for mode, want in [
        (ForwardMode.EXTEND, [5, 2, 9]),
        (ForwardMode.MIXED, [5, 2, 9]),
        (ForwardMode.DRAFT_EXTEND_V2, None),
        (ForwardMode.TARGET_VERIFY, None),
    ]:
        fb = ForwardBatch(forward_mode=mode, batch_size=3, input_ids=None, req_pool_indices=None,
                          seq_lens=None, out_cache_loc=None, seq_lens_sum=0)  # fmt: skip
        fb.extend_prefix_lens_cpu = [0, 3, 7]
        assert _host_slots(fb, ForwardBatch, batch, None) is None
        view = dataclasses.replace(fb)  # what SGLang's runners hand the attention backend
        assert view.extend_prefix_lens_cpu == [0, 3, 7]
        assert host_slots(view, 3) == want
        assert isinstance(view.extend_prefix_lens_cpu, SlottedLens) == (want is not None)
