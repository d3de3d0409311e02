"""A :class:`~loopreg.model.LoopedLM` as a transformers causal LM: ``AutoModelForCausalLM.from_pretrained(folder,
trust_remote_code=True)`` loads a LoopedLM folder tied (its stored layers only), and ``generate`` runs through
transformers' GenerationMixin and its ``DynamicCache``, one cache layer per layer *application*.

    >>> # model = AutoModelForCausalLM.from_pretrained("runs/loop_12x2/model", trust_remote_code=True)
    >>> # model.generate(input_ids, max_new_tokens=32, loops=4)   # the (12⊗2)-trained block 4 times

The loop count is ``loops=`` per call (``forward`` and ``generate``), else ``config.loops``, else the spec's.
Copied into model folders as remote code (loopreg.remote_code): it imports torch, transformers and its
siblings (relatively) only.
"""

from __future__ import annotations

from dataclasses import asdict
from typing import Any, Sequence

import torch
from torch import nn
from transformers import DynamicCache, GenerationMixin, PreTrainedModel
from transformers.cache_utils import Cache
from transformers.modeling_outputs import CausalLMOutputWithPast

# transformers 4.53 copies only an entry module's *direct* relative imports out of a local folder into its module
# cache, so every sibling that model.py needs is named here too (tests/test_remote_code.py checks the closure)
from .adaptive import ExitRule, ExitStats, exit_options, generating_with
from .configuration_loopreg import LoopregConfig
from .model import LoopedLM
from .spec import LoopSpec  # noqa: F401
from .update_rules import UPDATE_RULES  # noqa: F401

__all__ = ["LoopregForCausalLM"]

PREFIX = "model."  # LoopregForCausalLM.model: LoopedLM's keys in the wrapper's state dict


class LoopregForCausalLM(PreTrainedModel, GenerationMixin):
    """transformers' face of a :class:`~loopreg.model.LoopedLM`, held as ``self.model``. The folder's
    ``model.safetensors`` has LoopedLM's own keys (``embed.weight``, ...): they gain the ``model.`` prefix on load
    and lose it on save, so a folder saved by either side loads in both."""

    config_class = LoopregConfig
    # no base_model_prefix: transformers would then load the keys into self.model itself, which must be a
    # PreTrainedModel for that; the prefix is handled by the two _fix_state_dict_key_* hooks below instead
    _no_split_modules = ["Layer"]  # device_map="auto" never splits a layer (loopreg.model.Layer)
    # dropped from model.safetensors when tie_word_embeddings; a pattern, matched before and after the prefix hooks
    _tied_weights_keys = ["lm_head.weight"]
    _supports_cache_class = True  # generate() builds a DynamicCache and passes it as past_key_values

    def __init__(self, config: LoopregConfig) -> None:
        super().__init__(config)
        self.model = LoopedLM(config.looped_config())
        # the cache layers at config.loops, also after from_pretrained(..., loops=L) set it; untied + loops raises
        config.num_hidden_layers = len(self.model.schedule(config.loops))
        self.post_init()

    @classmethod
    def from_looped(cls, model: LoopedLM, loops: int | Sequence[int] | None = None) -> LoopregForCausalLM:
        """Wrap an in-memory LoopedLM, its weights shared: ``LoopregForCausalLM.from_looped(model, loops=4)``."""
        config = LoopregConfig(loopreg=asdict(model.config), loops=loops,
                               torch_dtype=str(model.embed.weight.dtype).removeprefix("torch."))
        with torch.device("meta"):  # the LoopedLM built here is replaced at once: allocate nothing
            wrapper = cls(config)
        wrapper.model = model
        return wrapper

    @staticmethod
    def _fix_state_dict_key_on_load(key: str) -> tuple[str, bool]:
        return f"{PREFIX}{key}", True

    @staticmethod
    def _fix_state_dict_key_on_save(key: str) -> tuple[str, bool]:
        return key.removeprefix(PREFIX), key.startswith(PREFIX)

    def _init_weights(self, module: nn.Module) -> None:
        self.model.param_init_fn(module)

    def get_input_embeddings(self) -> nn.Embedding:
        return self.model.embed

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.model.embed = value

    def get_output_embeddings(self) -> nn.Linear:
        return self.model.lm_head

    def set_output_embeddings(self, value: nn.Linear) -> None:
        self.model.lm_head = value

    def forward(self, input_ids: torch.LongTensor, attention_mask: torch.Tensor | None = None,
                past_key_values: Cache | None = None, use_cache: bool | None = None,
                labels: torch.LongTensor | None = None, loops: int | Sequence[int] | None = None,
                cache_position: torch.LongTensor | None = None, inputs_embeds: torch.Tensor | None = None,
                return_dict: bool | None = None, output_attentions: bool | None = None,
                output_hidden_states: bool | None = None, exit: ExitRule | str | None = None,
                kv_policy: str = "per_application", exit_stats: ExitStats | None = None) -> CausalLMOutputWithPast:
        """Logits (and with ``labels`` the shifted next-token loss) of the LoopedLM at ``loops`` (else
        ``config.loops``). ``attention_mask`` (B, past + T) covers the cached positions, as in transformers;
        the positions come from it (left padding), so ``cache_position`` is not needed. ``exit``, ``kv_policy``
        and ``exit_stats`` are LoopedLM's (adaptive exit, :mod:`loopreg.adaptive`), also given to ``generate``."""
        if inputs_embeds is not None or output_attentions or output_hidden_states:
            raise ValueError("LoopregForCausalLM takes input_ids only and returns no attentions or hidden states "
                             "(LoopedLM's own forward has output_hidden=)")
        use_cache = self.config.use_cache if use_cache is None else use_cache
        if use_cache and past_key_values is None:
            past_key_values = DynamicCache()
        cache = past_key_values if use_cache else None
        exit, kv_policy, exit_stats = exit_options(self, exit, kv_policy, exit_stats)
        logits = self.model(input_ids, attention_mask=attention_mask, cache=cache,
                            loops=self.config.loops if loops is None else loops, exit=exit, kv_policy=kv_policy,
                            exit_stats=exit_stats)
        loss = None if labels is None else self.loss_function(logits, labels, vocab_size=self.config.vocab_size)
        return CausalLMOutputWithPast(loss=loss, logits=logits, past_key_values=cache)

    def generate(self, *args: Any, exit: ExitRule | str | None = None, kv_policy: str = "per_application",
                 exit_stats: ExitStats | None = None, **kwargs: Any) -> Any:
        """transformers' ``generate``, its forwards under ``exit``/``kv_policy`` (see :meth:`forward`)."""
        with generating_with(self, *exit_options(self, exit, kv_policy, exit_stats)):
            return super().generate(*args, **kwargs)
