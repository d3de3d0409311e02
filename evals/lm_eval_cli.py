"""``loopreg lm-eval``: EleutherAI's lm-eval on any model loopreg loads, at one or more loop counts.

    loopreg lm-eval runs/smollm2_middle --loops 1,2,4 --tasks arc_easy,gsm8k --limit 100 --out runs/lm_eval/middle
    loopreg lm-eval runs/loop_4x6/model --tasks my_task --include-path my_tasks/ --num-fewshot 0 --out runs/lm_eval/x

MODEL is anything ``loopreg eval`` accepts (GGUF file, loopreg or HF folder, hub id). Each loop count runs
``lm_eval.simple_evaluate`` with the ``loopreg`` model (:class:`~loopreg.evals.lm_eval_model.LoopregLM`) and
writes ``OUT/loops_<L>.json`` (``loops_default.json`` without ``--loops``): lm-eval's results dict plus
``model``, ``spec`` and ``loops``; ``--log-samples`` adds ``OUT/loops_<L>_samples_<task>.jsonl``. A table of
every metric per task and loop count ends the run. Needs the ``lmeval`` extra (``pip install -e '.[lmeval]'``).
"""

from __future__ import annotations

import argparse
import functools
import json
import re
from pathlib import Path
from typing import Any

from loopreg.errors import UserError, did_you_mean, writing
from loopreg.tables import print_table

from .cli import _loop_list

__all__ = ["cli_main", "results_table"]

DEFAULT_SEEDS = "0,1234,1234,1234"  # lm-eval's: python, numpy, torch, few-shot sampling


def _require_lm_eval() -> None:
    try:
        import lm_eval  # noqa: F401
    except ImportError:
        raise UserError("lm-eval is not installed; install the extra: pip install -e '.[lmeval]'") from None


@functools.lru_cache(maxsize=4)
def _task_manager(include_path: str | None) -> Any:
    """lm-eval's task index (all its YAMLs and ``include_path``'s: seconds to build), once per process."""
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=include_path)


def _check_tasks(names: list[str], known: list[str]) -> None:
    """A one-line error for the first name that is neither a task, group or tag lm-eval knows nor a YAML file."""
    for name in names:
        if name not in known and not Path(name).is_file():
            raise UserError(f"unknown lm-eval task '{name}'{did_you_mean(name, known)}; "
                            "give a task folder with --include-path", key="--tasks")


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


def _dumps(data: Any, indent: int | None = 2) -> str:
    from lm_eval.utils import handle_non_serializable  # numpy scalars and sets, as lm-eval's own CLI writes them

    return json.dumps(data, indent=indent, default=handle_non_serializable, ensure_ascii=False)


def results_table(runs: dict[str, dict[str, Any]]) -> tuple[list[str], list[tuple[str, ...]]]:
    """(header, rows) of the summary: one row per task and metric (``value ± stderr``), one column per run.

    >>> results_table({"1": {"results": {"t": {"alias": "t", "acc,none": 0.5, "acc_stderr,none": 0.1}}}})
    (['task', 'metric', 'loops=1'], [('t', 'acc', '0.5 ± 0.1')])
    """
    cells: dict[tuple[str, str], dict[str, str]] = {}
    for label, results in runs.items():
        for task, metrics in results["results"].items():
            for key, value in metrics.items():
                metric, _, filter_name = key.partition(",")
                if not filter_name or "_stderr" in metric or not isinstance(value, (int, float)):  # name, alias, n
                    continue
                stderr = metrics.get(f"{metric}_stderr,{filter_name}")
                name = metric if filter_name in ("", "none") else f"{metric} ({filter_name})"
                cell = f"{value:.4g}" + (f" ± {stderr:.4g}" if isinstance(stderr, (int, float)) else "")
                cells.setdefault((task, name), {})[label] = cell
    header = ["task", "metric", *(f"loops={label}" for label in runs)]
    return header, [(task, name, *(row.get(label, "-") for label in runs)) for (task, name), row in cells.items()]


def cli_main(argv: list[str]) -> int:
    """Entry for ``loopreg lm-eval`` (see the module docstring); a user error raises a one-line
    :class:`~loopreg.errors.UserError`."""
    parser = argparse.ArgumentParser(prog="loopreg lm-eval", description=__doc__.splitlines()[0])
    parser.add_argument("model", help="GGUF file, loopreg model folder, HF folder (looped or not) or hub id")
    parser.add_argument("--loops", default=None, help="loop counts of a tied looped model, e.g. 1,2,4 "
                        "(default: the model's own)")
    parser.add_argument("--tasks", required=True, help="comma-separated lm-eval tasks, groups or task YAML files")
    parser.add_argument("--include-path", type=Path, default=None, help="folder of extra task YAMLs")
    parser.add_argument("--out", type=Path, required=True, help="folder for loops_<L>.json (and samples)")
    parser.add_argument("--num-fewshot", type=int, default=None, help="few-shot examples (default: each task's)")
    parser.add_argument("--limit", type=float, default=None, help="examples per task (a fraction if < 1)")
    parser.add_argument("--batch-size", type=_batch_size, default="1",
                        help="an integer, 'auto' or 'auto:N' (default: 1)")
    parser.add_argument("--max-batch-size", type=int, default=64, help="the most --batch-size auto tries")
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
    parser.add_argument("--log-samples", action="store_true", help="also write every request and response")
    parser.add_argument("--predict-only", action="store_true", help="responses only, no metrics (implies samples)")
    parser.add_argument("--bootstrap-iters", type=int, default=100000, help="bootstrap resamples for stderrs")
    args = parser.parse_args(argv)

    loop_counts = _loop_list(args.loops)
    tasks = [name.strip() for name in args.tasks.split(",") if name.strip()]
    if not tasks:
        raise UserError("name at least one task", key="--tasks")
    if args.include_path is not None and not args.include_path.is_dir():
        raise UserError(f"{args.include_path}: not a folder", key="--include-path")
    _require_lm_eval()
    seeds = _parse_seeds(args.seed)
    import lm_eval

    from .lm_eval_model import LoopregLM, load_model

    task_manager = _task_manager(str(args.include_path) if args.include_path else None)
    _check_tasks(tasks, task_manager.all_tasks)
    # every loop count is checked (a plain or untied model cannot take one) before the first runs
    model, tokenizer = load_model(args.model)
    lms = [LoopregLM(model, loops=loops, tokenizer=tokenizer, device=args.device, dtype=args.dtype,
                     batch_size=args.batch_size, max_batch_size=args.max_batch_size) for loops in loop_counts]
    with writing(args.out):
        args.out.mkdir(parents=True, exist_ok=True)
    runs: dict[str, dict[str, Any]] = {}
    for lm in lms:
        results = lm_eval.simple_evaluate(
            model=lm, tasks=tasks, task_manager=task_manager, num_fewshot=args.num_fewshot, limit=args.limit,
            batch_size=args.batch_size, device=args.device,  # recorded in the results' config
            bootstrap_iters=args.bootstrap_iters, log_samples=args.log_samples, predict_only=args.predict_only,
            gen_kwargs=args.gen_kwargs, apply_chat_template=args.apply_chat_template,
            fewshot_as_multiturn=args.fewshot_as_multiturn, system_instruction=args.system_instruction,
            random_seed=seeds[0], numpy_random_seed=seeds[1], torch_random_seed=seeds[2],
            fewshot_random_seed=seeds[3])
        label = "default" if lm.loops is None else str(lm.loops)
        for task, samples in results.pop("samples", {}).items():
            lines = "".join(f"{_dumps(sample, indent=None)}\n" for sample in samples)
            (args.out / f"loops_{label}_samples_{task}.jsonl").write_text(lines)
        path = args.out / f"loops_{label}.json"
        path.write_text(_dumps({**results, "model": args.model, "spec": lm.info.spec, "loops": lm.loops}) + "\n")
        runs[label] = results
        print(f"wrote {path}")
    header, rows = results_table(runs)
    print_table(f"lm-eval: {args.model}", rows, header=header)
    return 0
