"""``loopreg eval``: task groups through lm-eval on any model, at one or more loop counts, into a results JSON.

    loopreg eval runs/loop_4x6/model --groups reasoning_primitives --loops 1,2,4,8 --out runs/eval/loop_4x6.json
    loopreg eval path/to/SmolLM2-135M-Instruct.Q4_1.gguf --tasks svamp,arc_easy --limit 100 --out runs/eval/smol.json
    loopreg eval runs/smollm2_middle --ppl-text heldout.jsonl --loops 1,2,3,4 --out runs/eval/middle.json

MODEL is a GGUF file, a loopreg or HF folder (looped or not) or a hub id. ``--groups``/``--tasks`` name loopreg's
tasks and groups (``evals/lm_eval_tasks/``: ``closed_book``, ``svamp``, ...) or any lm-eval task (``arc_easy``).
Each loop count writes one results file (``NAME_loops4.json`` when there are several; schema ``loopreg.eval/1``,
read by ``loopreg report``) and lm-eval's per-sample log beside it (``NAME_samples/``). ``--ppl-text`` adds the
token-weighted perplexity (the report's PPL column); it may be the only thing measured. ``--exit kl:0.01`` (or
``latent:0.05``) lets each token leave the loop early (each ``--loops`` value is then the maximum) and records
per task the mean thinking iterations per token; ``--kv-policy shared`` keeps one KV slot per distinct layer.

``loopreg lm-eval`` is this command under its old name (its ``--out DIR`` becomes ``DIR/results.json``); the
alias goes in the next release.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import re
import sys
from pathlib import Path
from unittest import mock

from loopreg.adaptive import KV_POLICIES, ExitRule, ExitStats
from loopreg.errors import ArgumentParser, UserError, writing
from loopreg.tables import print_table

from .ppl import DEFAULT_MAX_TOKENS, perplexity
from .report import LoopUsage, write_results

__all__ = ["cli_main", "lm_eval_alias_main"]

DEFAULT_SEEDS = "0,1234,1234,1234"  # lm-eval's: python, numpy, torch, few-shot sampling


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


def _limit(text: str) -> int | float:
    """A positive count of examples per task, or a fraction of each task in (0, 1)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{text}' is not a number") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be > 0 (a count, or a fraction below 1), got '{text}'")
    if value >= 1 and not value.is_integer():
        raise argparse.ArgumentTypeError(f"a count must be whole, got '{text}'")
    return int(value) if value >= 1 else value


def _batch_size(text: str) -> str:
    if not re.fullmatch(r"[1-9][0-9]*|auto(:[1-9][0-9]*)?", text):
        raise argparse.ArgumentTypeError(f"'{text}' is not a positive integer, 'auto' or 'auto:N'")
    return text


def _parse_seeds(text: str) -> list[int | None]:
    from lm_eval._cli.utils import _int_or_none_list_arg_type

    try:
        return _int_or_none_list_arg_type(3, 4, DEFAULT_SEEDS, text)
    except ValueError as err:
        raise UserError(f"'{text}': {err} (e.g. 42, or {DEFAULT_SEEDS})", key="--seed") from None


def _parser(prog: str) -> argparse.ArgumentParser:
    parser = ArgumentParser(prog=prog, description=__doc__.splitlines()[0])
    parser.add_argument("model", help="GGUF file, loopreg model folder, HF folder (looped or not) or hub id")
    parser.add_argument("--groups", default="", help="comma-separated groups, e.g. closed_book,math_word")
    parser.add_argument("--tasks", default="", help="comma-separated loopreg or lm-eval tasks, e.g. svamp,arc_easy")
    parser.add_argument("--out", type=Path, required=True, help="results JSON path")
    parser.add_argument("--limit", type=_limit, default=None, help="examples per task (a fraction if < 1)")
    parser.add_argument("--loops", default=None, help="loop counts of a tied looped model, e.g. 1,2,4,8")
    parser.add_argument("--exit", default=None, metavar="CRITERION:THRESHOLD",
                        help="adaptive exit from the loop, e.g. kl:0.01 or latent:0.05 (--loops is the maximum)")
    parser.add_argument("--kv-policy", default="per_application",
                        help=f"KV cache of the loop: {', '.join(KV_POLICIES)} (default: %(default)s)")
    parser.add_argument("--ppl-text", default=None, help="text file/folder/JSONL for perplexity (any model)")
    parser.add_argument("--ppl-seq-len", type=int, default=None, help="perplexity window (default: min(512, context))")
    parser.add_argument("--ppl-tokens", type=int, default=DEFAULT_MAX_TOKENS,
                        help="predicted tokens to score, in whole windows (default: %(default)s)")
    parser.add_argument("--batch-size", type=_batch_size, default="16", help="an integer, 'auto' or 'auto:N'")
    parser.add_argument("--max-batch-size", type=int, default=64, help="the most --batch-size auto tries")
    parser.add_argument("--data-dir", type=Path, default=None,
                        help="offline eval data (default: $LOOPREG_EVALDATA or ../shared/evaldata)")
    parser.add_argument("--allow-hub", action="store_true", help="read tasks without local data from the HF hub")
    parser.add_argument("--include-path", type=Path, default=None, help="a folder of more lm-eval task YAMLs")
    parser.add_argument("--num-fewshot", type=int, default=None, help="few-shot examples (default: each task's)")
    parser.add_argument("--device", default=None, help="e.g. cpu, cuda, cuda:1 (default: cuda when available)")
    parser.add_argument("--dtype", default=None, choices=["auto", "float32", "bfloat16", "float16"],
                        help="weights' dtype (default: as loaded)")
    parser.add_argument("--seed", default=DEFAULT_SEEDS,
                        help="python,numpy,torch,few-shot seeds, or one for all four (default: %(default)s)")
    parser.add_argument("--gen-kwargs", default=None, help="generation options for every generate_until task, "
                        "e.g. temperature=0.7,do_sample=True")
    parser.add_argument("--apply-chat-template", nargs="?", const=True, default=False,
                        help="format prompts with the tokenizer's chat template (optionally a template name)")
    parser.add_argument("--fewshot-as-multiturn", action="store_true", help="few-shot examples as chat turns")
    parser.add_argument("--system-instruction", default=None, help="a system prompt")
    parser.add_argument("--use-cache", type=Path, default=None, metavar="DIR",
                        help="lm-eval's request cache, one sqlite file per model label in DIR: a rerun (an interrupted "
                        "one) takes finished requests from it; keyed by the requests only, so one DIR per model")
    parser.add_argument("--bootstrap-iters", type=int, default=1000, help="bootstrap resamples for the stderrs "
                        "that have no closed form")
    return parser


def _check_writable(path: Path, flag: str) -> None:
    """A one-line error unless ``path`` can be created: its nearest existing ancestor is a writable folder (nothing
    is created before every input is checked)."""
    folder = path.parent
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    if not folder.is_dir() or not os.access(folder, os.W_OK):
        raise UserError(f"cannot write {path}: {folder} is not a writable folder", key=flag)


def _cache_file(folder: Path, label: str) -> str:
    folder.mkdir(parents=True, exist_ok=True)
    return str(folder / label)


def _results_path(out: Path, loops: int | None, sweep: bool) -> Path:
    return out.with_name(f"{out.stem}_loops{loops}{out.suffix}") if sweep else out


def cli_main(argv: list[str]) -> int:
    """Entry for ``loopreg eval`` (see the module docstring); a user error raises a one-line
    :class:`~loopreg.errors.UserError`."""
    args = _parser("loopreg eval").parse_args(argv)
    names = [name.strip() for name in f"{args.groups},{args.tasks}".split(",") if name.strip()]
    if not names and not args.ppl_text:
        raise UserError("name at least one --groups or --tasks, or give --ppl-text")
    try:
        exit_rule = None if args.exit is None else ExitRule.parse(args.exit)
    except ValueError as err:  # already one line naming --exit, the value and the valid criteria
        raise UserError(str(err)) from None
    if args.kv_policy not in KV_POLICIES:
        raise UserError(f"unknown policy '{args.kv_policy}'; valid: {', '.join(KV_POLICIES)}", key="--kv-policy")
    for flag, folder in (("--data-dir", args.data_dir), ("--include-path", args.include_path)):
        if folder is not None and not folder.is_dir():
            raise UserError(f"{folder}: not a folder", key=flag)
    if args.use_cache is not None:
        _check_writable(args.use_cache / "x", "--use-cache")
    loop_counts = _loop_list(args.loops)
    seeds = _parse_seeds(args.seed)
    # the task folder's utils.py reads these (it runs in plain lm-eval too); set for this command only
    environment = {**({} if args.data_dir is None else {"LOOPREG_EVALDATA": str(args.data_dir.resolve())}),
                   **({"LOOPREG_ALLOW_HUB": "1"} if args.allow_hub else {})}
    with mock.patch.dict(os.environ, environment):
        return _run(args, names, exit_rule, loop_counts, seeds)


def _run(args: argparse.Namespace, names: list[str], exit_rule: ExitRule | None, loop_counts: list[int | None],
         seeds: list[int | None]) -> int:
    from .lm_eval_model import LoopregLM, load_model, model_name
    from .run import evaluate, resolve_tasks

    include_path = [str(args.include_path)] if args.include_path else []
    resolve_tasks(names, include_path)  # an unknown name fails before the (slow) model load
    _check_writable(args.out, "--out")  # so does an unwritable --out
    model, tokenizer = load_model(args.model)
    name = model_name(args.model)
    # every loop count is checked (a plain or untied model cannot take one) before the first runs
    lms = [LoopregLM(model, loops=loops, tokenizer=tokenizer, device=args.device, dtype=args.dtype,
                     exit=exit_rule, kv_policy=args.kv_policy, name=name, batch_size=args.batch_size,
                     max_batch_size=args.max_batch_size)
           for loops in loop_counts]
    summary: dict[str, dict[str, str]] = {}
    for lm in lms:
        out = _results_path(args.out, lm.loops, len(lms) > 1)
        if args.ppl_text:
            stats = None if exit_rule is None else ExitStats()
            result = perplexity(lm.model, lm.tokenizer, args.ppl_text, seq_len=args.ppl_seq_len,
                                max_tokens=args.ppl_tokens, loops=lm.loops, exit=exit_rule, exit_stats=stats)
            spent = "" if stats is None else f", {stats.mean_loops:.2f} thinking iterations per token"
            print(f"{lm.info.label}: perplexity {result.ppl:.3f} over {result.tokens} tokens "
                  f"({result.windows} windows{spent})")
            lm.info = dataclasses.replace(lm.info, perplexity=result.ppl, perplexity_loops=None if stats is None else
                                          LoopUsage(float(stats.mean_loops), float(stats.executed_loops)))
        results = evaluate(lm, names, limit=args.limit, num_fewshot=args.num_fewshot, include_path=include_path,
                           samples_dir=out.with_name(f"{out.stem}_samples") if names else None,
                           progress=lambda line, label=lm.info.label: print(f"{label}: {line}", flush=True),
                           use_cache=None if args.use_cache is None else _cache_file(args.use_cache, lm.info.label),
                           bootstrap_iters=args.bootstrap_iters, gen_kwargs=args.gen_kwargs,
                           apply_chat_template=args.apply_chat_template,
                           fewshot_as_multiturn=args.fewshot_as_multiturn,
                           system_instruction=args.system_instruction, random_seed=seeds[0],
                           numpy_random_seed=seeds[1], torch_random_seed=seeds[2], fewshot_random_seed=seeds[3])
        with writing(out):
            write_results(out, results)
        print(f"wrote {out}")
        column = summary.setdefault(lm.info.label, {})
        column.update({name: "missing" if task.score is None else f"{100 * task.score:.1f}"
                       for name, task in results.tasks.items()})
        column.update({f"{group.label} (mean)": "—" if group.score is None else f"{100 * group.score:.1f}"
                       for group in results.groups.values()})
    rows = list(dict.fromkeys(row for column in summary.values() for row in column))
    if rows:
        print_table(f"loopreg eval: {args.model}", [(row, *(column.get(row, "-") for column in summary.values()))
                                                    for row in rows], header=["task", *summary])
    return 0


def lm_eval_alias_main(argv: list[str]) -> int:
    """``loopreg lm-eval``: ``loopreg eval`` under its old name for one release (``--out DIR`` becomes
    ``DIR/results.json``; ``--log-samples`` is always on)."""
    print("note: `loopreg lm-eval` is now `loopreg eval` (same options); this alias goes in the next release",
          file=sys.stderr)
    if "--predict-only" in argv:
        raise UserError("`loopreg eval` always scores; drop --predict-only (the samples are written beside the "
                        "results)", key="--predict-only")
    argv = [arg for arg in argv if arg != "--log-samples"]
    if "--out" in argv[:-1]:
        index = argv.index("--out") + 1
        if not argv[index].endswith(".json"):
            argv[index] = str(Path(argv[index]) / "results.json")
    return cli_main(argv)
