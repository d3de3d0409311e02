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
from typing import Any, Callable, Iterator

import torch
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException
from torch.utils.data import DataLoader

from loopreg.data import DATA_KINDS, Data, DataKind
from loopreg.data.resumable import ResumableStream
from loopreg.data.synthetic import build_task
from loopreg.data.tasks import AnswerExactMatch, task_evaluators, train_examples
from loopreg.data.text import PackedText, load_tokenizer, text_stream, text_tokenizer
from loopreg.errors import DataError, RecipeError, under_key

__all__ = ["CHUNK", "MixtureStream", "chunk_counts", "mixture_dataloaders"]

CHUNK = 256  # sequences per interleaving chunk: the finest share a weight can get is 1/CHUNK
PACKABLE = ("text", "synthetic")  # source kinds that are documents; mds shards are already packed

Windows = Callable[[], Iterator[list[int]]]  # a fresh iterator over a source's packed windows


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

    >>> windows = {"a": (1.0, lambda: iter([[1, 2, 3]] * 999)), "b": (1.0, lambda: iter([[4, 5, 6]] * 999))}
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
            window = next(itertools.islice(streams[source], skipped, None))
            next_position[source] = position + 1
            tensor = torch.tensor(window, dtype=torch.long)
            yield {"input_ids": tensor[:-1], "labels": tensor[1:]}


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


def _check_problems_fit(source: Any, tokenizer: Any, max_seq_len: int, key: str, sample: int = 256) -> None:
    """The first ``sample`` training problems, each with the end-of-text before and after it, fit a window (a
    longer one met later stops the stream with the same complaint, from ``PackedText.whole_windows``)."""
    task = _task(source, key)
    documents = [example.prompt + example.answer for example in train_examples(task, 0, range(sample))]
    longest = max(len(encoding.ids) for encoding in text_tokenizer(tokenizer).encode_batch(documents))
    if longest + 2 > max_seq_len + 1:
        raise RecipeError(f"{key}.task_kwargs: problems of up to {longest} tokens do not fit max_seq_len="
                          f"{max_seq_len} with their end-of-text markers")


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

    def documents(name: str, source: Any) -> Callable[[], Iterator[str]]:
        key = f"train_data.sources.{name}"
        if source.kind == "text":
            return _text_documents(source, key)
        task = _task(source, key)
        seed = f"{recipe.seed}/{name}"  # each source its own problems
        return lambda: (example.prompt + example.answer for example in train_examples(task, seed, itertools.count()))

    def windows(name: str, source: Any) -> Windows:
        packed = PackedText(documents(name, source), tokenizer, recipe.max_seq_len)
        if source.kind == "text":
            return packed.windows
        _check_problems_fit(source, tokenizer, recipe.max_seq_len, f"train_data.sources.{name}")
        return packed.whole_windows  # a problem cut from its prompt would teach guessing

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
