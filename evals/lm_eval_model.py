"""lm-eval's Hugging Face model (``HFLM``) on any model loopreg loads, at any loop count, with an adaptive exit
and a KV policy: registered in lm-eval as ``loopreg``.

    >>> lm = LoopregLM("runs/smollm2_middle", loops=4)  # doctest: +SKIP
    >>> lm_eval.simple_evaluate(model=lm, tasks=["arc_easy"])  # doctest: +SKIP

Importing this module registers the name, so ``lm_eval.simple_evaluate(model="loopreg",
model_args="pretrained=runs/x,loops=2", ...)`` works, and running it is lm-eval's own command line with the
model registered (lm-eval finds models only in its registry; nothing outside it can add one unimported):

    python -m loopreg.evals.lm_eval_model --model loopreg --model_args pretrained=runs/x,loops=2 --tasks arc_easy
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Any

import torch
from lm_eval.api.registry import register_model
from lm_eval.models.huggingface import HFLM
from lm_eval.models.utils_hf import get_dtype
from torch import nn
from transformers import PreTrainedTokenizerBase, PreTrainedTokenizerFast

from loopreg.adaptive import ExitRule, ExitStats
from loopreg.errors import UserError
from loopreg.surgery.core import distinct_param_count

from .report import ModelInfo

__all__ = ["LoopregLM", "check_loop_override", "hf_tokenizer", "load_model", "model_info", "model_name"]


def hf_tokenizer(tokenizer: Any) -> PreTrainedTokenizerBase:
    """A Hugging Face tokenizer, left-padding: an HF one as it is; a loopreg folder's ``tokenizers.Tokenizer``
    wrapped, with ``<bos>`` first when it has one (its synthetic-task models were trained on ``<bos> prompt``)
    and its end-of-text, BOS and pad tokens named.

    >>> hf_tokenizer(Tokenizer.from_file("runs/loop_12x2/model/tokenizer.json")).eos_token  # doctest: +SKIP
    '<|endoftext|>'
    """
    if isinstance(tokenizer, PreTrainedTokenizerBase):
        tokenizer.padding_side = "left"
        return tokenizer
    from tokenizers import Tokenizer, processors

    raw = Tokenizer.from_str(tokenizer.to_str())  # a copy: the post-processor below is this wrapper's own
    vocab = raw.get_vocab()
    find = lambda *names: next((name for name in names if name in vocab), None)  # noqa: E731
    eos, bos = find("<eos>", "<|endoftext|>", "</s>"), find("<bos>")
    if bos is not None:
        raw.post_processor = processors.TemplateProcessing(single=f"{bos} $A", special_tokens=[(bos, vocab[bos])])
    return PreTrainedTokenizerFast(tokenizer_object=raw, eos_token=eos, bos_token=bos, pad_token=find("<pad>") or eos,
                                   padding_side="left")


def model_name(source: str | Path) -> str:
    """A model's name in results and reports: a GGUF file's stem, a folder's or hub id's last part.

    >>> model_name("x/SmolLM2-135M-Instruct.Q4_1.gguf")
    'SmolLM2-135M-Instruct.Q4_1'
    """
    path = Path(source)
    return path.stem if path.suffix == ".gguf" else path.name


def load_model(source: str | Path) -> tuple[nn.Module, PreTrainedTokenizerBase]:
    """The model at ``source`` (anything :func:`loopreg.load` accepts: a GGUF file, a loopreg or HF folder, a hub
    id) in eval mode, and its tokenizer as a Hugging Face one (:func:`hf_tokenizer`). A missing model or tokenizer
    is a one-line :class:`~loopreg.errors.UserError`.

    >>> model, tokenizer = load_model("runs/smollm2_middle")  # doctest: +SKIP
    """
    from loopreg.loading import load
    from loopreg.surgery.sources import is_loopreg_folder, load_source_tokenizer

    path = Path(source)
    model = load(path)
    tokenizer = load_source_tokenizer(path)
    if tokenizer is None and is_loopreg_folder(path):
        raise UserError(f"{path / 'tokenizer.json'}: not found; a loopreg model folder needs its "
                        "tokenizer.json (training with export_folder set writes it)")
    if tokenizer is None:
        raise UserError(f"{path}: no tokenizer files next to the model")
    return model.eval(), hf_tokenizer(tokenizer)


def check_loop_override(model: nn.Module, flag: str = "--loops", **options: Any) -> None:
    """Raise a one-line :class:`~loopreg.errors.UserError` naming ``flag`` unless ``model`` loops and can run
    ``options`` (``loops``, ``exit``, ``kv_policy``: :func:`~loopreg.looping.check_loop_options`).

    >>> check_loop_override(plain_llama, loops=2)  # doctest: +SKIP
    UserError: --loops: this LlamaForCausalLM does not loop (spec 6x1); loop it first with `loopreg surgery`
    """
    from loopreg.looping import check_loop_options
    from loopreg.surgery.core import is_tied, looped_spec

    spec = looped_spec(model)
    if spec is None or not spec.is_looped:
        raise UserError(f"{flag}: this {type(model).__name__} does not loop (spec {spec or 'none'}); "
                        "loop it first with `loopreg surgery`")
    try:
        check_loop_options(spec, is_tied(model), **options)
    except UserError as err:
        raise UserError(f"{flag}: {err}") from None


def model_info(name: str, model: nn.Module, loops: int | None = None) -> ModelInfo:
    """Spec and Params/FLOPs in layer units for a results file (a plain HF model is ``(N⊗1)``).

    >>> model_info("middle", retrofit, loops=2).flops_units  # doctest: +SKIP
    """
    from loopreg.surgery.core import is_tied, looped_spec

    spec = looped_spec(model)
    if spec is None:
        depth = getattr(model.config, "num_hidden_layers", None) or getattr(model.config, "n_layer", None)
        return ModelInfo.from_spec(name, f"{depth}x1")
    spec = spec.with_loops(loops) if loops is not None else spec
    if not is_tied(model):  # an untied model owns a layer per application
        return ModelInfo(name, str(spec), 1, spec.effective_depth, spec.effective_depth)
    return ModelInfo.from_spec(name, str(spec))


@register_model("loopreg")
class LoopregLM(HFLM):
    """``HFLM`` whose every model call (``loglikelihood``, ``loglikelihood_rolling``, ``generate_until``) runs
    ``loops`` iterations of the looped block (``None``: the model's own count).

    ``pretrained`` is a path :func:`load_model` accepts or a loaded model (a ``LoopedLM`` or an HF causal LM, then
    give ``tokenizer``); ``device`` and ``dtype`` place it (HFLM leaves a loaded model where it is); every other
    keyword is HFLM's (``batch_size``, ``max_length``, ...). ``exit`` (an adaptive exit rule, or its text
    ``kl:0.01``) lets tokens leave the loop early and ``kv_policy`` picks the loop's KV cache
    (:mod:`loopreg.adaptive`); ``exit_stats`` then counts the thinking iterations of every call (swap it to count
    per task). An option the model cannot run (a loop count on a plain or untied model) is a one-line
    :class:`~loopreg.errors.UserError`. ``info`` is the model's :class:`~loopreg.evals.report.ModelInfo` at this
    loop count (spec, Params/FLOPs in layer units, exit rule and KV policy).

    >>> LoopregLM("runs/smollm2_middle", loops=2, device="cpu").loops  # doctest: +SKIP
    2
    """

    def __init__(self, pretrained: str | Path | nn.Module, loops: int | None = None,
                 tokenizer: PreTrainedTokenizerBase | None = None, device: str | None = None,
                 dtype: str | torch.dtype | None = None, exit: ExitRule | str | None = None,
                 kv_policy: str = "per_application", name: str | None = None, **kwargs: Any) -> None:
        model = pretrained
        if isinstance(pretrained, (str, Path)):
            model, loaded = load_model(pretrained)
            tokenizer = tokenizer or loaded
            name = name or model_name(pretrained)
        if tokenizer is None:
            raise ValueError("LoopregLM: a loaded model needs its tokenizer (tokenizer=...)")
        exit = ExitRule.parse(exit) if isinstance(exit, str) else exit
        if loops is not None:
            check_loop_override(model, loops=loops)
        if exit is not None or kv_policy != "per_application":
            check_loop_override(model, "--exit" if exit is not None else "--kv-policy", exit=exit, kv_policy=kv_policy)
        self.loops, self.exit, self.kv_policy = loops, exit, kv_policy
        self.exit_stats = ExitStats() if exit is not None else None
        name = name or type(model).__name__
        self.info = model_info(f"{name}@loops{loops}" if loops is not None else name, model, loops)
        if exit is not None or kv_policy != "per_application":
            self.info = dataclasses.replace(self.info, exit=None if exit is None else str(exit), kv_policy=kv_policy)
        if device is None or (device.startswith("cuda") and not torch.cuda.is_available()):
            # as HFLM runs: no device, or lm-eval's CLI default cuda:0 without CUDA, is the best one there is
            device = "cuda" if torch.cuda.is_available() else "cpu"
        dtype = get_dtype(dtype) if dtype not in (None, "auto") else None
        model = model.to(device=device, dtype=dtype)
        hf_logger = logging.getLogger(HFLM.__module__)
        level = hf_logger.level
        hf_logger.setLevel(logging.ERROR)  # not its warnings that a loaded model ignores device/dtype: placed above
        try:
            super().__init__(pretrained=model, tokenizer=hf_tokenizer(tokenizer), backend="causal", **kwargs)
        finally:
            hf_logger.setLevel(level)

    def _loop_kwargs(self, generating: bool) -> dict[str, Any]:
        # A plain model's forward/generate take none of these: pass only what is asked for.
        extra: dict[str, Any] = {} if self.loops is None else {"loops": self.loops}
        if self.exit is not None:
            extra.update(exit=self.exit, exit_stats=self.exit_stats)
        if generating and self.kv_policy != "per_application":
            extra["kv_policy"] = self.kv_policy
        return extra

    def _model_call(self, inps: torch.Tensor, attn_mask: torch.Tensor | None = None,
                    labels: torch.Tensor | None = None) -> torch.Tensor:
        """HFLM's causal forward (right-padded rows, no mask needed: padding follows every real token) with the
        loop options; ``attn_mask``/``labels`` are HFLM's seq2seq-only arguments."""
        with torch.no_grad(), torch.autocast(device_type=self.device.type, dtype=self.mixed_precision_dtype,
                                             enabled=self.mixed_precision_dtype is not None):
            return self.model(inps, **self._loop_kwargs(generating=False)).logits

    def _model_generate(self, context: torch.Tensor, max_length: int, stop: list[str],
                        **generation_kwargs: Any) -> torch.Tensor:
        """HFLM's ``generate`` (left-padded ``context`` with its ``attention_mask``) with the loop options."""
        return super()._model_generate(context, max_length, stop, **self._loop_kwargs(generating=True),
                                       **generation_kwargs)

    def get_model_info(self) -> dict[str, Any]:
        """What the results' ``config`` records about the model: distinct parameters, dtype, spec and loop count
        (HFLM's own asks the Hub for a revision, which a local model has not)."""
        return {"model_num_parameters": distinct_param_count(self.model), "model_dtype": str(self.model.dtype),
                "spec": self.info.spec, "loops": self.loops, "exit": self.info.exit, "kv_policy": self.info.kv_policy}


if __name__ == "__main__":
    from lm_eval.__main__ import cli_evaluate

    cli_evaluate()
