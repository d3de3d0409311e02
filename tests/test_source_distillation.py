"""Healing by distillation from the source: the loss against a hand computation, only the student learning,
the teacher running unlooped while the student gets a per-batch loop count, and the one-line errors."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from composer import Trainer
from composer.core import DataSpec
from composer.loggers import InMemoryLogger

from loopreg.algorithms import LoopSurgery, SourceDistillation, distillation_loss
from loopreg.cli import main as loopreg_main
from loopreg.composer_model import PretrainedLM
from loopreg.registry import ALGORITHMS
from loopreg.loading import load
from loopreg.surgery.sources import load_source_tokenizer

from .conftest import REPO, tiny_llama
from .test_retrofit_recipes import tiny

pytestmark = pytest.mark.usefixtures("single_thread")


def hand_reference(student, teacher, labels, temperature, ce_weight, shift):
    """KL(teacher ‖ student) · τ² and the CE, token by token with explicit exp / log / sums, in float64."""
    student, teacher = student.double(), teacher.double()
    batch, length, vocab = student.shape
    kd = ce = 0.0
    count = 0
    for b in range(batch):
        for t in range(length - 1 if shift else length):
            target = int(labels[b, t + 1] if shift else labels[b, t])
            if target == -100:
                continue
            count += 1
            s = [math.exp(float(x) / temperature) for x in student[b, t]]
            q = [math.exp(float(x) / temperature) for x in teacher[b, t]]
            ps, pt = [x / sum(s) for x in s], [x / sum(q) for x in q]
            kd += sum(pt[v] * (math.log(pt[v]) - math.log(ps[v])) for v in range(vocab)) * temperature ** 2
            plain = [math.exp(float(x)) for x in student[b, t]]
            ce += -math.log(plain[target] / sum(plain))
    return kd / count, ce / count, (1 - ce_weight) * kd / count + ce_weight * ce / count


@pytest.mark.parametrize("shift", [False, True])
def test_distillation_loss_equals_a_hand_computation(shift):
    generator = torch.Generator().manual_seed(0)
    student = torch.randn(2, 5, 7, generator=generator) * 3
    teacher = torch.randn(2, 5, 7, generator=generator) * 3
    labels = torch.randint(0, 7, (2, 5), generator=generator)
    labels[0, 2] = labels[1, 4] = labels[1, 1] = -100
    terms = distillation_loss(student, teacher, labels, temperature=2.0, ce_weight=0.3, shift_labels=shift)
    kd, ce, total = hand_reference(student, teacher, labels, 2.0, 0.3, shift)
    for key, expected in (("kd", kd), ("ce", ce), ("total", total)):
        assert terms[key].item() == pytest.approx(expected, rel=1e-6, abs=1e-7), key
    assert distillation_loss(teacher, teacher, labels)["kd"].item() == 0.0  # identical logits: no KL at all
    assert distillation_loss(student, teacher, temperature=1.0)["ce"].item() == 0.0  # no labels: KD only


@pytest.mark.parametrize("kwargs, line", [
    ({"temperature": 0.0}, "algorithms.source_distillation.temperature: must be > 0, got 0.0"),
    ({"ce_weight": 1.5}, "algorithms.source_distillation.ce_weight: must be in [0, 1], got 1.5")])
def test_bad_knobs_are_one_line_errors_under_their_key(kwargs, line):
    assert ALGORITHMS["source_distillation"] is SourceDistillation
    with pytest.raises(ValueError) as raised:
        SourceDistillation("source", **kwargs)
    assert str(raised.value) == line
    with pytest.raises(ValueError, match=f"^distillation {next(iter(kwargs))} must be "):  # the plain function's
        distillation_loss(torch.zeros(1, 2, 3), torch.zeros(1, 2, 3), **kwargs)


def batches(count: int, loops: int | None = None) -> list[dict]:
    """Pre-collated batches in Hugging Face's label convention, optionally with a per-batch loop count."""
    generator = torch.Generator().manual_seed(1)
    out = []
    for _ in range(count):
        ids = torch.randint(0, 257, (2, 16), generator=generator)
        out.append({"input_ids": ids, "labels": ids.clone(), **({"loops": loops} if loops is not None else {})})
    return out


def fit(source_folder: Path, data: list[dict], steps: int, algorithms: list, lr: float = 1e-2) -> tuple[Trainer, dict]:
    student = PretrainedLM(load(source_folder), load_source_tokenizer(source_folder))
    logger = InMemoryLogger()
    # One microbatch per batch; a plain int (loops) in the batch needs Composer told the batch size.
    loader = DataSpec(torch.utils.data.DataLoader(data, batch_size=None), split_batch=lambda batch, size: [batch],
                      get_num_samples_in_batch=lambda batch: batch["input_ids"].shape[0])
    trainer = Trainer(model=student, train_dataloader=loader, optimizers=torch.optim.SGD(student.parameters(), lr=lr),
                      max_duration=f"{steps}ba", algorithms=algorithms, loggers=[logger], device="cpu",
                      device_train_microbatch_size=2, progress_bar=False, log_to_console=False)
    trainer.fit()
    return trainer, {key: [value for _, value in series] for key, series in logger.data.items()}


def test_only_the_student_gets_gradients(source):
    distill = SourceDistillation(str(source), temperature=2.0, ce_weight=0.5)
    teacher_before = {name: p.clone() for name, p in load(source).named_parameters()}
    trainer, logged = fit(source, batches(2), 2, [distill])
    teacher = distill.teacher
    assert all(not p.requires_grad and p.grad is None for p in teacher.parameters())
    assert not teacher.training
    assert all(torch.equal(p, teacher_before[name]) for name, p in teacher.named_parameters())
    student = dict(trainer.state.model.model.named_parameters())
    assert any(not torch.equal(student[name], teacher_before[name]) for name in teacher_before)
    assert {"loss/train/kd", "loss/train/ce", "loss/train/total"} <= set(logged)
    # At the first step the student is the source: no KL, and the logged CE is the model's own loss.
    assert logged["loss/train/kd"][0] == 0.0
    assert logged["loss/train/total"][0] == pytest.approx(0.5 * logged["loss/train/ce"][0], rel=1e-6)


def test_surgery_at_init_with_a_per_batch_loop_count_keeps_the_teacher_unlooped(source):
    """Keep-all surgery at INIT (``2x1+2x2+2x1``); a batch with ``loops=1`` runs the student as the source, so
    the KD term is exactly 0, which it is not at the spec's own 2 loops: the student got ``loops``, the
    teacher did not (and is the pre-surgery model, loaded before the surgery)."""
    surgery = LoopSurgery("2x1+2x2+2x1", layers="0-1,2-3,4-5")
    _, unlooped = fit(source, batches(1, loops=1), 1, [surgery, SourceDistillation(str(source))])
    _, looped = fit(source, batches(1), 1, [LoopSurgery("2x1+2x2+2x1", layers="0-1,2-3,4-5"),
                                              SourceDistillation(str(source))])
    assert unlooped["loss/train/kd"][0] == 0.0
    assert looped["loss/train/kd"][0] > 1e-6


def test_the_cosine_regularizer_terms_are_kept_and_counted(source):
    from loopreg.algorithms import LoopRegularizer

    surgery = LoopSurgery("2x1+2x2+2x1", layers="0-1,2-3,4-5", tied=False)
    _, logged = fit(source, batches(3), 3,
                    [surgery, LoopRegularizer(lambda_reg=100.0), SourceDistillation(str(source))], lr=0.5)
    assert logged["loss/train/loop_reg"][-1] > 0
    for step in range(3):
        parts = logged["loss/train/kd"][step] + logged["loss/train/loop_reg"][step]
        assert logged["loss/train/total"][step] == pytest.approx(parts, rel=1e-5)


@pytest.mark.parametrize("teacher_kwargs, fragment", [
    ({"extra_tokens": ("<pad>",)}, "use different tokenizers (258 vs 257 tokens, or other ids)"),
    ({"vocab_size": 300}, "has 300 logits per token, the student 260"),
])
def test_a_teacher_with_another_vocabulary_is_one_line_exit_2(teacher_kwargs, fragment, source, tmp_path, capsys):
    teacher = tiny_llama(tmp_path / "teacher", **teacher_kwargs)
    recipe = REPO / "recipes" / "retrofit" / "smollm2_keepall_heal_cpu.yaml"
    argv = ["train", str(recipe), *tiny(source, recipe, tmp_path / "model"),
            f"algorithms.source_distillation.teacher={teacher}"]
    with pytest.raises(SystemExit) as exit_info:
        loopreg_main(argv)
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: algorithms.source_distillation: ") and fragment in lines[0]
    assert str(teacher) in lines[0] and not (tmp_path / "model").exists()
