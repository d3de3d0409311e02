"""Relaxed recursion (Bae et al., ICLR 2025): a tied layer whose every application carries its own small delta.

A looped model applies each stored layer of its thinking block several times. Relaxing a stored layer gives each
of those applications

* a low-rank delta ``B_a A_a`` on each chosen projection (``lora_A``: (n, r, in), ``lora_B``: (n, out, r), next
  to the projection's own weight), added to its output as ``x A_aᵀ B_aᵀ`` — the shared weight is never copied;
* its own vectors: every norm weight and bias of the layer gets a per-application delta (``weight_deltas``:
  (n, d) next to ``weight``), so application a runs with ``weight + weight_deltas[a]``.

With the deltas zero the relaxed model is the tied one; at full rank with deltas from the source layers
(:mod:`loopreg.surgery.relax`) it is the source. Past its stored count (a loop override) a layer repeats its last
application's deltas. Which application runs is :attr:`loopreg.looping.Step.application`, chosen *inside* the
call (:func:`applied`), so a layer recomputed in backward (checkpointing) runs with the same deltas again.

    >>> layer = nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4))
    >>> relax_layer(layer, applications=3, projections=["0"], rank=2)
    >>> tuple(layer[0].lora_A.shape), tuple(layer[1].weight_deltas.shape)
    ((3, 2, 4), (3, 4))

Written here rather than with PEFT: a PEFT LoRA adapter is one delta per module, active for the whole forward,
while a looped layer is one module run several times per forward with a different delta each time; and a
folder's remote code must load with plain transformers, without peft installed.

Portable: torch and the standard library only; copied into model folders as remote code.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .errors import UserError
from .spec import LoopSpec

__all__ = ["RELAX_KEY", "relax_layer", "relax_stack", "relaxed_applications", "applied", "projection_features",
           "application_state", "relaxation_params", "checkpointable"]

# What a relaxed model's config records: {"rank": int | "full", "projections": paths inside a layer}.
RELAX_KEY = "loopreg_relax"
_APPLICATIONS = "loopreg_applications"  # on a relaxed layer: how many applications it stores deltas for
_MODULES = "loopreg_relaxed_modules"  # on a relaxed layer: its submodules with deltas
_ACTIVE = "loopreg_application"  # on each such submodule: the application running now


def projection_features(module: nn.Module) -> tuple[int, int]:
    """``(in_features, out_features)`` of a projection: an ``nn.Linear``, or transformers' ``Conv1D`` (GPT-2),
    which stores its weight transposed as (in, out).

    >>> projection_features(nn.Linear(3, 5))
    (3, 5)
    """
    weight = module.weight
    if weight.dim() != 2:
        raise UserError(f"{type(module).__name__} has a {weight.dim()}-d weight, not a projection's matrix")
    return (weight.shape[1], weight.shape[0]) if isinstance(module, nn.Linear) else tuple(weight.shape)


def relax_layer(layer: nn.Module, applications: int, projections: Sequence[str], rank: int | str) -> None:
    """Give ``layer`` (a stored layer applied ``applications`` times) zero per-application deltas in place: a
    rank-``rank`` one (``"full"``: the projection's smaller dimension) on each projection named in ``projections``
    (paths inside the layer) and one on each vector parameter. See the module docstring.

    >>> # relax_layer(llama_layer, 4, ["self_attn.q_proj", "mlp.down_proj"], rank=8)
    """
    relaxed: list[nn.Module] = []
    for path in projections:
        module = layer.get_submodule(path)
        features_in, features_out = projection_features(module)
        r = min(features_in, features_out) if rank == "full" else int(rank)
        weight = module.weight
        module.register_parameter("lora_A", nn.Parameter(weight.new_zeros(applications, r, features_in)))
        module.register_parameter("lora_B", nn.Parameter(weight.new_zeros(applications, features_out, r)))
        relaxed.append(module)
    for module in layer.modules():
        vectors = [name for name, param in module.named_parameters(recurse=False) if param.dim() == 1]
        for name in vectors:
            param = module.get_parameter(name)
            module.register_parameter(f"{name}_deltas", nn.Parameter(param.new_zeros(applications, *param.shape)))
        low_rank = module in relaxed
        if vectors or low_rank:
            module.loopreg_vectors, module.loopreg_low_rank = tuple(vectors), low_rank
            setattr(module, _ACTIVE, 0)
            module.register_forward_pre_hook(_enter)
            module.register_forward_hook(_leave, always_call=True)  # shadows go even if the forward raises
            if module not in relaxed:
                relaxed.append(module)
    setattr(layer, _MODULES, relaxed)
    setattr(layer, _APPLICATIONS, applications)


def relaxed_applications(spec: LoopSpec) -> dict[int, int]:
    """Stored layer → its number of applications, for the tied layers that are applied more than once (the ones
    relaxation gives deltas).

    >>> relaxed_applications(LoopSpec.parse("1x1+2x3"))
    {1: 3, 2: 3}
    """
    return {layer: len(slots) for layer, slots in enumerate(spec.tie_groups) if len(slots) > 1}


def relax_stack(layers: Sequence[nn.Module], spec: LoopSpec, tied: bool, relax: Mapping[str, Any]) -> None:
    """Relax every stored layer of a tied ``spec`` that is applied more than once, as the config entry ``relax``
    (``{"rank": ..., "projections": [...]}``) says; the deltas start at zero (a loaded checkpoint fills them).
    An untied model stores one layer per application, so a ``loopreg_relax`` entry in its config is an error."""
    if not tied:
        raise UserError(f"config {RELAX_KEY} relaxes the applications of shared layers, but this {spec} model is "
                        "untied (one stored layer per application): remove the entry or tie the model", key=RELAX_KEY)
    for index, applications in relaxed_applications(spec).items():
        relax_layer(layers[index], applications, relax["projections"], relax["rank"])


def applied(layer: nn.Module, application: int) -> Callable[..., Any]:
    """``layer`` as called at its ``application``-th application: the module itself unless it is relaxed; a relaxed
    one selects that application's deltas (its last one's past its stored count) within the call.

    >>> applied(nn.Identity(), 2)(torch.ones(1)).tolist()
    [1.0]
    """
    modules = getattr(layer, _MODULES, None)
    if not modules:
        return layer
    application = min(application, getattr(layer, _APPLICATIONS) - 1)

    def call(*args: Any, **kwargs: Any) -> Any:
        for module in modules:
            setattr(module, _ACTIVE, application)
        return layer(*args, **kwargs)

    return call


_ABSENT = object()


def checkpointable(layer: nn.Module) -> bool:
    """``True`` for a stored layer that Composer's activation checkpointing may wrap; a relaxed one raises a
    one-line :class:`~loopreg.errors.UserError`: the wrapper would recompute it in backward with whichever
    application ran last (loopreg's own ``checkpoint=True`` selects the deltas inside the recomputation).

    >>> checkpointable(nn.Linear(2, 2))
    True
    """
    if getattr(layer, _MODULES, None):
        raise UserError("fsdp_config.activation_checkpointing would recompute a relaxed layer (per-application "
                        "deltas) with the wrong application's deltas; set it to false for a relaxed retrofit")
    return True


def _enter(module: nn.Module, args: tuple) -> None:
    # The application's vectors shadow the shared parameters as instance attributes for the call (the module's
    # forward reads ``self.weight``); the parameters themselves, and so state_dict and the optimizer, are untouched.
    # What the instance dict held before (a wrapper's own tensor attribute) is put back on leaving.
    application = getattr(module, _ACTIVE)
    effective = {name: getattr(module, name) + getattr(module, f"{name}_deltas")[application]
                 for name in module.loopreg_vectors}
    module.loopreg_shadowed = {name: module.__dict__.get(name, _ABSENT) for name in effective}
    module.__dict__.update(effective)


def _leave(module: nn.Module, args: tuple, output: Any) -> Any:
    for name, before in getattr(module, "loopreg_shadowed", {}).items():
        if before is _ABSENT:
            module.__dict__.pop(name, None)
        else:
            module.__dict__[name] = before
    module.loopreg_shadowed = {}
    if not module.loopreg_low_rank or not args:
        return output
    application = getattr(module, _ACTIVE)
    return output + F.linear(F.linear(args[0], module.lora_A[application]), module.lora_B[application])


def application_state(layer: nn.Module, application: int) -> dict[str, torch.Tensor]:
    """The plain ``state_dict`` of ``layer`` as its ``application``-th application runs it: the deltas merged into
    the weights they relax, their own entries gone (for an unrolled export). An unrelaxed layer's own state.

    >>> application_state(nn.Linear(2, 2), 0).keys()
    dict_keys(['weight', 'bias'])
    """
    state = dict(layer.state_dict())
    if not getattr(layer, _MODULES, None):
        return state
    application = min(application, getattr(layer, _APPLICATIONS) - 1)
    prefixes = {module: name for name, module in layer.named_modules()}
    for module in getattr(layer, _MODULES):
        prefix = f"{prefixes[module]}." if prefixes[module] else ""
        for name in module.loopreg_vectors:
            delta = state.pop(f"{prefix}{name}_deltas")[application]
            state[f"{prefix}{name}"] = state[f"{prefix}{name}"] + delta
        if module.loopreg_low_rank:
            low_rank = state.pop(f"{prefix}lora_B")[application] @ state.pop(f"{prefix}lora_A")[application]
            weight = state[f"{prefix}weight"]
            state[f"{prefix}weight"] = weight + (low_rank if isinstance(module, nn.Linear) else low_rank.T)
    return state


def relaxation_params(layer: nn.Module) -> dict[str, tuple[nn.Parameter, nn.Parameter]]:
    """Name → (delta parameter, the shared parameter it relaxes) for a relaxed ``layer`` (``lora_A``/``lora_B``
    relax their projection's weight); empty for an unrelaxed one. The optimizer puts each delta in its shared
    parameter's group, the parameter counts report them apart."""
    pairs = {}
    for name, module in layer.named_modules():
        prefix = f"{name}." if name else ""
        for vector in getattr(module, "loopreg_vectors", ()):
            pairs[f"{prefix}{vector}_deltas"] = (module.get_parameter(f"{vector}_deltas"), module.get_parameter(vector))
        if getattr(module, "loopreg_low_rank", False):
            for factor in ("lora_A", "lora_B"):
                pairs[f"{prefix}{factor}"] = (module.get_parameter(factor), module.weight)
    return pairs
