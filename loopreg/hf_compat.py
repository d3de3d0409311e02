"""What differs between the transformers versions that read looped folders (4.53 pinned, 4.57, 5.x), in one place:
each difference is detected from the installed transformers and named here, and the model code has one path.

    >>> CACHE_KEY in ("cache", "past_key_values")
    True

Portable: copied into model folders as remote code (torch, transformers and the standard library only).
"""

from __future__ import annotations

import functools
import inspect
from typing import Any

import torch
import transformers
from transformers import DynamicCache, cache_utils
from transformers.modeling_outputs import CausalLMOutputWithPast

__all__ = ["CACHE_KEY", "TRANSFORMERS_MAJOR", "tied_weights_keys", "cache_parameter", "lazy_cache", "generation_cache",
           "cache_of"]

TRANSFORMERS_MAJOR = int(transformers.__version__.split(".")[0])

# transformers 5.2x renamed the KV cache's forward keyword and output field from `past_key_values` to `cache`
# (the old keyword is deprecated there until 5.40): the name this transformers uses in both places.
CACHE_KEY = "cache" if "cache" in CausalLMOutputWithPast.__dataclass_fields__ else "past_key_values"

# transformers 4.56 made a cache's layers objects (`DynamicLayer`); 4.53 keeps per-layer tensor lists.
_DYNAMIC_LAYER = getattr(cache_utils, "DynamicLayer", None)

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


def _append(buffer: torch.Tensor | None, stored: torch.Tensor, new: torch.Tensor,
            capacity: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """``(buffer, view)``: ``stored`` followed by ``new`` along the sequence axis, as a view of ``buffer``, whose
    capacity doubles when full: a decoding step copies its own keys, not the whole cache as ``torch.cat`` does (an
    O(T) step instead of O(T²) decoding). ``stored`` is reused in place while it is this buffer's view; anything
    else (a first step, a cache cropped or reordered by the generation loop) starts a new buffer, of ``capacity``
    positions when they suffice: attention reads a view of the buffer, and a buffer larger than needed makes it
    slower (a 64-position buffer for 52 positions costs a decode step about 5%)."""
    length = stored.shape[-2] if stored.dim() == new.dim() else 0
    end = length + new.shape[-2]
    reusable = (buffer is not None and stored.data_ptr() == buffer.data_ptr() and end <= buffer.shape[-2]
                and buffer.shape[:-2] == new.shape[:-2] and buffer.dtype == new.dtype)
    if not reusable:
        size = capacity if end <= capacity else max(64, 2 * end)
        buffer = new.new_empty((*new.shape[:-2], size, new.shape[-1]))
        if length:
            buffer.narrow(-2, 0, length).copy_(stored)
    buffer.narrow(-2, length, end - length).copy_(new)  # narrow: a third cheaper than slicing with an ellipsis
    return buffer, buffer.narrow(-2, 0, end)


if _DYNAMIC_LAYER is not None:
    class _GrowingLayer(_DYNAMIC_LAYER):
        """A cache layer of transformers >= 4.56 (``DynamicLayer``) that grows by :func:`_append`."""

        def __init__(self, capacity: int = 0) -> None:
            super().__init__()
            self.capacity = capacity

        def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any,
                   **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
            if not self.is_initialized:  # the version's own lazy initialization (its signature changed in 5.x)
                super().update(key_states[..., :0, :], value_states[..., :0, :])
            self._key_buffer, self.keys = _append(getattr(self, "_key_buffer", None), self.keys, key_states,
                                                  self.capacity)
            self._value_buffer, self.values = _append(getattr(self, "_value_buffer", None), self.values, value_states,
                                                      self.capacity)
            return self.keys, self.values


class _GrowingCache(DynamicCache):
    """transformers 4.53's ``DynamicCache`` (per-layer tensor lists, no layer objects) growing by :func:`_append`."""

    def __init__(self, capacity: int = 0) -> None:
        super().__init__()
        self.capacity = capacity
        self._buffers: dict[int, tuple[torch.Tensor | None, torch.Tensor | None]] = {}

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int,
               cache_kwargs: dict[str, Any] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        while len(self.key_cache) <= layer_idx:  # a slot first written after a later one (layers skipped by exit)
            self.key_cache.append(torch.tensor([]))
            self.value_cache.append(torch.tensor([]))
        key_buffer, value_buffer = self._buffers.get(layer_idx, (None, None))
        key_buffer, self.key_cache[layer_idx] = _append(key_buffer, self.key_cache[layer_idx], key_states,
                                                        self.capacity)
        value_buffer, self.value_cache[layer_idx] = _append(value_buffer, self.value_cache[layer_idx], value_states,
                                                            self.capacity)
        self._buffers[layer_idx] = key_buffer, value_buffer
        return self.key_cache[layer_idx], self.value_cache[layer_idx]


def lazy_cache(capacity: int = 0) -> Any:
    """An empty ``DynamicCache`` that grows a layer per cache slot written, each layer by doubling a buffer: a loop
    override at call time outgrows a cache that transformers sizes by the config's ``num_hidden_layers``; built
    without a config it is lazy in every version. ``capacity``: the positions a buffer starts with (when known, as
    in ``generate``). Cache layers became objects (``DynamicLayer``) in 4.56."""
    if _DYNAMIC_LAYER is None:
        return _GrowingCache(capacity)
    cache = DynamicCache()
    # what a lazy DynamicCache appends per new slot (4.56+), called without arguments
    cache.layer_class_to_replicate = functools.partial(_GrowingLayer, capacity) if capacity else _GrowingLayer
    return cache


def generation_cache(args: tuple, kwargs: dict[str, Any], generation_config: Any) -> Any:
    """The cache of a ``generate(*args, **kwargs)`` call: a :func:`lazy_cache` whose buffers hold the prompt and
    ``max_new_tokens`` from the start, when the call names both."""
    ids = kwargs.get("input_ids", args[0] if args else None)
    new = kwargs.get("max_new_tokens", (kwargs.get("generation_config") or generation_config).max_new_tokens)
    return lazy_cache(ids.shape[-1] + new if isinstance(ids, torch.Tensor) and new else 0)


def cache_of(kwargs: dict[str, Any]) -> Any:
    """The KV cache among a model forward's keyword arguments, under either version's name."""
    return kwargs.get("cache", kwargs.get("past_key_values"))
