"""Healing by distillation from the source: the pre-surgery model teaches the retrofit its own function.

The loss is ``KL(teacher ‖ student)`` on the logits at temperature τ, scaled by τ² (Hinton et al. 2015),
averaged over the supervised tokens, and optionally mixed with the plain cross entropy:
``total = (1 − ce_weight)·kd + ce_weight·ce``.

    >>> s, t = torch.zeros(1, 3, 5), torch.zeros(1, 3, 5)
    >>> float(distillation_loss(s, t, temperature=2.0)["kd"])
    0.0

:class:`SourceDistillation` runs the frozen teacher (the recipe's ``model.pretrained``, loaded before any
surgery changes the student) under ``no_grad`` on every training microbatch at ``AFTER_LOSS``. It composes
with ``LoopSurgery`` at INIT, with per-batch loop counts (the teacher never gets ``loops``) and with the
cosine regularizer (its terms are kept and added).
"""

from __future__ import annotations

import copy
from typing import Any

import torch
import torch.nn.functional as F
from composer.core import Algorithm, Event, State
from composer.loggers import Logger
from torch import nn

from loopreg.data import IGNORE_INDEX
from loopreg.errors import RecipeError
from loopreg.surgery.adapters import unwrap

__all__ = ["SourceDistillation", "distillation_loss", "same_vocabulary"]



def distillation_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor | None = None,
                      temperature: float = 1.0, ce_weight: float = 0.0, ignore_index: int = IGNORE_INDEX,
                      shift_labels: bool = False) -> dict[str, torch.Tensor]:
    """The terms ``kd``, ``ce`` and ``total`` for logits of shape (B, T, V).

    ``kd = τ² · mean over supervised tokens of Σ_v p_t (log p_t − log p_s)`` with ``p = softmax(logits / τ)``;
    ``ce`` is the student's cross entropy against ``labels`` (zero without labels). A token is supervised
    when its label is not ``ignore_index`` (every token without labels). ``labels[:, t]`` is the target of
    position t (loopreg's convention); ``shift_labels=True`` takes Hugging Face's (labels equal the inputs,
    position t predicts ``labels[:, t + 1]``, the last position predicts nothing).

    >>> # distillation_loss(out.logits, teacher(ids).logits, batch["labels"], 2.0, 0.1, shift_labels=True)
    """
    _check_knobs(temperature, ce_weight)
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(f"student logits {tuple(student_logits.shape)} and teacher logits "
                         f"{tuple(teacher_logits.shape)} differ in shape (different vocabularies?)")
    if shift_labels:
        student_logits, teacher_logits = student_logits[:, :-1], teacher_logits[:, :-1]
        labels = labels[:, 1:] if labels is not None else None
    student, teacher = student_logits.flatten(0, -2).float(), teacher_logits.flatten(0, -2).float()
    mask = labels.flatten() != ignore_index if labels is not None else torch.ones_like(student[:, 0], dtype=torch.bool)
    count = mask.sum().clamp(min=1)
    log_student = F.log_softmax(student / temperature, dim=-1)
    log_teacher = F.log_softmax(teacher / temperature, dim=-1)
    per_token = F.kl_div(log_student, log_teacher, log_target=True, reduction="none").sum(-1)
    kd = (per_token * mask).sum() / count * temperature ** 2
    if labels is None:
        ce = kd.new_zeros(())
    else:
        ce = F.cross_entropy(student, labels.flatten(), ignore_index=ignore_index, reduction="sum") / count
    return {"kd": kd, "ce": ce, "total": (1.0 - ce_weight) * kd + ce_weight * ce}


def _knob_problems(temperature: float, ce_weight: float) -> dict[str, str]:
    """Knob name → what is wrong with its value (empty when both are fine)."""
    problems = {}
    if temperature <= 0:
        problems["temperature"] = f"must be > 0, got {temperature}"
    if not 0.0 <= ce_weight <= 1.0:
        problems["ce_weight"] = f"must be in [0, 1], got {ce_weight}"
    return problems


def _check_knobs(temperature: float, ce_weight: float) -> None:
    problems = _knob_problems(temperature, ce_weight)
    if problems:
        knob, problem = next(iter(problems.items()))
        raise ValueError(f"distillation {knob} {problem}")


def _vocabulary(tokenizer: Any) -> dict[str, int]:
    """token → id of a Hugging Face tokenizer or a ``tokenizers.Tokenizer`` (added tokens included)."""
    if hasattr(tokenizer, "backend_tokenizer"):
        return tokenizer.get_vocab()
    return tokenizer.get_vocab(with_added_tokens=True)


def same_vocabulary(first: Any, second: Any) -> bool:
    """Whether two tokenizers (Hugging Face or ``tokenizers``) map every token to the same id.

    >>> from loopreg.data.text import byte_level_tokenizer
    >>> same_vocabulary(byte_level_tokenizer(), byte_level_tokenizer())
    True
    """
    return _vocabulary(first) == _vocabulary(second)


def _output_rows(model: nn.Module) -> int:
    """The number of logits ``model`` produces per token."""
    return unwrap(model).get_output_embeddings().weight.shape[0]


def _logits(output: Any) -> torch.Tensor:
    """Logits from a ``LoopedLM`` (a tensor) or a Hugging Face model (an output with ``logits``)."""
    return output if torch.is_tensor(output) else output["logits"]


class SourceDistillation(Algorithm):
    """Replaces the training loss by :func:`distillation_loss` against a frozen teacher, logged as
    ``loss/train/kd``, ``loss/train/ce`` and ``loss/train/total``.

    Args:
        teacher: ``"source"`` (the recipe's ``model.pretrained``, copied before surgery: loaded once) or a
            model path :func:`loopreg.load` reads.
        temperature: τ.
        ce_weight: weight of the plain cross entropy in the convex mix with the KD term.

    The teacher is frozen, in eval mode, moved to the student's device (bf16 on GPU), and must share the
    student's tokenizer and number of logits (one-line ``ValueError`` naming both otherwise).

    >>> SourceDistillation("source", temperature=2.0, ce_weight=0.1)
    SourceDistillation(teacher='source', temperature=2.0, ce_weight=0.1)
    """

    def __init__(self, teacher: str = "source", temperature: float = 1.0, ce_weight: float = 0.0) -> None:
        problems = _knob_problems(temperature, ce_weight)
        if problems:
            knob, problem = next(iter(problems.items()))
            raise RecipeError(problem, key=f"algorithms.source_distillation.{knob}")
        self.teacher_source, self.temperature, self.ce_weight = str(teacher), float(temperature), float(ce_weight)
        self.teacher: nn.Module | None = None
        self._student_tokenizer: Any = None

    def __repr__(self) -> str:
        return (f"SourceDistillation(teacher='{self.teacher_source}', temperature={self.temperature}, "
                f"ce_weight={self.ce_weight})")

    def use_source(self, source: str | None, tokenizer: Any, model: nn.Module) -> None:
        """Called by ``loopreg train`` before the Trainer exists: ``source`` is the recipe's pretrained path,
        ``model`` the student before surgery, ``tokenizer`` its tokenizer. Loads and checks the teacher now,
        so a mismatch is a recipe error before training starts."""
        self._student_tokenizer = tokenizer
        if self.teacher_source == "source":
            if source is None:
                raise ValueError("teacher 'source' needs model.pretrained (the model the retrofit starts from)")
            self.teacher_source = str(source)
            self.teacher = copy.deepcopy(unwrap(model))  # the pre-surgery source: no second load
        self._load_teacher(model)

    def _load_teacher(self, student: nn.Module) -> None:
        from loopreg.loading import load
        from loopreg.surgery.sources import load_source_tokenizer

        if self.teacher_source == "source":
            raise ValueError("SourceDistillation(teacher='source') outside loopreg train: pass the teacher's path")
        if self.teacher is None:
            self.teacher = load(self.teacher_source)
            if self._student_tokenizer is not None:
                teacher_tokenizer = load_source_tokenizer(self.teacher_source)
                if teacher_tokenizer is None:
                    raise ValueError(f"teacher '{self.teacher_source}' has no tokenizer to compare with the student's")
                if not same_vocabulary(teacher_tokenizer, self._student_tokenizer):
                    raise ValueError(f"teacher '{self.teacher_source}' and the student use different tokenizers "
                                     f"({len(_vocabulary(teacher_tokenizer))} vs "
                                     f"{len(_vocabulary(self._student_tokenizer))} tokens, or other ids)")
        rows, student_rows = _output_rows(self.teacher), _output_rows(student)
        if rows != student_rows:
            raise ValueError(f"teacher '{self.teacher_source}' has {rows} logits per token, the student "
                             f"{student_rows}: distillation needs the same vocabulary")
        self.teacher.requires_grad_(False).eval()

    def match(self, event: Event, state: State) -> bool:
        return event in (Event.INIT, Event.AFTER_LOSS)

    def apply(self, event: Event, state: State, logger: Logger) -> None:
        if event == Event.INIT:
            self._place_teacher(state)
        else:
            self._replace_loss(state)

    def _place_teacher(self, state: State) -> None:
        if self.teacher is None:
            self._load_teacher(state.model)
        dtype = torch.bfloat16 if state.device.name == "gpu" else None  # a frozen teacher needs no fp32
        self.teacher = state.device.module_to_device(self.teacher).to(dtype=dtype)

    def _replace_loss(self, state: State) -> None:
        from loopreg.model import LoopedLM

        batch = state.batch
        # Only the inputs: a per-batch loop count (``loops``) is the student's, the teacher runs unlooped.
        inputs = {"input_ids": batch["input_ids"]}
        if "attention_mask" in batch:
            inputs["attention_mask"] = batch["attention_mask"]
        with torch.no_grad():
            teacher_logits = _logits(self.teacher(**inputs))
        hf_student = not isinstance(unwrap(state.model), LoopedLM)  # Hugging Face models shift labels inside
        terms = distillation_loss(_logits(state.outputs), teacher_logits, batch.get("labels"), self.temperature,
                                  self.ce_weight, shift_labels=hf_student)
        # Other algorithms' terms (the cosine regularizer's loop_reg) stay and count in the total.
        extra = ({k: v for k, v in state.loss.items() if k not in ("ce", "total")}
                 if isinstance(state.loss, dict) else {})
        state.loss = {**extra, **terms, "total": terms["total"] + sum(extra.values())}
