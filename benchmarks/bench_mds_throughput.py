"""Loader throughput of ``train_data.kind: mds`` per DataLoader worker on this CPU, against what ``loop_12x2``
consumes per GPU on an H200: the headroom ratio (target >= 2 with the recipe's ``train_data.num_workers``).

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_mds_throughput.py      # about 2 min on 2 shared cores

Supply: the loader the ``mds`` kind builds for ``recipes/loop_12x2.yaml`` (rank 0 of the recipe's 8 GPUs, so the
per-device batch is 512 / 8 = 64 sequences of 1280 tokens), with ONE DataLoader worker process: MDS shard read,
``int64`` tensors, default collate, the batch sent back to the trainer process. Timed after ``--warmup`` batches,
over ``--batches`` batches, median of ``--repeats``. The shards hold the shared Wikipedia passages (byte_level,
repeated ``--copies`` times). The ``text`` kind's loader (tokenizing on the fly, byte_level) is timed alike for
reference. This machine's 2 cores are shared with other jobs: the figures are lower bounds.

Demand: model FLOPs per token = 6 · N, N = the parameters every token passes through: each layer application's
parameters (24 applications of 12 tied layers for (12⊗2)) plus the LM head (d_model · vocab); the input embedding
is a lookup, not a matmul, and is not counted. The GPU consumes 0.45 · 989e12 / (6 · N) tokens/s (45% MFU of the
H200's dense bf16 peak). Attention's T² FLOPs (which ``ComposerLoopedLM.flops_per_batch`` adds for MFU) are left
out: fewer FLOPs per token means more tokens/s demanded, so the headroom printed is the conservative one.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RECIPE = REPO / "recipes" / "loop_12x2.yaml"
DEFAULT_SOURCE = REPO.parent / "shared" / "textdata" / "wiki_passages_train.jsonl"
H200_BF16_FLOPS = 989e12
MFU = 0.45
RECIPE_GPUS = 8  # `composer -n 8 recipes/loop_12x2.yaml`: the recipe's global batch 512 over 8 GPUs


def gpu_demand(recipe_path: Path = RECIPE) -> dict:
    """Tokens/s one H200 consumes training ``recipe_path``'s model at 45% MFU, from the real config on the meta
    device."""
    import torch

    from loopreg.composer_model import ComposerLoopedLM
    from loopreg.config import load_recipe, model_config

    recipe = load_recipe(recipe_path)
    with torch.device("meta"):
        model = ComposerLoopedLM(model_config(recipe.model))
    lm = model.model
    applications = len(lm.schedule())
    per_application = sum(p.numel() for p in lm.layers[0].parameters())
    head = lm.lm_head.weight.numel()
    n = per_application * applications + head
    flops_per_token = 6 * n
    batch = {"input_ids": torch.zeros(1, recipe.max_seq_len, dtype=torch.long)}
    with_attention = model.flops_per_batch(batch) / recipe.max_seq_len
    stored = sum(p.numel() for p in lm.parameters())
    return {"spec": recipe.model.spec, "tied": recipe.model.tied, "applications": applications,
            "params_per_application": per_application, "head_params": head, "N": n, "stored_params": stored,
            "flops_per_token": flops_per_token, "flops_per_token_with_attention": with_attention,
            "tokens_per_s_per_gpu": MFU * H200_BF16_FLOPS / flops_per_token,
            "tokens_per_s_per_gpu_with_attention": MFU * H200_BF16_FLOPS / with_attention,
            "num_workers": recipe.train_data.num_workers, "per_device_batch": recipe.global_train_batch_size //
            RECIPE_GPUS, "seq_len": recipe.max_seq_len}


def loader_throughput(kind: str, source: Path, workers: int, warmup: int, batches: int) -> float:
    """Tokens/s out of the ``kind`` loader of ``loop_12x2`` (rank 0 of 8) with ``workers`` DataLoader workers."""
    from loopreg.config import load_recipe
    from loopreg.train import build_dataloaders

    overrides = [f"train_data.kind={kind}", f"train_data.source={source}", "eval_data=null",
                 f"train_data.num_workers={workers}", "tokenizer.kind=byte_level", "tokenizer.name=null"]
    if kind == "text":
        overrides.append("train_data.text_field=text")
    recipe = load_recipe(RECIPE, overrides)
    loader = build_dataloaders(recipe, world_size=RECIPE_GPUS, rank=0).train
    iterator = iter(loader)
    for _ in range(warmup):  # worker start-up, the epoch's sample order, first shard opened
        next(iterator)
    tokens = 0
    start = time.perf_counter()
    for _ in range(batches):
        tokens += next(iterator)["input_ids"].numel()
    return tokens / (time.perf_counter() - start)


def prepare(source: Path, copies: int, work: Path, seq_len: int) -> Path:
    text = work / "repeated.jsonl"
    body = source.read_text(encoding="utf-8")
    text.write_text(body * copies, encoding="utf-8")
    out = work / "mds"
    command = [sys.executable, "-m", "loopreg.cli", "data", "prepare", str(text), "--tokenizer", "byte_level",
               "--seq-len", str(seq_len), "--out", str(out), "--workers", "2", "--quiet"]
    done = subprocess.run(command, capture_output=True, text=True, cwd=REPO)
    if done.returncode != 0:
        raise SystemExit(f"loopreg data prepare failed:\n{done.stderr[-4000:]}")
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--source", type=Path, default=DEFAULT_SOURCE, help="JSONL with a 'text' field")
    parser.add_argument("--copies", type=int, default=4, help="repeat the source so an epoch outlasts the timing")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--batches", type=int, default=30)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = parser.parse_args()

    demand = gpu_demand()
    with tempfile.TemporaryDirectory(prefix="bench_mds_throughput_") as scratch:
        mds = prepare(args.source, args.copies, Path(scratch), demand["seq_len"])
        supply: dict[str, list[float]] = {"mds": [], "text": []}
        for _ in range(args.repeats):  # interleaved, so machine noise hits both alike
            for kind, source in (("mds", mds), ("text", args.source)):
                supply[kind].append(loader_throughput(kind, source, 1, args.warmup, args.batches))
    per_worker = {kind: statistics.median(values) for kind, values in supply.items()}

    d = demand
    print(f"loop_12x2 ({d['spec']}, tied={d['tied']}) on one H200 "
          f"({datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC):")
    print(f"  N = params per layer application x applications + LM head = {d['params_per_application']:,} x "
          f"{d['applications']} + {d['head_params']:,} = {d['N']:,} ({d['stored_params']:,} stored, embedding "
          f"included)")
    print(f"  FLOPs/token = 6 N = {d['flops_per_token']:.3e}  (with attention's 12 L d T: "
          f"{d['flops_per_token_with_attention']:.3e})")
    print(f"  consumption = {MFU} x {H200_BF16_FLOPS / 1e12:.0f}e12 / (6 N) = {d['tokens_per_s_per_gpu']:,.0f} "
          f"tokens/s/GPU (with attention FLOPs: {d['tokens_per_s_per_gpu_with_attention']:,.0f})")
    print(f"loader, 1 worker, batch {d['per_device_batch']} x {d['seq_len']} (rank 0 of {RECIPE_GPUS}), median of "
          f"{args.repeats} x {args.batches} batches:")
    # the text kind's rank tokenizes the whole shared stream and keeps its 1/8: what a rank of the recipe gets
    for kind, label in (("mds", "mds (MDS read + collate)"), ("text", "text (byte_level, every rank tokenizes all)")):
        runs = ", ".join(f"{v:,.0f}" for v in supply[kind])
        print(f"  {label:<40} {per_worker[kind]:>14,.0f} tokens/s/worker  ({runs})")
    workers = d["num_workers"]
    headroom = workers * per_worker["mds"] / d["tokens_per_s_per_gpu"]
    print(f"headroom = {workers} workers (train_data.num_workers) x {per_worker['mds']:,.0f} / "
          f"{d['tokens_per_s_per_gpu']:,.0f} = {headroom:,.1f}x (target >= 2: {'met' if headroom >= 2 else 'MISSED'})")
    if args.json:
        args.json.write_text(json.dumps({"demand": demand, "supply_tokens_per_s": supply, "headroom": headroom},
                                        indent=2))


if __name__ == "__main__":
    main()
