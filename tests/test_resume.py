"""Resume is exact: a run killed at a random batch and restarted with autoresume ends with the same bits
as an uninterrupted run (weights, optimizer state, RNG, data position), with LoopSurgery and the
LoopRegularizer active. The synthetic stream (2 DataLoader workers) runs as real ``loopreg train``
subprocesses, one SIGKILLed; packed text runs in this process, crashed by an exception (a subprocess
costs ~10 s of imports on the 2-core test machine)."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from loopreg.config import load_recipe
from loopreg.data.mixture import MixtureStream, text_windows
from loopreg.data.resumable import positions
from loopreg.data.tasks import TaskData, TrainStream
from loopreg.data.synthetic import PHop
from loopreg.data.text import PackedText, byte_level_tokenizer
from loopreg.train import build_trainer

from .callbacks import Crash
from .conftest import REPO, tiny_overrides

LOOPREG = str(Path(sys.executable).parent / "loopreg")
BATCHES, SAVE_EVERY = 12, 3
# Surgery turns the 4-layer model into an untied (1⊗1,2,1) at INIT; the regularizer pulls its middle pair.
COMMON = [f"max_duration={BATCHES}ba", f"save_interval={SAVE_EVERY}ba", "eval_interval=2ba", "autoresume=true",
          "export_folder=null", "progress_bar=false", "log_to_console=true", "console_log_interval=1ba",
          "model.spec=4x1", "model.d_model=32", "model.n_heads=2", "model.d_ff=64", "scheduler.t_warmup=2ba",
          "algorithms.loop_surgery.spec=1x(1,2,1)", "algorithms.loop_surgery.tied=false",
          "algorithms.loop_regularizer.lambda_reg=1.0"]
SYNTHETIC = ["recipes/cpu_phop.yaml", *COMMON, "global_train_batch_size=8", "device_train_microbatch_size=4",
             "device_eval_batch_size=8", "eval_data.eval_size=8", "train_data.num_workers=2"]


def _start(args: list[str], folder: Path) -> tuple[subprocess.Popen, Path]:
    log = folder.with_suffix(".log")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", "PYTHONWARNINGS": "ignore"}
    with log.open("w") as out:
        process = subprocess.Popen([LOOPREG, "train", *args, f"save_folder={folder}"], cwd=REPO, stdout=out,
                                   stderr=subprocess.STDOUT, env=env)
    return process, log


def _wait(process: subprocess.Popen, log: Path, timeout: float = 300) -> None:
    try:
        assert process.wait(timeout=timeout) == 0, log.read_text()[-3000:]
    finally:
        process.kill()


def kill_and_resume(args: list[str], root: Path) -> tuple[int, Path]:
    """Run ``loopreg train ARGS`` twice at once into ``root/whole`` and ``root/killed``, SIGKILL the second at
    a random batch after its first checkpoint, resume it (autoresume finds the checkpoints) and wait for both
    to finish. Returns the batch it was killed after and the resumed run's log."""
    kill_at = random.randint(SAVE_EVERY + 1, BATCHES - 2)  # after the first checkpoint
    whole, (victim, victim_log) = _start(args, root / "whole"), _start(args, root / "killed")
    deadline = time.monotonic() + 300
    while victim.poll() is None and time.monotonic() < deadline:
        if f"[batch={kill_at}/{BATCHES}]" in victim_log.read_text():
            victim.send_signal(signal.SIGKILL)
            break
        time.sleep(0.02)
    victim.wait(timeout=10)
    assert victim.returncode == -signal.SIGKILL, victim_log.read_text()[-3000:]
    resumed = _start(args, root / "killed")
    _wait(*whole)
    _wait(*resumed)
    return kill_at, resumed[1]


@pytest.fixture(scope="module")
def killed_run(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """The uninterrupted run and the run SIGKILLed at a random batch (both at once), then its resume."""
    root = tmp_path_factory.mktemp("resume")
    kill_at, resume_log = kill_and_resume(SYNTHETIC, root)
    return {"whole": root / "whole", "killed": root / "killed", "kill_at": kill_at, "resume_log": resume_log}


def _final(folder: Path) -> dict:
    return torch.load(folder / f"ep0-ba{BATCHES}-rank0.pt", map_location="cpu", weights_only=False)


def _assert_same_run(whole: dict, resumed: dict, samples: int, context: str) -> None:
    for key in ("model", "optimizers", "schedulers", "dataset_state"):
        _assert_same(whole["state"][key], resumed["state"][key], f"{context}: state.{key}")
    assert resumed["state"]["dataset_state"]["train"] == {"sample": samples}
    # The RNG the checkpoint restored: the evals every 2 batches draw from it, so a resume that forgot it
    # ends elsewhere.
    _assert_same(whole["rng"], resumed["rng"], f"{context}: rng")


def _assert_same(a, b, path: str) -> None:
    if isinstance(a, dict):
        assert a.keys() == b.keys(), path
        for key in a:
            _assert_same(a[key], b[key], f"{path}.{key}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), path
        for index, (x, y) in enumerate(zip(a, b)):
            _assert_same(x, y, f"{path}[{index}]")
    elif torch.is_tensor(a):
        assert torch.equal(a, b), path
    elif isinstance(a, np.ndarray):  # numpy's RNG state
        assert np.array_equal(a, b), path
    else:
        assert a == b, path


@pytest.mark.slow
def test_sigkilled_synthetic_run_resumes_bitwise_identical(killed_run: dict):
    log = killed_run["resume_log"].read_text()
    first = int(log.split("[batch=", 1)[1].split("/", 1)[0])  # the resumed process's first batch
    # It resumed from a checkpoint (not from scratch, not from the end), and went on to the end.
    assert SAVE_EVERY < first < BATCHES and (first - 1) % SAVE_EVERY == 0, (killed_run["kill_at"], first)
    assert f"[batch={BATCHES}/{BATCHES}]" in log
    context = f"killed after batch {killed_run['kill_at']}, resumed at batch {first}"
    print(context)  # shown with -rP: which batch this run was killed at
    _assert_same_run(_final(killed_run["whole"]), _final(killed_run["killed"]), samples=BATCHES * 8, context=context)


def test_crashed_text_run_resumes_bitwise_identical(text_corpus: Path, tmp_path: Path):
    args = [*tiny_overrides(text_corpus), *COMMON]
    whole = build_trainer(load_recipe(REPO / "recipes" / "cpu_tiny_text.yaml", [*args, f"save_folder={tmp_path}/w"]))
    whole.fit()
    whole.close()
    crash_at = random.randint(SAVE_EVERY + 1, BATCHES - 1)
    recipe = load_recipe(REPO / "recipes" / "cpu_tiny_text.yaml", [*args, f"save_folder={tmp_path}/k"])
    crashed = build_trainer(recipe, extra_callbacks=[Crash(crash_at)])
    with pytest.raises(KeyboardInterrupt):
        crashed.fit()
    crashed.close()
    resumed = build_trainer(recipe)
    first = int(resumed.state.timestamp.batch) + 1
    assert SAVE_EVERY < first <= crash_at + 1
    resumed.fit()
    resumed.close()
    context = f"crashed after batch {crash_at}, resumed at batch {first}"
    print(context)
    _assert_same_run(_final(tmp_path / "w"), _final(tmp_path / "k"), samples=BATCHES * 4, context=context)


def test_positions_cover_each_global_batch_once_for_any_ranks_and_workers():
    global_batch, start = 12, 36
    for world_size, workers in ((1, 1), (2, 1), (3, 2), (4, 3)):
        per_rank = global_batch // world_size
        taken = []  # rank-local batches in the order the DataLoader yields them: round robin over workers
        for rank in range(world_size):
            streams = [positions(start, rank, world_size, per_rank, worker, workers) for worker in range(workers)]
            batches = [[next(streams[b % workers]) for _ in range(per_rank)] for b in range(5)]
            taken.append(batches)
        for b in range(5):  # global batch b = the ranks' b-th batches together
            assert sorted(i for rank in taken for i in rank[b]) == list(range(start + b * 12, start + (b + 1) * 12))


def test_streams_resume_at_the_checkpointed_example_under_another_world_size():
    """A run saved after 24 examples (say on 1 process) resumes on 2 ranks at example 24, and on each rank
    the examples equal those of one uninterrupted stream."""
    data = TaskData(PHop(length=8, hops=2))
    documents = lambda: iter([f"document {i} " * (i % 5 + 1) for i in range(40)])  # noqa: E731
    makers = {"synthetic": lambda rank, world: TrainStream(data, seed=5, rank=rank, world_size=world, batch_size=4),
              "text": lambda rank, world: PackedText(documents, byte_level_tokenizer(), 8, rank=rank,
                                                     world_size=world, batch_size=4),
              "mixture": lambda rank, world: MixtureStream(
                  {"text": (2.0, text_windows(PackedText(documents, byte_level_tokenizer(), 8))),
                   "phop": (1.0, text_windows(PackedText(lambda: (e.prompt for e in PHop(length=8, hops=2).stream(
                       "train", 1)), byte_level_tokenizer(), 8)))},
                  seed=5, rank=rank, world_size=world, batch_size=4)}
    for name, make in makers.items():
        whole = [item["input_ids"].tolist() for item in _take(make(0, 1), 48)]
        saved = make(0, 1).state_dict(num_samples=24, from_beginning=True)
        for rank in range(2):
            stream = make(rank, 2)
            stream.load_state_dict(saved)
            assert [item["input_ids"].tolist() for item in _take(stream, 8)] == whole[24 + rank::2][:8], name


def test_synthetic_stream_jumps_to_its_chunk():
    """A resume deep into the stream costs at most one chunk of generation, not the whole prefix."""
    stream = TrainStream(TaskData(PHop(length=16, hops=2)), seed=0, batch_size=256)
    stream.load_state_dict({"sample": 10**12})
    started = time.perf_counter()
    next(iter(stream))
    assert time.perf_counter() - started < 1.0


def _take(stream, count: int) -> list[dict]:
    iterator = iter(stream)
    return [next(iterator) for _ in range(count)]
