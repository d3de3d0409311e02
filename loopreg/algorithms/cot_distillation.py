"""CoT-to-latent distillation: teach a looped student to think in loops instead of chain-of-thought tokens.

The student reads ``question||<ph>…<ph> #### `` and answers directly; each placeholder stands for one
CoT step (paper Thm 5.4: m loops over m placeholders can simulate m CoT steps). The loss has separate,
separately scheduled and logged terms (``loss/train/<term>``):

* ``answer``  CE on the answer tokens of the (partly) latent rendering;
* ``cot``     CE on the CoT text the curriculum still keeps;
* ``step``    latent-step CE: placeholder j decodes gold step j through the LM head, read after
              thinking loop j (``step_read='diagonal'``, the Thm 5.4 construction) or after the last
              loop (``'final'``);
* ``hidden``  CODI-style matching of hidden states at the answer trigger (teacher application →
              student application, proportional by depth), smooth-L1 or MSE divided by the teacher's std;
* ``kl``      KL(teacher ‖ student) of the answer logits at temperature τ (times τ²).

The teacher is a frozen CoT-trained :class:`~loopreg.model.LoopedLM` folder, or ``"self"`` (the student
itself on the CoT rendering, under ``no_grad``); it never receives gradients. A curriculum in Composer
``Time`` replaces CoT steps by placeholders from the left (iCoT / Coconut), with per-example
smoothing, stage mixing and an optional optimizer reset; its stage is saved in checkpoints.

Without the Trainer::

    >>> from loopreg.data.paired import PairedData
    >>> from loopreg.data.tasks import pad_collate
    >>> from loopreg.model import LoopedLM, LoopedLMConfig
    >>> data = PairedData.from_task("addition", n_operands=4, digits=1, modulus=10)
    >>> student = LoopedLM(LoopedLMConfig(spec="1x4", vocab_size=data.vocab_size, d_model=32, n_heads=4,
    ...                                   placeholder_id=data.placeholder_id, latent_feedback="soft_token"))
    >>> batch = pad_collate([data.render_pair(p, latent_steps=3) for p in data.test_set(4, seed=0)])
    >>> sorted(cot_distillation_loss(student, batch, teacher=student))
    ['answer', 'cot', 'hidden', 'kl', 'step']
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import torch
import torch.nn.functional as F
from composer.core import Algorithm, Event, State, Time, TimeUnit
from composer.loggers import Logger
from torch import nn

from loopreg.composer_model import ComposerLoopedLM
from loopreg.data import IGNORE_INDEX
from loopreg.errors import RecipeError
from loopreg.model import LoopedLM

__all__ = ["TERMS", "CoTDistillation", "LatentCurriculum", "WeightSchedule", "cot_distillation_loss",
           "distillation_terms", "hidden_layer_map"]

TERMS = ("answer", "cot", "step", "hidden", "kl")


# ------------------------------------------------------------------------------------------ schedules
class WeightSchedule:
    """A term weight over training time: a constant, or piecewise-linear between ``{time: weight}`` points.

    Times are Composer time strings of one unit (``ba``, ``ep``, ``sp``, ``tok`` or ``dur``); before the
    first point the first weight holds, after the last the last.

    >>> WeightSchedule({"0ba": 1.0, "100ba": 0.0}).at_value(50)
    0.5
    """

    def __init__(self, spec: float | Mapping[str, float], name: str = "weight") -> None:
        if isinstance(spec, (int, float)):
            self.unit, self.points = None, [(0.0, float(spec))]
            return
        if not isinstance(spec, Mapping) or not spec:
            raise ValueError(f"{name}: expected a number or a mapping {{time: weight}}, got {spec!r}")
        try:
            times = [Time.from_timestring(str(key)) for key in spec]
        except ValueError as err:
            raise ValueError(f"{name}: bad time {err}; use e.g. 500ba or 0.5dur") from None
        units = {time.unit for time in times}
        if len(units) != 1:
            raise ValueError(f"{name}: all times must share one unit, got {sorted(u.value for u in units)}")
        self.unit = units.pop()
        self.points = sorted((float(time.value), float(weight)) for time, weight in zip(times, spec.values()))

    def at_value(self, elapsed: float) -> float:
        """The weight after ``elapsed`` units of time."""
        (x0, y0) = self.points[0]
        if elapsed <= x0:
            return y0
        for x1, y1 in self.points[1:]:
            if elapsed <= x1:
                return y0 + (y1 - y0) * (elapsed - x0) / (x1 - x0)
            x0, y0 = x1, y1
        return y0

    def at(self, state: State) -> float:
        """The weight at the trainer's current time."""
        return self.at_value(_elapsed(state, self.unit) if self.unit is not None else 0.0)


def _elapsed(state: State, unit: TimeUnit) -> float:
    if unit == TimeUnit.DURATION:
        elapsed = state.get_elapsed_duration()
        return float(elapsed.value) if elapsed is not None else 0.0
    return float(state.timestamp.get(unit).value)


@dataclass
class LatentCurriculum:
    """How many leading CoT steps are latent at a given time (iCoT-style removal from the left).

    Stage ``start + ⌊elapsed / every⌋`` (capped at ``max_stage``); ``every=None`` keeps ``start`` for
    the whole run (``start=0``: CoT training; a large ``start``: fully latent from the first step).
    Per example, ``smoothing`` adds 0..smoothing extra latent steps at random and with ``mix_prob``
    the example uses a random earlier stage instead (so earlier stages are not forgotten).

    >>> LatentCurriculum(every="100ba").stage_at(250)
    2
    """

    every: str | None = None
    start: int = 0
    max_stage: int | None = None
    smoothing: int = 0
    mix_prob: float = 0.0
    reset_optimizer: bool = False

    def __post_init__(self) -> None:
        self.interval = Time.from_timestring(self.every) if self.every is not None else None
        if self.interval is not None and self.interval.value <= 0:
            raise ValueError(f"curriculum.every must be a positive time, got {self.every!r}")
        if self.start < 0 or self.smoothing < 0 or not 0.0 <= self.mix_prob <= 1.0:
            raise ValueError("curriculum: start and smoothing must be >= 0 and mix_prob in [0, 1]")

    def stage_at(self, elapsed: float) -> int:
        """The stage after ``elapsed`` units of ``every``'s time unit."""
        stage = self.start if self.interval is None else self.start + int(elapsed // self.interval.value)
        return stage if self.max_stage is None else min(stage, self.max_stage)

    def stage(self, state: State) -> int:
        return self.stage_at(_elapsed(state, self.interval.unit) if self.interval is not None else 0.0)

    def latent_steps(self, stage: int, num_steps: int, rng: random.Random) -> int:
        """Latent steps for one example with ``num_steps`` CoT steps at ``stage``."""
        if stage > 0 and rng.random() < self.mix_prob:
            stage = rng.randrange(stage)
        return min(num_steps, stage + (rng.randint(0, self.smoothing) if self.smoothing else 0))


# -------------------------------------------------------------------------------------------- terms
def hidden_layer_map(teacher_depth: int, student_depth: int) -> list[tuple[int, int]]:
    """(teacher application, student application) pairs, proportional by depth, ending at the last of each.

    >>> hidden_layer_map(2, 8)
    [(0, 3), (1, 7)]
    """
    return [(t, round((t + 1) * student_depth / teacher_depth) - 1) for t in range(teacher_depth)]


def distillation_terms(student: LoopedLM, logits: torch.Tensor, layer_states: list[torch.Tensor],
                       batch: Mapping[str, torch.Tensor], loops: int | None = None,
                       teacher_logits: torch.Tensor | None = None, teacher_states: list[torch.Tensor] | None = None,
                       step_read: str = "diagonal", hidden_loss: str = "smooth_l1", temperature: float = 1.0,
                       projection: nn.Module | None = None, terms: tuple[str, ...] = TERMS) -> dict[str, torch.Tensor]:
    """Unweighted loss terms from one student forward (``logits`` and its ``layer_states``) and,
    for ``hidden``/``kl``, the teacher's forward on ``batch['teacher_input_ids']``.

    Example: ``distillation_terms(student, logits, states, batch, teacher_logits=t_logits, teacher_states=t_states)``
    """
    out: dict[str, torch.Tensor] = {}
    flat = logits.flatten(0, 1).float()
    if "answer" in terms:
        out["answer"] = F.cross_entropy(flat, batch["labels"].flatten(), ignore_index=IGNORE_INDEX)
    if "cot" in terms:
        out["cot"] = _masked_ce(flat, batch["cot_labels"].flatten(), logits)
    if "step" in terms:
        out["step"] = _step_ce(student, logits, layer_states, batch, loops, step_read)
    if "hidden" in terms and teacher_states is not None:
        out["hidden"] = _hidden_match(layer_states, teacher_states, batch, hidden_loss, projection)
    if "kl" in terms and teacher_logits is not None:
        student_answer = logits[batch["answer_mask"]].float() / temperature
        teacher_answer = teacher_logits[batch["teacher_answer_mask"]].float() / temperature
        out["kl"] = F.kl_div(student_answer.log_softmax(-1), teacher_answer.log_softmax(-1), log_target=True,
                             reduction="batchmean") * temperature**2
    return out


def _masked_ce(flat_logits: torch.Tensor, flat_labels: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    if not bool((flat_labels != IGNORE_INDEX).any()):
        return like.sum() * 0.0  # no such tokens in this batch: a zero that keeps the graph connected
    return F.cross_entropy(flat_logits, flat_labels, ignore_index=IGNORE_INDEX)


def _step_ce(student: LoopedLM, logits: torch.Tensor, layer_states: list[torch.Tensor],
             batch: Mapping[str, torch.Tensor], loops: int | None, step_read: str) -> torch.Tensor:
    labels = batch["step_labels"]
    if step_read == "final":
        return _masked_ce(logits.flatten(0, 1).float(), labels.flatten(), logits)
    steps = student.placeholder_steps(batch["input_ids"])
    loop_ends = (student.spec if loops is None else student.spec.with_loops(loops)).loop_ends
    total, count = logits.sum() * 0.0, 0
    for step in steps[labels != IGNORE_INDEX].unique().tolist():
        if step >= len(loop_ends):
            raise ValueError(f"placeholder step {step} needs at least {step + 1} thinking loops; the student "
                             f"runs {len(loop_ends)} ('{student.spec}')")
        where = (steps == step) & (labels != IGNORE_INDEX)
        step_logits = student.lm_head(student.norm(layer_states[loop_ends[step]][where])).float()
        total = total + F.cross_entropy(step_logits, labels[where], reduction="sum")
        count += int(where.sum())
    return total / max(count, 1)


def _hidden_match(student_states: list[torch.Tensor], teacher_states: list[torch.Tensor],
                  batch: Mapping[str, torch.Tensor], hidden_loss: str, projection: nn.Module | None) -> torch.Tensor:
    rows = torch.arange(batch["trigger"].shape[0], device=batch["trigger"].device)
    losses = []
    for t, s in hidden_layer_map(len(teacher_states), len(student_states)):
        target = teacher_states[t][rows, batch["teacher_trigger"]].float()
        predicted = student_states[s][rows, batch["trigger"]].float()
        if projection is not None:
            predicted = projection(predicted)
        if predicted.shape != target.shape:
            raise ValueError(f"hidden-state matching: student width {predicted.shape[-1]} != teacher width "
                             f"{target.shape[-1]}; a projection is needed (CoTDistillation adds one)")
        loss = F.smooth_l1_loss(predicted, target) if hidden_loss == "smooth_l1" else F.mse_loss(predicted, target)
        losses.append(loss / target.std().clamp(min=1e-6))
    return torch.stack(losses).mean()


def _teacher_forward(teacher: LoopedLM, batch: Mapping[str, torch.Tensor]) -> tuple[torch.Tensor, list[torch.Tensor]]:
    states: list[torch.Tensor] = []
    with torch.no_grad():
        logits = teacher(batch["teacher_input_ids"], layer_states=states)
    return logits, states


def cot_distillation_loss(student: LoopedLM, batch: Mapping[str, torch.Tensor], teacher: LoopedLM | None = None,
                          weights: Mapping[str, float] | None = None, loops: int | None = None,
                          step_read: str = "diagonal", hidden_loss: str = "smooth_l1", temperature: float = 1.0,
                          projection: nn.Module | None = None) -> dict[str, torch.Tensor]:
    """Weighted loss terms for one batch of :meth:`PairedData.render_pair` examples (the function behind
    :class:`CoTDistillation`). ``weights`` defaults to 1 for every term; ``teacher=None`` skips
    ``hidden`` and ``kl``; the teacher runs under ``no_grad``.

    Example: ``sum(cot_distillation_loss(student, batch, teacher).values()).backward()``
    """
    weights = {term: 1.0 for term in TERMS} if weights is None else dict(weights)
    states: list[torch.Tensor] = []
    logits = student(batch["input_ids"], loops=loops, layer_states=states)
    return _weighted_terms(student, logits, states, batch, teacher, weights, loops, step_read, hidden_loss,
                           temperature, projection)


def _weighted_terms(student: LoopedLM, logits: torch.Tensor, states: list[torch.Tensor],
                    batch: Mapping[str, torch.Tensor], teacher: LoopedLM | None, weights: Mapping[str, float],
                    loops: int | None, step_read: str, hidden_loss: str, temperature: float,
                    projection: nn.Module | None) -> dict[str, torch.Tensor]:
    """The terms with a non-zero weight, weighted; the teacher runs only when ``hidden``/``kl`` need it."""
    wanted = tuple(term for term in TERMS if weights.get(term, 0.0) != 0.0)
    teacher_logits, teacher_states = (_teacher_forward(teacher, batch) if teacher is not None
                                      and {"hidden", "kl"} & set(wanted) else (None, None))
    terms = distillation_terms(student, logits, states, batch, loops, teacher_logits, teacher_states, step_read,
                               hidden_loss, temperature, projection, wanted)
    return {term: weights[term] * value for term, value in terms.items()}


# ---------------------------------------------------------------------------------------- algorithm
class CoTDistillation(Algorithm):
    """Composer algorithm: renders each batch at the curriculum's stage, runs the student with per-loop
    states (and the configured loop count, truncated backprop, checkpointing), and replaces the loss
    with the weighted terms of :func:`cot_distillation_loss`.

    The train data must be ``kind: paired`` (raw problems; see :mod:`loopreg.data.paired`). Bad settings
    raise :class:`~loopreg.config.RecipeError` (a one-line ``ValueError``) naming the key.

    >>> CoTDistillation(teacher="self", curriculum={"every": "500ba"}, weights={"step": 1.0})  # doctest: +SKIP
    """

    def __init__(self, teacher: str | None = None, curriculum: Mapping[str, Any] | None = None,
                 weights: Mapping[str, float | Mapping[str, float]] | None = None, step_read: str = "diagonal",
                 hidden_loss: str = "smooth_l1", temperature: float = 1.0, loops: list[int] | None = None,
                 grad_loops: int | None = None, checkpoint: bool = False, seed: int = 0) -> None:
        unknown = sorted(set(weights or {}) - set(TERMS))
        if unknown:
            raise RecipeError(f"algorithms.cot_distillation.weights: unknown term(s) {unknown}; valid: {list(TERMS)}")
        if step_read not in ("diagonal", "final"):
            raise RecipeError(f"algorithms.cot_distillation.step_read must be 'diagonal' or 'final', got {step_read!r}")
        if hidden_loss not in ("smooth_l1", "mse"):
            raise RecipeError(f"algorithms.cot_distillation.hidden_loss must be 'smooth_l1' or 'mse', got {hidden_loss!r}")
        if loops is not None and (len(loops) != 2 or not 1 <= loops[0] <= loops[1]):
            raise RecipeError(f"algorithms.cot_distillation.loops must be [min, max] with 1 <= min <= max, got {loops}")
        self.teacher_source, self.step_read = teacher, step_read
        self.hidden_loss, self.temperature, self.loop_range = hidden_loss, temperature, loops
        self.grad_loops, self.checkpoint, self.seed = grad_loops, checkpoint, seed
        try:
            self.curriculum = LatentCurriculum(**(curriculum or {}))
        except (TypeError, ValueError) as err:
            raise RecipeError(f"algorithms.cot_distillation.curriculum: {err}") from None
        defaults = {"answer": 1.0, "cot": 1.0, "step": 1.0, "hidden": 1.0 if teacher else 0.0,
                    "kl": 1.0 if teacher else 0.0}
        try:
            self.weights = {term: WeightSchedule((weights or {}).get(term, defaults[term]),
                                                 f"algorithms.cot_distillation.weights.{term}") for term in TERMS}
        except ValueError as err:
            raise RecipeError(str(err)) from None
        if teacher is None and (self._uses("hidden") or self._uses("kl")):
            raise RecipeError("algorithms.cot_distillation: weights for 'hidden'/'kl' need a teacher "
                              "(a model folder or 'self')")
        self.stage = self.curriculum.start
        self.teacher: LoopedLM | None = None
        self.teacher_vocab: dict[str, int] | None = None
        self.data = None
        self._loops: int | None = None
        self._states: list[torch.Tensor] = []

    # -------------------------------------------------------------------------------------- events
    def match(self, event: Event, state: State) -> bool:
        return event in (Event.INIT, Event.FIT_START, Event.AFTER_DATALOADER, Event.BEFORE_FORWARD, Event.AFTER_LOSS)

    def apply(self, event: Event, state: State, logger: Logger) -> None:
        if event == Event.INIT:
            self._setup(state)
        elif event == Event.FIT_START:
            self._check_data(state)
        elif event == Event.AFTER_DATALOADER:  # Composer runs it before BATCH_START: stage and loops first
            self._advance_curriculum(state, logger)
            state.batch = self._render(state)
        elif event == Event.BEFORE_FORWARD:
            self._states = []
            _composer_model(state).forward_options = {"layer_states": self._states, "loops": self._loops,
                                                      "grad_loops": self.grad_loops, "checkpoint": self.checkpoint}
        elif event == Event.AFTER_LOSS:
            state.loss = self._loss(state)
            _composer_model(state).forward_options = {}  # eval and later callers run the plain forward

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "stage": self.stage}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.stage = state.get("stage", self.stage)

    # ------------------------------------------------------------------------------------ internals
    def _setup(self, state: State) -> None:
        model = _composer_model(state)
        student = model.model
        if not isinstance(student, LoopedLM):
            raise RecipeError(f"CoTDistillation needs a LoopedLM student, got {type(student).__name__}")
        if student.config.placeholder_id is None:
            raise RecipeError("CoTDistillation: the student has no placeholder token; set model.placeholder_id "
                             "(the data's <ph> token id, 3 for the synthetic tasks)")
        if self.teacher_source not in (None, "self"):
            self.teacher, self.teacher_vocab = _load_teacher(self.teacher_source, student)
            if self.teacher.config.d_model != student.config.d_model and self._uses("hidden"):
                # a trained map from student to teacher width; it is part of the model (checkpointed) and
                # joins the optimizer
                model.distill_projection = nn.Linear(student.config.d_model, self.teacher.config.d_model, bias=False)
                for optimizer in state.optimizers:
                    optimizer.add_param_group({"params": list(model.distill_projection.parameters())})

    def _check_data(self, state: State) -> None:
        from loopreg.data.paired import ProblemStream

        dataset = getattr(state.train_dataloader, "dataset", None)
        if not isinstance(dataset, ProblemStream):
            raise RecipeError("CoTDistillation: the train data must be train_data.kind=paired (raw problems it renders)")
        self.data = dataset.data
        placeholder_id = _composer_model(state).model.config.placeholder_id
        if self.data.placeholder_id != placeholder_id:
            raise RecipeError(f"CoTDistillation: model.placeholder_id={placeholder_id} but the data's <ph> token "
                             f"is {self.data.placeholder_id}")
        if self.teacher_vocab is not None and self.teacher_vocab != self.data.tokenizer.get_vocab():
            raise RecipeError(f"algorithms.cot_distillation.teacher: {self.teacher_source}/tokenizer.json differs "
                             "from the data's tokenizer; teacher and student must share one tokenizer")

    def _uses(self, term: str) -> bool:
        """Whether ``term``'s weight is non-zero at any point of its schedule."""
        return any(weight != 0.0 for _, weight in self.weights[term].points)

    def _advance_curriculum(self, state: State, logger: Logger) -> None:
        stage = self.curriculum.stage(state)
        if stage != self.stage and self.curriculum.reset_optimizer:
            for optimizer in state.optimizers:
                optimizer.state.clear()  # iCoT: Adam moments of the previous stage mislead the new one
        self.stage = stage
        rng = random.Random(self.seed * 1_000_003 + int(state.timestamp.batch))  # same on every rank
        self._loops = rng.randint(*self.loop_range) if self.loop_range else None
        logger.log_metrics({"distill/stage": stage, **({"distill/loops": self._loops} if self._loops else {})})

    def _render(self, state: State) -> dict[str, torch.Tensor]:
        from loopreg.data.tasks import pad_collate

        data = self.data
        rng = random.Random(self.seed * 7_919 + int(state.timestamp.batch) * 104_729 + _rank())
        problems = state.batch["problems"]
        latent = [self.curriculum.latent_steps(self.stage, len(p.steps), rng) for p in problems]
        if self._loops is not None:  # every latent step needs its own loop
            self._loops = max(self._loops, max(latent))
        per_step = _composer_model(state).model.config.placeholders_per_step  # one source of truth: the model
        batch = pad_collate([data.render_pair(p, n, per_step) for p, n in zip(problems, latent)], data.pad_id)
        return state.device.batch_to_device(batch)

    def _loss(self, state: State) -> dict[str, torch.Tensor]:
        model = _composer_model(state)
        student = model.model
        teacher = self.teacher if self.teacher is not None else student if self.teacher_source == "self" else None
        weights = {term: schedule.at(state) for term, schedule in self.weights.items()}
        return _weighted_terms(student, state.outputs, self._states, state.batch, teacher, weights, self._loops,
                               self.step_read, self.hidden_loss, self.temperature,
                               getattr(model, "distill_projection", None))


def _composer_model(state: State) -> ComposerLoopedLM:
    model = state.model
    while not isinstance(model, ComposerLoopedLM) and hasattr(model, "module"):
        model = model.module  # DDP
    if not isinstance(model, ComposerLoopedLM):
        raise RecipeError(f"CoTDistillation needs a ComposerLoopedLM, got {type(model).__name__}")
    return model


def _rank() -> int:
    from composer.utils import dist

    return dist.get_global_rank()


def _load_teacher(source: str, student: LoopedLM) -> tuple[LoopedLM, dict[str, int] | None]:
    """A frozen CoT teacher from a loopreg model folder (and its tokenizer's vocabulary, if saved),
    checked against the student's vocabulary size and placeholder."""
    from tokenizers import Tokenizer

    folder = Path(source)
    try:
        teacher = LoopedLM.from_pretrained(folder)
    except (FileNotFoundError, ValueError) as err:
        raise RecipeError(f"algorithms.cot_distillation.teacher: {err}") from None
    if teacher.config.vocab_size != student.config.vocab_size:
        raise RecipeError(f"algorithms.cot_distillation.teacher: {folder} has vocab_size {teacher.config.vocab_size} "
                         f"but the student has {student.config.vocab_size}; they must share one tokenizer")
    if teacher.config.placeholder_id not in (None, student.config.placeholder_id):
        raise RecipeError(f"algorithms.cot_distillation.teacher: {folder} uses placeholder id "
                         f"{teacher.config.placeholder_id}, the student {student.config.placeholder_id}")
    tokenizer_file = folder / "tokenizer.json"
    vocab = Tokenizer.from_file(str(tokenizer_file)).get_vocab() if tokenizer_file.is_file() else None
    teacher.requires_grad_(False).eval()
    return teacher.to(student.embed.weight.device), vocab
