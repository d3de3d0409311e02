"""Pretraining mixtures: named sources with weights packed into one stream (``train_data.kind: mixture``).

Each source is a data section of its own: ``text`` (documents) or ``synthetic`` (problems written out as
``prompt + answer`` documents), packed by the recipe's tokenizer into ``max_seq_len`` windows with an
end-of-text between documents. Global sequence i comes from one source by a fixed interleaving: every chunk
of :data:`CHUNK` sequences holds each source's share (largest remainder of ``CHUNK · weight``) in an order
shuffled by ``(seed, chunk)``, so where i falls inside its source is computed, not counted. That keeps the
stream's contract (:mod:`loopreg.data.resumable`): N ranks see exactly one process's global batches and a
checkpoint's sample count is the exact resume position.

    train_data:
      kind: mixture
      sources:
        wiki: {weight: 2, kind: text, source: ../shared/textdata/wiki_passages_train.jsonl}
        vars: {weight: 1, kind: synthetic, task: primitives, task_kwargs: {depth: [1, 2, 3], num_variables: 4}}

An ``eval_data`` of kind mixture gives one Composer evaluator per source: a text source scores cross
entropy and perplexity (label ``wiki``), a synthetic one the answer exact match of each eval variant
(label ``vars`` or ``vars_<variant>``), its task knobs over those of the train source of its name and task.

Registers the data kind ``mixture``.
"""

from __future__ import annotations

import dataclasses
import itertools
import random
from typing import Any, Callable, Iterable, Iterator

import torch
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException
from torch.utils.data import DataLoader

from loopreg.data import DATA_KINDS, IGNORE_INDEX, Data, DataKind
from loopreg.data.resumable import ResumableStream
from loopreg.data.synthetic import Example, build_task
from loopreg.data.tasks import AnswerExactMatch, TaskData, task_evaluators, train_examples
from loopreg.data.text import PackedText, load_tokenizer, text_stream, text_tokenizer
from loopreg.errors import DataError, RecipeError, under_key

__all__ = ["CHUNK", "TARGETS", "MixtureStream", "chunk_counts", "mixture_dataloaders", "problem_windows",
           "text_windows"]

CHUNK = 256  # sequences per interleaving chunk: the finest share a weight can get is 1/CHUNK
PACKABLE = ("text", "synthetic")  # source kinds that are documents; mds shards are already packed
TARGETS = ("all", "answers")  # which tokens of a synthetic source's problems are trained on

Window = tuple[list[int], list[int]]  # (input ids, labels) of one packed sequence
Windows = Callable[[], Iterator[Window]]  # a fresh iterator over a source's packed windows


def chunk_counts(weights: list[float], chunk: int = CHUNK) -> list[int]:
    """Each source's sequences per chunk: ``chunk · weight / Σ weights``, rounded by largest remainder.

    >>> chunk_counts([2, 1, 1], 256)
    [128, 64, 64]
    """
    total = sum(weights)
    exact = [chunk * weight / total for weight in weights]
    counts = [int(share) for share in exact]
    by_remainder = sorted(range(len(weights)), key=lambda s: exact[s] - counts[s], reverse=True)
    for source in by_remainder[: chunk - sum(counts)]:
        counts[source] += 1
    return counts


class MixtureStream(ResumableStream):
    """Packed training windows drawn from named sources in proportion to their weights.

    >>> a, b = [([1, 2], [2, 3])] * 999, [([4, 5], [5, 6])] * 999  # (inputs, labels) windows
    >>> windows = {"a": (1.0, lambda: iter(a)), "b": (1.0, lambda: iter(b))}
    >>> next(iter(MixtureStream(windows, seed=0)))["input_ids"].tolist() in ([1, 2], [4, 5])
    True
    """

    def __init__(self, sources: dict[str, tuple[float, Windows]], seed: int | str, rank: int = 0,
                 world_size: int = 1, batch_size: int = 1) -> None:
        super().__init__(rank, world_size, batch_size)
        self.names = list(sources)
        self.windows = [sources[name][1] for name in self.names]
        self.counts = chunk_counts([sources[name][0] for name in self.names])
        self.seed = seed
        self._chunk: tuple[int, list[int], list[int]] = (-1, [], [])  # the last chunk located, laid out

    def chunk_order(self, chunk: int) -> list[int]:
        """The source of each sequence of ``chunk``, shuffled by ``(seed, chunk)``."""
        order = [source for source, count in enumerate(self.counts) for _ in range(count)]
        random.Random(f"{self.seed}/mixture/{chunk}").shuffle(order)
        return order

    def locate(self, index: int) -> tuple[int, int]:
        """``(source, position inside that source's windows)`` of global sequence ``index``.

        >>> MixtureStream({"a": (1.0, iter), "b": (3.0, iter)}, seed=0).locate(256)[1] in (64, 192)
        True
        """
        chunk, offset = divmod(index, CHUNK)
        if self._chunk[0] != chunk:  # positions only increase: each chunk is laid out once
            order, seen, rank_in_source = self.chunk_order(chunk), [0] * len(self.counts), []
            for source in order:
                rank_in_source.append(seen[source])
                seen[source] += 1
            self._chunk = (chunk, order, rank_in_source)
        _, order, rank_in_source = self._chunk
        source = order[offset]
        return source, chunk * self.counts[source] + rank_in_source[offset]

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        streams: list[Iterator[list[int]] | None] = [None] * len(self.names)
        next_position = [0] * len(self.names)
        for index in self.my_positions():
            source, position = self.locate(index)
            if streams[source] is None:
                streams[source] = self.windows[source]()
            skipped = position - next_position[source]  # windows of this source other ranks or workers take
            inputs, labels = next(itertools.islice(streams[source], skipped, None))
            next_position[source] = position + 1
            yield {"input_ids": torch.tensor(inputs, dtype=torch.long),
                   "labels": torch.tensor(labels, dtype=torch.long)}


def text_windows(packed: PackedText) -> Windows:
    """A text source's windows: the packed sequences, each as (inputs, the next tokens).

    Example: ``MixtureStream({"wiki": (1.0, text_windows(PackedText(documents, tokenizer, 64)))}, seed=0)``
    """
    return lambda: ((window[:-1], window[1:]) for window in packed.windows())


def problem_windows(data: TaskData, examples: Iterable[Example], seq_len: int,
                    targets: str = "all") -> Iterator[Window]:
    """Windows of ``seq_len`` (input ids, labels) that hold whole problems only, each encoded as evaluation
    encodes it (end-of-text, prompt, answer; the answer and its end-of-text are the targets), as many as fit,
    then end-of-text to the end. ``targets="all"`` trains on every token, prompt and filler included (a
    problem as a document of text); ``"answers"`` on the answers only: a random prompt has nothing to learn,
    and its tokens would outnumber the answer's tenfold in the loss.

    >>> from loopreg.data.text import byte_level_tokenizer
    >>> data = TaskData(build_task("addition", n_operands=2, digits=1), byte_level_tokenizer())
    >>> inputs, labels = next(problem_windows(data, [Example("1+2=", "3")] * 3, seq_len=14, targets="answers"))
    >>> len(inputs), [label for label in labels if label != -100]  # two problems fit: "3" (18), end-of-text
    (14, [18, 256, 18, 256])
    """
    inputs: list[int] = []
    labels: list[int] = []
    for example in examples:
        item = data.encode(example)
        ids = item["input_ids"].tolist()
        if len(ids) > seq_len:
            raise ValueError(f"a problem of {len(ids)} tokens with its end-of-text markers does not fit in a "
                             f"window of {seq_len} tokens")
        if len(inputs) + len(ids) > seq_len:
            filler = seq_len - len(inputs)
            yield inputs + [data.eos_id] * filler, labels + [data.eos_id if targets == "all" else IGNORE_INDEX] * filler
            inputs, labels = [], []
        inputs += ids
        labels += ids[1:] + [data.eos_id] if targets == "all" else item["labels"].tolist()


def _sources(section: Any, where: str) -> dict[str, Any]:
    """The ``sources`` of a mixture section, each checked as a data section of its own kind (the schema of
    ``section`` itself, so this module needs no import of the recipe's)."""
    schema = OmegaConf.get_type(section) if OmegaConf.is_config(section) else type(section)
    if not any(raw is not None for raw in (section.sources or {}).values()):
        raise RecipeError(f"{where}.sources is required for a mixture (name: a text or synthetic data section "
                          "with a weight)")
    sources = {}
    for name, raw in section.sources.items():
        if raw is None:  # a source set to null is off (how an override drops one of a recipe's sources)
            continue
        key = f"{where}.sources.{name}"
        try:
            source = OmegaConf.merge(OmegaConf.structured(schema), raw)
        except OmegaConfBaseException as err:  # an unknown key or a value of the wrong type
            raise RecipeError(f"{key}: {str(err).splitlines()[0]}") from None
        if source.kind not in PACKABLE:
            raise RecipeError(f"{key}.kind={source.kind}: a mixture source is one of {', '.join(PACKABLE)}")
        if not source.weight > 0:
            raise RecipeError(f"{key}.weight must be > 0, got {source.weight}")
        if source.targets not in TARGETS or (source.kind == "text" and source.targets != "all"):
            allowed = TARGETS if source.kind == "synthetic" else ("all",)
            raise RecipeError(f"{key}.targets={source.targets}: a {source.kind} source trains on "
                              f"{' or '.join(allowed)}")
        DATA_KINDS.lookup(source.kind, f"{key}.kind").check(source, key)
        sources[name] = source
    return sources


def check_mixture_section(section: Any, where: str) -> None:
    """Every source of a mixture is a text or synthetic section with a positive weight, and each gets at
    least one sequence per chunk (the ``mixture`` kind's check when a recipe loads)."""
    sources = _sources(section, where)
    if where == "train_data":
        counts = chunk_counts([source.weight for source in sources.values()])
        starved = [name for name, count in zip(sources, counts) if count == 0]
        if starved:
            raise RecipeError(f"{where}.sources.{starved[0]}.weight is below 1/{CHUNK} of the total: the source "
                              "would never be drawn")


def _text_documents(source: Any, key: str) -> Callable[[], Iterator[str]]:
    with under_key(f"{key}.source", OSError, ValueError, error=DataError):  # a missing file, an unreachable hub id
        return text_stream(source.source, source.split, source.subset, source.text_field, source.streaming)


def _task(source: Any, key: str) -> Any:
    with under_key(f"{key}.task_kwargs", ValueError, TypeError):
        task = build_task(source.task, **source.task_kwargs)
    if task.sample(random.Random(0)).position_labels is not None:
        raise RecipeError(f"{key}.task_kwargs: {source.task} labels every position; in a mixture a problem is a "
                          "prompt + answer document (set per_position_labels: false)")
    return task


def _check_problems_fit(data: TaskData, max_seq_len: int, key: str, sample: int = 256) -> None:
    """The first ``sample`` training problems fit a window (a longer one met later stops the stream with the
    same complaint, from :func:`problem_windows`)."""
    longest = max(len(data.encode(example)["input_ids"]) for example in train_examples(data.task, 0, range(sample)))
    if longest > max_seq_len:
        raise RecipeError(f"{key}.task_kwargs: problems of up to {longest} tokens with their end-of-text markers do "
                          f"not fit max_seq_len={max_seq_len}")


def mixture_dataloaders(recipe: Any, per_device: int, world_size: int, rank: int, pretrained: Any = None) -> Data:
    """:class:`~loopreg.data.Data` for ``train_data.kind: mixture``: one packed stream of weighted sources
    and, with an ``eval_data`` of kind mixture, one evaluator per source, all in ``tokenizer.kind``'s tokens
    (``pretrained``: never set, the recipe schema allows ``model.pretrained`` with text data only)."""
    from composer.core import Evaluator

    if recipe.tokenizer.kind == "synthetic":
        raise RecipeError("tokenizer.kind=synthetic is one task's vocabulary; a mixture needs a text tokenizer "
                          "(e.g. byte_level)")
    tokenizer = load_tokenizer(recipe.tokenizer.kind, recipe.tokenizer.name)
    if tokenizer.get_vocab_size() > recipe.model.vocab_size:
        raise RecipeError(f"model.vocab_size={recipe.model.vocab_size} is smaller than the tokenizer's vocabulary "
                          f"({tokenizer.get_vocab_size()} tokens)")
    train_sources = _sources(recipe.train_data, "train_data")

    def windows(name: str, source: Any) -> Windows:
        key = f"train_data.sources.{name}"
        if source.kind == "text":
            return text_windows(PackedText(_text_documents(source, key), tokenizer, recipe.max_seq_len))
        data = TaskData(_task(source, key), text_tokenizer(tokenizer))
        _check_problems_fit(data, recipe.max_seq_len, key)
        seed = f"{recipe.seed}/{name}"  # each source its own problems
        # whole problems only: a problem cut from its prompt would teach guessing
        return lambda: problem_windows(data, train_examples(data.task, seed, itertools.count()), recipe.max_seq_len,
                                       source.targets)

    packed = {name: (source.weight, windows(name, source)) for name, source in train_sources.items()}
    train = DataLoader(MixtureStream(packed, recipe.seed, rank, world_size, per_device), batch_size=per_device,
                       num_workers=recipe.train_data.num_workers)
    if recipe.eval_data is None:
        return Data(train, None, tokenizer)
    if recipe.eval_data.kind != "mixture":
        raise RecipeError(f"eval_data.kind={recipe.eval_data.kind} with a mixture: use eval_data.kind=mixture "
                          "(one evaluator per source)")
    evaluators = []
    for name, source in _sources(recipe.eval_data, "eval_data").items():
        key = f"eval_data.sources.{name}"
        if source.kind == "text":
            windows = PackedText(_text_documents(source, key), tokenizer, recipe.max_seq_len, rank=rank,
                                 world_size=world_size, max_sequences=source.eval_size,
                                 batch_size=recipe.device_eval_batch_size)
            loader = DataLoader(windows, batch_size=recipe.device_eval_batch_size)
            evaluators.append(Evaluator(label=name, dataloader=loader,
                                        metric_names=["LanguageCrossEntropy", "LanguagePerplexity"]))
            continue
        trained = train_sources.get(name)
        if trained is not None and trained.task == source.task:  # the eval source refines the train source's knobs
            source = dataclasses.replace(OmegaConf.to_object(source),
                                         task_kwargs={**trained.task_kwargs, **source.task_kwargs})
        _task(source, key)
        evaluators += task_evaluators(source, tokenizer, recipe.device_eval_batch_size, recipe.seed + 1,
                                      recipe.max_seq_len, label=name, where=key)
    return Data(train, evaluators, tokenizer, {"AnswerExactMatch": AnswerExactMatch()})


DATA_KINDS.register("mixture")(DataKind(check=check_mixture_section, build=mixture_dataloaders))
