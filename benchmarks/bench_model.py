"""Benchmarks for the foundation: looped vs unrolled training step, and KV-cached decoding.

    .venv/bin/python benchmarks/bench_model.py            # prints ratios measured side by side

1. Training step (forward + backward + AdamW) of tied (6⊗4) vs (24⊗1), d=512, equal batch: the time
   ratio (target ≤ 1.05), and distinct parameters / optimizer-state bytes (target 1/L = 0.25).
2. Greedy decoding of 256 new tokens with the KV cache vs full recomputation on a 12-effective-layer
   d=256 model (3⊗4): the speed-up (target ≥ 5x).

Runs alternate A and B and report the median of each, so machine noise hits both alike.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from loopreg import LoopedLM, LoopedLMConfig


def _median_time(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def bench_train_step(d_model: int, batch: int, seq: int, repeats: int) -> dict:
    def make(spec: str):
        torch.manual_seed(0)
        model = LoopedLM(LoopedLMConfig(spec=spec, vocab_size=512, d_model=d_model, n_heads=8, mlp="swiglu",
                                        d_ff=4 * d_model))
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
        ids = torch.randint(0, 512, (batch, seq))

        def step():
            loss = torch.nn.functional.cross_entropy(model(ids).logits.flatten(0, 1), ids.flatten())
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

        step()  # warm-up; also creates the optimizer state
        state_bytes = sum(t.numel() * t.element_size() for s in optimizer.state.values() for t in s.values()
                          if torch.is_tensor(t))
        return model, step, state_bytes

    looped, looped_step, looped_state = make("6x4")
    flat, flat_step, flat_state = make("24x1")
    looped_times, flat_times = [], []
    for _ in range(repeats):  # interleaved A/B
        looped_times.append(_median_time(looped_step, 1))
        flat_times.append(_median_time(flat_step, 1))
    layer_params = lambda m: sum(p.numel() for p in m.layers.parameters())  # noqa: E731
    return {
        "step_s_looped_6x4": statistics.median(looped_times),
        "step_s_flat_24x1": statistics.median(flat_times),
        "step_time_ratio": statistics.median(looped_times) / statistics.median(flat_times),
        "layer_param_ratio": layer_params(looped) / layer_params(flat),
        "optimizer_state_ratio": looped_state / flat_state,
    }


def bench_decoding(new_tokens: int, repeats: int) -> dict:
    torch.manual_seed(0)
    model = LoopedLM(LoopedLMConfig(spec="3x4", vocab_size=512, d_model=256, n_heads=8)).eval()
    prompt = torch.randint(0, 512, (1, 16))
    greedy = lambda use_cache: model.generate(prompt, max_new_tokens=new_tokens, min_new_tokens=new_tokens,  # noqa: E731
                                              do_sample=False, use_cache=use_cache)
    cached_times, uncached_times = [], []
    for _ in range(repeats):
        cached_times.append(_median_time(lambda: greedy(True), 1))
        uncached_times.append(_median_time(lambda: greedy(False), 1))
    same = torch.equal(greedy(True), greedy(False))
    return {
        "decode_s_cached": statistics.median(cached_times),
        "decode_s_uncached": statistics.median(uncached_times),
        "cache_speedup": statistics.median(uncached_times) / statistics.median(cached_times),
        "identical_tokens": same,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=128)
    args = parser.parse_args()
    torch.set_num_threads(torch.get_num_threads())
    train = bench_train_step(512, args.batch, args.seq, args.repeats)
    print(f"train step  (6⊗4) {train['step_s_looped_6x4']:.3f}s  (24⊗1) {train['step_s_flat_24x1']:.3f}s  "
          f"ratio {train['step_time_ratio']:.3f} (target <= 1.05)")
    print(f"distinct layer params ratio {train['layer_param_ratio']:.3f}  optimizer state ratio "
          f"{train['optimizer_state_ratio']:.3f} (target 1/L = 0.25 for layers; embeddings are shared by both)")
    decode = bench_decoding(256, max(3, args.repeats // 2))
    print(f"decode 256 tokens (3⊗4, d=256): cached {decode['decode_s_cached']:.2f}s  uncached "
          f"{decode['decode_s_uncached']:.2f}s  speed-up {decode['cache_speedup']:.1f}x (target >= 5x)  "
          f"identical tokens: {decode['identical_tokens']}")


if __name__ == "__main__":
    main()
