"""Models for the harness: batched greedy generation (KV cache, left padding, stop sequences) for
loopreg ``LoopedLM`` folders and tied surgery outputs (both with loop overrides) and any Hugging Face
causal LM.

    >>> generator, info = load_generator("runs/loop_12x2/model", loops=4)  # doctest: +SKIP
    >>> generator.generate(["a=1, b=2, b=? "], max_new_tokens=2, stop=["\\n"])  # doctest: +SKIP
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import nn
from transformers import StoppingCriteria

from loopreg.adaptive import ExitRule, ExitStats
from loopreg.errors import UserError

from .report import ModelInfo

__all__ = ["ModelGenerator", "load_generator", "model_info", "check_loop_override"]


class _Tokens:
    """One interface over a ``tokenizers.Tokenizer`` (loopreg folders) and a Hugging Face tokenizer."""

    def __init__(self, tokenizer: Any) -> None:
        self.raw = tokenizer
        self.is_hf = hasattr(tokenizer, "convert_tokens_to_ids")
        lookup = tokenizer.convert_tokens_to_ids if self.is_hf else tokenizer.token_to_id
        vocab = tokenizer.get_vocab()
        find = lambda *names: next((lookup(n) for n in names if n in vocab), None)  # noqa: E731
        self.eos_id = tokenizer.eos_token_id if self.is_hf and tokenizer.eos_token_id is not None else find(
            "<eos>", "<|endoftext|>", "</s>")
        self.pad_id = find("<pad>") if not self.is_hf else (tokenizer.pad_token_id or self.eos_id)
        # Synthetic-task models were trained on "<bos> prompt"; HF tokenizers add their own BOS.
        self.bos_id = None if self.is_hf else find("<bos>")
        self.pad_id = self.pad_id if self.pad_id is not None else (self.eos_id or 0)

    def encode(self, text: str) -> list[int]:
        if self.is_hf:
            return self.raw(text, add_special_tokens=True)["input_ids"]
        try:
            ids = self.raw.encode(text, add_special_tokens=False).ids
        except Exception as err:  # tokenizers raises a bare Exception for out-of-vocabulary characters
            unknown = sorted({c for c in text if self.raw.token_to_id(c) is None})
            raise UserError(f"the model's tokenizer cannot encode characters {unknown} of a prompt: {err}") from None
        return [self.bos_id] + ids if self.bos_id is not None else ids

    def decode(self, ids: Sequence[int]) -> str:
        return self.decode_batch([ids])[0]

    def decode_batch(self, rows: Sequence[Sequence[int]]) -> list[str]:
        """Each row's text up to its end-of-text token, in one tokenizer call."""
        rows = [list(row) for row in rows]
        if self.eos_id is not None:
            rows = [row[: row.index(self.eos_id)] if self.eos_id in row else row for row in rows]
        if self.is_hf:
            return self.raw.batch_decode(rows, skip_special_tokens=True)
        return self.raw.decode_batch(rows, skip_special_tokens=False)


class _DecodedStop(StoppingCriteria):
    """transformers' stopping criterion for a row whose decoded new text (after the ``width`` prompt columns)
    contains a stop string. A stop string that was not in a row's text before a step ends in its newest token, so
    a step decodes only the row's last tokens that can hold one (every token is at least a byte; three more for a
    split UTF-8 character): O(1) per step, not O(T). A row once stopped stays stopped."""

    def __init__(self, tokens: _Tokens, stop: list[str], width: int) -> None:
        super().__init__()
        self.tokens, self.stop, self.width = tokens, stop, width
        self.window = max(len(s.encode()) for s in stop) + 3
        self.stopped: torch.Tensor | None = None

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        if self.stopped is None:
            self.stopped = torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
        running = (~self.stopped).nonzero().flatten()
        tails = input_ids[running, max(self.width, input_ids.shape[1] - self.window):].tolist()
        texts = self.tokens.decode_batch(tails)
        self.stopped[running] = torch.tensor([any(s in text for s in self.stop) for text in texts],
                                             dtype=torch.bool, device=self.stopped.device)
        return self.stopped.clone()


class ModelGenerator:
    """Greedy, deterministic completions for a batch of prompts (the harness's ``TextGenerator``).

    Prompts are left-padded into one batch and left-truncated to fit ``context`` tokens with room for
    the answer; generation stops early once every row contains a stop sequence or end-of-text.
    ``exit`` (an adaptive exit rule) and ``kv_policy`` go to a looped model's generate
    (:mod:`loopreg.adaptive`); ``generate(..., exit_stats=stats)`` then counts its thinking iterations.
    """

    def __init__(self, model: nn.Module, tokenizer: Any, loops: int | None = None, context: int | None = None,
                 exit: ExitRule | None = None, kv_policy: str = "per_application") -> None:
        self.model, self.tokens, self.loops = model.eval(), _Tokens(tokenizer), loops
        self.exit, self.kv_policy = exit, kv_policy
        if loops is not None:
            check_loop_override(model, loops=loops)
        if self.adaptive:
            check_loop_override(model, "--exit" if exit is not None else "--kv-policy", exit=exit, kv_policy=kv_policy)
        config = model.config
        self.context = (context or getattr(config, "max_seq_len", None)
                        or getattr(config, "max_position_embeddings", 2048))
        self._stop_criteria: dict[tuple[str, ...], Any] = {}  # stop list -> transformers StoppingCriteriaList

    def prompt_length(self, prompt: str) -> int:
        """The prompt's token count (before truncation), by which the runner orders its batches."""
        return len(self.tokens.encode(prompt))

    def _stop_strings(self, stop: list[str], width: int) -> Any:
        from transformers import StoppingCriteriaList, StopStringCriteria

        if not self.tokens.is_hf:  # a loopreg folder's tokenizers.Tokenizer, which StopStringCriteria cannot read
            return StoppingCriteriaList([_DecodedStop(self.tokens, stop, width)])
        # Built once per stop list: StopStringCriteria scans the whole vocabulary (0.4 s for SmolLM2's 49k tokens).
        key = tuple(stop)
        if key not in self._stop_criteria:
            self._stop_criteria[key] = StoppingCriteriaList([StopStringCriteria(self.tokens.raw, list(stop))])
        return self._stop_criteria[key]

    @property
    def adaptive(self) -> bool:
        """Whether generation leaves today's fixed-loop, per-application path (an exit rule or KV sharing)."""
        return self.exit is not None or self.kv_policy != "per_application"

    @torch.no_grad()
    def generate(self, prompts: list[str], max_new_tokens: int, stop: list[str],
                 exit_stats: ExitStats | None = None) -> list[str]:
        budget = max(1, self.context - max_new_tokens)
        rows = [self.tokens.encode(prompt)[-budget:] for prompt in prompts]
        width = max(len(row) for row in rows)
        ids = torch.full((len(rows), width), self.tokens.pad_id, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for index, row in enumerate(rows):
            ids[index, width - len(row):] = torch.tensor(row)
            mask[index, width - len(row):] = 1
        device = next(self.model.parameters()).device
        ids, mask = ids.to(device), mask.to(device)
        # only a run that asks for them passes the keywords: a plain HF model's generate does not take them
        extra = {"exit": self.exit, "kv_policy": self.kv_policy, "exit_stats": exit_stats} if self.adaptive else {}
        if self.loops is not None:
            extra["loops"] = self.loops
        if stop:
            extra["stopping_criteria"] = self._stop_strings(stop, width)
        out = self.model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens, do_sample=False,
                                  pad_token_id=self.tokens.pad_id, eos_token_id=self.tokens.eos_id, **extra)
        new = out[:, width:]
        return self.tokens.decode_batch(new.tolist())


def check_loop_override(model: nn.Module, flag: str = "--loops", **options: Any) -> None:
    """Raise a one-line :class:`~loopreg.errors.UserError` naming ``flag`` unless ``model`` loops and can run
    ``options`` (``loops``, ``exit``, ``kv_policy``: :func:`~loopreg.looping.check_loop_options`)."""
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
    """Spec and Params/FLOPs in layer units for a results file (a plain HF model is ``(N⊗1)``)."""
    from loopreg.surgery.core import is_tied, looped_spec

    spec = looped_spec(model)
    if spec is None:
        depth = getattr(model.config, "num_hidden_layers", None) or getattr(model.config, "n_layer", None)
        return ModelInfo.from_spec(name, f"{depth}x1")
    spec = spec.with_loops(loops) if loops is not None else spec
    if not is_tied(model):  # an untied model owns a layer per application
        return ModelInfo(name, str(spec), 1, spec.effective_depth, spec.effective_depth)
    return ModelInfo.from_spec(name, str(spec))


def load_generator(source: str | Path, loops: int | None = None, gguf_file: str | None = None,
                   context: int | None = None, exit: ExitRule | None = None,
                   kv_policy: str = "per_application") -> tuple[ModelGenerator, ModelInfo]:
    """A generator and its :class:`ModelInfo` for a loopreg folder, a surgery output, an HF folder or a
    GGUF file (``folder/x.gguf`` or ``folder`` + ``gguf_file``); ``exit``/``kv_policy`` as :class:`ModelGenerator`."""
    from tokenizers import Tokenizer

    from loopreg.loading import load
    from loopreg.surgery.sources import is_loopreg_folder, load_source_tokenizer

    path = Path(source) / gguf_file if gguf_file else Path(source)
    model = load(path)
    tokenizer = load_source_tokenizer(path)
    if tokenizer is None and is_loopreg_folder(path):
        raise UserError(f"{path / 'tokenizer.json'}: not found; a loopreg model folder needs its "
                                "tokenizer.json (training with export_folder set writes it)")
    if tokenizer is None:
        raise UserError(f"{path}: no tokenizer files next to the model")
    if not isinstance(tokenizer, Tokenizer):  # a Hugging Face tokenizer (a loopreg folder's is a Tokenizer)
        tokenizer.padding_side = "left"
    name = path.stem if path.suffix == ".gguf" else path.name
    name = f"{name}@loops{loops}" if loops is not None else name  # a loop sweep gives one report row per count
    generator = ModelGenerator(model, tokenizer, loops, context, exit, kv_policy)
    info = model_info(name, model, loops)
    if generator.adaptive:
        info = dataclasses.replace(info, exit=None if exit is None else str(exit), kv_policy=kv_policy)
    return generator, info
