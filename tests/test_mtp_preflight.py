"""scripts/mtp_preflight.py: SGLang 0.5.17's CUDA-only speculative branches, checked before the
GPU servers start. On CPU: its draft-extend graph list is SGLang's, our backend gets no
draft-extend graph (eager draft extend), and SGLang's CUDA-branch Triton kernels (verify cache
slots, bonus tokens, draft argmax) agree with the twins under the interpreter; on the GPU (``gpu``
marker): the whole preflight, SGLang's ``sgl_kernel`` tree build / greedy verify included."""

import sys
import types
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))

import mtp_preflight as pf
from triton_cpu import interpreted

from sglang_dsv4.spec_torch import build_chain, verify_chain_greedy


def test_graph_list_is_sglangs():
    """Every class this script lists is named in SGLang's ``_capture_cuda_graphs``."""
    assert pf.graph_backend_names() == [cls for _, cls, _ in pf.GRAPH_BACKENDS]


def test_our_backend_gets_no_draft_extend_graph(monkeypatch):
    """SGLang's ``isinstance`` list on CUDA (its CUDA-only modules stubbed where they cannot
    import without a GPU): DSV4AttnBackend is not in it, a subclass of a listed class is."""
    from sglang_dsv4.attention.backend import DSV4AttnBackend

    for module, cls, cuda_only in pf.GRAPH_BACKENDS:
        if cuda_only:
            stub = types.ModuleType(module)
            setattr(stub, cls, type(cls, (), {}))
            monkeypatch.setitem(sys.modules, module, stub)
    assert not pf.draft_extend_graph(DSV4AttnBackend, cuda=True)
    listed = sys.modules[pf.GRAPH_BACKENDS[6][0]].DeepseekV4AttnBackend
    assert pf.draft_extend_graph(type("Sub", (listed,), {}), cuda=True)
    assert not pf.draft_extend_graph(type("Sub", (listed,), {}), cuda=False)  # no CUDA: none


def _capture(monkeypatch, extend_backend) -> tuple[object, list[str]]:
    """SGLang's own ``EagleDraftWorker._capture_cuda_graphs`` with its CUDA branch forced
    (``_is_cuda``), the graph runners recorded instead of built, the CUDA-only backend modules
    stubbed where they need a GPU to import; returns (the worker, the runners built)."""
    import sglang.srt.speculative.eagle_worker_v2 as w

    built = []

    def runner(name):
        return lambda worker: built.append(name) or name

    monkeypatch.setattr(w, "_is_cuda", True)
    monkeypatch.setattr(w, "check_cuda_graph_backend", lambda *a: False)
    monkeypatch.setattr(w, "get_model", lambda: types.SimpleNamespace(model_impl="sglang"))
    ns = types.SimpleNamespace
    graph = ns(cuda_graph_config=ns(decode=ns(backend="full")))
    monkeypatch.setattr(w, "get_exec", lambda: types.SimpleNamespace(graph=graph))
    monkeypatch.setattr(w, "get_batch_sizes_to_capture", lambda runner: ([1, 2], None))
    monkeypatch.setattr(w, "get_available_gpu_memory", lambda *a: 0.0)
    monkeypatch.setattr(w, "EAGLEDraftCudaGraphRunner", runner("draft_decode"))
    monkeypatch.setattr(w, "EAGLEDraftExtendCudaGraphRunner", runner("draft_extend"))
    module, cls, _ = pf.GRAPH_BACKENDS[-1]  # FlashMLA: sgl_kernel.flash_mla needs a GPU
    stub = types.ModuleType(module)
    setattr(stub, cls, type(cls, (), {}))
    monkeypatch.setitem(sys.modules, module, stub)
    worker = object.__new__(w.EagleDraftWorker)
    worker.__dict__.update(
        speculative_num_steps=3, speculative_num_draft_tokens=4, topk=1, device="cpu",
        gpu_id=0, draft_runner=None, target_worker=types.SimpleNamespace(device="cuda"),
        draft_attn_backend=None, draft_extend_attn_backend=extend_backend,
        _specialized_graph_memory_usage={}, _specialized_graph_time_usage={},
    )  # fmt: skip
    w.EagleDraftWorker._capture_cuda_graphs(worker)
    return worker, built


def test_sglang_captures_draft_decode_but_no_draft_extend_graph_for_our_backend(monkeypatch):
    """On CUDA SGLang builds the draft-decode runner and, for our backend, no draft-extend
    runner: its draft extend then runs the eager path the CPU server tests run
    (``_draft_extend_for_decode`` with ``cuda_graph_runner_for_draft_extend`` None); a backend
    SGLang lists gets one. The lazy imports of that branch succeed here (deep_gemm: CUDA only)."""
    from sglang.srt.layers.attention.deepseek_v4_backend import DeepseekV4AttnBackend

    from sglang_dsv4.attention.backend import DSV4AttnBackend

    ours = object.__new__(DSV4AttnBackend)
    worker, built = _capture(monkeypatch, ours)
    assert built == ["draft_decode"] and worker.cuda_graph_runner == "draft_decode"
    assert worker.cuda_graph_runner_for_draft_extend is None
    assert pf.draft_extend_graph(DSV4AttnBackend, cuda=False) is False
    listed = object.__new__(type("Listed", (DeepseekV4AttnBackend,), {}))
    worker, built = _capture(monkeypatch, listed)
    assert built == ["draft_decode", "draft_extend"]


def test_missing_module_is_reported():
    failed = pf.check_imports(("sglang_dsv4.spec_torch", "no_such_module_dsv4"))
    assert len(failed) == 1 and failed[0].startswith("no_such_module_dsv4: ModuleNotFoundError")


def test_cuda_branch_triton_kernels_equal_the_twins_under_the_interpreter(monkeypatch):
    """SGLang's CUDA branches of the verify cache slots (``_is_cuda`` forced), bonus tokens and
    draft argmax run their Triton kernels on CPU tensors; they agree with the twins."""
    import sglang.kernels.ops.speculative.cache_locs as cache_locs
    import sglang.kernels.ops.speculative.eagle as eagle
    import sglang.kernels.ops.speculative.topk1 as topk1

    with interpreted(cache_locs, eagle, topk1):
        monkeypatch.setattr(cache_locs, "_is_cuda", True)
        assert pf.check_cache_locs("cpu") == []
        assert pf.check_draft_argmax("cpu", vocab=9000) == []  # two vocab splits
        seq_lens, bonus, drafts = pf._batch("cpu")
        tokens = build_chain(bonus, drafts, seq_lens, pf.N, full_mask=True)[5]
        cand = tokens.view(pf.BS, pf.N)
        target = cand.roll(-1, dims=1).clone()
        target[1, 2] = 999  # request 1 keeps two drafts
        predicts = torch.zeros(pf.BS * pf.N, dtype=torch.int32)
        accept = torch.full((pf.BS, pf.N), -1, dtype=torch.int32)
        num = torch.empty(pf.BS, dtype=torch.int32)
        verify_chain_greedy(predicts, accept, num, cand, target)
        assert pf.check_bonus(predicts, accept, num) == []


def test_compare_reports_a_difference():
    a, b = torch.tensor([1, 2, 3]), torch.tensor([1, 2, 4])
    assert pf._compare("x", ("t",), (a,), (b,))[0].startswith("x.t: SGLang [1, 2, 3]")
    assert pf._compare("x", ("t",), (a,), (a.view(3, 1),))  # shapes differ
    assert pf._compare("x", ("t",), (a.int(),), (a,)) == []  # dtypes may differ


@pytest.mark.gpu
def test_preflight_on_gpu(capsys):
    """Imports, the draft-extend decision and every kernel check on the device."""
    assert pf.main() == 0, capsys.readouterr().out
