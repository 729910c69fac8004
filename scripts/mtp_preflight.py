"""Preflight of MTP speculative decoding on a CUDA machine (issue 15): in seconds, before any
server starts, what SGLang 0.5.17's EAGLE worker does there and nowhere else (on CPU its
``_is_cuda`` branches are skipped, so the CPU tests never reach them):

1. imports: what ``speculative/eagle_worker_v2.py`` imports lazily when it captures the draft's
   CUDA graphs (``_capture_cuda_graphs``: ``layers.attention.dsa_backend``, which imports
   ``deep_gemm``; ``deepseek_v4_backend``; ``flashmla_backend``, ``sgl_kernel.flash_mla``) and
   the CUDA-only kernels of its verify path (``sgl_kernel``'s tree build, greedy verify and
   ``fast_topk``). The H100 run of 2026-12-07 died at the first of these after both graph
   captures (~40 s after the server's first log line).
2. the draft-extend graph decision: SGLang captures a draft-extend CUDA graph only for the
   backend classes it lists (an ``isinstance``); ``DSV4AttnBackend`` is none of them, so every
   draft extend (after a prefill, after each verify) runs eager through the backend's host plan,
   as on CPU (the server's "Engine startup timings" line then says ``draft_extend=0.00``).
3. SGLang's CUDA-branch kernels on a small top-k 1 batch against the torch twins
   (:mod:`sglang_dsv4.spec_torch`) whose semantics the CPU tests pin: the verify tree
   (``FULL_MASK``, CUDA's default), the greedy verify, the verify tokens' cache slots (uniform
   variant), the bonus tokens, the draft argmax (which also advances positions) and
   ``fast_topk``.

    python scripts/mtp_preflight.py    # exit 0: ok, 1: a kernel check failed, 2: an import failed

Only an import failure (the server would die of it) is fatal; a kernel check that disagrees or
raises is reported and the servers still run (they are the real test; a check may be wrong).

(``gpu_mtp.sh`` runs it after installing; its output goes to ``$OUT/preflight.log``.)
"""

from __future__ import annotations

import importlib
import inspect
import sys
import time
import traceback
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from sglang_dsv4.spec_torch import build_chain, extend_cache_locs, verify_chain_greedy  # noqa: E402

# what SGLang 0.5.17 imports on CUDA only, at draft graph capture or on the verify path
CUDA_IMPORTS = (
    "deep_gemm",
    "sglang.srt.layers.attention.dsa_backend",
    "sglang.srt.layers.attention.deepseek_v4_backend",
    "sglang.srt.layers.attention.flashmla_backend",
    "sglang.srt.speculative.eagle_worker_v2",
    "sglang.kernels.ops.speculative.topk1",
)
_ATT = "sglang.srt.layers.attention"
# _capture_cuda_graphs' draft-extend graph list: (module, class, CUDA only)
GRAPH_BACKENDS = (
    (f"{_ATT}.triton_backend", "TritonAttnBackend", False),
    (f"{_ATT}.trtllm_mla_backend", "TRTLLMMLABackend", False),
    (f"{_ATT}.trtllm_mha_backend", "TRTLLMHAAttnBackend", False),
    (f"{_ATT}.tokenspeed_mla_backend", "TokenspeedMLABackend", False),
    (f"{_ATT}.flashinfer_backend", "FlashInferAttnBackend", False),
    (f"{_ATT}.dsa_backend", "DeepseekSparseAttnBackend", True),
    (f"{_ATT}.deepseek_v4_backend", "DeepseekV4AttnBackend", True),
    (f"{_ATT}.flashmla_backend", "FlashMLABackend", True),
)

BS, STEPS = 3, 3  # a batch of 3 requests drafting 3 tokens: 4 verify tokens each
N = STEPS + 1


def check_imports(names=CUDA_IMPORTS) -> list[str]:
    """The modules that do not import: ``name: error`` each."""
    failed = []
    for name in names:
        try:
            importlib.import_module(name)
        except Exception as e:  # any failure here is one the server would die of
            failed.append(f"{name}: {type(e).__name__}: {e}")
    return failed


def graph_backend_names() -> list[str]:
    """The class names of :data:`GRAPH_BACKENDS` that SGLang's ``_capture_cuda_graphs`` source
    names (all of them while the list matches the installed SGLang)."""
    from sglang.srt.speculative.eagle_worker_v2 import EagleDraftWorker

    src = inspect.getsource(EagleDraftWorker._capture_cuda_graphs)
    return [cls for _, cls, _ in GRAPH_BACKENDS if cls in src]


def draft_extend_graph(backend_cls, cuda: bool) -> bool:
    """Whether SGLang 0.5.17 captures a draft-extend CUDA graph for ``backend_cls`` (its
    ``graph_supported_backend``; CUDA-only classes are imported only with ``cuda``)."""
    types = []
    for module, cls, cuda_only in GRAPH_BACKENDS:
        if cuda or not cuda_only:
            types.append(getattr(importlib.import_module(module), cls))
    return cuda and issubclass(backend_cls, tuple(types))


def _batch(device):
    g = torch.Generator().manual_seed(0)
    seq_lens = torch.tensor([7, 129, 1], dtype=torch.int64)
    bonus = torch.tensor([5, 6, 7], dtype=torch.int32)
    drafts = torch.randint(100, 200, (BS, STEPS), generator=g)
    return seq_lens.to(device), bonus.to(device), drafts.to(device)


def check_tree(device) -> list[str]:
    """SGLang's verify tree (``FULL_MASK``) and greedy verify against the chain twins."""
    from sglang.srt.speculative.eagle_utils import (
        TreeMaskMode,
        build_tree_kernel_efficient,
        verify_tree_greedy_func,
    )

    seq_lens, bonus, drafts = _batch(device)
    parents = torch.arange(-1, STEPS - 1, device=device).repeat(BS, 1)  # the top-k 1 chain's
    scores = torch.arange(STEPS, device=device).repeat(BS, 1)
    full = TreeMaskMode.FULL_MASK
    total = int(seq_lens.sum())
    got = build_tree_kernel_efficient(
        bonus, parents, scores, drafts, seq_lens, total, 1, STEPS, N, full
    )
    want = build_chain(bonus, drafts, seq_lens, N, full_mask=True)
    names = ("tree_mask", "positions", "retrieve_index", "next_token", "next_sibling", "tokens")
    bad = _compare("tree", names, got, want)
    cand = want[5].view(BS, N)
    target = cand.roll(-1, dims=1).clone()  # request 0 keeps every draft
    target[1, 1] = 999  # request 1 keeps one
    target[2, 0] = 999  # request 2 keeps none
    outs = []
    for fn in (verify_tree_greedy_func, None):
        predicts = torch.zeros(BS * N, dtype=torch.int32, device=device)
        accept = torch.full((BS, N), -1, dtype=torch.int32, device=device)
        num = torch.empty(BS, dtype=torch.int32, device=device)
        if fn is None:
            outs.append(verify_chain_greedy(predicts, accept, num, cand, target))
        else:
            outs.append(fn(predicts, accept, num, cand, *got[2:5], target, topk=1))
    bad += _compare("verify", ("predicts", "accept_index", "accepted"), *outs)
    return bad + check_bonus(outs[0][0], outs[0][1], outs[0][2])


def check_bonus(predicts, accept_index, accepted) -> list[str]:
    """``fill_bonus_tokens_func``: each request's last kept token (``run_eagle_verify``)."""
    from sglang.kernels.ops.speculative.eagle import fill_bonus_tokens_func

    accept_tokens = predicts[accept_index.long().clamp(min=0)]  # [B, N]
    lens = (accepted + 1).to(torch.int32)  # kept drafts + the bonus
    bonus = torch.empty_like(lens)
    fill_bonus_tokens_func(accept_tokens, lens, bonus, accept_index.shape[1], BS)
    want = accept_tokens.gather(1, (lens.long() - 1).unsqueeze(1)).squeeze(1)
    return _compare("bonus", ("bonus_tokens",), (bonus,), (want.to(bonus.dtype),))


def check_cache_locs(device) -> list[str]:
    """The verify tokens' cache slots: SGLang's uniform kernel against the twin."""
    from sglang.kernels.ops.speculative.cache_locs import assign_extend_cache_locs_uniform_func

    seq_lens = _batch(device)[0]
    req_to_token = torch.arange(4 * 300, dtype=torch.int32, device=device).view(4, 300)
    rows = torch.tensor([2, 0, 3], device=device)
    got = assign_extend_cache_locs_uniform_func(
        req_pool_indices=rows,
        req_to_token=req_to_token,
        start_offset=seq_lens,
        batch_size=BS,
        draft_token_num=N,
        device=device,
    )
    want = extend_cache_locs(rows, req_to_token, seq_lens, seq_lens + N)
    return _compare("cache_locs", ("out_cache_loc",), (got,), (want,))


def check_draft_argmax(device, vocab: int = 20000) -> list[str]:
    """``draft_topk1_postprocess`` (the CUDA draft step) against the CPU path's argmax and
    positions + 1; ``fast_topk`` (``sgl_kernel``'s on CUDA) against ``torch.max``."""
    from sglang.kernels.ops.speculative.topk1 import draft_topk1_postprocess
    from sglang.srt.speculative.spec_utils import fast_topk

    g = torch.Generator().manual_seed(1)
    logits = torch.randn(BS, vocab, generator=g).to(device)
    positions = torch.tensor([7, 129, 1], device=device)
    tokens = torch.zeros(BS, STEPS, dtype=torch.long, device=device)
    p, idx = draft_topk1_postprocess(logits, positions, tokens, 1)
    want_idx = logits.argmax(-1, keepdim=True)
    got = (idx, p, positions, tokens[:, 1:2])
    want = (want_idx, torch.ones_like(p), torch.tensor([8, 130, 2], device=device), want_idx)
    bad = _compare("draft_argmax", ("topk_index", "topk_p", "positions", "draft_col"), got, want)
    probs = logits.softmax(-1)
    got = fast_topk(probs, 1, dim=-1)
    want = torch.max(probs, dim=-1, keepdim=True)
    return bad + _compare("fast_topk", ("values", "indices"), tuple(got), tuple(want))


def _compare(what: str, names, got, want) -> list[str]:
    bad = []
    for name, a, b in zip(names, got, want, strict=True):
        a, b = a.cpu(), b.cpu()
        if a.shape != b.shape or not torch.equal(a.to(b.dtype), b):
            bad.append(f"{what}.{name}: SGLang {a.flatten()[:16].tolist()} {tuple(a.shape)}, "
                       f"twin {b.flatten()[:16].tolist()} {tuple(b.shape)}")  # fmt: skip
    return bad


def run_checks(device) -> tuple[list[str], list[str]]:
    """(a check raised: its traceback, mismatches) of the kernel checks on ``device``."""
    failed, bad = [], []
    for check in (check_tree, check_cache_locs, check_draft_argmax):
        try:
            bad += check(device)
        except Exception:
            failed.append(f"{check.__name__}: {traceback.format_exc()}")
    return failed, bad


def main() -> int:
    t0 = time.time()
    if not torch.cuda.is_available():
        print("preflight: no CUDA device: nothing to check (the CPU tests cover CPU serving)")
        return 2
    failed = check_imports()
    print(f"preflight: {len(CUDA_IMPORTS) - len(failed)}/{len(CUDA_IMPORTS)} CUDA-only imports")
    for line in failed:
        print(f"  IMPORT FAILED {line}")
    if failed:
        return 2
    from sglang_dsv4.attention.backend import DSV4AttnBackend

    listed = graph_backend_names()
    graph = draft_extend_graph(DSV4AttnBackend, cuda=True)
    print(f"preflight: draft extend {'CUDA graph' if graph else 'eager'} (SGLang's graph list "
          f"{len(listed)}/{len(GRAPH_BACKENDS)} names as this script's)")  # fmt: skip
    failed, bad = run_checks("cuda")
    for line in failed + bad:
        print(f"  {'FAILED' if line in failed else 'MISMATCH'} {line}")
    print(f"preflight: kernels {'ok' if not failed + bad else 'NOT ok'} ({time.time() - t0:.0f} s)")
    return 1 if failed or bad else 0


if __name__ == "__main__":
    sys.exit(main())
