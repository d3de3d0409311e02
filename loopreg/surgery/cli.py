"""``loopreg surgery``: loop an existing checkpoint and save the result.

    loopreg surgery SRC --spec "4x(1,4,1)" [--layers 0-3,13-16,26-29] [--init copy|average|stepwise]
                    [--untied] [--verify] --out DIR

SRC is a Hugging Face folder, a ``.gguf`` file, a loopreg model folder or a hub id. The output is a
Hugging Face folder (loopreg folder for loopreg sources) that ``loopreg`` loads back looped; ``loopreg
export DIR --unroll`` turns it into a standard checkpoint. A user error prints one line and exits 2.
"""

from __future__ import annotations

import argparse
import sys
import time
from typing import Callable, Sequence

from rich.console import Console
from rich.table import Table

from loopreg.spec import LoopSpec
from loopreg.surgery.adapters import find_adapter, unwrap
from loopreg.surgery.core import SurgeryPlan, distinct_param_count, loop_surgery, plan_surgery, stored_layers
from loopreg.surgery.layer_map import INITS, format_layer_map

__all__ = ["cli_main", "run_user_command", "print_table"]


def run_user_command(command: Callable[[], None]) -> int:
    """Run ``command``; a ``ValueError``/``OSError`` (bad spec, missing file, ...) becomes one line on stderr
    and exit status 2 instead of a traceback."""
    try:
        command()
    except (ValueError, OSError) as err:
        lines = str(err).strip().splitlines()
        print(f"error: {lines[0] if lines else type(err).__name__}", file=sys.stderr)
        return 2
    return 0


def print_table(title: str, rows: Sequence[tuple[str, str]]) -> None:
    """A two-column rich table of ``(name, value)`` rows."""
    table = Table(title=title, show_header=False, title_justify="left")
    table.add_column(style="bold")
    table.add_column(overflow="fold")  # long paths wrap instead of being cut
    for name, value in rows:
        table.add_row(name, value)
    Console().print(table)


def cli_main(argv: list[str]) -> int:
    """Entry for ``loopreg surgery`` (see the module docstring)."""
    parser = argparse.ArgumentParser(prog="loopreg surgery", description=__doc__.split("\n\n")[0])
    parser.add_argument("source", help="Hugging Face folder, .gguf file, loopreg model folder or hub id")
    parser.add_argument("--spec", required=True, help='loop spec, e.g. "4x(1,4,1)" (middle looping) or "6x5"')
    parser.add_argument("--layers", help="source layers per distinct block, e.g. 0-3,13-16,26-29 "
                                         "(default: ends from the ends, middle blocks from the middle)")
    parser.add_argument("--init", default="copy", choices=INITS, help="how a block is seeded from its layers")
    parser.add_argument("--untied", action="store_true", help="one layer per application, grouped for the "
                                                                "cosine regularizer (default: tied, truly looped)")
    parser.add_argument("--verify", action="store_true", help="compare logits and greedy tokens with the source")
    parser.add_argument("--out", required=True, help="output folder (replaced if it exists)")
    args = parser.parse_args(argv)
    return run_user_command(lambda: _surgery(args))


def _surgery(args: argparse.Namespace) -> None:
    from loopreg.surgery.export import write_model_folder
    from loopreg.surgery.sources import load_source, load_source_tokenizer
    from loopreg.surgery.verify import compare, probe, verification_prompts

    spec = LoopSpec.parse(args.spec)  # a typo fails before the (slow) load
    started = time.perf_counter()
    model = load_source(args.source)
    tokenizer = load_source_tokenizer(args.source)
    load_seconds = time.perf_counter() - started
    adapter = find_adapter(model)
    plan = plan_surgery(len(stored_layers(model, adapter)), spec, args.layers, args.init, tied=not args.untied)
    prompts = verification_prompts(model, tokenizer) if args.verify else []
    before = probe(model, prompts) if args.verify else None
    params_before = distinct_param_count(model)

    started = time.perf_counter()
    loop_surgery(model, plan.spec, layers=args.layers, init=args.init, tied=plan.tied)
    surgery_seconds = time.perf_counter() - started

    agreement = compare(before, probe(model, prompts)) if before is not None else None
    out = write_model_folder(model, args.out, tokenizer)

    _print_layer_map(plan)
    rows = [
        ("source", f"{args.source} ({type(unwrap(model)).__name__}, family {adapter.family})"),
        ("spec", f"{plan.spec}  {plan.spec.paper_label}  ({'tied' if plan.tied else 'untied, grouped'})"),
        ("layer map", f"{format_layer_map([list(r) for r in plan.block_ranges])}  (init {plan.init})"),
        ("layers", f"{len(plan.seeds)} distinct, effective depth {plan.spec.effective_depth}"),
        ("distinct params", f"{params_before:,} → {distinct_param_count(model):,}"),
        ("time", f"load {load_seconds:.2f} s, surgery {surgery_seconds * 1000:.1f} ms"),
        ("out", str(out)),
    ]
    if agreement is not None:
        rows.append(("verify", f"{agreement} over {len(prompts)} prompts"))
    print_table("loop surgery", rows)


def _print_layer_map(plan: SurgeryPlan) -> None:
    table = Table(title="layer map", title_justify="left")
    for column in ("distinct layer", "block", "applications", "source layer(s)"):
        table.add_column(column)
    for block_index, block in enumerate(plan.spec.blocks):
        for position in range(block.size):
            layer = block.offset + position
            seeds = ",".join(map(str, plan.seeds[layer]))
            table.add_row(str(layer), f"{block_index} ({block.size}x{block.loops})",
                          ",".join(map(str, plan.spec.tie_groups[layer])),
                          f"{seeds} (mean)" if len(plan.seeds[layer]) > 1 else seeds)
    Console().print(table)
