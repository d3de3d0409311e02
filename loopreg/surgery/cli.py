"""``loopreg surgery``: loop an existing checkpoint and save the result.

    loopreg surgery SRC --spec "4x(1,4,1)" [--layers 0-3,13-16,26-29] [--init copy|average|stepwise]
                    [--untied] [--update plain|damped [--anchor BETA]]
                    [--lora-rank R|full [--lora-init svd|zero] [--lora-roles attn,mlp]] [--verify] --out DIR
    loopreg surgery SRC --spec auto [--loops L] --text FILE [--tokens N] ... --out DIR

``--spec auto`` runs the layer analysis (``loopreg layers``) over the calibration text and loops its
thinking block L times, keeping every layer (e.g. ``7x1+5x2+18x1`` from ``0-6,7-11,12-29``).

``--lora-rank`` relaxes the looped layers (relaxed recursion, :mod:`loopreg.surgery.relax`): each application
gets its own rank-R delta per projection, from the SVD of its source layer's difference to the shared one.

SRC is a Hugging Face folder, a ``.gguf`` file, a loopreg model folder or a hub id. The output is a
Hugging Face folder (loopreg folder for loopreg sources) that ``loopreg`` loads back looped; ``loopreg
export DIR --unroll`` turns it into a standard checkpoint. A user error raises a one-line
:class:`~loopreg.errors.UserError` (``loopreg`` prints it and exits 2).
"""

from __future__ import annotations

import argparse
import time

from rich.console import Console
from rich.table import Table

from loopreg.errors import UserError, writing
from loopreg.spec import LoopSpec
from loopreg.surgery.adapters import find_adapter, unwrap
from loopreg.surgery.analysis import DEFAULT_TOKENS, calibration_tokens, layer_analysis, token_windows
from loopreg.surgery.core import SurgeryPlan, distinct_param_count, loop_surgery, plan_surgery, stored_layers
from loopreg.surgery.layer_map import INITS, format_layer_map
from loopreg.surgery.relax import LORA_INITS, check_lora_options, delta_param_count
from loopreg.tables import print_table
from loopreg.update_rules import UPDATE_RULES

__all__ = ["cli_main"]


def cli_main(argv: list[str]) -> int:
    """Entry for ``loopreg surgery`` (see the module docstring)."""
    parser = argparse.ArgumentParser(prog="loopreg surgery", description=__doc__.split("\n\n")[0])
    parser.add_argument("source", help="Hugging Face folder, .gguf file, loopreg model folder or hub id")
    parser.add_argument("--spec", required=True, help='loop spec, e.g. "4x(1,4,1)" (middle looping) or "6x5", or '
                                                      '"auto" (from the layer analysis of --text)')
    parser.add_argument("--loops", type=int, help="--spec auto: loop count of the thinking block (default 2)")
    parser.add_argument("--text", help="--spec auto: calibration text (.txt/.jsonl/.json/.parquet file or folder)")
    parser.add_argument("--tokens", type=int, help=f"--spec auto: calibration tokens (default {DEFAULT_TOKENS})")
    parser.add_argument("--think-layers", type=int, help="--spec auto: narrow the thinking block to the N layers "
                                                         "between the knees that turn the stream least")
    parser.add_argument("--layers", help="source layers per distinct block, e.g. 0-3,13-16,26-29 "
                                         "(default: ends from the ends, middle blocks from the middle)")
    parser.add_argument("--init", default="copy", choices=INITS, help="how a block is seeded from its layers")
    parser.add_argument("--untied", action="store_true", help="one layer per application, grouped for the "
                                                                "cosine regularizer (default: tied, truly looped)")
    parser.add_argument("--update", default="plain", help=f"how a looped block iterates ({', '.join(UPDATE_RULES)}): "
                                                          "plain h <- g(h), or damped (training-free)")
    parser.add_argument("--anchor", type=float, help="--update damped: weight beta in [0, 1] of the source's single "
                                                     "application in the block output (default 0.0)")
    parser.add_argument("--lora-rank", help="relaxed recursion: a rank-R delta per application of each looped layer "
                                            "(an integer, or 'full' for exact deltas)")
    parser.add_argument("--lora-init", default="svd", choices=LORA_INITS,
                        help="--lora-rank: deltas from the SVD of (source layer - shared layer), or zero")
    parser.add_argument("--lora-roles", help="--lora-rank: projections to relax, comma-separated roles or prefixes "
                                             "(attn, mlp, attn_q, ...; default all)")
    parser.add_argument("--verify", action="store_true", help="compare logits and greedy tokens with the source")
    parser.add_argument("--out", required=True, help="output folder (replaced if it exists)")
    args = parser.parse_args(argv)
    _check_options(args)  # a bad option fails before the (slow) load
    _surgery(args)
    return 0


def _surgery(args: argparse.Namespace) -> None:
    from tokenizers import Tokenizer

    from loopreg.folders import write_model_folder
    from loopreg.loading import load
    from loopreg.surgery.sources import load_source_tokenizer
    from loopreg.surgery.verify import compare, probe, verification_prompts

    auto = args.spec == "auto"
    spec = None if auto else LoopSpec.parse(args.spec)
    anchor = 0.0 if args.anchor is None else args.anchor
    # a short calibration text fails before the (slow) load
    ids = calibration_tokens(args.source, args.text, args.tokens or DEFAULT_TOKENS) if auto else None
    started = time.perf_counter()
    model = load(args.source)
    tokenizer = load_source_tokenizer(args.source)
    # A loopreg folder's own tokenizer is not carried over; verification then uses random ids.
    tokenizer = None if isinstance(tokenizer, Tokenizer) else tokenizer
    load_seconds = time.perf_counter() - started
    adapter = find_adapter(model)
    layers = args.layers
    if auto:
        split = layer_analysis(model, token_windows(model, ids)).split(args.think_layers)
        spec, layers = split.spec(args.loops or 2), split.layer_map()
        print(f"spec auto: encoder {split.encoder}, thinking {split.thinking}, decoder {split.decoder} over "
              f"{len(ids):,} tokens -> --spec {spec} --layers {layers}")
    plan = plan_surgery(len(stored_layers(model, adapter)), spec, layers, args.init, tied=not args.untied)
    prompts = verification_prompts(model, tokenizer) if args.verify else []
    before = probe(model, prompts) if args.verify else None
    params_before = distinct_param_count(model)

    started = time.perf_counter()
    loop_surgery(model, plan.spec, layers=layers, init=args.init, tied=plan.tied, update=args.update, anchor=anchor,
                 lora_rank=args.lora_rank, lora_init=args.lora_init, lora_roles=_roles(args.lora_roles))
    surgery_seconds = time.perf_counter() - started

    agreement = compare(before, probe(model, prompts)) if before is not None else None
    with writing(args.out):
        out = write_model_folder(model, args.out, tokenizer)

    _print_layer_map(plan)
    rows = [
        ("source", f"{args.source} ({type(unwrap(model)).__name__}, family {adapter.family})"),
        ("spec", f"{plan.spec}  {plan.spec.paper_label}  ({'tied' if plan.tied else 'untied, grouped'})"),
        ("layer map", f"{format_layer_map([list(r) for r in plan.block_ranges])}  (init {plan.init})"),
        ("update", f"damped, anchor β = {anchor:g}" if args.update == "damped" else "plain"),
        ("layers", f"{len(plan.seeds)} distinct, effective depth {plan.spec.effective_depth}"),
        ("distinct params", _params(params_before, distinct_param_count(model),
                                    delta_param_count(stored_layers(model)))),
        ("time", f"load {load_seconds:.2f} s, surgery {surgery_seconds * 1000:.1f} ms"),
        ("out", str(out)),
    ]
    if agreement is not None:
        rows.append(("verify", f"{agreement} over {len(prompts)} prompts"))
    print_table("loop surgery", rows)


def _check_options(args: argparse.Namespace) -> None:
    """The option combinations that need no model: ``--spec auto``'s companions, ``--update``, ``--anchor``."""
    if args.spec == "auto":
        if args.text is None:
            raise UserError("--spec auto needs --text FILE: the calibration text of the layer analysis")
        if args.layers is not None:
            raise UserError(f"--layers {args.layers} with --spec auto: the layer analysis chooses the layer map")
        if args.loops is not None and args.loops < 1:
            raise UserError(f"--loops must be an integer >= 1, got {args.loops}")
    else:
        for option in ("loops", "text", "tokens", "think_layers"):
            if getattr(args, option) is not None:
                raise UserError(f"--{option.replace('_', '-')} is for --spec auto; "
                                f"spec '{args.spec}' already gives its loops and layers")
    check_lora_options(args.lora_rank, args.lora_init, tied=not args.untied)
    if args.lora_rank is None and (args.lora_roles is not None or args.lora_init != "svd"):
        raise UserError("--lora-init and --lora-roles go with --lora-rank R|full")
    if args.update not in UPDATE_RULES:
        raise UserError(f"--update: unknown update rule '{args.update}'; valid: {', '.join(UPDATE_RULES)}")
    if args.anchor is not None:
        if args.update != "damped":
            raise UserError(f"--anchor {args.anchor:g} needs --update damped (the plain rule has no anchor)")
        if not 0.0 <= args.anchor <= 1.0:
            raise UserError(f"--anchor must be in [0, 1], got {args.anchor:g}")


def _roles(text: str | None) -> list[str] | None:
    return None if text is None else [role.strip() for role in text.split(",") if role.strip()]


def _params(before: int, after: int, deltas: int) -> str:
    """The distinct parameter counts, a relaxed retrofit's as shared + deltas."""
    if not deltas:
        return f"{before:,} → {after:,}"
    shared = after - deltas
    return f"{before:,} → {shared:,} shared + {deltas:,} deltas (+{100 * deltas / shared:.1f}%) = {after:,}"


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
