"""Text pretraining data: Hugging Face ``datasets`` (hub or local files, streaming) → ``tokenizers`` →
packed fixed-length sequences.

    >>> tok = byte_level_tokenizer()
    >>> ds = PackedText(lambda: iter(["hello world"] * 50), tok, seq_len=16)
    >>> next(iter(ds))["input_ids"].shape
    torch.Size([16])

Each rank takes every N-th packed sequence of one shared stream (DataLoader workers take whole batches,
see :mod:`loopreg.data.resumable`), so ``composer -n 2`` with a global batch B sees exactly the
sequences one process sees with batch B, and a checkpoint resumes at the exact sequence.

Registers the data kind ``text`` and the tokenizer kinds ``byte_level``, ``hub``, ``file`` and ``source``.
"""

from __future__ import annotations

import json
from itertools import takewhile
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers

from torch.utils.data import DataLoader

from loopreg.data import DATA_KINDS, TOKENIZERS, Data, DataKind
from loopreg.data.resumable import ResumableStream
from loopreg.errors import DataError, RecipeError, UserError, under_key

__all__ = ["byte_level_tokenizer", "load_tokenizer", "text_tokenizer", "text_stream", "PackedText", "text_dataloaders",
           "EOS_TOKEN"]

EOS_TOKEN = "<|endoftext|>"
_LOCAL_FORMATS = {".txt": "text", ".jsonl": "json", ".json": "json", ".parquet": "parquet"}


def byte_level_tokenizer() -> Tokenizer:
    """A 257-token byte-level tokenizer (256 bytes + end-of-text) that needs no download or training.

    >>> byte_level_tokenizer().get_vocab_size()
    257
    """
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {symbol: index for index, symbol in enumerate(sorted(alphabet))}
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.add_special_tokens([EOS_TOKEN])
    return tokenizer


def load_tokenizer(kind: str, name: str | None = None) -> Tokenizer:
    """The tokenizer of ``tokenizer.kind`` (an entry of ``TOKENIZERS``) and ``tokenizer.name``.

    >>> load_tokenizer("byte_level").get_vocab_size()
    257
    """
    return TOKENIZERS.lookup(kind, "tokenizer.kind")(name)


@TOKENIZERS.register("byte_level")
def _byte_level(name: str | None) -> Tokenizer:
    return byte_level_tokenizer()


@TOKENIZERS.register("hub")
def _hub(name: str | None) -> Tokenizer:
    if not name:
        raise RecipeError("tokenizer.name is required for tokenizer.kind=hub (e.g. EleutherAI/gpt-neox-20b)")
    return Tokenizer.from_pretrained(name)


@TOKENIZERS.register("file")
def _file(name: str | None) -> Tokenizer:
    if not name or not Path(name).is_file():
        raise RecipeError(f"tokenizer file '{name}' not found", key="tokenizer.name")
    return Tokenizer.from_file(name)


@TOKENIZERS.register("source")
def _source(name: str | None) -> Tokenizer:
    # model.pretrained's own tokenizer comes with the model (loopreg.train.load_pretrained)
    raise RecipeError("tokenizer.kind=source is the tokenizer of model.pretrained, which is not set")


def text_tokenizer(tokenizer: Any) -> Tokenizer:
    """The ``tokenizers.Tokenizer`` that packs text for ``tokenizer``: itself, or the backend of a Hugging Face
    fast tokenizer (a pretrained source's own).

    >>> text_tokenizer(byte_level_tokenizer()).get_vocab_size()
    257
    """
    if isinstance(tokenizer, Tokenizer):
        return tokenizer
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if not isinstance(backend, Tokenizer):
        raise UserError(f"tokenizer {type(tokenizer).__name__} is not a fast (tokenizers-backed) tokenizer")
    return backend


def eos_id(tokenizer: Tokenizer) -> int:
    """The end-of-text id of ``tokenizer`` (``<|endoftext|>``, ``</s>`` or ``<eos>``)."""
    for token in (EOS_TOKEN, "</s>", "<eos>", "<|im_end|>"):
        index = tokenizer.token_to_id(token)
        if index is not None:
            return index
    raise UserError("the tokenizer has no end-of-text token (<|endoftext|>, </s> or <eos>)")


def text_stream(source: str, split: str = "train", subset: str | None = None, text_field: str = "text",
                streaming: bool = True) -> Callable[[], Iterator[str]]:
    """A factory of fresh iterators over the documents of ``source``.

    ``source`` is a local file or folder (``.txt`` files are one document each; ``.jsonl``/``.json``/
    ``.parquet`` rows give ``text_field``) or else a Hugging Face hub dataset id. Local ``.txt`` and
    ``.jsonl`` files are read here, line by line, so a bad line raises :class:`DataError` naming it (as does a
    missing source).

    >>> docs = text_stream("corpus/", text_field="text")  # doctest: +SKIP
    """
    path = Path(source)
    if path.exists():
        files = sorted(p for p in (path.rglob("*") if path.is_dir() else [path]) if p.suffix in _LOCAL_FORMATS)
        if not files:
            raise DataError(f"data source '{source}' has no .txt, .jsonl, .json or .parquet files")
        formats = {_LOCAL_FORMATS[p.suffix] for p in files}
        if len(formats) > 1:
            raise DataError(f"data source '{source}' mixes file formats {sorted(formats)}; use one kind per source")
        if files[0].suffix == ".txt":
            return lambda: (file.read_text(encoding="utf-8") for file in files)
        if files[0].suffix == ".jsonl":
            return lambda: (text for file in files for text in _jsonl_texts(file, text_field))
        from datasets import load_dataset

        dataset = load_dataset(formats.pop(), data_files=[str(p) for p in files], split="train", streaming=streaming)
    elif source.startswith((".", "/", "~")) or source.endswith(tuple(_LOCAL_FORMATS)):
        raise DataError(f"data source '{source}' not found")
    else:
        from datasets import load_dataset

        try:
            dataset = load_dataset(source, subset, split=split, streaming=streaming)
        except (OSError, ValueError) as err:  # a hub id that is not there or not reachable; datasets names it
            raise DataError(str(err)) from None

    def documents() -> Iterator[str]:
        for row in dataset:
            if not isinstance(row.get(text_field), str):
                raise DataError(f"data source '{source}': a row has no text field '{text_field}' "
                                f"(fields: {', '.join(sorted(row))})")
            yield row[text_field]

    return documents


def _jsonl_texts(file: Path, text_field: str) -> Iterator[str]:
    with file.open(encoding="utf-8") as lines:
        for number, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line.rstrip("\r\n"))
            except json.JSONDecodeError as err:
                raise DataError(f"{file}:{number}: not valid JSON ({err.msg.removesuffix(' at')} at column "
                                f"{err.colno})") from None
            if not isinstance(row, dict) or not isinstance(row.get(text_field), str):
                fields = ", ".join(sorted(row)) if isinstance(row, dict) else type(row).__name__
                raise DataError(f"{file}:{number}: no text field '{text_field}' (found: {fields})")
            yield row[text_field]


class PackedText(ResumableStream):
    """Infinite stream of ``{"input_ids", "labels"}`` of length ``seq_len`` packed from documents joined by EOS.

    The stream restarts from the first document when the source is exhausted (an epoch of text);
    ``max_sequences`` makes it finite (the first N sequences of the shared stream, for evaluation).
    ``model_shifts_labels=True`` gives Hugging Face's convention, ``labels`` equal to ``input_ids`` (a causal
    LM shifts them inside; each sequence's last input then has no target), for the same sequences.
    Sequences are sharded over ranks and workers by :func:`~loopreg.data.resumable.positions`
    (``batch_size`` is the per-rank DataLoader batch size), and a checkpoint's sample count is the
    resume position: the consumed text is re-read and re-tokenized to find it, but never collated.
    """

    def __init__(self, documents: Callable[[], Iterable[str]], tokenizer: Tokenizer | Any, seq_len: int,
                 rank: int = 0, world_size: int = 1, max_sequences: int | None = None, batch_docs: int = 64,
                 batch_size: int = 1, model_shifts_labels: bool = False) -> None:
        super().__init__(rank, world_size, batch_size)
        self.documents, self.tokenizer, self.seq_len = documents, text_tokenizer(tokenizer), seq_len
        self.batch_docs, self.max_sequences = batch_docs, max_sequences
        self.model_shifts_labels = model_shifts_labels
        self.eos = eos_id(self.tokenizer)

    def __len__(self) -> int:
        """This rank's share of a finite stream (DataLoader needs it to know an eval pass ends)."""
        if self.max_sequences is None:
            raise TypeError("an unbounded PackedText has no length")
        return len(range(self.start + self.rank, self.max_sequences, self.world_size))

    def _token_stream(self) -> Iterator[list[int]]:
        while True:
            batch, produced = [], False
            for doc in self.documents():
                batch.append(doc)
                if len(batch) == self.batch_docs:
                    yield from (e.ids + [self.eos] for e in self.tokenizer.encode_batch(batch))
                    batch, produced = [], True
            if batch:
                yield from (e.ids + [self.eos] for e in self.tokenizer.encode_batch(batch))
            elif not produced:
                raise ValueError("the text source yielded no documents")

    def windows(self) -> Iterator[list[int]]:
        """Every packed sequence of the shared stream: ``seq_len + 1`` tokens, overlapping by one (the last
        target is the next sequence's first input)."""
        buffer: list[int] = []
        for ids in self._token_stream():
            buffer.extend(ids)
            while len(buffer) > self.seq_len:
                yield buffer[: self.seq_len + 1]
                buffer = buffer[self.seq_len:]

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        wanted = self.my_positions()
        if self.max_sequences is not None:
            wanted = takewhile(lambda index: index < self.max_sequences, wanted)
        target = next(wanted, None)
        if target is None:
            return
        for index, window in enumerate(self.windows()):
            if index == target:
                tensor = torch.tensor(window, dtype=torch.long)
                # a copy: HuggingFaceModel shifts an eval batch's labels in place
                labels = tensor[:-1].clone() if self.model_shifts_labels else tensor[1:]
                yield {"input_ids": tensor[:-1], "labels": labels}
                target = next(wanted, None)
                if target is None:
                    return


def check_text_section(section: Any, name: str) -> None:
    """A text data section needs a source (the ``text`` kind's check when a recipe loads)."""
    if not section.source:
        raise RecipeError(f"{name}.source is required for text data (a hub dataset id or a local path)")


def text_dataloaders(recipe: Any, per_device: int, world_size: int, rank: int, pretrained: Any = None) -> Data:
    """:class:`~loopreg.data.Data` for ``train_data.kind: text``: packed train sequences and, with
    ``eval_data``, a fixed eval set, tokenized with ``pretrained``'s tokenizer when given (a
    :class:`loopreg.train.Pretrained`), else with ``tokenizer.kind``'s."""
    if pretrained is not None:
        tokenizer = pretrained.tokenizer
    else:
        tokenizer = load_tokenizer(recipe.tokenizer.kind, recipe.tokenizer.name)
        if tokenizer.get_vocab_size() > recipe.model.vocab_size:
            raise RecipeError(f"model.vocab_size={recipe.model.vocab_size} is smaller than the tokenizer's vocabulary "
                              f"({tokenizer.get_vocab_size()} tokens)")
    shifts_labels = pretrained is not None and pretrained.shifts_labels

    def packed(section_name: str, max_sequences: int | None, batch_size: int) -> PackedText:
        data = getattr(recipe, section_name)
        # missing files; a hub id that is not there or not reachable
        with under_key(f"{section_name}.source", OSError, ValueError, error=DataError):
            docs = text_stream(data.source, data.split, data.subset, data.text_field, data.streaming)
        with under_key("tokenizer", ValueError):  # a source tokenizer without an end-of-text token, or not a fast one
            return PackedText(docs, tokenizer, recipe.max_seq_len, rank=rank, world_size=world_size,
                              max_sequences=max_sequences, batch_size=batch_size, model_shifts_labels=shifts_labels)

    train = DataLoader(packed("train_data", None, per_device), batch_size=per_device,
                       num_workers=recipe.train_data.num_workers)
    evaluation = None
    if recipe.eval_data is not None:
        evaluation = DataLoader(packed("eval_data", recipe.eval_data.eval_size, recipe.device_eval_batch_size),
                                batch_size=recipe.device_eval_batch_size, num_workers=recipe.eval_data.num_workers)
    return Data(train, evaluation, tokenizer)


DATA_KINDS.register("text")(DataKind(check=check_text_section, build=text_dataloaders))
