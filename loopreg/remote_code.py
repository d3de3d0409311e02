"""Looped model folders that plain ``transformers`` loads, tied: at save time the folder receives the model's own
code as Hugging Face *remote code* (the modules themselves, copied, never a second hand-kept copy) and its
``config.json`` an ``auto_map`` naming the classes in them, as Hub checkpoints with custom code do.

    >>> # model.save_pretrained("runs/smollm2_middle")   # a looped model's save_pretrained calls attach_remote_code
    >>> # AutoModelForCausalLM.from_pretrained("runs/smollm2_middle", trust_remote_code=True)  # no loopreg needed

The copied modules (an entry module and every module it imports relatively, found the way transformers finds
them) depend on torch and transformers only: ``tests/test_remote_code*.py`` load such folders with loopreg
unimportable, under every transformers version of ``docs/ECOSYSTEM.md``. This module is one of them: a folder
loaded from its remote code saves itself with its remote code too.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

__all__ = ["attach_remote_code", "remote_code_files"]


def remote_code_files(entry_file: str | Path) -> list[Path]:
    """The source files an entry module needs in a model folder: itself and its relative imports, recursively.

    >>> sorted(path.name for path in remote_code_files(__file__))
    ['remote_code.py']
    """
    from transformers.dynamic_module_utils import get_relative_import_files

    return [Path(entry_file), *map(Path, get_relative_import_files(str(entry_file)))]


def attach_remote_code(folder: str | Path, entry_file: str | Path, auto_map: dict[str, str]) -> None:
    """Copy the entry module ``entry_file`` and its relative imports into ``folder`` (already written by
    ``save_pretrained``) and add ``auto_map`` (``{"AutoModelForCausalLM": "module.Class"}``) to its config."""
    folder = Path(folder)
    for source in remote_code_files(entry_file):
        if source.resolve() != (folder / source.name).resolve():  # a folder saved over its own loaded code
            shutil.copyfile(source, folder / source.name)
    config_path = folder / "config.json"
    config = json.loads(config_path.read_text())
    config["auto_map"] = {**config.get("auto_map", {}), **auto_map}
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
