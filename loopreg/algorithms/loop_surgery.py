"""``LoopSurgery``: loop surgery as a Composer algorithm, for training a looped model from pretrained weights.

Apply at ``Event.INIT`` (default) to a model built from Hugging Face weights, or at ``Event.AFTER_LOAD``
to resume from a *pre-surgery* Composer checkpoint (weights, optimizer state and timestamp load first,
then the surgery runs). Checkpoints written after surgery hold the looped layout: resume those with the
algorithm at ``INIT``.

    >>> # Trainer(model=HuggingFaceModel(smollm2), algorithms=[LoopSurgery("4x(1,4,1)")], ...)
    >>> LoopSurgery("4x(1,4,1)", event="after_load")
    LoopSurgery(spec='4x(1,4,1)', layers=None, init='copy', tied=True, lora_rank=None, event='after_load')
"""

from __future__ import annotations

import logging
from typing import Any, Callable, Sequence

import torch
from composer.core import Algorithm, Event, State
from composer.loggers import Logger
from composer.utils import ensure_tuple, is_model_fsdp
from torch import nn

from loopreg.errors import RecipeError, UserError
from loopreg.relaxed import relaxation_params
from loopreg.spec import LoopSpec
from loopreg.surgery.adapters import unwrap
from loopreg.surgery.core import loop_surgery, stored_layers
from loopreg.surgery.layer_map import check_init
from loopreg.surgery.relax import check_lora_options

__all__ = ["LoopSurgery", "apply_loop_surgery"]

log = logging.getLogger(__name__)

_EVENTS = (Event.INIT, Event.AFTER_LOAD)


def apply_loop_surgery(model: nn.Module, spec: LoopSpec | str, layers: str | None = None, init: str = "copy",
                       tied: bool = True,
                       optimizers: torch.optim.Optimizer | Sequence[torch.optim.Optimizer] | None = None,
                       lora_rank: int | str | None = None, lora_init: str = "svd",
                       lora_roles: Sequence[str] | None = None) -> nn.Module:
    """:func:`~loopreg.surgery.loop_surgery` on ``model`` (in place), keeping ``optimizers`` in step:
    parameters of dropped layers leave their groups (and state), the layer copies of an untied result
    join the group of the layer they copy, with a copy of its optimizer state, and the per-application deltas of a
    relaxed one (``lora_rank``) the group of the parameter they relax, with fresh state.

    >>> # apply_loop_surgery(hf_model, "4x(1,4,1)", optimizers=optimizer)
    """
    from composer.models import HuggingFaceModel

    before = list(unwrap(model).parameters())
    loop_surgery(model, spec, layers=layers, init=init, tied=tied, lora_rank=lora_rank, lora_init=lora_init,
                 lora_roles=lora_roles)
    if isinstance(model, HuggingFaceModel):
        # It passes only the batch keys its model's forward declares, read when it was built; the looped
        # forward also declares loops/grad_loops (Composer 0.32.1: a private helper reads them).
        model.model_forward_args = model._get_model_forward_args()
    _update_optimizers(ensure_tuple(optimizers) if optimizers is not None else (), before, unwrap(model),
                       LoopSpec.parse(spec), tied)
    return model


def _update_optimizers(optimizers: Sequence[torch.optim.Optimizer], before: list[nn.Parameter], model: nn.Module,
                       spec: LoopSpec, tied: bool) -> None:
    # composer.utils.module_surgery.update_params_in_optimizer puts every change in one param group; a
    # decay / no-decay split has dropped weights and norms in two, so each parameter is placed here.
    after = {id(p) for p in model.parameters()}
    removed = {id(p) for p in before} - after
    twins = {} if tied else _copy_twins(model, spec)
    deltas = {id(delta): (delta, shared) for layer in stored_layers(model)
              for delta, shared in relaxation_params(layer).values()}
    for optimizer in optimizers:
        for group in optimizer.param_groups:
            kept = [p for p in group["params"] if id(p) not in removed]
            present = {id(p) for p in kept}
            group["params"] = kept + [new for new, twin in (*twins.values(), *deltas.values()) if id(twin) in present]
        for param in [p for p in optimizer.state if id(p) in removed]:
            del optimizer.state[param]
        for copy, twin in twins.values():
            if twin in optimizer.state:
                optimizer.state[copy] = {key: value.clone() if torch.is_tensor(value) else value
                                         for key, value in optimizer.state[twin].items()}
    log.info("loop surgery '%s': %d parameters dropped, %d layer-copy and %d delta parameters added", spec,
             len(removed), len(twins), len(deltas))


def _copy_twins(model: nn.Module, spec: LoopSpec) -> dict[int, tuple[nn.Parameter, nn.Parameter]]:
    """id(copy) → (copy, original) for each parameter of an untied model's later applications."""
    stack = stored_layers(model)
    twins = {}
    for applications in spec.tie_groups:
        first = stack[applications[0]]
        for slot in applications[1:]:
            for copy, original in zip(stack[slot].parameters(), first.parameters()):
                twins[id(copy)] = (copy, original)
    return twins


def _checked(key: str, check: Callable[[Any], Any], value: Any) -> Any:
    """``check(value)``, its one-line ``ValueError`` raised under the recipe key ``algorithms.loop_surgery.<key>``."""
    try:
        return check(value)
    except ValueError as err:
        raise RecipeError(str(err), key=f"algorithms.loop_surgery.{key}") from None


def _event(event: str | Event) -> Event:
    try:
        value = Event(event)
    except ValueError:
        value = None
    if value not in _EVENTS:
        raise ValueError(f"LoopSurgery event {event!r} must be one of {[e.value for e in _EVENTS]}")
    return value


class LoopSurgery(Algorithm):
    """Loop surgery at ``INIT`` or ``AFTER_LOAD`` (see the module docstring and
    :func:`~loopreg.surgery.loop_surgery` for ``spec``, ``layers``, ``init`` and ``tied``).

    Args:
        spec: the loop spec, e.g. ``"4x(1,4,1)"``.
        layers: the layer map, e.g. ``"0-3,13-16,26-29"`` (default: ends from the ends, middle from the middle).
        init: ``copy``, ``average`` or ``stepwise``.
        tied: ``False`` keeps one layer per application, grouped for the cosine regularizer.
        lora_rank, lora_init, lora_roles: relaxed recursion, per-application deltas of the looped layers
            (:mod:`loopreg.surgery.relax`): a rank (int or ``"full"``), ``svd`` or ``zero``, the projections.
        event: ``"init"`` or ``"after_load"`` (an :class:`~composer.core.Event` or its value, as YAML gives it).
    """

    def __init__(self, spec: str, layers: str | None = None, init: str = "copy", tied: bool = True,
                 lora_rank: int | str | None = None, lora_init: str = "svd", lora_roles: Sequence[str] | None = None,
                 event: str | Event = Event.INIT) -> None:
        self.spec = _checked("spec", LoopSpec.parse, spec)
        _checked("init", check_init, init)
        self.lora_rank = _checked("lora_rank", lambda rank: check_lora_options(rank, lora_init, tied), lora_rank)
        self.event = _checked("event", _event, event)
        self.layers, self.init, self.tied = layers, init, tied
        self.lora_init, self.lora_roles = lora_init, None if lora_roles is None else list(lora_roles)

    def __repr__(self) -> str:
        return (f"LoopSurgery(spec='{self.spec}', layers={self.layers!r}, init={self.init!r}, tied={self.tied}, "
                f"lora_rank={self.lora_rank!r}, event='{self.event.value}')")

    @staticmethod
    def required_on_load() -> bool:
        return True

    def match(self, event: Event, state: State) -> bool:
        return event == self.event

    def apply(self, event: Event, state: State, logger: Logger) -> None:
        if is_model_fsdp(state.model):
            raise ValueError("LoopSurgery cannot restructure a model FSDP has already wrapped (event 'after_load' "
                             "under FSDP); apply it at 'init' and load a post-surgery checkpoint")
        try:
            apply_loop_surgery(state.model, self.spec, layers=self.layers, init=self.init, tied=self.tied,
                               optimizers=state.optimizers, lora_rank=self.lora_rank, lora_init=self.lora_init,
                               lora_roles=self.lora_roles)
        except UserError as err:  # what only the model can tell (a layer map or rank that does not fit it)
            raise RecipeError(str(err), key="algorithms.loop_surgery") from None
