"""The tiny random-init model of every supported family, in one table the surgery, loop-override, remote-code,
consumer and adaptive-exit tests share (each picks the families it needs). Hidden size 32, 6 layers; the families
with sliding windows (Qwen2, Mistral, Gemma 3) have windows of 4, shorter than the test prompts, and Gemma 3
alternates sliding and global layers, so every looped block of two or more layers holds both kinds."""

from __future__ import annotations

from typing import Callable

from torch import nn
from transformers import (Gemma3ForCausalLM, Gemma3TextConfig, GPT2Config, GPT2LMHeadModel, GPTNeoXConfig,
                          GPTNeoXForCausalLM, LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM,
                          Olmo2Config, Olmo2ForCausalLM, Qwen2Config, Qwen2ForCausalLM, Qwen3Config, Qwen3ForCausalLM)

from loopreg.model import LoopedLM, LoopedLMConfig

__all__ = ["VOCAB", "LAYERS", "TOKENS", "LLAMA_LIKE", "BUILDERS", "HF_FAMILIES", "NEW_FAMILIES"]

VOCAB, LAYERS = 96, 6
TOKENS = dict(vocab_size=VOCAB, bos_token_id=1, eos_token_id=2, pad_token_id=0)
LLAMA_LIKE = dict(num_hidden_layers=LAYERS, hidden_size=32, intermediate_size=64, num_attention_heads=4,
                  num_key_value_heads=2, **TOKENS)
GEMMA3_KINDS = ["sliding_attention", "full_attention"] * (LAYERS // 2)

BUILDERS: dict[str, Callable[[], nn.Module]] = {
    "llama": lambda: LlamaForCausalLM(LlamaConfig(**LLAMA_LIKE)),
    "gpt2": lambda: GPT2LMHeadModel(GPT2Config(n_layer=LAYERS, n_embd=32, n_head=4, n_positions=64, **TOKENS)),
    "qwen2": lambda: Qwen2ForCausalLM(Qwen2Config(**LLAMA_LIKE, use_sliding_window=True, sliding_window=4,
                                                  max_window_layers=3)),
    "mistral": lambda: MistralForCausalLM(MistralConfig(**LLAMA_LIKE, sliding_window=4)),
    "gpt_neox": lambda: GPTNeoXForCausalLM(GPTNeoXConfig(num_hidden_layers=LAYERS, hidden_size=32, intermediate_size=64,
                                                         num_attention_heads=4, **TOKENS)),
    "qwen3": lambda: Qwen3ForCausalLM(Qwen3Config(**LLAMA_LIKE, head_dim=8)),
    "olmo2": lambda: Olmo2ForCausalLM(Olmo2Config(**LLAMA_LIKE)),
    # local and global RoPE keep their different defaults (base 10k and 1M)
    "gemma3": lambda: Gemma3ForCausalLM(Gemma3TextConfig(**LLAMA_LIKE, head_dim=8, query_pre_attn_scalar=8,
                                                         sliding_window=4, layer_types=GEMMA3_KINDS)),
    "loopreg": lambda: LoopedLM(LoopedLMConfig(spec=f"{LAYERS}x1", vocab_size=VOCAB, d_model=32, n_heads=4,
                                               n_kv_heads=2)),
}
HF_FAMILIES = [family for family in BUILDERS if family != "loopreg"]  # the ones loop surgery retrofits
NEW_FAMILIES = ["qwen3", "olmo2", "gemma3"]  # q/k norms, post-norms, interleaved sliding/global layers
