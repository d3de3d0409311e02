"""LoopRegularizer, LoopSnap and LoopSimilarityMonitor in a Composer Trainer on CPU, and the recipes that use them."""

from __future__ import annotations

import pytest
import torch
from composer import Trainer
from composer.loggers import InMemoryLogger
from torch.utils.data import DataLoader

from loopreg.algorithms import LoopRegularizer, loop_similarity
from loopreg.callbacks.loop_snap import LoopSnap
from loopreg.callbacks.similarity_monitor import LoopSimilarityMonitor
from loopreg.composer_model import ComposerLoopedLM
from loopreg.config import load_recipe
from loopreg.model import LoopedLM, LoopedLMConfig
from loopreg.train import run

from .conftest import REPO

LAMBDA, WARMUP, STEPS = 100.0, 5, 30


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> tuple[Trainer, InMemoryLogger, object]:
    folder = tmp_path_factory.mktemp("reg_run")
    torch.manual_seed(0)
    tokens = torch.randint(0, 32, (64, 16))
    data = [{"input_ids": row, "labels": row} for row in tokens]
    model = ComposerLoopedLM(LoopedLMConfig(spec="2x3", tied=False, vocab_size=32, d_model=32, n_heads=2, d_ff=64))
    logger = InMemoryLogger()
    trainer = Trainer(model=model, train_dataloader=DataLoader(data, batch_size=8),
                      eval_dataloader=DataLoader(data[:16], batch_size=8), max_duration=f"{STEPS}ba",
                      optimizers=torch.optim.AdamW(model.parameters(), lr=1e-2),
                      algorithms=[LoopRegularizer(lambda_reg=LAMBDA, schedule="linear_warmup", t_warmup=f"{WARMUP}ba")],
                      callbacks=[LoopSimilarityMonitor(interval="10ba"), LoopSnap(at="fit_end", eval_batches=2)],
                      loggers=[logger], device="cpu",
                      progress_bar=False, save_folder=str(folder / "checkpoints"), save_interval=f"{STEPS}ba",
                      run_name="reg")
    trainer.fit()
    trainer.close()
    return trainer, logger, folder


def series(logger: InMemoryLogger, key: str) -> list[float]:
    return [float(value) for _, value in logger.data[key]]


def test_large_lambda_training_reaches_a_near_looped_model(trained):
    trainer, _, _ = trained
    similarity = loop_similarity(trainer.state.model)
    assert min(similarity.values()) >= 0.98, similarity


def test_penalty_is_its_own_loss_term_with_similarities_and_lambda_schedule(trained):
    _, logger, _ = trained
    lambdas = series(logger, "loop_reg/lambda")
    assert lambdas[0] < lambdas[WARMUP - 2] < LAMBDA and lambdas[WARMUP:] == [LAMBDA] * (STEPS - WARMUP)
    reg, total, ce = (series(logger, f"loss/train/{key}") for key in ("loop_reg", "total", "ce"))
    assert total[-1] == pytest.approx(reg[-1] + ce[-1], rel=1e-5)
    mean_similarity = series(logger, "loop_reg/similarity/mean")
    assert reg[-1] == pytest.approx(LAMBDA * (1 - mean_similarity[-1]), rel=1e-4)
    assert mean_similarity[-1] > mean_similarity[0] + 0.5
    assert {"loop_reg/similarity/attn_q", "loop_reg/similarity/mlp_down"} <= set(logger.data)


def test_monitor_logs_block_pairs_and_writes_heatmaps_next_to_checkpoints(trained):
    _, logger, folder = trained
    assert len(logger.data["loop_similarity/mlp_up/block0_block2"]) == STEPS // 10
    heatmaps = folder / "checkpoints" / "loop_similarity"
    assert sorted(p.name for p in heatmaps.iterdir()) == sorted(
        f"{g}.png" for g in ("attn_q", "attn_k", "attn_v", "attn_o", "mlp_up", "mlp_gate", "mlp_down"))


def test_snap_at_fit_end_writes_the_looped_model_and_logs_the_eval_loss_change(trained):
    trainer, logger, folder = trained
    looped = LoopedLM.from_pretrained(folder / "checkpoints" / "snapped_2x3")
    assert looped.config.tied and looped.num_distinct_layers == 2
    before, after = series(logger, "loop_reg/snap/eval_loss_untied"), series(logger, "loop_reg/snap/eval_loss_looped")
    assert series(logger, "loop_reg/snap/eval_loss_change") == pytest.approx([after[0] - before[0]])
    assert abs(after[0] - before[0]) < 0.1  # a near-looped model barely changes when snapped


def test_paper_recipes_use_the_regularizer():
    for name, lambda_reg in [("reg_loop_4x6", 10.0), ("reg_loop_6x4", 10.0), ("reg_loop_8x3", 10.0),
                             ("reg_loop_12x2", 10.0), ("reg_loop_4x6_lambda1", 1.0)]:
        recipe = load_recipe(REPO / "recipes" / f"{name}.yaml")
        assert recipe.algorithms == {"loop_regularizer": {"lambda_reg": lambda_reg}}, name
        assert not recipe.model.tied


def test_cpu_recipe_checkpoint_snaps_through_the_cli(tmp_path, capsys):
    from loopreg.snap import cli_main as snap_main

    recipe = REPO / "recipes" / "cpu_phop_reg.yaml"
    trainer = run(recipe, ["max_duration=2ba", "eval_interval=2ba", "save_interval=2ba", "eval_data.eval_size=8",
                           f"save_folder={tmp_path}"])
    assert "loss/train/loop_reg" in trainer.state.total_loss_dict
    assert (tmp_path / "snapped_1x4" / "model.safetensors").is_file()
    assert snap_main([str(tmp_path / "latest-rank0.pt"), "--recipe", str(recipe), "--out", str(tmp_path / "cli")]) == 0
    assert "looped (1⊗4), distinct layers: 1" in capsys.readouterr().out


class TotalLossLM(ComposerLoopedLM):
    """A model whose loss is already a dict with a 'total' key (which Composer backpropagates as is)."""

    def loss(self, outputs, batch, *args, **kwargs):
        ce = super().loss(outputs, batch)
        return {"ce": ce, "total": ce}


def test_dict_loss_with_total_gets_the_term_and_resume_does_not_snap_twice(tmp_path):
    torch.manual_seed(0)
    data = [{"input_ids": row, "labels": row} for row in torch.randint(0, 32, (16, 8))]
    model = TotalLossLM(LoopedLMConfig(spec="1x2", tied=False, vocab_size=32, d_model=16, n_heads=2, d_ff=32))
    logger, snap = InMemoryLogger(), LoopSnap(at="2ba")
    trainer = Trainer(model=model, train_dataloader=DataLoader(data, batch_size=8), max_duration="2ba",
                      optimizers=torch.optim.SGD(model.parameters(), lr=0.0),
                      algorithms=[LoopRegularizer(lambda_reg=2.0)],
                      callbacks=[snap], loggers=[logger], device="cpu", progress_bar=False, save_folder=str(tmp_path))
    trainer.fit()
    reg, total, ce = (series(logger, f"loss/train/{key}") for key in ("loop_reg", "total", "ce"))
    assert total[0] == pytest.approx(ce[0] + reg[0], rel=1e-6) and reg[0] > 0
    assert snap.snapped and (tmp_path / "snapped_1x2").is_dir()
    resumed = LoopSnap(at="2ba")
    resumed.load_state_dict(snap.state_dict())
    assert resumed.snapped
    assert trainer.state.state_dict()["callbacks"]["LoopSnap"] == {"snapped": True}  # what a checkpoint stores


def test_lambda_schedules_at_the_end_of_training_and_bad_names(trained):
    trainer, _, _ = trained  # its state sits at the last batch of max_duration
    assert LoopRegularizer(schedule="constant").scheduler(trainer.state) == 1.0
    assert LoopRegularizer(schedule="linear_warmup", t_warmup="5ba").scheduler(trainer.state) == 1.0
    assert LoopRegularizer(schedule="cosine", t_warmup="5ba", alpha_f=0.1).scheduler(trainer.state) == \
        pytest.approx(0.1)
    with pytest.raises(ValueError) as raised:
        LoopRegularizer(schedule="step")
    assert str(raised.value) == ("algorithms.loop_regularizer.schedule: 'step' is not one of constant, "
                                 "linear_warmup, cosine")


def test_a_new_lambda_schedule_is_a_registry_entry(trained):
    from loopreg.algorithms.loop_regularizer import LAMBDA_SCHEDULES

    LAMBDA_SCHEDULES.register("half")(lambda t_warmup, alpha_f: lambda state, ssr=1.0: 0.5)
    try:
        assert LoopRegularizer(schedule="half").scheduler(trained[0].state) == 0.5
    finally:
        del LAMBDA_SCHEDULES["half"]


def test_the_layout_is_resolved_once_per_fit(monkeypatch):
    from loopreg.algorithms import loop_regularizer as module

    calls = []
    resolve = module.regularizer_layout
    monkeypatch.setattr(module, "regularizer_layout", lambda model, **kw: calls.append(model) or resolve(model, **kw))
    torch.manual_seed(0)
    data = [{"input_ids": row, "labels": row} for row in torch.randint(0, 32, (16, 8))]
    model = ComposerLoopedLM(LoopedLMConfig(spec="1x2", tied=False, vocab_size=32, d_model=16, n_heads=2, d_ff=32))
    trainer = Trainer(model=model, train_dataloader=DataLoader(data, batch_size=4), max_duration="4ba",
                      optimizers=torch.optim.SGD(model.parameters(), lr=0.1), algorithms=[LoopRegularizer()],
                      device="cpu", progress_bar=False)
    trainer.fit()
    assert len(calls) == 2  # the check at INIT, then once for the 4 steps of the fit
    trainer.fit(duration="2ba")
    assert len(calls) == 3  # a new fit resolves afresh


def test_loop_snap_rejects_a_tied_model_and_a_bad_time():
    model = ComposerLoopedLM(LoopedLMConfig(spec="1x2", vocab_size=32, d_model=16, n_heads=2, d_ff=32))
    data = [{"input_ids": row, "labels": row} for row in torch.randint(0, 32, (4, 8))]
    with pytest.raises(ValueError, match=r"^LoopSnap needs an untied LoopedLM; got LoopedLM \(tied: already looped\)$"):
        Trainer(model=model, train_dataloader=DataLoader(data, batch_size=4), max_duration="1ba",
                callbacks=[LoopSnap()], device="cpu", progress_bar=False)
    with pytest.raises(ValueError) as raised:
        LoopSnap(at="soon")
    assert str(raised.value) == ("callbacks.loop_snap.at: 'soon' is neither 'fit_end' nor a time such as '800ba' "
                                 "or '0.5dur'")
