"""``composer -n 2`` (gloo, CPU) gives the loss curve of one process with the same global batch, for a
plain looped, a regularized and a middle-looped model (text, synthetic and mixture streams); and NonFiniteGuard's
decision is collective: a NaN on rank 1 only skips the batch on both ranks.

The two-rank side is this module run by the launcher (``composer -n 2 -m tests.test_multiprocess_equivalence
SPEC.json``): one launch trains every case in turn, so the ranks pay the imports once."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest
import torch
from composer.core import Callback
from composer.loggers import InMemoryLogger

from loopreg.config import load_recipe
from loopreg.train import build_trainer

from .conftest import REPO, free_port, run_launcher, tiny_overrides
from .test_random_loops import curriculum_overrides

pytestmark = [pytest.mark.multiprocess, pytest.mark.slow]

BATCHES = 6
COMMON = [f"max_duration={BATCHES}ba", f"eval_interval={BATCHES}ba", "eval_subset_num_batches=1",
          "global_train_batch_size=8", "device_train_microbatch_size=2", "export_folder=null",
          "progress_bar=false", "log_to_console=false", "loggers.in_memory={}",
          "callbacks.nonfinite_guard.action=skip", "scheduler.t_warmup=1ba"]
PHOP_TINY = ["model.d_model=32", "model.n_heads=2", "model.d_ff=64", "device_eval_batch_size=8",
             "eval_data.eval_size=8"]


def cases(corpus: Path) -> dict[str, list[str]]:
    """name -> [recipe, overrides...]"""
    text = ["recipes/cpu_tiny_text.yaml", *tiny_overrides(corpus), *COMMON]
    return {
        "plain_looped_1x4": ["recipes/cpu_phop.yaml", *PHOP_TINY, *COMMON],  # synthetic stream
        "regularized_4x1_untied": [*text, "model.spec=4x1", "model.tied=false",
                                   "algorithms.loop_regularizer.lambda_reg=10.0",
                                   "algorithms.loop_regularizer.block_size=2"],
        "middle_looped_1x(1,2,1)": [*text, "model.spec=1x(1,2,1)"],
        "random_loops_1x(1,2,1)": [*text, "model.spec=1x(1,2,1)", *RANDOM_LOOPS],
        "answer_only_2x1": ["recipes/cpu_addition.yaml", *PHOP_TINY, *COMMON, "model.spec=2x1"],  # targets vary
        "mixture_2x2": ["recipes/lm_mini.yaml", *COMMON, "model.spec=2x2", "model.d_model=32", "model.n_heads=2",
                        "model.d_ff=64", "max_seq_len=64", f"train_data.sources.wiki.source={corpus}",
                        "eval_data=null"],  # text and three synthetic sources in one packed stream
    }


# With a loop-count curriculum: the mean ramps 1 -> 2.5 over half the run (1-sqrt), grad_loops 1 -> 2 over 4 batches.
RANDOM_LOOPS = curriculum_overrides("0.5dur")


def drawn_loops(trainer) -> dict[str, list]:
    """The drawn loop counts, the scheduled mean and grad_loops, per batch."""
    memory = next(d for d in trainer.logger.destinations if isinstance(d, InMemoryLogger))
    return {key: [v for _, v in memory.data[f"random_loops/{key}"]] for key in ("loops", "mean", "grad_loops")}


class PoisonRank1(Callback):
    """NaN activations on rank 1 only, in batch 3; records every rank's weights around that batch."""

    def __init__(self) -> None:
        self.handle, self.weights = None, {}

    def batch_start(self, state, logger) -> None:
        from composer.utils import dist

        if int(state.timestamp.batch) + 1 == 3:
            self.weights["before"] = [p.detach().clone() for p in state.model.parameters()]
            if dist.get_global_rank() == 1:
                embed = state.model.module.model.embed  # DDP(ComposerLoopedLM)
                self.handle = embed.register_forward_hook(lambda module, args, out: out * float("nan"))

    def batch_end(self, state, logger) -> None:
        if int(state.timestamp.batch) == 3:
            self.weights["after"] = [p.detach().clone() for p in state.model.parameters()]
            if self.handle is not None:
                self.handle.remove()


def train(recipe: str, overrides: list[str], extra_callbacks: list | None = None) -> tuple[dict, object]:
    """Per-step losses (every ``loss/train/*`` key Composer logged, averaged over ranks) and the trainer."""
    trainer = build_trainer(load_recipe(REPO / recipe, overrides), extra_callbacks=extra_callbacks)
    trainer.fit()
    trainer.close()
    memory = next(d for d in trainer.logger.destinations if isinstance(d, InMemoryLogger))
    return {key: [float(v) for _, v in values] for key, values in memory.data.items()
            if key.startswith("loss/train/")}, trainer


def launched_main(spec_path: str) -> None:
    """The two-rank side: train every case, then the poisoned run; rank 0 writes the results."""
    from composer.utils import dist

    spec = json.loads(Path(spec_path).read_text())
    results = {}
    for name, (recipe, *overrides) in spec["cases"].items():
        results[name], trainer = train(recipe, overrides)
        if name.startswith("random_loops"):
            results["random_loops_per_rank"] = dist.all_gather_object(drawn_loops(trainer))
    poison = PoisonRank1()
    recipe, *overrides = spec["poison"]
    _, trainer = train(recipe, overrides, extra_callbacks=[poison])
    unchanged = all(torch.equal(a, b) for a, b in zip(poison.weights["before"], poison.weights["after"]))
    results["poison"] = {"unchanged_on_rank": dist.all_gather_object(unchanged),
                         "skipped": [c.skipped for c in trainer.state.callbacks if hasattr(c, "skipped")]}
    if dist.get_global_rank() == 0:
        Path(spec["out"]).write_text(json.dumps(results))


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory: pytest.TempPathFactory, text_corpus: Path) -> dict:
    folder = tmp_path_factory.mktemp("two_ranks")
    spec = {"cases": cases(text_corpus), "out": str(folder / "results.json"),
            "poison": cases(text_corpus)["middle_looped_1x(1,2,1)"]}
    (folder / "spec.json").write_text(json.dumps(spec))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}  # 2 ranks on 2 cores
    launcher = Path(sys.executable).parent / "composer"
    result = run_launcher([str(launcher), "-n", "2", "--master_port", str(free_port()),
                           "--stdout", str(folder / "rank{rank}.out"),
                           "--stderr", str(folder / "rank{rank}.err"), "-m", "tests.test_multiprocess_equivalence",
                           str(folder / "spec.json")], timeout=600, cwd=REPO, env=env)
    assert result.returncode == 0, (result.stdout + result.stderr)[-3000:] + (folder / "rank1.err").read_text()[-2000:]
    return json.loads((folder / "results.json").read_text())


@pytest.mark.parametrize("name", ["plain_looped_1x4", "regularized_4x1_untied", "middle_looped_1x(1,2,1)",
                                  "random_loops_1x(1,2,1)", "answer_only_2x1",
                                  "mixture_2x2"])
def test_two_ranks_follow_the_one_process_loss_curve(two_ranks: dict, text_corpus: Path, name: str):
    recipe, *overrides = cases(text_corpus)[name]
    one, _ = train(recipe, overrides)
    two = two_ranks[name]
    assert one.keys() == two.keys() and len(one["loss/train/total"]) == BATCHES
    if name.startswith("regularized"):
        assert {"loss/train/ce", "loss/train/loop_reg"} <= one.keys()
    for key in one:
        worst = max(abs(a - b) / abs(a) for a, b in zip(one[key], two[key]))
        assert worst <= 1e-5, (key, one[key], two[key])
    assert one["loss/train/total"][-1] < one["loss/train/total"][0]  # it trained: the curves are not flat


def test_two_ranks_draw_the_same_random_loop_counts(two_ranks: dict, text_corpus: Path):
    from loopreg.algorithms.random_loops import curriculum_value, scheduled_grad_loops

    recipe, *overrides = cases(text_corpus)["random_loops_1x(1,2,1)"]
    rank0, rank1 = two_ranks["random_loops_per_rank"]
    assert rank0 == rank1 and len(rank0["loops"]) == BATCHES and len(set(rank0["loops"])) > 1
    # the curriculum, resolved the same on both ranks (0.5dur of 6 batches = 3)
    assert rank0["mean"] == [curriculum_value("1-sqrt", 1.0, 2.5, step, 3.0) for step in range(BATCHES)]
    assert rank0["grad_loops"] == [scheduled_grad_loops("linear", 1, 2, step, 4.0) for step in range(BATCHES)]
    assert drawn_loops(train(recipe, overrides)[1]) == rank0  # and what one process draws


def test_a_nan_on_one_rank_skips_the_batch_on_every_rank(two_ranks: dict):
    assert two_ranks["poison"] == {"unchanged_on_rank": [True, True], "skipped": [1]}


if __name__ == "__main__":
    launched_main(sys.argv[1])
