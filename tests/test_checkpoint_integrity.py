"""Checkpoint integrity: truncated or corrupt Composer checkpoints are named in one line, autoresume falls
back to the newest readable one without deleting anything, and model folders (surgery, export, snap,
the training export) are written to a staging folder and renamed, so a failed write keeps the old one."""

from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path

import pytest
import torch

from loopreg.callbacks.export import ExportModel
from loopreg.checkpoints import LATEST, check_checkpoint, prepare_autoresume
from loopreg.cli import main as loopreg_main
from loopreg.config import load_recipe
from loopreg.errors import CheckpointError
from loopreg.model import LoopedLM, LoopedLMConfig
from loopreg.spec import LoopSpec
from loopreg.folders import write_folder
from loopreg.train import build_trainer

from .conftest import REPO, tiny_overrides


def _recipe(corpus: Path, folder: Path, batches: int):
    return load_recipe(REPO / "recipes" / "cpu_tiny_text.yaml",
                       [*tiny_overrides(corpus), f"save_folder={folder}", "save_interval=2ba", "autoresume=true",
                        f"max_duration={batches}ba", "export_folder=null"])


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory: pytest.TempPathFactory, text_corpus: Path) -> Path:
    """A run's save folder with checkpoints after batches 2 and 4 (``latest-rank0.pt`` -> batch 4)."""
    folder = tmp_path_factory.mktemp("ckpt") / "run"
    trainer = build_trainer(_recipe(text_corpus, folder, 4))
    trainer.fit()
    trainer.close()
    return folder


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _flip_a_weight_byte(path: Path) -> None:
    """Flip one byte inside a tensor record: the zip structure stays valid, only a CRC-32 disagrees."""
    import zipfile

    with zipfile.ZipFile(path) as archive:
        record = max((info for info in archive.infolist() if "/data/" in info.filename), key=lambda i: i.file_size)
    with path.open("r+b") as handle:
        handle.seek(record.header_offset + 26)
        name_length, extra_length = (int.from_bytes(handle.read(2), "little") for _ in range(2))
        offset = record.header_offset + 30 + name_length + extra_length + record.file_size // 2
        handle.seek(offset)
        byte = handle.read(1)
        handle.seek(offset)
        handle.write(bytes([byte[0] ^ 0xFF]))


def test_unreadable_checkpoints_are_named_in_one_line(checkpoints: Path, tmp_path: Path):
    good = shutil.copy(checkpoints / "ep0-ba2-rank0.pt", tmp_path / "good.pt")
    check_checkpoint(good)
    truncated = Path(shutil.copy(good, tmp_path / "truncated.pt"))
    _truncate(truncated)
    with pytest.raises(CheckpointError, match=rf"^checkpoint '{truncated}' is truncated or not a checkpoint \(.+\)$"):
        check_checkpoint(truncated)
    corrupt = Path(shutil.copy(good, tmp_path / "corrupt.pt"))
    _flip_a_weight_byte(corrupt)
    with pytest.raises(CheckpointError,
                       match=rf"^checkpoint '{corrupt}' is corrupt \(checksum mismatch in '.+/data/\d+'\)$"):
        check_checkpoint(corrupt)
    torch.load(corrupt, map_location="cpu", weights_only=False)  # why we check: torch loads the flipped byte
    with pytest.raises(CheckpointError, match=rf"^checkpoint '{tmp_path / 'nope.pt'}' not found$"):
        check_checkpoint(tmp_path / "nope.pt")


@pytest.mark.parametrize("damage", ["truncated", "corrupt", "partial newer file"])
def test_autoresume_uses_the_previous_good_checkpoint(checkpoints: Path, text_corpus: Path, tmp_path: Path,
                                                      damage: str):
    folder = Path(shutil.copytree(checkpoints, tmp_path / "run", symlinks=True))
    good, bad = folder / "ep0-ba2-rank0.pt", folder / "ep0-ba4-rank0.pt"
    if damage == "partial newer file":  # killed while writing batch 6's checkpoint: latest still -> batch 4
        good, bad = bad, folder / "ep0-ba6-rank0.pt"
        bad.write_bytes(good.read_bytes()[:1000])
    else:
        (_truncate if damage == "truncated" else _flip_a_weight_byte)(bad)
    good_digest, bad_digest = _digest(good), _digest(bad)

    trainer = build_trainer(_recipe(text_corpus, folder, 8))
    resumed_at = int(good.name.split("-ba")[1].split("-")[0])
    assert int(trainer.state.timestamp.batch) == resumed_at
    assert os.readlink(folder / LATEST) == good.name
    aside = bad.with_name(bad.name + ".corrupt")
    assert _digest(aside) == bad_digest and _digest(good) == good_digest  # moved aside, never deleted
    trainer.fit()  # Composer's no-newer-checkpoint check passes; the run re-saves the later batches
    trainer.close()
    for batch in range(2, 9, 2):
        check_checkpoint(folder / f"ep0-ba{batch}-rank0.pt")
    assert _digest(good) == good_digest and aside.is_file()


def test_autoresume_with_no_readable_checkpoint_refuses_to_start_over(checkpoints: Path, tmp_path: Path):
    folder = Path(shutil.copytree(checkpoints, tmp_path / "run", symlinks=True))
    _truncate(folder / "ep0-ba2-rank0.pt")
    _flip_a_weight_byte(folder / "ep0-ba4-rank0.pt")
    before = sorted(os.listdir(folder))
    with pytest.raises(CheckpointError, match=r"^autoresume: no readable checkpoint in .*ep0-ba4-rank0.pt' is corrupt"
                                              r".*ep0-ba2-rank0.pt' is truncated.*move the files away to start over$"):
        prepare_autoresume(folder)
    assert sorted(os.listdir(folder)) == before
    assert prepare_autoresume(tmp_path / "fresh") is None  # no checkpoints yet: a fresh start


def _old_folder(path: Path) -> dict[str, bytes]:
    path.mkdir()
    (path / "config.json").write_text('{"old": true}')
    (path / "model.safetensors").write_bytes(b"old weights")
    return {p.name: p.read_bytes() for p in path.iterdir()}


def _contents(path: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in path.iterdir()}


def test_write_folder_keeps_the_old_folder_when_the_write_or_the_swap_fails(tmp_path: Path, monkeypatch):
    out = tmp_path / "model"
    old = _old_folder(out)

    def half_write(folder: Path) -> None:
        (folder / "config.json").write_text('{"new": true}')
        raise OSError("No space left on device")

    with pytest.raises(OSError, match="No space left"):
        write_folder(out, half_write)
    assert _contents(out) == old and sorted(os.listdir(tmp_path)) == ["model"]  # no staging left behind

    real_replace = os.replace

    def crash_on_swap(src, dst):
        if Path(dst) == out:
            raise OSError("interrupted")
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", crash_on_swap)
    with pytest.raises(OSError, match="interrupted"):
        write_folder(out, lambda folder: (folder / "config.json").write_text('{"new": true}'))
    assert _contents(out) == old and sorted(os.listdir(tmp_path)) == ["model"]  # moved back into place
    monkeypatch.undo()

    write_folder(out, lambda folder: (folder / "config.json").write_text('{"new": true}'))
    assert _contents(out) == {"config.json": b'{"new": true}'} and sorted(os.listdir(tmp_path)) == ["model"]


def _tiny_looped(path: Path) -> None:
    torch.manual_seed(0)
    model = LoopedLM(LoopedLMConfig(spec="4x1", tied=False, vocab_size=32, d_model=16, n_heads=2, d_ff=32))
    model.save_pretrained(path)


def test_surgery_snap_and_training_export_keep_the_old_folder_on_a_failed_write(tmp_path: Path, monkeypatch, capsys):
    source, out = tmp_path / "source", tmp_path / "out"
    _tiny_looped(source)
    old = _old_folder(out)
    real_save = LoopedLM.save_pretrained

    def failing_save(self, folder):
        real_save(self, folder)  # the whole model is written to the staging folder, then the disk fills up
        raise OSError(f"[Errno 28] No space left on device: '{folder}/tokenizer.json'")

    monkeypatch.setattr(LoopedLM, "save_pretrained", failing_save)
    for argv in (["surgery", str(source), "--spec", "1x(1,2,1)", "--out", str(out)],
                 ["snap", str(source), "--block-size", "1", "--out", str(out)]):
        with pytest.raises(SystemExit) as exit_info:
            loopreg_main(argv)
        assert exit_info.value.code == 2 and "No space left on device" in capsys.readouterr().err
        assert _contents(out) == old, argv[0]
    with pytest.raises(OSError, match="No space left"):
        ExportModel(out)._write(LoopedLM.from_pretrained(source))
    assert _contents(out) == old and sorted(os.listdir(tmp_path)) == ["out", "source"]
    monkeypatch.undo()
    assert loopreg_main_exit(["surgery", str(source), "--spec", "1x(1,2,1)", "--out", str(out)]) == 0
    assert LoopedLM.from_pretrained(out).spec == LoopSpec.parse("1x(1,2,1)")


def loopreg_main_exit(argv: list[str]) -> int:
    with pytest.raises(SystemExit) as exit_info:
        loopreg_main(argv)
    return exit_info.value.code
