"""``loopreg similarity MODEL --block-size K``: how close to looped is this model?

Prints ``R_G`` (mean cosine between each layer and the same position in the next block) for every
parameter group, and their mean; weight matrices only unless ``--include-norms``. The numbers are
:func:`loopreg.algorithms.loop_similarity`'s.

    loopreg similarity runs/reg_loop_4x6/export --block-size 4 --json
    loopreg similarity path/to/hf_llama --blocks 4-7,8-11,12-15,16-19 --heatmaps runs/llama_sim
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from torch import nn

from loopreg.errors import writing

__all__ = ["cli_main", "load_model", "parse_blocks", "add_model_arguments"]


def load_model(path: str | Path, recipe: str | Path | None = None) -> nn.Module:
    """A model folder (loopreg, retrofit or Hugging Face), or — with the recipe that trained it — a Composer
    checkpoint file, through :func:`loopreg.load`; one-line errors otherwise.

    >>> # load_model("runs/reg_loop_4x6/checkpoints/latest-rank0.pt", recipe="recipes/reg_loop_4x6.yaml")
    """
    from loopreg.loading import load

    return load(path, recipe=recipe) if Path(path).is_file() else load(path, torch_dtype="auto")


def parse_blocks(text: str) -> list[list[int]]:
    """``"4-7,8-11"`` → ``[[4, 5, 6, 7], [8, 9, 10, 11]]`` (inclusive ranges, one per block).

    >>> parse_blocks("2-3,4-5")
    [[2, 3], [4, 5]]
    """
    blocks = []
    for part in text.split(","):
        first, _, last = part.strip().partition("-")
        if not first.isdigit() or not (last or first).isdigit() or int(last or first) < int(first):
            raise argparse.ArgumentTypeError(f"block '{part.strip()}' in '{text}' is not a range like 4-7")
        blocks.append(list(range(int(first), int(last or first) + 1)))
    return blocks


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """``--block-size K`` or ``--blocks 4-7,8-11,...`` (default: the model's own untied loop spec), and
    ``--recipe`` for a Composer checkpoint."""
    layout = parser.add_mutually_exclusive_group()
    layout.add_argument("--block-size", type=int, help="tie consecutive blocks of K layers")
    layout.add_argument("--blocks", type=parse_blocks, help="tie these layer ranges only, e.g. 4-7,8-11,12-15")
    parser.add_argument("--recipe", help="the recipe that trained MODEL, when MODEL is a Composer checkpoint file")


def cli_main(argv: list[str]) -> int:
    """``loopreg similarity MODEL [--block-size K | --blocks RANGES] [--include-norms] [--json] [--heatmaps DIR]``."""
    from rich.console import Console
    from rich.table import Table

    from loopreg.algorithms import block_similarity, loop_similarity, loop_target

    parser = argparse.ArgumentParser(prog="loopreg similarity", description=__doc__.splitlines()[0])
    parser.add_argument("model", help="loopreg model folder, Hugging Face folder, or Composer checkpoint (--recipe)")
    add_model_arguments(parser)
    parser.add_argument("--include-norms", action="store_true", help="also compare the layers' norm weights")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    parser.add_argument("--heatmaps", help="also write a block × block heatmap PNG per group into this folder")
    args = parser.parse_args(argv)
    model = load_model(args.model, args.recipe)
    layout = dict(block_size=args.block_size, blocks=args.blocks)
    target = loop_target(model, **layout)
    similarity = loop_similarity(model, **layout, include_norms=args.include_norms)
    if args.heatmaps:
        from loopreg.callbacks.similarity_monitor import plot_block_similarity

        matrices = block_similarity(model, **layout, include_norms=args.include_norms)
        with writing(args.heatmaps):
            plot_block_similarity(matrices, args.heatmaps, title=Path(args.model).name)
    if args.json:
        groups = {group: value for group, value in similarity.items() if group != "mean"}
        print(json.dumps({"model": args.model, "class": type(model).__name__, "target": str(target),
                          "similarity": groups, "mean": similarity["mean"]}))
        return 0
    table = Table(title=f"{args.model}: {type(model).__name__} toward {target.paper_label}")
    table.add_column("group")
    table.add_column("R_G (mean cosine)", justify="right")
    for group, value in similarity.items():
        table.add_row(group, f"{value:.4f}", end_section=group == list(similarity)[-2])
    Console().print(table)
    return 0
