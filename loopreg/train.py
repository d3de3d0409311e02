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
from composer.core import Callback
from torch.utils.data import DataLoader

from loopreg.composer_model import ComposerLoopedLM, PretrainedLM
from loopreg.config import Recipe, RecipeError, check_kwargs, load_recipe, lookup, model_config
from loopreg.data import Data
from loopreg.errors import UserError

__all__ = ["main", "build_trainer", "run", "load_pretrained", "Pretrained"]


def _build(registry: dict[str, Any], name: str, kwargs: dict[str, Any] | None, path: str, *args: Any) -> Any:
    factory = lookup(registry, name, path)
    kwargs = dict(kwargs or {})
    check_kwargs(factory, kwargs, path)
    try:
        return factory(*args, **kwargs)
    except UserError as err:  # it names its own key path (under ``path``)
        raise err.at(path) from None
    except (ValueError, TypeError) as err:  # the component's own checks, e.g. a bad spec or a negative λ
        raise RecipeError(f"{path}: {str(err).strip().splitlines()[0]}") from None


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
    from tokenizers import Tokenizer

    from loopreg.model import LoopedLM
    from loopreg.surgery.sources import load_source, load_source_tokenizer

    try:
        model = load_source(source)
        if isinstance(model, LoopedLM):
            tokenizer_file = Path(source) / "tokenizer.json"
            if not tokenizer_file.is_file():
                raise FileNotFoundError(f"{source}: no tokenizer.json next to the loopreg model")
            return Pretrained(ComposerLoopedLM(model), Tokenizer.from_file(str(tokenizer_file)))
        tokenizer = load_source_tokenizer(source)
        if tokenizer is None:
            raise FileNotFoundError(f"{source}: no tokenizer files (tokenizer.json, tokenizer_config.json, ...)")
        return Pretrained(PretrainedLM(model, tokenizer), tokenizer)
    except (OSError, ValueError) as err:  # missing files, unreadable weights, a hub id that is not there
        raise RecipeError(f"model.pretrained: {str(err).strip().splitlines()[0]}") from None


def build_dataloaders(recipe: Recipe, world_size: int, rank: int, pretrained: Pretrained | None = None) -> Data:
    """Train and eval data for this rank (tokenized with ``pretrained``'s tokenizer when given)."""
    from loopreg.data.text import PackedText, load_tokenizer, text_stream

    if recipe.global_train_batch_size % world_size:
        raise RecipeError(f"global_train_batch_size={recipe.global_train_batch_size} is not divisible by the world "
                          f"size {world_size}; choose a multiple of {world_size}")
    per_device = recipe.global_train_batch_size // world_size
    if recipe.train_data.kind == "paired":
        from loopreg.data.paired import paired_dataloaders

        return paired_dataloaders(recipe, per_device, world_size, rank)
    if recipe.train_data.kind == "synthetic" or recipe.tokenizer.kind == "synthetic":
        from loopreg.data.tasks import synthetic_dataloaders

        return synthetic_dataloaders(recipe, per_device, world_size, rank)
    if pretrained is not None:
        tokenizer = pretrained.tokenizer
    else:
        try:
            tokenizer = load_tokenizer(recipe.tokenizer.kind, recipe.tokenizer.name)
        except (ValueError, FileNotFoundError) as err:
            raise RecipeError(str(err)) from None
        if tokenizer.get_vocab_size() > recipe.model.vocab_size:
            raise RecipeError(f"model.vocab_size={recipe.model.vocab_size} is smaller than the tokenizer's vocabulary "
                              f"({tokenizer.get_vocab_size()} tokens)")
    shifts_labels = pretrained is not None and pretrained.shifts_labels

    def packed(section_name: str, max_sequences: int | None, batch_size: int) -> PackedText:
        data = getattr(recipe, section_name)
        try:
            docs = text_stream(data.source, data.split, data.subset, data.text_field, data.streaming)
        except (OSError, ValueError) as err:  # missing files; a hub id that is not there or not reachable
            raise RecipeError(f"{section_name}.source: {str(err).strip().splitlines()[0]}") from None
        try:
            return PackedText(docs, tokenizer, recipe.max_seq_len, rank=rank, world_size=world_size,
                              max_sequences=max_sequences, batch_size=batch_size, model_shifts_labels=shifts_labels)
        except ValueError as err:  # a source tokenizer without an end-of-text token, or not a fast one
            raise RecipeError(f"tokenizer: {err}") from None

    train = DataLoader(packed("train_data", None, per_device), batch_size=per_device,
                       num_workers=recipe.train_data.num_workers)
    evaluation = None
    if recipe.eval_data is not None:
        evaluation = DataLoader(packed("eval_data", recipe.eval_data.eval_size, recipe.device_eval_batch_size),
                                batch_size=recipe.device_eval_batch_size, num_workers=recipe.eval_data.num_workers)
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
    if dist.get_global_rank() == 0:  # before any rank builds a Trainer: Composer then loads what this chose
        _check_checkpoints(recipe)
    reproducibility.seed_all(recipe.seed)
    pretrained = load_pretrained(recipe.model.pretrained) if recipe.model.pretrained else None
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
            try:
                algorithm.use_source(recipe.model.pretrained, data.tokenizer, model)
            except (OSError, ValueError) as err:
                raise RecipeError(f"algorithms.{name}: {str(err).strip().splitlines()[0]}") from None
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
    trainer = Trainer(
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
        try:
            check_checkpoint(recipe.load_path)
        except RecipeError as err:
            raise RecipeError(f"load_path: {err}") from None


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
    """``loopreg train RECIPE.yaml [key=value ...]``; returns the exit status (2 for user errors)."""
    if not argv or argv[0] in ("-h", "--help"):
        print("usage: loopreg train RECIPE.yaml [key=value ...]   (OmegaConf dotlist overrides)",
              file=sys.stdout if argv else sys.stderr)
        return 0 if argv else 2
    from loopreg.callbacks.nonfinite_guard import NonFiniteLossError
    from loopreg.data.text import DataError

    try:
        run(argv[0], argv[1:])
    except (RecipeError, DataError, UserError) as err:
        # A DataError raised in a DataLoader worker comes back with the worker's traceback in its message,
        # ending in "loopreg.data.text.DataError: <the one line>".
        line = str(err).strip().splitlines()[-1].removeprefix(f"{DataError.__module__}.{DataError.__name__}: ")
        print(f"error: {line}", file=sys.stderr)
        return 2
    except NonFiniteLossError as err:  # the run diverged: not a usage error, but no traceback either
        print(f"error: {err}", file=sys.stderr)
        return 1
    return 0


def main(recipe_path: str | None = None) -> NoReturn:
    """Entry from a recipe's first line (``main(__file__)``, overrides in ``sys.argv``) or from
    ``python -m loopreg.train RECIPE.yaml ...``."""
    argv = sys.argv[1:] if recipe_path is None else [recipe_path, *sys.argv[1:]]
    sys.exit(cli_main(argv))


if __name__ == "__main__":
    main()
