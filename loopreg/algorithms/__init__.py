"""Composer algorithms for looped models: each a plain function plus a thin ``Algorithm`` class."""

from loopreg.algorithms.cot_distillation import CoTDistillation, LatentCurriculum, cot_distillation_loss
from loopreg.algorithms.loop_regularizer import (LAMBDA_SCHEDULES, LoopRegularization, LoopRegularizer,
                                                 RegularizerLayout, block_similarity, loop_regularization,
                                                 loop_similarity, loop_target, regularizer_layout, snap_to_looped)
from loopreg.algorithms.loop_surgery import LoopSurgery, apply_loop_surgery
from loopreg.algorithms.random_loops import RandomLoops, sample_loops
from loopreg.algorithms.source_distillation import SourceDistillation, distillation_loss, same_vocabulary

__all__ = ["LAMBDA_SCHEDULES", "CoTDistillation", "LatentCurriculum", "LoopRegularization", "LoopRegularizer",
           "LoopSurgery", "RandomLoops", "RegularizerLayout", "SourceDistillation", "apply_loop_surgery",
           "block_similarity", "cot_distillation_loss", "distillation_loss", "loop_regularization", "loop_similarity",
           "loop_target", "regularizer_layout", "same_vocabulary", "sample_loops", "snap_to_looped"]
