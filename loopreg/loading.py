"""One loader for every model source: ``loopreg.load(source, **options)``.

* a LoopedLM folder (``config.json`` with a ``loopreg`` object) → :class:`~loopreg.model.LoopedLM`;
* a retrofit folder (``loopreg_spec`` in an HF config, tied or untied) → the looped variant of its class
  (:mod:`loopreg.looped_hf`), tied ones with the stored layers only;
* a plain Hugging Face folder, or a hub id → its ``AutoModelForCausalLM`` class;
* a ``.gguf`` file → dequantized through transformers;
* a Composer checkpoint file with the ``recipe`` that trained it → :class:`~loopreg.model.LoopedLM`.

Each comes back as a transformers model (``forward(...).logits``, ``generate``, ``save_pretrained``); a looped one
answers ``loop_spec`` and ``tied`` (:func:`~loopreg.surgery.core.looped_spec`). A folder whose weights do not fit
its config (missing or unexpected keys: a loop spec with another layer count) or whose weights file is truncated is
a one-line :class:`~loopreg.errors.UserError`, never a silently re-initialised model.

    >>> # loopreg.load("runs/smollm2_middle", loops=8).generate(ids, max_new_tokens=16)
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from torch import nn

from loopreg.errors import CheckpointError, UserError

__all__ = ["load"]

CONFIG_NAME = "config.json"


def load(source: str | Path, *, recipe: str | Path | None = None, loops: int | list[int] | None = None,
         **from_pretrained_kwargs: Any) -> nn.Module:
    """The model at ``source`` (see the module docstring). ``loops`` sets a looped model's default loop count;
    ``from_pretrained_kwargs`` (``torch_dtype="auto"``, ``gguf_file=...``) go to ``from_pretrained``.

    >>> # load("runs/loop_4x6/checkpoints/latest-rank0.pt", recipe="recipes/reg_loop_4x6.yaml")
    """
    path = Path(source)
    if path.suffix == ".gguf":
        if not path.is_file():
            raise UserError(f"{path}: GGUF file not found")
        if loops is not None:
            raise UserError(f"loops={loops!r}: {path.name} is a plain checkpoint; loop it first with `loopreg surgery`")
        from transformers import AutoModelForCausalLM

        return AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, **from_pretrained_kwargs)
    if path.is_file():
        return _composer_checkpoint(path, recipe, loops)
    if path.is_dir():
        return _folder(path, str(path), loops, from_pretrained_kwargs)
    if path.exists() or str(source).startswith((".", "/", "~")):
        raise UserError(f"{source}: not a model folder, a .gguf file, a Composer checkpoint or a hub id")
    return _folder(None, str(source), loops, from_pretrained_kwargs)  # a hub id, e.g. HuggingFaceTB/SmolLM2-135M


def _folder(path: Path | None, name: str, loops: Any, kwargs: dict[str, Any]) -> nn.Module:
    """A LoopedLM, retrofit or plain HF model from a folder (``path``) or a hub id (``path`` is ``None``)."""
    from transformers import AutoConfig, PretrainedConfig

    hub = {key: kwargs[key] for key in ("cache_dir", "revision", "token", "local_files_only") if key in kwargs}
    def hub_error(err: Exception) -> UserError:  # no such hub id offline, an unknown model_type
        return UserError(f"{name}: not a loadable model config ({str(err).splitlines()[0]})")

    try:  # the raw config.json: a LoopedLM's (model type 'loopreg') is read by loopreg's own class, no remote code
        raw = _read_config(path) if path is not None else PretrainedConfig.get_config_dict(name, **hub)[0]
    except OSError as err:
        raise hub_error(err) from None
    if "loopreg" in raw:
        from loopreg.model import LoopedLM

        return _checked(LoopedLM, name, {"loops": loops} if loops is not None else {}, kwargs)
    try:
        config = AutoConfig.from_pretrained(name, **hub)
    except (OSError, ValueError, KeyError) as err:
        raise hub_error(err) from None
    from loopreg.looped_hf import LOOPS_KEY, SPEC_KEY, looped_class
    from loopreg.surgery.core import mark_layer_units

    if getattr(config, SPEC_KEY, None) is None:
        if loops is not None:
            raise UserError(f"loops={loops!r}: {name} is a plain checkpoint; loop it first with `loopreg surgery`")
        from transformers import AutoModelForCausalLM

        return _checked(AutoModelForCausalLM, name, {"config": config}, kwargs)
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

    if type(config) not in MODEL_FOR_CAUSAL_LM_MAPPING:
        raise UserError(f"{name}: model type '{config.model_type}' has no causal-LM class in this transformers")
    overrides = {LOOPS_KEY: loops} if loops is not None else {}
    model = _checked(looped_class(MODEL_FOR_CAUSAL_LM_MAPPING[type(config)]), name, overrides, kwargs)
    mark_layer_units(model)
    return model


def _read_config(path: Path) -> dict[str, Any]:
    file = path / CONFIG_NAME
    if not file.is_file():
        raise UserError(f"{path}: not a model folder (no {CONFIG_NAME}); expected a loopreg, retrofit or Hugging Face "
                        "model folder")
    try:
        raw = json.loads(file.read_text())
    except json.JSONDecodeError as err:
        raise UserError(f"{file}: not JSON ({err})") from None
    if not isinstance(raw, dict):
        raise UserError(f"{file}: not a model config (a JSON object)")
    return raw


def _checked(model_class: Any, name: str, config_overrides: dict[str, Any], kwargs: dict[str, Any]) -> nn.Module:
    """``model_class.from_pretrained``, refusing what transformers only warns about: weights that do not fit the
    config (missing or unexpected keys would leave layers randomly initialised) and unreadable weight files."""
    from safetensors import SafetensorError

    try:
        model, info = model_class.from_pretrained(name, output_loading_info=True, **config_overrides, **kwargs)
    except OSError as err:  # no weights file, an unreadable one
        raise UserError(f"{name}: cannot load its weights ({str(err).splitlines()[0]})") from None
    except RuntimeError as err:  # a weight whose shape does not fit the config
        raise UserError(f"{name}: its weights do not fit its config ({str(err).splitlines()[0]})") from None
    except SafetensorError as err:  # a truncated or corrupt weights file
        raise UserError(f"{name}: unreadable weights file ({err})") from None
    wrong = {kind: sorted(info.get(kind) or ()) for kind in ("missing_keys", "unexpected_keys", "mismatched_keys")}
    wrong = {kind: keys for kind, keys in wrong.items() if keys}
    if wrong:
        kind, keys = next(iter(wrong.items()))
        more = f" (+{len(keys) - 3} more)" if len(keys) > 3 else ""
        raise UserError(f"{name}: its weights do not fit its config: {kind.replace('_', ' ')} {', '.join(keys[:3])}"
                        f"{more}; does the config's loop spec match the saved layers?")
    return model


def _composer_checkpoint(path: Path, recipe: str | Path | None, loops: Any) -> nn.Module:
    """A LoopedLM from a Composer checkpoint file and the recipe that trained it (the checkpoint has no shape)."""
    import torch

    from loopreg.checkpoints import check_checkpoint
    from loopreg.config import load_recipe, model_config
    from loopreg.configuration_loopreg import LoopregConfig
    from loopreg.model import LoopedLM

    if recipe is None:
        raise UserError(f"{path}: a Composer checkpoint does not record the model's shape; pass --recipe RECIPE.yaml")
    check_checkpoint(path)  # torch.load would load a flipped byte silently, or fail with a zip-reader traceback
    model = LoopedLM(LoopregConfig(loopreg=model_config(load_recipe(recipe).model), loops=loops))
    checkpoint = torch.load(path, map_location="cpu", weights_only=False)  # a local file the user trained
    try:
        weights = checkpoint["state"]["model"]
    except (KeyError, TypeError):
        raise CheckpointError(f"{path}: not a Composer checkpoint (no state.model)") from None
    try:
        model.load_state_dict({name.removeprefix("model."): tensor for name, tensor in weights.items()})
    except RuntimeError as err:  # the recipe is another model's: torch lists each missing or misshapen weight
        first = (str(err).splitlines()[1:] or [str(err)])[0].strip()
        raise CheckpointError(f"{path}: its weights do not fit the model of {recipe} ({first})") from None
    return model
