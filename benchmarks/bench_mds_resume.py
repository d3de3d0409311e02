"""Resume latency, MosaicML Streaming (``train_data.kind: mds``) vs the hub-streaming text path (``kind: text``,
:class:`~loopreg.data.text.PackedText`), at sample offsets 10^3, 10^5 and 10^6, side by side in one run.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_mds_resume.py          # about 5 min on 2 shared cores

What is timed is what a mid-epoch resume costs before training continues: from ``dataset.load_state_dict(state)``
(the state Composer saved in the checkpoint after ``k`` samples) to the first batch out of the DataLoader, in a
fresh process per measurement (as a resumed run is), median of ``--repeats``. ``PackedText`` re-reads and
re-tokenizes every consumed document to find sample ``k``, so it grows linearly; ``StreamingDataset`` computes
its epoch's sample order and reads the one shard it needs, so it stays flat (target: <= 5 s at 10^6).

Both read the same text: ``--source`` (the shared Wikipedia passages) repeated as often as 10^6 sequences of
``--seq-len`` tokens need, written once as JSONL (the text path's source) and converted once with
``loopreg data prepare`` (the MDS path's shards). Both loaders are built by their data kind from the same recipe
(``recipes/cpu_tiny_text.yaml`` with overrides), per-device batch ``--batch``, one process, no DataLoader workers.
At the smallest offset the resumed first batch is checked against an uninterrupted run's batch at that offset.
A ``PackedText`` measurement that would take longer than ``--limit-s`` (predicted linearly from the offsets
already measured) is not run: its time is extrapolated linearly and marked so.

What MDS's resume costs is the epoch's sample order (partition over nodes, ranks and workers, then shuffle), which
streaming computes at every epoch start, resumed or not: it grows with the dataset, not with the offset. The last
section times exactly that computation (``get_partitions`` + ``get_shuffle``, as
``streaming.base.batching.random`` does) for ``--order-samples`` samples laid out as ``reg_loop_12x2`` runs (1 node
x 8 ranks x 4 workers, batch 64, 1280-token samples in 64 MB shards) and extrapolates it to that recipe's 400k
steps x 512 samples.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RECIPE = REPO / "recipes" / "cpu_tiny_text.yaml"
DEFAULT_SOURCE = REPO.parent / "shared" / "textdata" / "wiki_passages_train.jsonl"


def recipe_overrides(kind: str, source: Path, seq_len: int, batch: int) -> list[str]:
    """The recipe of both loaders: only the data kind and its source differ."""
    overrides = [f"train_data.kind={kind}", f"train_data.source={source}", f"max_seq_len={seq_len}",
                 "eval_data=null", f"global_train_batch_size={batch}", f"device_train_microbatch_size={batch}",
                 "train_data.num_workers=0", "tokenizer.kind=byte_level", "tokenizer.name=null"]
    if kind == "text":
        overrides.append("train_data.text_field=text")
    return overrides


def batch_digest(batch: dict) -> str:
    return hashlib.sha1(batch["input_ids"].numpy().tobytes()).hexdigest()[:16]


# ----------------------------------------------------------------------------- child processes
def child(mode: str, overrides: list[str], offset: int, state_file: Path) -> dict:
    """``save``: an uninterrupted run's checkpointed dataset state after ``offset`` samples (and, when asked, the
    digest of its batch there); ``resume``: a fresh process loading that state, timed to its first batch."""
    from loopreg.config import load_recipe
    from loopreg.train import build_dataloaders

    recipe = load_recipe(RECIPE, overrides)
    built = time.perf_counter()
    loader = build_dataloaders(recipe, world_size=1, rank=0).train
    dataset = loader.dataset
    if mode == "save":
        batches = iter(loader)
        first = next(batches)  # a run in progress: Composer saves the state of a dataset being iterated
        result = {"digest_at_offset": None}
        if offset % recipe.global_train_batch_size == 0 and offset // recipe.global_train_batch_size < 2000:
            batch = first
            for _ in range(offset // recipe.global_train_batch_size):
                batch = next(batches)
            result["digest_at_offset"] = batch_digest(batch)
        state_file.write_text(json.dumps(dataset.state_dict(num_samples=offset, from_beginning=True)))
        return result
    state = json.loads(state_file.read_text())
    start = time.perf_counter()
    dataset.load_state_dict(state)
    batch = next(iter(loader))
    end = time.perf_counter()
    return {"seconds": end - start, "seconds_with_build": end - built, "digest": batch_digest(batch)}


def run_child(mode: str, kind: str, source: Path, args: argparse.Namespace, offset: int, state_file: Path) -> dict:
    command = [sys.executable, __file__, "--child", mode, "--kind", kind, "--child-source", str(source),
               "--seq-len", str(args.seq_len), "--batch", str(args.batch), "--offset", str(offset),
               "--state-file", str(state_file)]
    done = subprocess.run(command, capture_output=True, text=True, cwd=REPO)
    if done.returncode != 0:
        raise SystemExit(f"{kind} {mode} at offset {offset} failed:\n{done.stderr[-4000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


# ----------------------------------------------------------------------------- data
def make_sources(args: argparse.Namespace, work: Path) -> tuple[Path, Path, dict]:
    """The repeated JSONL (text path) and its MDS conversion (MDS path), and what was done to make them."""
    from loopreg.data.text import byte_level_tokenizer, text_stream

    documents = list(text_stream(str(args.source), text_field="text")())
    tokens_per_copy = sum(len(e.ids) + 1 for e in byte_level_tokenizer().encode_batch(documents))  # + EOS each
    needed = (max(args.offsets) + 2 * args.batch + 1) * args.seq_len  # the last resumed batch, and a margin
    copies = math.ceil(needed / tokens_per_copy)
    text = work / "text" / "repeated.jsonl"
    text.parent.mkdir(parents=True, exist_ok=True)
    lines = "".join(json.dumps({"text": doc}) + "\n" for doc in documents)
    with text.open("w", encoding="utf-8") as out:
        for _ in range(copies):
            out.write(lines)
    mds = work / "mds"
    start = time.perf_counter()
    command = [sys.executable, "-m", "loopreg.cli", "data", "prepare", str(text), "--tokenizer", "byte_level",
               "--seq-len", str(args.seq_len), "--out", str(mds), "--workers", str(args.workers)]
    done = subprocess.run(command, capture_output=True, text=True, cwd=REPO)
    if done.returncode != 0:
        raise SystemExit(f"loopreg data prepare failed:\n{done.stderr[-4000:]}")
    info = {"documents": len(documents), "tokens_per_copy": tokens_per_copy, "copies": copies,
            "prepare_s": time.perf_counter() - start}
    meta = mds / "loopreg_mds.json"
    if meta.is_file():
        info["mds_metadata"] = json.loads(meta.read_text())
    return text, mds, info


# ----------------------------------------------------------------------------- main
def measure(kind: str, source: Path, args: argparse.Namespace, offset: int, work: Path) -> dict:
    state_file = work / f"state_{kind}_{offset}.json"
    saved = run_child("save", kind, source, args, offset, state_file)
    runs = [run_child("resume", kind, source, args, offset, state_file) for _ in range(args.repeats)]
    digests = {r["digest"] for r in runs}
    result = {"seconds": statistics.median(r["seconds"] for r in runs),
              "seconds_with_build": statistics.median(r["seconds_with_build"] for r in runs),
              "runs": [round(r["seconds"], 4) for r in runs], "same_batch_every_run": len(digests) == 1,
              "extrapolated": False}
    if saved["digest_at_offset"] is not None:
        result["matches_uninterrupted"] = digests == {saved["digest_at_offset"]}
    return result


def extrapolate(measured: dict[int, dict], offset: int) -> float:
    """Linear in the offset, through the two largest measured offsets."""
    (x0, y0), (x1, y1) = sorted((k, v["seconds"]) for k, v in measured.items())[-2:]
    return y1 + (y1 - y0) / (x1 - x0) * (offset - x1)


def epoch_order_seconds(num_samples: int, offset: int) -> float:
    """Seconds streaming takes to lay out one epoch of ``num_samples`` for ``reg_loop_12x2`` resumed at ``offset``."""
    import numpy as np
    from streaming.base.partition import get_partitions
    from streaming.base.shuffle import get_shuffle

    per_shard = (1 << 26) // (1280 * 4)  # MDSWriter's 64 MB shards of 1280 uint32 tokens
    sizes = np.full(-(-num_samples // per_shard), per_shard, np.int64)
    sizes[-1] = num_samples - per_shard * (len(sizes) - 1)
    start = time.perf_counter()
    ids = get_partitions("relaxed", num_samples, 1, 1, 8, 4, 64, offset)  # canonical nodes, nodes, ranks, workers
    shuffle = get_shuffle("py1e", sizes, 1, 9176, 0, 4_000_000)  # streaming's default block for 1 canonical node
    np.where(ids != -1, shuffle[ids], -1)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--offsets", default="1000,100000,1000000", help="sample offsets, comma-separated")
    parser.add_argument("--seq-len", type=int, default=32)
    parser.add_argument("--batch", type=int, default=8, help="per-device batch (one process)")
    parser.add_argument("--source", type=Path, default=DEFAULT_SOURCE, help="JSONL with a 'text' field")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--limit-s", type=float, default=300.0, help="longest PackedText measurement to run")
    parser.add_argument("--workers", type=int, default=2, help="loopreg data prepare --workers")
    parser.add_argument("--work", type=Path, default=None, help="scratch folder (default: a temporary one)")
    parser.add_argument("--order-samples", default="1000000,20000000",
                        help="epoch sizes whose sample order is timed (comma-separated; empty: skip)")
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    parser.add_argument("--child", choices=["save", "resume"], help=argparse.SUPPRESS)
    parser.add_argument("--kind", help=argparse.SUPPRESS)
    parser.add_argument("--child-source", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--offset", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--state-file", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        overrides = recipe_overrides(args.kind, args.child_source, args.seq_len, args.batch)
        print(json.dumps(child(args.child, overrides, args.offset, args.state_file)))
        return
    args.offsets = sorted(int(x) for x in args.offsets.split(","))

    with tempfile.TemporaryDirectory(prefix="bench_mds_resume_") as scratch:
        work = args.work or Path(scratch)
        text, mds, info = make_sources(args, work)
        print(f"data: {args.source.name} ({info['documents']} documents, {info['tokens_per_copy']:,} byte-level "
              f"tokens) repeated {info['copies']}x so that {max(args.offsets):,} sequences of {args.seq_len} "
              f"tokens exist; loopreg data prepare took {info['prepare_s']:.1f} s")
        results: dict[str, dict[int, dict]] = {"text": {}, "mds": {}}
        for offset in args.offsets:
            results["mds"][offset] = measure("mds", mds, args, offset, work)
            measured = results["text"]
            if len(measured) >= 2 and extrapolate(measured, offset) > args.limit_s:
                results["text"][offset] = {"seconds": extrapolate(measured, offset), "extrapolated": True}
            else:
                results["text"][offset] = measure("text", text, args, offset, work)

    print(f"\nresume latency: load_state_dict -> first batch, fresh process, median of {args.repeats}; "
          f"seq_len {args.seq_len}, batch {args.batch}, byte_level tokenizer, 0 workers "
          f"({datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC)")
    print(f"{'offset':>10} | {'PackedText (text) s':>20} | {'MDS s':>8} | {'MDS incl. build s':>17} | "
          f"{'text / MDS':>10} | resumed batch")
    for offset in args.offsets:
        text_r, mds_r = results["text"][offset], results["mds"][offset]
        text_s = f"{text_r['seconds']:.3f}" + (" extrapolated" if text_r["extrapolated"] else "")
        checks = []
        for name, r in (("text", text_r), ("mds", mds_r)):
            if "matches_uninterrupted" in r:
                checks.append(f"{name} {'=' if r['matches_uninterrupted'] else '!='} uninterrupted")
            elif not r["extrapolated"]:
                checks.append(f"{name} {'same' if r['same_batch_every_run'] else 'DIFFERS'} every run")
        print(f"{offset:>10,} | {text_s:>20} | {mds_r['seconds']:>8.3f} | {mds_r['seconds_with_build']:>17.3f} | "
              f"{text_r['seconds'] / mds_r['seconds']:>9.1f}x | {', '.join(checks)}")
    top, low = max(args.offsets), min(args.offsets)
    flat = results["mds"][top]["seconds"] <= 5.0
    print(f"MDS at {top:,}: {results['mds'][top]['seconds']:.3f} s (target <= 5 s: {'met' if flat else 'MISSED'})")
    per_token = (results["text"][top]["seconds"] - results["text"][low]["seconds"]) / ((top - low) * args.seq_len)
    pile_tokens = 200_000 * 512 * 1280  # reg_loop_12x2 resumed at step 200k: global batch 512 x seq 1280
    print(f"PackedText re-reads at {per_token * 1e9:.1f} ns/token here (byte_level); at that speed resuming "
          f"reg_loop_12x2 at step 200k ({pile_tokens:.2e} tokens) would take {per_token * pile_tokens / 3600:.0f} h "
          f"before its first batch (extrapolated; GPT-NeoX BPE is slower than byte_level)")
    order = {}
    if args.order_samples:
        recipe_samples = 400_000 * 512
        sizes = [int(float(x)) for x in args.order_samples.split(",")]
        for size in sizes:
            order[size] = {offset: epoch_order_seconds(size, offset) for offset in (0, size // 2)}
        largest = max(sizes)
        per_sample = max(order[largest].values()) / largest
        print("MDS epoch sample order (streaming's partition + py1e shuffle; 1 node x 8 ranks x 4 workers, batch 64), "
              "at offset 0 and mid-epoch: " + "; ".join(f"{size:,} samples {v[0]:.2f} s / {v[size // 2]:.2f} s"
                                                          for size, v in order.items()))
        print(f"  linear in the epoch size, {per_sample * 1e9:.0f} ns/sample: an epoch of reg_loop_12x2's "
              f"{recipe_samples:.2e} samples (400k steps x 512) takes about {per_sample * recipe_samples:.0f} s at "
              f"every start, fresh or resumed (extrapolated)")
    if args.json:
        args.json.write_text(json.dumps({"data": info, "args": {k: str(v) for k, v in vars(args).items()},
                                         "results": results, "epoch_order_s": order}, indent=2, default=str))


if __name__ == "__main__":
    main()
