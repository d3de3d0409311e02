"""Training entry: a recipe (YAML + dotlist overrides) → Composer ``Trainer`` → ``fit()``.

Three equivalent ways to run a recipe, on 1 or N processes:

    composer -n 8 recipes/reg_loop_12x2.yaml max_duration=1000ba
    composer -n 8 -m loopreg.train recipes/reg_loop_12x2.yaml
    loopreg train recipes/reg_loop_12x2.yaml

The first works because every recipe's first line is also a Python statement calling :func:`main`.
A recipe with ``model.pretrained`` starts from that checkpoint (see :func:`load_pretrained`), e.g.
``composer recipes/retrofit/smollm2_keepall_heal_cpu.yaml``.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn

import torch
from composer.core import Callback, DataSpec

from loopreg.composer_model import ComposerLoopedLM, PretrainedLM
from loopreg.config import Recipe, check_kwargs, load_recipe, lookup, model_config
from loopreg.data import Data
from loopreg.errors import RecipeError, UserError, report_user_error, under_key

__all__ = ["main", "cli_main", "run", "build_trainer", "build_dataloaders", "load_pretrained", "Pretrained"]


def _build(registry: dict[str, Any], name: str, kwargs: dict[str, Any] | None, path: str, *args: Any) -> Any:
    factory = lookup(registry, name, path)
    kwargs = dict(kwargs or {})
    check_kwargs(factory, kwargs, path)
    with under_key(path, ValueError, TypeError):  # the component's own checks, e.g. a bad spec or a negative λ
        return factory(*args, **kwargs)


def _device(recipe: Recipe) -> str:
    if recipe.device == "gpu" and not torch.cuda.is_available():
        raise RecipeError("device: 'gpu' was requested but no CUDA device is visible (set device=cpu or device=auto)")
    if recipe.device == "auto":
        return "gpu" if torch.cuda.is_available() else "cpu"
    return recipe.device


@dataclass
class Pretrained:
    """A recipe's ``model.pretrained``, loaded: the Composer model and the source's own tokenizer (Hugging
    Face for HF sources, ``tokenizers.Tokenizer`` for loopreg folders)."""

    model: Any  # PretrainedLM or ComposerLoopedLM
    tokenizer: Any

    @property
    def shifts_labels(self) -> bool:
        """Whether the model shifts ``labels`` itself (Hugging Face), so batches carry unshifted ones."""
        return isinstance(self.model, PretrainedLM)


def load_pretrained(source: str) -> Pretrained:
    """Load ``source`` (HF folder, ``.gguf`` file, hub id or loopreg folder) with its tokenizer: a loopreg
    folder stays a :class:`ComposerLoopedLM`, an HF model is wrapped in :class:`PretrainedLM`.

    >>> # load_pretrained(str(smollm2_gguf())).model.model.config.num_hidden_layers  ->  30
    """
    from loopreg.loading import load
    from loopreg.surgery.adapters import model_family
    from loopreg.surgery.sources import load_source_tokenizer

    with under_key("model.pretrained", OSError, ValueError):  # missing files, unreadable weights, no such hub id
        model = load(source)
        tokenizer = load_source_tokenizer(source)
        if tokenizer is None:
            raise FileNotFoundError(f"{source}: no tokenizer files (tokenizer.json, tokenizer_config.json, ...)")
        if model_family(model) == "loopreg":  # a LoopedLM keeps its own Composer wrapper (loss, metrics, FLOPs)
            return Pretrained(ComposerLoopedLM(model), tokenizer)
        return Pretrained(PretrainedLM(model, tokenizer), tokenizer)


def check_global_batch(recipe: Recipe, world_size: int) -> None:
    """A one-line :class:`RecipeError` unless ``global_train_batch_size`` splits evenly over ``world_size`` ranks."""
    if recipe.global_train_batch_size % world_size:
        raise RecipeError(f"global_train_batch_size={recipe.global_train_batch_size} is not divisible by the world "
                          f"size {world_size}; choose a multiple of {world_size}")


def build_dataloaders(recipe: Recipe, world_size: int, rank: int, pretrained: Pretrained | None = None) -> Data:
    """Train and eval data for this rank, built by the ``train_data.kind`` entry of ``DATA_KINDS`` (tokenized
    with ``pretrained``'s tokenizer when given)."""
    from loopreg.data.kinds import DATA_KINDS

    check_global_batch(recipe, world_size)
    kind = lookup(DATA_KINDS, recipe.train_data.kind, "train_data.kind")
    return kind.build(recipe, recipe.global_train_batch_size // world_size, world_size, rank, pretrained)


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
    if dist.get_global_rank() == 0:  # before any rank builds a Trainer: Composer then loads what this chose
        _check_checkpoints(recipe)
    reproducibility.seed_all(recipe.seed)
    pretrained = load_pretrained(recipe.model.pretrained) if recipe.model.pretrained else None
    # Under a launcher, the process group first, as the Trainer would: a StreamingDataset built without one makes
    # and destroys its own on MASTER_PORT, and a rank that starts the next one before rank 0 has torn down the last
    # hangs. A single process needs none (and an in-process caller keeps its torch.distributed state untouched).
    check_global_batch(recipe, dist.get_world_size())  # before the process group: one line on every rank
    if dist.get_world_size() > 1:
        dist.initialize_dist(device)
    data = build_dataloaders(recipe, dist.get_world_size(), dist.get_global_rank(), pretrained)
    algorithms = [_build(ALGORITHMS, name, kwargs, f"algorithms.{name}") for name, kwargs in recipe.algorithms.items()]
    # An algorithm that trains its own kind of student (CoTDistillation) builds it, before the optimizer: its
    # extra modules are then trained and checkpointed from the first step.
    build_model = next((a.student_model for a in algorithms if hasattr(a, "student_model")), ComposerLoopedLM)
    if pretrained is not None:
        model = pretrained.model
    else:
        with torch.device(recipe.model.init_device):
            model = build_model(model_config(recipe.model), extra_eval_metrics=data.eval_metrics)

    optimizer = _build(OPTIMIZERS, recipe.optimizer.name, {"lr": recipe.optimizer.lr, **recipe.optimizer.kwargs},
                       "optimizer", model.parameters())
    alpha_f = {} if recipe.scheduler.alpha_f is None else {"alpha_f": recipe.scheduler.alpha_f}
    scheduler = _build(SCHEDULERS, recipe.scheduler.name,
                       {"t_warmup": recipe.scheduler.t_warmup, **alpha_f, **recipe.scheduler.kwargs}, "scheduler")
    for name, algorithm in zip(recipe.algorithms, algorithms):
        if hasattr(algorithm, "use_source"):  # source distillation: the teacher is the model before surgery
            with under_key(f"algorithms.{name}", OSError, ValueError):
                algorithm.use_source(recipe.model.pretrained, data.tokenizer, model)
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
    restore_rng = _RestoreRNG()
    # Composer weighs microbatches (and ranks) by sample count unless told the targets per batch: with
    # answer-only or padded labels the loss would then depend on how the global batch is split. (A raw batch
    # that an algorithm renders at AFTER_DATALOADER, e.g. paired problems, has no tokens yet: 0, as by default.)
    targets = getattr(model, "loss_targets", None)
    train = data.train if targets is None else DataSpec(data.train, get_num_tokens_in_batch=lambda batch: {
        "total": batch["input_ids"].numel() if "input_ids" in batch else 0,
        "loss_generating": targets(batch) if "labels" in batch else 0})
    trainer = Trainer(
        run_name=recipe.run_name,
        model=model,
        train_dataloader=train,
        accumulate_train_batch_on_tokens=targets is not None,
        eval_dataloader=data.evaluation,
        eval_interval=recipe.eval_interval if data.evaluation is not None else 1,
        eval_subset_num_batches=recipe.eval_subset_num_batches,
        max_duration=recipe.max_duration,
        optimizers=optimizer,
        schedulers=scheduler,
        algorithms=algorithms,
        callbacks=callbacks + list(extra_callbacks or []) + [restore_rng],
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
    restore_rng.arm(trainer)
    return trainer


def _check_checkpoints(recipe: Recipe) -> None:
    """Fail early, in one line, on a missing or unreadable ``load_path``; with autoresume, make Composer
    resume from the newest readable checkpoint (see :mod:`loopreg.checkpoints`). Local paths only."""
    from composer.utils import format_name_with_dist

    from loopreg.checkpoints import check_checkpoint, prepare_autoresume

    if recipe.autoresume and "://" not in recipe.save_folder:
        if prepare_autoresume(format_name_with_dist(recipe.save_folder, recipe.run_name)) is not None:
            return  # Composer ignores load_path when it autoresumes
    if recipe.load_path and "://" not in recipe.load_path:
        with under_key("load_path"):
            check_checkpoint(recipe.load_path)


class _RestoreRNG(Callback):
    """Restores the checkpoint's RNG state when a run resumes mid-epoch through the dataset's own
    ``load_state_dict``: Composer 0.32.1 restores it only while spinning the dataloader through the
    consumed batches or at an epoch start, and the resumable streams skip the spinning. It is put back
    right after the first resumed batch is drawn, where the uninterrupted run's RNG stood when it saved."""

    def __init__(self) -> None:
        self.rng_state: list[dict[str, Any]] | None = None

    def arm(self, trainer: Any) -> None:
        """Take over the RNG state ``trainer`` loaded if Composer itself will not restore it."""
        state = trainer.state
        # Trainer._rng_state (0.32.1) holds the loaded per-rank RNG until Composer restores it.
        if trainer._rng_state is not None and state.dataset_resumption.get("train") and \
                int(state.timestamp.batch_in_epoch) > 0:
            self.rng_state, trainer._rng_state = trainer._rng_state, None

    def after_dataloader(self, state: Any, logger: Any) -> None:
        if self.rng_state is not None:
            from composer.utils import reproducibility

            reproducibility.load_rng_state(self.rng_state)
            self.rng_state = None


def run(recipe_path: str | Path, overrides: list[str] | None = None) -> Any:
    """Load, validate and train ``recipe_path``; returns the finished ``Trainer``."""
    recipe = load_recipe(recipe_path, overrides)
    trainer = build_trainer(recipe)
    trainer.fit()
    trainer.close()
    return trainer


def cli_main(argv: list[str]) -> int:
    """``loopreg train RECIPE.yaml [key=value ...]``: raises :class:`~loopreg.errors.UserError` on a user error
    (the caller prints it and exits 2); returns 1, after one ``error:`` line, when the run diverges."""
    if not argv or argv[0] in ("-h", "--help"):
        print("usage: loopreg train RECIPE.yaml [key=value ...]   (OmegaConf dotlist overrides)",
              file=sys.stdout if argv else sys.stderr)
        return 0 if argv else 2
    from loopreg.callbacks.nonfinite_guard import NonFiniteLossError

    try:
        run(argv[0], argv[1:])
    except NonFiniteLossError as err:  # the run diverged: not a usage error, but no traceback either
        print(f"error: {err}", file=sys.stderr)
        return 1
    return 0


def main(recipe_path: str | None = None) -> NoReturn:
    """Entry from a recipe's first line (``main(__file__)``, overrides in ``sys.argv``) or from
    ``python -m loopreg.train RECIPE.yaml ...``: a user error prints one ``error:`` line and exits 2 (the
    recipe entry's counterpart of :func:`loopreg.cli.main`)."""
    argv = sys.argv[1:] if recipe_path is None else [recipe_path, *sys.argv[1:]]
    try:
        status = cli_main(argv)
    except UserError as err:  # also a DataError from a DataLoader worker: UserError keeps its one line
        status = report_user_error(err)
    sys.exit(status)


if __name__ == "__main__":
    main()
