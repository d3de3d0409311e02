"""The one-model refactor against the code before it, side by side in one run: training step, cached decoding (also
against a plain Hugging Face Llama of the same unrolled size), adaptive-exit decoding and the eval harness (on a
tiny model, where per-step overhead shows, and on a d=512 one).

    git worktree add /tmp/loopreg-before 455b2a2        # the commit before the refactor
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_one_model.py --before /tmp/loopreg-before --rounds 7

Each measurement runs in a fresh worker process of this venv that imports loopreg from one tree (``--before`` or
this checkout); each round runs both, back to back in alternating order, and the ratio is the median of the rounds'
before-time / after-time (paired, so a slow spell of the machine hits one pair, not one side): ≥ 1 means the
refactored code is as fast or faster (target ≥ 0.97). ``decode_hf_llama`` runs the same code on both sides: its
ratio is the noise of the run.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MEASURES = ("train_step", "decode", "decode_hf_llama", "exit_decode", "eval", "eval_large")


def _timed(fn, repeats: int) -> float:
    from bench_model import _median_time  # this script's folder is on the path, whichever tree it imports

    fn()  # warm-up
    return _median_time(fn, repeats)


def _greedy(model, ids, new: int, **options):
    """Greedy cached decoding through whichever generate the tree has: LoopedLM's own sampler (before) or
    transformers' (after)."""
    if hasattr(model, "new_cache"):  # the LoopedLM before the refactor
        return model.generate(ids, new, **options)
    return model.generate(ids, max_new_tokens=new, min_new_tokens=new, do_sample=False, pad_token_id=0, **options)


def worker(measure: str, repeats: int) -> float:
    """Median seconds of one measurement, with loopreg imported from ``sys.path`` (the tree under test)."""
    import torch

    from loopreg.model import LoopedLM, LoopedLMConfig

    torch.manual_seed(0)
    if measure == "train_step":
        model = LoopedLM(LoopedLMConfig(spec="6x4", vocab_size=512, d_model=256, n_heads=8))
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
        ids = torch.randint(0, 512, (8, 128))

        def step() -> None:
            out = model(ids)
            logits = getattr(out, "logits", out)
            torch.nn.functional.cross_entropy(logits.flatten(0, 1), ids.flatten()).backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        return _timed(step, repeats)
    if measure in ("decode", "decode_hf_llama"):
        prompt = torch.randint(0, 512, (1, 16))
        if measure == "decode":
            model = LoopedLM(LoopedLMConfig(spec="3x4", vocab_size=512, d_model=256, n_heads=8)).eval()
        else:  # the same 12 layer applications as plain transformers layers
            from transformers import LlamaConfig, LlamaForCausalLM

            model = LlamaForCausalLM(LlamaConfig(vocab_size=512, hidden_size=256, intermediate_size=1024,
                                                 num_hidden_layers=12, num_attention_heads=8)).eval()
        with torch.no_grad():
            return _timed(lambda: _greedy(model, prompt, 128), repeats)
    if measure == "exit_decode":
        from loopreg.adaptive import ExitStats

        model = LoopedLM(LoopedLMConfig(spec="1x1+2x8+1x1", vocab_size=512, d_model=256, n_heads=8)).eval()
        ids = torch.randint(0, 512, (8, 64))
        with torch.no_grad():
            return _timed(lambda: _greedy(model, ids, 64, exit="kl:1e-2", exit_stats=ExitStats()), repeats)
    if measure in ("eval", "eval_large"):  # a 2x3 d=128 model (a 10 ms decode step) or 2x6 d=512 (about 80 ms)
        import tempfile

        from loopreg.data.text import byte_level_tokenizer

        folder = Path(tempfile.mkdtemp()) / "model"
        spec, width, heads = ("2x3", 128, 4) if measure == "eval" else ("2x6", 512, 8)
        model = LoopedLM(LoopedLMConfig(spec=spec, vocab_size=byte_level_tokenizer().get_vocab_size(), d_model=width,
                                        n_heads=heads, init_std=0.3))
        model.save_pretrained(folder)
        byte_level_tokenizer().save(str(folder / "tokenizer.json"))
        prompts = [f"q{index}: {index} + {index * 3} = " for index in range(64)]
        try:  # the harness before #23
            from loopreg.evals.models import load_generator
        except ImportError:  # since #23: lm-eval's generate_until on the loopreg model
            from lm_eval.api.instance import Instance

            from loopreg.evals.lm_eval_model import LoopregLM

            lm = LoopregLM(str(folder), device="cpu", batch_size=64)  # one batch, as the harness ran it
            requests = [Instance("generate_until", {}, (prompt, {"until": ["\n\n\n"], "max_gen_toks": 32}), index)
                        for index, prompt in enumerate(prompts)]
            return _timed(lambda: lm.generate_until(requests, disable_tqdm=True), repeats)
        generator, _ = load_generator(folder)
        return _timed(lambda: generator.generate(prompts, 32, ["\n\n\n"]), repeats)
    raise ValueError(f"unknown measure {measure!r}")


def run_worker(tree: Path, measure: str, repeats: int) -> float:
    env = {**os.environ, "PYTHONPATH": str(tree)}
    out = subprocess.run([sys.executable, __file__, "--worker", measure, "--repeats", str(repeats)], env=env,
                         capture_output=True, text=True, cwd=tree)
    if out.returncode != 0:
        raise SystemExit(f"{measure} in {tree} failed:\n{out.stderr[-3000:]}")
    return float(out.stdout.strip().splitlines()[-1])


def link_packages(tree: Path) -> None:
    """loopreg.evals and loopreg.callbacks live at a tree's root (installed into the package by pyproject's
    package-dir): link them inside its loopreg/ so that tree imports its own copies."""
    for name in ("evals", "callbacks"):
        link = tree / "loopreg" / name
        if not link.exists():
            link.symlink_to(tree / name, target_is_directory=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--before", type=Path, help="a checkout of the code before the refactor (git worktree)")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--only", default=",".join(MEASURES))
    parser.add_argument("--worker", choices=MEASURES, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(worker(args.worker, args.repeats))
        return
    if args.before is None:
        parser.error("--before DIR is required (a checkout of the code before the refactor)")
    link_packages(args.before)
    results = {}
    for measure in args.only.split(","):
        times: dict[str, list[float]] = {"before": [], "after": []}
        for round_ in range(args.rounds):  # paired rounds, the order alternating: a slow spell hits one pair
            order = ("before", "after") if round_ % 2 == 0 else ("after", "before")
            for side in order:
                times[side].append(run_worker(args.before.resolve() if side == "before" else ROOT, measure,
                                              args.repeats))
        before, after = statistics.median(times["before"]), statistics.median(times["after"])
        ratio = statistics.median(b / a for b, a in zip(times["before"], times["after"]))
        results[measure] = {"before_s": round(before, 4), "after_s": round(after, 4), "ratio": round(ratio, 3),
                            "round_ratios": [round(b / a, 3) for b, a in zip(times["before"], times["after"])]}
        print(f"{measure:16s} before {before:.4f}s  after {after:.4f}s  ratio (median of paired before/after) "
              f"{ratio:.3f}", flush=True)
    print(json.dumps(results))


if __name__ == "__main__":
    main()
