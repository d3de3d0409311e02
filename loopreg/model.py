"""LoopedLM: a decoder-only causal LM whose layers are laid out by a loop spec, and a transformers model.

The whole model in one file, nanoGPT style. Pre-norm RMSNorm, rotary positions, grouped-query attention through
``scaled_dot_product_attention`` (fused kernels on GPU), GELU or SwiGLU MLP. The layer layout follows Llama's names
and conventions so a SwiGLU model unrolls into a plain Hugging Face ``LlamaForCausalLM`` with identical logits.

* **tied** (``tied=True``): ``spec.distinct_layers`` layers, applied in ``spec.schedule`` order. A true looped model;
  ``loops=`` at call time runs the same weights more or fewer times.
* **untied** (``tied=False``): one layer per application (``spec.effective_depth`` layers), grouped into the spec's
  blocks by ``spec.tie_groups``; what the cosine regularizer pulls toward the tied model.

It is a ``PreTrainedModel`` with ``GenerationMixin``: ``generate`` is transformers' (one cache layer per layer
application), ``save_pretrained`` writes a folder with this code in it, and plain transformers loads that folder
tied: ``AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)``. Its layer applications run
through the looping core (:mod:`loopreg.looping`).

    >>> model = LoopedLM(LoopedLMConfig(spec="2x3", vocab_size=64, d_model=32, n_heads=4))
    >>> model(torch.zeros(1, 5, dtype=torch.long)).logits.shape
    torch.Size([1, 5, 64])

Portable: copied into model folders as remote code (torch, transformers and its siblings only).
"""

from __future__ import annotations

import functools
import inspect
import math
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutputWithPast

# Every sibling the remote code needs is imported here directly: transformers 4.53 copies only an entry module's
# direct relative imports into its module cache (tests/test_remote_code.py checks the closure).
from .adaptive import ExitRule, ExitStats
from .configuration_loopreg import LoopedLMConfig, LoopregConfig
from .errors import UserError
from .hf_compat import CACHE_KEY, cache_of, generation_cache, lazy_cache, tied_weights_keys
from .latent import feed_soft_tokens, mask_finished_steps, placeholder_steps
from .looping import LoopPlan, batch_option
from .relaxed import RELAX_KEY, applied, checkpointable, relax_stack
from .remote_code import attach_remote_code
from .spec import LoopSpec
from .update_rules import UPDATE_RULES  # noqa: F401

__all__ = ["LoopedLM", "LoopedLMConfig", "LoopedLMOutput", "batch_option"]

# What forward returns: logits, the loss with labels, the cache, and with output_hidden the residual stream after
# the requested layer applications, as {application: (B, T, d)}.
LoopedLMOutput = CausalLMOutputWithPast
# The classes a folder's config.json names for plain transformers (remote code; see save_pretrained).
AUTO_MAP = {"AutoConfig": "configuration_loopreg.LoopregConfig", "AutoModelForCausalLM": "model.LoopedLM"}


def rotary(positions: torch.Tensor, head_dim: int, theta: float,
           dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin tables of shape (B, 1, T, head_dim) in Llama's half-split layout; computed per call so the
    model holds no buffers and builds on the meta device."""
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, device=positions.device, dtype=torch.float32) / head_dim)
    angles = positions.float()[..., None] * inv_freq
    angles = torch.cat((angles, angles), dim=-1)[:, None]
    return angles.cos().to(dtype), angles.sin().to(dtype)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


class Attention(nn.Module):
    def __init__(self, config: LoopedLMConfig) -> None:
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = config.n_heads, config.kv_heads, config.head_dim
        self.q_proj = nn.Linear(config.d_model, config.n_heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(config.d_model, self.n_kv_heads * self.head_dim, bias=False)
        self.v_proj = nn.Linear(config.d_model, self.n_kv_heads * self.head_dim, bias=False)
        self.o_proj = nn.Linear(config.n_heads * self.head_dim, config.d_model, bias=False)
        self.o_proj.residual_out = True  # init scaled by depth (LoopedLM.param_init_fn)

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], mask: torch.Tensor | None,
                cache: Any | None, slot: int) -> torch.Tensor:
        batch, length, _ = x.shape
        q = self.q_proj(x).view(batch, length, self.n_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(batch, length, self.n_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(batch, length, self.n_kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rotary(q, *rope), apply_rotary(k, *rope)
        if cache is not None:
            k, v = cache.update(k, v, slot)
        if self.n_kv_heads != self.n_heads:
            repeat = self.n_heads // self.n_kv_heads
            k, v = k.repeat_interleave(repeat, dim=1), v.repeat_interleave(repeat, dim=1)
        if mask is None:  # plain causal self-attention: the fused (flash) kernel path
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.o_proj(out.transpose(1, 2).reshape(batch, length, -1))


class MLP(nn.Module):
    def __init__(self, config: LoopedLMConfig) -> None:
        super().__init__()
        self.gated = config.mlp == "swiglu"
        self.up_proj = nn.Linear(config.d_model, config.ffn_dim, bias=False)
        if self.gated:
            self.gate_proj = nn.Linear(config.d_model, config.ffn_dim, bias=False)
        self.down_proj = nn.Linear(config.ffn_dim, config.d_model, bias=False)
        self.down_proj.residual_out = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.gated:
            return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))
        return self.down_proj(F.gelu(self.up_proj(x)))


class Layer(nn.Module):
    """One pre-norm transformer layer; the FSDP and activation-checkpointing unit."""

    def __init__(self, config: LoopedLMConfig) -> None:
        super().__init__()
        self.attn_norm = nn.RMSNorm(config.d_model, eps=config.norm_eps)
        self.attn = Attention(config)
        self.mlp_norm = nn.RMSNorm(config.d_model, eps=config.norm_eps)
        self.mlp = MLP(config)

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], mask: torch.Tensor | None = None,
                cache: Any | None = None, slot: int = 0) -> torch.Tensor:
        x = x + self.attn(self.attn_norm(x), rope, mask, cache, slot)
        return x + self.mlp(self.mlp_norm(x))


class LoopedLM(PreTrainedModel, GenerationMixin):
    """Decoder-only causal LM laid out by a :class:`~loopreg.spec.LoopSpec` (see the module docstring); built from a
    :class:`LoopedLMConfig` or the :class:`LoopregConfig` of a folder.

    >>> model = LoopedLM(LoopedLMConfig(spec="1x4", vocab_size=32, d_model=16, n_heads=2))
    >>> model.num_distinct_layers, model.tied
    (1, True)
    """

    config_class = LoopregConfig
    _no_split_modules = ["Layer"]  # device_map="auto" never splits a layer
    _tied_weights_keys = tied_weights_keys("lm_head.weight", "embed.weight")  # used with tie_word_embeddings only
    _supports_cache_class = True  # transformers 4.x: generate passes its Cache objects to forward

    def __init__(self, config: LoopedLMConfig | LoopregConfig) -> None:
        if isinstance(config, LoopedLMConfig):
            config = LoopregConfig(loopreg=config)
        super().__init__(config)
        arch = config.arch
        self.spec = arch.loop_spec
        # the cache layers at config.loops, also after from_pretrained(..., loops=L) set it (an untied model raises)
        config.num_hidden_layers = len(LoopPlan(self.spec, arch.tied, config.loops).steps)
        self.embed = nn.Embedding(arch.vocab_size, arch.d_model)
        if arch.learned_positions:
            self.position_embed = nn.Embedding(arch.max_seq_len, arch.d_model)
        self.layers = nn.ModuleList(Layer(arch) for _ in range(arch.n_layers))
        self.norm = nn.RMSNorm(arch.d_model, eps=arch.norm_eps)
        self.lm_head = nn.Linear(arch.d_model, arch.vocab_size, bias=False)
        if arch.tie_word_embeddings:
            self.lm_head.weight = self.embed.weight
        if arch.placeholder_id is not None and self.generation_config is not None:
            self.generation_config.suppress_tokens = [arch.placeholder_id]  # latent steps are inputs, never outputs
        self.post_init()  # initialises every module through _init_weights (not under from_pretrained's loading)
        if getattr(config, RELAX_KEY, None) is not None:  # zero deltas of the saved shapes; from_pretrained loads them
            relax_stack(self.layers, self.spec, arch.tied, getattr(config, RELAX_KEY))

    # ------------------------------------------------------------------ layout
    @property
    def loop_spec(self) -> LoopSpec:
        """The loop spec this model runs (the protocol it shares with looped retrofits)."""
        return self.spec

    @property
    def tied(self) -> bool:
        return self.config.tied

    @property
    def num_distinct_layers(self) -> int:
        return len(self.layers)

    def schedule(self, loops: int | Sequence[int] | None = None) -> tuple[int, ...]:
        """Index into ``self.layers`` of each layer application, optionally with a loop-count override."""
        return tuple(step.layer for step in LoopPlan(self.spec, self.tied, loops).steps)

    # ------------------------------------------------------------ init (and FSDP hooks)
    def param_init_fn(self, module: nn.Module) -> None:
        """Initialise one submodule in place; also the FSDP ``param_init_fn`` for ``init_device: meta``.
        Residual output projections are scaled by 1/sqrt(2·D) for the effective depth D (or ``init_depth``)."""
        # .get: a folder saved before init_depth existed has no such key (and arch would rebuild the whole config)
        std, depth = self.config.init_std, self.config.loopreg.get("init_depth") or self.spec.effective_depth
        if isinstance(module, nn.Linear):
            scale = math.sqrt(2 * depth) if getattr(module, "residual_out", False) else 1.0
            nn.init.normal_(module.weight, mean=0.0, std=std / scale)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=std)
        elif isinstance(module, nn.RMSNorm):
            nn.init.ones_(module.weight)

    def _init_weights(self, module: nn.Module) -> None:
        self.param_init_fn(module)

    def fsdp_wrap_fn(self, module: nn.Module) -> bool:
        """Composer's FSDP policy: every distinct layer is its own unit (a looped layer stays one unit)."""
        return isinstance(module, Layer)

    def activation_checkpointing_fn(self, module: nn.Module) -> bool:
        return isinstance(module, Layer) and checkpointable(module)

    def get_input_embeddings(self) -> nn.Embedding:
        return self.embed

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.embed = value

    def get_output_embeddings(self) -> nn.Linear:
        return self.lm_head

    def set_output_embeddings(self, value: nn.Linear) -> None:
        self.lm_head = value

    # ------------------------------------------------------------------ forward
    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, cache: Any | None = None,
                loops: int | Sequence[int] | torch.Tensor | None = None, grad_loops: int | torch.Tensor | None = None,
                checkpoint: bool = False, output_hidden: bool | Sequence[int] = False,
                exit: ExitRule | str | None = None, kv_policy: str = "per_application",
                exit_stats: ExitStats | None = None, labels: torch.Tensor | None = None,
                use_cache: bool | None = None, logits_to_keep: int = 0, **hf_kwargs: Any) -> LoopedLMOutput:
        """Logits (B, T, vocab) for ``input_ids`` (B, T), as :data:`LoopedLMOutput` (``.logits``; ``.loss`` with
        HF-style ``labels``, shifted here; the cache; with ``output_hidden`` the residual stream after every layer
        application (``True``) or the listed ones, ``.hidden_states[application]``).

        ``attention_mask`` (B, T_total; 1 = real token, 0 = left padding) covers cached positions too; the positions
        come from it; ``logits_to_keep=n`` computes the logits of the last n positions only (0: all; transformers'
        ``generate`` asks for 1). ``cache`` is a transformers cache (``past_key_values`` in transformers 4.x), or a
        new one with ``use_cache``. ``loops`` overrides the loop counts (else ``config.loops``, else the spec's).
        Training knobs: ``grad_loops=k`` backpropagates through the thinking block's last k iterations only,
        ``checkpoint`` recomputes each layer in backward. Inference knobs (:mod:`loopreg.adaptive`): ``exit``
        (``'kl:0.01'``) lets tokens leave the thinking block early, ``kv_policy='shared'`` keeps one cache slot per
        stored layer, ``exit_stats`` accumulates the iterations run. Everything between the layers is the forward's
        :class:`~loopreg.looping.LoopPlan`.
        """
        cache = cache if cache is not None else cache_of(hf_kwargs)
        unsupported = [key for key in ("inputs_embeds", "output_attentions", "output_hidden_states")
                       if hf_kwargs.get(key)]
        if unsupported:
            raise UserError(f"LoopedLM takes input_ids and returns no attentions or transformers-style hidden states; "
                            f"got {', '.join(unsupported)} (its own forward has output_hidden=)")
        if cache is None and use_cache:
            cache = lazy_cache()
        if checkpoint and cache is not None:
            raise UserError("checkpoint=True is for training; it cannot be combined with a KV cache")
        arch = self.config.arch
        batch, length = input_ids.shape
        past = cache.get_seq_length() if cache is not None else 0
        x = self.embed(input_ids)
        positions, mask = self._positions_and_mask(batch, length, past, attention_mask, x.device)
        if arch.learned_positions:
            if past + length > arch.max_seq_len:  # the position table ends there; RoPE alone has no such end
                raise UserError(f"{past + length} positions exceed max_seq_len={arch.max_seq_len}, the learned "
                                "position table of this model")
            x = x + self.position_embed(positions)
        rope = rotary(positions, arch.head_dim, arch.rope_theta, x.dtype)
        latent = arch.latent_mask or arch.latent_feedback == "soft_token"
        plan = LoopPlan(self.spec, arch.tied, self.config.loops if loops is None else loops, grad_loops, arch.update,
                        arch.anchor, checkpoint, latent, exit, kv_policy, decode=self._decode, scratch=lazy_cache,
                        real=attention_mask, exit_stats=exit_stats)
        steps = placeholder_steps(input_ids, arch.placeholder_id, arch.placeholders_per_step) if latent else None
        if arch.latent_mask:
            mask_finished_steps(plan, steps)
        if output_hidden is not False:
            plan.keep_hidden(output_hidden)
        if arch.latent_feedback == "soft_token":
            feed_soft_tokens(plan, self, steps, positions)
        layer_cache, plain = plan.cache(cache), plan.plain
        for slot, step in enumerate(plan.steps):
            layer = applied(self.layers[step.layer], step.application)
            if plain:
                x = layer(x, rope, mask, layer_cache, slot)
            else:
                x = plan.apply(slot, x, functools.partial(layer, rope=rope, mask=mask, cache=layer_cache, slot=slot))
        logits = self.lm_head(self.norm(x[:, -logits_to_keep:]))  # generate keeps the last position only
        loss = None if labels is None else self.loss_function(logits, labels, vocab_size=arch.vocab_size)
        hidden = plan.hidden if output_hidden is not False else None
        return LoopedLMOutput(loss=loss, logits=logits, hidden_states=hidden, **{CACHE_KEY: cache})

    def _decode(self, h: torch.Tensor) -> torch.Tensor:
        """Next-token logits of a residual-stream state (adaptive exit's ``kl`` criterion)."""
        return self.lm_head(self.norm(h))

    def placeholder_steps(self, input_ids: torch.Tensor) -> torch.Tensor:
        """(B, T): the CoT step each placeholder token stands for, -1 for other tokens (:mod:`loopreg.latent`)."""
        return placeholder_steps(input_ids, self.config.placeholder_id, self.config.placeholders_per_step)

    @staticmethod
    def _positions_and_mask(batch: int, length: int, past: int, attention_mask: torch.Tensor | None,
                            device: torch.device) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Rotary positions and the (B, 1, T, T_total) attention mask; ``None`` means plain causal (fast path)."""
        total = past + length
        keys = torch.arange(total, device=device)
        queries = torch.arange(past, total, device=device)
        if attention_mask is None:
            positions = queries.expand(batch, length)
            if past == 0:
                return positions, None
            return positions, (keys[None, :] <= queries[:, None]).expand(batch, length, total)[:, None]
        if attention_mask.shape != (batch, total):
            raise UserError(f"attention_mask has shape {tuple(attention_mask.shape)}; expected {(batch, total)} "
                            "(it must cover cached and new positions)")
        real = attention_mask.bool()
        # Left padding: a token's position counts real tokens before it, as Hugging Face models do.
        positions = (real.long().cumsum(-1) - 1).clamp(min=0)[:, past:]
        mask = (keys[None, :] <= queries[:, None])[None] & real[:, None, :]
        # A padding query would see no key at all (NaN softmax); let it see itself. Its output is unused.
        mask |= (keys[None, :] == queries[:, None])[None]
        return positions, mask[:, None]  # broadcast over heads

    # --------------------------------------------------------- generation / saving
    def generate(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        """transformers' ``generate``; ``loops=``, ``exit=``, ``kv_policy=`` and ``exit_stats=`` reach every forward.

        >>> # model.generate(input_ids, max_new_tokens=32, loops=4)   # the (12⊗2)-trained block 4 times
        """
        if kwargs.get("use_cache", True) and cache_of(kwargs) is None:
            # a loop override outgrows a cache sized by the config
            kwargs[CACHE_KEY] = generation_cache(args, kwargs, self.generation_config)
        return super().generate(*args, **kwargs)

    def save_pretrained(self, save_directory: str | Path, **kwargs: Any) -> None:
        """transformers' ``save_pretrained`` plus this model's code (remote code) and the ``auto_map`` naming it, so
        plain transformers loads the folder tied."""
        super().save_pretrained(save_directory, **kwargs)
        attach_remote_code(save_directory, __file__, AUTO_MAP)


# transformers' generate inspects the forward's signature at every step (prepare_inputs_for_generation, about 0.2 ms
# a call): computed once, that is a lookup
LoopedLM.forward.__signature__ = inspect.signature(LoopedLM.forward)
