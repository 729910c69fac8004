"""Train the embedded tiny DSV4 (``--model dsv4``) on Shakespeare, within a wall-clock budget.

    python scripts/train_tiny.py [--minutes 7.5] [--out sglang_dsv4/models/dsv4-tiny]
    python scripts/train_tiny.py --device cpu --steps 3 --seq-len 256 --batch 2 --out /tmp/t
    python scripts/train_tiny.py --plot LOG.json PNG       # loss curve from a training log
    python scripts/train_tiny.py --init sglang_dsv4/models/dsv4-tiny --out /tmp/ft \
        --device cpu --threads 2 --minutes 12 --seq-len 1024 --batch 4 --micro-batch 4 \
        --lr 3e-4 --warmup 10 --dense-frac 0 --think-prob 0.1 --tool-prob 0.15 --keep last
                                                           # fine-tune: thinking + tool calls

Model: ``configs/dsv4-tiny.json`` (layers SWA, SWA, c4, c128, c4, c128; layer 0 hash-routed MoE,
the others scored; mHC; sinks; 16 indexer heads, top-64) trained with
:class:`sglang_dsv4.train.model.TrainDSV4` on 4096-token samples of the training plays
(:mod:`sglang_dsv4.train.data`: text, text with planted facts, chat turns). bf16 autocast on CUDA,
AdamW, linear warm-up then cosine decay over the time budget, dropout, aux-loss-free router bias
updates. The c4 layers attend densely over all visible entries for the first ``--dense-frac`` of
the budget (indexer warm-up), then to the indexer's top-k; the indexer learns throughout from
its KL loss against the main attention. The checkpoint with the best validation loss (play
``twelfth-night``) is kept; the reported numbers are on the test plays (``hamlet``,
``the-tempest``) in fp32 with top-k selection, as served.

Writes into ``--out``: ``config.json``, ``model.safetensors`` (released tensor names, bf16 with
the fp32 tensors of the release), ``tokenizer.json`` / ``tokenizer_config.json`` (trained with
``--retrain-tokenizer`` or when absent) and ``train_log.json`` (curve and final numbers).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from sglang_dsv4.config import DSV4Config  # noqa: E402
from sglang_dsv4.train.data import (  # noqa: E402
    HELD_OUT,
    Corpus,
    SampleMix,
    build_tokenizer,
    load_plays,
    save_tokenizer,
)
from sglang_dsv4.train.model import TrainDSV4, export_state_dict, init_weights  # noqa: E402

DEFAULT_OUT = ROOT / "sglang_dsv4" / "models" / "dsv4-tiny"


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    ap.add_argument("--config", type=Path, help="default: --init's config.json, else dsv4-tiny")
    ap.add_argument("--init", type=Path, help="start from this checkpoint (fine-tuning)")
    ap.add_argument("--threads", type=int, help="torch CPU threads")
    ap.add_argument("--keep", choices=("best", "last"), default="best", help="checkpoint kept")
    ap.add_argument("--fact-prob", type=float, default=SampleMix.fact_prob)
    ap.add_argument("--chat-prob", type=float, default=SampleMix.chat_prob)
    ap.add_argument("--think-prob", type=float, default=SampleMix.think_prob)
    ap.add_argument("--tool-prob", type=float, default=SampleMix.tool_prob)
    ap.add_argument("--retrain-tokenizer", action="store_true")
    ap.add_argument("--vocab", type=int, default=6144)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--minutes", type=float, default=7.5, help="training wall-clock budget")
    ap.add_argument("--steps", type=int, default=0, help="fixed step count instead (smoke runs)")
    ap.add_argument("--seq-len", type=int, default=4096)
    ap.add_argument("--batch", type=int, default=16, help="sequences per optimizer step")
    ap.add_argument("--micro-batch", type=int, default=16)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--min-lr-frac", type=float, default=0.05)
    ap.add_argument("--warmup", type=int, default=60)
    ap.add_argument("--weight-decay", type=float, default=0.1)
    ap.add_argument("--dropout", type=float, default=0.1)
    ap.add_argument("--dense-frac", type=float, default=0.15)
    ap.add_argument("--bias-rate", type=float, default=1e-3, help="router bias step per update")
    ap.add_argument("--eval-every", type=float, default=20.0, help="seconds between val evals")
    ap.add_argument("--eval-seqs", type=int, default=8)
    ap.add_argument("--test-seqs", type=int, default=0, help="cap on test crops (0: all)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument(
        "--mtp-weight", type=float, default=0.0,
        help="train the MTP layer (mtp.0.*, the speculative draft) with this loss weight",
    )  # fmt: skip
    ap.add_argument(
        "--mtp-only", action="store_true",
        help="with --init: train only the MTP layer (the main model stays as it is)",
    )  # fmt: skip
    ap.add_argument("--plot", nargs=2, metavar=("LOG", "PNG"))
    args = ap.parse_args()
    if args.mtp_only and not (args.mtp_weight > 0 and args.init is not None):
        ap.error("--mtp-only trains the MTP layer of --init's model: give --init and --mtp-weight")
    if args.mtp_only:  # the validation loss tracked is the main model's: it does not change
        args.keep = "last"
    return args


class Progress:
    """tqdm when installed, else a line every few seconds."""

    def __init__(self, total: float, unit: str):
        self.total, self.unit, self.last, self.n = total, unit, 0.0, 0.0
        try:
            from tqdm import tqdm

            fmt = "{l_bar}{bar}| {n:.0f}/{total:.0f} {unit} [{elapsed}<{remaining}]{postfix}"
            self.bar = tqdm(total=total, unit=unit, bar_format=fmt, mininterval=2, file=sys.stdout)
        except ImportError:
            self.bar = None

    def update(self, n: float, **info) -> None:
        self.n = n
        if self.bar is not None:
            self.bar.set_postfix(info, refresh=False)
            self.bar.update(n - self.bar.n)
        elif time.time() - self.last > 5:
            self.last = time.time()
            pct = 100 * n / self.total
            print(f"[{pct:5.1f}%] {n:.0f}/{self.total:.0f} {self.unit} {info}", flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def lr_at(progress: float, step: int, args) -> float:
    warm = min(1.0, (step + 1) / args.warmup)
    cos = 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))
    return args.lr * warm * (args.min_lr_frac + (1 - args.min_lr_frac) * cos)


def make_optimizer(model: TrainDSV4, args) -> torch.optim.Optimizer:
    decay, rest = [], []
    for name, p in model.named_parameters():
        is_matrix = p.dim() >= 2 and not name.endswith("_fn")
        (decay if is_matrix else rest).append(p)
    groups = [
        {"params": decay, "weight_decay": args.weight_decay},
        {"params": rest, "weight_decay": 0.0},
    ]
    fused = {"fused": True} if args.device.startswith("cuda") else {}
    return torch.optim.AdamW(groups, lr=args.lr, betas=(0.9, 0.95), eps=1e-8, **fused)


def autocast(device: str):
    if device.startswith("cuda"):
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def eval_crops(stream: np.ndarray, n: int, seq_len: int) -> torch.Tensor:
    """``n`` evenly spaced, non-overlapping (when possible) crops of ``seq_len + 1`` tokens."""
    starts = np.linspace(0, len(stream) - seq_len - 1, n).astype(np.int64)
    return torch.from_numpy(np.stack([stream[s : s + seq_len + 1] for s in starts]))


@torch.no_grad()
def evaluate(model: TrainDSV4, crops: torch.Tensor, args, fp32: bool = False, recall=False):
    """(mean loss, top-1 accuracy, {layer: [set recall, mass recall, rows]}) over ``crops``."""
    model.eval()
    loss_sum, hits, count, recalls = 0.0, 0, 0, {}
    ctx = contextlib.nullcontext() if fp32 else autocast(args.device)
    for chunk in crops.split(max(1, args.micro_batch // 2)):
        chunk = chunk.to(args.device)
        with ctx:
            out = model(chunk[:, :-1], sparse=True, recall=recall)
        logits = out.logits.float()
        targets = chunk[:, 1:]
        loss_sum += F.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction="sum").item()
        hits += (logits.argmax(-1) == targets).sum().item()
        count += targets.numel()
        if out.mtp_logits is not None:  # the draft's top-1 = its chance of being accepted
            mtp_hits = (out.mtp_logits[:, :-1].argmax(-1) == chunk[:, 2:]).sum().item()
            recalls.setdefault("mtp_top1", []).append(torch.tensor(mtp_hits / targets.numel()))
        for layer, r in out.recall.items():
            recalls.setdefault(layer, []).append(r.cpu())
    model.train()
    merged = {k: torch.stack(v).mean(0).tolist() for k, v in recalls.items()}
    return loss_sum / count, hits / count, merged


def update_router_bias(model: TrainDSV4, loads: dict[int, torch.Tensor], rate: float) -> None:
    """Aux-loss-free balancing: raise the bias of under-loaded experts, lower the others."""
    with torch.no_grad():
        for layer, load in loads.items():
            load = load.float()
            model.layers[layer].ffn.gate.bias.add_(rate * torch.sign(load.mean() - load))


def initial_model(cfg: DSV4Config, args) -> TrainDSV4:
    """Fresh weights, or --init's (fine-tuning)."""
    model = TrainDSV4(cfg, dropout=args.dropout, mtp=args.mtp_weight > 0)
    init_weights(model, args.seed)
    if args.init is not None:
        from sglang_dsv4.checkpoint import load_state_dict

        start = load_state_dict(args.init)  # a checkpoint without an MTP layer: drawn fresh
        missing, unexpected = model.load_state_dict(
            {k: v.float() if v.is_floating_point() else v for k, v in start.items()}, strict=False
        )
        if unexpected or any(not k.startswith("mtp.") for k in missing):
            raise ValueError(f"--init does not fit: missing {missing}, unexpected {unexpected}")
    if args.mtp_only:
        for name, p in model.named_parameters():
            p.requires_grad_(name.startswith("mtp."))
    return model


def train(args) -> dict:
    torch.manual_seed(args.seed)
    if args.threads:
        torch.set_num_threads(args.threads)
    corpus, raw_cfg, cfg = prepare(args)
    model = initial_model(cfg, args)
    model.to(args.device).train()
    n_params = sum(p.numel() for p in model.parameters())
    print(f"model: {n_params / 1e6:.2f}M parameters, layers {[s.attn.name for s in cfg.layers]}")
    opt = make_optimizer(model, args)
    val = eval_crops(corpus.val, args.eval_seqs, args.seq_len)
    log = {"args": {k: str(v) for k, v in vars(args).items()}, "params": n_params, "curve": []}
    step, micro, best, train_s = fit(model, opt, corpus, val, log, args)
    tokens = step * args.batch * args.seq_len
    print(f"trained {step} steps, {tokens / 1e6:.1f}M tokens in {train_s:.0f}s", flush=True)

    # a final validation point, then the best checkpoint, measured as served: fp32, top-k
    val_loss = evaluate(model, val, args)[0]
    if val_loss < best["val_loss"] or args.keep == "last":
        best = {"val_loss": val_loss, "step": step, "state": model.state_dict()}
    model.load_state_dict(best["state"])
    n_test = max(1, (len(corpus.test) - 1) // args.seq_len)
    n_test = min(n_test, args.test_seqs) if args.test_seqs else n_test
    test = eval_crops(corpus.test, n_test, args.seq_len)
    final = {
        "steps": step,
        "train_seconds": train_s,
        "tokens": tokens,
        "best_step": best["step"],
        "val_loss": best["val_loss"],
    }
    final |= evaluate_test(model, test, args)
    final["micro_batch"] = micro
    final["device"] = torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu"
    # random top-k picks cover index_topk / visible entries on average (visible ~ uniform in t)
    k, entries = cfg.index_topk, args.seq_len // 4
    final["indexer_recall_random"] = _random_recall(k, entries)
    log["final"] = final
    save_checkpoint(model, raw_cfg, args.out)
    try:
        final["hf_check"] = hf_check(model, args.out, test[:1, :-1])
    except Exception as e:  # informative only: the shipped check runs on transformers 5.12.1
        final["hf_check"] = {"error": f"{type(e).__name__}: {e}"}
    (args.out / "train_log.json").write_text(json.dumps(log, indent=1) + "\n")
    print(json.dumps(final, indent=1))
    return log


def prepare(args) -> tuple[Corpus, dict, DSV4Config]:
    """The plays, the tokenizer (``--init``'s, the one in ``--out``, or trained now), the corpus
    and the config (its vocabulary the tokenizer's) -> (corpus, raw config dict, config)."""
    args.out.mkdir(parents=True, exist_ok=True)
    if args.config is None:
        args.config = (args.init or ROOT / "configs") / (
            "config.json" if args.init else "dsv4-tiny.json"
        )
    t0 = time.time()
    plays = load_plays()
    tok_file = args.out / "tokenizer.json"
    if args.init is not None and args.init.resolve() != args.out.resolve():
        for name in ("tokenizer.json", "tokenizer_config.json"):
            shutil.copy(args.init / name, args.out / name)
    if args.retrain_tokenizer or not tok_file.exists():
        train_texts = [text for name, text in plays.items() if name not in HELD_OUT]
        save_tokenizer(build_tokenizer(train_texts, args.vocab), args.out)
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(tok_file))
    corpus = Corpus(tok, plays)
    raw_cfg = json.loads(args.config.read_text())
    raw_cfg["vocab_size"] = tok.get_vocab_size()
    raw_cfg["torch_dtype"] = "bfloat16"  # the stored weights (SGLang's "auto" serves this dtype)
    cfg = DSV4Config.from_dict(raw_cfg)
    print(
        f"data: {len(corpus.train)} training tokens ({len(corpus.train_names)} plays), "
        f"val {len(corpus.val)}, test {len(corpus.test)}; vocab {cfg.vocab_size}; "
        f"prep {time.time() - t0:.1f}s",
        flush=True,
    )
    return corpus, raw_cfg, cfg


def fit(model: TrainDSV4, opt, corpus: Corpus, val: torch.Tensor, log: dict, args):
    """Optimizer steps until ``--steps`` or the ``--minutes`` budget is spent, appending the
    curve to ``log``; an out-of-memory step is retried with half the micro-batch. -> (steps,
    micro-batch, best {val_loss, step, state} of the validation points, training seconds)."""
    rng = np.random.default_rng(args.seed)
    mix = SampleMix(
        fact_prob=args.fact_prob,
        chat_prob=args.chat_prob,
        think_prob=args.think_prob,
        tool_prob=args.tool_prob,
    )
    budget = args.minutes * 60
    best = {"val_loss": float("inf"), "step": -1, "state": None}
    bar = Progress(args.steps or budget, "steps" if args.steps else "s")
    step, start, last_eval, micro = 0, time.time(), 0.0, args.micro_batch
    while True:
        elapsed = time.time() - start
        progress = step / args.steps if args.steps else elapsed / budget
        if progress >= 1.0:
            break
        lr = lr_at(progress, step, args)
        for group in opt.param_groups:
            group["lr"] = lr
        sparse = progress >= args.dense_frac
        batch = torch.from_numpy(
            np.stack([corpus.sample(rng, args.seq_len + 1, mix) for _ in range(args.batch)])
        )
        try:
            lm_loss, kl, loads, mtp_loss = _step(model, batch, micro, sparse, args)
        except torch.cuda.OutOfMemoryError:
            if micro == 1:
                raise
            micro //= 2
            opt.zero_grad(set_to_none=True)
            torch.cuda.empty_cache()
            print(f"out of memory: micro-batch now {micro}", flush=True)
            continue
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if not args.mtp_only:
            update_router_bias(model, loads, args.bias_rate)
        step += 1
        row = {"step": step, "time": round(time.time() - start, 2), "lr": lr, "sparse": sparse}
        if step % 5 == 0 or step == 1:
            row |= {"loss": lm_loss.item(), "indexer_kl": kl.item()}
            if mtp_loss is not None:
                row["mtp_loss"] = mtp_loss.item()
        now = time.time() - start
        if now - last_eval >= args.eval_every or (args.steps and step == args.steps):
            last_eval = now
            val_loss, val_acc, _ = evaluate(model, val, args)
            row |= {"val_loss": val_loss, "val_acc": val_acc}
            if val_loss < best["val_loss"]:
                state = {k: v.detach().clone() for k, v in model.state_dict().items()}
                best = {"val_loss": val_loss, "step": step, "state": state}
        log["curve"].append(row)
        info = {"loss": f"{log_last(log, 'loss'):.3f}", "val": f"{best['val_loss']:.3f}"}
        bar.update(step if args.steps else min(now, budget), step=step, **info)
    bar.close()
    return step, micro, best, time.time() - start


def evaluate_test(model: TrainDSV4, test: torch.Tensor, args) -> dict:
    """The kept model on the test crops as served (fp32, top-k): loss, perplexity, top-1, the
    MTP draft's top-1 and the c4 indexers' recall of the attention's top entries."""
    test_loss, test_acc, recall = evaluate(model, test, args, fp32=True, recall=True)
    mtp_top1 = recall.pop("mtp_top1", None)  # the MTP draft's next-next-token top-1
    return {
        "test_loss_fp32": test_loss,
        "test_ppl_fp32": math.exp(test_loss),
        "test_top1_fp32": test_acc,
        "test_mtp_top1_fp32": mtp_top1,
        "test_tokens": int(test[:, 1:].numel()),
        "indexer_recall": {
            str(k): {"set_recall": v[0], "mass_recall": v[1], "queries_per_seq": v[2]}
            for k, v in recall.items()
        },
    }


def _random_recall(k: int, entries: int) -> float:
    """Expected set recall of k random picks among the visible entries, over queries seeing > k."""
    visible = np.arange(k + 1, entries + 1)
    return float(np.mean(k / visible))


def log_last(log: dict, key: str) -> float:
    for row in reversed(log["curve"]):
        if key in row:
            return row[key]
    return float("nan")


def _step(model, batch, micro, sparse, args):
    """Forward + backward of ``batch`` [B, S+1] in micro-batches; returns (lm loss, kl, loads,
    MTP loss or None)."""
    lm_total = torch.zeros((), device=args.device)
    mtp_total = None
    kl_total = torch.zeros((), device=args.device)
    loads: dict[int, torch.Tensor] = {}
    parts = batch.split(micro)
    for part in parts:
        part = part.to(args.device, non_blocking=True)
        with autocast(args.device):
            out = model(part[:, :-1], sparse=sparse, indexer_kl=True)
        lm = F.cross_entropy(out.logits.float().flatten(0, 1), part[:, 1:].flatten())
        loss = lm + out.indexer_kl
        if out.mtp_logits is not None:  # position t predicts token t+2
            mtp = out.mtp_logits[:, :-1].float().flatten(0, 1)
            mtp_loss = F.cross_entropy(mtp, part[:, 2:].flatten())
            mtp_total = (0 if mtp_total is None else mtp_total) + mtp_loss.detach() / len(parts)
            # --mtp-only: the main model gets no gradient, so its loss terms are left out
            loss = args.mtp_weight * mtp_loss + (0 if args.mtp_only else loss)
        loss = loss / len(parts)
        loss.backward()
        lm_total += lm.detach() / len(parts)
        kl_total += out.indexer_kl.detach() / len(parts)
        for layer, load in out.expert_load.items():
            loads[layer] = loads.get(layer, 0) + load
    return lm_total, kl_total, loads, mtp_total


def save_checkpoint(model: TrainDSV4, raw_cfg: dict, out: Path, shard_mb: float = 12) -> None:
    """``config.json`` and the weights in HF's sharded layout (``model-0000i-of-0000n``
    + ``model.safetensors.index.json``), shards of at most ``shard_mb`` MB."""
    from safetensors.torch import save_file

    tensors = export_state_dict(model)
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, t in tensors.items():
        nbytes = t.numel() * t.element_size()
        if shards[-1] and size + nbytes > shard_mb * 1e6:
            shards.append({})
            size = 0
        shards[-1][name] = t
        size += nbytes
    for old in out.glob("model*.safetensors*"):
        old.unlink()
    weight_map = {}
    for i, shard in enumerate(shards):
        fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, out / fname, metadata={"format": "pt"})
        weight_map |= dict.fromkeys(shard, fname)
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=1) + "\n")
    (out / "config.json").write_text(json.dumps(raw_cfg, indent=2) + "\n")


def hf_check(model: TrainDSV4, out: Path, ids: torch.Tensor) -> dict:
    """Max |logit diff| of HF transformers' DeepseekV4ForCausalLM loaded from ``out`` (fp32)
    against this model in fp32 with the same (saved, bf16-rounded) weights."""
    import transformers
    from transformers import DeepseekV4ForCausalLM

    device = next(model.parameters()).device
    hf = DeepseekV4ForCausalLM.from_pretrained(str(out), dtype=torch.float32).to(device).eval()
    from sglang_dsv4.checkpoint import load_state_dict

    saved = load_state_dict(out)  # the main model (HF has no MTP layer)
    saved = {k: v.float() if v.is_floating_point() else v for k, v in saved.items()}
    model.load_state_dict(saved, strict=model.mtp is None)
    model.eval()
    with torch.no_grad():
        ours = model(ids.to(device)).logits
        theirs = hf(ids.to(device)).logits
    return {
        "transformers": transformers.__version__,
        "tokens": ids.shape[1],
        "max_abs_logit_diff": (ours - theirs).abs().max().item(),
        "argmax_agree": (ours.argmax(-1) == theirs.argmax(-1)).float().mean().item(),
    }


def plot_log(log_path: Path, png: Path) -> None:
    from sglang_dsv4.evals.plot import Figure, Panel

    log = json.loads(log_path.read_text())
    curve = log["curve"]
    train = [(r["step"], r["loss"]) for r in curve if "loss" in r]
    val = [(r["step"], r["val_loss"]) for r in curve if "val_loss" in r]
    kl = [(r["step"], r["indexer_kl"]) for r in curve if "indexer_kl" in r]
    final = log.get("final", {})
    title = (
        f"tiny DSV4 on Shakespeare: {final.get('steps', '?')} steps, "
        f"{final.get('tokens', 0) / 1e6:.0f}M tokens, {final.get('device', '')}; "
        f"kept step {final.get('best_step', '?')} (best val); "
        f"test ppl {final.get('test_ppl_fp32', float('nan')):.1f} (fp32, top-k)"
    )
    fig = Figure(cols=2, rows=1, title=title)
    fig.add(
        Panel(
            "language-model loss (nats/token)",
            xlabel="step",
            lines={
                "train (sampled batch)": tuple(map(list, zip(*train, strict=True))),
                "val (twelfth-night)": tuple(map(list, zip(*val, strict=True))),
            },
        )
    )
    fig.add(
        Panel(
            "c4 indexer KL(attention || indexer)",
            xlabel="step",
            log_y=True,
            lines={"indexer KL": tuple(map(list, zip(*kl, strict=True)))},
        )
    )
    fig.save(png)


def main() -> int:
    args = parse_args()
    if args.plot:
        plot_log(Path(args.plot[0]), Path(args.plot[1]))
        return 0
    train(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
