"""``loopreg snap CKPT --out DIR``: tie an untied model's blocks exactly, writing a looped ``LoopedLM``.

Each distinct layer of the looped model is the average of the untied layers tied to it (every block
position averaged across blocks); see :func:`loopreg.algorithms.snap_to_looped`.

    loopreg snap runs/reg_loop_4x6/export --out runs/reg_loop_4x6/snapped
    loopreg snap runs/reg/checkpoints/latest-rank0.pt --recipe recipes/reg_loop_4x6.yaml --out runs/snapped
"""

from __future__ import annotations

import argparse
import sys

__all__ = ["cli_main"]


def cli_main(argv: list[str]) -> int:
    """``loopreg snap CKPT --out DIR [--block-size K | --blocks RANGES] [--recipe RECIPE.yaml]``."""
    from loopreg.algorithms import loop_similarity, snap_to_looped
    from loopreg.similarity import add_model_arguments, load_model
    from loopreg.surgery.export import write_model_folder

    parser = argparse.ArgumentParser(prog="loopreg snap", description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint", help="untied loopreg model folder, or Composer checkpoint file (with --recipe)")
    parser.add_argument("--out", required=True, help="folder for the looped model (LoopedLM.save_pretrained)")
    add_model_arguments(parser)
    args = parser.parse_args(argv)
    try:
        untied = load_model(args.checkpoint, args.recipe)
        layout = dict(block_size=args.block_size, blocks=args.blocks)
        similarity = loop_similarity(untied, **layout)["mean"]
        looped = snap_to_looped(untied, **layout)
        write_model_folder(looped, args.out)  # staged and renamed: an existing --out survives a failure
    except (ValueError, FileNotFoundError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"snapped {len(untied.layers)} untied layers (mean block cosine {similarity:.4f}) to the looped "
          f"{looped.spec.paper_label}, distinct layers: {looped.num_distinct_layers}; saved {args.out}")
    return 0
