"""Results files, the Table 3 report (snapshot), exports and the ``report_main`` command line."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import pytest

from loopreg.evals import (EvalDataError, EvalResults, ModelInfo, TaskScore, aggregate_groups, load_groups,
                           load_results, report_main, table3, to_json, to_markdown, write_results)
from loopreg.spec import LoopSpec

from .conftest import run_cli
from .test_eval_aggregate import PAPER_ROWS, paper_scores

OFFLINE_ABSENT = ("drop", "coqa", "mawps_singleop")

SNAPSHOT = """\
### Downstream evaluation

| Model | Params/FLOPs | PPL ↓ | Closed-book QA (4) | Open-book QA (5) | Math word problems (6) | \
All tasks (15) | Reasoning primitives (4) |
|---|---|---|---|---|---|---|---|
| base-24x1 | 24x/24x | 7.40 | 11.2 | 31.1 (3/5) | 27.2 (5/6) | 22.9 (12/15) | 47.5 |
| base-12x1 | 12x/12x | 8.16 | 8.2 | 24.6 (3/5) | 24.4 (5/6) | 19.0 (12/15) | 35.7 |
| loop-12x2 | 12x/24x | 7.90 | 9.4 | 28.3 (3/5) | 31.1 (5/6) | 23.1 (12/15) | 51.2 |
| % Gap |  | 34% | 38% | 57% | 238% | 107% | 131% |

- scores: accuracy, %; (m/n): average over m of the group's n tasks
- all_tasks: 12/15 tasks (missing: drop, coqa, mawps_singleop)
- math_word: 5/6 tasks (missing: mawps_singleop)
- open_book: 3/5 tasks (missing: drop, coqa)
- % Gap = (looped − iso-param) / (iso-FLOP base-24x1 − iso-param); perplexity on raw values
"""


def paper_results(name: str, absent: tuple[str, ...] = OFFLINE_ABSENT) -> EvalResults:
    spec, perplexity, _ = PAPER_ROWS[name]
    tasks = paper_scores(name, absent)
    return EvalResults(ModelInfo.from_spec(name, spec, perplexity), tasks, aggregate_groups(load_groups(), tasks))


@pytest.fixture
def results_dir(tmp_path: Path) -> Path:
    for name in ("base-24x1", "base-12x1", "loop-12x2", "base-4x1", "loop-4x6"):
        write_results(tmp_path / "runs" / f"{name}.json", paper_results(name))
    return tmp_path / "runs"


def test_table3_markdown_snapshot() -> None:
    results = [paper_results(name) for name in ("base-24x1", "base-12x1", "loop-12x2")]
    table = table3(results, load_groups(), pairs=[("base-12x1", "loop-12x2")], baseline="base-24x1")
    assert to_markdown(table) == SNAPSHOT


def test_json_export_keeps_raw_numbers() -> None:
    results = [paper_results(name, absent=()) for name in ("base-24x1", "base-12x1", "loop-12x2")]
    exported = to_json(table3(results, load_groups(), pairs=[("base-12x1", "loop-12x2")], baseline="base-24x1"))
    gap = exported["rows"][-1]
    assert gap["kind"] == "gap" and gap["values"]["Model"] == "base-12x1:loop-12x2"
    assert gap["values"]["All tasks (15)"] == pytest.approx(110, abs=0.5)  # paper: 110%
    assert exported["rows"][0]["values"]["PPL ↓"] == 7.40
    json.dumps(exported)


def test_gap_needs_the_same_tasks_in_all_three_models() -> None:
    results = [paper_results("base-24x1", absent=()), paper_results("base-12x1"), paper_results("loop-12x2")]
    gap = table3(results, load_groups(), pairs=[("base-12x1", "loop-12x2")], baseline="base-24x1").rows[-1]
    assert gap.cells[3] == "38%" and gap.cells[4] == "—" and gap.values[4] is None


def test_results_round_trip_and_bad_files(tmp_path: Path) -> None:
    original = paper_results("loop-4x6")
    path = write_results(tmp_path / "loop.json", original)
    assert load_results([path]) == [original]
    (tmp_path / "other.json").write_text('{"schema": "something/else"}')
    with pytest.raises(EvalDataError, match=r"other.json: not a results file: schema is 'something/else'"):
        load_results([tmp_path / "other.json"])
    (tmp_path / "broken.json").write_text('{"schema": "loopreg.eval/1", "model": "m"}')
    with pytest.raises(EvalDataError, match=r"broken.json: malformed loopreg.eval/1 results"):
        load_results([tmp_path / "broken.json"])
    with pytest.raises(EvalDataError, match="is also in"):
        load_results([path, path])


def test_model_info_from_spec() -> None:
    info = ModelInfo.from_spec("middle", "4x(1,4,1)", perplexity=7.81)
    assert (info.spec, info.loops, info.units) == ("4x(1,4,1)", 4, "12x/24x")
    assert ModelInfo("hf-model").units == "—"


def test_report_main_prints_and_exports(results_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    code = report_main([str(results_dir), "--pair", "base-12x1:loop-12x2", "--pair", "base-4x1:loop-4x6",
                        "--baseline", "base-24x1",
                        "--markdown", str(tmp_path / "t.md"), "--json", str(tmp_path / "t.json")])
    assert code == 0
    printed = capsys.readouterr().out
    assert "loop-4x6" in printed and "% Gap" in printed and "(3/5)" in printed
    markdown = (tmp_path / "t.md").read_text()
    assert markdown.count("| % Gap |") == 2
    assert json.loads((tmp_path / "t.json").read_text())["schema"] == "loopreg.report/1"


def test_report_main_centered_and_group_choice(results_dir: Path, capsys: pytest.CaptureFixture) -> None:
    assert report_main([str(results_dir / "base-4x1.json"), "--groups", "synthetic,math_word", "--centered"]) == 0
    assert "centered accuracy" in capsys.readouterr().out


def test_report_main_scaling_writes_a_png(results_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    png = tmp_path / "scaling.png"
    assert report_main([str(results_dir), "--scaling", "--png", str(png), "--json", str(tmp_path / "s.json")]) == 0
    assert png.read_bytes()[:4] == b"\x89PNG"
    rows = json.loads((tmp_path / "s.json").read_text())["rows"]
    families = {(row["values"]["Group"], row["values"]["Family"]) for row in rows}
    assert ("math_word", "looped (4⊗L)") in families and ("math_word", "non-looped (D⊗1)") in families
    looped = next(r["values"] for r in rows if r["values"]["Family"] == "looped (4⊗L)")
    assert looped["n"] == 2 and looped["R²"] is None  # two depths: an exact line, no R²
    base = next(r["values"] for r in rows if r["values"]["Family"] == "non-looped (D⊗1)")
    assert base["n"] == 3 and 0 < base["R²"] < 1
    printed = capsys.readouterr().out
    assert "natural log" in printed and "n=2 depths: exact fit, R² not meaningful" in printed
    assert "1.000" not in printed


def png_size(path: Path) -> tuple[int, int]:
    """Width and height from the PNG's IHDR chunk."""
    header = path.read_bytes()[16:24]
    return int.from_bytes(header[:4], "big"), int.from_bytes(header[4:], "big")


def test_scaling_of_a_source_and_its_retrofit_sweep(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """``loopreg eval`` on a 30-layer source and ``--loops 1,2`` on its middle-looped retrofit, primitives only:
    one panel, and the two-depth fit is marked exact instead of printing R² = 1.000."""
    def primitives(accuracy: float) -> dict[str, TaskScore]:
        return {task: TaskScore(accuracy, 0.01, 100, "exact_match", "reasoning_primitives")
                for task in load_groups()["reasoning_primitives"].tasks}

    runs = tmp_path / "eval"
    write_results(runs / "source.json", EvalResults(ModelInfo.from_spec("source", "30x1"), primitives(0.30)))
    for loops, accuracy in ((1, 0.28), (2, 0.33)):
        spec = str(LoopSpec.parse("7x1+5x2+18x1").with_loops(loops))
        write_results(runs / f"retrofit_loops{loops}.json",
                      EvalResults(ModelInfo.from_spec(f"retrofit@loops{loops}", spec), primitives(accuracy)))
    png, markdown = tmp_path / "scaling.png", tmp_path / "scaling.md"
    assert report_main([str(runs), "--scaling", "--png", str(png), "--markdown", str(markdown)]) == 0
    assert png_size(png) == (540, 432)  # a single 4.5 x 3.6 inch panel at 120 dpi, not a 2 x 3 grid
    text = markdown.read_text()
    alpha = (0.33 - 0.29) / math.log(35 / 30)  # depths 30 (source, loops=1: mean 0.29) and 35 (loops=2)
    row = f"| Reasoning primitives | looped (30⊗L) | {100 * alpha:.2f} | {100 * (0.29 - alpha * math.log(30)):.1f} |"
    assert f"{row} — | 3 | — |" in text
    assert "R² —: n=2 depths: exact fit, R² not meaningful" in text
    assert "no fit (every family has a single depth)" not in text  # reasoning_primitives has the looped fit
    assert "only the groups with scores: reasoning_primitives" in text
    capsys.readouterr()


@pytest.mark.parametrize(("argv", "message"), [
    (["missing.json"], "missing.json: no such results file"),
    (["{dir}", "--pair", "base-12x1:loop-12x2"], "--pair needs --baseline"),
    (["{dir}", "--pair", "base-12x1", "--baseline", "base-24x1"], "expected ISO_PARAM:LOOPED"),
    (["{dir}", "--pair", "base-12x1:nope", "--baseline", "base-24x1"], "no results for model 'nope'"),
    (["{dir}", "--groups", "closed_book,bogus"], "unknown group(s) bogus"),
    (["{dir}", "--png", "x.png"], "--png needs --scaling"),
    (["{dir}", "--no-such-flag"], "unrecognized arguments"),
    ([], "the following arguments are required"),
])
def test_report_main_user_errors_are_one_line_and_exit_2(results_dir: Path, capsys: pytest.CaptureFixture,
                                                         argv: list[str], message: str) -> None:
    status, out, err = run_cli(["report", *(arg.format(dir=results_dir) for arg in argv)], capsys)
    assert status == 2 and out == "" and err.count("\n") == 1
    assert err.startswith("error: ") and message in err


def test_percent_gap_of_equal_baselines_prints_a_dash() -> None:
    same = [paper_results("base-12x1"), paper_results("loop-12x2")]
    gap = table3(same, load_groups(), pairs=[("base-12x1", "loop-12x2")], baseline="base-12x1").rows[-1]
    assert set(gap.cells[2:]) == {"—"} and all(math.isnan(value) for value in gap.values[2:])


# ---------------------------------------------------------------------------------------- --compute (issue #17)
def exit_run(rule: str | None, score: float, usage: tuple[float, float] | None = None,
             kv_policy: str = "per_application", name: str = "phop@loops8") -> EvalResults:
    """A (1⊗8) p-hop run: fixed (``rule`` None) or with an exit rule and its (mean, executed) iterations."""
    from loopreg.evals.report import LoopUsage

    info = dataclasses.replace(ModelInfo.from_spec(name, "1x8"), exit=rule, kv_policy=kv_policy)
    tasks = {"phop": TaskScore(score, 0.01, 200, "exact", "synthetic", 0.25)}
    return EvalResults(info, tasks, loop_usage={} if usage is None else {"phop": LoopUsage(*usage)})


def test_exit_fields_round_trip(tmp_path: Path) -> None:
    run = exit_run("kl:0.01", 0.905, (5.0, 7.0), kv_policy="shared")
    path = write_results(tmp_path / "kl.json", run)
    data = json.loads(path.read_text())
    assert (data["exit"], data["kv_policy"]) == ("kl:0.01", "shared")
    assert (data["tasks"]["phop"]["mean_loops"], data["tasks"]["phop"]["executed_loops"]) == (5.0, 7.0)
    assert load_results([path]) == [run]
    assert load_results([path])[0].info.label == "phop@loops8+exit=kl:0.01+kv=shared"
    fixed = json.loads(write_results(tmp_path / "fixed.json", exit_run(None, 0.91)).read_text())
    assert "mean_loops" not in fixed["tasks"]["phop"] and fixed["exit"] is None


def test_compute_report_rows_deltas_and_target(tmp_path: Path) -> None:
    runs = tmp_path / "adaptive"
    for file, run in [("fixed", exit_run(None, 0.91)), ("kl", exit_run("kl:0.01", 0.905, (5.0, 7.0))),
                      ("latent", exit_run("latent:0.1", 0.80, (3.0, 6.0))),
                      ("kl_small", exit_run("kl:0.001", 0.91, (7.0, 8.0))),
                      ("shared", exit_run(None, 0.89, kv_policy="shared"))]:
        write_results(runs / f"{file}.json", run)
    png, out = tmp_path / "acc_vs_loops.png", tmp_path / "compute.json"
    assert report_main([str(runs), "--compute", "--png", str(png), "--json", str(out),
                        "--markdown", str(tmp_path / "c.md")]) == 0
    assert png.read_bytes()[:4] == b"\x89PNG"
    rows = [row["values"] for row in json.loads(out.read_text())["rows"]]
    assert [(r["Exit"], r["KV"]) for r in rows] == [(None, "per_application"), (None, "shared"),
                                                    ("kl:0.001", "per_application"), ("kl:0.01", "per_application"),
                                                    ("latent:0.1", "per_application")]
    fixed, shared, kl_small, kl, latent = rows
    assert (fixed["Mean loops"], fixed["Executed"], fixed["Fewer"], fixed["Δ acc"]) == (8.0, 8.0, 0.0, 0.0)
    assert shared["Δ acc"] == pytest.approx(-2.0) and shared["Target"] is False
    assert kl["Fewer"] == pytest.approx(37.5) and kl["Fewer executed"] == pytest.approx(12.5)
    assert kl["Δ acc"] == pytest.approx(-0.5) and kl["Target"] is True
    assert kl_small["Fewer"] == pytest.approx(12.5) and kl_small["Target"] is False  # too few iterations saved
    assert latent["Δ acc"] == pytest.approx(-11.0) and latent["Target"] is False  # too much accuracy lost
    assert "| phop@loops8 | kl:0.01 | per_application | phop | 90.5 | 5.00 | 7.00 | 38% | 12% | -0.5 | ✓ |" \
        in (tmp_path / "c.md").read_text()


def test_compute_figure_one_panel_per_model() -> None:
    from loopreg.evals.compute import ComputePoint, compute_figure

    points = [ComputePoint("phop@loops8", "phop", None, "per_application", 8.0, 0.91),
              ComputePoint("phop@loops8", "phop", "kl:0.01", "per_application", 5.0, 0.90),
              ComputePoint("phop@loops8", "phop", "kl:0.1", "per_application", 3.0, 0.70),
              ComputePoint("phop@loops8", "phop", "latent:0.1", "shared", 3.0, 0.80),
              ComputePoint("smol@loops2", "primitives_math_d0", "kl:0.01", "per_application", 1.5, 0.49)]
    figure = compute_figure(points)
    assert [axis.get_title() for axis in figure.axes] == ["phop@loops8", "smol@loops2"]
    lines, labels = figure.axes[0].get_legend_handles_labels()
    assert labels == ["phop (kl)", "phop (latent, kv shared)", "phop (fixed)"]
    assert list(lines[0].get_xdata()) == [3.0, 5.0]  # thresholds in order of iterations


@pytest.mark.parametrize(("files", "message"), [
    (["lonely"], "lonely.json: no mean_loops (run loopreg eval with --exit)"),
    (["fixed", "broken_exit"], "broken_exit.json: no mean_loops (run loopreg eval with --exit)"),
    (["fixed", "kl", "--scaling"], "--scaling and --compute are different reports; give one"),
])
def test_compute_report_user_errors(tmp_path: Path, capsys: pytest.CaptureFixture, files: list[str],
                                    message: str) -> None:
    runs = {"fixed": exit_run(None, 0.91), "kl": exit_run("kl:0.01", 0.9, (5.0, 7.0)),
            "lonely": exit_run(None, 0.5, name="other"), "broken_exit": exit_run("kl:0.1", 0.9)}
    argv = [arg if arg.startswith("--") else str(write_results(tmp_path / f"{arg}.json", runs[arg])) for arg in files]
    status, out, err = run_cli(["report", *argv, "--compute"], capsys)
    assert status == 2 and out == "" and err.count("\n") == 1
    assert err.startswith("error: ") and message in err


def test_frontier_report_places_looped_models_against_the_baselines(results_dir: Path, tmp_path: Path,
                                                                     capsys: pytest.CaptureFixture) -> None:
    """Fig. 1 from results files: a looped model's score minus the baselines' score interpolated at its
    perplexity, recomputed here from the paper's rows; the plot is written."""
    png, exported = tmp_path / "frontier.png", tmp_path / "frontier.json"
    status, out, err = run_cli(["report", str(results_dir), "--frontier", "reasoning_primitives", "--png", str(png),
                                "--json", str(exported)], capsys)
    assert status == 0, err
    rows = {row["values"]["Model"]: list(row["values"].values()) for row in json.loads(exported.read_text())["rows"]}
    score = {name: 100 * aggregate_groups(load_groups(), paper_results(name).tasks)["reasoning_primitives"].score
             for name in rows}
    baselines = sorted((PAPER_ROWS[name][1], score[name]) for name in rows if not LoopSpec.parse(
        PAPER_ROWS[name][0]).is_looped)
    for name, (_, baseline, perplexity, value, _, above) in rows.items():
        assert baseline == (not LoopSpec.parse(PAPER_ROWS[name][0]).is_looped) and value == pytest.approx(score[name])
        low, high = max(b for b in baselines if b[0] <= perplexity), min(b for b in baselines if b[0] >= perplexity)
        if not baseline:
            frontier = low[1] + (perplexity - low[0]) / (high[0] - low[0]) * (high[1] - low[1])
            assert above == pytest.approx(value - frontier)
    assert rows["loop-12x2"][5] > 0  # the paper's claim 2: above the frontier at its perplexity
    assert png.stat().st_size > 10_000


def test_frontier_report_needs_perplexity_and_the_group(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    no_ppl = dataclasses.replace(paper_results("base-12x1"), info=ModelInfo.from_spec("base-12x1", "12x1"))
    path = write_results(tmp_path / "x.json", no_ppl)
    status, out, err = run_cli(["report", str(path), "--frontier", "reasoning_primitives"], capsys)
    assert status == 2 and "'base-12x1' has no perplexity" in err and err.count("\n") == 1
    status, out, err = run_cli(["report", str(path), "--frontier", "sudoku"], capsys)
    assert status == 2 and "no score in group 'sudoku'" in err
    status, out, err = run_cli(["report", str(path), "--frontier", "sudoku", "--scaling"], capsys)
    assert status == 2 and "--scaling and --frontier are different reports" in err
