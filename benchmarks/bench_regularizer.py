"""Cost of the cosine regularizer: training-step time and peak memory with / without it, side by side.

    .venv/bin/python benchmarks/bench_regularizer.py          # 24-layer d=512 untied (4⊗6) model, 4096 tokens

1. Step time (forward + loss + backward + AdamW) of the same model with and without ``λ·penalty``, the
   penalty built before the forward as ``LoopRegularizer`` does; A and B alternate and the medians are
   compared (target ratio ≤ 1.03).
2. Peak memory of one step, each variant in a fresh process (A, B, A, B; medians) with glibc's mmap
   threshold fixed so freed buffers go back to the OS and the peak RSS is the real high-water mark
   (target ratio ≤ 1.02: no weight-sized copy per step).

One intra-op thread by default: on a 2-core machine shared with other jobs every multi-threaded op
waits ~11 ms for OpenMP's sleeping thread (a 16k-element dot: 13 ms with 2 threads, 0.003 ms with 1),
which makes even the plain step slower (65 s vs 52 s here) and turns a count of small ops into time.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

import torch
import torch.nn.functional as F

from loopreg.algorithms import loop_regularization
from loopreg.model import LoopedLM, LoopedLMConfig

VOCAB = 1024


def make_step(args: argparse.Namespace):
    """A training step with (``regularized=True``) or without the regularizer, on one shared model."""
    torch.manual_seed(0)
    model = LoopedLM(LoopedLMConfig(spec=f"{args.block_size}x{args.layers // args.block_size}", tied=False,
                                    vocab_size=VOCAB, d_model=args.d_model, n_heads=8, max_seq_len=args.seq))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    tokens = torch.randint(0, VOCAB, (args.batch, args.seq))

    def step(regularized: bool) -> None:
        penalty = loop_regularization(model).penalty if regularized else 0.0
        logits = model(tokens)
        loss = F.cross_entropy(logits[:, :-1].flatten(0, 1), tokens[:, 1:].flatten()) + 10.0 * penalty
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def bench_time(args: argparse.Namespace) -> dict:
    step = make_step(args)
    times: dict[bool, list[float]] = {False: [], True: []}
    for regularized in (False, True):  # warm-up; also allocates the optimizer state
        step(regularized)
    for _ in range(args.repeats):
        for regularized in (False, True):
            start = time.perf_counter()
            step(regularized)
            times[regularized].append(time.perf_counter() - start)
    plain, regularized = statistics.median(times[False]), statistics.median(times[True])
    return {"step_s_plain": plain, "step_s_regularized": regularized, "step_time_ratio": regularized / plain}


def peak_rss_mb(args: argparse.Namespace, regularized: bool) -> float:
    """Peak RSS of a fresh process that builds the model and runs one step."""
    command = [sys.executable, __file__, "--probe", "reg" if regularized else "plain", *sys.argv[1:]]
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": str(1 << 20)}
    result = subprocess.run(command, env=env, capture_output=True, text=True, check=True)
    return float(result.stdout.strip().splitlines()[-1])


def bench_memory(args: argparse.Namespace) -> dict:
    peaks: dict[bool, list[float]] = {False: [], True: []}
    for _ in range(args.memory_repeats):
        for regularized in (False, True):
            peaks[regularized].append(peak_rss_mb(args, regularized))
    plain, regularized = statistics.median(peaks[False]), statistics.median(peaks[True])
    return {"peak_rss_mb_plain": plain, "peak_rss_mb_regularized": regularized, "peak_memory_ratio": regularized / plain}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=24)
    parser.add_argument("--block-size", type=int, default=4)
    parser.add_argument("--d-model", type=int, default=512)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=3, help="timed A/B pairs")
    parser.add_argument("--memory-repeats", type=int, default=2, help="fresh-process A/B pairs for peak memory")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (see the module docstring)")
    parser.add_argument("--probe", choices=["plain", "reg"], help=argparse.SUPPRESS)  # one memory probe
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.probe:
        make_step(args)(args.probe == "reg")
        print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)  # KiB on Linux
        return
    tokens = args.batch * args.seq
    print(f"untied {args.layers}-layer d={args.d_model} model in blocks of {args.block_size}, {tokens} tokens/step, "
          f"{torch.get_num_threads()} threads", flush=True)
    results = {"tokens_per_step": tokens, **bench_time(args), **bench_memory(args)}
    print(json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in results.items()}, indent=2))


if __name__ == "__main__":
    main()
