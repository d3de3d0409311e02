"""Loop surgery on existing checkpoints: Hugging Face and loopreg models → looped models, and back out to
standard unrolled Hugging Face checkpoints.

    >>> # model = loop_surgery(load(smollm2_gguf()), "4x(1,4,1)"); export_unrolled(model, "runs/x")
"""

from loopreg.surgery.adapters import ADAPTERS, Adapter, find_adapter, get_layers, layer_role_params, unwrap
from loopreg.surgery.analysis import (LayerAnalysis, Split, calibration_tokens, layer_analysis, propose_split,
                                     token_windows)
from loopreg.surgery.core import LoopedLayers, distinct_param_count, loop_surgery, plan_surgery
from loopreg.surgery.export import export_unrolled
from loopreg.surgery.layer_map import INITS, default_layer_map, parse_layer_map
from loopreg.surgery.sources import smollm2_gguf

__all__ = ["ADAPTERS", "Adapter", "find_adapter", "get_layers", "layer_role_params", "unwrap", "LoopedLayers",
           "distinct_param_count", "loop_surgery", "plan_surgery", "export_unrolled", "INITS",
           "default_layer_map", "parse_layer_map", "smollm2_gguf", "LayerAnalysis", "Split",
           "calibration_tokens", "layer_analysis", "propose_split", "token_windows"]
