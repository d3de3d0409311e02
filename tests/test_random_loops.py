"""RandomLoops: the distributions (bounds, determinism, Huginn's mean), bad distributions as one-line errors,
and training through Composer on a LoopedLM and on a tied HF retrofit, where each batch really runs the
drawn loop count (two gloo ranks: tests/test_multiprocess_equivalence.py). The loop-count curriculum: its
values against the formulas, the drawn mean following it, determinism, a resumed run continuing it, and its
bad inputs as one-line errors."""

from __future__ import annotations

import copy
import math
import random
import subprocess
import sys

import pytest
import torch
from composer import Trainer
from composer.core import Callback, Time
from composer.loggers import InMemoryLogger
from composer.models import HuggingFaceModel
from torch.utils.data import DataLoader
from transformers import LlamaConfig, LlamaForCausalLM

from loopreg.algorithms.random_loops import (RandomLoops, check_distribution, curriculum_value, distribution_mean,
                                             ramp_batches, sample_loops, scheduled_grad_loops)
from loopreg.composer_model import ComposerLoopedLM
from loopreg.config import load_recipe
from loopreg.errors import RecipeError
from loopreg.model import LoopedLM, LoopedLMConfig
from loopreg.surgery import loop_surgery
from loopreg.surgery.core import stored_layers
from loopreg.train import build_trainer

from .callbacks import Crash
from .conftest import REPO, tiny_overrides

VOCAB = 64


pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.mark.parametrize("distribution, support", [
    ({"kind": "choice", "values": [1, 3, 5]}, {1, 3, 5}),
    ({"kind": "uniform", "low": 2, "high": 4}, {2, 3, 4}),
    ({"kind": "poisson_lognormal", "mean": 3, "sigma": 0.5, "max": 6}, set(range(1, 7))),
])
def test_draws_stay_in_the_support_and_are_deterministic(distribution, support):
    draws = [sample_loops(distribution, seed=5, step=step) for step in range(400)]
    assert set(draws) <= support and len(set(draws)) > 1
    assert draws == [sample_loops(distribution, seed=5, step=step) for step in range(400)]
    assert draws != [sample_loops(distribution, seed=6, step=step) for step in range(400)]


def test_poisson_lognormal_has_the_configured_mean():
    draws = [sample_loops({"kind": "poisson_lognormal", "mean": 4, "sigma": 0.5}, 0, step) for step in range(20000)]
    assert min(draws) >= 1 and abs(sum(draws) / len(draws) - 4) < 0.1


@pytest.mark.parametrize("distribution, match", [
    ({"kind": "choice", "values": [0, 2]}, "must be integers >= 1"),
    ({"kind": "uniform", "low": 0, "high": 3}, "1 <= low <= high"),
    ({"kind": "uniform", "low": 3, "high": 2}, "1 <= low <= high"),
    ({"kind": "poisson_lognormal", "mean": 1}, "must be > 1"),
    ({"kind": "gaussian", "mean": 3}, "kind 'gaussian' is not one of"),
    ({"kind": "uniform", "low": 1}, "needs \\['high', 'low'\\]"),
])
def test_bad_distributions_are_one_line_errors(distribution, match):
    with pytest.raises(ValueError, match=match):
        check_distribution(distribution)


def lm_batches(count: int, batch: int = 4, length: int = 12) -> list[dict[str, torch.Tensor]]:
    generator = torch.Generator().manual_seed(0)
    data = []
    for _ in range(count):
        ids = torch.randint(0, VOCAB, (batch, length), generator=generator)
        data.append({"input_ids": ids, "labels": ids.clone()})
    return data


class CountApplications:
    """Counts calls of one stored layer per training forward (= the loop count of its block)."""

    def __init__(self, layer: torch.nn.Module) -> None:
        self.calls, self.per_batch = 0, []
        layer.register_forward_hook(self._hook)

    def _hook(self, *_):
        self.calls += 1

    def close_batch(self):
        self.per_batch.append(self.calls)
        self.calls = 0


def fit(model, layer, batches: int = 6, logged: dict | None = None, **algorithm):
    """Train ``batches`` batches under RandomLoops(**algorithm): the logged loop counts and the counted ones
    (``logged`` receives every logged ``random_loops/*`` series)."""
    counter = CountApplications(layer)

    class Close(Callback):
        def batch_end(self, state, logger):
            counter.close_batch()

    memory = InMemoryLogger()
    trainer = Trainer(model=model, train_dataloader=DataLoader(lm_batches(batches), batch_size=None),
                      max_duration=f"{batches}ba", optimizers=torch.optim.SGD(model.parameters(), lr=1e-3),
                      algorithms=[RandomLoops(**algorithm)], callbacks=[Close()], loggers=[memory],
                      device="cpu", device_train_microbatch_size=4, progress_bar=False, seed=0)
    trainer.fit()
    if logged is not None:
        logged.update({key: [v for _, v in values] for key, values in memory.data.items()
                       if key.startswith("random_loops/")})
    return [int(v) for _, v in memory.data["random_loops/loops"]], counter.per_batch


def test_looped_lm_runs_the_drawn_loop_count_each_batch():
    torch.manual_seed(0)
    model = ComposerLoopedLM(LoopedLM(LoopedLMConfig(spec="1x(1,2,1)", vocab_size=VOCAB, d_model=16, n_heads=2)))
    drawn, calls = fit(model, model.model.layers[1], distribution={"kind": "uniform", "low": 1, "high": 4})
    assert drawn == calls and len(set(drawn)) > 1


def test_hf_retrofit_runs_the_drawn_loop_count_with_truncated_backprop():
    torch.manual_seed(0)
    source = LlamaForCausalLM(LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                                          num_attention_heads=4, num_key_value_heads=2))
    looped = loop_surgery(copy.deepcopy(source), "1x1+1x2+1x1")
    model = HuggingFaceModel(looped, use_logits=True, shift_labels=True)
    drawn, calls = fit(model, stored_layers(looped)[1], distribution={"kind": "choice", "values": [1, 2, 3]},
                       grad_loops=1)
    assert drawn == calls and len(set(drawn)) > 1


def test_recipe_with_a_bad_distribution_exits_2_in_one_line(text_corpus):
    overrides = [*tiny_overrides(text_corpus), "algorithms.random_loops.distribution.kind=uniform",
                 "algorithms.random_loops.distribution.low=0", "algorithms.random_loops.distribution.high=3"]
    result = subprocess.run([sys.executable, "-m", "loopreg.train", "recipes/cpu_tiny_text.yaml", *overrides],
                            cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines() == [  # the key path once (train._build keeps the algorithm's own)
        "error: algorithms.random_loops.distribution: loop distribution 'uniform': needs integers 1 <= low <= high, "
        "got low=0, high=3"]


# ------------------------------------------------------------------------------------------ curriculum
def reference(shape: str, start: float, end: float, step: int, ramp: float) -> float:
    """The curriculum's definition, written out: start + (end - start) * f(t), t = min(step / ramp, 1)."""
    t = min(step / ramp, 1.0)
    if shape == "constant" or t == 1.0:
        return end
    return start + (end - start) * (t if shape == "linear" else 1.0 - math.sqrt(1.0 - t))


@pytest.mark.parametrize("shape", ["constant", "linear", "1-sqrt"])
def test_curriculum_values_are_the_formulas_exactly(shape):
    for start, end, ramp in [(1.0, 2.5, 45.0), (1.5, 4.0, 7.5), (3.0, 1.0, 10.0)]:
        for step in [0, 1, 2, 3, 7, 10, 11, 22, 44, 45, 46, 100]:
            assert curriculum_value(shape, start, end, step, ramp) == reference(shape, start, end, step, ramp)
    # hand-computed points: t = 0.75 and t = 15/16 give 1 - sqrt(1 - t) = 1/2 and 3/4 exactly
    assert [curriculum_value(shape, 1.0, 3.0, step, 100) for step in (0, 50, 75, 100, 150)] == {
        "constant": [3.0] * 5, "linear": [1.0, 2.0, 2.5, 3.0, 3.0], "1-sqrt": [1.0, 3.0 - math.sqrt(2), 2.0, 3.0, 3.0],
    }[shape]
    assert curriculum_value(shape, 1.0, 3.0, 9375, 10000) == {"constant": 3.0, "linear": 2.875, "1-sqrt": 2.5}[shape]


def test_grad_loops_curriculum_rounds_half_up_and_reaches_its_end():
    assert [scheduled_grad_loops("linear", 1, 4, step, 6) for step in range(8)] == [1, 2, 2, 3, 3, 4, 4, 4]
    assert [scheduled_grad_loops("1-sqrt", 1, 4, step, 4) for step in range(6)] == [1, 1, 2, 3, 4, 4]
    assert [scheduled_grad_loops("linear", 4, 2, step, 4) for step in range(5)] == [4, 4, 3, 3, 2]  # down too
    assert [scheduled_grad_loops("constant", 1, 3, step, 4) for step in range(3)] == [3, 3, 3]
    assert [scheduled_grad_loops("linear", 1, 4, step, 6) for step in range(8)] == [
        math.floor(reference("linear", 1, 4, step, 6) + 0.5) for step in range(8)]


def test_ramp_in_batches_epochs_or_a_fraction_of_max_duration():
    ba, ep, dur = (Time.from_timestring(t) for t in ("30ba", "2ep", "0.75dur"))
    assert ramp_batches(ba, Time.from_timestring("1ep"), None, "k") == 30.0
    assert ramp_batches(ep, None, Time.from_timestring("7ba"), "k") == 14.0
    assert ramp_batches(dur, Time.from_timestring("60ba"), None, "k") == 45.0
    assert ramp_batches(dur, Time.from_timestring("4ep"), Time.from_timestring("10ba"), "k") == 30.0
    with pytest.raises(RecipeError) as error:
        ramp_batches(dur, Time.from_timestring("1000tok"), None, "algorithms.random_loops.curriculum.ramp")
    assert str(error.value) == ("algorithms.random_loops.curriculum.ramp: 0.75dur needs a max_duration in ba (or ep "
                                "with a sized train dataloader), got 1000tok; give the ramp in ba")


CURRICULUM_DISTRIBUTIONS = [
    ({"kind": "uniform", "low": 1, "high": 4}, 1.0),
    ({"kind": "choice", "values": [8, 1, 2, 4]}, 1.0),
    ({"kind": "poisson_lognormal", "mean": 4, "sigma": 0.5}, 1.5),
]


@pytest.mark.parametrize("distribution, start", CURRICULUM_DISTRIBUTIONS, ids=["uniform", "choice", "poisson"])
@pytest.mark.parametrize("shape", ["linear", "1-sqrt"])
def test_the_drawn_mean_follows_the_curriculum(distribution, start, shape):
    """One run's draws (seed 3), averaged over windows of 6000 batches, against the schedule's mean over the same
    windows; the ramp ends inside the run. Fixed seeds: the draws, and so the check, are the same every time
    (the worst window is 2.0 standard errors off at these seeds; each tolerance is ~3.3 of its kind's)."""
    ramp, steps, window = 24000, 30000, 6000
    end = distribution_mean(distribution)
    means = [curriculum_value(shape, start, end, step, ramp) for step in range(steps)]
    draws = [sample_loops(distribution, 3, step, means[step]) for step in range(steps)]
    tolerance = {"uniform": 0.05, "choice": 0.12, "poisson_lognormal": 0.1}[distribution["kind"]]
    for first in range(0, steps, window):
        drawn, scheduled = (sum(x[first:first + window]) / window for x in (draws, means))
        assert abs(drawn - scheduled) < tolerance, (first, drawn, scheduled)
    assert draws[:50] != draws[-50:] and set(draws[:3]) <= {1, 2, 3}  # shallow first: from a mean of 1 or 1.5
    assert draws[ramp:] == [sample_loops(distribution, 3, step) for step in range(ramp, steps)]  # then as without


def test_a_curriculum_draw_is_a_pure_function_of_seed_step_and_schedule():
    distribution = {"kind": "uniform", "low": 1, "high": 6}
    mean = lambda step: curriculum_value("1-sqrt", 1.0, 3.5, step, 200)  # noqa: E731
    forward = [sample_loops(distribution, 7, step, mean(step)) for step in range(300)]
    order = list(range(300))
    random.Random(0).shuffle(order)
    shuffled = {step: sample_loops(distribution, 7, step, mean(step)) for step in order}
    assert forward == [shuffled[step] for step in range(300)]  # no hidden state: any order, any process
    assert forward != [sample_loops(distribution, 8, step, mean(step)) for step in range(300)]


def test_looped_lm_follows_the_curriculum_in_composer_and_logs_it():
    torch.manual_seed(0)
    model = ComposerLoopedLM(LoopedLM(LoopedLMConfig(spec="1x(1,2,1)", vocab_size=VOCAB, d_model=16, n_heads=2)))
    logged = {}
    distribution = {"kind": "uniform", "low": 1, "high": 4}
    drawn, calls = fit(model, model.model.layers[1], batches=8, logged=logged, distribution=distribution,
                       grad_loops=3, curriculum={"shape": "1-sqrt", "start": 1, "ramp": "0.5dur"},
                       grad_loops_curriculum={"shape": "linear", "start": 1, "ramp": "6ba"})
    assert drawn == calls
    means = [curriculum_value("1-sqrt", 1.0, 2.5, step, 4.0) for step in range(8)]  # 0.5 of 8 batches
    assert logged["random_loops/mean"] == means
    assert logged["random_loops/grad_loops"] == [scheduled_grad_loops("linear", 1, 3, step, 6.0) for step in range(8)]
    assert drawn == [sample_loops(distribution, 0, step, means[step]) for step in range(8)] and drawn[0] == 1


def test_without_a_curriculum_the_mean_and_grad_loops_are_logged_constant():
    torch.manual_seed(0)
    model = ComposerLoopedLM(LoopedLM(LoopedLMConfig(spec="1x(1,2,1)", vocab_size=VOCAB, d_model=16, n_heads=2)))
    logged = {}
    fit(model, model.model.layers[1], batches=3, logged=logged, grad_loops=2,
        distribution={"kind": "choice", "values": [1, 2, 4]})
    assert logged["random_loops/mean"] == [7 / 3] * 3 and logged["random_loops/grad_loops"] == [2] * 3


def curriculum_overrides(ramp: str) -> list[str]:
    """Recipe overrides: loops uniform over 1-4, the mean ramping 1 -> 2.5 (1-sqrt over ``ramp``), grad_loops 1 -> 2
    (linear over 4 batches)."""
    key = "algorithms.random_loops"
    return [f"{key}.distribution.kind=uniform", f"{key}.distribution.low=1", f"{key}.distribution.high=4",
            f"{key}.grad_loops=2", f"{key}.curriculum.shape=1-sqrt", f"{key}.curriculum.start=1.0",
            f"{key}.curriculum.ramp={ramp}", f"{key}.grad_loops_curriculum.shape=linear",
            f"{key}.grad_loops_curriculum.start=1", f"{key}.grad_loops_curriculum.ramp=4ba"]


CURRICULUM = curriculum_overrides("0.75dur")


def logged_by_batch(trainer) -> dict[int, tuple]:
    """batch index -> (loops, mean, grad_loops) as the trainer's InMemoryLogger recorded them."""
    memory = next(d for d in trainer.logger.destinations if isinstance(d, InMemoryLogger))
    rows: dict[int, list] = {}
    for key in ("loops", "mean", "grad_loops"):
        for stamp, value in memory.data[f"random_loops/{key}"]:
            rows.setdefault(int(stamp.batch), []).append(value)
    return {batch: tuple(values) for batch, values in rows.items()}


def test_a_resumed_run_continues_the_curriculum(text_corpus, tmp_path):
    """A run crashed after a checkpoint and resumed (autoresume) draws, schedules and logs for every batch after
    the checkpoint what the uninterrupted run did, which is the formula."""
    batches = 8
    args = [*tiny_overrides(text_corpus), "model.spec=1x(1,2,1)", *CURRICULUM, f"max_duration={batches}ba",
            "save_interval=3ba", "eval_interval=8ba", "autoresume=true", "export_folder=null", "log_to_console=false",
            "loggers.in_memory={}"]
    recipe_path = REPO / "recipes" / "cpu_tiny_text.yaml"
    whole = build_trainer(load_recipe(recipe_path, [*args, f"save_folder={tmp_path}/w"]))
    whole.fit()
    whole.close()
    recipe = load_recipe(recipe_path, [*args, f"save_folder={tmp_path}/k"])
    crashed = build_trainer(recipe, extra_callbacks=[Crash(5)])
    with pytest.raises(KeyboardInterrupt):
        crashed.fit()
    crashed.close()
    resumed = build_trainer(recipe)
    assert int(resumed.state.timestamp.batch) == 3  # from the checkpoint at batch 3
    resumed.fit()
    resumed.close()
    expected = {}
    for step in range(batches):
        mean = curriculum_value("1-sqrt", 1.0, 2.5, step, 6.0)  # 0.75 of 8 batches
        expected[step] = (sample_loops({"kind": "uniform", "low": 1, "high": 4}, 0, step, mean), mean,
                          scheduled_grad_loops("linear", 1, 2, step, 4.0))
    assert logged_by_batch(whole) == expected
    assert logged_by_batch(resumed) == {step: expected[step] for step in range(3, batches)}
    assert len({loops for loops, _, _ in expected.values()}) > 1


@pytest.mark.parametrize("kwargs, message", [
    ({"curriculum": {"shape": "cosine", "start": 1, "ramp": "10ba"}},
     "algorithms.random_loops.curriculum.shape: 'cosine' is not one of constant, linear, 1-sqrt"),
    ({"distribution": {"kind": "poisson_lognormal", "mean": 3, "max": 4},
      "curriculum": {"shape": "linear", "start": 0.5, "ramp": "10ba"}},
     "algorithms.random_loops.curriculum.start: start mean 0.5 must be a number in [1, 4]"),
    ({"distribution": {"kind": "poisson_lognormal", "mean": 3, "max": 4},
      "curriculum": {"shape": "linear", "start": 5, "ramp": "10ba"}},
     "algorithms.random_loops.curriculum.start: start mean 5 must be a number in [1, 4]"),
    ({"distribution": {"kind": "uniform", "low": 2, "high": 4},
      "curriculum": {"shape": "1-sqrt", "start": 1, "ramp": "10ba"}},
     "algorithms.random_loops.curriculum.start: start mean 1 must be a number in [2, 3]"),
    ({"distribution": {"kind": "uniform", "low": 2, "high": 4},
      "curriculum": {"shape": "1-sqrt", "start": 3.5, "ramp": "10ba"}},
     "algorithms.random_loops.curriculum.start: start mean 3.5 must be a number in [2, 3]"),
    ({"distribution": {"kind": "choice", "values": [2, 4]},
      "curriculum": {"shape": "linear", "start": 1, "ramp": "1ep"}},
     "algorithms.random_loops.curriculum.start: start mean 1 must be a number in [2, 3]"),
    ({"curriculum": {"shape": "linear", "ramp": "10ba"}},
     "algorithms.random_loops.curriculum.start: shape 'linear' needs start"),
    ({"curriculum": {"shape": "linear", "start": 1, "ramp": "10"}},
     "algorithms.random_loops.curriculum.ramp: '10' must be a positive time in batches (1000ba), epochs (2ep) or a "
     "fraction of max_duration (0.5dur)"),
    ({"curriculum": {"shape": "linear", "start": 1, "ramp": "0ba"}},
     "algorithms.random_loops.curriculum.ramp: '0ba' must be a positive time in batches (1000ba), epochs (2ep) or "
     "a fraction of max_duration (0.5dur)"),
    ({"curriculum": {"shape": "linear", "start": 1, "ramp": "100tok"}},
     "algorithms.random_loops.curriculum.ramp: '100tok' must be a positive time in batches (1000ba), epochs (2ep) or "
     "a fraction of max_duration (0.5dur)"),
    ({"curriculum": {"shape": "linear", "start": 1, "ramp": "10ba", "end": 3}},
     "algorithms.random_loops.curriculum: unknown key(s) ['end']; a curriculum takes ['ramp', 'shape', 'start']"),
    ({"grad_loops": 2, "grad_loops_curriculum": {"shape": "linear", "start": 0, "ramp": "10ba"}},
     "algorithms.random_loops.grad_loops_curriculum.start: grad_loops start 0 must be a number in [1, inf]"),
    ({"grad_loops_curriculum": {"shape": "linear", "start": 1, "ramp": "10ba"}},
     "algorithms.random_loops.grad_loops_curriculum: needs grad_loops (the value it ramps to)"),
])
def test_bad_curricula_are_one_line_errors_naming_the_key(kwargs, message):
    kwargs = {"distribution": {"kind": "uniform", "low": 1, "high": 4}, **kwargs}
    with pytest.raises(RecipeError) as error:
        RandomLoops(**kwargs)
    assert str(error.value) == message


@pytest.mark.multiprocess
@pytest.mark.slow
def test_recipe_with_a_bad_curriculum_shape_exits_2_in_one_line(text_corpus):
    overrides = [*tiny_overrides(text_corpus), *CURRICULUM, "algorithms.random_loops.curriculum.shape=sqrt"]
    result = subprocess.run([sys.executable, "-m", "loopreg.train", "recipes/cpu_tiny_text.yaml", *overrides],
                            cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines() == [
        "error: algorithms.random_loops.curriculum.shape: 'sqrt' is not one of constant, linear, 1-sqrt"]
