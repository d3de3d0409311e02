"""Loop surgery: turn a causal LM's layer stack into a looped one laid out by a loop spec.

    >>> from transformers import LlamaConfig, LlamaForCausalLM
    >>> model = LlamaForCausalLM(LlamaConfig(num_hidden_layers=6, hidden_size=32, intermediate_size=64,
    ...                                      num_attention_heads=4, vocab_size=64))
    >>> looped = loop_surgery(model, "2x(1,2,1)")          # layers 0-1 | 2-3 looped twice | 4-5
    >>> looped.config.num_hidden_layers, len(list(get_layers(looped).children()))
    (8, 6)

Surgery works **in place** and copies nothing it does not have to: the chosen layer modules move into
the new stack (``copy``/``stepwise``), ``average`` writes each block position's mean into one of its
source layers, and only an *untied* result duplicates layers (one per extra application). The source's
unused layers are dropped.

* **tied** (default): each distinct layer is stored once and runs at every application the spec gives
  it — a true looped model. Hugging Face models keep their class (``generate``, ``save_pretrained`` and
  Composer's ``HuggingFaceModel`` work unchanged); their layer list becomes a :class:`LoopedLayers`.
* **untied**: one layer per application, grouped by ``spec.tie_groups`` — what the cosine regularizer
  pulls back towards the tied model.

The spec and the tying are stored in the config (``loopreg_spec``, ``loopreg_tied``), so a saved result
reloads looped with :func:`loopreg.load`, or with plain transformers through the remote code its folder carries
(:mod:`loopreg.looped_hf`, the runtime of tied retrofits).
"""

from __future__ import annotations

import copy
import dataclasses
from typing import Any, Sequence

import torch
from torch import nn

from loopreg.errors import UserError
# The runtime of tied retrofits lives in loopreg.looped_hf (copied into their folders as remote code).
from loopreg.looped_hf import (ANCHOR_KEY, LOOPS_KEY, SPEC_KEY, TIED_KEY, UPDATE_KEY, LayerApplication,
                               LoopedCausalLM, LoopedLayers, looped_class, set_cache_slot)
from loopreg.looping import LoopPlan
from loopreg.relaxed import checkpointable, relaxed_applications
from loopreg.spec import LoopSpec
from loopreg.surgery.adapters import Adapter, find_adapter, get_layers, unwrap
from loopreg.surgery.layer_map import check_init, default_layer_map, parse_layer_map
from loopreg.surgery.relax import (RELAX_KEY, application_sources, check_lora_options, check_rank, check_svd_sources,
                                   projection_paths, relax_retrofit)
from loopreg.update_rules import check_update_rule

__all__ = ["LoopedLayers", "LayerApplication", "LoopedCausalLM", "SurgeryPlan", "plan_surgery", "loop_surgery",
           "looped_class", "looped_spec", "is_tied", "mark_layer_units", "stored_layers", "distinct_param_count",
           "set_cache_slot"]


def looped_spec(model: nn.Module) -> LoopSpec | None:
    """The loop spec ``model`` runs (a LoopedLM or a retrofit, bare or wrapped by Composer, DDP or FSDP); ``None`` for
    a plain model. Both looped kinds answer the same protocol: ``loop_spec`` and ``tied``.

    >>> # looped_spec(loopreg.load("runs/smollm2_keepall"))  ->  LoopSpec '7x1+5x2+18x1'
    """
    return getattr(unwrap(model), "loop_spec", None)


def is_tied(model: nn.Module) -> bool:
    """Whether ``model`` is a tied looped model: its stored layers *are* the loop, so its loop count can change."""
    return looped_spec(model) is not None and bool(unwrap(model).tied)


@dataclasses.dataclass(frozen=True)
class SurgeryPlan:
    """What :func:`loop_surgery` will do: ``seeds[d]`` lists the source layers behind distinct layer d
    (averaged for ``average``; the first one is the module that is kept).

    >>> plan_surgery(12, "4x(1,2,1)").seeds[4]
    (4,)
    """

    spec: LoopSpec
    init: str
    tied: bool
    block_ranges: tuple[tuple[int, ...], ...]
    seeds: tuple[tuple[int, ...], ...]


def plan_surgery(num_source_layers: int, spec: LoopSpec | str, layers: str | None = None, init: str = "copy",
                 tied: bool = True) -> SurgeryPlan:
    """Resolve the layer map (``layers`` or the default) into per-distinct-layer source layers.

    ``copy`` takes a block's range as is; ``stepwise`` takes every m-th layer of a range m times the
    block size; ``average`` averages the range's layers that map to the same block position (position
    p of a k-layer block from range r: r[p], r[p+k], r[p+2k], ...).

    >>> plan_surgery(8, "2x2", layers="0-3", init="average").seeds
    ((0, 2), (1, 3))
    """
    spec = LoopSpec.parse(spec)
    check_init(init)
    ranges = (parse_layer_map(layers, spec, num_source_layers, init) if layers is not None
              else default_layer_map(spec, num_source_layers, init))
    seeds = []
    for block, layer_ids in zip(spec.blocks, ranges):
        span = len(layer_ids) // block.size
        for position in range(block.size):
            if init == "stepwise":
                seeds.append((layer_ids[position * span],))
            else:
                seeds.append(tuple(layer_ids[position::block.size]))
    return SurgeryPlan(spec, init, tied, tuple(map(tuple, ranges)), tuple(seeds))


def stored_layers(model: nn.Module, adapter: Adapter | None = None) -> list[nn.Module]:
    """The layers with their own weights, in order (a looped model's distinct layers)."""
    return list(get_layers(model, adapter).children())


def distinct_param_count(model: nn.Module) -> int:
    """Parameters counted once however often they are used (tied layers, tied embeddings)."""
    return sum(p.numel() for p in unwrap(model).parameters())


def loop_surgery(model: nn.Module, spec: LoopSpec | str, layers: str | None = None, init: str = "copy",
                 tied: bool = True, update: str = "plain", anchor: float = 0.0, lora_rank: int | str | None = None,
                 lora_init: str = "svd", lora_roles: Sequence[str] | None = None) -> nn.Module:
    """Relayout ``model``'s layers by ``spec`` in place and return it (see the module docstring).

    ``layers`` is a layer map like ``"0-3,13-16,26-29"`` (one range per distinct block; default: first
    and last blocks from the ends, middle blocks from the middle); ``init`` is ``copy``, ``average`` or
    ``stepwise``; ``tied=False`` gives the untied, grouped model. The source layers of an already looped
    model are its stored (distinct) layers. ``update``/``anchor`` choose how looped blocks iterate
    (:mod:`loopreg.update_rules`: ``plain``, or the training-free ``damped`` rule with anchor β); they are
    stored in the config with the spec. ``lora_rank`` (an int or ``"full"``) relaxes the looped layers: each
    application gets its own low-rank delta on the projections of ``lora_roles`` (default all) and its own norm
    weights and biases, from the source layers it replaces (``lora_init="svd"``) or zero (:mod:`loopreg.surgery.relax`).

    >>> # loop_surgery(smollm2, "4x(1,4,1)")  # 0-3 | 13-16 x4 | 26-29: 12 distinct layers, depth 24
    """
    causal_lm = unwrap(model)
    adapter = find_adapter(causal_lm)
    source = stored_layers(causal_lm, adapter)
    plan = plan_surgery(len(source), spec, layers, init, tied)
    check_update_rule(update, anchor)
    if update != "plain" and not tied:
        raise UserError(f"update rule '{update}' runs one block K times: it needs a tied model, not --untied")
    lora_rank = check_lora_options(lora_rank, lora_init, tied)
    if lora_rank is not None and not relaxed_applications(plan.spec):
        raise UserError(f"--lora-rank {lora_rank}: loop spec '{plan.spec}' applies no layer twice; there is nothing to "
                        "relax")
    if lora_rank is not None:
        if any(hasattr(layer, "loopreg_relaxed_modules") for layer in source):
            raise UserError("the source is already relaxed (per-application deltas): export it with "
                            "`loopreg export --unroll` and loop that")
        paths = projection_paths(adapter, source[0], lora_roles)
        check_rank(source[0], paths, lora_rank)
        if lora_init == "svd":
            check_svd_sources(plan.spec, plan.block_ranges)
        # the states the deltas start from, taken before averaging writes into the kept source layers
        replaced = {} if lora_init != "svd" else {
            layer: [{name: tensor.detach().clone() for name, tensor in source[index].state_dict().items()}
                    for index in indices]
            for layer, indices in application_sources(plan.spec, plan.block_ranges).items()}
    distinct = [_seed(source, seed, plan.init) for seed in plan.seeds]
    applications = _application_layers(distinct, plan, getattr(causal_lm, "config", None))
    if adapter.family == "loopreg":  # a LoopedLM: its config and layer list
        config = causal_lm.config
        config.loopreg = {**config.loopreg, "spec": str(plan.spec), "tied": tied, "update": update,
                          "anchor": float(anchor)}
        causal_lm.spec = config.loop_spec
        config.num_hidden_layers = plan.spec.effective_depth
        causal_lm.layers = nn.ModuleList(distinct if tied else applications)
    else:
        _relayout_hf(causal_lm, adapter, distinct, applications, plan, update, float(anchor))
    relax = None if lora_rank is None else relax_retrofit(distinct, plan.spec, paths, lora_rank, lora_init, replaced)
    setattr(causal_lm.config, RELAX_KEY, relax)
    return model


def _seed(source: list[nn.Module], seed: tuple[int, ...], init: str) -> nn.Module:
    """The module for one distinct layer: the first seed layer, holding the seeds' mean for ``average``."""
    layer = source[seed[0]]
    if init == "average" and len(seed) > 1:
        peers = [source[index] for index in seed]
        with torch.no_grad():
            for name, param in layer.named_parameters():
                # fp32 so bf16 sources average accurately; the mean lands in the kept layer's own tensor. As
                # first + mean difference it is exact for identical seeds (snapping untied copies).
                first = param.float()
                differences = sum(peer.get_parameter(name).float() - first for peer in peers[1:])
                param.copy_(first + differences / len(peers))
    return layer


def _application_layers(distinct: list[nn.Module], plan: SurgeryPlan, config: Any) -> list[nn.Module]:
    """One module per application: the distinct layer itself when tied; for untied, the distinct layer
    at its first application and a deep copy at each later one."""
    if plan.tied:
        return [distinct[index] for index in plan.spec.schedule]
    memo = {id(config): config} if config is not None else {}  # copies keep sharing the model's config
    seen: set[int] = set()
    stack = []
    for index in plan.spec.schedule:
        stack.append(copy.deepcopy(distinct[index], memo={**memo}) if index in seen else distinct[index])
        seen.add(index)
    return stack


def _relayout_hf(model: nn.Module, adapter: Adapter, distinct: list[nn.Module], applications: list[nn.Module],
                 plan: SurgeryPlan, update: str, anchor: float) -> None:
    config = model.config
    layer_types = None
    if getattr(config, "layer_types", None) is not None:  # per-layer attention kinds (Qwen2 sliding windows)
        source = get_layers(model, adapter)
        source_types = source.layer_types if isinstance(source, LoopedLayers) else config.layer_types
        distinct_types = [source_types[seed[0]] for seed in plan.seeds]
        layer_types = distinct_types if plan.tied else [distinct_types[index] for index in plan.spec.schedule]
    model.__class__ = looped_class(type(model))
    for slot, layer in enumerate(applications):
        set_cache_slot(layer, slot)
    looped = LoopedLayers(distinct if plan.tied else applications, plan.spec, plan.tied, update, anchor, layer_types)
    model.set_submodule(adapter.layers, looped)
    if layer_types is not None:
        config.layer_types = looped.applied_types(LoopPlan(plan.spec, plan.tied))
    config.num_hidden_layers = plan.spec.effective_depth  # GPT-2 maps this to n_layer
    setattr(config, SPEC_KEY, str(plan.spec))
    setattr(config, TIED_KEY, plan.tied)
    setattr(config, UPDATE_KEY, update)
    setattr(config, ANCHOR_KEY, anchor)
    setattr(config, LOOPS_KEY, None)  # recorded, so from_pretrained(..., loopreg_loops=L) can set it
    mark_layer_units(model)


@dataclasses.dataclass(frozen=True)
class _IsLayer:
    """``fsdp_wrap_fn``/``activation_checkpointing_fn`` for Composer: each stored decoder layer is a unit
    (a looped layer is stored, hence wrapped, once). A class rather than a lambda so models pickle."""

    layer_class: type

    def __call__(self, module: nn.Module) -> bool:
        return isinstance(module, self.layer_class)


@dataclasses.dataclass(frozen=True)
class _CheckpointedLayer(_IsLayer):
    """``activation_checkpointing_fn``: each stored decoder layer, unless relaxed (one-line error)."""

    def __call__(self, module: nn.Module) -> bool:
        return super().__call__(module) and checkpointable(module)


def mark_layer_units(model: nn.Module) -> None:
    """Each stored decoder layer of a looped HF model is Composer's FSDP and activation-checkpointing unit."""
    layer_class = type(stored_layers(model)[0])
    model.fsdp_wrap_fn = _IsLayer(layer_class)
    model.activation_checkpointing_fn = _CheckpointedLayer(layer_class)
