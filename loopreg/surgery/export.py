"""Export any looped model as a *standard* Hugging Face checkpoint with its loops unrolled: every layer
application becomes its own layer (looped weights duplicated), so plain ``transformers`` — and
lm-eval-harness, vLLM and friends — load it with no custom code and get identical logits.

    loopreg export runs/smollm2_middle --unroll --out runs/smollm2_middle_unrolled

* a Hugging Face looped model unrolls into its own class with D layers;
* a SwiGLU :class:`~loopreg.model.LoopedLM` becomes a ``LlamaForCausalLM`` (same names, RMSNorm, RoPE,
  grouped-query attention); a GELU one has no standard equivalent and is refused.
"""

from __future__ import annotations

import argparse
import copy
from pathlib import Path
from typing import Any

import torch
from torch import nn

from loopreg.errors import UserError, writing
from loopreg.folders import write_model_folder
from loopreg.looped_hf import RETROFIT_KEYS
from loopreg.looping import LoopPlan, Step
from loopreg.relaxed import application_state
from loopreg.surgery.adapters import ADAPTERS, find_adapter, model_family, unwrap
from loopreg.surgery.core import is_tied, looped_spec, stored_layers

__all__ = ["export_unrolled", "unrolled_model", "cli_main"]


def export_unrolled(model: nn.Module, out_dir: str | Path, tokenizer: Any | None = None) -> Path:
    """Write ``model`` unrolled to ``out_dir`` (with ``tokenizer`` when given) as a standard Hugging Face
    checkpoint; the folder appears whole or not at all (see :func:`~loopreg.folders.write_model_folder`).

    >>> # export_unrolled(load("runs/smollm2_middle"), "runs/smollm2_middle_unrolled")
    """
    return write_model_folder(unrolled_model(model), out_dir, tokenizer)


def unrolled_model(model: nn.Module) -> nn.Module:
    """A standard Hugging Face causal LM with one layer per application of ``model`` (a new model; the
    argument is left as it is).

    >>> # unrolled_model(looped).config.num_hidden_layers == looped_spec.effective_depth
    """
    from transformers import AutoModelForCausalLM
    from transformers.modeling_utils import no_init_weights

    model = unwrap(model)
    loopreg = model_family(model) == "loopreg"  # a LoopedLM unrolls into a Llama
    config, state = _llama_config_and_state(model) if loopreg else _hf_config_and_state(model)
    dtype = next(model.parameters()).dtype
    with no_init_weights():  # every weight is loaded below
        unrolled = AutoModelForCausalLM.from_config(config, torch_dtype=dtype)
    unrolled.load_state_dict(state, strict=True)
    return unrolled.eval()


def _unrolled_layer_state(model: nn.Module, prefix: str,
                          rename: dict[str, str] | None = None) -> dict[str, torch.Tensor]:
    """``{prefix}.{slot}.{name}`` for every layer application of ``model`` at its spec's loop counts (shared tensors
    repeat; a relaxed layer's deltas merged into each application's weights); ``rename`` maps names inside a layer
    to the target family's."""
    stored = stored_layers(model)
    spec = looped_spec(model)
    steps = LoopPlan(spec, is_tied(model)).steps if spec is not None else [Step(i, i) for i in range(len(stored))]
    return {f"{prefix}.{slot}.{rename[name] if rename else name}": tensor
            for slot, step in enumerate(steps)
            for name, tensor in application_state(stored[step.layer], step.application).items()}


def _hf_config_and_state(model: nn.Module) -> tuple[Any, dict[str, torch.Tensor]]:
    adapter = find_adapter(model)
    config = copy.deepcopy(model.config)
    for key in (*RETROFIT_KEYS, "auto_map"):  # a plain checkpoint: no loops, no deltas, no remote code
        if hasattr(config, key):
            delattr(config, key)
    state = {name: tensor for name, tensor in model.state_dict().items() if not name.startswith(adapter.layers + ".")}
    # Iterating a looped layer list yields its applications in order; a plain list yields its layers.
    state.update(_unrolled_layer_state(model, adapter.layers))
    return config, state


def _llama_config_and_state(model: nn.Module) -> tuple[Any, dict[str, torch.Tensor]]:
    from transformers import LlamaConfig

    cfg = model.config
    if cfg.mlp != "swiglu":
        raise UserError(f"a LoopedLM with mlp={cfg.mlp!r} has no standard Hugging Face equivalent; only SwiGLU "
                         "LoopedLMs export as LlamaForCausalLM")
    if cfg.learned_positions or cfg.latent_feedback != "residual" or cfg.latent_mask:
        raise UserError("a LoopedLM with learned_positions, latent_feedback='soft_token' or latent_mask has no "
                         "Llama equivalent (Llama has rotary positions only and nothing between loops)")
    config = LlamaConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.d_model, intermediate_size=cfg.ffn_dim,
        num_hidden_layers=model.spec.effective_depth, num_attention_heads=cfg.n_heads,
        num_key_value_heads=cfg.kv_heads, head_dim=cfg.head_dim, hidden_act="silu",
        max_position_embeddings=cfg.max_seq_len, rms_norm_eps=cfg.norm_eps, rope_theta=cfg.rope_theta,
        tie_word_embeddings=cfg.tie_word_embeddings, attention_bias=False, mlp_bias=False,
        bos_token_id=None, eos_token_id=None,
    )
    source, target = ADAPTERS["loopreg"], ADAPTERS["llama"]
    # Names map role by role through the two adapters, so the tables live in one place.
    outer = dict(zip((*source.embeddings, source.final_norm, source.head),
                     (*target.embeddings, target.final_norm, target.head)))
    state = {}
    for name, tensor in model.state_dict().items():
        module, leaf = name.rsplit(".", 1)
        if not module.startswith(source.layers + "."):
            state[f"{outer[module]}.{leaf}"] = tensor
    target_names = {**target.roles, **target.norm_roles}
    inner = {name: target_names[role] for role, name in {**source.roles, **source.norm_roles}.items()}
    state.update(_unrolled_layer_state(model, target.layers, inner))
    return config, state


def cli_main(argv: list[str]) -> int:
    """``loopreg export CKPT --unroll --out DIR``: write a looped checkpoint as a standard unrolled one (a user
    error raises a one-line :class:`~loopreg.errors.UserError`)."""
    parser = argparse.ArgumentParser(prog="loopreg export", description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoint", help="looped model: Hugging Face folder written by surgery, or loopreg folder")
    parser.add_argument("--unroll", action="store_true", required=True,
                        help="duplicate looped layers into a standard checkpoint (the only export kind)")
    parser.add_argument("--out", required=True, help="output folder (replaced if it exists)")
    args = parser.parse_args(argv)
    _export(args.checkpoint, args.out)
    return 0


def _export(checkpoint: str, out_dir: str) -> None:
    from tokenizers import Tokenizer

    from loopreg.loading import load
    from loopreg.surgery.sources import load_source_tokenizer
    from loopreg.tables import print_table

    looped = load(checkpoint)
    unrolled = unrolled_model(looped)
    tokenizer = load_source_tokenizer(checkpoint)
    # Only a Hugging Face tokenizer is written next to the Hugging Face checkpoint (a loopreg folder's is not).
    tokenizer = None if isinstance(tokenizer, Tokenizer) else tokenizer
    with writing(out_dir):
        out = write_model_folder(unrolled, out_dir, tokenizer=tokenizer)
    print_table("export", [("checkpoint", checkpoint), ("spec", _spec_of(looped)),
                           ("written", f"{type(unrolled).__name__}, {unrolled.config.num_hidden_layers} layers"),
                           ("out", str(out))])


def _spec_of(model: nn.Module) -> str:
    spec = looped_spec(model)
    return str(spec) if spec is not None else f"{model.config.num_hidden_layers}x1 (not looped)"
