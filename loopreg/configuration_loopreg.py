"""The configuration of a :class:`~loopreg.model.LoopedLM`: the architecture (:class:`LoopedLMConfig`, a recipe's
``model:`` section) and its transformers face (:class:`LoopregConfig`, a folder's ``config.json``).

``LoopregConfig`` keeps the architecture under ``loopreg`` as the source of truth and derives from it the keys
transformers and tools read (``vocab_size``, ``num_hidden_layers``, ...). ``loops`` is the loop count a call that
gives none runs (``None``: the spec's own). Attributes it does not have itself are the architecture's
(``config.d_model``, ``config.loop_spec``).

    >>> config = LoopregConfig(loopreg={"spec": "1x1+2x3", "vocab_size": 64, "d_model": 32, "n_heads": 4}, loops=5)
    >>> config.num_hidden_layers, config.d_model  # layer applications at 5 loops: the cache's layers
    (11, 32)

Portable: copied into model folders as remote code (torch, transformers and its siblings only).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, Sequence

from transformers import PretrainedConfig

# Every sibling the remote code needs is imported here directly (an AutoConfig entry: transformers 4.53 copies only
# an entry module's direct relative imports).
from .adaptive import KV_POLICIES  # noqa: F401
from .errors import UserError
from .looping import check_loop_options
from .spec import LoopSpec
from .update_rules import check_update_rule

__all__ = ["LoopedLMConfig", "LoopregConfig", "hf_config_keys", "load_config", "CONFIG_NAME", "WEIGHTS_NAME",
           "HF_MODEL_TYPE"]

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
HF_MODEL_TYPE = "loopreg"


@dataclass
class LoopedLMConfig:
    """Everything needed to rebuild a :class:`~loopreg.model.LoopedLM` (a recipe's ``model:`` section).

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
    # the depth D that residual output projections are initialised for, std = init_std / sqrt(2D) (GPT-2's rule);
    # None: this model's effective depth. A table comparing depths can give every row one D, so that its rows
    # differ in depth only (recipes/lm_mini.yaml)
    init_depth: int | None = None
    # learned absolute positions added to the token embedding, besides RoPE (GPT-2 style); they make
    # fixed-offset lookups (CoT step j ↔ operand j+1) easy to learn on small synthetic tasks
    learned_positions: bool = False
    # Latent thoughts (CoT distillation, loopreg.latent): Thm 5.4's masked loops, the placeholder token,
    # placeholders per CoT step, and how a decoded step re-enters the next loop ('residual' or 'soft_token')
    latent_mask: bool = False
    placeholder_id: int | None = None
    placeholders_per_step: int = 1
    latent_feedback: str = "residual"
    # how a looped block iterates (loopreg.update_rules): 'plain' h <- g(h), or training-free 'damped'
    # sub-steps anchored to the block's single application with weight `anchor`
    update: str = "plain"
    anchor: float = 0.0

    def __post_init__(self) -> None:
        try:
            self.spec = str(LoopSpec.parse(self.spec))
        except ValueError as err:
            raise UserError(str(err)) from None
        try:
            check_update_rule(self.update, self.anchor)
        except ValueError as err:
            raise UserError(f"model.update/model.anchor: {err}") from None
        if self.latent_feedback not in ("residual", "soft_token"):
            raise UserError(f"model.latent_feedback must be 'residual' or 'soft_token', got {self.latent_feedback!r}")
        if self.latent_feedback == "soft_token" and self.placeholder_id is None:
            raise UserError("model.latent_feedback='soft_token' needs model.placeholder_id (the placeholder token id)")
        if self.init_depth is not None and self.init_depth < 1:
            raise UserError(f"model.init_depth must be >= 1 (or null: the effective depth), got {self.init_depth}")
        if self.placeholders_per_step < 1:
            raise UserError(f"model.placeholders_per_step must be >= 1, got {self.placeholders_per_step}")
        if self.mlp not in ("swiglu", "gelu"):
            raise UserError(f"model.mlp must be 'swiglu' or 'gelu', got {self.mlp!r}")
        if self.d_model % self.n_heads:
            raise UserError(f"model.d_model={self.d_model} is not divisible by model.n_heads={self.n_heads}")
        if self.n_heads % self.kv_heads:
            raise UserError(f"model.n_heads={self.n_heads} is not divisible by model.n_kv_heads={self.kv_heads}")

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


def hf_config_keys(config: LoopedLMConfig, loops: int | Sequence[int] | None = None) -> dict[str, int | bool]:
    """The ``config.json`` keys that transformers and tools read, mirrored from ``config``. ``num_hidden_layers``
    counts layer *applications* at ``loops``: the layers of the key/value cache.

    >>> hf_config_keys(LoopedLMConfig(spec="1x1+2x3", vocab_size=64, d_model=32, n_heads=4))["num_hidden_layers"]
    7
    """
    spec = check_loop_options(config.loop_spec, config.tied, loops)
    return {"vocab_size": config.vocab_size, "hidden_size": config.d_model,
            "num_hidden_layers": spec.effective_depth, "num_attention_heads": config.n_heads,
            "num_key_value_heads": config.kv_heads, "max_position_embeddings": config.max_seq_len,
            "tie_word_embeddings": config.tie_word_embeddings}


class LoopregConfig(PretrainedConfig):
    """A :class:`LoopedLMConfig` (under ``loopreg``) as a transformers config, plus ``loops``."""

    model_type = HF_MODEL_TYPE

    def __init__(self, loopreg: dict[str, Any] | LoopedLMConfig | None = None,
                 loops: int | Sequence[int] | None = None, use_cache: bool = True, **kwargs: Any) -> None:
        if isinstance(loopreg, dict):
            unknown = sorted(set(loopreg) - {f.name for f in fields(LoopedLMConfig)})
            if unknown:
                raise UserError(f"config.json: unknown 'loopreg' keys {unknown}; valid keys: "
                                f"{sorted(f.name for f in fields(LoopedLMConfig))}")
        looped = loopreg if isinstance(loopreg, LoopedLMConfig) else LoopedLMConfig(**(loopreg or {}))
        self.loopreg = asdict(looped)
        self.loops = list(loops) if isinstance(loops, (list, tuple)) else loops
        self.use_cache = use_cache
        mirrored = hf_config_keys(looped, self.loops)
        for key, value in mirrored.items():
            given = kwargs.pop(key, value)
            # num_hidden_layers follows `loops`; a config.json written at other loops is re-derived, not an error
            if given != value and key != "num_hidden_layers":
                raise UserError(f"config.json: {key}={given!r} disagrees with its 'loopreg' object, which gives "
                                f"{value!r} (the 'loopreg' object is the source of truth)")
        tie_word_embeddings = mirrored.pop("tie_word_embeddings")
        for key, value in mirrored.items():
            setattr(self, key, value)
        super().__init__(tie_word_embeddings=tie_word_embeddings, **kwargs)

    @property
    def arch(self) -> LoopedLMConfig:
        """The architecture, as the dataclass the model is built from.

        >>> LoopregConfig(loopreg={"spec": "2x3", "vocab_size": 64, "d_model": 32, "n_heads": 4}).arch.spec
        '2x3'
        """
        return LoopedLMConfig(**self.loopreg)

    def __setattr__(self, name: str, value: Any) -> None:
        # an architecture field set on the config (config.latent_mask = True) lands in its source of truth
        loopreg = self.__dict__.get("loopreg")
        if loopreg is not None and name in loopreg:
            self.loopreg = {**loopreg, name: value}
            if name not in ("vocab_size", "tie_word_embeddings"):  # the two that transformers reads too
                return
        super().__setattr__(name, value)

    def __getattr__(self, name: str) -> Any:
        # called only for names the config lacks: the architecture's fields and properties (d_model, loop_spec)
        loopreg = self.__dict__.get("loopreg")
        if name.startswith("_") or loopreg is None:
            raise AttributeError(name)
        if name in loopreg:
            return loopreg[name]
        if isinstance(getattr(LoopedLMConfig, name, None), property):
            return getattr(self.arch, name)
        raise AttributeError(f"{type(self).__name__} has no attribute {name!r}")


def load_config(folder: str | Path) -> LoopedLMConfig:
    """The :class:`LoopedLMConfig` stored in a saved model folder (one-line errors for bad folders).

    >>> # load_config("runs/loop_12x2/model").spec
    """
    path = Path(folder) / CONFIG_NAME
    if not path.is_file():
        raise UserError(f"{path}: not found; expected a loopreg model folder with {CONFIG_NAME}")
    try:
        raw = json.loads(path.read_text())["loopreg"]
    except (json.JSONDecodeError, KeyError, TypeError) as err:
        raise UserError(f"{path}: not a loopreg config (needs a 'loopreg' object): {err}") from None
    known = {f.name for f in fields(LoopedLMConfig)}
    unknown = sorted(set(raw) - known)
    if unknown:
        raise UserError(f"{path}: unknown config keys {unknown}; valid keys: {sorted(known)}")
    return LoopedLMConfig(**raw)
