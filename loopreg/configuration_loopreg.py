"""The transformers config of a LoopedLM folder: its ``config.json`` read by ``AutoConfig`` (remote code).

The ``loopreg`` object (the :class:`~loopreg.model.LoopedLMConfig` fields) is the source of truth; the keys
transformers and tools read (``vocab_size``, ``tie_word_embeddings``, ``num_hidden_layers``, ...) are derived
from it. ``loops`` is the loop count the model runs when a call gives none (``None``: the spec's).

    >>> looped = {"spec": "1x1+2x3", "vocab_size": 64, "d_model": 32, "n_heads": 4}
    >>> LoopregConfig(loopreg=looped, loops=5).num_hidden_layers  # layer applications: the cache's layers
    11

Copied into model folders as remote code (loopreg.remote_code): it imports torch, transformers and its
siblings (relatively) only.
"""

from __future__ import annotations

from dataclasses import asdict
from typing import Any, Sequence

from transformers import PretrainedConfig

# transformers 4.53 copies only an entry module's *direct* relative imports out of a local folder into its module
# cache, so every sibling that model.py needs is named here too (tests/test_remote_code.py checks the closure)
from .adaptive import KV_POLICIES  # noqa: F401
from .model import HF_MODEL_TYPE, LoopedLMConfig, hf_config_keys
from .spec import LoopSpec  # noqa: F401
from .update_rules import UPDATE_RULES  # noqa: F401

__all__ = ["LoopregConfig"]


class LoopregConfig(PretrainedConfig):
    """A :class:`~loopreg.model.LoopedLMConfig` (under ``loopreg``) as a transformers config, plus ``loops``."""

    model_type = HF_MODEL_TYPE

    def __init__(self, loopreg: dict[str, Any] | None = None, loops: int | Sequence[int] | None = None,
                 use_cache: bool = True, **kwargs: Any) -> None:
        looped = LoopedLMConfig(**(loopreg or {}))
        self.loopreg = asdict(looped)
        self.loops = list(loops) if isinstance(loops, (list, tuple)) else loops
        self.use_cache = use_cache
        mirrored = hf_config_keys(looped, self.loops)  # also rejects loops on an untied model
        for key, value in mirrored.items():
            given = kwargs.pop(key, value)
            # num_hidden_layers follows `loops`; a config.json written at other loops is re-derived, not an error
            if given != value and key != "num_hidden_layers":
                raise ValueError(f"config.json: {key}={given!r} disagrees with its 'loopreg' object, which gives "
                                 f"{value!r} (the 'loopreg' object is the source of truth)")
        tie_word_embeddings = mirrored.pop("tie_word_embeddings")
        for key, value in mirrored.items():
            setattr(self, key, value)
        super().__init__(tie_word_embeddings=tie_word_embeddings, **kwargs)

    def looped_config(self) -> LoopedLMConfig:
        """The :class:`~loopreg.model.LoopedLMConfig` to build the model from.

        >>> LoopregConfig(loopreg={"spec": "2x3", "vocab_size": 64, "d_model": 32, "n_heads": 4}).looped_config().spec
        '2x3'
        """
        return LoopedLMConfig(**self.loopreg)
