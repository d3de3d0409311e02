"""lm-eval's Hugging Face model (``HFLM``) on any model loopreg loads, at any loop count: registered in
lm-eval as ``loopreg``. Needs the ``lmeval`` extra (``pip install -e '.[lmeval]'``).

    >>> lm = LoopregLM("runs/smollm2_middle", loops=4)  # doctest: +SKIP
    >>> lm_eval.simple_evaluate(model=lm, tasks=["arc_easy"])  # doctest: +SKIP

Importing this module registers the name, so ``lm_eval.simple_evaluate(model="loopreg",
model_args="pretrained=runs/x,loops=2", ...)`` works, and running it is lm-eval's own command line with the
model registered (lm-eval finds models only in its registry; nothing outside it can add one unimported):

    python -m loopreg.evals.lm_eval_model --model loopreg --model_args pretrained=runs/x,loops=2 --tasks arc_easy
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
from lm_eval.api.registry import register_model
from lm_eval.models.huggingface import HFLM
from lm_eval.models.utils_hf import get_dtype
from torch import nn
from transformers import PreTrainedTokenizerBase, PreTrainedTokenizerFast

from loopreg.surgery.core import distinct_param_count

from .models import check_loop_override, load_generator, model_info

__all__ = ["LoopregLM", "hf_tokenizer", "load_model"]


def hf_tokenizer(tokens: Any) -> PreTrainedTokenizerBase:
    """The Hugging Face tokenizer of a :class:`~loopreg.evals.models.ModelGenerator`'s ``tokens``: an HF one as
    it is; a loopreg folder's ``tokenizers.Tokenizer`` wrapped, encoding as the harness does (with its
    ``<bos>`` first when it has one) and naming its end-of-text, BOS and pad tokens.

    >>> hf_tokenizer(load_generator("runs/loop_12x2/model")[0].tokens).eos_token  # doctest: +SKIP
    '<|endoftext|>'
    """
    if tokens.is_hf:
        return tokens.raw
    from tokenizers import Tokenizer, processors

    raw = Tokenizer.from_str(tokens.raw.to_str())  # a copy: the post-processor below is this wrapper's own
    name = lambda index: raw.id_to_token(index) if index is not None else None  # noqa: E731
    if tokens.bos_id is not None:
        bos = name(tokens.bos_id)
        raw.post_processor = processors.TemplateProcessing(single=f"{bos} $A", special_tokens=[(bos, tokens.bos_id)])
    return PreTrainedTokenizerFast(tokenizer_object=raw, eos_token=name(tokens.eos_id), bos_token=name(tokens.bos_id),
                                   pad_token=name(tokens.pad_id), padding_side="left")


def load_model(source: str | Path) -> tuple[nn.Module, PreTrainedTokenizerBase]:
    """The model at ``source`` (anything :func:`loopreg.load` accepts: a GGUF file, a
    loopreg or HF folder, a hub id) in eval mode, and its tokenizer as a Hugging Face one. A missing model or
    tokenizer raises a one-line ``FileNotFoundError``.

    >>> model, tokenizer = load_model("runs/smollm2_middle")  # doctest: +SKIP
    """
    generator, _ = load_generator(source)
    return generator.model, hf_tokenizer(generator.tokens)


@register_model("loopreg")
class LoopregLM(HFLM):
    """``HFLM`` whose every model call (``loglikelihood``, ``loglikelihood_rolling``, ``generate_until``) runs
    ``loops`` iterations of the looped block (``None``: the model's own count).

    ``pretrained`` is a path :func:`load_model` accepts or a loaded model (a ``LoopedLM`` or an HF causal LM,
    then give ``tokenizer``); ``device`` and ``dtype`` place it (HFLM leaves a loaded model where it is); every
    other keyword is HFLM's (``batch_size``, ``max_length``, ...). A loop count on a model that cannot run
    another (plain, untied) raises a one-line ``ValueError``. ``info`` is the model's
    :class:`~loopreg.evals.report.ModelInfo` at this loop count (spec, Params/FLOPs in layer units).

    >>> LoopregLM("runs/smollm2_middle", loops=2, device="cpu").loops  # doctest: +SKIP
    2
    """

    def __init__(self, pretrained: str | Path | nn.Module, loops: int | None = None,
                 tokenizer: PreTrainedTokenizerBase | None = None, device: str | None = None,
                 dtype: str | torch.dtype | None = None, **kwargs: Any) -> None:
        model = pretrained
        if isinstance(pretrained, (str, Path)):
            model, loaded = load_model(pretrained)
            tokenizer = tokenizer or loaded
        if tokenizer is None:
            raise ValueError("LoopregLM: a loaded model needs its tokenizer (tokenizer=...)")
        if loops is not None:
            check_loop_override(model, loops=loops)
        self.loops = loops
        self.info = model_info(str(pretrained) if isinstance(pretrained, (str, Path)) else type(model).__name__,
                               model, loops)
        if device is None or (device.startswith("cuda") and not torch.cuda.is_available()):
            # as HFLM runs: no device, or lm-eval's CLI default cuda:0 without CUDA, is the best one there is
            device = "cuda" if torch.cuda.is_available() else "cpu"
        dtype = get_dtype(dtype) if dtype not in (None, "auto") else None
        model = model.to(device=device, dtype=dtype)
        hf_logger = logging.getLogger(HFLM.__module__)
        level = hf_logger.level
        hf_logger.setLevel(logging.ERROR)  # not its warnings that a loaded model ignores device/dtype: placed above
        try:
            super().__init__(pretrained=model, tokenizer=tokenizer, backend="causal", **kwargs)
        finally:
            hf_logger.setLevel(level)

    @property
    def _loop_kwargs(self) -> dict[str, int]:
        # A plain model's forward/generate take no `loops`: pass it only when overriding.
        return {} if self.loops is None else {"loops": self.loops}

    def _model_call(self, inps: torch.Tensor, attn_mask: torch.Tensor | None = None,
                    labels: torch.Tensor | None = None) -> torch.Tensor:
        """HFLM's causal forward (right-padded rows, no mask needed: padding follows every real token) at
        ``self.loops``; ``attn_mask``/``labels`` are HFLM's seq2seq-only arguments."""
        with torch.no_grad(), torch.autocast(device_type=self.device.type, dtype=self.mixed_precision_dtype,
                                             enabled=self.mixed_precision_dtype is not None):
            return self.model(inps, **self._loop_kwargs).logits

    def _model_generate(self, context: torch.Tensor, max_length: int, stop: list[str],
                        **generation_kwargs: Any) -> torch.Tensor:
        """HFLM's ``generate`` (left-padded ``context`` with its ``attention_mask``) at ``self.loops``."""
        return super()._model_generate(context, max_length, stop, **self._loop_kwargs, **generation_kwargs)

    def get_model_info(self) -> dict[str, Any]:
        """What the results' ``config`` records about the model: distinct parameters, dtype, spec and loop count
        (HFLM's own asks the Hub for a revision, which a local model has not)."""
        return {"model_num_parameters": distinct_param_count(self.model), "model_dtype": str(self.model.dtype),
                "spec": self.info.spec, "loops": self.loops}


if __name__ == "__main__":
    from lm_eval.__main__ import cli_evaluate

    cli_evaluate()
