"""The teacher's share of a healing-by-distillation step: SmolLM2-135M-Instruct keep-all retrofit.

One process, one model: the offline GGUF (30 layers) is loaded once, the teacher is a frozen copy of it,
and the student is its tied keep-all retrofit ``7x1+5x2+18x1`` (35 layer applications). The same training
step (forward, loss, backward, AdamW) runs alternately with the KD loss (teacher forward under
``no_grad`` + :func:`~loopreg.algorithms.distillation_loss`, as ``SourceDistillation`` does) and with the
plain cross entropy (no teacher), on the same batches of wiki text, and the medians are compared.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_kd.py --steps 3
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
from pathlib import Path

import torch

from loopreg.algorithms import distillation_loss
from loopreg.data.text import PackedText, text_stream
from loopreg.loading import load
from loopreg.surgery import loop_surgery, smollm2_gguf
from loopreg.surgery.sources import load_source_tokenizer

TEXT = Path(__file__).resolve().parents[2] / "shared" / "textdata" / "wiki_passages_train.jsonl"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=3, help="timed steps of each kind (after one warm-up each)")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--spec", default="7x1+5x2+18x1")
    parser.add_argument("--layers", default="0-6,7-11,12-29")
    args = parser.parse_args()

    gguf = smollm2_gguf()
    started = time.perf_counter()
    source = load(gguf)
    print(f"loaded {gguf.name} in {time.perf_counter() - started:.1f} s; threads {torch.get_num_threads()}")
    teacher = copy.deepcopy(source).requires_grad_(False).eval()
    student = loop_surgery(source, args.spec, layers=args.layers).train()
    optimizer = torch.optim.AdamW(student.parameters(), lr=2e-5)
    text = PackedText(text_stream(str(TEXT)), load_source_tokenizer(gguf), args.seq_len, model_shifts_labels=True)
    stream = iter(torch.utils.data.DataLoader(text, batch_size=args.batch))

    def step(distill: bool) -> tuple[float, float]:
        """Seconds for one training step, and for its teacher forward (0 without KD)."""
        batch = next(stream)
        begin = time.perf_counter()
        output = student(input_ids=batch["input_ids"], labels=batch["labels"])
        teacher_seconds = 0.0
        if distill:
            teacher_begin = time.perf_counter()
            with torch.no_grad():
                teacher_logits = teacher(input_ids=batch["input_ids"]).logits
            teacher_seconds = time.perf_counter() - teacher_begin
            loss = distillation_loss(output.logits, teacher_logits, batch["labels"], temperature=2.0, ce_weight=0.1,
                                     shift_labels=True)["total"]
        else:
            loss = output.loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return time.perf_counter() - begin, teacher_seconds

    step(True), step(False)  # warm-up: allocator, first-call overheads
    kd, ce, teacher_only = [], [], []
    for _ in range(args.steps):  # interleaved, so machine load drifts hit both alike
        seconds, teacher_seconds = step(True)
        kd.append(seconds)
        teacher_only.append(teacher_seconds)
        ce.append(step(False)[0])
    kd_median, ce_median = statistics.median(kd), statistics.median(ce)
    print(f"student {args.spec} ({student.config.num_hidden_layers} applications), batch {args.batch}x{args.seq_len}, "
          f"{args.steps} steps each")
    print(f"KD step (teacher forward + KL):  median {kd_median:.2f} s   {[round(x, 2) for x in kd]}")
    print(f"plain CE step (no teacher):     median {ce_median:.2f} s   {[round(x, 2) for x in ce]}")
    print(f"teacher forward alone:          median {statistics.median(teacher_only):.2f} s")
    print(f"KD / CE step time ratio: {kd_median / ce_median:.3f}; teacher's share of the KD step: "
          f"{1 - ce_median / kd_median:.1%} (forward alone: {statistics.median(teacher_only) / kd_median:.1%})")


if __name__ == "__main__":
    main()
