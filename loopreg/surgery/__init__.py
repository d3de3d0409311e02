"""Loop surgery on existing checkpoints: Hugging Face and loopreg models → looped models, and back out to
standard unrolled Hugging Face checkpoints.

    >>> # model = loop_surgery(load_source("smollm2.gguf"), "4x(1,4,1)")
"""

from loopreg.surgery.adapters import ADAPTERS, Adapter, find_adapter, get_layers, layer_role_params, unwrap
from loopreg.surgery.core import LoopedLayers, distinct_param_count, load_looped, loop_surgery, plan_surgery
from loopreg.surgery.layer_map import INITS, default_layer_map, parse_layer_map

__all__ = ["ADAPTERS", "Adapter", "find_adapter", "get_layers", "layer_role_params", "unwrap", "LoopedLayers",
           "distinct_param_count", "load_looped", "loop_surgery", "plan_surgery", "INITS", "default_layer_map",
           "parse_layer_map"]
