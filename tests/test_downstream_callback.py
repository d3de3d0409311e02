"""The training-time downstream eval callback logs group scores and the isoplot's log-perplexity."""

import pytest
from composer.loggers import InMemoryLogger

from loopreg.config import load_recipe
from loopreg.errors import RecipeError
from loopreg.train import build_trainer

from .conftest import REPO


def test_downstream_eval_logs_group_scores_during_training():
    recipe = load_recipe(REPO / "recipes" / "cpu_phop.yaml", [
        "model.d_model=16", "max_duration=4ba", "eval_interval=2ba", "eval_data.eval_size=8",
        "global_train_batch_size=8", "device_train_microbatch_size=8", "export_folder=null",
        "loggers.in_memory={}", "callbacks.downstream_eval.groups=[phop]", "callbacks.downstream_eval.interval=2ba",
        "callbacks.downstream_eval.limit=4", "train_data.task_kwargs.length=256", "train_data.task_kwargs.hops=16",
        "max_seq_len=257"])
    trainer = build_trainer(recipe)
    trainer.fit()
    memory = next(d for d in trainer.logger.destinations if isinstance(d, InMemoryLogger))
    assert len(memory.data["downstream/phop"]) == 2  # batches 2 and 4
    assert 0.0 <= memory.data["downstream/synthetic"][-1][1] <= 1.0
    assert "downstream/log_perplexity" in memory.data


def test_downstream_eval_rejects_unknown_group():
    recipe = load_recipe(REPO / "recipes" / "cpu_phop.yaml", ["callbacks.downstream_eval.groups=[nope]"])
    with pytest.raises((RecipeError, ValueError), match="nope"):
        build_trainer(recipe)


def test_downstream_eval_interval_must_be_in_batches():
    from loopreg.callbacks.downstream_eval import DownstreamEval

    with pytest.raises(ValueError) as raised:
        DownstreamEval(["synthetic"], interval="0.5dur")
    assert str(raised.value) == "callbacks.downstream_eval.interval: must be in batches (e.g. '10000ba'), got '0.5dur'"
