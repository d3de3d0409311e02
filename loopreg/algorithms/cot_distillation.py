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

import functools
import random
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Mapping

import torch
import torch.nn.functional as F
from composer.core import Algorithm, Event, State, Time, TimeUnit
from composer.loggers import Logger
from torch import nn
from torchmetrics import Metric

from loopreg.composer_model import ComposerLoopedLM
from loopreg.data import IGNORE_INDEX
from loopreg.errors import RecipeError, UserError
from loopreg.configuration_loopreg import load_config
from loopreg.model import LoopedLM, LoopedLMConfig, LoopedLMOutput, batch_option
from loopreg.spec import LoopSpec

__all__ = ["TERMS", "CoTDistillation", "DistillationStudent", "DistillLayout", "LatentCurriculum", "WeightSchedule",
           "cot_distillation_loss", "distill_layout", "distillation_terms", "hidden_layer_map", "weighted_terms"]

TERMS = ("answer", "cot", "step", "hidden", "kl")


# ------------------------------------------------------------------------------------------ schedules
class WeightSchedule:
    """A term weight over training time: a constant, or piecewise-linear between ``{time: weight}`` points.

    Times are Composer time strings of one unit (``ba``, ``ep``, ``sp``, ``tok`` or ``dur``); before the
    first point the first weight holds, after the last the last.

    >>> WeightSchedule({"0ba": 1.0, "100ba": 0.0}).at_value(50)
    0.5
    """

    def __init__(self, spec: float | Mapping[str, float]) -> None:
        if isinstance(spec, (int, float)):
            self.unit, self.points = None, [(0.0, float(spec))]
            return
        if not isinstance(spec, Mapping) or not spec:
            raise ValueError(f"expected a number or a mapping {{time: weight}}, got {spec!r}")
        try:
            times = [Time.from_timestring(str(key)) for key in spec]
        except ValueError as err:
            raise ValueError(f"bad time {err}; use e.g. 500ba or 0.5dur") from None
        units = {time.unit for time in times}
        if len(units) != 1:
            raise ValueError(f"all times must share one unit, got {sorted(u.value for u in units)}")
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
            raise ValueError(f"every must be a positive time, got {self.every!r}")
        if self.start < 0 or self.smoothing < 0 or not 0.0 <= self.mix_prob <= 1.0:
            raise ValueError("start and smoothing must be >= 0 and mix_prob in [0, 1]")

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
    """(teacher application, student application) pairs, proportional by depth, ending at the last of each
    (a student shallower than its teacher matches some applications twice).

    >>> hidden_layer_map(2, 8), hidden_layer_map(4, 2)
    ([(0, 3), (1, 7)], [(0, 0), (1, 0), (2, 1), (3, 1)])
    """
    return [(t, max(round((t + 1) * student_depth / teacher_depth) - 1, 0)) for t in range(teacher_depth)]


@dataclass(frozen=True)
class DistillLayout:
    """The layer applications the loss reads for one student run (its spec after any loop override).

    ``loop_ends``: the student application that ends each thinking iteration (the diagonal step CE reads
    step j after loop j); ``hidden_pairs``: the (teacher, student) applications ``hidden`` matches (empty
    without a teacher depth).

    >>> distill_layout(LoopSpec.parse("1x4"), teacher_depth=2)
    DistillLayout(loop_ends=(0, 1, 2, 3), hidden_pairs=((0, 1), (1, 3)))
    """

    loop_ends: tuple[int, ...]
    hidden_pairs: tuple[tuple[int, int], ...] = ()

    @property
    def student_reads(self) -> tuple[int, ...]:
        """The student applications whose hidden states the loss reads (its ``output_hidden`` request)."""
        return tuple(sorted({*self.loop_ends, *(student for _, student in self.hidden_pairs)}))

    @property
    def teacher_reads(self) -> tuple[int, ...]:
        return tuple(teacher for teacher, _ in self.hidden_pairs)


@functools.lru_cache(maxsize=None)
def distill_layout(spec: LoopSpec, teacher_depth: int | None = None) -> DistillLayout:
    """The :class:`DistillLayout` of a student running ``spec`` against a teacher of ``teacher_depth`` layer
    applications (``None``: no hidden-state matching); resolved once per pair, then cached."""
    pairs = hidden_layer_map(teacher_depth, spec.effective_depth) if teacher_depth else []
    return DistillLayout(spec.loop_ends, tuple(pairs))


def _run_spec(model: LoopedLM, loops: int | None) -> LoopSpec:
    return model.spec if loops is None else model.spec.with_loops(loops)


def distillation_terms(student: LoopedLM, output: LoopedLMOutput, batch: Mapping[str, torch.Tensor],
                       layout: DistillLayout, teacher_output: LoopedLMOutput | None = None,
                       step_read: str = "diagonal", hidden_loss: str = "smooth_l1", temperature: float = 1.0,
                       projection: nn.Module | None = None, terms: tuple[str, ...] = TERMS) -> dict[str, torch.Tensor]:
    """Unweighted loss terms from one student forward (with the hidden states of ``layout.student_reads``)
    and, for ``hidden``/``kl``, the teacher's forward on ``batch['teacher_input_ids']`` (``layout.teacher_reads``).

    Example: ``distillation_terms(student, student(ids, output_hidden=layout.student_reads), batch, layout)``
    """
    out: dict[str, torch.Tensor] = {}
    logits = output.logits
    flat = logits.flatten(0, 1).float()
    if "answer" in terms:
        out["answer"] = F.cross_entropy(flat, batch["labels"].flatten(), ignore_index=IGNORE_INDEX)
    if "cot" in terms:
        out["cot"] = _masked_ce(flat, batch["cot_labels"].flatten(), logits)
    if "step" in terms:
        out["step"] = _step_ce(student, output, batch, layout, step_read)
    if "hidden" in terms and teacher_output is not None:
        out["hidden"] = _hidden_match(output, teacher_output, batch, layout, hidden_loss, projection)
    if "kl" in terms and teacher_output is not None:
        student_answer = logits[batch["answer_mask"]].float() / temperature
        teacher_answer = teacher_output.logits[batch["teacher_answer_mask"]].float() / temperature
        out["kl"] = F.kl_div(student_answer.log_softmax(-1), teacher_answer.log_softmax(-1), log_target=True,
                             reduction="batchmean") * temperature**2
    return out


def _masked_ce(flat_logits: torch.Tensor, flat_labels: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    if not bool((flat_labels != IGNORE_INDEX).any()):
        return like.sum() * 0.0  # no such tokens in this batch: a zero that keeps the graph connected
    return F.cross_entropy(flat_logits, flat_labels, ignore_index=IGNORE_INDEX)


def _step_ce(student: LoopedLM, output: LoopedLMOutput, batch: Mapping[str, torch.Tensor], layout: DistillLayout,
             step_read: str) -> torch.Tensor:
    labels, logits = batch["step_labels"], output.logits
    if step_read == "final":
        return _masked_ce(logits.flatten(0, 1).float(), labels.flatten(), logits)
    steps = student.placeholder_steps(batch["input_ids"])
    loop_ends = layout.loop_ends
    total, count = logits.sum() * 0.0, 0
    for step in steps[labels != IGNORE_INDEX].unique().tolist():
        if step >= len(loop_ends):
            raise ValueError(f"placeholder step {step} needs at least {step + 1} thinking loops; the student "
                             f"runs {len(loop_ends)} ('{student.spec}')")
        where = (steps == step) & (labels != IGNORE_INDEX)
        step_logits = student.lm_head(student.norm(output.hidden_states[loop_ends[step]][where])).float()
        total = total + F.cross_entropy(step_logits, labels[where], reduction="sum")
        count += int(where.sum())
    return total / max(count, 1)


def _hidden_match(output: LoopedLMOutput, teacher_output: LoopedLMOutput, batch: Mapping[str, torch.Tensor],
                  layout: DistillLayout, hidden_loss: str, projection: nn.Module | None) -> torch.Tensor:
    if not layout.hidden_pairs:
        raise ValueError("hidden-state matching needs the teacher's depth in the layout: "
                         "distill_layout(spec, teacher_depth=...)")
    rows = torch.arange(batch["trigger"].shape[0], device=batch["trigger"].device)
    losses = []
    for t, s in layout.hidden_pairs:
        target = teacher_output.hidden_states[t][rows, batch["teacher_trigger"]].float()
        predicted = output.hidden_states[s][rows, batch["trigger"]].float()
        if projection is not None:
            predicted = projection(predicted)
        if predicted.shape != target.shape:
            raise ValueError(f"hidden-state matching: student width {predicted.shape[-1]} != teacher width "
                             f"{target.shape[-1]}; a projection is needed (DistillationStudent has one)")
        loss = F.smooth_l1_loss(predicted, target) if hidden_loss == "smooth_l1" else F.mse_loss(predicted, target)
        losses.append(loss / target.std().clamp(min=1e-6))
    return torch.stack(losses).mean()


def _teacher_forward(teacher: LoopedLM, batch: Mapping[str, torch.Tensor], layout: DistillLayout) -> LoopedLMOutput:
    with torch.no_grad():
        return teacher(batch["teacher_input_ids"], output_hidden=layout.teacher_reads)


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
    matches_hidden = teacher is not None and weights.get("hidden", 0.0) != 0.0
    layout = distill_layout(_run_spec(student, loops), teacher.spec.effective_depth if matches_hidden else None)
    output = student(batch["input_ids"], loops=loops, output_hidden=layout.student_reads)
    return weighted_terms(student, output, batch, layout, teacher, weights, step_read, hidden_loss, temperature,
                          projection)


def weighted_terms(student: LoopedLM, output: LoopedLMOutput, batch: Mapping[str, torch.Tensor],
                   layout: DistillLayout, teacher: LoopedLM | None, weights: Mapping[str, float],
                   step_read: str = "diagonal", hidden_loss: str = "smooth_l1", temperature: float = 1.0,
                   projection: nn.Module | None = None) -> dict[str, torch.Tensor]:
    """The terms with a non-zero weight, weighted, from a student forward that already ran; the teacher runs
    (under ``no_grad``) only when ``hidden``/``kl`` need it.

    Example: ``weighted_terms(student, output, batch, layout, teacher, {"answer": 1.0, "kl": 0.5})``
    """
    wanted = tuple(term for term in TERMS if weights.get(term, 0.0) != 0.0)
    teacher_output = (_teacher_forward(teacher, batch, layout) if teacher is not None
                      and {"hidden", "kl"} & set(wanted) else None)
    terms = distillation_terms(student, output, batch, layout, teacher_output, step_read, hidden_loss, temperature,
                               projection, wanted)
    return {term: weights[term] * value for term, value in terms.items()}


# ------------------------------------------------------------------------------------------ student
class DistillationStudent(ComposerLoopedLM):
    """The Composer model :class:`CoTDistillation` trains, built from the recipe's ``model`` section by
    :meth:`CoTDistillation.student_model`.

    Its training forward returns a :class:`~loopreg.model.LoopedLMOutput` with the hidden states the loss
    reads (:meth:`layout`; the loop count and ``grad_loops`` come from the batch), and it owns
    ``distill_projection``, the trained student → teacher width map of the ``hidden`` term (when the widths
    differ), so the optimizer and the checkpoints see it from the first step. Eval runs the plain forward.

    >>> config = LoopedLMConfig(spec="1x4", vocab_size=24, d_model=32, n_heads=4, placeholder_id=3)
    >>> DistillationStudent(config, teacher_depth=2, teacher_width=48).distill_projection
    Linear(in_features=32, out_features=48, bias=False)
    """

    def __init__(self, config: LoopedLMConfig | LoopedLM, extra_eval_metrics: dict[str, Metric] | None = None,
                 teacher_depth: int | None = None, teacher_width: int | None = None, checkpoint: bool = False) -> None:
        super().__init__(config, extra_eval_metrics)
        width = self.model.config.d_model
        self.distill_projection = (nn.Linear(width, teacher_width, bias=False)
                                   if teacher_width is not None and teacher_width != width else None)
        self.teacher_depth, self.checkpoint = teacher_depth, checkpoint

    def layout(self, loops: int | None = None) -> DistillLayout:
        """What the loss reads when the student runs ``loops`` thinking iterations (``None``: its spec's)."""
        return distill_layout(_run_spec(self.model, loops), self.teacher_depth)

    def forward(self, batch: dict[str, torch.Tensor]) -> LoopedLMOutput:
        options = self.loop_options(batch)
        return self.model(batch["input_ids"], **options, checkpoint=self.checkpoint,
                          output_hidden=self.layout(options.get("loops")).student_reads)

    def loss(self, outputs: LoopedLMOutput, batch: dict[str, torch.Tensor], *args: Any, **kwargs: Any) -> torch.Tensor:
        return super().loss(outputs.logits, batch)

    def eval_forward(self, batch: dict[str, torch.Tensor], outputs: Any | None = None) -> torch.Tensor:
        if outputs is not None:
            return outputs.logits
        return super().forward(batch)  # the metrics read plain logits


# ---------------------------------------------------------------------------------------- algorithm
class CoTDistillation(Algorithm):
    """Composer algorithm: builds the student (:meth:`student_model`), advances the curriculum and renders
    each batch at its stage (the loop count travels in the batch), and replaces the loss with the weighted
    terms of :func:`cot_distillation_loss`.

    The train data must be ``kind: paired`` (raw problems; see :mod:`loopreg.data.paired`). Bad settings
    raise a one-line :class:`~loopreg.errors.RecipeError` naming the key.

    >>> CoTDistillation(teacher="self", curriculum={"every": "500ba"}, weights={"step": 1.0})  # doctest: +SKIP
    """

    KEY = "algorithms.cot_distillation"

    def __init__(self, teacher: str | None = None, curriculum: Mapping[str, Any] | None = None,
                 weights: Mapping[str, float | Mapping[str, float]] | None = None, step_read: str = "diagonal",
                 hidden_loss: str = "smooth_l1", temperature: float = 1.0, loops: list[int] | None = None,
                 grad_loops: int | None = None, checkpoint: bool = False, seed: int = 0) -> None:
        key = self.KEY
        unknown = sorted(set(weights or {}) - set(TERMS))
        if unknown:
            raise RecipeError(f"unknown term(s) {unknown}; valid: {list(TERMS)}", key=f"{key}.weights")
        if step_read not in ("diagonal", "final"):
            raise RecipeError(f"must be 'diagonal' or 'final', got {step_read!r}", key=f"{key}.step_read")
        if hidden_loss not in ("smooth_l1", "mse"):
            raise RecipeError(f"must be 'smooth_l1' or 'mse', got {hidden_loss!r}", key=f"{key}.hidden_loss")
        if loops is not None and (len(loops) != 2 or not 1 <= loops[0] <= loops[1]):
            raise RecipeError(f"must be [min, max] with 1 <= min <= max, got {loops}", key=f"{key}.loops")
        self.teacher_source, self.step_read = teacher, step_read
        self.hidden_loss, self.temperature, self.loop_range = hidden_loss, temperature, loops
        self.grad_loops, self.checkpoint, self.seed = grad_loops, checkpoint, seed
        curriculum = dict(curriculum or {})
        known = [field.name for field in fields(LatentCurriculum)]
        if set(curriculum) - set(known):
            raise RecipeError(f"unknown key(s) {sorted(set(curriculum) - set(known))}; valid: {known}",
                              key=f"{key}.curriculum")
        try:
            self.curriculum = LatentCurriculum(**curriculum)
        except ValueError as err:
            raise RecipeError(str(err), key=f"{key}.curriculum") from None
        defaults = {"answer": 1.0, "cot": 1.0, "step": 1.0, "hidden": 1.0 if teacher else 0.0,
                    "kl": 1.0 if teacher else 0.0}
        self.weights: dict[str, WeightSchedule] = {}
        for term in TERMS:
            try:
                self.weights[term] = WeightSchedule((weights or {}).get(term, defaults[term]))
            except ValueError as err:
                raise RecipeError(str(err), key=f"{key}.weights.{term}") from None
        if teacher is None and (self._uses("hidden") or self._uses("kl")):
            raise RecipeError("weights for 'hidden'/'kl' need a teacher (a model folder or 'self')",
                              key=f"{key}.teacher")
        self.stage = self.curriculum.start
        self.teacher: LoopedLM | None = None
        self.teacher_vocab: dict[str, int] | None = None
        self.stream = None  # the train data's ProblemStream, which renders the batches (from FIT_START on)

    def student_model(self, config: LoopedLMConfig, extra_eval_metrics: dict[str, Metric] | None = None
                      ) -> DistillationStudent:
        """The Composer model to train: the recipe's model with what this algorithm's loss needs (``loopreg.train``
        builds it in place of a plain :class:`ComposerLoopedLM`, before the optimizer).

        >>> CoTDistillation().student_model(LoopedLMConfig(spec="1x4", vocab_size=24, d_model=32, n_heads=4,
        ...                                                placeholder_id=3)).distill_projection is None
        True
        """
        if config.placeholder_id is None:
            raise RecipeError("CoTDistillation: the student has no placeholder token; set model.placeholder_id "
                              "(the data's <ph> token id, 3 for the synthetic tasks)")
        teacher = self._teacher_config(config) if self.teacher_source not in (None, "self") else config
        matches_hidden = self._uses("hidden")
        return DistillationStudent(config, extra_eval_metrics,
                                   teacher_depth=teacher.loop_spec.effective_depth if matches_hidden else None,
                                   teacher_width=teacher.d_model if matches_hidden else None,
                                   checkpoint=self.checkpoint)

    # -------------------------------------------------------------------------------------- events
    def match(self, event: Event, state: State) -> bool:
        return event in (Event.INIT, Event.FIT_START, Event.AFTER_DATALOADER, Event.AFTER_LOSS)

    def apply(self, event: Event, state: State, logger: Logger) -> None:
        if event == Event.INIT:
            self._load_teacher(state)
        elif event == Event.FIT_START:
            self._check_data(state)
        elif event == Event.AFTER_DATALOADER:  # Composer runs it before BATCH_START, in the main process
            state.batch = self._render(state, logger)
        elif event == Event.AFTER_LOSS:
            state.loss = self._loss(state)

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "stage": self.stage}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.stage = state.get("stage", self.stage)

    # ------------------------------------------------------------------------------------ internals
    def _uses(self, term: str) -> bool:
        """Whether ``term``'s weight is non-zero at any point of its schedule."""
        return any(weight != 0.0 for _, weight in self.weights[term].points)

    def _teacher_config(self, student: LoopedLMConfig) -> LoopedLMConfig:
        """The teacher folder's config, checked against the student's vocabulary and placeholder."""
        folder, key = Path(self.teacher_source), f"{self.KEY}.teacher"
        try:
            teacher = load_config(folder)
        except (FileNotFoundError, ValueError) as err:
            raise RecipeError(str(err), key=key) from None
        if teacher.vocab_size != student.vocab_size:
            raise RecipeError(f"{folder} has vocab_size {teacher.vocab_size} but the student has "
                              f"{student.vocab_size}; they must share one tokenizer", key=key)
        if teacher.placeholder_id not in (None, student.placeholder_id):
            raise RecipeError(f"{folder} uses placeholder id {teacher.placeholder_id}, the student "
                              f"{student.placeholder_id}", key=key)
        return teacher

    def _load_teacher(self, state: State) -> None:
        """The frozen CoT teacher of a model folder (and its tokenizer's vocabulary, if saved), next to the
        student; ``"self"`` and no teacher need nothing."""
        from tokenizers import Tokenizer

        student = _student(state).model
        if self.teacher_source in (None, "self"):
            return
        folder = Path(self.teacher_source)
        from loopreg.loading import load

        try:
            teacher = load(folder)
        except UserError as err:
            raise RecipeError(str(err), key=f"{self.KEY}.teacher") from None
        tokenizer_file = folder / "tokenizer.json"
        self.teacher_vocab = (Tokenizer.from_file(str(tokenizer_file)).get_vocab() if tokenizer_file.is_file()
                              else None)
        self.teacher = teacher.requires_grad_(False).eval().to(student.embed.weight.device)

    def _check_data(self, state: State) -> None:
        from loopreg.data.paired import ProblemStream

        stream = getattr(state.train_dataloader, "dataset", None)
        if not isinstance(stream, ProblemStream):
            raise RecipeError("CoTDistillation: the train data must be train_data.kind=paired "
                              "(raw problems it renders)")
        placeholder_id = _student(state).model.config.placeholder_id
        if stream.data.placeholder_id != placeholder_id:
            raise RecipeError(f"CoTDistillation: model.placeholder_id={placeholder_id} but the data's <ph> token "
                              f"is {stream.data.placeholder_id}")
        if self.teacher_vocab is not None and self.teacher_vocab != stream.data.tokenizer.get_vocab():
            raise RecipeError(f"{self.teacher_source}/tokenizer.json differs from the data's tokenizer; teacher "
                              "and student must share one tokenizer", key=f"{self.KEY}.teacher")
        self.stream = stream

    def _render(self, state: State, logger: Logger) -> dict[str, torch.Tensor]:
        """This batch's problems rendered at the curriculum's stage (advanced first), with the loop count
        (and ``grad_loops``) as per-row batch keys (:func:`~loopreg.model.batch_option`)."""
        stage = self.curriculum.stage(state)
        if stage != self.stage and self.curriculum.reset_optimizer:
            for optimizer in state.optimizers:
                optimizer.state.clear()  # iCoT: Adam moments of the previous stage mislead the new one
        self.stage = stage
        batch_index = int(state.timestamp.batch)
        loops_rng = random.Random(self.seed * 1_000_003 + batch_index)  # the same on every rank
        loops = loops_rng.randint(*self.loop_range) if self.loop_range else None
        logger.log_metrics({"distill/stage": stage, **({"distill/loops": loops} if loops else {})})
        rng = random.Random(self.seed * 7_919 + batch_index * 104_729 + _rank())
        problems = state.batch["problems"]
        latent = [self.curriculum.latent_steps(stage, len(p.steps), rng) for p in problems]
        per_step = _student(state).model.config.placeholders_per_step  # one source of truth: the model
        batch = self.stream.render(problems, latent, per_step)
        if loops is not None:  # every latent step needs its own loop
            batch["loops"] = torch.full((len(problems),), max(loops, max(latent)))
        if self.grad_loops is not None:
            batch["grad_loops"] = torch.full((len(problems),), self.grad_loops)
        return state.device.batch_to_device(batch)

    def _loss(self, state: State) -> dict[str, torch.Tensor]:
        model = _student(state)
        student = model.model
        teacher = self.teacher if self.teacher is not None else student if self.teacher_source == "self" else None
        weights = {term: schedule.at(state) for term, schedule in self.weights.items()}
        layout = model.layout(batch_option(state.batch.get("loops")))
        return weighted_terms(student, state.outputs, state.batch, layout, teacher, weights, self.step_read,
                              self.hidden_loss, self.temperature, model.distill_projection)


def _student(state: State) -> DistillationStudent:
    model = state.model
    while not isinstance(model, DistillationStudent) and hasattr(model, "module"):
        model = model.module  # DDP
    if not isinstance(model, DistillationStudent):
        raise RecipeError("CoTDistillation trains the LoopedLM it builds from the recipe's model section "
                          f"(CoTDistillation.student_model), not a {type(model).__name__} (e.g. model.pretrained)")
    return model


def _rank() -> int:
    from composer.utils import dist

    return dist.get_global_rank()
