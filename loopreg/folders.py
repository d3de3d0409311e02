"""Model folders that appear whole or not at all: every folder loopreg writes (exports, surgery and snap
outputs) is staged next to its destination and renamed into place.

    >>> write_folder("runs/x", lambda folder: (folder / "config.json").write_text("{}"))  # doctest: +SKIP
    PosixPath('runs/x')
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable

from torch import nn

__all__ = ["write_folder", "write_model_folder", "save_tokenizer"]


def write_model_folder(model: nn.Module, out_dir: str | Path, tokenizer: Any | None = None) -> Path:
    """``model.save_pretrained`` (a looped model's writes the remote code it needs to load in plain transformers,
    :mod:`loopreg.remote_code`) and the tokenizer into ``out_dir``, through
    :func:`write_folder`: an interrupted or failed write never leaves a half-written ``out_dir`` and never
    loses an existing one. ``tokenizer`` is a Hugging Face tokenizer or a ``tokenizers.Tokenizer``.

    >>> # write_model_folder(looped_model, "runs/smollm2_middle", tokenizer)
    """
    from loopreg.surgery.adapters import unwrap

    def save(staging: Path) -> None:
        unwrap(model).save_pretrained(staging)
        if tokenizer is not None:
            save_tokenizer(tokenizer, staging)

    return write_folder(out_dir, save)


def save_tokenizer(tokenizer: Any, folder: Path) -> None:
    """A Hugging Face tokenizer as it saves itself; a ``tokenizers.Tokenizer`` (a LoopedLM's) as ``tokenizer.json``
    plus the files that let ``AutoTokenizer`` load it (as a ``PreTrainedTokenizerFast``, EOS set when its vocabulary
    has loopreg's EOS token).

    >>> # save_tokenizer(byte_level_tokenizer(), Path("runs/x"))  # tokenizer.json, tokenizer_config.json, ...
    """
    if hasattr(tokenizer, "save_pretrained"):
        tokenizer.save_pretrained(folder)
        return
    from transformers import PreTrainedTokenizerFast

    from loopreg.data.text import EOS_TOKEN

    eos = EOS_TOKEN if tokenizer.token_to_id(EOS_TOKEN) is not None else None
    PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token=eos).save_pretrained(folder)


def write_folder(out_dir: str | Path, write: Callable[[Path], None]) -> Path:
    """Run ``write(staging)`` on a fresh folder next to ``out_dir``, then swap it in with renames: the
    old ``out_dir`` is moved aside, the new one renamed into place, and only then is the old one deleted.
    If ``write`` fails or the process dies, ``out_dir`` is untouched (at worst a hidden ``.<name>.*``
    staging folder is left next to it).

    >>> write_folder("runs/x", lambda folder: (folder / "config.json").write_text("{}"))  # doctest: +SKIP
    PosixPath('runs/x')
    """
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    old = staging.with_name(staging.name + ".old")
    try:
        write(staging)
        if out_dir.exists():
            out_dir.rename(old)
        try:
            os.replace(staging, out_dir)
        except BaseException:
            if old.exists() and not out_dir.exists():
                old.rename(out_dir)  # put the previous folder back
            raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    shutil.rmtree(old, ignore_errors=True)
    return out_dir
