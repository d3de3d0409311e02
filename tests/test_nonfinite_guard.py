"""NonFiniteGuard in a real Composer Trainer: a NaN injected into one batch's activations (or into the
regularizer's term) stops training before the optimizer step, or skips exactly that batch."""

from __future__ import annotations

import logging

import pytest
import torch
from composer import Trainer
from composer.core import Algorithm, Callback, Event
from composer.loggers import InMemoryLogger
from torch.utils.data import DataLoader

from loopreg.algorithms import LoopRegularizer
from loopreg.callbacks.nonfinite_guard import NonFiniteGuard, NonFiniteLossError
from loopreg.cli import main as loopreg_main
from loopreg.composer_model import ComposerLoopedLM
from loopreg.model import LoopedLMConfig
from loopreg.registry import CALLBACKS

from .conftest import REPO, tiny_overrides


class PoisonActivations(Callback):
    """Multiplies the embedding output by NaN during the given (1-based) batches: loss and gradients go NaN."""

    def __init__(self, batches: set[int]) -> None:
        self.batches, self.handle = batches, None

    def batch_start(self, state, logger) -> None:
        if int(state.timestamp.batch) + 1 in self.batches:
            embed = state.model.model.embed
            self.handle = embed.register_forward_hook(lambda module, args, out: out * float("nan"))

    def batch_end(self, state, logger) -> None:
        if self.handle is not None:
            self.handle.remove()
            self.handle = None


class PoisonRegularizer(Algorithm):
    """After the LoopRegularizer added its term, turns that term (only) into NaN during one batch."""

    def __init__(self, batch: int) -> None:
        self.batch = batch

    def match(self, event, state) -> bool:
        return event == Event.AFTER_LOSS and int(state.timestamp.batch) + 1 == self.batch

    def apply(self, event, state, logger) -> None:
        state.loss["loop_reg"] = state.loss["loop_reg"] * float("nan")


class Snapshots(Callback):
    """Weights and Adam step counts before and after every batch (1-based batch number)."""

    def __init__(self) -> None:
        self.before, self.after, self.steps = {}, {}, {}

    def batch_start(self, state, logger) -> None:
        self.before[int(state.timestamp.batch) + 1] = _weights(state.model)

    def batch_end(self, state, logger) -> None:
        batch = int(state.timestamp.batch)
        self.after[batch] = _weights(state.model)
        self.steps[batch] = sorted({float(s["step"]) for s in state.optimizers[0].state.values()})


def _weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: tensor.detach().clone() for name, tensor in model.state_dict().items()}


def _equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[name], b[name]) for name in a)


def _fit(guard: NonFiniteGuard, poison: Callback | None = None, algorithms=(), batches: int = 4):
    torch.manual_seed(0)
    data = [{"input_ids": row, "labels": row} for row in torch.randint(0, 32, (8 * batches, 12))]
    model = ComposerLoopedLM(LoopedLMConfig(spec="1x2", tied=False, vocab_size=32, d_model=16, n_heads=2, d_ff=32))
    snapshots, logger = Snapshots(), InMemoryLogger()
    # The poisoner goes before the guard and the snapshots: callbacks run in list order at each event.
    trainer = Trainer(model=model, train_dataloader=DataLoader(data, batch_size=8), max_duration=f"{batches}ba",
                      optimizers=torch.optim.AdamW(model.parameters(), lr=1e-2), algorithms=list(algorithms),
                      callbacks=[c for c in (poison, guard, snapshots) if c is not None], loggers=[logger],
                      device="cpu", progress_bar=False, log_to_console=False)
    return trainer, snapshots, logger


def test_skip_mode_leaves_the_poisoned_batch_out(caplog):
    guard = NonFiniteGuard(action="skip")
    trainer, snapshots, logger = _fit(guard, PoisonActivations({2}))
    with caplog.at_level(logging.WARNING, logger="loopreg.callbacks.nonfinite_guard"):
        trainer.fit()
    assert int(trainer.state.timestamp.batch) == 4
    assert _equal(snapshots.before[2], snapshots.after[2])  # weights untouched by the NaN batch
    assert snapshots.steps[2] == snapshots.steps[1] == [1.0]  # and Adam's state too (no step counted)
    for batch in (1, 3, 4):  # the other batches train
        assert not _equal(snapshots.before[batch], snapshots.after[batch])
    assert all(torch.isfinite(t).all() for t in snapshots.after[4].values() if t.is_floating_point())
    assert guard.skipped == 1 and [v for _, v in logger.data["nonfinite_guard/skipped_batches"]] == [1]
    assert "non-finite loss term loss at batch 2; batch skipped" in caplog.text


def test_stop_mode_raises_before_the_step():
    trainer, snapshots, _ = _fit(NonFiniteGuard(), PoisonActivations({3}))
    with pytest.raises(NonFiniteLossError, match=r"^non-finite loss term loss at batch 3; training stopped"):
        trainer.fit()
    assert _equal(_weights(trainer.state.model), snapshots.after[2])


@pytest.mark.parametrize("action", ["stop", "skip"])
def test_names_the_regularizer_term(action):
    guard = NonFiniteGuard(action=action)
    # Composer runs algorithms in reverse list order at AFTER_* events: the poisoner listed first runs last.
    trainer, snapshots, _ = _fit(guard, algorithms=[PoisonRegularizer(batch=2), LoopRegularizer(lambda_reg=1.0)])
    if action == "stop":
        with pytest.raises(NonFiniteLossError, match=r"^non-finite loss term loop_reg at batch 2;"):
            trainer.fit()  # 'ce' was finite, so only the regularizer's term is named
        return
    trainer.fit()
    assert guard.skipped == 1 and _equal(snapshots.before[2], snapshots.after[2])


def test_skip_mode_gives_up_after_too_many_bad_batches_in_a_row():
    trainer, _, _ = _fit(NonFiniteGuard(action="skip", max_consecutive_skips=2), PoisonActivations({2, 3, 4, 5}),
                         batches=6)
    with pytest.raises(NonFiniteLossError, match="at batch 4: 3 batches in a row were non-finite"):
        trainer.fit()


def test_registered_and_validated():
    assert CALLBACKS["nonfinite_guard"] is NonFiniteGuard
    with pytest.raises(ValueError) as raised:
        NonFiniteGuard(action="explode")
    assert str(raised.value) == "callbacks.nonfinite_guard.action: 'explode' must be one of stop, skip"


def test_cli_stops_a_diverging_recipe_with_one_line(text_corpus, tmp_path, capsys):
    """An absurd learning rate overflows the weights; the guard from the recipe stops the run (exit 1)."""
    args = ["train", str(REPO / "recipes" / "cpu_tiny_text.yaml"), *tiny_overrides(text_corpus),
            "max_duration=4ba", "optimizer.lr=1e38", "gradient_clipping=null", "callbacks.nonfinite_guard.action=stop"]
    with pytest.raises(SystemExit) as exit_info:
        loopreg_main(args)
    err = capsys.readouterr().err
    assert exit_info.value.code == 1, err
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "non-finite loss term loss at batch" in lines[0], err
