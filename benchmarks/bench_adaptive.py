"""Benchmark of adaptive exit and the KV policies (loopreg.adaptive), side by side in one run.

    .venv/bin/python benchmarks/bench_adaptive.py             # prints the figures as JSON

1. Greedy cached decoding of a batch on a (1⊗1)+(2⊗8)+(1⊗1) LoopedLM, d=256 (random init: this measures the
   compute, not the accuracy): fixed 8 loops vs ``--exit`` (a threshold at which rows exit early). Reports the
   time ratio, and the mean and executed thinking iterations per token (ExitStats).
2. KV-cache memory of ``shared`` vs ``per_application`` for the same batch and length: bytes and ratio.

Fixed and exit runs alternate and the median of each is reported, so machine noise hits both alike.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
from transformers import DynamicCache

from loopreg.adaptive import ExitStats
from loopreg.model import LoopedLM, LoopedLMConfig


def bench_decode(model: LoopedLM, ids: torch.Tensor, new: int, rule: str, repeats: int) -> dict:
    def run(exit: str | None) -> tuple[float, ExitStats]:
        stats = ExitStats()
        start = time.perf_counter()
        model.generate(ids, max_new_tokens=new, min_new_tokens=new, do_sample=False, exit=exit, exit_stats=stats)
        return time.perf_counter() - start, stats

    run(None), run(rule)  # warm-up
    fixed, exiting = [], []
    for _ in range(repeats):
        fixed.append(run(None)[0])
        seconds, stats = run(rule)
        exiting.append(seconds)
    return {"exit": rule, "decode_s_fixed": statistics.median(fixed), "decode_s_exit": statistics.median(exiting),
            "time_ratio_exit_over_fixed": statistics.median(exiting) / statistics.median(fixed),
            "mean_loops": stats.mean_loops, "executed_loops": stats.executed_loops, "max_loops": stats.max_loops}


def bench_kv_memory(model: LoopedLM, batch: int, length: int) -> dict:
    ids = torch.randint(0, model.config.vocab_size, (batch, length))
    sizes = {}
    for policy in ("per_application", "shared"):
        cache = DynamicCache()
        with torch.no_grad():
            model(ids, cache=cache, use_cache=True, kv_policy=policy)
        sizes[policy] = sum(keys.nbytes + values.nbytes for keys, values in cache)
    return {"kv_bytes_per_application": sizes["per_application"], "kv_bytes_shared": sizes["shared"],
            "kv_ratio_shared_over_per_application": sizes["shared"] / sizes["per_application"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--spec", default="1x1+2x8+1x1")
    parser.add_argument("--exit", default="kl:1e-2", help="the exit rule timed against fixed loops")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--prompt", type=int, default=64)
    parser.add_argument("--new", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    torch.manual_seed(0)
    model = LoopedLM(LoopedLMConfig(spec=args.spec, vocab_size=512, d_model=256, n_heads=8, max_seq_len=512)).eval()
    ids = torch.randint(0, 512, (args.batch, args.prompt))
    figures = {"spec": args.spec, "batch": args.batch, "prompt": args.prompt, "new_tokens": args.new,
               "threads": torch.get_num_threads(), **bench_decode(model, ids, args.new, args.exit, args.repeats),
               **bench_kv_memory(model, args.batch, args.prompt + args.new)}
    print(json.dumps(figures, indent=2))


if __name__ == "__main__":
    main()
