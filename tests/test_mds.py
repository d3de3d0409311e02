"""MDS data (issue #15): ``loopreg data prepare`` writes shards whose metadata marks a complete conversion,
``train_data.kind: mds`` trains on them, ``composer -n 2`` follows the one-process loss curve, a SIGKILLed run
resumes bitwise identical, and bad inputs are one line, exit 2.

The two-rank side is this module run by the launcher (``composer -n 2 -m tests.test_mds SPEC.json``)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from loopreg.config import load_recipe
from loopreg.data import IGNORE_INDEX
from loopreg.data.mds import METADATA, MDSTokens, prepare_mds
from loopreg.data.text import byte_level_tokenizer
from loopreg.train import build_trainer

from .conftest import REPO, free_port, run_cli, run_launcher, tiny_overrides

pytestmark = pytest.mark.usefixtures("single_thread")

TEXTDATA = REPO.parent / "shared" / "textdata"
SEQ_LEN = 64
RECIPE = "recipes/cpu_tiny_text.yaml"
TINY = ["model.d_model=32", "model.n_heads=2", "model.d_ff=64", "export_folder=null", "progress_bar=false"]


def _prepare(out: Path, file: str, sequences: int, **kwargs) -> dict:
    return prepare_mds(str(TEXTDATA / file), "byte_level", SEQ_LEN, str(out), max_tokens=sequences * SEQ_LEN,
                       progress=False, **kwargs)


@pytest.fixture(scope="module")
def shards(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """2000 train and 200 validation sequences of 64 byte-level tokens from the shared Wikipedia passages."""
    folder = tmp_path_factory.mktemp("mds")
    _prepare(folder / "train", "wiki_passages_train.jsonl", 2000)
    _prepare(folder / "validation", "wiki_passages_heldout.jsonl", 200)
    return folder


def mds(folder: Path) -> list[str]:
    return ["train_data.kind=mds", f"train_data.source={folder}/train", "eval_data.kind=mds",
            f"eval_data.source={folder}/validation", "eval_data.eval_size=16"]


def test_prepare_packs_documents_with_eos_and_records_what_it_wrote(shards: Path):
    meta = json.loads((shards / "train" / METADATA).read_text())
    index = json.loads((shards / "train" / "index.json").read_text())
    assert (meta["sequences"], meta["tokens"], meta["seq_len"]) == (2000, 2000 * SEQ_LEN, SEQ_LEN)
    assert meta["shards"] == len(index["shards"]) and sum(s["samples"] for s in index["shards"]) == 2000
    assert index["shards"][0]["column_names"] == ["tokens"]
    assert index["shards"][0]["column_encodings"] == [f"ndarray:uint16:{SEQ_LEN}"] and meta["dtype"] == "uint16"
    tokenizer = byte_level_tokenizer()
    assert meta["tokenizer"]["kind"] == "byte_level" and meta["tokenizer"]["vocab_size"] == 257
    assert meta["tokenizer"]["eos_id"] == 256
    # The stream is the documents, in order, each followed by EOS, cut into 64-token rows.
    documents = [json.loads(line)["text"] for line in (TEXTDATA / "wiki_passages_train.jsonl").open()][:3]
    expected = [t for doc in documents for t in (*tokenizer.encode(doc).ids, 256)][: 3 * SEQ_LEN]
    dataset = MDSTokens(local=str(shards / "train"), batch_size=1)
    rows = [dataset[i]["input_ids"].tolist() for i in range(3)]
    assert sum(rows, []) == expected


def test_items_follow_the_text_label_convention(shards: Path):
    item = MDSTokens(local=str(shards / "validation"), batch_size=1)[5]
    assert item["input_ids"].dtype == torch.long and item["input_ids"].shape == (SEQ_LEN,)
    assert torch.equal(item["labels"][:-1], item["input_ids"][1:]) and item["labels"][-1] == IGNORE_INDEX
    shifted = MDSTokens(local=str(shards / "validation"), batch_size=1, model_shifts_labels=True)[5]
    assert torch.equal(shifted["labels"], item["input_ids"])


def test_the_dataset_resumes_at_a_saved_sample(shards: Path):
    """What Composer's mid-epoch resumption does: ``state_dict`` at k samples, ``load_state_dict`` on a fresh
    dataset, which then yields the rest of the same shuffled epoch."""
    options = dict(local=str(shards / "train"), batch_size=4, shuffle=True, shuffle_seed=17)
    whole = MDSTokens(**options)
    order = [item["input_ids"] for item, _ in zip(whole, range(40))]
    saved = whole.state_dict(num_samples=16, from_beginning=True)
    resumed = MDSTokens(**options)
    resumed.load_state_dict(saved)
    rest = [item["input_ids"] for item, _ in zip(resumed, range(24))]
    assert all(torch.equal(a, b) for a, b in zip(rest, order[16:]))
    assert not torch.equal(order[0], MDSTokens(local=str(shards / "train"), batch_size=4)[0]["input_ids"])  # shuffled


def test_prepare_then_train_six_steps(shards: Path):
    from composer.loggers import InMemoryLogger

    trainer = build_trainer(load_recipe(REPO / RECIPE, [*mds(shards), *TINY, "max_duration=6ba", "eval_interval=6ba",
                                                         "loggers.in_memory={}", "device_train_microbatch_size=8"]))
    trainer.fit()
    trainer.close()
    memory = next(d for d in trainer.logger.destinations if isinstance(d, InMemoryLogger))
    losses = [float(v) for _, v in memory.data["loss/train/total"]]
    assert len(losses) == 6 and all(np.isfinite(losses)) and losses[-1] < losses[0], losses
    assert np.isfinite(float(memory.data["metrics/eval/LanguageCrossEntropy"][-1][1]))


def test_dataloader_workers_do_not_change_the_batches(shards: Path):
    """Reading is independent of the DataLoader worker count: streaming partitions samples over the canonical
    nodes and workers, and the global batch order stays the same."""
    from loopreg.train import build_dataloaders

    def first_batches(workers: int) -> list[torch.Tensor]:
        recipe = load_recipe(REPO / RECIPE, [*mds(shards), *TINY, f"train_data.num_workers={workers}"])
        data = build_dataloaders(recipe, world_size=1, rank=0)
        batches = [batch["input_ids"] for _, batch in zip(range(4), data.train)]
        del data
        return batches

    serial, parallel = first_batches(0), first_batches(2)
    assert len(serial) == len(parallel) == 4 and not torch.equal(serial[0], serial[1])
    assert all(torch.equal(a, b) for a, b in zip(serial, parallel))


def test_workers_do_not_change_the_shards(shards: Path, tmp_path: Path):
    one = _prepare(tmp_path / "one", "wiki_passages_train.jsonl", 300)
    two = _prepare(tmp_path / "two", "wiki_passages_train.jsonl", 300, workers=2)
    assert one == two
    hashes = [[s["raw_data"]["hashes"] for s in json.loads((tmp_path / n / "index.json").read_text())["shards"]]
              for n in ("one", "two")]
    assert hashes[0] == hashes[1]


def test_workers_read_the_source_a_bounded_window_ahead():
    from loopreg.data.mds import _DOCS_PER_CHUNK, _encoded

    read = []

    def documents():
        for index in range(100 * _DOCS_PER_CHUNK):
            read.append(index)
            yield f"document {index}"

    chunks = _encoded(documents(), byte_level_tokenizer().to_str(), workers=2, dtype="uint16")
    count, tokens = next(chunks)
    assert count == _DOCS_PER_CHUNK and tokens[-1] == 256 and tokens.dtype == np.uint16  # EOS after each document
    assert len(read) <= 5 * _DOCS_PER_CHUNK  # 2 · workers chunks in flight, not the whole source
    chunks.close()


def test_an_interrupted_conversion_leaves_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    from streaming import MDSWriter

    written = []

    def write(self, sample):
        written.append(1)
        if len(written) == 50:
            raise KeyboardInterrupt
        return original(self, sample)

    original = MDSWriter.write
    monkeypatch.setattr(MDSWriter, "write", write)
    with pytest.raises(KeyboardInterrupt):
        _prepare(tmp_path / "out", "wiki_passages_train.jsonl", 100)
    assert not (tmp_path / "out").exists() and not list(tmp_path.iterdir())  # the staging folder went too


def _as_uint32_folder(prepared: Path, out: Path, dtype_field: bool) -> None:
    """``prepared`` rewritten as a folder of the first format: uint32 tokens, and ``loopreg_mds.json`` with
    ``"dtype": "uint32"`` or (older still) without the field."""
    from streaming import MDSWriter

    dataset = MDSTokens(local=str(prepared), batch_size=1)
    with MDSWriter(columns={"tokens": f"ndarray:uint32:{SEQ_LEN}"}, out=str(out), hashes=["sha1"]) as writer:
        for index in range(len(dataset)):
            writer.write({"tokens": dataset[index]["input_ids"].numpy().astype(np.uint32)})
    meta = json.loads((prepared / METADATA).read_text())
    meta["dtype"] = "uint32"
    if not dtype_field:
        del meta["dtype"]
    (out / METADATA).write_text(json.dumps(meta))


def _shard_bytes(folder: Path) -> int:
    return sum(path.stat().st_size for path in folder.glob("shard.*.mds"))


@pytest.mark.parametrize("dtype_field", [True, False])
def test_uint32_shards_of_the_first_format_still_read(shards: Path, tmp_path: Path, dtype_field: bool):
    """A vocabulary under 65536 tokens is stored as uint16; the uint32 shards written before read the same
    samples, and the same batches come out of the recipe's loader."""
    from loopreg.train import build_dataloaders

    new = shards / "validation"
    _as_uint32_folder(new, tmp_path / "old", dtype_field)
    meta = json.loads((new / METADATA).read_text())
    assert _shard_bytes(tmp_path / "old") - _shard_bytes(new) == 2 * meta["tokens"]  # 4 bytes a token, not 2
    old, current = MDSTokens(local=str(tmp_path / "old"), batch_size=1), MDSTokens(local=str(new), batch_size=1)
    assert all(torch.equal(old[i]["input_ids"], current[i]["input_ids"]) for i in range(len(current)))

    def batches(folder: Path) -> list[torch.Tensor]:
        overrides = ["train_data.kind=mds", f"train_data.source={folder}", "eval_data=null", *TINY]
        data = build_dataloaders(load_recipe(REPO / RECIPE, overrides), world_size=1, rank=0)
        return [batch["input_ids"] for _, batch in zip(range(3), data.train)]

    assert all(torch.equal(a, b) for a, b in zip(batches(tmp_path / "old"), batches(new), strict=True))


def test_a_vocabulary_over_65536_tokens_is_stored_as_uint32(tmp_path: Path):
    from loopreg.data.mds import token_dtype

    assert (token_dtype(65536), token_dtype(65537)) == (np.dtype(np.uint16), np.dtype(np.uint32))
    tokenizer = byte_level_tokenizer()
    tokenizer.add_tokens([f"<extra_{i}>" for i in range(70000)])
    tokenizer.save(str(tmp_path / "tokenizer.json"))
    meta = prepare_mds(str(TEXTDATA / "wiki_passages_heldout.jsonl"), f"file:{tmp_path}/tokenizer.json", SEQ_LEN,
                       str(tmp_path / "out"), max_tokens=4 * SEQ_LEN, progress=False)
    index = json.loads((tmp_path / "out" / "index.json").read_text())
    assert meta["dtype"] == "uint32" and index["shards"][0]["column_encodings"] == [f"ndarray:uint32:{SEQ_LEN}"]
    assert MDSTokens(local=str(tmp_path / "out"), batch_size=1)[0]["input_ids"].max() < 257


def test_compressed_shards_train(tmp_path: Path):
    meta = _prepare(tmp_path / "zstd", "wiki_passages_heldout.jsonl", 50, compression="zstd")
    assert meta["compression"] == "zstd"
    assert list((tmp_path / "zstd").glob("*.mds.zstd"))
    dataset = MDSTokens(local=str(tmp_path / "zstd"), batch_size=1)
    assert len(dataset) == 50 and dataset[49]["input_ids"].shape == (SEQ_LEN,)


def test_a_remote_location_gets_its_metadata_last_and_is_read_through_a_cache(tmp_path: Path, monkeypatch):
    """The object-store paths, with a folder standing in for the bucket (streaming's local uploader and
    downloader copy files as its S3 ones upload and download them)."""
    from streaming.base.storage.upload import LocalUploader

    from loopreg.data import mds as module

    bucket = tmp_path / "bucket"
    monkeypatch.setattr(module, "is_remote", lambda location: str(location).startswith(str(bucket)))
    uploaded = []
    upload = LocalUploader.upload_file
    monkeypatch.setattr(LocalUploader, "upload_file", lambda self, name: (uploaded.append(name), upload(self, name)))
    _prepare(bucket / "train", "wiki_passages_train.jsonl", 200)
    _prepare(bucket / "validation", "wiki_passages_heldout.jsonl", 50)
    # per location: the shards, MDSWriter's index.json, and the marker of a complete conversion last
    assert [name for name in uploaded if not name.startswith("shard.")] == ["index.json", METADATA] * 2
    assert json.loads((bucket / "train" / METADATA).read_text())["sequences"] == 200
    cache = tmp_path / "cache"
    overrides = [*mds(bucket), f"train_data.local={cache}/train", f"eval_data.local={cache}/validation",
                 "train_data.validate_hash=sha1", *TINY, "max_duration=2ba", "eval_interval=2ba",
                 "device_train_microbatch_size=8"]
    trainer = build_trainer(load_recipe(REPO / RECIPE, overrides))
    trainer.fit()
    trainer.close()
    assert int(trainer.state.timestamp.batch) == 2
    assert (cache / "train" / METADATA).is_file() and list((cache / "train").glob("shard.*.mds"))


def remote(folder: Path, cache: Path, *extra: str) -> list[str]:
    """``folder`` read as a remote: a ``file://`` source, its shards copied into ``cache`` as from a bucket."""
    return ["train_data.kind=mds", f"train_data.source=file://{folder}/train", f"train_data.local={cache}/train",
            "eval_data.kind=mds", f"eval_data.source=file://{folder}/validation", f"eval_data.local={cache}/validation",
            "eval_data.eval_size=16", *extra]


def test_a_file_uri_is_read_through_the_cache_like_a_bucket(shards: Path, tmp_path: Path):
    """The remote code path without a network: streaming copies the shards of a local path given as ``remote``
    into ``local`` as it downloads a bucket's; the batches are the local source's, and a run trains on them."""
    from loopreg.train import build_dataloaders

    def batches(overrides: list[str]) -> tuple[list[torch.Tensor], object]:
        data = build_dataloaders(load_recipe(REPO / RECIPE, [*overrides, *TINY]), world_size=1, rank=0)
        return [batch["input_ids"] for _, batch in zip(range(3), data.train)], data.train.dataset

    cached, dataset = batches(remote(shards, tmp_path / "cache", "train_data.cache_limit=10mb",
                                     "train_data.validate_hash=sha1"))
    assert dataset.streams[0].remote == str(shards / "train")  # the file:// URI as a plain path
    assert dataset.streams[0].local == str(tmp_path / "cache" / "train") and dataset.cache_limit == 10 * 1024**2
    assert list((tmp_path / "cache" / "train").glob("shard.*.mds"))
    direct, _ = batches(mds(shards))
    assert all(torch.equal(a, b) for a, b in zip(cached, direct, strict=True))
    trainer = build_trainer(load_recipe(REPO / RECIPE, [*remote(shards, tmp_path / "run"), *TINY, "max_duration=3ba",
                                                        "eval_interval=3ba", "device_train_microbatch_size=8"]))
    trainer.fit()
    trainer.close()
    assert int(trainer.state.timestamp.batch) == 3 and (tmp_path / "run" / "train" / METADATA).is_file()


# --- bad inputs: one line, exit 2 ------------------------------------------------------------------------------

def _one_line(status: int, err: str, *fragments: str) -> None:
    assert status == 2, err
    assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err, err
    for fragment in fragments:
        assert fragment in err, err


def _train(overrides: list[str], capsys) -> tuple[int, str, str]:
    return run_cli(["train", str(REPO / RECIPE), *TINY, "max_duration=1ba", *overrides], capsys)


def test_a_missing_or_empty_shard_folder_is_one_line(shards: Path, tmp_path: Path, capsys):
    status, _, err = _train([*mds(shards), f"train_data.source={tmp_path}/nowhere"], capsys)
    _one_line(status, err, "train_data.source", f"'{tmp_path}/nowhere' not found")
    (tmp_path / "empty").mkdir()
    status, _, err = _train([*mds(shards), f"train_data.source={tmp_path}/empty"], capsys)
    _one_line(status, err, "train_data.source", "no MDS index")


def test_an_index_without_metadata_is_an_interrupted_conversion(shards: Path, tmp_path: Path, capsys):
    shutil.copytree(shards / "train", tmp_path / "partial")
    (tmp_path / "partial" / METADATA).unlink()
    status, _, err = _train([*mds(shards), f"train_data.source={tmp_path}/partial"], capsys)
    _one_line(status, err, "train_data.source", f"no {METADATA}")


def test_a_corrupt_shard_fails_the_hash_check(shards: Path, tmp_path: Path, capsys):
    shutil.copytree(shards / "train", tmp_path / "bad")
    shard = next((tmp_path / "bad").glob("shard.*.mds"))
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    status, _, err = _train([*mds(shards), f"train_data.source={tmp_path}/bad", "train_data.validate_hash=sha1"],
                            capsys)
    _one_line(status, err, "train_data.source", f"shard '{shard}' is corrupt")


@pytest.mark.parametrize("workers", [0, 2])
def test_a_corrupt_remote_shard_is_one_line_and_leaves_the_cache(shards: Path, tmp_path: Path, workers: int):
    """streaming checks a downloaded shard's hash in its download thread, which only logs the failure and ends
    the epoch early; the run stops with one line naming the shard, and the bad copy is not kept in the cache."""
    bucket = tmp_path / "bucket"
    shutil.copytree(shards, bucket)
    shard = next((bucket / "train").glob("shard.*.mds"))
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    # in a process of its own, as a user runs it: the in-process runs before leave streaming threads behind
    result = subprocess.run([sys.executable, "-m", "loopreg.cli", "train", str(REPO / RECIPE), *TINY,
                             "max_duration=1ba", *remote(bucket, tmp_path / "cache"), "train_data.validate_hash=sha1",
                             f"train_data.num_workers={workers}", "log_to_console=false"],  # no Composer banner
                            capture_output=True, text=True, timeout=300, cwd=REPO,
                            env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"})
    err = "".join(line + "\n" for line in result.stderr.splitlines() if line.startswith("error: "))
    assert result.stderr.count("Traceback") == 0, result.stderr[-3000:]
    _one_line(result.returncode, err, "train_data.source", f"shard '{shard.name}' of '{bucket}/train' is corrupt")
    assert not (tmp_path / "cache" / "train" / shard.name).exists()


def test_a_background_thread_failure_ends_the_epoch_instead_of_hanging(shards: Path, tmp_path: Path, monkeypatch):
    """The corrupt-shard hang, made certain: streaming's download and ready threads both die by an exception (as
    when the ready thread finds the bad copy gone). A thread that dies never counts itself out, and streaming's
    end-of-epoch wait for two of its three threads spun forever; the epoch must end with the first error."""
    import threading

    from streaming import StreamingDataset

    def fail(self, it):
        raise OSError("the bucket went away")

    monkeypatch.setattr(StreamingDataset, "_prepare_thread", fail)
    monkeypatch.setattr(StreamingDataset, "_ready_thread", fail)
    dataset = MDSTokens(remote=str(shards / "train"), local=str(tmp_path / "cache"), batch_size=1)
    raised: list[BaseException] = []

    def iterate() -> None:
        try:
            list(dataset)
        except BaseException as error:  # noqa: BLE001 - handed to the test thread
            raised.append(error)

    thread = threading.Thread(target=iterate, daemon=True)
    thread.start()
    thread.join(timeout=60)
    assert not thread.is_alive(), "the epoch never ended: streaming waits for a thread that died"
    assert len(raised) == 1 and "the bucket went away" in str(raised[0])


def test_an_unreachable_remote_is_one_line(shards: Path, tmp_path: Path, capsys):
    status, _, err = _train(remote(tmp_path / "nowhere", tmp_path / "cache"), capsys)
    _one_line(status, err, "train_data.source", f"cannot read 'file://{tmp_path}/nowhere/train/{METADATA}'")


@pytest.mark.parametrize("value, fragment", [
    ("ten_gigabytes", "train_data.cache_limit: Unsupported value/suffix ten_gigabytes"),
    ("-1gb", "train_data.cache_limit: must be a positive size"),
    ("1kb", "train_data.cache_limit: Cache limit (1024 bytes) is too low"),  # under four shards
])
def test_a_bad_cache_limit_is_one_line(shards: Path, tmp_path: Path, capsys, value: str, fragment: str):
    status, _, err = _train([*remote(shards, tmp_path / "cache"), f"train_data.cache_limit={value}"], capsys)
    _one_line(status, err, fragment)


def test_shards_of_another_tokenizer_or_length_are_refused(shards: Path, tmp_path: Path, capsys):
    status, _, err = _train([*mds(shards), "max_seq_len=32"], capsys)
    _one_line(status, err, "train_data.source", f"'{shards}/train' have seq_len=64, the recipe's max_seq_len=32")
    tokenizer = byte_level_tokenizer()
    tokenizer.add_tokens(["looped"])
    tokenizer.save(str(tmp_path / "tokenizer.json"))
    status, _, err = _train([*mds(shards), "tokenizer.kind=file", f"tokenizer.name={tmp_path}/tokenizer.json",
                             "model.vocab_size=258"], capsys)
    _one_line(status, err, "train_data.source", "tokenized with tokenizer=byte_level (257 tokens",
              f"the recipe's tokenizer is file:{tmp_path}/tokenizer.json (258 tokens")


def test_eval_data_of_another_kind_is_refused(shards: Path, text_corpus: Path, capsys):
    status, _, err = _train([*mds(shards), "eval_data.kind=text", f"eval_data.source={text_corpus}"], capsys)
    _one_line(status, err, "eval_data.kind=text with train_data.kind=mds")


@pytest.mark.parametrize("argv, fragment", [
    (["--tokenizer", "wordpiece:x"], "unknown tokenizer kind 'wordpiece'"),
    (["--tokenizer", "file:/no/tokenizer.json"], "tokenizer file '/no/tokenizer.json' not found"),
    (["--tokenizer", "byte_level", "--seq-len", "0"], "--seq-len must be >= 1"),
    (["--tokenizer", "byte_level", "--compression", "rar"], "--compression"),
])
def test_prepare_errors_are_one_line(argv: list[str], fragment: str, tmp_path: Path, capsys):
    args = ["data", "prepare", str(TEXTDATA / "wiki_passages_heldout.jsonl"), "--seq-len", "64",
            "--out", str(tmp_path / "out"), "--max-tokens", "6400", "--quiet", *argv]
    _one_line(*run_cli(args, capsys)[::2], fragment)
    assert not (tmp_path / "out").exists()


def test_prepare_source_errors_are_one_line(tmp_path: Path, capsys):
    base = ["data", "prepare", "--tokenizer", "byte_level", "--seq-len", "64", "--quiet"]
    _one_line(*run_cli([*base[:2], str(tmp_path / "none.jsonl"), *base[2:], "--out", str(tmp_path / "o")],
                       capsys)[::2], "not found")
    (tmp_path / "short.txt").write_text("too short")
    _one_line(*run_cli([*base[:2], str(tmp_path / "short.txt"), *base[2:], "--out", str(tmp_path / "o")],
                       capsys)[::2], "not one sequence of --seq-len=64")
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "notes.txt").write_text("mine")
    _one_line(*run_cli([*base[:2], str(tmp_path / "short.txt"), *base[2:], "--out", str(tmp_path / "taken")],
                       capsys)[::2], "is not a folder `loopreg data prepare` wrote")
    assert (tmp_path / "taken" / "notes.txt").read_text() == "mine"


def test_the_cli_prints_what_it_wrote(tmp_path: Path, capsys):
    status, out, err = run_cli(["data", "prepare", str(TEXTDATA / "wiki_passages_heldout.jsonl"), "--tokenizer",
                                "byte_level", "--seq-len", "64", "--out", str(tmp_path / "o"), "--max-tokens", "6400",
                                "--quiet"], capsys)
    assert status == 0, err
    assert json.loads(out)["sequences"] == 100


# --- the Pile rows ---------------------------------------------------------------------------------------------

def test_pile_rows_read_mds_and_fall_back_to_hub_text(text_corpus: Path, tmp_path: Path, monkeypatch):
    monkeypatch.delenv("LOOPREG_PILE_MDS", raising=False)
    recipe = load_recipe(REPO / "recipes" / "loop_12x2.yaml")
    assert (recipe.train_data.kind, recipe.train_data.source) == ("mds", "data/pile_neox_1280/train")
    assert (recipe.eval_data.kind, recipe.eval_data.source) == ("mds", "data/pile_neox_1280/validation")
    monkeypatch.setenv("LOOPREG_PILE_MDS", "s3://bucket/pile")
    assert load_recipe(REPO / "recipes" / "loop_12x2.yaml").train_data.source == "s3://bucket/pile/train"
    fallback = ["train_data.kind=text", "train_data.source=monology/pile-uncopyrighted", "eval_data.kind=text",
                "eval_data.source=monology/pile-uncopyrighted"]
    recipe = load_recipe(REPO / "recipes" / "loop_12x2.yaml", fallback)
    assert (recipe.train_data.kind, recipe.eval_data.split) == ("text", "validation")
    # and the text path trains (on local text here: no hub in tests)
    trainer = build_trainer(load_recipe(REPO / "recipes" / "base_4x1.yaml",
                                        [*fallback, *tiny_overrides(text_corpus, tmp_path), "export_folder=null"]))
    trainer.fit()
    trainer.close()
    assert int(trainer.state.timestamp.batch) == 2


def test_a_remote_source_needs_a_cache_folder():
    from loopreg.errors import RecipeError

    with pytest.raises(RecipeError, match="train_data.local is required for a remote mds source"):
        load_recipe(REPO / "recipes" / "loop_12x2.yaml", ["train_data.source=s3://b/pile", "train_data.local=null"])


# --- two ranks ---------------------------------------------------------------------------------------------------

def _equivalence_case(shards: Path) -> list[str]:
    from .test_multiprocess_equivalence import COMMON

    return [RECIPE, *mds(shards), *TINY, *COMMON, "eval_data.eval_size=16", "model.spec=1x(1,2,1)"]


def launched_main(spec_path: str) -> None:
    """The two-rank side: rank 0 writes the per-step losses. A rank still running after ``dump_after_s`` prints
    every thread's stack to its stderr file and exits, so a hang shows where it is."""
    import faulthandler

    from composer.utils import dist

    from .test_multiprocess_equivalence import train

    spec = json.loads(Path(spec_path).read_text())
    faulthandler.dump_traceback_later(spec["dump_after_s"], exit=True)
    recipe, *overrides = spec["case"]
    losses, _ = train(recipe, overrides)
    if dist.get_global_rank() == 0:
        Path(spec["out"]).write_text(json.dumps(losses))


@pytest.mark.slow
@pytest.mark.multiprocess
def test_two_ranks_follow_the_one_process_loss_curve(shards: Path, tmp_path: Path):
    from .test_multiprocess_equivalence import BATCHES, train

    case = _equivalence_case(shards)
    timeout = 600
    spec = {"case": case, "out": str(tmp_path / "losses.json"), "dump_after_s": timeout - 60}
    (tmp_path / "spec.json").write_text(json.dumps(spec))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    launcher = Path(sys.executable).parent / "composer"
    argv = [str(launcher), "-n", "2", "--master_port", str(free_port()), "--stdout", str(tmp_path / "rank{rank}.out"),
            "--stderr", str(tmp_path / "rank{rank}.err"), "-m", "tests.test_mds", str(tmp_path / "spec.json")]
    try:  # on a timeout run_launcher kills the launcher's process group: the launcher and both ranks
        result = run_launcher(argv, timeout=timeout, cwd=REPO, env=env)
    except subprocess.TimeoutExpired as err:
        rank1 = tmp_path / "rank1.err"
        pytest.fail(f"composer -n 2 still ran after {timeout} s; rank 1's stderr ends:\n"
                    f"{rank1.read_text()[-3000:] if rank1.exists() else '(none)'}\n{err.stderr or ''}"[-6000:])
    logs = (result.stdout + result.stderr)[-3000:] + (tmp_path / "rank1.err").read_text()[-2000:]
    assert result.returncode == 0, logs
    two = json.loads((tmp_path / "losses.json").read_text())
    one, _ = train(case[0], case[1:])
    assert one.keys() == two.keys() and len(one["loss/train/total"]) == BATCHES
    for key in one:
        worst = max(abs(a - b) / abs(a) for a, b in zip(one[key], two[key]))
        assert worst <= 1e-5, (key, one[key], two[key])
    assert one["loss/train/total"][-1] < one["loss/train/total"][0]


# --- SIGKILL and autoresume --------------------------------------------------------------------------------------

@pytest.mark.slow
def test_sigkilled_mds_run_resumes_bitwise_identical(shards: Path, tmp_path: Path):
    from .test_resume import BATCHES, COMMON, SAVE_EVERY, _assert_same, _final, kill_and_resume

    args = [RECIPE, *mds(shards), *COMMON, "global_train_batch_size=8", "device_train_microbatch_size=4",
            "device_eval_batch_size=8", "eval_data.eval_size=8", "train_data.num_workers=2"]
    kill_at, resumed_log = kill_and_resume(args, tmp_path)
    log = resumed_log.read_text()
    first = int(log.split("[batch=", 1)[1].split("/", 1)[0])
    assert SAVE_EVERY < first < BATCHES and (first - 1) % SAVE_EVERY == 0, (kill_at, first)
    context = f"killed after batch {kill_at}, resumed at batch {first}"
    print(context)
    a, b = _final(tmp_path / "whole"), _final(tmp_path / "killed")
    for key in ("model", "optimizers", "schedulers", "dataset_state"):
        _assert_same(a["state"][key], b["state"][key], f"{context}: state.{key}")
    assert b["state"]["dataset_state"]["train"]["sample_in_epoch"] == BATCHES * 8
    _assert_same(a["rng"], b["rng"], f"{context}: rng")


if __name__ == "__main__":
    launched_main(sys.argv[1])
