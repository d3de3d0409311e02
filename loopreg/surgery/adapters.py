"""Where each supported causal-LM family keeps its parts, so surgery, export and the cosine regularizer
address layers and weight matrices by *role* instead of by family-specific names.

    >>> from transformers import GPT2Config, GPT2LMHeadModel
    >>> model = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=4, vocab_size=64))
    >>> adapter = find_adapter(model)
    >>> adapter.family, sorted(layer_role_params(get_layers(model, adapter)[0], adapter))
    ('gpt2', ['attn_o', 'attn_qkv', 'mlp_down', 'mlp_up'])

Roles are whole parameters (never slices), so grouping by role also works on FSDP shards.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from loopreg.errors import UserError
from loopreg.looped_hf import DECODER_LAYERS

__all__ = ["Adapter", "ADAPTERS", "unwrap", "find_adapter", "model_family", "get_layers", "layer_role_params"]


@dataclass(frozen=True)
class Adapter:
    """Where one model family keeps its embeddings, decoder layers, final norm and head, and the parameter
    name of each weight-matrix role inside one decoder layer.

    >>> ADAPTERS["llama"].roles["attn_q"]
    'self_attn.q_proj.weight'
    """

    family: str
    model_types: tuple[str, ...]
    layers: str
    embeddings: tuple[str, ...]
    final_norm: str
    head: str
    roles: dict[str, str]
    norm_roles: dict[str, str]


_LLAMA_STYLE = dict(
    embeddings=("model.embed_tokens",),
    final_norm="model.norm",
    head="lm_head",
    roles={
        "attn_q": "self_attn.q_proj.weight",
        "attn_k": "self_attn.k_proj.weight",
        "attn_v": "self_attn.v_proj.weight",
        "attn_o": "self_attn.o_proj.weight",
        "mlp_up": "mlp.up_proj.weight",
        "mlp_gate": "mlp.gate_proj.weight",
        "mlp_down": "mlp.down_proj.weight",
    },
    norm_roles={"norm_attn": "input_layernorm.weight", "norm_mlp": "post_attention_layernorm.weight"},
)
# Norm roles by where the norm sits: before attention / the MLP (norm_attn, norm_mlp), on their outputs before the
# residual add (norm_attn_out, norm_mlp_out: OLMo 2's and Gemma 3's post-norms), on queries and keys (norm_q, norm_k).
_QK_NORMS = {"norm_q": "self_attn.q_norm.weight", "norm_k": "self_attn.k_norm.weight"}
_POST_NORMS = {"norm_attn_out": "post_attention_layernorm.weight", "norm_mlp_out": "post_feedforward_layernorm.weight"}

ADAPTERS: dict[str, Adapter] = {
    "gpt2": Adapter(
        family="gpt2",
        model_types=("gpt2",),
        layers=DECODER_LAYERS["gpt2"],
        embeddings=("transformer.wte", "transformer.wpe"),
        final_norm="transformer.ln_f",
        head="lm_head",
        roles={
            "attn_qkv": "attn.c_attn.weight",
            "attn_o": "attn.c_proj.weight",
            "mlp_up": "mlp.c_fc.weight",
            "mlp_down": "mlp.c_proj.weight",
        },
        norm_roles={"norm_attn": "ln_1.weight", "norm_mlp": "ln_2.weight"},
    ),
    "gpt_neox": Adapter(
        family="gpt_neox",
        model_types=("gpt_neox",),
        layers=DECODER_LAYERS["gpt_neox"],
        embeddings=("gpt_neox.embed_in",),
        final_norm="gpt_neox.final_layer_norm",
        head="embed_out",
        roles={
            "attn_qkv": "attention.query_key_value.weight",
            "attn_o": "attention.dense.weight",
            "mlp_up": "mlp.dense_h_to_4h.weight",
            "mlp_down": "mlp.dense_4h_to_h.weight",
        },
        norm_roles={"norm_attn": "input_layernorm.weight", "norm_mlp": "post_attention_layernorm.weight"},
    ),
    "llama": Adapter(family="llama", model_types=("llama",), layers=DECODER_LAYERS["llama"], **_LLAMA_STYLE),
    "loopreg": Adapter(
        family="loopreg",
        model_types=("loopreg",),
        layers="layers",
        embeddings=("embed",),
        final_norm="norm",
        head="lm_head",
        roles={
            "attn_q": "attn.q_proj.weight",
            "attn_k": "attn.k_proj.weight",
            "attn_v": "attn.v_proj.weight",
            "attn_o": "attn.o_proj.weight",
            "mlp_up": "mlp.up_proj.weight",
            "mlp_gate": "mlp.gate_proj.weight",  # absent in GELU models; layer_role_params skips it
            "mlp_down": "mlp.down_proj.weight",
        },
        norm_roles={"norm_attn": "attn_norm.weight", "norm_mlp": "mlp_norm.weight"},
    ),
    "mistral": Adapter(family="mistral", model_types=("mistral",), layers=DECODER_LAYERS["mistral"], **_LLAMA_STYLE),
    "qwen2": Adapter(family="qwen2", model_types=("qwen2",), layers=DECODER_LAYERS["qwen2"], **_LLAMA_STYLE),
    "qwen3": Adapter(family="qwen3", model_types=("qwen3",), layers=DECODER_LAYERS["qwen3"],
                     **{**_LLAMA_STYLE, "norm_roles": {**_LLAMA_STYLE["norm_roles"], **_QK_NORMS}}),
    "olmo2": Adapter(family="olmo2", model_types=("olmo2",), layers=DECODER_LAYERS["olmo2"],
                     **{**_LLAMA_STYLE, "norm_roles": {**_POST_NORMS, **_QK_NORMS}}),
    # Gemma3ForCausalLM (the text-only Gemma 3, config Gemma3TextConfig); the multimodal model_type 'gemma3' keeps
    # its layers elsewhere and is not a family here
    "gemma3": Adapter(family="gemma3", model_types=("gemma3_text",), layers=DECODER_LAYERS["gemma3_text"],
                      **{**_LLAMA_STYLE, "norm_roles": {"norm_attn": "input_layernorm.weight",
                                                        "norm_mlp": "pre_feedforward_layernorm.weight",
                                                        **_POST_NORMS, **_QK_NORMS}}),
}


def unwrap(model: nn.Module) -> nn.Module:
    """The bare causal LM inside Composer wrappers (``ComposerLoopedLM`` / ``HuggingFaceModel`` keep it in
    ``.model``) and DDP/FSDP wrappers (``.module``).

    >>> unwrap(nn.Linear(2, 2)).__class__.__name__
    'Linear'
    """
    from composer.models import ComposerModel  # deferred: composer is slow to import and adapters is imported widely

    while True:
        if isinstance(model, ComposerModel) and isinstance(getattr(model, "model", None), nn.Module):
            model = model.model
        elif isinstance(getattr(model, "module", None), nn.Module):
            model = model.module
        else:
            return model


def find_adapter(model: nn.Module) -> Adapter:
    """The :class:`Adapter` for ``model`` (wrappers are stripped); an unsupported model raises a one-line
    :class:`~loopreg.errors.UserError` listing the supported families.

    >>> # find_adapter(AutoModelForCausalLM.from_pretrained("HuggingFaceTB/SmolLM2-135M")).family == "llama"
    """
    found = model_family(model)
    if found is not None:
        return ADAPTERS[found]
    model = unwrap(model)
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    raise UserError(f"unsupported architecture '{model_type}' ({type(model).__name__}); "
                     f"supported families: {', '.join(sorted(ADAPTERS))}")


def model_family(model: nn.Module) -> str | None:
    """The adapter family of ``model`` (by its config's ``model_type``; ``"loopreg"`` for a LoopedLM), ``None`` for an
    unsupported one.

    >>> model_family(nn.Linear(2, 2)) is None
    True
    """
    model_type = getattr(getattr(unwrap(model), "config", None), "model_type", None)
    return next((adapter.family for adapter in ADAPTERS.values() if model_type in adapter.model_types), None)


def get_layers(model: nn.Module, adapter: Adapter | None = None) -> nn.ModuleList:
    """The ``nn.ModuleList`` of decoder layers of ``model`` (wrappers are stripped).

    >>> # get_layers(hf_llama)[0].self_attn.q_proj
    """
    model = unwrap(model)
    return model.get_submodule((adapter or find_adapter(model)).layers)


def layer_role_params(layer: nn.Module, adapter: Adapter, include_norms: bool = False) -> dict[str, nn.Parameter]:
    """Role → parameter of one decoder layer, e.g. ``{"attn_q": <q_proj.weight>, ...}``; roles the layer
    does not have (the gate of a GELU MLP) are left out. Norm weights come too with ``include_norms``.

    >>> # layer_role_params(get_layers(model)[3], find_adapter(model))["mlp_down"].shape
    """
    names = {**adapter.roles, **(adapter.norm_roles if include_norms else {})}
    params = {}
    for role, name in names.items():
        try:
            params[role] = layer.get_parameter(name)
        except AttributeError:
            continue
    return params
