"""RandomLoops: the distributions (bounds, determinism, Huginn's mean), bad distributions as one-line errors,
and training through Composer on a LoopedLM and on a tied HF retrofit, where each batch really runs the
drawn loop count (two gloo ranks: tests/test_multiprocess_equivalence.py)."""

from __future__ import annotations

import copy
import subprocess
import sys

import pytest
import torch
from composer import Trainer
from composer.loggers import InMemoryLogger
from composer.models import HuggingFaceModel
from torch.utils.data import DataLoader
from transformers import LlamaConfig, LlamaForCausalLM

from loopreg.algorithms.random_loops import RandomLoops, check_distribution, sample_loops
from loopreg.composer_model import ComposerLoopedLM
from loopreg.model import LoopedLM, LoopedLMConfig
from loopreg.surgery import loop_surgery
from loopreg.surgery.core import stored_layers

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


def fit(model, layer, batches: int = 6, **algorithm):
    from composer.core import Callback

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
