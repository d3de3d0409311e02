"""Paired chain-of-thought / latent renderings of one problem, for CoT-to-latent distillation.

Every problem is a question, a list of CoT steps and an answer. Its renderings share one layout
(the iCoT one, ``question||steps #### answer``), with the first ``s`` steps replaced by placeholders:

    CoT (s = 0)      <bos> 9+1+4=|| 0 4 #### 4 <eos>        teacher; CE on the steps and the answer
    mixed (s = 1)    <bos> 9+1+4=|| <ph> <ph> 4 #### 4 <eos>          curriculum stage 1 (step + echo)
    latent (s = m)   <bos> 9+1+4=|| <ph> <ph> <ph> #### 4 <eos>     the student generates only "4"

Each CoT step gets ``per_step`` placeholders; placeholder i of step j is supervised (latent-step CE)
with token i of step j. One more *echo* group follows the latent steps: with soft-token feedback it
receives the last latent step, so the kept CoT text or the answer reads that step from a token-like
input at the same offset as in the CoT rendering. The last token of `` #### `` is the *answer trigger*
(its output predicts the first answer token) in every rendering, which is where teacher and student
hidden states are matched.

Sources: the synthetic tasks with a CoT (n-ary addition with running sums, i-GSM with topological
evaluation lines, k×k multiplication in the iCoT format) and user JSONL lines
``{"question": ..., "cot": [step, ...], "answer": ...}``.

    >>> data = PairedData.from_task("addition", n_operands=3, digits=1, modulus=10)
    >>> problem = data.test_set(1, seed=0)[0]
    >>> data.text(data.render(problem, latent_steps=2))  # doctest: +ELLIPSIS
    '<bos>...=||<ph><ph><ph> #### ...'
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator

import torch
from tokenizers import Tokenizer
from torch.utils.data import DataLoader, Dataset

from loopreg.data import DATA_KINDS, IGNORE_INDEX, Data, DataKind
from loopreg.data.synthetic import SyntheticTask, build_task, char_tokenizer
from loopreg.data.synthetic.base import ANSWER_MARK, COT_OPEN
from loopreg.data.resumable import ResumableStream
from loopreg.data.tasks import pad_collate
from loopreg.data.synthetic.tokenizer import BOS, EOS, PAD, PLACEHOLDER
from loopreg.errors import RecipeError

__all__ = ["Problem", "PairedData", "ProblemStream", "RenderedSet", "read_jsonl_problems",
           "paired_dataloaders"]


@dataclass(frozen=True)
class Problem:
    """One reasoning problem. Example: ``Problem("9+1+4=", ("0", "4"), "4")``."""

    question: str
    steps: tuple[str, ...]
    answer: str


def read_jsonl_problems(path: str | Path) -> list[Problem]:
    """Problems from a JSONL file of ``{"question": str, "cot": [str, ...], "answer": str}`` lines.

    A malformed line raises ``ValueError`` naming the file and line number.
    Example: ``read_jsonl_problems("data/gsm_cot.jsonl")[0].steps``
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: paired data file not found")
    problems = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}:{number}: not valid JSON ({err.msg})") from None
        if not isinstance(record, dict):
            raise ValueError(f"{path}:{number}: expected an object with question, cot and answer")
        missing = [key for key in ("question", "cot", "answer") if key not in record]
        if missing:
            raise ValueError(f"{path}:{number}: missing key(s) {missing}; each line needs question, cot and answer")
        steps = record["cot"]
        if not (isinstance(steps, list) and steps and all(isinstance(step, str) and step for step in steps)):
            raise ValueError(f"{path}:{number}: 'cot' must be a non-empty list of non-empty strings")
        if not isinstance(record["question"], str) or not isinstance(record["answer"], str) or not record["answer"]:
            raise ValueError(f"{path}:{number}: 'question' and 'answer' must be strings (answer non-empty)")
        problems.append(Problem(record["question"], tuple(steps), record["answer"]))
    if not problems:
        raise ValueError(f"{path}: no problems (the file is empty)")
    return problems


@dataclass
class PairedData:
    """A source of problems plus the tokenizer and the rendering rule.

    ``task`` streams endless training problems (synthetic) and ``problems`` is a fixed list (JSONL:
    every 20th problem is held out for evaluation, the rest trains).
    """

    tokenizer: Tokenizer
    step_separator: str = " "
    task: SyntheticTask | None = None
    problems: list[Problem] | None = None

    def __post_init__(self) -> None:
        self.pad_id, self.bos_id, self.eos_id, self.placeholder_id = (
            self.tokenizer.token_to_id(token) for token in (PAD, BOS, EOS, PLACEHOLDER))

    # ------------------------------------------------------------------ sources
    @classmethod
    def from_task(cls, name: str, **knobs: object) -> PairedData:
        """A synthetic task with a chain of thought (``addition``, ``igsm``, ``multiplication``)."""
        task = build_task(name, **knobs)
        if not task.has_cot:
            raise ValueError(f"synthetic task '{name}' has no chain-of-thought rendering; use addition, igsm "
                             "or multiplication")
        return cls(char_tokenizer(task.symbols), task.cot_step_separator, task=task)

    @classmethod
    def from_jsonl(cls, path: str | Path, step_separator: str = " ") -> PairedData:
        """User problems; the character tokenizer covers every character in the file."""
        problems = read_jsonl_problems(path)
        symbols = {char for p in problems for text in (p.question, p.answer, *p.steps) for char in text}
        symbols |= set(COT_OPEN + ANSWER_MARK + step_separator)
        return cls(char_tokenizer("".join(symbols)), step_separator, problems=problems)

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.get_vocab_size()

    def train_problems(self, seed: int, indices: Iterable[int]) -> Iterator[Problem]:
        """Training problems at increasing global ``indices`` of one seeded stream (synthetic: the task's
        chunked train stream; JSONL: the training problems, reshuffled every pass)."""
        if self.task is not None:
            from loopreg.data.tasks import train_examples

            for example in train_examples(self.task, seed, indices):
                yield Problem(example.prompt, example.cot, example.answer)
            return
        pool = [p for index, p in enumerate(self.problems) if index % 20]
        order, epoch = [], -1
        for index in indices:
            if index // len(pool) != epoch:
                epoch = index // len(pool)
                order = list(range(len(pool)))
                random.Random(f"{seed}/{epoch}").shuffle(order)
            yield pool[order[index % len(pool)]]

    def test_set(self, size: int, seed: int) -> list[Problem]:
        """A fixed evaluation set (the task's test split, or the held-out JSONL problems)."""
        if self.task is not None:
            return [Problem(e.prompt, e.cot, e.answer) for e in self.task.fixed_set("test", size, seed)]
        return [p for index, p in enumerate(self.problems) if index % 20 == 0][:size]

    # ---------------------------------------------------------------- rendering
    def ids(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    def text(self, rendered: dict[str, torch.Tensor]) -> str:
        """The rendered sequence as text (special tokens written out)."""
        return self.tokenizer.decode(rendered["input_ids"].tolist(), skip_special_tokens=False)

    def render(self, problem: Problem, latent_steps: int, per_step: int = 1) -> dict[str, torch.Tensor]:
        """``problem`` with its first ``latent_steps`` CoT steps as ``per_step`` placeholders each.

        Keys (all aligned with ``input_ids``; ``labels[t]`` is the target after position t):
        ``labels`` (answer and ``<eos>``), ``answer_mask``, ``cot_labels`` (the kept CoT text and
        `` #### ``), ``step_labels`` (gold step tokens at the placeholders), ``trigger`` (index of the
        answer trigger).
        """
        latent_steps = min(latent_steps, len(problem.steps))
        prompt = [self.bos_id, *self.ids(problem.question + COT_OPEN)]
        step_labels = [IGNORE_INDEX] * len(prompt)
        for step in problem.steps[:latent_steps]:
            gold = self.ids(step)[:per_step]
            prompt += [self.placeholder_id] * per_step
            step_labels += gold + [IGNORE_INDEX] * (per_step - len(gold))
        if latent_steps:  # the echo group: receives the last latent step (soft-token feedback), no target
            prompt += [self.placeholder_id] * per_step
            step_labels += [IGNORE_INDEX] * per_step
        kept = self.step_separator.join(problem.steps[latent_steps:])
        cot = self.ids(kept + ANSWER_MARK) if kept else []
        mark = [] if kept else self.ids(ANSWER_MARK)
        answer = self.ids(problem.answer) + [self.eos_id]
        tokens = prompt + mark + cot + answer[:-1]
        # labels[t] = tokens[t + 1]; position (len(prompt) - 1) predicts the first kept CoT token
        cot_labels = [IGNORE_INDEX] * (len(prompt) - 1) + cot + [IGNORE_INDEX] * (len(answer) + len(mark))
        if mark:  # fully latent: the answer mark is part of the prompt, not predicted
            cot_labels = [IGNORE_INDEX] * len(tokens)
        labels = [IGNORE_INDEX] * (len(tokens) - len(answer)) + answer
        step_labels += [IGNORE_INDEX] * (len(tokens) - len(step_labels))
        # step_labels sit *at* the placeholder (it decodes its own step), unlike next-token labels
        trigger = len(tokens) - len(answer)
        tensor = lambda values: torch.tensor(values, dtype=torch.long)  # noqa: E731
        return {"input_ids": tensor(tokens), "labels": tensor(labels), "answer_mask": tensor(labels) != IGNORE_INDEX,
                "cot_labels": tensor(cot_labels), "step_labels": tensor(step_labels), "trigger": torch.tensor(trigger)}

    def render_pair(self, problem: Problem, latent_steps: int, per_step: int = 1) -> dict[str, torch.Tensor]:
        """The student rendering plus the teacher's CoT rendering (``teacher_*`` keys) of the same problem."""
        student = self.render(problem, latent_steps, per_step)
        teacher = self.render(problem, 0)
        student.update({"teacher_input_ids": teacher["input_ids"], "teacher_answer_mask": teacher["answer_mask"],
                        "teacher_trigger": teacher["trigger"]})
        return student

    def prompt_ids(self, problem: Problem, latent: bool, per_step: int = 1) -> list[int]:
        """What a model is given at test time: ``question||`` (CoT) or ``question||<ph>… #### `` (latent)."""
        rendered = self.render(problem, len(problem.steps) if latent else 0, per_step)
        end = int(rendered["trigger"]) + 1 if latent else len(self.ids(problem.question + COT_OPEN)) + 1
        return rendered["input_ids"][:end].tolist()

    def parse_answer(self, generated: list[int]) -> str:
        """The answer in generated ids: the text after the last `` #### `` (if any), up to ``<eos>``."""
        if self.eos_id in generated:
            generated = generated[:generated.index(self.eos_id)]
        text = self.tokenizer.decode(generated, skip_special_tokens=False)
        return text.rsplit(ANSWER_MARK, 1)[-1]


class ProblemStream(ResumableStream):
    """Endless raw training problems for a rank, resumable at Composer's sample count; a batch is
    ``{"problems": [...]}``, turned into tensors by :meth:`render` at the curriculum's current stage.

    The rendering runs in the main process (``CoTDistillation`` calls :meth:`render` at ``AFTER_DATALOADER``
    with the current stage's latent step counts): the stage advances in the main process, so a DataLoader
    worker rendering ahead would use a stale one. The raw problems do not depend on the stage, so workers
    may still load them (``train_data.num_workers``).

        >>> data = PairedData.from_task("addition", n_operands=3)
        >>> ProblemStream(data, seed=0).render(data.test_set(2, seed=0), latent_steps=[0, 2])["input_ids"].shape[0]
        2
    """

    def __init__(self, data: PairedData, seed: int, rank: int = 0, world_size: int = 1, batch_size: int = 1) -> None:
        super().__init__(rank, world_size, batch_size)
        self.data, self.seed = data, seed

    def __iter__(self) -> Iterator[Problem]:
        return self.data.train_problems(self.seed, self.my_positions())

    def render(self, problems: list[Problem], latent_steps: list[int], per_step: int = 1) -> dict[str, torch.Tensor]:
        """One padded training batch: each problem's :meth:`PairedData.render_pair` with its number of
        latent steps and ``per_step`` placeholders per step."""
        data = self.data
        return pad_collate([data.render_pair(p, n, per_step) for p, n in zip(problems, latent_steps, strict=True)],
                           data.pad_id)


class RenderedSet(Dataset):
    """A fixed evaluation set rendered once at a given number of latent steps (default: all)."""

    def __init__(self, data: PairedData, problems: list[Problem], latent_steps: int | None = None,
                 per_step: int = 1) -> None:
        self.problems = problems
        self.items = [data.render(p, len(p.steps) if latent_steps is None else latent_steps, per_step)
                      for p in problems]

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return self.items[index]


def check_paired_section(section: Any, name: str) -> None:
    """A paired data section names a task or a JSONL source (the ``paired`` kind's check when a recipe loads)."""
    if not (section.task or section.source):
        raise RecipeError(f"{name} of kind paired needs task (addition, igsm, multiplication) or "
                          "source (a JSONL file of question/cot/answer)")


def paired_dataloaders(recipe: Any, per_device: int, world_size: int, rank: int, pretrained: Any = None) -> Data:
    """:class:`~loopreg.data.Data` for ``train_data.kind: paired``: raw training problems (the
    ``cot_distillation`` algorithm renders them, see :class:`ProblemStream`) and one fully latent eval set
    with answer exact match (``pretrained``: never set, ``model.pretrained`` trains on text only)."""
    from composer.core import Evaluator
    from composer.utils import dist

    from loopreg.data.tasks import AnswerExactMatch

    if "cot_distillation" not in recipe.algorithms:  # nothing else turns the raw problems into tensors
        raise RecipeError("paired data is raw CoT problems that only the cot_distillation algorithm renders; "
                          "add algorithms.cot_distillation (see recipes/distill/)", key="train_data.kind")
    section = recipe.train_data
    try:
        data = (PairedData.from_task(section.task, **section.task_kwargs) if section.task
                else PairedData.from_jsonl(section.source))
    except (ValueError, TypeError, FileNotFoundError) as err:
        raise RecipeError(str(err), key="train_data") from None
    if data.vocab_size > recipe.model.vocab_size:
        raise RecipeError(f"model.vocab_size={recipe.model.vocab_size} is smaller than the paired data's vocabulary "
                          f"({data.vocab_size} tokens)")
    if recipe.model.placeholder_id != data.placeholder_id:
        raise RecipeError(f"model.placeholder_id={recipe.model.placeholder_id} must be the data's <ph> token id "
                          f"({data.placeholder_id})")
    train = DataLoader(ProblemStream(data, recipe.seed, rank, world_size, per_device), batch_size=per_device,
                       collate_fn=lambda problems: {"problems": problems}, num_workers=section.num_workers)
    eval_size = recipe.eval_data.eval_size if recipe.eval_data is not None else 500
    per_step = recipe.model.placeholders_per_step
    dataset = RenderedSet(data, data.test_set(eval_size, seed=recipe.seed + 1), per_step=per_step)
    loader = DataLoader(dataset, batch_size=recipe.device_eval_batch_size,
                        collate_fn=lambda items: pad_collate(items, data.pad_id),
                        sampler=dist.get_sampler(dataset, shuffle=False))
    evaluator = Evaluator(label="latent", dataloader=loader, metric_names=["LanguageCrossEntropy", "AnswerExactMatch"])
    return Data(train, [evaluator], data.tokenizer, {"AnswerExactMatch": AnswerExactMatch()})


DATA_KINDS.register("paired")(DataKind(check=check_paired_section, build=paired_dataloaders))
