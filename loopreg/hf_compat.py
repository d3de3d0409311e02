"""What differs between the transformers versions that read looped folders (4.53 pinned, 4.57, 5.x), in one place:
each difference is detected from the installed transformers and named here, and the model code has one path.

    >>> CACHE_KEY in ("cache", "past_key_values")
    True

Portable: copied into model folders as remote code (transformers and the standard library only).
"""

from __future__ import annotations

import functools
import inspect
from typing import Any

import transformers
from transformers import DynamicCache
from transformers.modeling_outputs import CausalLMOutputWithPast

__all__ = ["CACHE_KEY", "TRANSFORMERS_MAJOR", "tied_weights_keys", "cache_parameter", "lazy_cache", "cache_of"]

TRANSFORMERS_MAJOR = int(transformers.__version__.split(".")[0])

# transformers 5.2x renamed the KV cache's forward keyword and output field from `past_key_values` to `cache`
# (the old keyword is deprecated there until 5.40): the name this transformers uses in both places.
CACHE_KEY = "cache" if "cache" in CausalLMOutputWithPast.__dataclass_fields__ else "past_key_values"

# How decoder layers name the cache argument: `cache` (5.2x), `past_key_values` (4.56+), `past_key_value` (4.53),
# `layer_past` (GPT-NeoX, GPT-2 in some versions).
_LAYER_CACHE_NAMES = ("cache", "past_key_values", "past_key_value", "layer_past")


def tied_weights_keys(head: str, embedding: str) -> list[str] | dict[str, str]:
    """``_tied_weights_keys`` for an LM head tied to the input embedding: transformers 5 maps each tied weight to
    its source, 4.x lists the tied weights.

    >>> tied_weights_keys("lm_head.weight", "embed.weight") in (["lm_head.weight"], {"lm_head.weight": "embed.weight"})
    True
    """
    return {head: embedding} if TRANSFORMERS_MAJOR >= 5 else [head]


@functools.cache
def cache_parameter(layer_type: type) -> tuple[str, int]:
    """(name, positional index after ``hidden_states``) of the cache argument of a decoder layer's forward."""
    names = list(inspect.signature(layer_type.forward).parameters)[1:]  # without self
    for name in _LAYER_CACHE_NAMES:
        if name in names:
            return name, names.index(name)
    raise TypeError(f"{layer_type.__name__}.forward takes no KV cache argument (looked for {_LAYER_CACHE_NAMES})")


def lazy_cache() -> Any:
    """An empty ``DynamicCache`` that grows a layer per cache slot written: transformers 5 sizes a cache built from a
    config by ``num_hidden_layers``, which a loop override at call time outgrows; built without one it is lazy
    in every version."""
    return DynamicCache()


def cache_of(kwargs: dict[str, Any]) -> Any:
    """The KV cache among a model forward's keyword arguments, under either version's name."""
    return kwargs.get("cache", kwargs.get("past_key_values"))
