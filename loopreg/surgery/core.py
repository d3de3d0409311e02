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
reloads looped with :func:`load_looped`.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import inspect
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import torch
from torch import nn

from loopreg.model import LoopedLM, batch_option
from loopreg.spec import LoopSpec
from loopreg.surgery.adapters import Adapter, find_adapter, get_layers, unwrap
from loopreg.surgery.layer_map import check_init, default_layer_map, parse_layer_map
from loopreg.update_rules import check_update_rule, iteration_hooks

__all__ = ["LoopedLayers", "LayerApplication", "LoopedCausalLM", "SurgeryPlan", "plan_surgery", "loop_surgery",
           "load_looped", "looped_class", "looped_spec", "stored_layers", "distinct_param_count", "set_cache_slot"]

SPEC_KEY, TIED_KEY = "loopreg_spec", "loopreg_tied"
UPDATE_KEY, ANCHOR_KEY = "loopreg_update", "loopreg_anchor"


def set_cache_slot(layer: nn.Module, slot: int) -> None:
    """Point ``layer``'s attention at KV-cache slot ``slot``: Hugging Face attention caches keys/values under
    its ``layer_idx``, so every application of a looped layer needs its own."""
    for module in layer.modules():
        if hasattr(module, "layer_idx"):
            module.layer_idx = slot


class LayerApplication:
    """One application of a stored layer: calling it runs that layer with the KV-cache slot
    (``layer_idx``) of its position in the stack. Attribute reads go to the layer.

    ``enter``/``leave`` are the update rule's hooks (:mod:`loopreg.update_rules`) and the truncated-backprop
    bookkeeping: ``enter(h)`` sees the layer's input hidden state, ``leave(h)`` maps its output hidden state;
    ``no_grad`` runs the layer without an autograd graph.
    """

    def __init__(self, owner: LoopedLayers, key: str, slot: int, enter: Sequence[Callable] = (),
                 leave: Sequence[Callable] = (), no_grad: bool = False) -> None:
        self._owner, self._key, self.slot = owner, key, slot
        self._enter, self._leave, self._no_grad = tuple(enter), tuple(leave), no_grad

    @property
    def layer(self) -> nn.Module:
        # Looked up at every call: FSDP may have replaced the stored module by its wrapper.
        return self._owner._modules[self._key]

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        layer = self.layer
        set_cache_slot(layer, self.slot)
        if not (self._enter or self._leave or self._no_grad):
            return layer(*args, **kwargs)  # plain looping: nothing between the layers
        hidden = args[0] if args else kwargs["hidden_states"]
        for hook in self._enter:
            hook(hidden)
        with torch.no_grad() if self._no_grad else contextlib.nullcontext():
            output = layer(*args, **kwargs)
        # Decoder layers return the hidden state, or a tuple that starts with it (GPT-2, NeoX, 4.53 Llama).
        hidden = output[0] if isinstance(output, tuple) else output
        for hook in self._leave:
            hidden = hook(hidden)
        return (hidden, *output[1:]) if isinstance(output, tuple) else hidden

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_"):  # private names (and unpickling, before __init__ ran) never forward
            raise AttributeError(name)
        return getattr(self.layer, name)

    def __repr__(self) -> str:
        return f"LayerApplication(slot={self.slot}, layer={self._key})"


class LoopedLayers(nn.ModuleList):
    """The layer list of a tied looped Hugging Face model: it *stores* the distinct layers (module tree,
    ``state_dict``, FSDP units, parameter count) and *reads* as the unrolled stack (iteration, ``len`` and
    indexing give one :class:`LayerApplication` per application), which is all a decoder's forward uses.

    :meth:`running` swaps in another loop count (or truncated backprop) for the length of one call.

    >>> layers = LoopedLayers([nn.Identity(), nn.Identity()], spec="1x1+1x3")
    >>> len(layers), len(list(layers.children())), layers[3]
    (4, 2, LayerApplication(slot=3, layer=1))
    """

    def __init__(self, layers: Sequence[nn.Module], spec: LoopSpec | str, update: str = "plain",
                 anchor: float = 0.0) -> None:
        super().__init__()
        for index, layer in enumerate(layers):
            self.add_module(str(index), layer)
        self.spec = LoopSpec.parse(spec)
        if self.spec.distinct_layers != len(layers):
            raise ValueError(f"loop spec '{self.spec}' has {self.spec.distinct_layers} distinct layers, "
                             f"got {len(layers)} layers")
        check_update_rule(update, anchor)
        self.update, self.anchor = update, float(anchor)
        self.applications = self._applications(self.spec)

    @property
    def schedule(self) -> tuple[int, ...]:
        return self.spec.schedule

    def _applications(self, spec: LoopSpec, grad_loops: int | None = None) -> list[LayerApplication]:
        enter, leave = iteration_hooks(spec, self.update, self.anchor)
        hooks: dict[int, tuple[list[Callable], list[Callable]]] = {}
        for slot, hook in enter.items():
            hooks.setdefault(slot, ([], []))[0].append(hook)
        for slot, hook in leave.items():
            hooks.setdefault(slot, ([], []))[1].append(hook)
        skipped = spec.truncated_applications(grad_loops)
        if skipped:
            # Jacobian-free through the skipped iterations (as LoopedLM.forward): their output carries the
            # gradient of their input unchanged, so earlier layers and the embedding still learn.
            start: dict[str, torch.Tensor] = {}
            hooks.setdefault(skipped.start, ([], []))[0].insert(0, lambda h: start.__setitem__("h", h))
            hooks.setdefault(skipped.stop - 1, ([], []))[1].append(
                lambda out: out.detach() + (start["h"] - start["h"].detach()))
        return [LayerApplication(self, str(index), slot, *hooks.get(slot, ((), ())), no_grad=slot in skipped)
                for slot, index in enumerate(spec.schedule)]

    @contextlib.contextmanager
    def running(self, config: Any, loops: int | Sequence[int] | None = None,
                grad_loops: int | None = None) -> Iterator[None]:
        """Within the block the stack runs ``loops`` (see :meth:`LoopSpec.with_loops`) and, while autograd
        records, builds the graph of only the last ``grad_loops`` thinking iterations; ``config`` (the HF
        config, whose ``num_hidden_layers`` bounds the decoder's loop) follows. ``None`` keeps what runs
        now, so a forward nested in ``generate(loops=...)`` keeps the override."""
        if loops is None and (grad_loops is None or not torch.is_grad_enabled()):
            yield
            return
        spec = self.spec.with_loops(loops) if loops is not None else self.spec
        saved = self.applications, config.num_hidden_layers
        self.applications = self._applications(spec, grad_loops if torch.is_grad_enabled() else None)
        config.num_hidden_layers = spec.effective_depth
        try:
            yield
        finally:
            self.applications, config.num_hidden_layers = saved

    def __iter__(self) -> Iterator[LayerApplication]:
        return iter(self.applications)

    def __len__(self) -> int:
        return len(self.applications)

    def __getitem__(self, index: int | slice) -> Any:
        return self.applications[index]

    def __repr__(self) -> str:
        return nn.Module.__repr__(self)  # the stored layers, not D application lines

    def extra_repr(self) -> str:
        update = f", update={self.update}, anchor={self.anchor}" if self.update != "plain" else ""
        return f"spec={self.spec}{update}"


class LoopedCausalLM:
    """Put in front of a looped Hugging Face model's own class by surgery (the class keeps its name, so
    ``save_pretrained`` records the same architecture): ``forward`` and ``generate`` take ``loops=`` (a loop
    override, as :class:`~loopreg.model.LoopedLM` has it) and ``forward`` takes ``grad_loops=`` (truncated
    backprop through the thinking block). Both travel per call, e.g. in a Composer batch.

    >>> # retrofit.generate(input_ids, max_new_tokens=8, loops=3)
    """

    def forward(self, *args: Any, loops: int | Sequence[int] | None = None, grad_loops: int | None = None,
                **kwargs: Any) -> Any:
        with self._running(loops, grad_loops):
            return super().forward(*args, **kwargs)

    def generate(self, *args: Any, loops: int | Sequence[int] | None = None, **kwargs: Any) -> Any:
        with self._running(loops, None):
            return super().generate(*args, **kwargs)

    def _running(self, loops: int | Sequence[int] | torch.Tensor | None,
                 grad_loops: int | torch.Tensor | None) -> contextlib.AbstractContextManager:
        loops, grad_loops = batch_option(loops), batch_option(grad_loops)  # as RandomLoops puts them in a batch
        layers = get_layers(self)
        if isinstance(layers, LoopedLayers):
            return layers.running(self.config, loops, grad_loops)
        if loops is not None or grad_loops is not None:
            raise ValueError(f"loop override loops={loops!r}, grad_loops={grad_loops!r} needs a tied looped model; "
                             f"this one is untied ('{getattr(self.config, SPEC_KEY, None)}'): snap it first")
        return contextlib.nullcontext()


class _LoopedClasses:
    """Where the looped variant of each HF class lives, e.g. ``_LOOPED.LlamaForCausalLM``: made once per
    class and found again by name (transformers exports every causal-LM class), so looped models pickle."""

    def __getattr__(self, name: str) -> type:
        if name.startswith("_"):
            raise AttributeError(name)
        import transformers

        return looped_class(getattr(transformers, name))


_LOOPED = _LoopedClasses()
_LOOPED_BY_BASE: dict[type, type] = {}


def looped_class(base: type) -> type:
    """The subclass of ``base`` with :class:`LoopedCausalLM` in front (the same one on every call)."""
    if issubclass(base, LoopedCausalLM):
        return base
    if base not in _LOOPED_BY_BASE:
        _LOOPED_BY_BASE[base] = type(base.__name__, (LoopedCausalLM, base), {
            "__module__": __name__, "__qualname__": f"_LOOPED.{base.__name__}", "__doc__": base.__doc__,
            "forward": _forward_with_signature(base)})
    return _LOOPED_BY_BASE[base]


def _forward_with_signature(base: type) -> Callable:
    """:meth:`LoopedCausalLM.forward` showing ``base.forward``'s parameters plus ``loops``/``grad_loops``:
    Composer's ``HuggingFaceModel`` passes the batch keys that the forward's signature names."""
    def forward(self: Any, *args: Any, **kwargs: Any) -> Any:
        return LoopedCausalLM.forward(self, *args, **kwargs)

    parameters = list(inspect.signature(base.forward).parameters.values())
    variadic = [p for p in parameters if p.kind is inspect.Parameter.VAR_KEYWORD]
    extra = [inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=None) for name in ("loops", "grad_loops")]
    forward.__signature__ = inspect.Signature([p for p in parameters if p not in variadic] + extra + variadic)
    forward.__doc__ = base.forward.__doc__
    return forward


def looped_spec(model: nn.Module) -> LoopSpec | None:
    """The loop spec ``model`` runs (a :class:`~loopreg.model.LoopedLM` or a surgery output), ``None`` for a
    plain model.

    >>> # looped_spec(load_source("runs/smollm2_keepall"))  ->  LoopSpec '7x1+5x2+18x1'
    """
    model = unwrap(model)
    if isinstance(model, LoopedLM):
        return model.spec
    spec = getattr(getattr(model, "config", None), SPEC_KEY, None)
    return LoopSpec.parse(spec) if spec is not None else None


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
                 tied: bool = True, update: str = "plain", anchor: float = 0.0) -> nn.Module:
    """Relayout ``model``'s layers by ``spec`` in place and return it (see the module docstring).

    ``layers`` is a layer map like ``"0-3,13-16,26-29"`` (one range per distinct block; default: first
    and last blocks from the ends, middle blocks from the middle); ``init`` is ``copy``, ``average`` or
    ``stepwise``; ``tied=False`` gives the untied, grouped model. The source layers of an already looped
    model are its stored (distinct) layers. ``update``/``anchor`` choose how looped blocks iterate
    (:mod:`loopreg.update_rules`: ``plain``, or the training-free ``damped`` rule with anchor β); they are
    stored in the config with the spec.

    >>> # loop_surgery(smollm2, "4x(1,4,1)")  # 0-3 | 13-16 x4 | 26-29: 12 distinct layers, depth 24
    """
    causal_lm = unwrap(model)
    adapter = find_adapter(causal_lm)
    source = stored_layers(causal_lm, adapter)
    plan = plan_surgery(len(source), spec, layers, init, tied)
    check_update_rule(update, anchor)
    if update != "plain" and not tied:
        raise ValueError(f"update rule '{update}' runs one block K times: it needs a tied model, not --untied")
    distinct = [_seed(source, seed, plan.init) for seed in plan.seeds]
    applications = _application_layers(distinct, plan, getattr(causal_lm, "config", None))
    if isinstance(causal_lm, LoopedLM):
        causal_lm.config = dataclasses.replace(causal_lm.config, spec=str(plan.spec), tied=tied, update=update,
                                               anchor=float(anchor))
        causal_lm.spec = causal_lm.config.loop_spec
        causal_lm.layers = nn.ModuleList(distinct if tied else applications)
    else:
        _relayout_hf(causal_lm, adapter, distinct, applications, plan, update, float(anchor))
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
    model.__class__ = looped_class(type(model))
    if plan.tied:
        model.set_submodule(adapter.layers, LoopedLayers(distinct, plan.spec, update, anchor))
    else:
        model.set_submodule(adapter.layers, nn.ModuleList(applications))
        for slot, layer in enumerate(applications):
            set_cache_slot(layer, slot)
    config.num_hidden_layers = plan.spec.effective_depth  # GPT-2 maps this to n_layer
    if getattr(config, "layer_types", None) is not None:  # per-layer attention kinds (Qwen2 sliding windows)
        config.layer_types = [layer.attention_type for layer in applications]
    setattr(config, SPEC_KEY, str(plan.spec))
    setattr(config, TIED_KEY, plan.tied)
    setattr(config, UPDATE_KEY, update)
    setattr(config, ANCHOR_KEY, anchor)
    _mark_layer_units(model, type(distinct[0]))


@dataclasses.dataclass(frozen=True)
class _IsLayer:
    """``fsdp_wrap_fn``/``activation_checkpointing_fn`` for Composer: each stored decoder layer is a unit
    (a looped layer is stored, hence wrapped, once). A class rather than a lambda so models pickle."""

    layer_class: type

    def __call__(self, module: nn.Module) -> bool:
        return isinstance(module, self.layer_class)


def _mark_layer_units(model: nn.Module, layer_class: type) -> None:
    model.fsdp_wrap_fn = _IsLayer(layer_class)
    model.activation_checkpointing_fn = _IsLayer(layer_class)


def load_looped(folder: str | Path, **from_pretrained_kwargs: Any) -> nn.Module:
    """Load a Hugging Face folder (or hub id) and rebuild the looped structure its config records
    (``loopreg_spec``/``loopreg_tied``, written by surgery); a plain checkpoint loads as is.

    >>> # load_looped("runs/smollm2_middle")  # LlamaForCausalLM with 12 stored layers, depth 24
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(folder)
    spec_text = getattr(config, SPEC_KEY, None)
    if spec_text is None or not getattr(config, TIED_KEY, True):
        # Plain, or untied: the checkpoint already has one layer per application.
        model = AutoModelForCausalLM.from_pretrained(folder, config=config, **from_pretrained_kwargs)
        if spec_text is not None:
            model.__class__ = looped_class(type(model))  # loops= gets the one-line "untied" error
            _mark_layer_units(model, type(stored_layers(model)[0]))
        return model
    spec = LoopSpec.parse(spec_text)
    first_application = [group[0] for group in spec.tie_groups]
    config.num_hidden_layers = spec.distinct_layers  # what the checkpoint stores
    if getattr(config, "layer_types", None) is not None:
        config.layer_types = [config.layer_types[slot] for slot in first_application]
    model = AutoModelForCausalLM.from_pretrained(folder, config=config, **from_pretrained_kwargs)
    identity = ",".join(f"{b.offset}-{b.offset + b.size - 1}" for b in spec.blocks)
    return loop_surgery(model, spec, layers=identity, update=getattr(config, UPDATE_KEY, "plain"),
                        anchor=getattr(config, ANCHOR_KEY, 0.0))
