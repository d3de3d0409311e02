"""The runtime of tied looped Hugging Face models (loop surgery's retrofits): the layer list that stores each
distinct layer once and runs it at every application, and the looped variant of the model's own class.

Surgery (:mod:`loopreg.surgery.core`) builds these in place. A saved retrofit folder carries this module and its
relative imports as remote code (:mod:`loopreg.remote_code`), its ``auto_map`` naming ``looped_hf.<Class>``, so
plain transformers rebuilds it tied from the config alone, with no loopreg installed:

    >>> # AutoModelForCausalLM.from_pretrained("runs/smollm2_middle", trust_remote_code=True).generate(ids, loops=3)

This module is copied into model folders: it imports torch, transformers, the standard library and its
siblings (relatively) only; ``tests/test_remote_code_retrofit.py`` loads such folders with loopreg unimportable.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
from typing import Any, Callable, Iterator, Sequence

import torch
from torch import nn

from .adaptive import ExitRule, ExitStats, LoopExit, check_exit, exit_options, generating_with
from .model import batch_option  # relative: copied into model folders as remote code (loopreg.remote_code)
from .spec import LoopSpec
from .update_rules import check_update_rule, iteration_hooks

__all__ = ["SPEC_KEY", "TIED_KEY", "UPDATE_KEY", "ANCHOR_KEY", "LOOPS_KEY", "RETROFIT_KEYS", "DECODER_LAYERS",
           "decoder_layers_path", "set_cache_slot", "LayerApplication", "LoopedLayers", "LoopedCausalLM",
           "looped_class"]

# What a retrofit's config records: its loop spec, whether it is tied, the update rule (and its anchor), and the
# loop count a call that gives none runs (None: the spec's own).
SPEC_KEY, TIED_KEY = "loopreg_spec", "loopreg_tied"
UPDATE_KEY, ANCHOR_KEY = "loopreg_update", "loopreg_anchor"
LOOPS_KEY = "loopreg_loops"
RETROFIT_KEYS = (SPEC_KEY, TIED_KEY, UPDATE_KEY, ANCHOR_KEY, LOOPS_KEY)

# model_type -> where the model keeps its decoder layers (loopreg.surgery.adapters reads its paths from here).
DECODER_LAYERS = {"gpt2": "transformer.h", "gpt_neox": "gpt_neox.layers", "llama": "model.layers",
                  "mistral": "model.layers", "qwen2": "model.layers"}
# model_type -> its final norm, before the LM head: with it, adaptive exit's `kl` criterion decodes a hidden state
FINAL_NORM = {"gpt2": "transformer.ln_f", "gpt_neox": "gpt_neox.final_layer_norm", "llama": "model.norm",
              "mistral": "model.norm", "qwen2": "model.norm"}


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
    ``no_grad`` runs the layer without an autograd graph. ``looping`` is a forward's adaptive exit and KV policy
    (:mod:`loopreg.adaptive`): the layer writes through its cache wrapper, and is skipped once every token exited.
    """

    def __init__(self, owner: LoopedLayers, key: str, slot: int, enter: Sequence[Callable] = (),
                 leave: Sequence[Callable] = (), no_grad: bool = False, looping: LoopExit | None = None) -> None:
        self._owner, self._key, self.slot = owner, key, slot
        self._enter, self._leave, self._no_grad = tuple(enter), tuple(leave), no_grad
        self._looping = looping

    def exiting(self, looping: LoopExit) -> LayerApplication:
        """This application under ``looping``, with its hooks at the thinking iterations' first and last layers."""
        exits = looping.rule is not None
        enter = (functools.partial(looping.enter, self.slot),) if exits and self.slot in looping.starts else ()
        leave = (functools.partial(looping.leave, self.slot),) if exits and self.slot in looping.loop_ends else ()
        return LayerApplication(self._owner, self._key, self.slot, self._enter + enter, self._leave + leave,
                                self._no_grad, looping)

    @property
    def layer(self) -> nn.Module:
        # Looked up at every call: FSDP may have replaced the stored module by its wrapper.
        return self._owner._modules[self._key]

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        layer = self.layer
        set_cache_slot(layer, self.slot)
        if self._looping is not None:
            args, kwargs = _with_cache(layer, args, kwargs, self._looping.bind)
            if self._looping.skips(self.slot):  # every token exited: the stand-ins fill the slot, the layer rests
                self._looping.cache.fill(self.slot)
                hidden = args[0] if args else kwargs["hidden_states"]
                return (hidden,) if self._owner.tuple_output else hidden
        if not (self._enter or self._leave or self._no_grad):
            return layer(*args, **kwargs)  # plain looping: nothing between the layers
        hidden = args[0] if args else kwargs["hidden_states"]
        for hook in self._enter:
            hook(hidden)
        with torch.no_grad() if self._no_grad else contextlib.nullcontext():
            output = layer(*args, **kwargs)
        # Decoder layers return the hidden state, or a tuple that starts with it (GPT-2, NeoX, 4.53 Llama).
        self._owner.tuple_output = isinstance(output, tuple)
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


@functools.cache
def _cache_argument(layer_type: type) -> int:
    """Where a decoder layer's forward takes its cache among the positional arguments (GPT-2 passes it so)."""
    return list(inspect.signature(layer_type.forward).parameters).index("past_key_value") - 1


def _with_cache(layer: nn.Module, args: tuple, kwargs: dict, wrap: Callable[[Any], Any]) -> tuple[tuple, dict]:
    """The decoder layer's arguments with its cache (``past_key_value``, by keyword or position) wrapped."""
    if "past_key_value" not in kwargs:
        index = _cache_argument(type(layer))
        if index < len(args):
            return (*args[:index], wrap(args[index]), *args[index + 1:]), kwargs
    return args, {**kwargs, "past_key_value": wrap(kwargs.get("past_key_value"))}


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
        self.running_spec = self.spec  # the spec at the loop count of the call under way
        self._loops_chosen = False  # True while a call's loops= (or the config's loop count) runs
        self.tuple_output = True  # whether the stored layers return a tuple (learnt at each call)

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
        """Within the block the stack runs ``loops`` (see :meth:`LoopSpec.with_loops`; ``None``: the config's
        ``loopreg_loops``, if set) and, while autograd records, builds the graph of only the last ``grad_loops``
        thinking iterations; ``config`` (the HF config, whose ``num_hidden_layers`` bounds the decoder's loop and
        sizes its caches) follows. A call nested in one that chose its loops (a forward inside
        ``generate(loops=...)``) keeps them."""
        if loops is None and not self._loops_chosen:
            loops = getattr(config, LOOPS_KEY, None)
        if loops is None and (grad_loops is None or not torch.is_grad_enabled()):
            yield
            return
        spec = self.spec.with_loops(loops) if loops is not None else self.spec
        saved = (self.applications, self._loops_chosen, self.running_spec, config.num_hidden_layers,
                 getattr(config, "layer_types", None))
        self.applications = self._applications(spec, grad_loops if torch.is_grad_enabled() else None)
        self._loops_chosen, self.running_spec = self._loops_chosen or loops is not None, spec
        config.num_hidden_layers = spec.effective_depth
        if saved[-1] is not None:  # per-application attention kinds (Qwen2 sliding windows), for static caches
            config.layer_types = [application.attention_type for application in self.applications]
        try:
            yield
        finally:
            self.applications, self._loops_chosen, self.running_spec, config.num_hidden_layers = saved[:4]
            if saved[-1] is not None:
                config.layer_types = saved[-1]

    @contextlib.contextmanager
    def exiting(self, looping: LoopExit) -> Iterator[None]:
        """Within the block the stack runs under ``looping`` (a :class:`~loopreg.adaptive.LoopExit` built for
        :attr:`running_spec`): adaptive exit from the thinking block and the KV policy."""
        saved = self.applications
        self.applications = [application.exiting(looping) for application in saved]
        try:
            yield
        finally:
            self.applications = saved

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


def decoder_layers_path(config: Any) -> str:
    """Where a model of ``config``'s family keeps its decoder layers, e.g. ``model.layers``."""
    if config.model_type not in DECODER_LAYERS:
        raise ValueError(f"looped Hugging Face models support model types {', '.join(sorted(DECODER_LAYERS))}; "
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
    spec's distinct layers, under the checkpoint's names) in a :class:`LoopedLayers`; a plain or untied config
    (one layer per application) builds the base model as it is.

    >>> # retrofit.generate(input_ids, max_new_tokens=8, loops=3)
    """

    def __init__(self, config: Any, *args: Any, **kwargs: Any) -> None:
        spec_text = getattr(config, SPEC_KEY, None)
        if spec_text is None or not getattr(config, TIED_KEY, True):
            super().__init__(config, *args, **kwargs)
            return
        spec = LoopSpec.parse(spec_text)
        depth, layer_types = config.num_hidden_layers, getattr(config, "layer_types", None)
        config.num_hidden_layers = spec.distinct_layers  # what the checkpoint stores (GPT-2 maps it to n_layer)
        if layer_types is not None:  # a stored layer's attention kind is that of its first application
            config.layer_types = [layer_types[group[0]] for group in spec.tie_groups]
        try:
            super().__init__(config, *args, **kwargs)
        finally:
            config.num_hidden_layers = depth
            if layer_types is not None:
                config.layer_types = layer_types
        path = decoder_layers_path(config)
        stored = list(self.get_submodule(path))
        self.set_submodule(path, LoopedLayers(stored, spec, getattr(config, UPDATE_KEY, "plain"),
                                              getattr(config, ANCHOR_KEY, 0.0)))

    def forward(self, *args: Any, loops: int | Sequence[int] | None = None, grad_loops: int | None = None,
                exit: ExitRule | str | None = None, kv_policy: str = "per_application",
                exit_stats: ExitStats | None = None, **kwargs: Any) -> Any:
        rule, kv_policy, exit_stats = exit_options(self, exit, kv_policy, exit_stats)
        with self._running(loops, grad_loops):
            if rule is None and kv_policy == "per_application":
                return super().forward(*args, **kwargs)
            mask = kwargs.get("attention_mask", args[1] if len(args) > 1 else None)
            with self._exiting(rule, kv_policy, exit_stats, mask):
                return super().forward(*args, **kwargs)

    def generate(self, *args: Any, loops: int | Sequence[int] | None = None, exit: ExitRule | str | None = None,
                 kv_policy: str = "per_application", exit_stats: ExitStats | None = None, **kwargs: Any) -> Any:
        rule, kv_policy, exit_stats = exit_options(self, exit, kv_policy, exit_stats)
        with self._running(loops, None), generating_with(self, rule, kv_policy, exit_stats):
            return super().generate(*args, **kwargs)

    def _exiting(self, rule: ExitRule | None, kv_policy: str, stats: ExitStats | None,
                 mask: torch.Tensor | None) -> contextlib.AbstractContextManager:
        """One forward's adaptive exit and KV policy (a fresh :class:`~loopreg.adaptive.LoopExit`)."""
        from transformers import DynamicCache

        layers = self.get_submodule(decoder_layers_path(self.config))
        spec = getattr(self.config, SPEC_KEY, None)
        if not isinstance(layers, LoopedLayers):
            what = f"exit={rule}" if rule is not None else f"kv_policy={kv_policy!r}"
            raise ValueError(f"{what} needs a tied looped model; this one is untied ('{spec}'): snap it first")
        check_exit(layers.spec, True, rule, kv_policy)
        if rule is not None and layers.update != "plain":
            raise ValueError(f"exit={rule} needs plain looping; this model has update={layers.update!r}")
        norm, head = self.get_submodule(FINAL_NORM[self.config.model_type]), self.get_output_embeddings()
        looping = LoopExit(layers.running_spec, rule, kv_policy, decode=lambda h: head(norm(h)), scratch=DynamicCache,
                           real=mask if mask is not None and mask.dim() == 2 else None, stats=stats)
        return layers.exiting(looping)

    def _running(self, loops: int | Sequence[int] | torch.Tensor | None,
                 grad_loops: int | torch.Tensor | None) -> contextlib.AbstractContextManager:
        loops, grad_loops = batch_option(loops), batch_option(grad_loops)  # as RandomLoops puts them in a batch
        layers = self.get_submodule(decoder_layers_path(self.config))
        if isinstance(layers, LoopedLayers):
            return layers.running(self.config, loops, grad_loops)
        config_loops = getattr(self.config, LOOPS_KEY, None)
        if loops is not None or grad_loops is not None or config_loops is not None:
            raise ValueError(f"loop override loops={loops if loops is not None else config_loops!r}, "
                             f"grad_loops={grad_loops!r} needs a tied looped model; this one is untied "
                             f"('{getattr(self.config, SPEC_KEY, None)}'): snap it first")
        return contextlib.nullcontext()


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
    """:meth:`LoopedCausalLM.forward` showing ``base.forward``'s parameters plus ``loops``/``grad_loops`` (and the
    exit keywords):
    Composer's ``HuggingFaceModel`` passes the batch keys that the forward's signature names."""
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
