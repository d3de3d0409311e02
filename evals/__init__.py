"""Grouped downstream evaluation of looped (and any other) language models, on lm-evaluation-harness.

The tasks are lm-eval tasks (``lm_eval_tasks/``: the paper's prompts, few-shot rule and metrics over the offline
pack); :func:`evaluate` runs them and any lm-eval task on a :class:`LoopregLM` (any loop count, adaptive exit, KV
policy) into a ``loopreg.eval/1`` result; :func:`perplexity` scores any causal LM on text; :func:`report_main`
turns results files into the paper's Table 3 (with % Gap) or a depth-scaling fit.

    from loopreg.evals import LoopregLM, evaluate
    results = evaluate(LoopregLM("runs/loop_4x6/model", loops=4), ["closed_book", "math_word"], limit=200)
"""

from .aggregate import GroupScore, TaskScore, aggregate_group, aggregate_groups, centered_accuracy, percent_gap
from .catalog import TASK_DIR, GroupSpec, TaskInfo, load_groups, load_tasks
from .ppl import PerplexityResult, perplexity, text_windows
from .report import (DEFAULT_COLUMNS, RESULTS_SCHEMA, EvalDataError, EvalResults, ModelInfo, ReportRow, ReportTable,
                     load_results, report_main, scaling_report, table3, to_json, to_markdown, to_rich, write_results)
from .scaling import DepthPoint, LogDepthFit, alpha_ratios, families, fit_log_depth, fit_scaling, plot_scaling


def __getattr__(name: str):  # lm-eval (seconds to import) only for what runs a model
    if name in ("LoopregLM", "load_model"):
        from . import lm_eval_model

        return getattr(lm_eval_model, name)
    if name in ("evaluate", "resolve_tasks"):
        from . import run

        return getattr(run, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "DEFAULT_COLUMNS", "RESULTS_SCHEMA", "TASK_DIR",
    "DepthPoint", "EvalDataError", "EvalResults", "GroupScore", "GroupSpec", "LogDepthFit", "LoopregLM", "ModelInfo",
    "PerplexityResult", "ReportRow", "ReportTable", "TaskInfo", "TaskScore",
    "aggregate_group", "aggregate_groups", "alpha_ratios", "centered_accuracy", "evaluate", "families",
    "fit_log_depth", "fit_scaling", "load_groups", "load_model", "load_results", "load_tasks", "percent_gap",
    "perplexity", "plot_scaling", "report_main", "resolve_tasks", "scaling_report", "table3", "text_windows",
    "to_json", "to_markdown", "to_rich", "write_results",
]
