"""Layer analysis: how much each decoder layer turns the residual stream, and the encoder / thinking /
decoder split that follows from it (ETD, Encode–Think–Decode, Koishekenov et al. 2025, arXiv 2510.07358).

    >>> split = propose_split([0.5, 0.0, 0.0, 0.0, 0.0, 0.4])
    >>> (split.encoder, split.thinking, split.decoder), str(split.spec(loops=2)), split.layer_map()
    ((1, 4, 1), '1x1+4x2+1x1', '0,1-4,5')

Per layer, over every calibration token, with h_in/h_out the residual stream before/after the layer:

* angular distance ``arccos(cos(h_in, h_out)) / π`` (0 = the layer leaves the direction unchanged);
* block influence ``1 − cos(h_in, h_out)`` (ShortGPT).

Both are averaged over tokens. The states come from forward hooks on the decoder layer modules (not
``output_hidden_states``, whose last entry is after the final norm) and are reduced on the fly.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from loopreg.errors import UserError
from loopreg.spec import LoopSpec
from loopreg.surgery.adapters import unwrap
from loopreg.surgery.core import looped_spec, stored_layers
from loopreg.surgery.layer_map import format_layer_map

__all__ = ["LayerAnalysis", "Split", "layer_analysis", "propose_split", "calibration_tokens", "token_windows",
           "DEFAULT_TOKENS", "MAX_WINDOW"]

DEFAULT_TOKENS = 32768
MAX_WINDOW = 512  # tokens per analysed sequence (less when the model's context is shorter)


@dataclasses.dataclass(frozen=True)
class Split:
    """Layer counts of the encoder, the thinking block and the decoder; together they keep every layer.

    >>> str(Split(7, 5, 18).spec(3)), Split(7, 5, 18).layer_map()
    ('7x1+5x3+18x1', '0-6,7-11,12-29')
    """

    encoder: int
    thinking: int
    decoder: int

    def spec(self, loops: int = 2) -> LoopSpec:
        """``{e}x1+{t}x{loops}+{d}x1`` without the empty parts."""
        if not isinstance(loops, int) or loops < 1:
            raise UserError(f"--loops must be an integer >= 1, got {loops!r}")
        parts = [(self.encoder, 1), (self.thinking, loops), (self.decoder, 1)]
        return LoopSpec.parse("+".join(f"{size}x{count}" for size, count in parts if size))

    def layer_map(self) -> str:
        """The ``--layers`` text seeding each part of :meth:`spec` from its own source layers, in order."""
        ranges, start = [], 0
        for size in (self.encoder, self.thinking, self.decoder):
            if size:
                ranges.append(list(range(start, start + size)))
                start += size
        return format_layer_map(ranges)

    def part(self, layer: int) -> str:
        """``encoder``, ``thinking`` or ``decoder``: where source layer ``layer`` goes."""
        if layer < self.encoder:
            return "encoder"
        return "thinking" if layer < self.encoder + self.thinking else "decoder"


@dataclasses.dataclass(frozen=True)
class LayerAnalysis:
    """Per stored layer, in order: mean angular distance and block influence over ``tokens`` tokens.

    >>> LayerAnalysis((0.4, 0.0, 0.3), (0.6, 0.0, 0.4), tokens=512).split()
    Split(encoder=1, thinking=1, decoder=1)
    """

    angular_distance: tuple[float, ...]
    block_influence: tuple[float, ...]
    tokens: int

    def split(self, thinking_layers: int | None = None) -> Split:
        """:func:`propose_split` of the angular-distance curve."""
        return propose_split(self.angular_distance, thinking_layers)

    def to_json(self, loops: int = 2, thinking_layers: int | None = None) -> dict[str, Any]:
        """The curves, the split and the keep-all proposal (``spec``, ``layer_map``) for ``loops``."""
        split = self.split(thinking_layers)
        return {"tokens": self.tokens, "angular_distance": list(self.angular_distance),
                "block_influence": list(self.block_influence), "split": dataclasses.asdict(split),
                "loops": loops, "spec": str(split.spec(loops)), "layer_map": split.layer_map()}


def propose_split(curve: Sequence[float], thinking_layers: int | None = None) -> Split:
    """The ETD encoder / thinking / decoder split of an angular-distance ``curve`` (one value per layer).

    Rule (Kneedle on each side of the minimum): let m be the first layer with the smallest value. The
    *knee* of a segment is its interior point farthest below the chord joining the segment's end points
    (the first such point on ties; normalizing the segment to the unit square, as Kneedle does, scales
    every gap alike and so picks the same point); a segment with no interior point strictly below the
    chord has its knee at m. The encoder is the layers before the knee of ``curve[0..m]``, the decoder
    the layers after the knee of ``curve[m..N-1]``, and the thinking block everything from the first
    knee to the second (it always contains m, so it is never empty).

    ``thinking_layers=t`` narrows the thinking block to the t consecutive layers between the knees with the
    smallest mean angular distance (the first such window): the layers that turn the stream least are the
    closest to an iterable map, and a short block costs t extra layer applications per loop instead of the
    whole span (on SmolLM2 the knees span 25 of 30 layers).

    >>> propose_split([0.9, 0.3, 0.12, 0.1, 0.11, 0.1, 0.3, 0.7])
    Split(encoder=1, thinking=5, decoder=2)
    >>> propose_split([0.9, 0.3, 0.12, 0.1, 0.11, 0.1, 0.3, 0.7], thinking_layers=2)
    Split(encoder=3, thinking=2, decoder=3)
    """
    values = [float(v) for v in curve]
    if not values or not all(math.isfinite(v) for v in values):
        raise ValueError(f"angular-distance curve must be a non-empty list of finite numbers, got {list(curve)!r}")
    low = values.index(min(values))
    encoder = _knee(values[:low + 1])
    encoder = low if encoder is None else encoder
    decoder = _knee(values[low:])
    last_thinking = low + (0 if decoder is None else decoder)
    span = last_thinking - encoder + 1
    if thinking_layers is not None:
        if not isinstance(thinking_layers, int) or thinking_layers < 1:
            raise UserError(f"thinking_layers must be an integer >= 1, got {thinking_layers!r}")
        if thinking_layers < span:
            means = [sum(values[start:start + thinking_layers]) / thinking_layers
                     for start in range(encoder, last_thinking - thinking_layers + 2)]
            encoder += means.index(min(means))
            span = thinking_layers
    return Split(encoder, span, len(values) - encoder - span)


def _knee(segment: list[float]) -> int | None:
    """Index of the interior point farthest below the end-to-end chord (first on ties), or None."""
    last = len(segment) - 1
    gaps = [segment[0] + (segment[last] - segment[0]) * x / last - segment[x] for x in range(1, last)]
    best = max(gaps, default=0.0)
    return gaps.index(best) + 1 if best > 0 else None


def layer_analysis(model: nn.Module, batches: Iterable[torch.Tensor]) -> LayerAnalysis:
    """Run ``model`` (no grad, eval mode) over ``batches`` of token ids (B, T), none padded, and reduce
    each stored layer's input/output residual stream to its mean angular distance and block influence
    (fp32 per token, float64 sums). Every token counts: windows are cut, never padded.

    A tied looped source (a layer run several times per forward) is refused: its stored layers are not a
    plain stack; analyse its unrolled export (``loopreg export --unroll``) instead.

    >>> # layer_analysis(load(smollm2_gguf()), token_windows(model, ids)).split()
    """
    causal_lm = unwrap(model)
    layers = stored_layers(causal_lm)
    spec = looped_spec(causal_lm)
    if spec is not None and spec.effective_depth != len(layers):
        raise UserError(f"layer analysis needs a plain layer stack, but the source is looped ('{spec}': "
                         f"{len(layers)} stored layers run {spec.effective_depth} times); export it with "
                         "'loopreg export --unroll' and analyse that")
    device = next(causal_lm.parameters()).device
    sums = torch.zeros(len(layers), 2, dtype=torch.float64, device=device)  # [angle/π, 1 − cos] per layer
    handles = [layer.register_forward_hook(_accumulate(sums[index]), with_kwargs=True)
               for index, layer in enumerate(layers)]
    tokens, was_training = 0, causal_lm.training
    causal_lm.eval()  # dropout off: the analysis describes the model, not a training step
    try:
        with torch.no_grad():
            for ids in batches:
                ids = ids.to(device)
                causal_lm(input_ids=ids, use_cache=False)
                tokens += ids.numel()
    finally:
        for handle in handles:
            handle.remove()
        causal_lm.train(was_training)
    if tokens == 0:
        raise ValueError("layer analysis got no calibration tokens")
    means = (sums / tokens).tolist()
    return LayerAnalysis(tuple(m[0] for m in means), tuple(m[1] for m in means), tokens)


def _accumulate(into: torch.Tensor) -> Callable[..., None]:
    """A forward hook adding the layer's per-token sums of angle/π and 1 − cos to ``into`` (2,)."""
    def hook(module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
        # HF layers take the hidden state first or as `hidden_states` and return it (first in a tuple).
        h_in = args[0] if args else kwargs["hidden_states"]
        h_out = output[0] if isinstance(output, tuple) else output
        a = F.normalize(h_in.float(), dim=-1)
        b = F.normalize(h_out.float(), dim=-1)
        apart, together = (a - b).norm(dim=-1), (a + b).norm(dim=-1)
        # 2·atan2(|a−b|, |a+b|) is the angle between unit vectors, exact near 0 where arccos(cos) is not
        # (cos = 1 − 6e-8 in fp32 already gives 3e-4 rad); 1 − cos = |a − b|²/2 likewise.
        angle = 2 * torch.atan2(apart, together) / math.pi
        into.add_(torch.stack([angle.sum(dtype=torch.float64), apart.square().sum(dtype=torch.float64) / 2]))

    return hook


def calibration_tokens(source: str | Path, text: str | Path, tokens: int = DEFAULT_TOKENS) -> torch.Tensor:
    """The first ``tokens`` ids of the documents in ``text`` (any :func:`~loopreg.data.text.text_stream`
    source; JSONL rows give ``text``), tokenized by ``source``'s own tokenizer and joined by its EOS.
    Fewer tokens than requested raises a one-line :class:`~loopreg.errors.UserError` naming the file and both
    counts.

    >>> # calibration_tokens(smollm2_gguf(), "wiki_passages_train.jsonl", 32768).shape  ->  (32768,)
    """
    from loopreg.data.text import text_stream

    if not isinstance(tokens, int) or tokens < 1:
        raise UserError(f"--tokens must be an integer >= 1, got {tokens!r}")
    encode, eos = _source_encoder(source)
    ids: list[int] = []
    for document in text_stream(str(text))():
        ids += encode(document)
        if eos is not None:
            ids.append(eos)
        if len(ids) >= tokens:
            return torch.tensor(ids[:tokens], dtype=torch.long)
    raise UserError(f"{text}: calibration text has {len(ids)} tokens, fewer than the {tokens} requested (--tokens)")


def _source_encoder(source: str | Path) -> tuple[Callable[[str], list[int]], int | None]:
    """Text → ids (no special tokens) and the EOS id, from the tokenizer stored with ``source``."""
    from loopreg.surgery.sources import is_loopreg_folder, load_source_tokenizer

    path = Path(source)
    if not path.exists() and (path.suffix == ".gguf" or str(source).startswith((".", "/", "~"))):
        # the tokenizer is read before the model, so this one-line error comes first, not the hub's
        raise UserError(f"{source}: not found; expected a model folder, a .gguf file or a hub id")
    tokenizer = load_source_tokenizer(source)
    if tokenizer is None and is_loopreg_folder(path):
        raise UserError(f"{path / 'tokenizer.json'}: missing; layer analysis tokenizes with the source's own "
                                "tokenizer")
    if tokenizer is None:
        raise UserError(f"{source}: no tokenizer files; layer analysis tokenizes with the source's own "
                                "tokenizer")
    from tokenizers import Tokenizer

    if isinstance(tokenizer, Tokenizer):  # a loopreg folder's
        from loopreg.data.text import eos_id

        return (lambda text: tokenizer.encode(text, add_special_tokens=False).ids), eos_id(tokenizer)
    return (lambda text: tokenizer(text, add_special_tokens=False)["input_ids"]), tokenizer.eos_token_id


def token_windows(model: nn.Module, ids: torch.Tensor, batch_size: int = 8) -> list[torch.Tensor]:
    """``ids`` (N,) cut into windows of :data:`MAX_WINDOW` tokens (or the model's context if shorter),
    stacked ``batch_size`` at a time; a shorter last window is a batch of its own.

    >>> # [b.shape for b in token_windows(model, torch.arange(1100))]  ->  [(2, 512), (1, 76)]
    """
    causal_lm = unwrap(model)
    config = causal_lm.config
    context = getattr(config, "max_position_embeddings", None)
    window = min(MAX_WINDOW, context or MAX_WINDOW)
    full = len(ids) // window
    windows = ids[:full * window].view(full, window)
    batches = list(windows.split(batch_size)) if full else []  # split() of no rows gives one empty batch
    if len(ids) > full * window:
        batches.append(ids[full * window:][None])
    return batches
