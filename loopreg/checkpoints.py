"""Checkpoint integrity: catch a truncated or corrupt Composer checkpoint before the Trainer loads it.

A Composer checkpoint (``.pt``) is a ``torch.save`` zip archive whose members carry CRC-32 checksums.
``torch.load`` does not check them (a flipped byte in a weight loads silently), so :func:`check_checkpoint`
reads the whole archive and verifies every checksum; a truncated file has no zip directory at all.

With autoresume, :func:`prepare_autoresume` runs before the Trainer is built: it walks the run's
checkpoints from the newest down, moves each unreadable one aside (``<name>.corrupt``, never deleted),
and points Composer's ``latest-rank0.pt`` symlink at the newest good one, which Composer then loads.

    >>> check_checkpoint("runs/x/checkpoints/ep0-ba400-rank0.pt")  # doctest: +SKIP
    >>> prepare_autoresume("runs/x/checkpoints")  # doctest: +SKIP
    PosixPath('runs/x/checkpoints/ep0-ba400-rank0.pt')
"""

from __future__ import annotations

import logging
import os
import re
import zipfile
import zlib
from pathlib import Path
from typing import Any

from loopreg.errors import CheckpointError

__all__ = ["check_checkpoint", "prepare_autoresume", "run_folder", "LATEST"]

log = logging.getLogger(__name__)

# Composer's defaults (Trainer save_filename / save_latest_filename, formatted for rank 0); recipes do
# not change them. Only rank 0 writes a monolithic checkpoint and the symlink autoresume reads.
_CHECKPOINT_NAME = re.compile(r"^ep(\d+)-ba(\d+)-rank0\.pt$")
LATEST = "latest-rank0.pt"


def check_checkpoint(path: str | Path) -> None:
    """Raise :class:`CheckpointError` if ``path`` is missing, truncated or fails a checksum.

    Folders (sharded FSDP checkpoints) and compressed archives are only checked for existence.

    >>> check_checkpoint("runs/x/checkpoints/latest-rank0.pt")  # doctest: +SKIP
    """
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"checkpoint '{path}' not found")
    if path.is_dir() or path.suffix != ".pt":
        return
    try:
        with zipfile.ZipFile(path) as archive:
            bad_member = archive.testzip()  # reads every member and compares its CRC-32
    except (zipfile.BadZipFile, zlib.error, EOFError, OSError) as err:
        raise CheckpointError(f"checkpoint '{path}' is truncated or not a checkpoint ({err})") from None
    if bad_member is not None:
        raise CheckpointError(f"checkpoint '{path}' is corrupt (checksum mismatch in '{bad_member}')")


def prepare_autoresume(folder: str | Path) -> Path | None:
    """Make Composer's autoresume load the newest checkpoint in ``folder`` that passes
    :func:`check_checkpoint`; returns it, or ``None`` when the folder holds no checkpoint yet.

    Unreadable newer checkpoints are renamed ``<name>.corrupt`` (they would also block Composer's check
    that no checkpoint is newer than the resumed batch). Raises :class:`CheckpointError`, renaming nothing,
    when checkpoints exist but none is readable: a fresh start would silently throw the run away.

    >>> prepare_autoresume("runs/x/checkpoints")  # doctest: +SKIP
    """
    folder = Path(folder)
    found = sorted(((int(m[1]), int(m[2])), entry) for entry in (folder.iterdir() if folder.is_dir() else [])
                   if (m := _CHECKPOINT_NAME.match(entry.name)) and entry.is_file())
    unreadable: list[tuple[Path, CheckpointError]] = []
    for _, candidate in reversed(found):
        try:
            check_checkpoint(candidate)
        except CheckpointError as err:
            unreadable.append((candidate, err))
            continue
        for bad, err in unreadable:
            aside = bad.with_name(bad.name + ".corrupt")
            os.replace(bad, aside)
            log.warning("autoresume: %s; moved it to %s, resuming from %s", err, aside.name, candidate.name)
        _point_latest(folder / LATEST, candidate)
        return candidate
    if unreadable:
        raise CheckpointError(f"autoresume: no readable checkpoint in '{folder}' "
                              f"({'; '.join(str(err) for _, err in unreadable)}); move the files away to start over")
    return None


def _point_latest(symlink: Path, target: Path) -> None:
    """Point ``symlink`` at ``target`` (relative, as Composer writes it) unless it already does."""
    if symlink.is_symlink() and symlink.resolve() == target.resolve():
        return
    staging = symlink.with_name(symlink.name + ".tmp")
    staging.unlink(missing_ok=True)
    staging.symlink_to(target.name)
    os.replace(staging, symlink)  # atomic: the link is never missing
    log.warning("autoresume: %s now points to %s", symlink.name, target.name)


def run_folder(state: Any) -> Path:
    """Where this run's artifacts go: the checkpoint folder (``save_folder``) or, without one, the run name."""
    from composer.callbacks import CheckpointSaver
    from composer.utils import format_name_with_dist

    savers = [callback for callback in state.callbacks if isinstance(callback, CheckpointSaver)]
    folder = savers[0].folder if savers else "{run_name}"
    return Path(format_name_with_dist(folder, state.run_name))
