"""``loopreg eval``: run task groups on a model and write a versioned results JSON.

    loopreg eval runs/loop_4x6/model --groups reasoning_primitives --loops 1,2,4,8 --out runs/eval/loop_4x6.json
    loopreg eval path/to/SmolLM2-135M-Instruct.Q4_1.gguf --tasks svamp --limit 100 --out runs/eval/smol.json
    loopreg eval runs/smollm2_middle --ppl-text heldout.jsonl --loops 1,2,3,4 --out runs/eval/middle.json

With several ``--loops`` values each gets its own results file (``NAME_loops4.json``) and sidecar.
``--ppl-text`` adds the token-weighted perplexity (:mod:`.perplexity`) to each results file (the report's
PPL column); it may be the only thing measured.

``--exit kl:0.01`` (or ``latent:0.05``) lets each token leave the thinking block early (:mod:`loopreg.adaptive`;
each ``--loops`` value is then the maximum) and records per task the mean thinking iterations per token
(``mean_loops``, ``executed_loops``) next to the score; ``--kv-policy shared`` keeps one KV slot per
distinct layer. ``loopreg report --compute`` plots accuracy against mean loops.
"""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

from loopreg.adaptive import KV_POLICIES, ExitRule, ExitStats
from loopreg.errors import UserError, writing

from .ppl import DEFAULT_MAX_TOKENS, perplexity

__all__ = ["cli_main"]


def _loop_list(text: str | None) -> list[int | None]:
    if not text:
        return [None]
    try:
        loops = [int(part) for part in text.split(",")]
    except ValueError:
        raise UserError(f"'{text}' is not a comma-separated list of integers (e.g. 1,2,4,8)", key="--loops") from None
    if any(count < 1 for count in loops):
        raise UserError(f"every loop count must be >= 1, got '{text}'", key="--loops")
    return loops


def _exit_rule(text: str | None) -> ExitRule | None:
    if text is None:
        return None
    try:
        return ExitRule.parse(text)
    except ValueError as err:  # already one line naming --exit, the value and the valid criteria
        raise UserError(str(err)) from None


def cli_main(argv: list[str]) -> int:
    """Entry for ``loopreg eval`` (see the module docstring); a user error raises a one-line
    :class:`~loopreg.errors.UserError`."""
    from .report import LoopUsage
    from .runner import evaluate
    from .tasks import load_task_specs

    parser = argparse.ArgumentParser(prog="loopreg eval", description=__doc__.splitlines()[0])
    parser.add_argument("model", help="loopreg model folder, surgery output, HF folder or .gguf file")
    parser.add_argument("--groups", default="", help="comma-separated groups, e.g. closed_book,math_word")
    parser.add_argument("--tasks", default="", help="comma-separated tasks, e.g. svamp,triviaqa")
    parser.add_argument("--limit", type=int, default=None, help="examples per task")
    parser.add_argument("--loops", default=None, help="loop counts for a looped LoopedLM, e.g. 1,2,4,8")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--data-dir", default=None,
                        help="offline eval data (default: $LOOPREG_EVALDATA or ../shared/evaldata)")
    parser.add_argument("--gguf-file", default=None, help="GGUF file name inside MODEL (a folder)")
    parser.add_argument("--ppl-text", default=None, help="text file/folder/JSONL for perplexity (any model)")
    parser.add_argument("--ppl-seq-len", type=int, default=None, help="perplexity window (default: min(512, context))")
    parser.add_argument("--ppl-tokens", type=int, default=DEFAULT_MAX_TOKENS,
                        help="predicted tokens to score, in whole windows (default: %(default)s)")
    parser.add_argument("--exit", default=None, metavar="CRITERION:THRESHOLD",
                        help="adaptive exit from the loop, e.g. kl:0.01 or latent:0.05 (--loops is the maximum)")
    parser.add_argument("--kv-policy", default="per_application",
                        help=f"KV cache of the loop: {', '.join(KV_POLICIES)} (default: %(default)s)")
    parser.add_argument("--out", type=Path, required=True, help="results JSON path")
    parser.add_argument("--allow-hub", action="store_true", help="load tasks without local data from the HF hub")
    args = parser.parse_args(argv)
    names = [n.strip() for n in f"{args.groups},{args.tasks}".split(",") if n.strip()]
    if not names and not args.ppl_text:
        raise UserError("name at least one --groups or --tasks, or give --ppl-text")
    exit_rule = _exit_rule(args.exit)
    if args.kv_policy not in KV_POLICIES:
        raise UserError(f"unknown policy '{args.kv_policy}'; valid: {', '.join(KV_POLICIES)}", key="--kv-policy")
    from .models import load_generator

    specs = load_task_specs(names)
    loop_counts = _loop_list(args.loops)
    with writing(args.out):  # an unwritable --out fails before the (slow) load, not after the first task
        args.out.parent.mkdir(parents=True, exist_ok=True)
    for loops in loop_counts:
        generator, info = load_generator(args.model, loops, args.gguf_file, exit=exit_rule, kv_policy=args.kv_policy)
        if args.ppl_text:
            stats = None if exit_rule is None else ExitStats()
            result = perplexity(generator.model, generator.tokens.raw, args.ppl_text, seq_len=args.ppl_seq_len,
                                max_tokens=args.ppl_tokens, loops=generator.loops, exit=exit_rule, exit_stats=stats)
            spent = "" if stats is None else f", {stats.mean_loops:.2f} thinking iterations per token"
            print(f"{info.label}: perplexity {result.ppl:.3f} over {result.tokens} tokens "
                  f"({result.windows} windows{spent})")
            info = dataclasses.replace(info, perplexity=result.ppl, perplexity_loops=None if stats is None else
                                       LoopUsage(float(stats.mean_loops), float(stats.executed_loops)))
        out = args.out if loops is None or args.loops.count(",") == 0 else \
            args.out.with_name(f"{args.out.stem}_loops{loops}{args.out.suffix}")
        evaluate(generator, specs, args.data_dir, args.limit, args.batch_size,
                 sidecar_path=out.with_suffix(".predictions.jsonl"), results_path=out, model=info,
                 allow_hub=args.allow_hub)
        print(f"wrote {out}")
    return 0
