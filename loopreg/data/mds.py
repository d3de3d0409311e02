"""Pre-tokenized pretraining data in MosaicML Streaming's MDS format: ``loopreg data prepare`` writes it once,
``train_data.kind: mds`` reads it through ``streaming.StreamingDataset`` (local folder or object store, shuffled
independently of the world size, resumed mid-epoch by Composer in seconds).

    >>> stats = prepare_mds("corpus/", "byte_level", seq_len=64, out="data/corpus_byte_64")  # doctest: +SKIP
    >>> stats["sequences"]  # doctest: +SKIP
    1843

The layout of a prepared folder (local or remote):

- MDS shards and ``index.json`` (``streaming.MDSWriter``), one column ``tokens``: ``ndarray:<dtype>:<seq_len>``,
  each sample ``seq_len`` tokens of documents joined by EOS (the remainder of the stream shorter than ``seq_len``
  is dropped, like LLM Foundry's concat-tokens dataset). The dtype is ``uint16`` when the vocabulary fits
  (GPT-NeoX's 50277 tokens do: 2 bytes a token), else ``uint32``; streaming decodes either from ``index.json``;
- ``loopreg_mds.json`` (:data:`METADATA`), written LAST: the format version, the token dtype, ``seq_len``, the
  token, sequence, document and shard counts, the source and the tokenizer's identity (kind, name, vocabulary size,
  EOS id and the sha256 of its serialized form). A folder without it is an interrupted conversion and is refused.

A sample is ``{"input_ids", "labels"}`` like the ``text`` kind: ``labels`` are the next tokens (the last position
has none: :data:`~loopreg.data.IGNORE_INDEX`), or equal to ``input_ids`` for a model that shifts them itself.
Registers the data kind ``mds``.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import sys
import tempfile
import time
from collections import deque
from itertools import islice
from multiprocessing import get_context
from pathlib import Path
from typing import Any, Iterable, Iterator

import numpy as np
import torch
from tokenizers import Tokenizer
from torch.utils.data import DataLoader

from loopreg.data import DATA_KINDS, IGNORE_INDEX, TOKENIZERS, Data, DataKind
from loopreg.data.text import eos_id, text_stream
from loopreg.errors import DataError, RecipeError, UserError, under_key
from loopreg.folders import write_folder

# and MDSTokens (defined on first use, see __getattr__)
__all__ = ["METADATA", "FORMAT_VERSION", "prepare_mds", "parse_tokenizer", "tokenizer_identity", "token_dtype",
           "read_metadata", "is_remote", "streaming_remote", "mds_dataloaders"]

METADATA = "loopreg_mds.json"  # written last: its presence marks a complete conversion
FORMAT_VERSION = 1
COLUMN = "tokens"
_PREPARE_TOKENIZERS = ("byte_level", "file", "hub")  # the tokenizer kinds that name a tokenizer on their own
_DOCS_PER_CHUNK = 256  # documents per tokenization task: fixed, so the output does not depend on --workers


def is_remote(location: str) -> bool:
    """Whether ``location`` is read through a local cache: an object-store URI (s3://, gs://, oci://, ...), or a
    ``file://`` folder (e.g. on a network filesystem) whose shards are copied into the cache.

    >>> is_remote("s3://bucket/pile/train"), is_remote("file:///nfs/pile/train"), is_remote("data/pile/train")
    (True, True, False)
    """
    return "://" in location


def streaming_remote(location: str) -> str:
    """``location`` as streaming names a remote: a ``file://`` URI is the plain path of its folder (streaming
    copies from a path given as ``remote`` as it downloads from a bucket).

    >>> streaming_remote("file:///nfs/pile/train"), streaming_remote("s3://bucket/pile/train")
    ('/nfs/pile/train', 's3://bucket/pile/train')
    """
    return location.removeprefix("file://")


def parse_tokenizer(spec: str) -> tuple[str, str | None]:
    """``byte_level``, ``file:PATH`` or ``hub:NAME`` -> (tokenizer.kind, tokenizer.name).

    >>> parse_tokenizer("hub:EleutherAI/gpt-neox-20b")
    ('hub', 'EleutherAI/gpt-neox-20b')
    """
    kind, _, name = spec.partition(":")
    return kind, name or None


def tokenizer_identity(tokenizer: Tokenizer, kind: str, name: str | None) -> dict[str, Any]:
    """What names a tokenizer in ``loopreg_mds.json``: two tokenizers with the same ``sha256`` (of the serialized
    tokenizer) encode alike, whatever their kind and name.

    >>> from loopreg.data.text import byte_level_tokenizer
    >>> tokenizer_identity(byte_level_tokenizer(), "byte_level", None)["vocab_size"]
    257
    """
    return {"kind": kind, "name": name, "vocab_size": tokenizer.get_vocab_size(), "eos_id": eos_id(tokenizer),
            "sha256": hashlib.sha256(tokenizer.to_str().encode()).hexdigest()}


def _describe(identity: dict[str, Any]) -> str:
    name = identity["kind"] + (f":{identity['name']}" if identity.get("name") else "")
    return f"{name} ({identity['vocab_size']} tokens, sha256 {identity['sha256'][:12]})"


# --- prepare -------------------------------------------------------------------------------------------------

_worker_tokenizer: Tokenizer | None = None
_worker_dtype: np.dtype = np.dtype(np.uint32)


def _init_worker(serialized: str, dtype: str) -> None:
    global _worker_tokenizer, _worker_dtype
    _worker_tokenizer, _worker_dtype = Tokenizer.from_str(serialized), np.dtype(dtype)


def token_dtype(vocab_size: int) -> np.dtype:
    """The smallest unsigned dtype that holds every token id of a ``vocab_size`` vocabulary: what shards store.

    >>> token_dtype(50277), token_dtype(100277)
    (dtype('uint16'), dtype('uint32'))
    """
    return np.dtype(np.uint16 if vocab_size <= np.iinfo(np.uint16).max + 1 else np.uint32)


def _encode_chunk(docs: list[str]) -> np.ndarray:
    """The chunk's documents tokenized, each followed by EOS, as one array of the shards' dtype (numpy raises
    OverflowError on an id that does not fit)."""
    assert _worker_tokenizer is not None
    eos = eos_id(_worker_tokenizer)
    ids = [token for encoding in _worker_tokenizer.encode_batch(docs) for token in (*encoding.ids, eos)]
    return np.asarray(ids, dtype=_worker_dtype)


def _chunks(documents: Iterable[str]) -> Iterator[list[str]]:
    iterator = iter(documents)
    while chunk := list(islice(iterator, _DOCS_PER_CHUNK)):
        yield chunk


def _encoded(documents: Iterable[str], serialized: str, workers: int,
             dtype: str) -> Iterator[tuple[int, np.ndarray]]:
    """(documents, tokens of ``dtype``) per chunk, in document order whatever ``workers`` is. At most
    ``2 · workers`` chunks are in flight (``Pool.imap`` would read the whole source ahead into its task queue)."""
    if workers == 1:
        _init_worker(serialized, dtype)
        for chunk in _chunks(documents):
            yield len(chunk), _encode_chunk(chunk)
        return
    with get_context("spawn").Pool(workers, initializer=_init_worker, initargs=(serialized, dtype)) as pool:
        pending: deque[tuple[int, Any]] = deque()
        for chunk in _chunks(documents):
            pending.append((len(chunk), pool.apply_async(_encode_chunk, (chunk,))))
            if len(pending) >= 2 * workers:
                count, result = pending.popleft()
                yield count, result.get()
        while pending:
            count, result = pending.popleft()
            yield count, result.get()


def _progress(enabled: bool):
    from rich.progress import BarColumn, Progress, ProgressColumn, TextColumn, TimeElapsedColumn
    from rich.text import Text

    class TokensPerSecond(ProgressColumn):
        def render(self, task: Any) -> Text:
            return Text(f"{task.speed or 0:,.0f} tokens/s")

    return Progress(TextColumn("tokenizing"), BarColumn(), TextColumn("{task.completed:,.0f} tokens"),
                    TokensPerSecond(), TimeElapsedColumn(), disable=not enabled, transient=False)


def prepare_mds(source: str, tokenizer: str, seq_len: int, out: str, text_field: str = "text", workers: int = 1,
                compression: str | None = None, max_tokens: int | None = None, split: str = "train",
                subset: str | None = None, progress: bool | None = None) -> dict[str, Any]:
    """Tokenize ``source`` with ``tokenizer`` (``byte_level``, ``file:PATH``, ``hub:NAME``) in ``workers`` processes,
    pack it into ``seq_len``-token sequences and write them as MDS shards to ``out`` (a folder or a remote URI);
    returns the metadata written to ``loopreg_mds.json``. ``max_tokens`` stops after that many tokens (whole
    sequences). A local ``out`` appears whole or not at all; a remote one gets ``loopreg_mds.json`` last.

    >>> prepare_mds("corpus/", "byte_level", 64, "data/corpus_byte_64", workers=4)["seq_len"]  # doctest: +SKIP
    64
    """
    if seq_len < 1:
        raise UserError(f"--seq-len must be >= 1, got {seq_len}")
    if workers < 1:
        raise UserError(f"--workers must be >= 1, got {workers}")
    if max_tokens is not None and max_tokens < seq_len:
        raise UserError(f"--max-tokens={max_tokens} is less than one sequence of --seq-len={seq_len} tokens")
    out = streaming_remote(out)  # a file:// URI is a local folder here
    kind, name = parse_tokenizer(tokenizer)
    if kind not in _PREPARE_TOKENIZERS:
        raise UserError(f"--tokenizer {tokenizer}: unknown tokenizer kind '{kind}'; use byte_level, "
                        "file:PATH/tokenizer.json or hub:NAME")
    try:
        loaded = TOKENIZERS.lookup(kind, "--tokenizer")(name)
        identity = tokenizer_identity(loaded, kind, name)
    except (UserError, OSError, ValueError) as err:  # a missing file, a hub id that is not there
        message = err.message if isinstance(err, UserError) else str(err).splitlines()[0]
        raise UserError(f"--tokenizer {tokenizer}: {message}") from None
    with under_key("SRC", OSError, ValueError, error=DataError):
        documents = text_stream(source, split, subset, text_field)()
    dtype = token_dtype(identity["vocab_size"])
    meta: dict[str, Any] = {"format": "loopreg-mds", "version": FORMAT_VERSION, "column": COLUMN, "dtype": dtype.name,
                            "seq_len": seq_len, "tokenizer": identity, "source": source, "split": split,
                            "subset": subset, "text_field": text_field, "compression": compression}
    show = sys.stderr.isatty() if progress is None else progress
    limit = None if max_tokens is None else max_tokens // seq_len

    from streaming import MDSWriter
    from streaming.base.compression import get_compressions, is_compression

    if compression is not None and not is_compression(compression):
        families = sorted(name for name in get_compressions() if ":" not in name)
        raise UserError(f"--compression {compression}: unknown; valid: {', '.join(families)} (or with a level: zstd:7)")

    def write(target: str) -> None:  # the shards and index.json (MDSWriter uploads them to a remote target)
        with under_key("--out", OSError, ValueError):  # an unreachable bucket, missing credentials
            writer = MDSWriter(columns={COLUMN: f"ndarray:{dtype.name}:{seq_len}"}, out=target, compression=compression,
                               hashes=["sha1"], exist_ok=False)
        buffer = np.empty(0, dtype=dtype)
        sequences = documents_read = tokens_read = 0
        with writer, _progress(show) as bar:
            task = bar.add_task("tokenizing", total=None)
            for count, tokens in _encoded(documents, loaded.to_str(), workers, dtype.name):
                documents_read += count
                tokens_read += len(tokens)
                buffer = np.concatenate([buffer, tokens])
                whole = len(buffer) // seq_len
                if limit is not None:
                    whole = min(whole, limit - sequences)
                for row in buffer[: whole * seq_len].reshape(whole, seq_len):
                    writer.write({COLUMN: row})
                buffer, sequences = buffer[whole * seq_len:], sequences + whole
                bar.update(task, advance=len(tokens))
                if limit is not None and sequences >= limit:
                    break
        if sequences == 0:
            raise DataError(f"SRC '{source}' gave {tokens_read} tokens: not one sequence of --seq-len={seq_len}")
        meta.update(tokens=sequences * seq_len, sequences=sequences, documents=documents_read,
                    shards=len(writer.shards))

    if is_remote(out):
        from streaming.base.storage.upload import CloudUploader

        write(out)
        with tempfile.TemporaryDirectory(prefix="loopreg_mds_") as local, under_key("--out", OSError, ValueError):
            uploader = CloudUploader.get(out=(local, out), keep_local=True, exist_ok=True)
            _write_metadata(Path(local), meta)
            uploader.upload_file(METADATA)  # last: the marker of a complete conversion
    else:
        folder = Path(out)
        if folder.exists() and any(folder.iterdir()) and not (folder / METADATA).is_file():
            raise UserError(f"--out '{out}' exists and is not a folder `loopreg data prepare` wrote; "
                            "choose another folder")

        def write_local(staging: Path) -> None:
            write(str(staging))
            _write_metadata(staging, meta)

        write_folder(folder, write_local)
    return meta


def _write_metadata(folder: Path, meta: dict[str, Any]) -> None:
    partial = folder / f".{METADATA}.partial"
    partial.write_text(json.dumps(meta, indent=1, sort_keys=True) + "\n")
    os.replace(partial, folder / METADATA)


# --- read ----------------------------------------------------------------------------------------------------

def read_metadata(source: str, local: str | None = None, where: str = "source") -> dict[str, Any]:
    """The ``loopreg_mds.json`` of a prepared folder (downloaded into ``local`` for a remote ``source``); a missing
    folder, an interrupted conversion or an unreadable file is a one-line :class:`DataError` naming ``source``."""
    if is_remote(source):
        from streaming.base.storage import CloudDownloader

        if not local:
            raise RecipeError(f"{where}: a remote source '{source}' needs a local cache folder ({where[:-7]}.local)")
        path = Path(local) / METADATA
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            remote = streaming_remote(source)
            CloudDownloader.get(remote).download(f"{remote.rstrip('/')}/{METADATA}", str(path))
        except Exception as err:  # each object store raises its own types
            raise DataError(f"{where}: cannot read '{source}/{METADATA}': {str(err).splitlines()[0]}") from None
    else:
        folder = Path(source)
        if not folder.is_dir():
            raise DataError(f"{where}: MDS folder '{source}' not found")
        if not (folder / "index.json").is_file():
            raise DataError(f"{where}: '{source}' has no MDS index (index.json): not a folder "
                            "`loopreg data prepare` wrote")
        path = folder / METADATA
        if not path.is_file():
            raise DataError(f"{where}: '{source}' has no {METADATA}: an interrupted `loopreg data prepare`, "
                            "or shards another tool wrote")
    try:
        meta = json.loads(path.read_text())
        if meta.get("format") != "loopreg-mds" or not isinstance(meta.get("tokenizer"), dict):
            raise ValueError("not loopreg MDS metadata")
    except ValueError as err:
        raise DataError(f"{where}: '{source}/{METADATA}' is unreadable ({err})") from None
    return meta


def validate_shards(source: str, algorithm: str, where: str = "source") -> None:
    """Check every shard file of the local folder ``source`` against the hash ``index.json`` records (streaming
    checks downloaded shards itself); a mismatch is a one-line :class:`DataError` naming the shard."""
    from streaming.base.hashing import get_hash

    folder = Path(source)
    for shard in json.loads((folder / "index.json").read_text())["shards"]:
        info = shard.get("zip_data") or shard["raw_data"]
        path = folder / info["basename"]
        if not path.is_file() and shard.get("zip_data"):
            info = shard["raw_data"]
            path = folder / info["basename"]
        if algorithm not in info.get("hashes", {}):
            raise DataError(f"{where}: '{source}' has no {algorithm} hashes (its shards record "
                            f"{sorted(info.get('hashes', {})) or 'none'})")
        if not path.is_file():
            raise DataError(f"{where}: shard '{path}' is missing")
        if get_hash(algorithm, path.read_bytes()) != info["hashes"][algorithm]:
            raise DataError(f"{where}: shard '{path}' is corrupt ({algorithm} does not match index.json)")


def _download_failure(error: BaseException, remote: str, key: str | None) -> DataError:
    """The one line for a shard that streaming could not bring into the cache. A copy that failed its hash check
    is removed: streaming would take a cached file for a good one on the next start."""
    message = str(error).splitlines()[0] if str(error) else type(error).__name__
    if message.startswith("Checksum failure: "):
        cached = Path(message.removeprefix("Checksum failure: "))
        cached.unlink(missing_ok=True)
        return DataError(f"shard '{cached.name}' of '{remote}' is corrupt: its hash does not match index.json "
                         f"(the copy in {cached.parent} is removed)", key=key)
    return DataError(f"cannot bring a shard of '{remote}' into the cache: {message}", key=key)


@functools.cache
def mds_tokens_class() -> type:
    """:class:`MDSTokens`, defined on the first call (it imports streaming)."""
    from streaming import StreamingDataset

    class MDSTokens(StreamingDataset):
        """The ``tokens`` samples of a prepared folder as ``{"input_ids", "labels"}`` (LongTensors of ``seq_len``).

        Every keyword argument but ``model_shifts_labels`` and ``source_key`` is :class:`streaming.StreamingDataset`'s
        (``local``, ``remote``, ``batch_size`` = the per-device batch, ``shuffle``, ``shuffle_seed``,
        ``num_canonical_nodes``, ``cache_limit``, ...). A shard that fails to download or its hash check ends the
        iteration with a one-line :class:`~loopreg.errors.DataError` under ``source_key`` (streaming itself only
        logs it from its download thread and stops the epoch early).

        >>> MDSTokens(local="data/corpus_byte_64", batch_size=8)[0]["input_ids"].shape  # doctest: +SKIP
        torch.Size([64])
        """

        def __init__(self, *, model_shifts_labels: bool = False, source_key: str | None = None,
                     **kwargs: Any) -> None:
            super().__init__(**kwargs)
            self.model_shifts_labels = model_shifts_labels
            self.source_key = source_key
            self.download_error: BaseException | None = None

        def prepare_shard(self, shard_id: int, blocking: bool = True) -> None:
            try:
                super().prepare_shard(shard_id, blocking)
            except Exception as error:
                from streaming.base.dataset import _ShardState

                failure = _download_failure(error, self.streams[0].remote or self.streams[0].local, self.source_key)
                # streaming leaves the shard PREPARING, and every other worker and rank waits for it forever;
                # LOCAL without its file (removed above: not before) sends each to fetch and check it itself.
                self._shard_states[shard_id] = _ShardState.LOCAL
                raise failure from None

        def on_exception(self, future: Any) -> None:
            # streaming's callback re-raises its thread's error, where concurrent.futures only logs it: keep it for
            # __iter__, and set the event that stops streaming's threads and its yield loop.
            if (error := future.exception()) is not None:
                self.download_error = self.download_error or error
                self._event.set()
                # A thread that died by an exception never counts itself out (its it.on_exit() is not reached), so
                # streaming's end-of-epoch it.exit() would wait for it forever: count it out here.
                self._iterator.on_exit()

        def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
            try:
                yield from super().__iter__()
            except DataError:  # prepare_shard's, in this thread: stop streaming's threads too (they would spin on)
                self._event.set()
                raise
            except RuntimeError:  # "Background thread failed": streaming's word for download_error
                if self.download_error is None:
                    raise
            if self.download_error is not None:  # the epoch ended early
                raise self.download_error

        def __getitem__(self, index: int) -> dict[str, torch.Tensor]:  # type: ignore[override]
            tokens = torch.from_numpy(super().__getitem__(index)[COLUMN].astype(np.int64))
            if self.model_shifts_labels:
                labels = tokens.clone()
            else:  # the next token; the last position's is in the next sample, so it has no loss
                labels = torch.cat([tokens[1:], torch.tensor([IGNORE_INDEX])])
            return {"input_ids": tokens, "labels": labels}

    MDSTokens.__module__, MDSTokens.__qualname__ = __name__, "MDSTokens"  # picklable as loopreg.data.mds.MDSTokens
    return MDSTokens


def __getattr__(name: str) -> Any:
    # MDSTokens subclasses streaming.StreamingDataset, so it is defined on first use: loading any recipe imports
    # every data kind, and importing streaming costs seconds (it pulls in its text and multimodal readers).
    if name == "MDSTokens":
        return mds_tokens_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _registered(options: dict[str, Any], attempts: int = 20) -> Any:
    """An :class:`MDSTokens`; runs that start at once on one machine can race for the same shared-memory name
    (streaming raises FileExistsError in the loser), so the loser takes the next free one."""
    for attempt in range(attempts):
        try:
            return mds_tokens_class()(**options)
        except FileExistsError:
            if attempt == attempts - 1:
                raise
            time.sleep(0.05 * (attempt + 1))  # the winner has registered its name by then


def _cache_limit(value: str | None, key: str) -> int | None:
    """``cache_limit`` in bytes (streaming's notation: 10gb, 500mb, 1073741824); checked for every source, used
    for a remote one (a local source is no cache: nothing is evicted from it)."""
    if value is None:
        return None
    from streaming.base.util import bytes_to_int

    with under_key(key, ValueError):
        limit = bytes_to_int(value)
    if limit <= 0:
        raise RecipeError(f"must be a positive size such as 10gb, got '{value}'", key=key)
    return limit


def check_mds_section(section: Any, name: str) -> None:
    """An MDS data section needs a source, and a local cache folder when the source is remote."""
    if not section.source:
        raise RecipeError(f"{name}.source is required for mds data (a folder or remote URI `loopreg data prepare` "
                          "wrote)")
    if is_remote(section.source) and not section.local:
        raise RecipeError(f"{name}.local is required for a remote mds source ({section.source}): the folder that "
                          "caches its shards")


def _check_fits(meta: dict[str, Any], recipe: Any, identity: dict[str, Any], section_name: str) -> None:
    source = getattr(recipe, section_name).source
    if meta["seq_len"] != recipe.max_seq_len:
        raise DataError(f"{section_name}.source: shards in '{source}' have seq_len={meta['seq_len']}, the recipe's "
                        f"max_seq_len={recipe.max_seq_len}")
    if meta["tokenizer"].get("sha256") != identity["sha256"]:
        raise DataError(f"{section_name}.source: shards in '{source}' were tokenized with tokenizer="
                        f"{_describe(meta['tokenizer'])}, the recipe's tokenizer is {_describe(identity)}")


def mds_dataloaders(recipe: Any, per_device: int, world_size: int, rank: int, pretrained: Any = None) -> Data:
    """:class:`~loopreg.data.Data` for ``train_data.kind: mds``: the prepared train folder, shuffled with the
    recipe's seed, and with ``eval_data`` (also ``mds``) the first ``eval_size`` sequences of its folder, in order.
    Ranks and workers split the samples through streaming (its environment: ``RANK``, ``WORLD_SIZE``, ...)."""
    from loopreg.data.text import load_tokenizer

    tokenizer = load_tokenizer(recipe.tokenizer.kind, recipe.tokenizer.name)
    if tokenizer.get_vocab_size() > recipe.model.vocab_size:
        raise RecipeError(f"model.vocab_size={recipe.model.vocab_size} is smaller than the tokenizer's vocabulary "
                          f"({tokenizer.get_vocab_size()} tokens)")
    with under_key("tokenizer", ValueError):
        identity = tokenizer_identity(tokenizer, recipe.tokenizer.kind, recipe.tokenizer.name)
    if recipe.eval_data is not None and recipe.eval_data.kind != "mds":
        raise RecipeError(f"eval_data.kind={recipe.eval_data.kind} with train_data.kind=mds: the eval data is read "
                          "the same way, set eval_data.kind=mds (a folder `loopreg data prepare` wrote)")

    def dataset(section_name: str, train: bool, batch_size: int) -> Any:  # an MDSTokens
        section = getattr(recipe, section_name)
        meta = read_metadata(section.source, section.local, f"{section_name}.source")
        _check_fits(meta, recipe, identity, section_name)
        remote = is_remote(section.source)
        if section.validate_hash and not remote:
            validate_shards(section.source, section.validate_hash, f"{section_name}.source")
        epoch_size = None if train or section.eval_size >= meta["sequences"] else section.eval_size
        cache_limit = _cache_limit(section.cache_limit, f"{section_name}.cache_limit")
        options = dict(remote=streaming_remote(section.source) if remote else None,
                       local=section.local if remote else section.source, batch_size=batch_size,
                       shuffle=train and section.shuffle, shuffle_seed=recipe.seed,
                       num_canonical_nodes=section.num_canonical_nodes, predownload=section.predownload,
                       validate_hash=section.validate_hash if remote else None, epoch_size=epoch_size,
                       cache_limit=cache_limit if remote else None, source_key=f"{section_name}.source",
                       model_shifts_labels=pretrained is not None and pretrained.shifts_labels)
        with under_key(section_name, ValueError):
            try:
                return _registered(options)
            except ValueError as err:
                if "cache_limit" in str(err):  # below four shards, or below the index files
                    raise RecipeError(str(err).splitlines()[0], key=f"{section_name}.cache_limit") from None
                if "Reused local directory" not in str(err):
                    raise
            # A remote source's cache folder is registered in shared memory that a killed run left behind (a
            # local source is never checked): streaming's remedy, then one more try.
            from streaming.base.util import clean_stale_shared_memory

            clean_stale_shared_memory()
            return _registered(options)

    train = DataLoader(dataset("train_data", True, per_device), batch_size=per_device,
                       num_workers=recipe.train_data.num_workers)
    evaluation = None
    if recipe.eval_data is not None:
        evaluation = DataLoader(dataset("eval_data", False, recipe.device_eval_batch_size),
                                batch_size=recipe.device_eval_batch_size, num_workers=recipe.eval_data.num_workers)
    return Data(train, evaluation, tokenizer)


DATA_KINDS.register("mds")(DataKind(check=check_mds_section, build=mds_dataloaders))
