"""Grouped downstream evaluation for looped (and any other) language models.

Tasks and groups are YAML data (``tasks/``, ``groups/``); :func:`evaluate` runs any object with a
``generate(prompts, max_new_tokens, stop)`` method over them and writes a ``loopreg.eval/1`` results
file; :func:`perplexity` scores any causal LM on text; :func:`report_main` turns results files into the
paper's Table 3 (with % Gap) or a depth-scaling fit.

    from loopreg.evals import evaluate, load_task_specs
    results = evaluate(generator, load_task_specs(["closed_book", "math_word"]), limit=200)
"""

from .aggregate import GroupScore, TaskScore, aggregate_group, aggregate_groups, centered_accuracy, percent_gap
from .metrics import METRICS, bootstrap_stderr, exact, exact_match, f1, numeric_match, parse_number, score
from .ppl import PerplexityResult, perplexity, text_windows
from .report import (DEFAULT_COLUMNS, RESULTS_SCHEMA, EvalResults, ModelInfo, ReportRow, ReportTable, load_results,
                     report_main, scaling_report, table3, to_json, to_markdown, to_rich, write_results)
from .runner import TextGenerator, evaluate, truncate_at_stop
from .scaling import DepthPoint, LogDepthFit, alpha_ratios, families, fit_log_depth, fit_scaling, plot_scaling
from .tasks import (DATA_DIR_ENV, EvalConfigError, EvalDataError, EvalExample, GroupSpec, TaskDataMissing, TaskSpec,
                    build_prompt, load_examples, load_groups, load_task_spec, load_task_specs, parse_task_spec,
                    resolve_data_dir, select_shots, task_prompts)

__all__ = [
    "DATA_DIR_ENV", "DEFAULT_COLUMNS", "METRICS", "RESULTS_SCHEMA",
    "DepthPoint", "EvalConfigError", "EvalDataError", "EvalExample", "EvalResults", "GroupScore", "GroupSpec",
    "LogDepthFit", "ModelInfo", "PerplexityResult", "ReportRow", "ReportTable", "TaskDataMissing", "TaskScore",
    "TaskSpec", "TextGenerator",
    "aggregate_group", "aggregate_groups", "alpha_ratios", "bootstrap_stderr", "build_prompt", "centered_accuracy",
    "evaluate", "exact", "exact_match", "f1", "families", "fit_log_depth", "fit_scaling", "load_examples",
    "load_groups", "load_results", "load_task_spec", "load_task_specs", "numeric_match", "parse_number",
    "parse_task_spec", "percent_gap", "perplexity", "plot_scaling", "report_main", "resolve_data_dir",
    "scaling_report", "score", "select_shots", "table3", "task_prompts", "text_windows", "to_json", "to_markdown",
    "to_rich", "truncate_at_stop", "write_results",
]
