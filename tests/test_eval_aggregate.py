"""Group / All averages, missing-task flags, centered accuracy and % Gap against the paper's Table 3."""

from __future__ import annotations

import math

import pytest

from loopreg.evals import (GroupSpec, TaskScore, aggregate_group, aggregate_groups, centered_accuracy, load_groups,
                           percent_gap)

# Per-task accuracies (%) of paper Tables 5-8, in each group's YAML task order.
PAPER_TASKS = ("triviaqa tydiqa_nocontext natural_questions webquestions "
               "tydiqa_goldp squad_v2 drop quac coqa "
               "asdiv mawps_addsub mawps_multiarith mawps_singleeq mawps_singleop svamp "
               "primitives_code_d0 primitives_math_d0 primitives_code_d1 primitives_math_d1").split()
PAPER_ROWS = {  # model: (spec, perplexity, 19 task accuracies)
    "base-24x1": ("24x1", 7.40, [24.5, 10.6, 4.3, 5.6, 33.4, 41.3, 23.4, 18.6, 52.7,
                                 26.9, 49.9, 2.7, 38.6, 40.2, 17.9, 71.1, 72.5, 24.2, 22.3]),
    "base-12x1": ("12x1", 8.16, [15.9, 9.3, 2.4, 5.2, 21.8, 34.6, 20.0, 17.3, 41.1,
                                 23.1, 44.8, 2.0, 36.8, 37.9, 15.3, 52.2, 51.6, 20.7, 18.3]),
    "loop-12x2": ("12x2", 7.90, [18.6, 9.6, 3.4, 5.8, 27.7, 39.5, 22.3, 17.6, 46.8,
                                 31.5, 55.9, 2.0, 47.4, 50.2, 18.5, 73.5, 86.5, 21.3, 23.6]),
    "base-4x1": ("4x1", 10.12, [3.3, 1.9, 0.6, 1.5, 3.4, 19.0, 11.1, 13.1, 22.3,
                                7.9, 10.4, 1.5, 11.0, 19.0, 8.3, 19.3, 23.3, 17.3, 17.6]),
    "loop-4x6": ("4x6", 8.79, [11.8, 8.8, 2.4, 3.5, 22.0, 32.4, 20.1, 15.8, 40.7,
                               19.9, 49.1, 1.7, 29.3, 35.9, 12.6, 87.9, 90.0, 24.8, 24.8]),
}
# Table 3 as printed: closed, open, math, All (15), primitives.
PAPER_TABLE3 = {
    "base-24x1": (11.2, 33.9, 29.3, 26.0, 47.5),
    "base-12x1": (8.2, 26.9, 26.7, 21.8, 35.7),
    "loop-12x2": (9.3, 30.8, 34.3, 26.5, 51.2),
    "base-4x1": (1.8, 13.8, 9.7, 9.0, 19.4),
    "loop-4x6": (6.7, 26.2, 24.8, 20.4, 56.9),
}
PAPER_GAPS = {  # perplexity, closed, open, math, All, primitives
    "loop-12x2": (34, 37, 56, 282, 110, 131),
    "loop-4x6": (48, 52, 61, 77, 67, 133),
}
COLUMNS = ("closed_book", "open_book", "math_word", "all_tasks", "reasoning_primitives")


def paper_scores(model: str, absent: tuple[str, ...] = ()) -> dict[str, TaskScore]:
    """The paper's per-task numbers as TaskScores (fractions), leaving out the ``absent`` tasks."""
    groups = load_groups()
    group_of = {task: name for name, group in groups.items() if name != "all_tasks" for task in group.tasks}
    accuracies = PAPER_ROWS[model][2]
    return {task: TaskScore(acc / 100, 0.01, 100, "exact_match", group_of[task])
            for task, acc in zip(PAPER_TASKS, accuracies) if task not in absent}


def test_printed_table3_arithmetic() -> None:
    assert percent_gap(looped=34.3, iso_param=26.7, iso_flop=29.3) == pytest.approx(292.3, abs=0.05)
    # middle loop (4⊗1,4,1), All tasks: the paper prints 95%, the formula gives 76% (erratum)
    assert percent_gap(looped=25.0, iso_param=21.8, iso_flop=26.0) == pytest.approx(76.2, abs=0.05)
    # perplexity uses raw values: lower is better on both sides of the ratio
    assert round(percent_gap(looped=7.90, iso_param=8.16, iso_flop=7.40)) == 34
    assert percent_gap(1.0, 2.0, 2.0) != percent_gap(1.0, 2.0, 2.0)  # nan when the baselines are equal


@pytest.mark.parametrize("model", sorted(PAPER_TABLE3))
def test_group_and_all_averages_reproduce_table3(model: str) -> None:
    groups = aggregate_groups(load_groups(), paper_scores(model))
    for column, printed in zip(COLUMNS, PAPER_TABLE3[model]):
        assert 100 * groups[column].score == pytest.approx(printed, abs=0.1), column
        assert groups[column].complete
    # "All" is the mean over 15 tasks, i.e. the task-count-weighted mean of the three groups
    weighted = (4 * groups["closed_book"].score + 5 * groups["open_book"].score + 6 * groups["math_word"].score) / 15
    assert groups["all_tasks"].score == pytest.approx(weighted)


@pytest.mark.parametrize(("iso", "looped"), [("base-12x1", "loop-12x2"), ("base-4x1", "loop-4x6")])
def test_percent_gap_from_task_scores_matches_table3_within_rounding(iso: str, looped: str) -> None:
    groups = load_groups()
    averages = {name: aggregate_groups(groups, paper_scores(name)) for name in (iso, looped, "base-24x1")}
    gaps = [percent_gap(PAPER_ROWS[looped][1], PAPER_ROWS[iso][1], PAPER_ROWS["base-24x1"][1])]
    gaps += [percent_gap(averages[looped][c].score, averages[iso][c].score, averages["base-24x1"][c].score)
             for c in COLUMNS]
    # the paper's per-task numbers are rounded to 0.1, which moves a % Gap by up to a few points
    assert gaps == pytest.approx(PAPER_GAPS[looped], abs=3)


def test_missing_tasks_are_flagged_not_dropped() -> None:
    scores = paper_scores("base-24x1", absent=("drop", "coqa", "mawps_singleop"))
    groups = aggregate_groups(load_groups(), scores)
    assert groups["open_book"].label == "open_book (3/5 tasks)"
    assert groups["open_book"].missing == ("drop", "coqa")
    assert groups["math_word"].label == "math_word (5/6 tasks)"
    assert groups["all_tasks"].label == "all_tasks (12/15 tasks)"
    assert groups["closed_book"].label == "closed_book" and groups["closed_book"].complete
    open_book = [scores[t].score for t in ("tydiqa_goldp", "squad_v2", "quac")]
    assert groups["open_book"].score == pytest.approx(sum(open_book) / 3)


def test_a_task_that_could_not_be_scored_counts_as_missing() -> None:
    group = GroupSpec(name="g", title="G", tasks=["a", "b"])
    absent = TaskScore(None, None, 0, "f1", "g", missing="task b: open_book/b.jsonl: local file not found")
    result = aggregate_group(group, {"a": TaskScore(0.4, 0.03, 50, "f1", "g"), "b": absent})
    assert (result.score, result.n_tasks, result.n_defined, result.missing) == (0.4, 1, 2, ("b",))
    empty = aggregate_group(group, {})
    assert empty.score is None and empty.stderr is None and empty.label == "g (0/2 tasks)"


def test_group_stderr_combines_task_stderrs() -> None:
    group = GroupSpec(name="g", title="G", tasks=["a", "b"])
    result = aggregate_group(group, {"a": TaskScore(0.2, 0.03, 100, "exact", "g"),
                                     "b": TaskScore(0.4, 0.04, 100, "exact", "g")})
    assert result.stderr == pytest.approx(0.05 / 2)


def test_centered_accuracy() -> None:
    assert centered_accuracy(0.625, 0.25) == 0.5
    assert centered_accuracy(1 / 7, 1 / 7) == 0.0
    group = GroupSpec(name="synthetic", title="S", tasks=["phop", "igsm"])
    tasks = {"phop": TaskScore(0.625, 0.02, 100, "exact", "synthetic", random_baseline=0.25),
             "igsm": TaskScore(0.5, 0.02, 100, "exact", "synthetic", random_baseline=0.0)}
    centered = aggregate_group(group, tasks, centered=True)
    assert centered.score == pytest.approx(0.5)
    assert centered.stderr == pytest.approx(math.hypot(0.02 / 0.75, 0.02) / 2)  # stderr scales by 1/(1-b)
