"""Accept length of the MTP draft through the real server (EAGLE, top-k 1), greedy.

    python scripts/mtp_accept.py [--model dsv4] [--steps 1,2,3] [--prompts 4] [--new 64]
                                 [--out docs/mtp_accept.json]

Prompts: crops of the held-out test plays (``hamlet``, ``the-tempest``; never trained on), as
token ids. For each ``--steps`` value ``s`` one server runs with ``--speculative-algorithm EAGLE
--speculative-num-steps s --speculative-eagle-topk 1 --speculative-num-draft-tokens s+1``, plus
one server without speculation: every speculative output must equal the plain greedy output
(speculation is exact), and the accept length is SGLang's own ``meta_info``
``spec_accept_length`` (completion tokens / verify passes, bonus token included), pooled over
the prompts as sum(tokens) / sum(verify passes). The servers run in ``--dtype float32`` by
default: there speculation is exact; in bfloat16 a verify pass (an extend over the draft
tokens) rounds differently from a decode step, so greedy outputs may part at near-ties
(``first_difference``). On a CPU-only machine SGLang's speculative workers need greedy requests
(the plugin refuses others there).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from sglang_dsv4.server_process import Server  # noqa: E402

SERVER_ARGS = ["--sleep-on-idle", "--max-running-requests", "4"]


def spec_flags(steps: int) -> list[str]:
    return [
        "--speculative-algorithm", "EAGLE",
        "--speculative-num-steps", str(steps),
        "--speculative-eagle-topk", "1",
        "--speculative-num-draft-tokens", str(steps + 1),
    ]  # fmt: skip


def run_server(model_args: list[str], extra: list[str], prompts, new: int, log: Path) -> dict:
    t0 = time.time()
    srv = Server([*model_args, *SERVER_ARGS, *extra], log, timeout=900)
    try:
        outs = [srv.generate(ids, new, timeout=1800, return_logprob=False) for ids in prompts]
    finally:
        srv.stop()
    metas = [o["meta_info"] for o in outs]
    row = {"output_ids": [o["output_ids"] for o in outs], "seconds": round(time.time() - t0, 1)}
    if extra:
        tokens = sum(m["completion_tokens"] for m in metas)
        verifies = sum(m.get("spec_verify_ct", 0) for m in metas)
        row["accept_length"] = tokens / verifies if verifies else None
        row["per_prompt"] = [m.get("spec_accept_length") for m in metas]
        row["verify_passes"] = verifies
        row["tokens"] = tokens
    return row


def _first_difference(a: list[int], b: list[int]) -> int | None:
    """Index of the first generated token where ``a`` and ``b`` differ (None: equal)."""
    return next((i for i, (x, y) in enumerate(zip(a, b, strict=True)) if x != y), None)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--model", default="dsv4", help="--model / --model-path of the server")
    ap.add_argument("--steps", default="1,2,3")
    ap.add_argument("--prompts", type=int, default=4)
    ap.add_argument("--prompt-len", type=int, default=200)
    ap.add_argument("--new", type=int, default=64)
    ap.add_argument("--out", type=Path)
    ap.add_argument(
        "--dtype", default="float32",
        help="server --dtype: float32 (default) makes speculative output equal plain output; "
        "in bfloat16 a verify pass (an extend) and a decode step round differently",
    )  # fmt: skip
    args = ap.parse_args()

    from sglang_dsv4.embedded import resolve_model_name

    path = Path(resolve_model_name(args.model) or args.model)
    from tokenizers import Tokenizer

    from sglang_dsv4.train.data import held_out_crops

    tok = Tokenizer.from_file(str(path / "tokenizer.json"))
    prompts = held_out_crops(tok, args.prompts, args.prompt_len)
    model_args = ["--model-path", args.model, "--dtype", args.dtype]  # the plugin resolves "dsv4"
    logs = Path(tempfile.mkdtemp(prefix="mtp_accept_"))
    result = {
        "model": args.model,
        "dtype": args.dtype,
        "prompt_tokens": [len(p) for p in prompts],
        "new": args.new,
    }
    plain = run_server(model_args, [], prompts, args.new, logs / "plain.log")
    result["plain_seconds"] = plain["seconds"]
    result["speculative"] = {}
    for steps in map(int, args.steps.split(",")):
        row = run_server(model_args, spec_flags(steps), prompts, args.new, logs / f"s{steps}.log")
        outs = row.pop("output_ids")
        row["equal_to_plain"] = outs == plain["output_ids"]
        row["first_difference"] = [
            _first_difference(a, b) for a, b in zip(outs, plain["output_ids"], strict=True)
        ]
        result["speculative"][steps] = row
        accept, per = row["accept_length"], row["per_prompt"]
        print(
            f"steps {steps} (draft tokens {steps + 1}): accept length {accept:.3f}, per prompt "
            f"{per}, equal to plain {row['equal_to_plain']} ({row['seconds']} s)",
            flush=True,
        )
    print(json.dumps(result, indent=1))
    if args.out:
        args.out.write_text(json.dumps(result, indent=1) + "\n")
    ok = all(r["equal_to_plain"] for r in result["speculative"].values())
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
