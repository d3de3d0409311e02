"""Name → builder registries that recipes refer to (LLM Foundry style), each a :class:`Registry`.

Recipes name Composer's own optimizers, schedulers, callbacks and loggers, plus loopreg's algorithms
and callbacks, data kinds (``train_data.kind``) and tokenizer kinds (``tokenizer.kind``). Data and
tokenizer kinds register themselves where they are defined (``@TOKENIZERS.register("name")``);
:mod:`loopreg.data.kinds` imports the modules of the built-in ones. A user adds an entry from their own
code before the recipe loads, e.g. ``OPTIMIZERS.register("lion")(Lion)``.

    >>> sorted(OPTIMIZERS)[:2]
    ['adafactor', 'adamw']
    >>> sorted(DATA_KINDS)
    ['paired', 'synthetic', 'text']
"""

from __future__ import annotations

import torch
from composer import callbacks as composer_callbacks
from composer import loggers as composer_loggers
from composer import optim as composer_optim

from loopreg.algorithms.cot_distillation import CoTDistillation
from loopreg.algorithms.loop_regularizer import LoopRegularizer
from loopreg.algorithms.loop_surgery import LoopSurgery
from loopreg.algorithms.random_loops import RandomLoops
from loopreg.algorithms.source_distillation import SourceDistillation
from loopreg.callbacks.downstream_eval import DownstreamEval
from loopreg.callbacks.loop_snap import LoopSnap
from loopreg.callbacks.nonfinite_guard import NonFiniteGuard
from loopreg.callbacks.similarity_monitor import LoopSimilarityMonitor
from loopreg.data.kinds import DATA_KINDS, TOKENIZERS
from loopreg.registry_base import Registry

__all__ = ["Registry", "OPTIMIZERS", "SCHEDULERS", "CALLBACKS", "LOGGERS", "ALGORITHMS", "DATA_KINDS", "TOKENIZERS"]

OPTIMIZERS = Registry("optimizer", {
    "decoupled_adamw": composer_optim.DecoupledAdamW,
    "decoupled_sgdw": composer_optim.DecoupledSGDW,
    "adamw": torch.optim.AdamW,
    "adafactor": torch.optim.Adafactor,  # the paper's optimizer for the synthetic tasks
})

SCHEDULERS = Registry("scheduler", {
    "cosine_with_warmup": composer_optim.CosineAnnealingWithWarmupScheduler,
    "linear_with_warmup": composer_optim.LinearWithWarmupScheduler,
    "constant_with_warmup": composer_optim.ConstantWithWarmupScheduler,
})

CALLBACKS = Registry("callback", {
    "speed_monitor": composer_callbacks.SpeedMonitor,
    "lr_monitor": composer_callbacks.LRMonitor,
    "memory_monitor": composer_callbacks.MemoryMonitor,
    "optimizer_monitor": composer_callbacks.OptimizerMonitor,
    "runtime_estimator": composer_callbacks.RuntimeEstimator,
    "loop_similarity_monitor": LoopSimilarityMonitor,
    "downstream_eval": DownstreamEval,
    "nonfinite_guard": NonFiniteGuard,
    "loop_snap": LoopSnap,
})

LOGGERS = Registry("logger", {
    "wandb": composer_loggers.WandBLogger,
    "mlflow": composer_loggers.MLFlowLogger,
    "tensorboard": composer_loggers.TensorboardLogger,
    "file": composer_loggers.FileLogger,
    "in_memory": composer_loggers.InMemoryLogger,
})

ALGORITHMS = Registry("algorithm", {
    "loop_regularizer": LoopRegularizer,
    "loop_surgery": LoopSurgery,
    "cot_distillation": CoTDistillation,
    "random_loops": RandomLoops,
    "source_distillation": SourceDistillation,
})
