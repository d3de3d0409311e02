"""loopreg: looped and loop-regularized transformers on PyTorch + MosaicML Composer.

    >>> from loopreg import LoopSpec
    >>> LoopSpec.parse("4x(1,4,1)").units_label
    '12x / 24x'
"""

from loopreg.loading import load
from loopreg.model import LoopedLM, LoopedLMConfig
from loopreg.spec import LoopSpec

__all__ = ["LoopSpec", "LoopedLM", "LoopedLMConfig", "load"]
__version__ = "0.1.0"
