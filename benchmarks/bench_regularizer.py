"""Cost of the cosine regularizer: training-step time and peak memory with / without it, side by side.

    .venv/bin/python benchmarks/bench_regularizer.py          # 24-layer d=512 untied (4⊗6) model, 4096 tokens

1. Step time (forward + loss + backward + AdamW) of the same model with and without ``λ·penalty``, the
   penalty built before the forward as ``LoopRegularizer`` does; A and B alternate (AB, BA, AB, …) and
   the median of the per-pair ratios is reported (target ≤ 1.03).
2. Peak memory of one step, each variant in a fresh process (medians over repeats) with glibc's mmap
   threshold fixed so freed buffers go back to the OS and the peak RSS is the real high-water mark
   (target ratio ≤ 1.02: no weight-sized copy per step). A control builds the penalty after the loss
   instead, which holds its weight-sized gradients through the backward: the probe must see that.

One intra-op thread by default: on a 2-core machine shared with other jobs every multi-threaded op
waits ~11 ms for OpenMP's sleeping thread (a 16k-element dot: 13 ms with 2 threads, 0.003 ms with 1),
which makes even the plain step slower (65 s vs 52 s here) and turns a count of small ops into time.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from loopreg.algorithms.loop_regularizer import regularizer_layout
from loopreg.model import LoopedLM, LoopedLMConfig

VOCAB = 1024


def make_step(args: argparse.Namespace):
    """A training step without the regularizer (``"plain"``), with it (``"reg"``), or with the penalty
    built after the loss (``"reg_after_loss"``, the memory control), on one shared model."""
    torch.manual_seed(0)
    model = LoopedLM(LoopedLMConfig(spec=f"{args.block_size}x{args.layers // args.block_size}", tied=False,
                                    vocab_size=VOCAB, d_model=args.d_model, n_heads=8, max_seq_len=args.seq))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    tokens = torch.randint(0, VOCAB, (args.batch, args.seq))
    layout = regularizer_layout(model)  # resolved once, as LoopRegularizer does

    def step(variant: str) -> None:
        penalty = layout.regularization().penalty if variant == "reg" else 0.0
        logits = model(tokens).logits
        loss = F.cross_entropy(logits[:, :-1].flatten(0, 1), tokens[:, 1:].flatten())
        if variant == "reg_after_loss":
            penalty = layout.regularization().penalty
        (loss + 10.0 * penalty).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def bench_time(args: argparse.Namespace) -> dict:
    step = make_step(args)
    times: dict[str, list[float]] = {"plain": [], "reg": []}
    for variant in times:  # warm-up; also allocates the optimizer state
        step(variant)
    for repeat in range(args.repeats):
        for variant in (("plain", "reg") if repeat % 2 == 0 else ("reg", "plain")):
            start = time.perf_counter()
            step(variant)
            times[variant].append(time.perf_counter() - start)
    ratios = [reg / plain for reg, plain in zip(times["reg"], times["plain"])]
    return {"step_s_plain": times["plain"], "step_s_regularized": times["reg"],
            "step_time_ratio": statistics.median(ratios)}


def peak_rss_mb(variant: str) -> float:
    """Peak RSS of a fresh process that builds the model and runs one step."""
    command = [sys.executable, __file__, "--probe", variant, *sys.argv[1:]]
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": str(1 << 20)}
    result = subprocess.run(command, env=env, capture_output=True, text=True, check=True)
    return float(result.stdout.strip().splitlines()[-1])


def bench_memory(args: argparse.Namespace) -> dict:
    peaks: dict[str, list[float]] = {"plain": [], "reg": [], "reg_after_loss": []}
    for _ in range(args.memory_repeats):
        for variant in peaks:
            peaks[variant].append(peak_rss_mb(variant))
    plain, regularized, control = (statistics.median(peaks[variant]) for variant in peaks)
    return {"peak_rss_mb_plain": plain, "peak_rss_mb_regularized": regularized,
            "peak_memory_ratio": regularized / plain, "control_peak_memory_ratio_built_after_loss": control / plain}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=24)
    parser.add_argument("--block-size", type=int, default=4)
    parser.add_argument("--d-model", type=int, default=512)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=5, help="timed A/B pairs")
    parser.add_argument("--memory-repeats", type=int, default=1, help="fresh-process probes per variant")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (see the module docstring)")
    parser.add_argument("--probe", choices=["plain", "reg", "reg_after_loss"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.probe:
        make_step(args)(args.probe)
        # VmHWM is this address space's peak; ru_maxrss would keep the parent's (fork + exec carries it over).
        status = Path("/proc/self/status").read_text()
        print(int(next(line for line in status.splitlines() if line.startswith("VmHWM:")).split()[1]) / 1024)
        return
    tokens = args.batch * args.seq
    print(f"untied {args.layers}-layer d={args.d_model} model in blocks of {args.block_size}, {tokens} tokens/step, "
          f"{torch.get_num_threads()} threads", flush=True)
    results = {"tokens_per_step": tokens, **bench_memory(args), **bench_time(args)}
    rounded = {k: [round(x, 2) for x in v] if isinstance(v, list) else round(v, 4) for k, v in results.items()}
    print(json.dumps(rounded, indent=2))


if __name__ == "__main__":
    main()
