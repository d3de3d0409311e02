"""``loopreg snap CKPT --out DIR``: tie an untied model's blocks exactly, writing a looped model.

Each distinct layer of the looped model is the average of the untied layers tied to it (every block
position averaged across blocks). An untied ``LoopedLM`` becomes a tied ``LoopedLM`` folder (see
:func:`loopreg.algorithms.snap_to_looped`); an untied Hugging Face surgery output (``loopreg surgery
--untied``, or a retrofit recipe with ``tied: false``) becomes a tied surgery-style Hugging Face folder
with its tokenizer (:func:`snap_model`).

    loopreg snap runs/reg_loop_4x6/export --out runs/reg_loop_4x6/snapped
    loopreg snap runs/reg/checkpoints/latest-rank0.pt --recipe recipes/reg_loop_4x6.yaml --out runs/snapped
    loopreg snap runs/smollm2_untied_reg_kd_cpu/model --out runs/smollm2_untied_reg_kd_cpu/snapped
"""

from __future__ import annotations

import argparse
from typing import Sequence

from torch import nn

from loopreg.errors import writing
from loopreg.spec import LoopSpec

__all__ = ["cli_main", "snap_model", "application_ranges"]


def application_ranges(spec: LoopSpec | str) -> str:
    """The layer map that gives each block of ``spec`` its whole range of applications in the untied model.

    >>> application_ranges("10x(1,2,1)")
    '0-9,10-29,30-39'
    """
    ranges, start = [], 0
    for block in LoopSpec.parse(spec).blocks:
        ranges.append(f"{start}-{start + block.size * block.loops - 1}")
        start += block.size * block.loops
    return ",".join(ranges)


def snap_model(model: nn.Module, block_size: int | None = None,
               blocks: Sequence[Sequence[int]] | None = None) -> nn.Module:
    """The tied looped model whose every distinct layer averages the untied layers tied to it. A ``LoopedLM``
    gives a new ``LoopedLM``; a Hugging Face surgery output is tied **in place** by loop surgery with
    ``init="average"`` over each block's applications (exact when the copies are still identical).
    The layout is :func:`~loopreg.algorithms.loop_target`'s (the model's own spec by default).

    >>> # snap_model(load("runs/x/model")).config.loopreg_tied  ->  True
    """
    from loopreg.algorithms import loop_target, snap_to_looped
    from loopreg.model import LoopedLM
    from loopreg.surgery.adapters import unwrap
    from loopreg.surgery.core import loop_surgery

    if isinstance(unwrap(model), LoopedLM):
        return snap_to_looped(model, block_size=block_size, blocks=blocks)
    target = loop_target(model, block_size, blocks)
    return loop_surgery(model, target, layers=application_ranges(target), init="average", tied=True)


def cli_main(argv: list[str]) -> int:
    """``loopreg snap CKPT --out DIR [--block-size K | --blocks RANGES] [--recipe RECIPE.yaml]``."""
    from loopreg.algorithms import loop_similarity
    from loopreg.similarity import add_model_arguments, load_model
    from loopreg.surgery.core import looped_spec, stored_layers
    from loopreg.folders import write_model_folder
    from loopreg.surgery.sources import load_source_tokenizer

    parser = argparse.ArgumentParser(prog="loopreg snap", description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint", help="untied model folder (loopreg or Hugging Face surgery output), or "
                                           "Composer checkpoint file (with --recipe)")
    parser.add_argument("--out", required=True, help="folder for the looped model")
    add_model_arguments(parser)
    args = parser.parse_args(argv)
    untied = load_model(args.checkpoint, args.recipe)
    untied_layers = len(stored_layers(untied))
    layout = dict(block_size=args.block_size, blocks=args.blocks)
    similarity = loop_similarity(untied, **layout)["mean"]
    looped = snap_model(untied, **layout)
    tokenizer = None if args.recipe else load_source_tokenizer(args.checkpoint)
    with writing(args.out):
        write_model_folder(looped, args.out, tokenizer)  # staged and renamed: an existing --out survives a failure
    spec = looped_spec(looped)
    print(f"snapped {untied_layers} untied layers (mean block cosine {similarity:.4f}) to the looped "
          f"{spec.paper_label}, distinct layers: {len(stored_layers(looped))}; saved {args.out}")
    return 0
