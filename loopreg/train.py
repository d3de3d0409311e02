"""Training entry: a recipe (YAML + dotlist overrides) → Composer ``Trainer`` → ``fit()``.

Three equivalent ways to run a recipe, on 1 or N processes:

    composer -n 8 recipes/reg_loop_12x2.yaml max_duration=1000ba
    composer -n 8 -m loopreg.train recipes/reg_loop_12x2.yaml
    loopreg train recipes/reg_loop_12x2.yaml

The first works because every recipe's first line is also a Python statement calling :func:`main`.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NoReturn

import torch
from torch.utils.data import DataLoader

from loopreg.composer_model import ComposerLoopedLM
from loopreg.config import ModelSection, Recipe, RecipeError, check_kwargs, load_recipe, lookup
from loopreg.model import LoopedLMConfig

__all__ = ["main", "build_trainer", "run", "model_config"]


def model_config(section: ModelSection) -> LoopedLMConfig:
    """The :class:`LoopedLMConfig` a recipe's ``model`` section describes (``init_device`` dropped)."""
    from dataclasses import fields

    return LoopedLMConfig(**{f.name: getattr(section, f.name) for f in fields(LoopedLMConfig)})


def _build(registry: dict[str, Any], name: str, kwargs: dict[str, Any] | None, path: str, *args: Any) -> Any:
    factory = lookup(registry, name, path)
    kwargs = dict(kwargs or {})
    check_kwargs(factory, kwargs, path)
    return factory(*args, **kwargs)


def _device(recipe: Recipe) -> str:
    if recipe.device == "gpu" and not torch.cuda.is_available():
        raise RecipeError("device: 'gpu' was requested but no CUDA device is visible (set device=cpu or device=auto)")
    if recipe.device == "auto":
        return "gpu" if torch.cuda.is_available() else "cpu"
    return recipe.device


@dataclass
class Data:
    """What a recipe's data sections build for one rank."""

    train: DataLoader
    evaluation: Any  # a DataLoader, a list of Composer Evaluators, or None
    tokenizer: Any
    eval_metrics: dict[str, Any] = field(default_factory=dict)  # task metrics beside the LM metrics
    task: Any = None  # loopreg.data.tasks.TaskData for synthetic tasks


def build_dataloaders(recipe: Recipe, world_size: int, rank: int) -> Data:
    """Train and eval data for this rank."""
    from loopreg.data.text import PackedText, load_tokenizer, text_stream

    if recipe.global_train_batch_size % world_size:
        raise RecipeError(f"global_train_batch_size={recipe.global_train_batch_size} is not divisible by the world "
                          f"size {world_size}; choose a multiple of {world_size}")
    per_device = recipe.global_train_batch_size // world_size
    if recipe.train_data.kind == "synthetic" or recipe.tokenizer.kind == "synthetic":
        from loopreg.data.tasks import synthetic_dataloaders

        return synthetic_dataloaders(recipe, per_device, world_size, rank)
    try:
        tokenizer = load_tokenizer(recipe.tokenizer.kind, recipe.tokenizer.name)
    except (ValueError, FileNotFoundError) as err:
        raise RecipeError(str(err)) from None
    if tokenizer.get_vocab_size() > recipe.model.vocab_size:
        raise RecipeError(f"model.vocab_size={recipe.model.vocab_size} is smaller than the tokenizer's vocabulary "
                          f"({tokenizer.get_vocab_size()} tokens)")

    def packed(section_name: str, max_sequences: int | None) -> PackedText:
        data = getattr(recipe, section_name)
        try:
            docs = text_stream(data.source, data.split, data.subset, data.text_field, data.streaming)
        except (FileNotFoundError, ValueError) as err:
            raise RecipeError(f"{section_name}.source: {err}") from None
        return PackedText(docs, tokenizer, recipe.max_seq_len, rank=rank, world_size=world_size,
                          max_sequences=max_sequences)

    train = DataLoader(packed("train_data", None), batch_size=per_device, num_workers=recipe.train_data.num_workers)
    evaluation = None
    if recipe.eval_data is not None:
        evaluation = DataLoader(packed("eval_data", recipe.eval_data.eval_size), batch_size=recipe.device_eval_batch_size,
                                num_workers=recipe.eval_data.num_workers)
    return Data(train, evaluation, tokenizer)


def build_trainer(recipe: Recipe, extra_callbacks: list[Any] | None = None):
    """A ready-to-``fit()`` Composer ``Trainer`` for ``recipe``."""
    from composer import Trainer
    from composer.algorithms import GradientClipping
    from composer.utils import dist, reproducibility

    from loopreg.registry import ALGORITHMS, CALLBACKS, LOGGERS, OPTIMIZERS, SCHEDULERS

    device = _device(recipe)
    if recipe.model.init_device == "meta" and recipe.fsdp_config is None:
        raise RecipeError("model.init_device=meta needs fsdp_config (FSDP materialises the weights); "
                          "use model.init_device=cpu without FSDP")
    if recipe.autoresume and not recipe.save_folder:
        raise RecipeError("autoresume=true needs save_folder (where the checkpoints to resume from live)")
    reproducibility.seed_all(recipe.seed)
    data = build_dataloaders(recipe, dist.get_world_size(), dist.get_global_rank())
    with torch.device(recipe.model.init_device):
        model = ComposerLoopedLM(model_config(recipe.model), extra_eval_metrics=data.eval_metrics)

    optimizer = _build(OPTIMIZERS, recipe.optimizer.name, {"lr": recipe.optimizer.lr, **recipe.optimizer.kwargs},
                       "optimizer", model.parameters())
    scheduler = _build(SCHEDULERS, recipe.scheduler.name,
                       {"t_warmup": recipe.scheduler.t_warmup, "alpha_f": recipe.scheduler.alpha_f}, "scheduler")
    algorithms = [_build(ALGORITHMS, name, kwargs, f"algorithms.{name}") for name, kwargs in recipe.algorithms.items()]
    if recipe.gradient_clipping:
        algorithms.append(GradientClipping(clipping_type="norm", clipping_threshold=recipe.gradient_clipping))
    callbacks = [_build(CALLBACKS, name, kwargs, f"callbacks.{name}") for name, kwargs in recipe.callbacks.items()]
    for callback in callbacks:  # callbacks that read text (downstream eval) get the recipe's tokenizer
        if hasattr(callback, "use_tokenizer"):
            callback.use_tokenizer(data.tokenizer)
    if recipe.export_folder:
        from loopreg.callbacks.export import ExportModel

        callbacks.append(ExportModel(recipe.export_folder, data.tokenizer))
    loggers = [_build(LOGGERS, name, kwargs, f"loggers.{name}") for name, kwargs in recipe.loggers.items()]
    precision = recipe.precision or ("amp_bf16" if device == "gpu" else "fp32")
    return Trainer(
        run_name=recipe.run_name,
        model=model,
        train_dataloader=data.train,
        eval_dataloader=data.evaluation,
        eval_interval=recipe.eval_interval if data.evaluation is not None else 1,
        eval_subset_num_batches=recipe.eval_subset_num_batches,
        max_duration=recipe.max_duration,
        optimizers=optimizer,
        schedulers=scheduler,
        algorithms=algorithms,
        callbacks=callbacks + list(extra_callbacks or []),
        loggers=loggers,
        device=device,
        precision=precision,
        device_train_microbatch_size=recipe.device_train_microbatch_size,
        parallelism_config={"fsdp": dict(recipe.fsdp_config)} if recipe.fsdp_config is not None else None,
        progress_bar=recipe.progress_bar,
        log_to_console=not recipe.progress_bar if recipe.log_to_console is None else recipe.log_to_console,
        console_log_interval=recipe.console_log_interval,
        save_folder=recipe.save_folder,
        save_interval=recipe.save_interval,
        save_num_checkpoints_to_keep=recipe.save_num_checkpoints_to_keep,
        save_overwrite=recipe.save_overwrite,
        load_path=recipe.load_path,
        autoresume=recipe.autoresume,
        seed=recipe.seed,
    )


def run(recipe_path: str | Path, overrides: list[str] | None = None) -> Any:
    """Load, validate and train ``recipe_path``; returns the finished ``Trainer``."""
    recipe = load_recipe(recipe_path, overrides)
    trainer = build_trainer(recipe)
    trainer.fit()
    trainer.close()
    return trainer


def cli_main(argv: list[str]) -> int:
    """``loopreg train RECIPE.yaml [key=value ...]``; returns the exit status (2 for user errors)."""
    if not argv or argv[0] in ("-h", "--help"):
        print("usage: loopreg train RECIPE.yaml [key=value ...]   (OmegaConf dotlist overrides)",
              file=sys.stdout if argv else sys.stderr)
        return 0 if argv else 2
    try:
        run(argv[0], argv[1:])
    except RecipeError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


def main(recipe_path: str | None = None) -> NoReturn:
    """Entry from a recipe's first line (``main(__file__)``, overrides in ``sys.argv``) or from
    ``python -m loopreg.train RECIPE.yaml ...``."""
    argv = sys.argv[1:] if recipe_path is None else [recipe_path, *sys.argv[1:]]
    sys.exit(cli_main(argv))


if __name__ == "__main__":
    main()
