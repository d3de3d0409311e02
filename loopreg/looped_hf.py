"""The runtime of looped Hugging Face models (loop surgery's retrofits): the layer list that stores each layer once
and reads as the forward's layer applications, and the looped variant of the model's own class.

Surgery (:mod:`loopreg.surgery.core`) builds these in place. A saved tied retrofit carries this module and its
relative imports as remote code (:mod:`loopreg.remote_code`), its ``auto_map`` naming ``looped_hf.<Class>``, so
plain transformers rebuilds it tied from the config alone, with no loopreg installed:

    >>> # AutoModelForCausalLM.from_pretrained("runs/smollm2_middle", trust_remote_code=True).generate(ids, loops=3)

The family's own decoder forward runs unchanged: it iterates over the layer list, and each item it gets is one
application of the forward's :class:`~loopreg.looping.LoopPlan`, which runs the stored layer between the plan's
hooks with its own KV-cache slot. Portable: torch, transformers, the standard library and its siblings only.
"""

from __future__ import annotations

import contextlib
import copy
import inspect
from typing import Any, Callable, Iterator, Sequence

import torch
from torch import nn

# Every sibling the remote code needs is imported here directly: transformers 4.53 copies only an entry module's
# direct relative imports into its module cache.
from .adaptive import ExitRule, ExitStats
from .errors import UserError
from .hf_compat import CACHE_KEY, cache_of, cache_parameter, generation_cache, lazy_cache
from .looping import LoopPlan
from .relaxed import RELAX_KEY, applied, relax_stack
from .remote_code import attach_remote_code
from .spec import LoopSpec
from .update_rules import check_update_rule

__all__ = ["SPEC_KEY", "TIED_KEY", "UPDATE_KEY", "ANCHOR_KEY", "LOOPS_KEY", "RETROFIT_KEYS", "DECODER_LAYERS",
           "decoder_layers_path", "set_cache_slot", "LayerApplication", "LoopedLayers", "LoopedCausalLM",
           "looped_class"]

# What a retrofit's config records: its loop spec, whether it is tied, the update rule (and its anchor), and the
# loop count a call that gives none runs (None: the spec's own).
SPEC_KEY, TIED_KEY = "loopreg_spec", "loopreg_tied"
UPDATE_KEY, ANCHOR_KEY = "loopreg_update", "loopreg_anchor"
LOOPS_KEY = "loopreg_loops"
RETROFIT_KEYS = (SPEC_KEY, TIED_KEY, UPDATE_KEY, ANCHOR_KEY, LOOPS_KEY, RELAX_KEY)

# model_type -> where the model keeps its decoder layers (loopreg.surgery.adapters reads its paths from here).
DECODER_LAYERS = {"gpt2": "transformer.h", "gpt_neox": "gpt_neox.layers", "llama": "model.layers",
                  "mistral": "model.layers", "qwen2": "model.layers", "qwen3": "model.layers", "olmo2": "model.layers",
                  "gemma3_text": "model.layers"}
# model_type -> its final norm, before the LM head: with it, adaptive exit's `kl` criterion decodes a hidden state
FINAL_NORM = {"gpt2": "transformer.ln_f", "gpt_neox": "gpt_neox.final_layer_norm", "llama": "model.norm",
              "mistral": "model.norm", "qwen2": "model.norm", "qwen3": "model.norm", "olmo2": "model.norm",
              "gemma3_text": "model.norm"}


def set_cache_slot(layer: nn.Module, slot: int) -> None:
    """Point ``layer``'s attention at KV-cache slot ``slot``: Hugging Face attention caches keys/values under
    its ``layer_idx``, so every application of a looped layer needs its own."""
    for module in layer.modules():
        if hasattr(module, "layer_idx"):
            module.layer_idx = slot


class LayerApplication:
    """One application of a stored layer in the running plan: calling it runs that layer at the KV-cache slot of
    its position in the stack (with the deltas of its ``application``-th use, if relaxed: :mod:`loopreg.relaxed`),
    between the plan's hooks (:meth:`~loopreg.looping.LoopPlan.apply`). Attribute reads go to the layer."""

    def __init__(self, owner: LoopedLayers, key: str, slot: int, application: int = 0) -> None:
        self._owner, self._key, self.slot, self.application = owner, key, slot, application

    @property
    def layer(self) -> nn.Module:
        # Looked up at every call: FSDP may have replaced the stored module by its wrapper.
        return self._owner._modules[self._key]

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        layer, plan, owner = self.layer, self._owner.plan, self._owner
        set_cache_slot(layer, self.slot)
        call = applied(layer, self.application)
        if plan is None or plan.plain:
            return call(*args, **kwargs)
        if plan.looping is not None:  # the layer writes through the plan's cache wrapper
            args, kwargs = _with_cache(layer, args, kwargs, plan.cache)
        tail: list[Any] = []

        def run(hidden: torch.Tensor) -> torch.Tensor:
            output = call(hidden, *args[1:], **kwargs) if args else call(**{**kwargs, "hidden_states": hidden})
            # Decoder layers return the hidden state, or a tuple that starts with it (GPT-2, NeoX, 4.x Llama).
            owner.tuple_output = isinstance(output, tuple)
            tail[:] = output[1:] if owner.tuple_output else ()
            return output[0] if owner.tuple_output else output

        hidden = plan.apply(self.slot, args[0] if args else kwargs["hidden_states"], run)
        return (hidden, *tail) if owner.tuple_output else hidden

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_"):  # private names (and unpickling, before __init__ ran) never forward
            raise AttributeError(name)
        return getattr(self.layer, name)

    def __repr__(self) -> str:
        return f"LayerApplication(slot={self.slot}, layer={self._key})"


def _with_cache(layer: nn.Module, args: tuple, kwargs: dict, wrap: Callable[[Any], Any]) -> tuple[tuple, dict]:
    """The decoder layer's arguments with its KV cache (by keyword or position) wrapped."""
    name, index = cache_parameter(type(layer))
    if name not in kwargs and index < len(args):
        return (*args[:index], wrap(args[index]), *args[index + 1:]), kwargs
    return args, {**kwargs, name: wrap(kwargs.get(name))}


class LoopedLayers(nn.ModuleList):
    """The layer list of a looped Hugging Face model: it *stores* its layers (module tree, ``state_dict``, FSDP
    units, parameter count: the spec's distinct layers when tied, one per application when untied) and *reads* as
    the running forward's layer applications (iteration, ``len`` and indexing give one :class:`LayerApplication`
    each), which is all a decoder's forward uses.

    >>> layers = LoopedLayers([nn.Identity(), nn.Identity()], spec="1x1+1x3")
    >>> len(layers), len(list(layers.children())), layers[3]
    (4, 2, LayerApplication(slot=3, layer=1))
    """

    def __init__(self, layers: Sequence[nn.Module], spec: LoopSpec | str, tied: bool = True, update: str = "plain",
                 anchor: float = 0.0, layer_types: Sequence[str] | None = None) -> None:
        super().__init__()
        for index, layer in enumerate(layers):
            self.add_module(str(index), layer)
        self.spec, self.tied = LoopSpec.parse(spec), tied
        expected = self.spec.distinct_layers if tied else self.spec.effective_depth
        if expected != len(layers):
            raise UserError(f"loop spec '{self.spec}' ({'tied' if tied else 'untied'}) has {expected} stored layers, "
                            f"got {len(layers)} layers")
        check_update_rule(update, anchor)
        self.update, self.anchor = update, float(anchor)
        self.layer_types = None if layer_types is None else list(layer_types)  # per stored layer (Qwen2's kinds)
        self.plan: LoopPlan | None = None  # the plan of the forward under way (LoopedCausalLM.forward)
        self.tuple_output = True  # whether the stored layers return a tuple (learnt at each call)
        self._applications = self._read(LoopPlan(self.spec, tied))

    def _read(self, plan: LoopPlan) -> list[LayerApplication]:
        return [LayerApplication(self, str(step.layer), step.slot, step.application) for step in plan.steps]

    def applied_types(self, plan: LoopPlan) -> list[str] | None:
        """The attention kind of each of ``plan``'s applications (a config's ``layer_types``), if the family has
        kinds."""
        return None if self.layer_types is None else [self.layer_types[step.layer] for step in plan.steps]

    @contextlib.contextmanager
    def running(self, plan: LoopPlan, decoder: nn.Module) -> Iterator[None]:
        """Within the block the stack reads as ``plan``'s applications. The family's decoder (its base model) reads
        its depth from its config: ``layers[:config.num_hidden_layers]``, GPT-2's and GPT-NeoX's per-layer
        ``head_mask``, transformers 5's ``config.layer_types[i]`` (Qwen2). A call at another depth than the
        config's (a loop override) shows the decoder a copy of its config at the call's depth; the model's config
        object is never written."""
        saved = self.plan, self._applications, decoder.config
        self.plan, self._applications = plan, self._read(plan)
        config = saved[2]
        if len(plan.steps) != config.num_hidden_layers:
            view = copy.copy(config)
            view.num_hidden_layers = len(plan.steps)
            if getattr(config, "layer_types", None) is not None:
                view.layer_types = self.applied_types(plan)
            decoder.config = view
        try:
            yield
        finally:
            self.plan, self._applications = saved[:2]
            decoder.config = config

    def __iter__(self) -> Iterator[LayerApplication]:
        return iter(self._applications)

    def __len__(self) -> int:
        return len(self._applications)

    def __getitem__(self, index: int | slice) -> Any:
        return self._applications[index]

    def __repr__(self) -> str:
        return nn.Module.__repr__(self)  # the stored layers, not D application lines

    def extra_repr(self) -> str:
        update = f", update={self.update}, anchor={self.anchor}" if self.update != "plain" else ""
        return f"spec={self.spec}, tied={self.tied}{update}"


def decoder_layers_path(config: Any) -> str:
    """Where a model of ``config``'s family keeps its decoder layers, e.g. ``model.layers``."""
    if config.model_type not in DECODER_LAYERS:
        raise UserError(f"looped Hugging Face models support model types {', '.join(sorted(DECODER_LAYERS))}; "
                        f"got '{config.model_type}'")
    return DECODER_LAYERS[config.model_type]


class LoopedCausalLM:
    """Put in front of a looped Hugging Face model's own class (the class keeps its name, so ``save_pretrained``
    records the same architecture): ``forward`` and ``generate`` take ``loops=`` (a loop override, as
    :class:`~loopreg.model.LoopedLM` has it) and ``exit=``, ``kv_policy=``, ``exit_stats=`` (adaptive exit and
    the KV policy, :mod:`loopreg.adaptive`), and ``forward`` takes ``grad_loops=`` (truncated backprop through
    the thinking block). Both travel per call, e.g. in a Composer batch; without them the config's
    ``loopreg_loops`` (if set) or the spec's own loop counts run.

    Built from a config (``from_pretrained``, ``from_config``), a tied retrofit gets the stored layers only (the
    spec's distinct layers, under the checkpoint's names); an untied one one layer per application. Either way the
    layer list is a :class:`LoopedLayers`.

    >>> # retrofit.generate(input_ids, max_new_tokens=8, loops=3)
    """

    def __init__(self, config: Any, *args: Any, **kwargs: Any) -> None:
        spec_text = getattr(config, SPEC_KEY, None)
        if spec_text is None:  # a plain checkpoint: the base model as it is
            super().__init__(config, *args, **kwargs)
            return
        spec, tied = LoopSpec.parse(spec_text), getattr(config, TIED_KEY, True)
        stored = spec.distinct_layers if tied else spec.effective_depth
        depth, layer_types = config.num_hidden_layers, getattr(config, "layer_types", None)
        if layer_types is not None:  # the saved kinds are per application of the plan the folder was saved at
            plans = LoopPlan(spec, tied, getattr(config, LOOPS_KEY, None)), LoopPlan(spec, tied)
            saved_at = next((plan for plan in plans if len(plan.steps) == len(layer_types)), None)
            if saved_at is None:
                raise UserError(f"config: layer_types has {len(layer_types)} entries, but loop spec '{spec}' runs "
                                f"{len(plans[0].steps)} layer applications")
            kinds = {step.layer: layer_types[step.slot] for step in reversed(saved_at.steps)}  # first application's
            layer_types = [kinds[index] for index in range(stored)]
        config.num_hidden_layers = stored  # what the checkpoint stores (GPT-2 maps it to n_layer)
        saved_types = getattr(config, "layer_types", None)
        if layer_types is not None:
            config.layer_types = layer_types
        try:
            super().__init__(config, *args, **kwargs)
        finally:
            config.num_hidden_layers = depth
            if layer_types is not None:
                config.layer_types = saved_types
        path = decoder_layers_path(config)
        layers = list(self.get_submodule(path))
        for slot, layer in enumerate(layers):
            set_cache_slot(layer, slot)
        update, anchor = getattr(config, UPDATE_KEY, "plain"), getattr(config, ANCHOR_KEY, 0.0)
        looped = LoopedLayers(layers, spec, tied, update, anchor, layer_types)
        self.set_submodule(path, looped)
        relax = getattr(config, RELAX_KEY, None)
        if relax is not None:  # zero deltas of the saved shapes; from_pretrained loads them
            relax_stack(layers, spec, tied, relax)
        # the applications at the config's loop count (a loop count the model cannot run fails here): what the
        # family sizes its caches by, also after from_pretrained(..., loopreg_loops=L) set it
        plan = LoopPlan(spec, tied, getattr(config, LOOPS_KEY, None))
        config.num_hidden_layers = len(plan.steps)
        if layer_types is not None:
            config.layer_types = looped.applied_types(plan)

    @classmethod
    def is_custom_code(cls) -> bool:
        # transformers 5 skips a family's checkpoint conversions (GPT-NeoX's `embed_out` -> `lm_head`) for custom
        # code; the looped class runs the family's own modules on its checkpoints, so they apply to it too
        return False

    @property
    def loop_spec(self) -> LoopSpec | None:
        """The loop spec this model runs; ``None`` for a plain checkpoint (the protocol it shares with LoopedLM)."""
        layers = self.get_submodule(decoder_layers_path(self.config))
        return layers.spec if isinstance(layers, LoopedLayers) else None

    @property
    def tied(self) -> bool:
        layers = self.get_submodule(decoder_layers_path(self.config))
        return isinstance(layers, LoopedLayers) and layers.tied

    def forward(self, *args: Any, loops: int | Sequence[int] | torch.Tensor | None = None,
                grad_loops: int | torch.Tensor | None = None, exit: ExitRule | str | None = None,
                kv_policy: str = "per_application", exit_stats: ExitStats | None = None, **kwargs: Any) -> Any:
        layers = self.get_submodule(decoder_layers_path(self.config))
        if not isinstance(layers, LoopedLayers):  # a plain checkpoint: loop options do not apply
            LoopPlan(LoopSpec.parse(f"{self.config.num_hidden_layers}x1"), False, loops, grad_loops, exit=exit,
                     kv_policy=kv_policy)
            return super().forward(*args, **kwargs)
        mask = kwargs.get("attention_mask", args[1] if len(args) > 1 else None)
        norm, head = self.get_submodule(FINAL_NORM[self.config.model_type]), self.get_output_embeddings()
        plan = LoopPlan(layers.spec, layers.tied, getattr(self.config, LOOPS_KEY, None) if loops is None else loops,
                        grad_loops, layers.update, layers.anchor, exit=exit, kv_policy=kv_policy,
                        decode=lambda h: head(norm(h)), scratch=lazy_cache,
                        real=mask if isinstance(mask, torch.Tensor) and mask.dim() == 2 else None,
                        exit_stats=exit_stats)
        use_cache = kwargs.get("use_cache")
        if (self.config.use_cache if use_cache is None else use_cache) and cache_of(kwargs) is None \
                and len(args) <= 2:  # (a cache given positionally stays)
            kwargs[CACHE_KEY] = lazy_cache()  # the family would size one by the config, which a loop override outgrows
        decoder = self.get_submodule(decoder_layers_path(self.config).rpartition(".")[0])  # the family's base model
        with layers.running(plan, decoder):
            return super().forward(*args, **kwargs)

    def generate(self, *args: Any, **kwargs: Any) -> Any:
        """transformers' ``generate``; ``loops=``, ``exit=``, ``kv_policy=`` and ``exit_stats=`` reach every forward.
        A preallocated cache (``cache_implementation``) is laid out by the config: it runs at the config's loop count
        (load the model at ``loops=L`` for another)."""
        if kwargs.get("cache_implementation") or self.generation_config.cache_implementation:
            layers = self.get_submodule(decoder_layers_path(self.config))
            loops = kwargs.get("loops")
            depth = len(LoopPlan(layers.spec, layers.tied, loops).steps) if loops is not None else None
            if depth not in (None, self.config.num_hidden_layers):
                raise UserError(f"loops={loops!r} runs {depth} layer applications; a preallocated cache is laid out "
                                f"for the config's {self.config.num_hidden_layers}: load the model at that loop count "
                                f"(loopreg.load(..., loops={loops!r})) to use one")
        elif kwargs.get("use_cache", True) and cache_of(kwargs) is None:
            # a loop override outgrows a cache sized by the config
            kwargs[CACHE_KEY] = generation_cache(args, kwargs, self.generation_config)
        return super().generate(*args, **kwargs)

    def save_pretrained(self, save_directory: Any, **kwargs: Any) -> None:
        """transformers' ``save_pretrained``; a looped model's folder also gets this runtime as remote code and the
        ``auto_map`` naming its class, so plain transformers loads it looped: tied with its stored layers only, untied
        (its weights those of a plain model) refusing a loop override as loopreg does."""
        super().save_pretrained(save_directory, **kwargs)
        if isinstance(self.get_submodule(decoder_layers_path(self.config)), LoopedLayers):
            attach_remote_code(save_directory, __file__, {"AutoModelForCausalLM": f"looped_hf.{type(self).__name__}"})


_LOOPED_BY_BASE: dict[type, type] = {}


def looped_class(base: type) -> type:
    """The subclass of ``base`` with :class:`LoopedCausalLM` in front (the same one on every call), also found by
    name as this module's attribute (``looped_hf.LlamaForCausalLM``), so looped models pickle and a folder's
    ``auto_map`` names it."""
    if issubclass(base, LoopedCausalLM):
        return base
    if base not in _LOOPED_BY_BASE:
        from transformers import GenerationMixin

        # GenerationMixin among the direct bases: transformers' remote-code loader would otherwise put a copy of the
        # class in front of it (add_generation_mixin_to_remote_model), one that pickle no longer finds by name.
        _LOOPED_BY_BASE[base] = type(base.__name__, (LoopedCausalLM, base, GenerationMixin), {
            "__module__": __name__, "__qualname__": base.__name__, "__doc__": base.__doc__,
            "forward": _forward_with_signature(base)})
    return _LOOPED_BY_BASE[base]


def __getattr__(name: str) -> type:
    """``looped_hf.LlamaForCausalLM`` (any transformers model class): its :func:`looped_class`."""
    import transformers

    base = None if name.startswith("_") else getattr(transformers, name, None)
    if not (isinstance(base, type) and issubclass(base, transformers.PreTrainedModel)):
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return looped_class(base)


def _forward_with_signature(base: type) -> Callable:
    """:meth:`LoopedCausalLM.forward` showing ``base.forward``'s parameters plus the loop options: Composer's
    ``HuggingFaceModel`` and transformers' ``generate`` pass the keys that the forward's signature names."""
    def forward(self: Any, *args: Any, **kwargs: Any) -> Any:
        return LoopedCausalLM.forward(self, *args, **kwargs)

    parameters = list(inspect.signature(base.forward).parameters.values())
    variadic = [p for p in parameters if p.kind is inspect.Parameter.VAR_KEYWORD]
    extra = [inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=default) for name, default in
             (("loops", None), ("grad_loops", None), ("exit", None), ("kv_policy", "per_application"),
              ("exit_stats", None))]
    forward.__signature__ = inspect.Signature([p for p in parameters if p not in variadic] + extra + variadic)
    forward.__doc__ = base.forward.__doc__
    return forward
