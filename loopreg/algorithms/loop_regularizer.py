"""The looping-inspired cosine regularizer (paper §4), its Composer algorithm, and snap-to-looped (the
:class:`~loopreg.callbacks.loop_snap.LoopSnap` callback snaps during training).

An untied model whose L layers are grouped into blocks of k is pulled toward the looped ``(k⊗L/k)``
model: for every parameter group G (a weight-matrix role such as attention Q or the MLP down
projection), ``R_G`` is the mean cosine between layer ``ik+j`` and layer ``(i+1)k+j`` (the same
position in the next block), and the loss gets ``λ · mean_G (1 − R_G)``. The paper prints
``+λ · mean_G R_G``, which would *penalise* similarity; the sign here rewards it (digest §6 erratum).

Layers are grouped by a :class:`~loopreg.spec.LoopSpec` over the model's layers (``tie_groups`` says
which layers are tied); it comes from ``block_size`` (``kx(L/k)``), from explicit ``blocks`` (runs
of consecutive layers: middle looping ties only those), or from an untied ``LoopedLM``'s own spec.

    >>> from loopreg.model import LoopedLM, LoopedLMConfig
    >>> model = LoopedLM(LoopedLMConfig(spec="2x3", tied=False, vocab_size=32, d_model=16, n_heads=2))
    >>> loss = loop_regularization(model).penalty  # differentiable: add λ·loss to the training loss
    >>> snap_to_looped(model).num_distinct_layers
    2

Under FSDP each rank only holds a flat slice of every parameter, but identical layers (separate FSDP
units of equal shapes) are sliced identically, so partial dot products and squared norms summed over
the shard group give the exact cosines without gathering any weight.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, Callable, Mapping, NamedTuple, Sequence

import torch
import torch.distributed as torch_dist
import torch.distributed.nn.functional as dist_nn
from composer.core import Algorithm, Event, State
from composer.loggers import Logger
from composer.optim import (ComposerScheduler, ConstantScheduler, ConstantWithWarmupScheduler,
                            CosineAnnealingWithWarmupScheduler)
from torch import nn

from loopreg.errors import RecipeError, UserError
from loopreg.model import LoopedLM
from loopreg.registry_base import Registry
from loopreg.spec import LoopSpec
from loopreg.surgery.adapters import find_adapter, get_layers, layer_role_params, unwrap

__all__ = ["LAMBDA_SCHEDULES", "LoopRegularization", "LoopRegularizer", "RegularizerLayout", "add_loss_term",
           "block_similarity", "loop_regularization", "loop_similarity", "loop_target", "regularizer_layout",
           "snap_to_looped"]

# λ schedule name -> builder(t_warmup, alpha_f) of a Composer scheduler giving λ's multiplier at the current time.
LAMBDA_SCHEDULES: Registry = Registry("λ schedule")


# --------------------------------------------------------------------------------------------- layout
def loop_target(model: nn.Module, block_size: int | None = None,
                blocks: Sequence[Sequence[int]] | None = None) -> LoopSpec:
    """The looped layout the regularizer pulls ``model``'s layers toward, as a spec over all its layers.

    ``block_size=k`` ties consecutive k-layer blocks (``kx(L/k)``); ``blocks`` lists the layer indices of
    each tied block (consecutive runs, back to back, equal sizes; other layers stay free); with neither,
    an untied ``LoopedLM`` (or untied surgery result) uses its own spec.

    >>> # loop_target(gpt2_12_layers, blocks=[[2, 3], [4, 5], [6, 7]])  ->  LoopSpec '2x1+2x3+4x1'
    """
    name = type(unwrap(model)).__name__
    num_layers = len(get_layers(model))
    if block_size is not None and blocks is not None:
        raise UserError(f"{name}: give block_size or blocks, not both")
    if block_size is not None:
        if block_size < 1 or num_layers % block_size:
            divisors = [k for k in range(1, num_layers) if num_layers % k == 0]
            raise UserError(f"block_size={block_size} does not divide the {num_layers} layers of {name}; "
                             f"expected one of {divisors}")
        target = LoopSpec.parse(f"{block_size}x{num_layers // block_size}")
    elif blocks is not None:
        target = _spec_from_blocks(blocks, num_layers, name)
    else:
        target = _own_spec(unwrap(model))
    target.check_layer_count(num_layers, name)
    if not target.is_looped:
        raise UserError(f"loop target '{target}' of {name} ties no layers; expected at least two blocks")
    return target


def _own_spec(model: nn.Module) -> LoopSpec:
    """The spec an untied model was built with: ``LoopedLM``'s, or a surgery result's ``loopreg_spec``."""
    from loopreg.surgery.core import is_tied, looped_spec

    spec, tied = looped_spec(model), is_tied(model)
    if spec is None or tied:
        why = "it is already looped (tied)" if spec is not None else "it has no loop spec"
        raise UserError(f"{type(model).__name__}: no layout to regularize toward ({why}); expected block_size=K or "
                         "blocks=[[...], ...]")
    return LoopSpec.parse(spec)


def _spec_from_blocks(blocks: Sequence[Sequence[int]], num_layers: int, name: str) -> LoopSpec:
    """``[[4..7], [8..11], [12..15]]`` in 20 layers → ``4x1+4x3+4x1``: free layers before and after become
    blocks applied once."""
    runs = [list(block) for block in blocks]
    size = len(runs[0]) if runs else 0
    start = runs[0][0] if size else 0
    expected = [list(range(start + i * size, start + (i + 1) * size)) for i in range(len(runs))]
    if len(runs) < 2 or size == 0 or start < 0 or runs != expected or expected[-1][-1] >= num_layers:
        raise UserError(f"blocks={[list(b) for b in blocks]} for the {num_layers} layers of {name}: expected two or "
                         f"more equal-size runs of consecutive layer indices, back to back, e.g. "
                         f"[[0, 1], [2, 3]]")
    after = num_layers - (start + len(runs) * size)
    stages = ([f"{start}x1"] if start else []) + [f"{size}x{len(runs)}"] + ([f"{after}x1"] if after else [])
    return LoopSpec.parse("+".join(stages))


def _tied_pairs(target: LoopSpec) -> list[tuple[int, int]]:
    """Layer pairs the regularizer compares: each layer with the same position in the next repetition."""
    return [(group[i], group[i + 1]) for group in target.tie_groups for i in range(len(group) - 1)]


def _repeated_blocks(target: LoopSpec) -> list[tuple[int, ...]]:
    """Consecutive layer blocks of the looped block size (every repetition, and free blocks of that size)."""
    size = next(block.size for block in target.blocks if block.loops > 1)
    chunks, start = [], 0
    for block in target.blocks:
        for _ in range(block.loops):
            if block.size == size:
                chunks.append(tuple(range(start, start + size)))
            start += block.size
    return chunks


# ------------------------------------------------------------------------------------------ the math
def _role_params(model: nn.Module, include_norms: bool) -> dict[str, list[nn.Parameter]]:
    """Role → that role's parameter in every layer (the parameter groups G)."""
    adapter = find_adapter(model)
    per_layer = [layer_role_params(layer, adapter, include_norms) for layer in get_layers(model, adapter)]
    roles = list(per_layer[0])
    if not roles:
        raise ValueError(f"{type(unwrap(model)).__name__}: no {adapter.family} weight roles found in its layers "
                         f"(expected {', '.join(adapter.roles.values())}; FSDP needs use_orig_params=True)")
    for index, params in enumerate(per_layer):
        if list(params) != roles:
            raise ValueError(f"{type(unwrap(model)).__name__}: layer {index} has roles {list(params)} but layer 0 has "
                             f"{roles}; the regularizer needs the same weights in every layer")
    return {role: [params[role] for params in per_layer] for role in roles}


def _shard_group(model: nn.Module) -> torch_dist.ProcessGroup | None:
    """The process group each layer's parameters are sharded over (FSDP1), or None when every rank holds
    whole parameters (one process, DDP, FSDP ``NO_SHARD``)."""
    from torch.distributed.fsdp import FullyShardedDataParallel, ShardingStrategy

    if not any(isinstance(module, FullyShardedDataParallel) for module in model.modules()):
        return None
    layers = get_layers(model)
    if not all(isinstance(layer, FullyShardedDataParallel) for layer in layers):
        raise ValueError(f"{type(unwrap(model)).__name__} under FSDP: every decoder layer must be its own FSDP unit "
                         "(fsdp_wrap_fn) so identical layers are sharded identically")
    unit = layers[0]
    if unit.sharding_strategy == ShardingStrategy.NO_SHARD or torch_dist.get_world_size(unit.process_group) == 1:
        return None
    return unit.process_group


def _sum_over_shards(local: torch.Tensor, group: torch_dist.ProcessGroup | None) -> torch.Tensor:
    """Sum per-rank partial statistics over the shard group, differentiably."""
    if group is None:
        return local
    if local.requires_grad:
        # Every rank adds the same value to its loss and data parallelism averages the ranks' gradients, but
        # these gradients land on local shards without FSDP's averaging reduce-scatter: the all-reduce's
        # backward sums the ranks' identical upstream gradients, so divide by the group size.
        local.register_hook(lambda grad: grad / torch_dist.get_world_size(group))
    return dist_nn.all_reduce(local, group=group)


class _GroupStats(torch.autograd.Function):
    """fp32 squared norms of one group's weights, then the dot products of the given index pairs.

    The same as ``torch.dot`` over flattened weights, but the backward forms each weight's gradient in one
    buffer: autograd's own makes a weight-sized tensor per product and sums them (its backward measured
    1.5x slower on a 24-layer d=512 model), and only the original (possibly bf16) weights are kept for
    backward, never fp32 copies.
    """

    @staticmethod
    def forward(ctx: Any, pairs: list[tuple[int, int]], *weights: torch.Tensor) -> torch.Tensor:
        ctx.pairs = pairs
        ctx.save_for_backward(*weights)
        flat = [weight.reshape(-1).float() for weight in weights]  # views for fp32: nothing is copied
        return torch.stack([torch.dot(w, w) for w in flat] + [torch.dot(flat[a], flat[b]) for a, b in pairs])

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        weights = ctx.saved_tensors
        grads = [weight.float() * (2 * grad[i]) for i, weight in enumerate(weights)]
        for index, (a, b) in enumerate(ctx.pairs):
            grads[a].addcmul_(weights[b].float(), grad[len(weights) + index])
            grads[b].addcmul_(weights[a].float(), grad[len(weights) + index])
        return (None, *(g.to(w.dtype) if needed else None
                        for g, w, needed in zip(grads, weights, ctx.needs_input_grad[1:])))


@dataclass(frozen=True)
class _PairStats:
    """What the cosines of some layer pairs need from a model, resolved once: each role's parameter in the
    compared layers (in ``layers`` order), the pairs as positions in that order (and as index tensors on the
    weights' device), and the shard group."""

    layers: list[int]
    params: dict[str, list[nn.Parameter]]
    local_pairs: list[tuple[int, int]]
    first: torch.Tensor
    second: torch.Tensor
    shard_group: torch_dist.ProcessGroup | None

    def cosines(self, eps: float) -> dict[str, torch.Tensor]:
        """Role → fp32 cosine of each layer pair, from (shard-local) dot products and squared norms."""
        stats = [_GroupStats.apply(self.local_pairs, *per_layer) for per_layer in self.params.values()]
        totals = _sum_over_shards(torch.cat(stats), self.shard_group).view(len(self.params), -1)
        cosines = {}
        for role, row in zip(self.params, totals):
            squares, dots = row[:len(self.layers)].clamp_min(eps * eps), row[len(self.layers):]
            cosines[role] = dots * torch.rsqrt(squares[self.first]) * torch.rsqrt(squares[self.second])
        return cosines


def _pair_stats(model: nn.Module, pairs: Sequence[tuple[int, int]], include_norms: bool) -> _PairStats:
    params = _role_params(model, include_norms)
    name = type(unwrap(model)).__name__
    layers = sorted({index for pair in pairs for index in pair})
    position = {index: i for i, index in enumerate(layers)}
    local_pairs = [(position[a], position[b]) for a, b in pairs]
    for role, per_layer in params.items():
        for a, b in pairs:
            if per_layer[a].shape != per_layer[b].shape:
                raise ValueError(f"{name}: {role} weights of layers {a} and {b} have shapes "
                                 f"{tuple(per_layer[a].shape)} and {tuple(per_layer[b].shape)}; tied blocks need "
                                 "equal shapes")
    device = next(iter(params.values()))[0].device
    first, second = (torch.tensor(column, device=device) for column in zip(*local_pairs))
    return _PairStats(layers, {role: [per_layer[i] for i in layers] for role, per_layer in params.items()},
                      local_pairs, first, second, _shard_group(model))


class LoopRegularization(NamedTuple):
    """``penalty`` = weighted mean over groups of ``1 − R_G`` (differentiable); ``similarity`` = ``R_G``."""

    penalty: torch.Tensor
    similarity: dict[str, torch.Tensor]


@dataclass(frozen=True)
class RegularizerLayout:
    """The part of :func:`loop_regularization` that depends only on the model's structure (the loop target,
    the parameter groups and their weights, the layer pairs, the shard group), resolved once by
    :func:`regularizer_layout`; :meth:`regularization` is then the per-step math alone.

    >>> # layout = regularizer_layout(model, block_size=4); penalty = layout.regularization().penalty
    """

    target: LoopSpec
    weights: dict[str, float]
    stats: _PairStats

    def regularization(self, eps: float = 1e-8) -> LoopRegularization:
        """``R_G`` of every group and the weighted penalty for the model's current weights."""
        similarity = {role: cos.mean() for role, cos in self.stats.cosines(eps).items()}
        penalty = sum(self.weights[role] * (1 - r) for role, r in similarity.items()) / sum(self.weights.values())
        return LoopRegularization(penalty, similarity)


def regularizer_layout(model: nn.Module, block_size: int | None = None, blocks: Sequence[Sequence[int]] | None = None,
                       include_norms: bool = False,
                       group_weights: Mapping[str, float] | None = None) -> RegularizerLayout:
    """Resolve (and check) what :func:`loop_regularization` needs from ``model``'s structure; valid while
    the model keeps its parameters (the same tensors, their values may change).

    >>> # regularizer_layout(model, block_size=4).target  ->  LoopSpec '4x6' for 24 layers
    """
    target = loop_target(model, block_size, blocks)
    stats = _pair_stats(model, _tied_pairs(target), include_norms)
    weights = {role: 1.0 for role in stats.params}
    for role, weight in (group_weights or {}).items():
        if role not in weights:
            raise UserError(f"group_weights key '{role}' is not a parameter group of {type(unwrap(model)).__name__}; "
                             f"groups: {', '.join(weights)}")
        weights[role] = float(weight)
    if sum(weights.values()) <= 0:
        raise UserError(f"group_weights {dict(group_weights or {})} must have a positive sum")
    return RegularizerLayout(target, weights, stats)


def loop_regularization(model: nn.Module, block_size: int | None = None, blocks: Sequence[Sequence[int]] | None = None,
                        include_norms: bool = False, group_weights: Mapping[str, float] | None = None,
                        eps: float = 1e-8) -> LoopRegularization:
    """``R_G`` for every parameter group G and the penalty ``Σ_G w_G (1 − R_G) / Σ_G w_G`` (the paper's
    ``1/|G| Σ_G`` with all weights 1); add ``λ · penalty`` to the loss. Exact under DDP and FSDP1.

    ``R_G = 1/(L−k) Σ_i Σ_j cos(θ_G^(ik+j), θ_G^((i+1)k+j))`` over the pairs of :func:`loop_target`'s
    layout; norms below ``eps`` are clamped (no NaN for zero weights) and bf16 weights are summed in fp32.
    Call it before the forward pass: its backward then runs after the model's, when activations are freed.
    In a loop, resolve the layout once with :func:`regularizer_layout` and call its ``regularization``.

    >>> # penalty = loop_regularization(model, block_size=4).penalty; (ce(model(x)) + 10 * penalty).backward()
    """
    return regularizer_layout(model, block_size, blocks, include_norms, group_weights).regularization(eps)


@torch.no_grad()
def loop_similarity(model: nn.Module, block_size: int | None = None, blocks: Sequence[Sequence[int]] | None = None,
                    include_norms: bool = False) -> dict[str, float]:
    """``R_G`` of each parameter group and their ``"mean"``: how close to looped is this model?

    >>> # loop_similarity(AutoModelForCausalLM.from_pretrained("gpt2"), block_size=4)["mean"]
    """
    similarity = loop_regularization(model, block_size, blocks, include_norms).similarity
    values = {role: float(r) for role, r in similarity.items()}
    return {**values, "mean": sum(values.values()) / len(values)}


@torch.no_grad()
def block_similarity(model: nn.Module, block_size: int | None = None, blocks: Sequence[Sequence[int]] | None = None,
                     include_norms: bool = False) -> dict[str, torch.Tensor]:
    """Group → (B, B) matrix of the mean position-aligned cosine between every two blocks of the looped
    size (the paper's Fig. 5 heatmaps); the diagonal is 1.

    >>> # block_similarity(model, block_size=4)["attn_q"].shape  ->  (6, 6) for 24 layers
    """
    chunks = _repeated_blocks(loop_target(model, block_size, blocks))
    block_pairs = [(a, b) for a in range(len(chunks)) for b in range(a + 1, len(chunks))]
    pairs = [pair for a, b in block_pairs for pair in zip(chunks[a], chunks[b])]
    matrices = {}
    for role, cos in _pair_stats(model, pairs, include_norms).cosines(eps=1e-8).items():
        matrix = torch.eye(len(chunks))
        for (a, b), value in zip(block_pairs, cos.view(len(block_pairs), -1).mean(1).cpu()):
            matrix[a, b] = matrix[b, a] = value
        matrices[role] = matrix
    return matrices


# ---------------------------------------------------------------------------------------------- snap
@torch.no_grad()
def snap_to_looped(model: nn.Module, block_size: int | None = None,
                   blocks: Sequence[Sequence[int]] | None = None) -> LoopedLM:
    """A tied (truly looped) ``LoopedLM`` whose every distinct layer is the average of the untied layers
    tied to it; embeddings, final norm and head are copied. The input model is not changed.

    >>> # snap_to_looped(untied_24_layers, block_size=4).save_pretrained("runs/x/snapped")  # a (4⊗6) model
    """
    from loopreg.surgery.adapters import model_family
    from loopreg.surgery.core import is_tied

    untied = unwrap(model)
    loopreg = model_family(untied) == "loopreg"
    if not loopreg or is_tied(untied):
        state = "a tied LoopedLM is already looped" if loopreg else "not a LoopedLM"
        raise UserError(f"snap_to_looped needs an untied LoopedLM; got {type(untied).__name__} ({state})")
    target = loop_target(untied, block_size, blocks)
    with torch.device(untied.embed.weight.device):
        looped = LoopedLM(replace(untied.config.arch, spec=str(target), tied=True))
    weights = {name: tensor for name, tensor in untied.state_dict().items() if not name.startswith("layers.")}
    layer_weights = [layer.state_dict() for layer in untied.layers]
    for distinct, applications in enumerate(target.tie_groups):
        for name, first in layer_weights[applications[0]].items():
            # first + mean of the differences: exactly `first` when the blocks already agree, and little
            # rounding when they are close (the regularized case).
            differences = [layer_weights[i][name].float() - first.float() for i in applications[1:]]
            mean = first.float() + sum(differences) / len(applications) if differences else first
            weights[f"layers.{distinct}.{name}"] = mean.to(first.dtype)
    looped.load_state_dict(weights)
    return looped.to(untied.embed.weight.dtype)


# --------------------------------------------------------------------------------------------- algorithm
@LAMBDA_SCHEDULES.register("constant")
def constant_lambda(t_warmup: str, alpha_f: float) -> ComposerScheduler:
    """λ throughout."""
    return ConstantScheduler()


@LAMBDA_SCHEDULES.register("linear_warmup")
def linear_warmup_lambda(t_warmup: str, alpha_f: float) -> ComposerScheduler:
    """0 → λ over ``t_warmup``, then λ."""
    return ConstantWithWarmupScheduler(t_warmup=t_warmup)


@LAMBDA_SCHEDULES.register("cosine")
def cosine_lambda(t_warmup: str, alpha_f: float) -> ComposerScheduler:
    """Warm-up over ``t_warmup``, then cosine decay to ``alpha_f · λ``."""
    return CosineAnnealingWithWarmupScheduler(t_warmup=t_warmup, alpha_f=alpha_f)


def add_loss_term(loss: torch.Tensor | dict[str, torch.Tensor], name: str,
                  term: torch.Tensor) -> dict[str, torch.Tensor]:
    """``loss`` (a tensor or Composer's dict of terms) with ``term`` added as its own key ``name``.

    Composer sums a loss dict's values for backward (or takes its ``total``) and logs each key as
    ``loss/train/<key>``, so a ``total`` gets the term too.

    >>> add_loss_term(torch.tensor(2.0), "loop_reg", torch.tensor(0.5))
    {'ce': tensor(2.), 'loop_reg': tensor(0.5000)}
    """
    terms = dict(loss) if isinstance(loss, dict) else {"ce": loss}
    if "total" in terms:
        terms["total"] = terms["total"] + term
    return {**terms, name: term}


class LoopRegularizer(Algorithm):
    """Adds ``λ(t) · loop_regularization(model).penalty`` (built at ``BEFORE_FORWARD``) to the loss at
    ``AFTER_LOSS``, logged as ``loss/train/loop_reg``, each ``R_G`` as ``loop_reg/similarity/<group>``.
    The layout is resolved at the first step of each fit (the model is final then) and reused while
    ``state.model`` stays the same object.
    Snapping to the looped model is the :class:`~loopreg.callbacks.loop_snap.LoopSnap` callback.

    Args:
        lambda_reg: λ, the paper's λ_reg (10 in its best setting).
        block_size, blocks, include_norms, group_weights, eps: see :func:`loop_regularization`.
        schedule: λ over training, a :data:`LAMBDA_SCHEDULES` entry: ``constant``, ``linear_warmup`` (0 → λ
            over ``t_warmup``, then λ) or ``cosine`` (warm-up, then cosine decay to ``alpha_f · λ``).

    >>> # Trainer(..., algorithms=[LoopRegularizer(lambda_reg=10, block_size=4)], callbacks=[LoopSnap()])
    """

    def __init__(self, lambda_reg: float = 10.0, block_size: int | None = None,
                 blocks: Sequence[Sequence[int]] | None = None, include_norms: bool = False,
                 group_weights: Mapping[str, float] | None = None, schedule: str = "constant",
                 t_warmup: str = "0ba", alpha_f: float = 0.0, eps: float = 1e-8) -> None:
        if lambda_reg < 0:
            raise RecipeError(f"must be >= 0, got {lambda_reg}", key="algorithms.loop_regularizer.lambda_reg")
        if schedule not in LAMBDA_SCHEDULES:
            raise RecipeError(f"'{schedule}' is not one of {', '.join(LAMBDA_SCHEDULES)}",
                              key="algorithms.loop_regularizer.schedule")
        self.lambda_reg, self.eps = lambda_reg, eps
        self.settings = dict(block_size=block_size, blocks=blocks, include_norms=include_norms,
                             group_weights=group_weights)
        self.scheduler: Callable[[State], float] = LAMBDA_SCHEDULES[schedule](t_warmup, alpha_f)
        self._layout: RegularizerLayout | None = None  # resolved at the first step of a fit, for _layout_model
        self._layout_model: nn.Module | None = None
        self._lambda_now = 0.0
        self._pending: LoopRegularization | None = None  # built at BEFORE_FORWARD, added at AFTER_LOSS
        self._similarity: dict[str, torch.Tensor] = {}  # R_G of the last microbatch, logged once per batch

    def match(self, event: Event, state: State) -> bool:
        return event in (Event.INIT, Event.FIT_START, Event.BEFORE_FORWARD, Event.AFTER_LOSS, Event.BATCH_END)

    def apply(self, event: Event, state: State, logger: Logger) -> None:
        if event == Event.INIT:  # fail before training on a bad layout, group weight or model
            regularizer_layout(state.model, **self.settings)
        elif event == Event.FIT_START:  # wrapping, surgery or a checkpoint load came before: resolve afresh
            self._layout = None
        elif event == Event.BEFORE_FORWARD:
            self._build_penalty(state)
        elif event == Event.AFTER_LOSS:
            self._add_penalty(state)
        elif event == Event.BATCH_END:
            self._log_similarity(logger)

    def layout(self, model: nn.Module) -> RegularizerLayout:
        """The layout of ``model``, resolved on first use and kept while the model is the same object."""
        if self._layout is None or self._layout_model is not model:
            self._layout, self._layout_model = regularizer_layout(model, **self.settings), model
        return self._layout

    def _build_penalty(self, state: State) -> None:
        # Built before the forward pass so autograd runs its backward last, once the activations are freed;
        # built after the loss, its weight-sized gradients would be computed first and held through the
        # whole backward (+1 copy of the layer weights at peak). Under DDP this defers the gradient
        # all-reduce to the end of backward. Under FSDP the weights are sharded here in every strategy.
        self._lambda_now = self.lambda_reg * self.scheduler(state)
        self._pending = self.layout(state.model).regularization(self.eps)

    def _add_penalty(self, state: State) -> None:
        result, self._pending = self._pending, None
        state.loss = add_loss_term(state.loss, "loop_reg", self._lambda_now * result.penalty)
        self._similarity = {role: r.detach() for role, r in result.similarity.items()}

    def _log_similarity(self, logger: Logger) -> None:
        if not self._similarity:
            return
        values = dict(zip(self._similarity, torch.stack(list(self._similarity.values())).tolist()))  # one sync
        metrics = {f"loop_reg/similarity/{role}": r for role, r in values.items()}
        metrics["loop_reg/similarity/mean"] = sum(values.values()) / len(values)
        logger.log_metrics({"loop_reg/lambda": self._lambda_now, **metrics})
