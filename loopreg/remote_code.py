"""Looped model folders that plain ``transformers`` loads, tied: at save time the folder receives loopreg's own
model code as Hugging Face *remote code* (the modules themselves, copied, never a second hand-kept copy) and
its ``config.json`` an ``auto_map`` naming the classes in them, as Hub checkpoints with custom code do.

    >>> # attach_remote_code("runs/smollm2_middle", looped_llama)
    >>> # AutoModelForCausalLM.from_pretrained("runs/smollm2_middle", trust_remote_code=True)  # no loopreg needed

The copied modules (an entry module and every module it imports relatively, found the way transformers
finds them) depend on torch and transformers only: ``tests/test_remote_code.py`` loads such folders with
loopreg made unimportable.
"""

from __future__ import annotations

import importlib
import json
import shutil
from pathlib import Path

from torch import nn

from loopreg.model import CONFIG_NAME, LoopedLM

__all__ = ["attach_remote_code", "remote_code_files"]

# The loopreg modules that are remote-code entries: LoopedLM folders get their config and model classes,
# tied Hugging Face retrofits the looped variant of their own class (see loopreg.looped_hf).
LOOPEDLM_ENTRY = "loopreg.modeling_loopreg"
RETROFIT_ENTRY = "loopreg.looped_hf"


def remote_code_files(entry: str) -> list[Path]:
    """The source files an entry module needs in a model folder: itself and its relative imports, recursively.

    >>> sorted(path.name for path in remote_code_files("loopreg.modeling_loopreg"))  # doctest: +SKIP
    ['configuration_loopreg.py', 'model.py', 'modeling_loopreg.py', 'spec.py', 'update_rules.py']
    """
    from transformers.dynamic_module_utils import get_relative_import_files

    entry_file = Path(importlib.import_module(entry).__file__)
    return [entry_file, *map(Path, get_relative_import_files(str(entry_file)))]


def _auto_map(model: nn.Module) -> tuple[str, dict[str, str]] | None:
    """(entry module, ``auto_map``) for a looped model; ``None`` for a plain one (it needs no remote code)."""
    if isinstance(model, LoopedLM):
        return LOOPEDLM_ENTRY, {"AutoConfig": "configuration_loopreg.LoopregConfig",
                                "AutoModelForCausalLM": "modeling_loopreg.LoopregForCausalLM"}
    from loopreg.surgery.core import looped_spec

    if looped_spec(model) is None:
        return None
    return RETROFIT_ENTRY, {"AutoModelForCausalLM": f"looped_hf.{type(model).__name__}"}


def attach_remote_code(folder: str | Path, model: nn.Module) -> None:
    """Copy the remote code ``model`` needs into ``folder`` (already written by ``model.save_pretrained``) and
    record its ``auto_map`` in ``folder/config.json``; a plain model's folder is left as it is."""
    from loopreg.surgery.adapters import unwrap

    found = _auto_map(unwrap(model))
    if found is None:
        return
    entry, auto_map = found
    folder = Path(folder)
    for source in remote_code_files(entry):
        shutil.copyfile(source, folder / source.name)
    config_path = folder / CONFIG_NAME
    config = json.loads(config_path.read_text())
    config["auto_map"] = {**config.get("auto_map", {}), **auto_map}
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
