"""Weight memory and logit error of the checkpoint formats on the tiny DSV4 (CPU, fp32 math).

    python scripts/quant_report.py [--config configs/tiny-6l.json] [--tokens 300]

One seeded fp32 model (as scripts/make_checkpoint.py draws it) is stored as

* ``bf16``: every weight BF16 except the FP32 specials (sink, ape, hc_*, router bias): the
  baseline;
* ``released``: FP8 128x128 UE8M0 linears + MXFP4 routed experts (the DeepSeek-V4 release);
* ``nvfp4 experts (from bf16 / from mxfp4)``: the ``nvfp4_on_load: experts`` option applied to
  the BF16 or to the released weights;
* ``nvfp4 linears (from bf16)``: ``nvfp4_on_load: linears``.

Each is dequantized and run through :class:`~sglang_dsv4.ref.model.RefDSV4` on one prompt; the
table compares logits with the BF16 baseline and counts the bytes of the routed experts and of
all stored weights (tiny model; the same byte formulas for the Flash / Pro configs).
"""

import argparse
import json
from pathlib import Path

import torch

from sglang_dsv4.config import DSV4Config
from sglang_dsv4.ref.model import RefDSV4
from sglang_dsv4.weights.layout import (
    Fmt,
    StoredWeight,
    logical_shapes,
    pack,
    released_fmt,
    stored_bytes,
)
from sglang_dsv4.weights.make import build_hf_model
from sglang_dsv4.weights.names import hf_to_released
from sglang_dsv4.weights.nvfp4 import nvfp4_scope, to_nvfp4

ROOT = Path(__file__).resolve().parents[1]


def stored(name: str, t: torch.Tensor, fmt: Fmt) -> StoredWeight:
    data, scale = pack(t, fmt)
    return StoredWeight(fmt, data, scale)


def bf16_fmt(name: str) -> Fmt:
    fmt = released_fmt(name, "fp4")
    return fmt if fmt in (Fmt.FP32, Fmt.I64) else Fmt.BF16


def variant(weights, base_fmt, nvfp4: str | None):
    """(dense fp32 weights, stored formats) of ``weights`` stored per ``base_fmt(name)`` and then
    optionally re-stored as NVFP4."""
    scope = nvfp4_scope(nvfp4)
    dense, fmts = {}, {}
    for name, t in weights.items():
        s = stored(name, t, base_fmt(name))
        if scope is not None and scope(name):
            s = to_nvfp4(s)
        fmts[name] = s.fmt
        dense[name] = s.dequant(torch.float32) if s.fmt.quantized else s.data.to(t.dtype)
    return dense, fmts


def model_bytes(shapes, fmts, experts_only: bool) -> int:
    return sum(
        stored_bytes(shapes[n], f)
        for n, f in fmts.items()
        if not experts_only or ".ffn.experts." in n
    )


def compare(logits: torch.Tensor, base: torch.Tensor) -> dict:
    lp, lq = base.log_softmax(-1), logits.log_softmax(-1)
    return {
        "max |dlogit|": (logits - base).abs().max().item(),
        "mean |dlogit|": (logits - base).abs().mean().item(),
        "mean KL": (lp.exp() * (lp - lq)).sum(-1).mean().item(),
        "top-1 agree": (logits.argmax(-1) == base.argmax(-1)).float().mean().item(),
    }


def full_model_bytes(config: dict) -> dict[str, float]:
    """GiB of the routed experts of a full config in each format (byte formulas only)."""
    cfg = DSV4Config.from_dict(config)
    shapes = {n: s for n, s in logical_shapes(cfg).items() if ".ffn.experts." in n}
    return {
        fmt.value: sum(stored_bytes(s, fmt) for s in shapes.values()) / 2**30
        for fmt in (Fmt.BF16, Fmt.FP8, Fmt.MXFP4, Fmt.NVFP4)
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", type=Path, default=ROOT / "configs" / "tiny-6l.json")
    ap.add_argument("--tokens", type=int, default=300)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    torch.set_num_threads(2)
    config = json.loads(args.config.read_text())
    cfg = DSV4Config.from_dict(config)
    weights = hf_to_released(build_hf_model(config, args.seed).state_dict())
    shapes = {n: tuple(t.shape) for n, t in weights.items()}
    ids = torch.randint(
        2, cfg.vocab_size, (args.tokens,), generator=torch.Generator().manual_seed(7)
    )

    variants = {
        "bf16": (bf16_fmt, None),
        "released (fp8 + mxfp4 experts)": (lambda n: released_fmt(n, "fp4"), None),
        "nvfp4 experts, from bf16": (bf16_fmt, "experts"),
        "nvfp4 experts, from mxfp4": (lambda n: released_fmt(n, "fp4"), "experts"),
        "nvfp4 linears, from bf16": (bf16_fmt, "linears"),
    }
    rows, base = [], None
    for label, (fmt_of, nvfp4) in variants.items():
        dense, fmts = variant(weights, fmt_of, nvfp4)
        logits = RefDSV4(cfg, dense)(ids)
        base = logits if base is None else base
        rows.append(
            {
                "format": label,
                "experts MiB": model_bytes(shapes, fmts, True) / 2**20,
                "all weights MiB": model_bytes(shapes, fmts, False) / 2**20,
                **compare(logits, base),
            }
        )
    keys = list(rows[0])
    print(f"tiny model {args.config.name}, {args.tokens}-token prompt, logits vs the bf16 row\n")
    print("| " + " | ".join(keys) + " |")
    print("|" + "---|" * len(keys))
    for r in rows:
        cells = [r["format"]] + [
            f"{r[k]:.3g}" if isinstance(r[k], float) else str(r[k]) for k in keys[1:]
        ]
        print("| " + " | ".join(cells) + " |")
    print("\nrouted experts of the full configs, GiB per format:\n")
    for name in ("dsv4-flash", "dsv4-pro"):
        gib = full_model_bytes(json.loads((ROOT / "configs" / f"{name}.json").read_text()))
        print(f"- {name}: " + ", ".join(f"{k} {v:.1f}" for k, v in gib.items()))


if __name__ == "__main__":
    main()
