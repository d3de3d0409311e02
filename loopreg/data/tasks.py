"""Synthetic reasoning tasks as Composer data: streaming training examples, fixed eval sets, answer metric.

A sequence is ``<bos> prompt answer <eos>``; ``labels`` are aligned with the inputs (``labels[t]`` is
the token after position t) and set only on the answer and ``<eos>`` (answer-only loss). Tasks that
define a label per prompt position (p-hop: ``hop_p`` of every prefix) train on all of them instead
and read the answer at the last position. ``answer_mask`` marks the positions that make up the
answer, so :class:`AnswerExactMatch` scores exactly what greedy decoding would output.

    >>> from loopreg.data.synthetic import PHop
    >>> data = TaskData(PHop(length=8, hops=2))
    >>> item = data.encode(data.task.fixed_set("test", 1, seed=0)[0])
    >>> sorted(item)
    ['answer_mask', 'input_ids', 'labels']

Registers the data kind ``synthetic`` and the tokenizer kind ``synthetic`` (the task's own vocabulary).
"""

from __future__ import annotations

import functools
import random
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any, Iterable, Iterator

import torch
from tokenizers import Tokenizer
from torch.utils.data import DataLoader, Dataset
from torchmetrics import Metric

from loopreg.data import DATA_KINDS, IGNORE_INDEX, TOKENIZERS, Data, DataKind
from loopreg.data.resumable import ResumableStream
from loopreg.data.synthetic import Example, SyntheticTask, build_task, char_tokenizer
from loopreg.data.synthetic.tokenizer import BOS, EOS, PAD
from loopreg.data.text import eos_id
from loopreg.errors import RecipeError

__all__ = ["TaskData", "AnswerExactMatch", "synthetic_dataloaders", "task_evaluators", "pad_collate",
           "train_examples"]


@dataclass
class TaskData:
    """A task plus its tokenizer and the encoding rule (per-position labels when the task has them)."""

    task: SyntheticTask
    tokenizer: Tokenizer | None = None

    def __post_init__(self) -> None:
        self.tokenizer = self.tokenizer or char_tokenizer(self.task.symbols)
        self.pad_id, self.bos_id, self.eos_id = (self.tokenizer.token_to_id(t) for t in (PAD, BOS, EOS))
        if self.bos_id is None:  # a text tokenizer (a mixture): a problem is a document, after an end-of-text
            self.pad_id = self.bos_id = self.eos_id = eos_id(self.tokenizer)

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.get_vocab_size()

    def ids(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    def encode(self, example: Example) -> dict[str, torch.Tensor]:
        prompt = [self.bos_id] + self.ids(example.prompt)
        if example.position_labels is not None:
            targets = [IGNORE_INDEX] + self.ids("".join(example.position_labels))
            tokens, labels = prompt, targets
            answer_mask = [False] * (len(tokens) - 1) + [True]
        else:
            answer = self.ids(example.answer) + [self.eos_id]
            tokens = prompt + answer[:-1]
            labels = [IGNORE_INDEX] * (len(prompt) - 1) + answer
            answer_mask = [label != IGNORE_INDEX for label in labels]
        return {"input_ids": torch.tensor(tokens), "labels": torch.tensor(labels),
                "answer_mask": torch.tensor(answer_mask)}


def pad_collate(items: list[dict[str, torch.Tensor]], pad_id: int = 0) -> dict[str, torch.Tensor]:
    """Right-pad encoded examples to the longest one: ``*input_ids`` with ``pad_id``, boolean masks with
    False, every other sequence (labels) with -100; 0-d values are stacked. Shared by the synthetic tasks
    and the paired CoT/latent renderings, whose extra keys (``teacher_*``, ``step_*``) it pads the same way.

    >>> pad_collate([{"input_ids": torch.tensor([1, 2])}, {"input_ids": torch.tensor([3])}])["input_ids"]
    tensor([[1, 2],
            [3, 0]])
    """
    batch = {}
    for key in items[0]:
        values = [item[key] for item in items]
        if values[0].dim() == 0:
            batch[key] = torch.stack(values)
            continue
        fill = pad_id if key.endswith("input_ids") else False if values[0].dtype == torch.bool else IGNORE_INDEX
        width = max(value.shape[0] for value in values)
        batch[key] = torch.stack([torch.nn.functional.pad(value, (0, width - value.shape[0]), value=fill)
                                  for value in values])
    return batch


class TrainStream(ResumableStream):
    """Endless training examples of the task's train split, sharded over ranks and DataLoader workers by
    :func:`~loopreg.data.resumable.positions`: N processes see exactly the global batches one process
    would, and a checkpoint's sample count is the exact resume position.

    The stream is cut into chunks of :attr:`CHUNK` examples, each drawn from its own ``random.Random``
    seeded by ``(seed, chunk)``, so a resume (or a worker's next batch) jumps to its chunk instead of
    regenerating everything before it.

    >>> from loopreg.data.synthetic import PHop
    >>> stream = TrainStream(TaskData(PHop(length=8, hops=2)), seed=0, rank=1, world_size=2, batch_size=4)
    >>> next(iter(stream))["input_ids"].shape   # global example 1: rank 1 takes the odd ones
    torch.Size([9])
    """

    CHUNK = 256

    def __init__(self, data: TaskData, seed: int, rank: int = 0, world_size: int = 1, batch_size: int = 1) -> None:
        super().__init__(rank, world_size, batch_size)
        self.data, self.seed = data, seed

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        for example in train_examples(self.data.task, self.seed, self.my_positions(), self.CHUNK):
            yield self.data.encode(example)


def train_examples(task: SyntheticTask, seed: int | str, indices: Iterable[int],
                   chunk_size: int = 256) -> Iterator[Example]:
    """The train-split examples at increasing global ``indices`` of the seeded stream; each chunk of
    ``chunk_size`` examples has its own ``random.Random(f"{seed}/{chunk}")``, so jumping ahead is cheap.

    Example: ``next(train_examples(PHop(), seed=0, indices=[1000]))``
    """
    chunk, drawn, rng, example = -1, 0, None, None
    for index in indices:
        wanted_chunk, offset = divmod(index, chunk_size)
        if wanted_chunk != chunk:  # positions only increase: a new chunk starts its own generator
            chunk, drawn, rng = wanted_chunk, 0, random.Random(f"{seed}/{wanted_chunk}")
        while drawn <= offset:
            while True:  # test-split problems are drawn and dropped, as in SyntheticTask.stream
                example = task.sample(rng)
                if task.split_of(example) == "train":
                    break
            drawn += 1
        yield example


class FixedSet(Dataset):
    """A deterministic evaluation set drawn from the test split."""

    def __init__(self, data: TaskData, size: int, seed: int) -> None:
        self.examples = data.task.fixed_set("test", size, seed)
        self.items = [data.encode(example) for example in self.examples]

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return self.items[index]


class AnswerExactMatch(Metric):
    """Share of examples whose every answer position is predicted right (teacher-forced argmax, which
    equals what greedy decoding would generate for the answer)."""

    full_state_update = False

    def __init__(self) -> None:
        super().__init__()
        self.add_state("correct", default=torch.tensor(0.0), dist_reduce_fx="sum")
        self.add_state("total", default=torch.tensor(0.0), dist_reduce_fx="sum")

    def update(self, logits: torch.Tensor, batch: dict[str, torch.Tensor]) -> None:
        mask = batch["answer_mask"]
        right = (logits.argmax(-1) == batch["labels"]) | ~mask
        self.correct += right.all(-1).sum()
        self.total += mask.any(-1).sum()

    def compute(self) -> torch.Tensor:
        return self.correct / self.total.clamp(min=1)


def check_synthetic_section(section: Any, name: str) -> None:
    """A synthetic data section names its task (the ``synthetic`` kind's check when a recipe loads)."""
    if not section.task:
        raise RecipeError(f"{name}.task is required for synthetic data (e.g. phop)")


@TOKENIZERS.register("synthetic")
def _task_vocabulary(name: str | None) -> Tokenizer:
    # the task's character vocabulary is built with the task by synthetic_dataloaders, never loaded by name
    raise RecipeError("tokenizer.kind=synthetic needs train_data.kind=synthetic")


def synthetic_dataloaders(recipe: Any, per_device: int, world_size: int, rank: int, pretrained: Any = None) -> Data:
    """:class:`~loopreg.data.Data` for ``train_data.kind: synthetic``: a train stream, one Composer
    ``Evaluator`` per eval variant and the answer exact-match metric (``pretrained``: never set, the recipe
    schema allows ``model.pretrained`` with text data only)."""
    section = recipe.train_data
    try:
        data = TaskData(build_task(section.task, **section.task_kwargs))
    except (ValueError, TypeError) as err:
        raise RecipeError(f"train_data.task_kwargs: {err}") from None
    if data.vocab_size > recipe.model.vocab_size:
        raise RecipeError(f"model.vocab_size={recipe.model.vocab_size} is smaller than the {section.task} vocabulary "
                          f"({data.vocab_size} tokens)")
    collate = lambda items: pad_collate(items, data.pad_id)  # noqa: E731
    train = DataLoader(TrainStream(data, recipe.seed, rank, world_size, per_device), batch_size=per_device,
                       collate_fn=collate, num_workers=section.num_workers)
    eval_section = recipe.eval_data or section
    merged = SimpleNamespace(task=eval_section.task or section.task, eval_size=eval_section.eval_size,
                             task_kwargs={**section.task_kwargs, **eval_section.task_kwargs},
                             eval_variants=eval_section.eval_variants)
    evaluators = task_evaluators(merged, data.tokenizer, recipe.device_eval_batch_size, recipe.seed + 1,
                                 recipe.max_seq_len)
    return Data(train, evaluators, data.tokenizer, {"AnswerExactMatch": AnswerExactMatch()}, data)


def task_evaluators(section: Any, tokenizer: Tokenizer, batch_size: int, seed: int, max_seq_len: int,
                    label: str | None = None, where: str = "eval_data") -> list[Any]:
    """One Composer ``Evaluator`` (cross entropy and answer exact match) per eval variant of a synthetic
    ``section`` (its ``task``, ``task_kwargs``, ``eval_variants`` and ``eval_size``): labelled by the variant
    (``eval`` when there is none), or ``label`` / ``label_<variant>`` when ``label`` is given. A variant whose
    problems are longer than ``max_seq_len`` tokens is a :class:`RecipeError` naming it.

    Example: ``task_evaluators(recipe.eval_data, tokenizer, 250, seed=18, max_seq_len=64)``
    """
    from composer.core import Evaluator
    from composer.utils import dist

    evaluators = []
    for variant, overrides in (section.eval_variants or {None: {}}).items():
        try:
            task = build_task(section.task, **{**section.task_kwargs, **overrides})
        except (ValueError, TypeError) as err:
            raise RecipeError(f"{where}.eval_variants.{variant}: {err}" if variant else f"{where}: {err}") from None
        data = TaskData(task, tokenizer)
        dataset = FixedSet(data, section.eval_size, seed=seed)
        longest = max((len(item["input_ids"]) for item in dataset.items), default=0)
        if longest > max_seq_len:
            raise RecipeError(f"{where}.eval_variants.{variant}: problems of up to {longest} tokens do not fit "
                              f"max_seq_len={max_seq_len}" if variant else
                              f"{where}: problems of up to {longest} tokens do not fit max_seq_len={max_seq_len}")
        collate = functools.partial(pad_collate, pad_id=data.pad_id)
        loader = DataLoader(dataset, batch_size=batch_size, collate_fn=collate,
                            sampler=dist.get_sampler(dataset, shuffle=False))
        name = "_".join(part for part in (label, variant) if part) or "eval"
        evaluators.append(Evaluator(label=name, dataloader=loader,
                                    metric_names=["LanguageCrossEntropy", "AnswerExactMatch"]))
    return evaluators


DATA_KINDS.register("synthetic")(DataKind(check=check_synthetic_section, build=synthetic_dataloaders))
