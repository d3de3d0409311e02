"""The demo and the reproduction command run end to end (tiny budgets) and write the documented files."""

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from loopreg.reproduce import HARDER, REASONING, TABLES, best_seed, render_markdown, row_fingerprint


@pytest.mark.slow
def test_demo_writes_results_json(tmp_path):
    result = subprocess.run([sys.executable, "-m", "loopreg.cli", "demo", "--steps", "3", "--out", str(tmp_path),
                             "eval_data.eval_size=8", "model.d_model=16", f"export_folder={tmp_path}/model"],
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    data = json.loads((tmp_path / "results.json").read_text())
    assert [row["spec"] for row in data["rows"]] == ["1x1", "1x4", "4x1"]
    assert [(row["params_units"], row["flops_units"]) for row in data["rows"]] == [(1, 1), (1, 4), (4, 4)]
    assert all(set(row) >= {"model", "spec", "params_units", "flops_units", "accuracy"} for row in data["rows"])
    assert data["task"]["task"] == "phop" and data["task"]["steps"] == 3
    assert "(1⊗4)" in result.stdout


def test_demo_bad_flag_exits_2():
    result = subprocess.run([sys.executable, "-m", "loopreg.cli", "demo", "--loops", "1"], capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 2 and "Traceback" not in result.stderr


@pytest.mark.slow
def test_reproduce_resumes_and_renders(tmp_path):
    args = [sys.executable, "-m", "loopreg.cli", "reproduce", "--tables", "igsm", "--seeds", "1", "--steps", "2",
            "--out",
            str(tmp_path), "--doc", str(tmp_path / "REPRO.md"), "eval_data.eval_size=8", "model.d_model=16",
            f"export_folder={tmp_path}/model"]
    # Two processes split the table with --rows into the same --out; their rows merge in table order.
    split = [subprocess.Popen([*args, "--rows", rows], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for rows in ("1x8,1x1", "2x1")]
    for process in split:
        _, stderr = process.communicate(timeout=600)
        assert process.returncode == 0, stderr[-2000:]
    data = json.loads((tmp_path / "results.json").read_text())
    assert [row["row"] for row in data["tasks"]["igsm"]["rows"]] == ["1x1", "1x8", "2x1"]
    first = subprocess.run(args, capture_output=True, text=True, timeout=600)  # the remaining rows only
    assert first.returncode == 0, first.stderr[-2000:]
    assert first.stdout.count("steps)") == len(TABLES["igsm"].rows) - 3
    data = json.loads((tmp_path / "results.json").read_text())
    assert [row["row"] for row in data["tasks"]["igsm"]["rows"]] == list(TABLES["igsm"].rows)
    assert {row["seed"] for row in data["tasks"]["igsm"]["rows"]} == {17}
    second = subprocess.run(args, capture_output=True, text=True, timeout=600)  # everything done: no training
    assert second.returncode == 0 and "steps)" not in second.stdout
    stale = data["tasks"]["igsm"]["rows"][1]
    stale["recipe"] = "0" * 12  # as if it had trained under another recipe
    (tmp_path / "results.json").write_text(json.dumps(data))
    third = subprocess.run(args, capture_output=True, text=True, timeout=600)  # the stale row only
    assert third.returncode == 0 and third.stdout.count("steps)") == 1, third.stdout
    assert f"{TABLES['igsm'].label(stale['row'])}, seed 17" in third.stdout
    doc = (tmp_path / "REPRO.md").read_text()
    assert "| Loop (1⊗8) | 1x/8x | 1 |" in doc and "73.2" in doc  # the paper's value beside ours


def test_reproduce_unknown_row_exits_2():
    result = subprocess.run([sys.executable, "-m", "loopreg.cli", "reproduce", "--tables", "phop", "--rows", "1x1,8x1"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.count("error:") == 1 and "8x1" in result.stderr


def test_render_markdown_rows():
    current = row_fingerprint(TABLES["phop"], "1x6", [])
    rows = [{"row": "1x6", "seed": seed, "scores": {"eval": score}, "seconds": 1.0, "recipe": current}
            for seed, score in ((17, 97.0), (18, 99.0))]
    rows.append({"row": "1x6", "seed": 19, "scores": {"eval": 10.0}, "seconds": 1.0, "recipe": "0" * 12})  # stale
    rows.append({"row": "2x3", "seed": 17, "scores": {"eval": 50.0}, "seconds": 1.0})  # stale: no fingerprint
    results = {"tasks": {"phop": {"steps": 10, "command": "loopreg reproduce --tables phop --steps 10",
                                  "date": "2026-12-06", "rows": rows}}}
    text = render_markdown(results)
    # current seeds only, mean ± std; the best seed as the paper reports it
    assert "| Loop (1⊗6) | 1x/6x | 2 | 98.0 ± 1.4 | 99.0 (seed 18) | 99.9 | 99.5 |" in text
    assert "| Loop (2⊗3) † | 2x/6x | 1 | 50.0 | 50.0 (seed 17) | 99.9 | 99.8 |" in text  # no current one: the stale one
    assert "† Trained under an older `recipes/cpu_phop.yaml`" in text and text.count("† Trained") == 1
    assert "10 steps per model" in text and "`loopreg reproduce --tables phop --steps 10`" in text
    assert "Seeds 17, 18;" in text and "Measured 2026-12-06" in text
    earlier = {"title": "Earlier setting: a shorter budget", "command": "loopreg reproduce --tables phop --steps 5",
               "steps": 5, "date": "2026-12-01", "discussion": "It was too short.",
               "rows": [{"row": "1x6", "seed": 17, "scores": {"eval": 33.0}, "seconds": 1.0, "recipe": current}]}
    results["tasks"]["phop"]["earlier"] = [earlier]
    text = render_markdown(results)
    below = text[text.index("### Earlier setting: a shorter budget"):]
    # one seed a row: no best-seed column (it would repeat the mean)
    assert "| Loop (1⊗6) | 1x/6x | 1 | 33.0 | 99.9 | 99.5 |" in below and "It was too short." in below
    assert "best seed" not in below
    # an earlier setting scored on other columns than today's keeps its own
    results["tasks"]["phop"]["earlier"] = [{**earlier, "columns": ["p3"], "rows": [
        {**earlier["rows"][0], "scores": {"p3": 21.0}}]}]
    below = render_markdown(results).split("### Earlier setting")[1]
    assert "| Model | Params/FLOPs | seeds | ours p3 | paper p=16 | paper p=32 |" in below
    assert "| Loop (1⊗6) | 1x/6x | 1 | 21.0 | 99.9 | 99.5 |" in below


def test_best_seed_is_the_highest_mean_over_the_columns():
    entry = {"rows": [{"row": "2x1", "seed": 17, "scores": {"n2": 90.0, "n4": 10.0}},
                      {"row": "2x1", "seed": 18, "scores": {"n2": 60.0, "n4": 60.0}},
                      {"row": "2x1", "seed": 19, "scores": {"n2": 99.0}},  # not scored on n4: not a candidate
                      {"row": "3x1", "seed": 17, "scores": {"n2": 100.0, "n4": 100.0}}]}
    assert best_seed(entry, "2x1", ("n2", "n4")) == "60.0 / 60.0 (seed 18)"


def lm_mini_result(row: str, seed: int, reasoning: float, ppl: float) -> dict:
    table = TABLES["lm_mini"]
    scores = {"wiki_ppl": ppl, **{key: reasoning for key in REASONING}, **{key: reasoning / 2 for key in HARDER}}
    for loops in (*table.loop_sweep.get(row, ()), *([table.more_loops[row]] if row in table.more_loops else [])):
        scores.update({f"{key}@{loops}": reasoning + loops for key in (*REASONING, *HARDER)})
    return {"row": row, "seed": seed, "scores": scores, "seconds": 60.0, "recipe": row_fingerprint(table, row, [])}


def test_lm_mini_renders_gaps_regularizer_deltas_scaling_fits_and_the_plot(tmp_path):
    accuracy = {"2x1": 20.0, "4x1": 40.0, "8x1": 60.0, "2x2": 35.0, "2x4": 50.0, "reg_4x2_l10": 70.0,
                "2x4_random": 30.0}
    rows = [lm_mini_result(row, seed, value + (seed - 17), 8.0 - value / 20)
            for row, value in accuracy.items() for seed in (17, 18, 19)]
    results = {"tasks": {"lm_mini": {"steps": 5, "command": "loopreg reproduce --tables lm_mini --steps 5",
                                     "date": "2026-12-06", "rows": rows}}}
    text = render_markdown(results, tmp_path / "REPRO.md")
    line = next(line for line in text.splitlines() if line.startswith("| Loop (2⊗4) |"))
    assert "| 2x/8x | 3 |" in line and "51.0 ± 1.0" in line  # seeds 17-19 add 0, 1, 2
    assert "| 75% |" in line  # % Gap: (51 - 21) / (61 - 21)
    assert "59.0 ± 1.0 (8 loops)" in line  # the harder split re-scored at 2x the trained loops
    reg = next(line for line in text.splitlines() if line.startswith("- Reg (8⊗1)→(4⊗2), λ=10"))
    assert "reasoning +10.00 (+10.0 σ)" in reg and "perplexity -0.50" in reg
    assert "| (2⊗L) trained at L, reasoning | 21.64 |" in text  # 20 + 15/ln2 * ln(D/2) through three depths
    assert "| RandomLoops (2⊗L) at L = 1–8, reasoning | 0.00 |" not in text
    pooled, within = (re.search(rf"\| RandomLoops \(2⊗L\) at L = 1–8, reasoning{tail} \| ([-.\d]+) \| [-.\d]+ \| "
                                rf"([.\d]+) \| 24 \|", text).groups() for tail in ("", ", within seed"))
    assert pooled[0] == within[0] and float(within[1]) > float(pooled[1])  # seed levels 30, 31, 32: same slope
    assert (tmp_path / "lm_mini.png").stat().st_size > 10_000


def test_rows_with_commas_inside_their_spec_can_be_chosen():
    from loopreg.reproduce import split_rows

    rows = split_rows("8x1, 2x(1,2,1),reg_4x2_l10,")
    assert rows == ["8x1", "2x(1,2,1)", "reg_4x2_l10"] and set(rows) <= set(TABLES["lm_mini"].rows)


def test_frontier_distances_use_each_seeds_own_baselines():
    from loopreg.reproduce import frontier_distances

    table = TABLES["lm_mini"]
    # seed 17: baselines (20% at ppl 8, 40% at ppl 6); seed 18: (30% at 8, 50% at 6); (2⊗4) at ppl 7 each time
    rows = [lm_mini_result("2x1", 17, 20.0, 8.0), lm_mini_result("8x1", 17, 40.0, 6.0),
            lm_mini_result("2x1", 18, 30.0, 8.0), lm_mini_result("8x1", 18, 50.0, 6.0),
            lm_mini_result("2x4", 17, 35.0, 7.0), lm_mini_result("2x4", 18, 41.0, 7.0),
            lm_mini_result("4x2", 17, 10.0, 9.0)]  # outside the frontier's perplexity range: no distance
    entry = {"steps": 5, "rows": rows}
    distances = frontier_distances(entry, table)
    assert list(distances) == ["2x4"] and distances["2x4"] == pytest.approx([5.0, 1.0])  # 35 - 30, 41 - 40
    text = render_markdown({"tasks": {"lm_mini": {**entry, "command": "c", "date": "d"}}})
    line = next(line for line in text.splitlines() if line.startswith("| Loop (2⊗4) |"))
    assert "| +3.0 ± 2.8 (t = +1.5) |" in line  # mean 3, std 2√2, t = 3 / (2√2 / √2)


def test_percent_gap_is_not_read_off_a_baseline_gap_within_noise():
    rows = [lm_mini_result(row, seed, value + noise, 8.0)
            for row, value in (("2x1", 50.0), ("8x1", 51.0), ("2x4", 55.0)) for seed, noise in ((17, -3), (18, 3))]
    text = render_markdown({"tasks": {"lm_mini": {"steps": 5, "command": "c", "date": "d", "rows": rows}}})
    line = next(line for line in text.splitlines() if line.startswith("| Loop (2⊗4) |"))
    assert "| — (no gap) |" in line  # 1 point between the baselines, seeds ±3: not 500%
    rows = [lm_mini_result(row, seed, value + noise, 8.0)
            for row, value in (("2x1", 20.0), ("8x1", 60.0), ("2x4", 50.0)) for seed, noise in ((17, -1), (18, 1))]
    text = render_markdown({"tasks": {"lm_mini": {"steps": 5, "command": "c", "date": "d", "rows": rows}}})
    assert "| 75% |" in next(line for line in text.splitlines() if line.startswith("| Loop (2⊗4) |"))


def test_a_result_is_recorded_beside_rows_this_version_does_not_know(tmp_path):
    """Processes of two versions share one --out: rows the table no longer (or not yet) has are kept, last."""
    from loopreg.reproduce import _record

    saved = tmp_path / "results.json"
    _record(saved, "phop", 10, [], {"row": "9x9", "seed": 17, "scores": {"eval": 9.0}, "seconds": 1.0})
    results = _record(saved, "phop", 10, [], {"row": "1x6", "seed": 17, "scores": {"eval": 50.0}, "seconds": 1.0})
    assert [row["row"] for row in results["tasks"]["phop"]["rows"]] == ["1x6", "9x9"]
    assert "| Loop (1⊗6) † |" in render_markdown(results)  # the unknown row is not rendered, nor in the way


def test_a_table_run_in_another_setting_keeps_the_results_so_far_below_it(tmp_path):
    """A new --steps (or overrides) starts the table afresh; the setting measured so far moves to ``earlier``."""
    from loopreg.reproduce import _record

    saved = tmp_path / "results.json"
    current = row_fingerprint(TABLES["phop"], "1x6", [])
    _record(saved, "phop", 10, [], {"row": "1x6", "seed": 17, "scores": {"eval": 40.0}, "seconds": 1.0,
                                    "recipe": current})
    results = json.loads(saved.read_text())
    results["tasks"]["phop"]["discussion"] = "Ten steps were too few."
    saved.write_text(json.dumps(results))
    results = _record(saved, "phop", 20, [], {"row": "1x6", "seed": 17, "scores": {"eval": 90.0}, "seconds": 1.0,
                                              "recipe": current})
    entry = results["tasks"]["phop"]
    assert entry["steps"] == 20 and [row["scores"]["eval"] for row in entry["rows"]] == [90.0]
    [earlier] = entry["earlier"]
    assert earlier["steps"] == 10 and earlier["rows"][0]["scores"]["eval"] == 40.0
    assert earlier["command"] == "loopreg reproduce --tables phop --steps 10"
    assert earlier["discussion"] == "Ten steps were too few." and "10 steps" in earlier["title"]
    text = render_markdown(results)
    assert text.index("| Loop (1⊗6) | 1x/6x | 1 | 90.0 |") < text.index("### Earlier setting") < text.index("| 40.0 |")
    # a third setting stacks the earlier ones, newest first; until its first result the page shows them
    results = _record(saved, "phop", 30, ["model.d_model=32"])
    assert [e["steps"] for e in results["tasks"]["phop"]["earlier"]] == [20, 10]
    assert results["tasks"]["phop"]["rows"] == []
    text = render_markdown(results)
    assert "`loopreg reproduce --tables phop --steps 30 model.d_model=32`: being run, no result yet." in text
    assert "| 90.0 |" in text and "| 40.0 |" in text


def test_the_reproduction_page_is_rendered_from_its_results_file(tmp_path):
    """Every number in docs/REPRODUCTION.md comes from docs/reproduction_results.json: the page is its rendering."""
    docs = Path(__file__).resolve().parents[1] / "docs"
    results = json.loads((docs / "reproduction_results.json").read_text())
    assert render_markdown(results, tmp_path / "REPRODUCTION.md") == (docs / "REPRODUCTION.md").read_text()
