"""LoopedLM: a decoder-only causal LM whose layers are laid out by a loop spec.

The whole model in one file, nanoGPT style. Pre-norm RMSNorm, rotary positions, grouped-query
attention through ``scaled_dot_product_attention`` (fused kernels on GPU), GELU or SwiGLU MLP. The
layer layout follows Llama's names and conventions so a SwiGLU model unrolls into a plain Hugging
Face ``LlamaForCausalLM`` with identical logits.

* **tied** (``tied=True``): ``spec.distinct_layers`` layers, applied in ``spec.schedule`` order. A true
  looped model; ``loops=`` at call time runs the same weights more or fewer times.
* **untied** (``tied=False``): one layer per application (``spec.effective_depth`` layers), grouped into
  the spec's blocks by ``spec.tie_groups``; what the cosine regularizer pulls toward the tied model.

    >>> model = LoopedLM(LoopedLMConfig(spec="2x3", vocab_size=64, d_model=32, n_heads=4))
    >>> model(torch.zeros(1, 5, dtype=torch.long)).shape
    torch.Size([1, 5, 64])
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, fields
from functools import partial
from pathlib import Path
from typing import Callable, Iterable, Protocol, Sequence

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import nn

from .adaptive import ExitRule, ExitStats, LoopExit, check_exit, check_kv_policy
from .spec import LoopSpec  # relative: copied into model folders as remote code (loopreg.remote_code)
from .update_rules import check_update_rule, iteration_hooks

__all__ = ["LoopedLMConfig", "LoopedLM", "LoopedLMOutput", "Cache", "KVCache", "batch_option", "layer_schedule",
           "hf_config_keys"]

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
# the transformers names of a LoopedLM folder (loopreg.configuration_loopreg, loopreg.modeling_loopreg)
HF_MODEL_TYPE = "loopreg"
HF_ARCHITECTURE = "LoopregForCausalLM"


def batch_option(value: int | torch.Tensor | None) -> int | None:
    """A per-batch loop option as an int. In a Composer batch it is a (B,) tensor of one repeated value, so
    that Composer can count samples and split the batch into microbatches (it cannot do either with an int).

    >>> batch_option(torch.full((4,), 3)), batch_option(2), batch_option(None)
    (3, 2, None)
    """
    if not isinstance(value, torch.Tensor):
        return value
    if value.numel() == 0 or bool((value != value.flatten()[0]).any()):
        raise ValueError(f"a per-batch loop option must repeat one value over the batch, got {value.tolist()}")
    return int(value.flatten()[0])


@dataclass
class LoopedLMConfig:
    """Everything needed to rebuild a :class:`LoopedLM`; saved as ``config.json`` next to the weights.

    >>> LoopedLMConfig(spec="4x(1,4,1)", vocab_size=256).n_layers
    12
    """

    spec: str = "12x2"
    tied: bool = True
    vocab_size: int = 50304
    d_model: int = 768
    n_heads: int = 12
    n_kv_heads: int | None = None
    d_ff: int | None = None
    mlp: str = "swiglu"
    max_seq_len: int = 2048
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    tie_word_embeddings: bool = False
    init_std: float = 0.02
    # learned absolute positions added to the token embedding, besides RoPE (GPT-2 style); they make
    # fixed-offset lookups (CoT step j ↔ operand j+1) easy to learn on small synthetic tasks
    learned_positions: bool = False
    # Thm 5.4's masked loops: in thinking loop t only the placeholders of steps >= t and the positions
    # after them are updated; the question and finished steps keep their state, like CoT inputs
    latent_mask: bool = False
    # Latent thoughts (CoT distillation): the placeholder token, placeholders per CoT step, and how a
    # decoded step re-enters the next loop ('residual': plain looping; 'soft_token': LoopedLM.forward).
    placeholder_id: int | None = None
    placeholders_per_step: int = 1
    latent_feedback: str = "residual"
    # how a looped block iterates (loopreg.update_rules): 'plain' h <- g(h), or training-free 'damped'
    # sub-steps anchored to the block's single application with weight `anchor`
    update: str = "plain"
    anchor: float = 0.0

    def __post_init__(self) -> None:
        self.spec = str(LoopSpec.parse(self.spec))
        try:
            check_update_rule(self.update, self.anchor)
        except ValueError as err:
            raise ValueError(f"model.update/model.anchor: {err}") from None
        if self.latent_feedback not in ("residual", "soft_token"):
            raise ValueError(f"model.latent_feedback must be 'residual' or 'soft_token', got {self.latent_feedback!r}")
        if self.latent_feedback == "soft_token" and self.placeholder_id is None:
            raise ValueError("model.latent_feedback='soft_token' needs model.placeholder_id (the placeholder token id)")
        if self.placeholders_per_step < 1:
            raise ValueError(f"model.placeholders_per_step must be >= 1, got {self.placeholders_per_step}")
        if self.mlp not in ("swiglu", "gelu"):
            raise ValueError(f"model.mlp must be 'swiglu' or 'gelu', got {self.mlp!r}")
        if self.d_model % self.n_heads:
            raise ValueError(f"model.d_model={self.d_model} is not divisible by model.n_heads={self.n_heads}")
        if self.n_heads % self.kv_heads:
            raise ValueError(f"model.n_heads={self.n_heads} is not divisible by model.n_kv_heads={self.kv_heads}")

    @property
    def loop_spec(self) -> LoopSpec:
        return LoopSpec.parse(self.spec)

    @property
    def n_layers(self) -> int:
        """Layers with their own weights: distinct layers when tied, layer applications when untied."""
        spec = self.loop_spec
        return spec.distinct_layers if self.tied else spec.effective_depth

    @property
    def kv_heads(self) -> int:
        """Key/value heads (grouped-query attention); ``n_kv_heads`` defaults to ``n_heads``."""
        return self.n_kv_heads or self.n_heads

    @property
    def ffn_dim(self) -> int:
        """MLP hidden width; ``d_ff`` defaults to 4·d_model."""
        return self.d_ff or 4 * self.d_model

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads


def layer_schedule(spec: LoopSpec, tied: bool, loops: int | Sequence[int] | None = None) -> tuple[int, ...]:
    """The stored layer each layer application uses, optionally with a loop-count override (tied models only).

    >>> layer_schedule(LoopSpec.parse("1x1+2x2"), tied=True, loops=3)
    (0, 1, 2, 1, 2, 1, 2)
    """
    if loops is None:
        return spec.schedule if tied else tuple(range(spec.effective_depth))
    if not tied:
        raise ValueError(f"loop override {loops!r} needs a tied model; this one is untied ('{spec}', "
                         f"{spec.effective_depth} separate layers): snap it to a looped model first")
    return spec.with_loops(loops).schedule


def hf_config_keys(config: LoopedLMConfig, loops: int | Sequence[int] | None = None) -> dict[str, int | bool]:
    """The ``config.json`` keys that transformers and tools read, mirrored from ``config`` (written by
    :meth:`LoopedLM.save_pretrained`, derived again by ``configuration_loopreg.LoopregConfig``).
    ``num_hidden_layers`` counts layer *applications* at ``loops``: the layers of the key/value cache.

    >>> hf_config_keys(LoopedLMConfig(spec="1x1+2x3", vocab_size=64, d_model=32, n_heads=4))["num_hidden_layers"]
    7
    """
    return {"vocab_size": config.vocab_size, "hidden_size": config.d_model,
            "num_hidden_layers": len(layer_schedule(config.loop_spec, config.tied, loops)),
            "num_attention_heads": config.n_heads, "num_key_value_heads": config.kv_heads,
            "max_position_embeddings": config.max_seq_len, "tie_word_embeddings": config.tie_word_embeddings}


class Cache(Protocol):
    """The key/value cache protocol of the attention layers: Hugging Face's (``transformers.DynamicCache`` fits it),
    so the same layers run under :class:`KVCache` and under transformers' ``generate``."""

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor,
               layer_idx: int) -> tuple[torch.Tensor, torch.Tensor]: ...

    def get_seq_length(self, layer_idx: int = 0) -> int: ...


class KVCache:
    """Preallocated keys/values with one slot per layer *application* (a looped layer applied L times
    sees L different inputs, so it needs L slots); the :class:`Cache` protocol with ``layer_idx`` = slot.

    >>> cache = KVCache(slots=6, batch=2, n_kv_heads=4, max_len=32, head_dim=8)
    >>> cache.get_seq_length()
    0
    """

    def __init__(self, slots: int, batch: int, n_kv_heads: int, max_len: int, head_dim: int,
                 dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu") -> None:
        shape = (slots, batch, n_kv_heads, max_len, head_dim)
        self.keys = torch.zeros(shape, dtype=dtype, device=device)
        self.values = torch.zeros(shape, dtype=dtype, device=device)
        self.lengths = [0] * slots  # positions stored per slot (all equal between forward passes)

    @property
    def max_len(self) -> int:
        return self.keys.shape[3]

    def get_seq_length(self, layer_idx: int = 0) -> int:
        """Positions already stored for slot ``layer_idx``."""
        return self.lengths[layer_idx]

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor,
               layer_idx: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Store this forward's keys/values for slot ``layer_idx``; return everything cached for it so far."""
        start = self.lengths[layer_idx]
        end = start + key_states.shape[2]
        if end > self.max_len:
            raise ValueError(f"KV cache holds {self.max_len} positions; this forward needs {end}")
        self.keys[layer_idx, :, :, start:end] = key_states
        self.values[layer_idx, :, :, start:end] = value_states
        self.lengths[layer_idx] = end
        return self.keys[layer_idx, :, :, :end], self.values[layer_idx, :, :, :end]


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
                cache: Cache | None, slot: int) -> torch.Tensor:
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
                cache: Cache | None = None, slot: int = 0) -> torch.Tensor:
        x = x + self.attn(self.attn_norm(x), rope, mask, cache, slot)
        return x + self.mlp(self.mlp_norm(x))


@dataclass
class LoopedLMOutput:
    """:meth:`LoopedLM.forward` with ``output_hidden``: the logits and the residual stream (before the final
    norm) after the requested layer applications, keyed by application index in schedule order.

    >>> model = LoopedLM(LoopedLMConfig(spec="1x3", vocab_size=16, d_model=8, n_heads=2))
    >>> out = model(torch.zeros(1, 4, dtype=torch.long), output_hidden=[2])
    >>> list(out.hidden_states), out.logits.shape
    ([2], torch.Size([1, 4, 16]))
    """

    logits: torch.Tensor
    hidden_states: dict[int, torch.Tensor]


def _run_layer(layer: Layer, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], mask: torch.Tensor | None,
               cache: Cache | None, slot: int) -> torch.Tensor:
    return layer(x, rope, mask, cache, slot)


def _run_checkpointed(layer: Layer, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor],
                      mask: torch.Tensor | None, cache: Cache | None, slot: int) -> torch.Tensor:
    return torch.utils.checkpoint.checkpoint(layer, x, rope, mask, None, slot, use_reentrant=False)


def _run_without_graph(layer: Layer, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor],
                       mask: torch.Tensor | None, cache: Cache | None, slot: int) -> torch.Tensor:
    with torch.no_grad():
        return layer(x, rope, mask, cache, slot)


def _run_or_skip(run: Callable[..., torch.Tensor], looping: LoopExit, layer: Layer, x: torch.Tensor,
                 rope: tuple[torch.Tensor, torch.Tensor], mask: torch.Tensor | None, cache: Cache | None,
                 slot: int) -> torch.Tensor:
    """A thinking-block application under adaptive exit: once every token exited, its cache slot gets the stand-in
    keys/values and the layer is not run (the compute saved)."""
    if looping.skips(slot):
        looping.cache.fill(slot)
        return x
    return run(layer, x, rope, mask, cache, slot)


class Extras:
    """What one forward does around its layer applications besides running them, resolved once per forward:
    the seam between :meth:`LoopedLM.forward`'s plain loop and the latent-thought and training machinery.

    For layer application ``slot``: ``before[slot]`` see its input, ``run[slot]`` runs the layer (plainly,
    checkpointed, or without an autograd graph) and ``after[slot]`` map its output, in order.

    >>> extras = Extras(applications=3)
    >>> extras.keep_hidden([1]); extras.active, sorted(extras.hidden)
    (True, [])
    """

    def __init__(self, applications: int) -> None:
        self.before: list[list[Callable[[torch.Tensor], None]]] = [[] for _ in range(applications)]
        self.run: list[Callable[..., torch.Tensor]] = [_run_layer] * applications
        self.after: list[list[Callable[[torch.Tensor], torch.Tensor]]] = [[] for _ in range(applications)]
        self.hidden: dict[int, torch.Tensor] = {}

    @property
    def active(self) -> bool:
        return any(self.before) or any(self.after) or any(run is not _run_layer for run in self.run)

    def apply(self, slot: int, layer: Layer, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor],
              mask: torch.Tensor | None, cache: Cache | None) -> torch.Tensor:
        for see in self.before[slot]:
            see(x)
        x = self.run[slot](layer, x, rope, mask, cache, slot)
        for step in self.after[slot]:
            x = step(x)
        return x

    def checkpoint(self) -> None:
        """Activation checkpointing: every layer is recomputed in backward."""
        self.run = [_run_checkpointed] * len(self.run)

    def truncate(self, skipped: range) -> None:
        """Truncated backprop: the ``skipped`` applications run without a graph, and in backward they
        count as the identity from their first input to their last output."""
        if not skipped:
            return
        first_input: dict[str, torch.Tensor] = {}
        self.before[skipped.start].append(partial(first_input.__setitem__, "x"))
        for slot in skipped:
            self.run[slot] = _run_without_graph
        self.after[skipped.stop - 1].append(lambda x: x.detach() + (first_input["x"] - first_input["x"].detach()))

    def update_rule(self, enter: dict[int, Callable[[torch.Tensor], None]],
                    leave: dict[int, Callable[[torch.Tensor], torch.Tensor]]) -> None:
        """A looped block's update rule (:func:`loopreg.update_rules.iteration_hooks`)."""
        for slot, hook in enter.items():
            self.before[slot].append(hook)
        for slot, hook in leave.items():
            self.after[slot].append(hook)

    def latent_mask(self, spec: LoopSpec, frozen_after: torch.Tensor) -> None:
        """Thm 5.4's masked block (Def. B.3): after thinking iteration t, positions frozen before t take back
        their state from the iteration's input."""
        size = spec.blocks[spec.thinking_block].size
        for loop, end in enumerate(spec.loop_ends):
            loop_input: dict[str, torch.Tensor] = {}
            self.before[end - size + 1].append(partial(loop_input.__setitem__, "x"))
            frozen = (frozen_after < loop)[..., None]
            self.after[end].append(lambda x, frozen=frozen, start=loop_input: torch.where(frozen, start["x"], x))

    def adaptive_exit(self, looping: LoopExit) -> None:
        """Adaptive exit from the thinking block (:mod:`loopreg.adaptive`): each iteration's input and output go to
        ``looping``, and the iterations after the first are skipped once every token exited."""
        for start, end in zip(looping.starts, looping.loop_ends):
            self.before[start].append(partial(looping.enter, start))
            self.after[end].append(partial(looping.leave, end))
        for slot in looping.later_iterations:
            self.run[slot] = partial(_run_or_skip, self.run[slot], looping)

    def after_each_loop(self, spec: LoopSpec, step: Callable[[torch.Tensor, int], torch.Tensor]) -> None:
        """Map the output of thinking iteration t with ``step(x, t)`` (soft-token feedback)."""
        for loop, end in enumerate(spec.loop_ends):
            self.after[end].append(partial(step, loop=loop))

    def keep_hidden(self, slots: Iterable[int]) -> None:
        """Record the residual stream after each of ``slots`` in :attr:`hidden`."""
        for slot in slots:
            if not 0 <= slot < len(self.run):
                raise ValueError(f"output_hidden: layer application {slot} is out of range; this forward runs "
                                 f"{len(self.run)} (0..{len(self.run) - 1})")
            self.after[slot].append(partial(self._keep, slot))

    def _keep(self, slot: int, x: torch.Tensor) -> torch.Tensor:
        self.hidden[slot] = x
        return x


class LoopedLM(nn.Module):
    """Decoder-only causal LM laid out by a :class:`~loopreg.spec.LoopSpec` (see the module docstring).

    >>> model = LoopedLM(LoopedLMConfig(spec="1x4", vocab_size=32, d_model=16, n_heads=2))
    >>> model.num_distinct_layers
    1
    """

    def __init__(self, config: LoopedLMConfig) -> None:
        super().__init__()
        self.config = config
        self.spec = config.loop_spec
        self.embed = nn.Embedding(config.vocab_size, config.d_model)
        if config.learned_positions:
            self.position_embed = nn.Embedding(config.max_seq_len, config.d_model)
        self.layers = nn.ModuleList(Layer(config) for _ in range(config.n_layers))
        self.norm = nn.RMSNorm(config.d_model, eps=config.norm_eps)
        self.lm_head = nn.Linear(config.d_model, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.embed.weight
        if not any(p.is_meta for p in self.parameters()):
            self.apply(self.param_init_fn)

    # ------------------------------------------------------------------ layout
    @property
    def num_distinct_layers(self) -> int:
        return len(self.layers)

    def schedule(self, loops: int | Sequence[int] | None = None) -> tuple[int, ...]:
        """Index into ``self.layers`` of each layer application, optionally with a loop-count override."""
        return layer_schedule(self.spec, self.config.tied, loops)

    # ------------------------------------------------------------ init (and FSDP hooks)
    def param_init_fn(self, module: nn.Module) -> None:
        """Initialise one submodule in place; also the FSDP ``param_init_fn`` for ``init_device: meta``.
        Residual output projections are scaled by 1/sqrt(2·D) for the effective depth D."""
        std = self.config.init_std
        if isinstance(module, nn.Linear):
            scale = math.sqrt(2 * self.spec.effective_depth) if getattr(module, "residual_out", False) else 1.0
            nn.init.normal_(module.weight, mean=0.0, std=std / scale)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=std)
        elif isinstance(module, nn.RMSNorm):
            nn.init.ones_(module.weight)

    def fsdp_wrap_fn(self, module: nn.Module) -> bool:
        """Composer's FSDP policy: every distinct layer is its own unit (a looped layer stays one unit)."""
        return isinstance(module, Layer)

    def activation_checkpointing_fn(self, module: nn.Module) -> bool:
        return isinstance(module, Layer)

    # ------------------------------------------------------------------ forward
    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                cache: Cache | None = None, loops: int | Sequence[int] | None = None,
                grad_loops: int | None = None, checkpoint: bool = False,
                output_hidden: bool | Sequence[int] = False, exit: ExitRule | str | None = None,
                kv_policy: str = "per_application",
                exit_stats: ExitStats | None = None) -> torch.Tensor | LoopedLMOutput:
        """Logits (B, T, vocab) for ``input_ids`` (B, T); a :class:`LoopedLMOutput` when ``output_hidden`` asks
        for the residual stream after every layer application (``True``) or after the listed ones.

        ``attention_mask`` (B, T_total, 1 = real token, 0 = left padding) covers the cached positions
        too when a ``cache`` is given; ``loops`` overrides the loop counts of a tied model.
        Training knobs: ``grad_loops=k`` builds the autograd graph only for the last k iterations of the
        thinking block (earlier ones count as the identity in backward, Jacobian-free style, so the
        embedding and earlier layers still learn); ``checkpoint`` recomputes each layer in backward.
        Inference knobs (:mod:`loopreg.adaptive`): ``exit`` (an :class:`~loopreg.adaptive.ExitRule` or its text,
        ``'kl:0.01'``) lets tokens leave the thinking block early, and the forward stops iterating once all have;
        ``kv_policy='shared'`` keeps one cache slot per stored layer (a cache from ``new_cache(kv_policy=...)``);
        ``exit_stats`` (an :class:`~loopreg.adaptive.ExitStats`) accumulates the iterations run.
        These, the config's latent thoughts and update rule, and ``output_hidden`` are :class:`Extras`
        around the layer applications (see :meth:`_extras`); without any, the loop below is all there is.
        """
        batch, length = input_ids.shape
        past = cache.get_seq_length() if cache is not None else 0
        x = self.embed(input_ids)
        positions, mask = self._positions_and_mask(batch, length, past, attention_mask, x.device)
        if self.config.learned_positions:
            x = x + self.position_embed(positions)
        rope = rotary(positions, self.config.head_dim, self.config.rope_theta, x.dtype)
        schedule = self.schedule(loops)
        looping = self._loop_exit(exit, kv_policy, exit_stats, loops, cache, batch, length, attention_mask)
        if looping is not None:
            cache = looping.bind(cache)
        extras = self._extras(input_ids, positions, loops, grad_loops, checkpoint, cache, output_hidden, looping)
        for slot, index in enumerate(schedule):
            layer = self.layers[index]
            if extras is None:
                x = layer(x, rope, mask, cache, slot)
            else:
                x = extras.apply(slot, layer, x, rope, mask, cache)
        logits = self.lm_head(self.norm(x))
        return logits if output_hidden is False else LoopedLMOutput(logits, extras.hidden if extras else {})

    def _loop_exit(self, exit: ExitRule | str | None, kv_policy: str, stats: ExitStats | None,
                   loops: int | Sequence[int] | None, cache: Cache | None, batch: int, length: int,
                   attention_mask: torch.Tensor | None) -> LoopExit | None:
        """This forward's adaptive exit and KV policy; ``None`` for the plain path (no rule, per-application slots)
        and for an uncached forward under ``shared``, which computes what ``per_application`` does: every
        iteration's keys of this forward's positions are the ones attention reads either way."""
        rule = ExitRule.parse(exit) if exit is not None else None
        check_exit(self.spec, self.config.tied, rule, kv_policy)
        if rule is None and (kv_policy == "per_application" or cache is None):
            return None
        config = self.config
        plain = config.update == "plain" and not config.latent_mask and config.latent_feedback == "residual"
        if rule is not None and not plain:
            raise ValueError(f"exit={rule} needs plain looping: this model has update={config.update!r}, "
                             f"latent_mask={config.latent_mask}, latent_feedback={config.latent_feedback!r}")
        spec = self.spec if loops is None else self.spec.with_loops(loops)
        return LoopExit(spec, rule, kv_policy, decode=lambda h: self.lm_head(self.norm(h)),
                        scratch=partial(self.new_cache, batch, length, loops, kv_policy), real=attention_mask,
                        stats=stats)

    def _extras(self, input_ids: torch.Tensor, positions: torch.Tensor, loops: int | Sequence[int] | None,
                grad_loops: int | None, checkpoint: bool, cache: Cache | None,
                output_hidden: bool | Sequence[int], looping: LoopExit | None = None) -> Extras | None:
        """This forward's machinery around its layer applications, resolved once; ``None`` when it has none
        (the plain path). Hooks after a layer run in the order they are registered here.

        With ``latent_feedback='soft_token'``, after thinking-block iteration t the placeholders of CoT
        step t are decoded through the LM head and the expected embedding (a soft token) replaces the
        residual stream of the aligned placeholder of step t+1 (plus its learned position embedding, if
        any): the continuous analogue of feeding a decoded CoT token back as the next input (paper Thm 5.4).
        With ``latent_mask`` thinking iteration t only updates the placeholders of steps >= t and what
        follows them; the question and finished steps keep their state (Thm 5.4's masked block, Def. B.3).
        """
        if checkpoint and cache is not None:
            raise ValueError("checkpoint=True is for training; it cannot be combined with a KV cache")
        config = self.config
        spec = self.spec if loops is None else self.spec.with_loops(loops)
        extras = Extras(spec.effective_depth)
        if torch.is_grad_enabled():
            if checkpoint:
                extras.checkpoint()
            extras.truncate(spec.truncated_applications(grad_loops))
        extras.update_rule(*iteration_hooks(spec, config.update, config.anchor))
        if config.latent_mask or config.latent_feedback == "soft_token":
            steps = self.placeholder_steps(input_ids)
            if config.latent_mask:
                extras.latent_mask(spec, self._frozen_after(steps))
        if looping is not None and looping.rule is not None:
            extras.adaptive_exit(looping)
        if output_hidden is not False:
            extras.keep_hidden(range(spec.effective_depth) if output_hidden is True else output_hidden)
        if config.latent_feedback == "soft_token":
            extras.after_each_loop(spec, partial(self._feed_soft_tokens, steps=steps, positions=positions))
        return extras if extras.active else None

    def placeholder_steps(self, input_ids: torch.Tensor) -> torch.Tensor:
        """(B, T): the CoT step each placeholder token stands for (its rank // placeholders_per_step), -1
        for other tokens.

        >>> LoopedLM(LoopedLMConfig(spec="1x2", vocab_size=8, d_model=8, n_heads=2, placeholder_id=3,
        ...          placeholders_per_step=2)).placeholder_steps(torch.tensor([[5, 3, 3, 3, 3, 6]]))
        tensor([[-1,  0,  0,  1,  1, -1]])
        """
        if self.config.placeholder_id is None:
            return torch.full_like(input_ids, -1)
        is_placeholder = input_ids == self.config.placeholder_id
        rank = is_placeholder.long().cumsum(-1) - 1
        return torch.where(is_placeholder, rank // self.config.placeholders_per_step, -1)

    @staticmethod
    def _frozen_after(steps: torch.Tensor) -> torch.Tensor:
        """(B, T): the last thinking loop that updates each position under ``latent_mask``: -1 for the
        question (before the first placeholder; it is never updated, like CoT inputs), j for the
        placeholders of step j, and "never frozen" for everything after them and for rows without any."""
        never = torch.iinfo(steps.dtype).max
        has_latent = steps >= 0
        seen = has_latent.long().cumsum(-1) > 0
        before = ~seen & has_latent.any(-1, keepdim=True)
        return torch.where(has_latent, steps, torch.where(before, -1, never))

    def _feed_soft_tokens(self, x: torch.Tensor, loop: int, steps: torch.Tensor,
                          positions: torch.Tensor) -> torch.Tensor:
        """Thinking iteration ``loop`` done: its placeholders' decoded distributions, as soft tokens, become
        the next step's aligned placeholders (see :meth:`forward`)."""
        rows, cols = (steps == loop).nonzero(as_tuple=True)
        targets = cols + self.config.placeholders_per_step  # the aligned placeholder of the next step
        inside = targets < steps.shape[1]
        inside[inside.clone()] = steps[rows[inside], targets[inside]] == loop + 1
        if not bool(inside.any()):
            return x
        rows, cols, targets = rows[inside], cols[inside], targets[inside]
        probs = self.lm_head(self.norm(x[rows, cols])).float().softmax(-1)
        soft = probs.to(x.dtype) @ self.embed.weight
        if self.config.learned_positions:  # a fed-back token is an input like any other: token + position
            soft = soft + self.position_embed(positions[rows, targets])
        return x.index_put((rows, targets), soft)

    @staticmethod
    def _positions_and_mask(batch: int, length: int, past: int, attention_mask: torch.Tensor | None,
                            device: torch.device) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Rotary positions and the (B, 1, T, T_total) attention mask; ``None`` means plain causal (fast path)."""
        total = past + length
        if attention_mask is None:
            positions = torch.arange(past, total, device=device).expand(batch, length)
            if past == 0:
                return positions, None
            keys = torch.arange(total, device=device)
            queries = torch.arange(past, total, device=device)
            return positions, (keys[None, :] <= queries[:, None]).expand(batch, length, total)[:, None]
        if attention_mask.shape != (batch, total):
            raise ValueError(f"attention_mask has shape {tuple(attention_mask.shape)}; expected {(batch, total)} "
                             "(it must cover cached and new positions)")
        real = attention_mask.bool()
        # Left padding: a token's position counts real tokens before it, as Hugging Face models do.
        all_positions = (real.long().cumsum(-1) - 1).clamp(min=0)
        positions = all_positions[:, past:]
        keys = torch.arange(total, device=device)
        queries = torch.arange(past, total, device=device)
        causal = keys[None, :] <= queries[:, None]
        mask = causal[None] & real[:, None, :]
        # A padding query would see no key at all (NaN softmax); let it see itself. Its output is unused.
        mask |= (keys[None, :] == queries[:, None])[None]
        return positions, mask[:, None]  # broadcast over heads

    # --------------------------------------------------------------- generation
    def new_cache(self, batch: int, max_len: int, loops: int | Sequence[int] | None = None,
                  kv_policy: str = "per_application") -> KVCache:
        """An empty :class:`KVCache`: one slot per layer application, or per stored layer under ``kv_policy='shared'``
        (prelude + block + coda slots instead of the effective depth).

        >>> LoopedLM(LoopedLMConfig(spec="1x1+2x4", vocab_size=8, d_model=8, n_heads=2)).new_cache(
        ...     1, 4, kv_policy="shared").keys.shape[0]
        3
        """
        check_kv_policy(kv_policy)
        slots = len(self.schedule(loops)) if kv_policy == "per_application" else self.num_distinct_layers
        param = self.embed.weight
        return KVCache(slots, batch, self.config.kv_heads, max_len, self.config.head_dim,
                       dtype=param.dtype, device=param.device)

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, max_new_tokens: int, attention_mask: torch.Tensor | None = None,
                 temperature: float = 0.0, top_k: int | None = None, eos_token_id: int | None = None,
                 loops: int | Sequence[int] | None = None, use_cache: bool = True,
                 generator: torch.Generator | None = None,
                 stop_when: Callable[[torch.Tensor], torch.Tensor] | None = None,
                 exit: ExitRule | str | None = None, kv_policy: str = "per_application",
                 exit_stats: ExitStats | None = None) -> torch.Tensor:
        """New tokens (B, max_new_tokens) after ``input_ids``; greedy when ``temperature == 0``.

        With the cache each step runs only the new token through every layer application; without it
        the whole sequence is recomputed (the reference the cache is tested against). Rows that emit
        ``eos_token_id`` are padded with it afterwards. ``stop_when(new_tokens) -> (B,) bool`` ends
        generation early once every row is done (e.g. a stop string was produced). ``exit``, ``kv_policy`` and
        ``exit_stats`` go to every forward (see :meth:`forward`).

        >>> LoopedLM(LoopedLMConfig(spec="1x2", vocab_size=16, d_model=8, n_heads=2)).generate(
        ...     torch.zeros(1, 3, dtype=torch.long), max_new_tokens=4).shape
        torch.Size([1, 4])
        """
        batch = input_ids.shape[0]
        mask = attention_mask if attention_mask is not None else torch.ones_like(input_ids)
        cache = self.new_cache(batch, input_ids.shape[1] + max_new_tokens, loops, kv_policy) if use_cache else None
        tokens, step_input = input_ids, input_ids
        finished = torch.zeros(batch, dtype=torch.bool, device=input_ids.device)
        new_tokens = []
        for _ in range(max_new_tokens):
            logits = self(step_input if use_cache else tokens, attention_mask=mask, cache=cache, loops=loops,
                          exit=exit, kv_policy=kv_policy, exit_stats=exit_stats)[:, -1]
            if self.config.placeholder_id is not None:  # placeholders are inputs (latent steps), never outputs
                logits[:, self.config.placeholder_id] = float("-inf")
            next_token = self._pick(logits.float(), temperature, top_k, generator)
            if eos_token_id is not None:
                next_token = torch.where(finished, torch.full_like(next_token, eos_token_id), next_token)
                finished |= next_token == eos_token_id
            new_tokens.append(next_token)
            tokens = torch.cat([tokens, next_token[:, None]], dim=1)
            mask = torch.cat([mask, torch.ones_like(next_token[:, None])], dim=1)
            step_input = next_token[:, None]
            if bool(finished.all()) or (stop_when is not None and bool(stop_when(torch.stack(new_tokens, 1)).all())):
                break
        out = torch.stack(new_tokens, dim=1)
        if out.shape[1] < max_new_tokens:  # stopped early: pad with EOS (or repeat the last token)
            fill = eos_token_id if eos_token_id is not None else 0
            pad = torch.full((batch, max_new_tokens - out.shape[1]), fill, dtype=out.dtype, device=out.device)
            out = torch.cat([out, pad], dim=1)
        return out

    @staticmethod
    def _pick(logits: torch.Tensor, temperature: float, top_k: int | None,
              generator: torch.Generator | None) -> torch.Tensor:
        if temperature <= 0:
            return logits.argmax(-1)
        logits = logits / temperature
        if top_k is not None:
            kth = torch.topk(logits, min(top_k, logits.shape[-1])).values[:, -1:]
            logits = logits.masked_fill(logits < kth, float("-inf"))
        return torch.multinomial(logits.softmax(-1), 1, generator=generator).squeeze(-1)

    # ------------------------------------------------------------- save / load
    def save_pretrained(self, folder: str | Path) -> Path:
        """Write ``config.json`` and ``model.safetensors`` into ``folder``. The config's ``loopreg`` object is what
        :func:`load_config` reads; the keys around it make it a transformers config (``model_type: loopreg``,
        loaded through the remote code that :func:`loopreg.remote_code.attach_remote_code` adds)."""
        from safetensors.torch import save_model

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        hf_config = {"model_type": HF_MODEL_TYPE, "architectures": [HF_ARCHITECTURE], **hf_config_keys(self.config),
                     "torch_dtype": str(self.embed.weight.dtype).removeprefix("torch.")}
        config = {**hf_config, "loopreg": asdict(self.config)}
        (folder / CONFIG_NAME).write_text(json.dumps(config, indent=2) + "\n")
        save_model(self, str(folder / WEIGHTS_NAME), metadata={"format": "pt"})  # transformers requires the format
        return folder

    @classmethod
    def from_pretrained(cls, folder: str | Path, map_location: str = "cpu") -> LoopedLM:
        """Load a folder written by :meth:`save_pretrained`.

        >>> # LoopedLM.from_pretrained("runs/loop_12x2/export")
        """
        from safetensors.torch import load_model

        folder = Path(folder)
        config = load_config(folder)
        model = cls(config)
        weights = folder / WEIGHTS_NAME
        if not weights.is_file():
            raise FileNotFoundError(f"{weights}: no weights file; "
                                    "expected a folder written by LoopedLM.save_pretrained")
        load_model(model, str(weights), device=map_location)
        return model


def load_config(folder: str | Path) -> LoopedLMConfig:
    """The :class:`LoopedLMConfig` stored in a saved model folder (one-line errors for bad folders)."""
    path = Path(folder) / CONFIG_NAME
    if not path.is_file():
        raise FileNotFoundError(f"{path}: not found; expected a loopreg model folder with {CONFIG_NAME}")
    try:
        raw = json.loads(path.read_text())["loopreg"]
    except (json.JSONDecodeError, KeyError, TypeError) as err:
        raise ValueError(f"{path}: not a loopreg config (needs a 'loopreg' object): {err}") from None
    known = {f.name for f in fields(LoopedLMConfig)}
    unknown = sorted(set(raw) - known)
    if unknown:
        raise ValueError(f"{path}: unknown config keys {unknown}; valid keys: {sorted(known)}")
    return LoopedLMConfig(**raw)
