"""The demo and the reproduction command run end to end (tiny budgets) and write the documented files."""

import json
import subprocess
import sys

import pytest

from loopreg.reproduce import TABLES, render_markdown


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
    args = [sys.executable, "-m", "loopreg.cli", "reproduce", "--tasks", "igsm", "--steps", "2", "--out",
            str(tmp_path), "--doc", str(tmp_path / "REPRO.md"), "eval_data.eval_size=8", "model.d_model=16",
            f"export_folder={tmp_path}/model"]
    # Two processes split the table with --rows into the same --out; their rows merge in table order.
    split = [subprocess.Popen([*args, "--rows", rows], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for rows in ("1x8,1x1", "2x1")]
    for process in split:
        _, stderr = process.communicate(timeout=600)
        assert process.returncode == 0, stderr[-2000:]
    data = json.loads((tmp_path / "results.json").read_text())
    assert [row["spec"] for row in data["tasks"]["igsm"]["rows"]] == ["1x1", "1x8", "2x1"]
    first = subprocess.run(args, capture_output=True, text=True, timeout=600)  # the remaining rows only
    assert first.returncode == 0, first.stderr[-2000:]
    assert first.stdout.count("steps)") == len(TABLES["igsm"].paper_rows) - 3
    data = json.loads((tmp_path / "results.json").read_text())
    assert [row["spec"] for row in data["tasks"]["igsm"]["rows"]] == list(TABLES["igsm"].paper_rows)
    second = subprocess.run(args, capture_output=True, text=True, timeout=600)  # everything done: no training
    assert second.returncode == 0 and "steps)" not in second.stdout
    doc = (tmp_path / "REPRO.md").read_text()
    assert "| Loop (1⊗8) | 1x/8x |" in doc and "73.2" in doc  # the paper's value beside ours


def test_reproduce_unknown_row_exits_2():
    result = subprocess.run([sys.executable, "-m", "loopreg.cli", "reproduce", "--tasks", "phop", "--rows", "1x1,8x1"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.count("error:") == 1 and "8x1" in result.stderr


def test_render_markdown_rows():
    results = {"seed": 17, "tasks": {"phop": {"steps": 10, "command": "loopreg reproduce --tasks phop --steps 10",
                                              "rows": [{"spec": "1x6", "scores": [97.0], "seconds": 1.0}]}}}
    text = render_markdown(results)
    assert "| Loop (1⊗6) | 1x/6x | 97.0 | 99.9 | 99.5 |" in text
    assert "10 steps per model" in text and "`loopreg reproduce --tasks phop --steps 10`" in text
