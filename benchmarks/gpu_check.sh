#!/usr/bin/env bash
# One-GPU check of the paper-scale Pile recipes on MDS data (issue #15), one command, <= 8 minutes on one H200:
# base_24x1, loop_12x2 and reg_loop_12x2 at paper width (d 2048, 32 heads, FFN 5120) and sequence length 1280,
# STEPS steps each, with FSDP FULL_SHARD, bf16, activation checkpointing and model.init_device=meta, each launched
# as `composer -n 1 recipes/X.yaml train_data.source=... max_duration=20ba ...` on local MDS shards of the shared
# Wikipedia passages. Prints per recipe: step time, tokens/s and MFU (SpeedMonitor), peak memory (MemoryMonitor),
# first and final loss; the step-time ratios (the regularizer's: reg_loop_12x2 / base_24x1, both 24 untied layers;
# looping's: loop_12x2 / base_24x1); and whether bf16 cached generation matches uncached (fp32 as the control).
#
#   benchmarks/gpu_check.sh               # prepare the data, validate every recipe + override, train, summarize
#   benchmarks/gpu_check.sh --dry-run     # no GPU needed: prepare the data and validate; nothing is trained
#   benchmarks/gpu_check.sh --cpu-smoke   # no GPU needed: the same launches and summary with a 64-wide model on
#                                         # the CPU for 3 steps (no FSDP, fp32): checks the launch/parse path
#
# The data: `loopreg data prepare` of ../shared/textdata/wiki_passages_train.jsonl at 1280 tokens, with the GPT-NeoX
# tokenizer when its tokenizer.json is in the local Hugging Face cache (used as tokenizer.kind=file, offline), else
# byte_level (the recipes' tokenizer is then overridden to match; model.vocab_size stays 50304). It says which.
# The validation loads every recipe with exactly the overrides the run gets (loopreg.config.load_recipe), checks the
# settings above took effect, builds every callback, logger and algorithm with its arguments, builds the mds loader
# and draws one batch (which checks the shards' tokenizer and seq_len against the recipe).
# On one GPU PyTorch runs FSDP FULL_SHARD as NO_SHARD (its own warning says so): meta init, bf16 mixed precision and
# activation checkpointing are exercised as on N GPUs; sharding itself is not.
#
# Environment: PYTHON (default .venv/bin/python), WORK (scratch, default /tmp/loopreg_gpu_check; prepared data is
# reused), OUT (where gpu_check_summary.{json,md} go; default WORK), STEPS (20), GLOBAL_BATCH (64), MICROBATCH (16),
# RUN_TIMEOUT (seconds per training run, 130), TEXTDATA (../shared/textdata), PREPARE_WORKERS (min(nproc, 8)).
set -euo pipefail
cd "$(dirname "$0")/.."

MODE=gpu
case "${1:-}" in
  "") ;;
  --dry-run) MODE=dry ;;
  --cpu-smoke) MODE=smoke ;;
  -h|--help) sed -n '2,28p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
  *) echo "error: unknown argument '$1' (usage: benchmarks/gpu_check.sh [--dry-run | --cpu-smoke])" >&2; exit 2 ;;
esac

PY=${PYTHON:-.venv/bin/python}
if [ ! -x "$PY" ]; then PY=$(command -v python3); fi
WORK=${WORK:-/tmp/loopreg_gpu_check}
SUMMARY=${OUT:-$WORK}
STEPS=${STEPS:-20}
GLOBAL_BATCH=${GLOBAL_BATCH:-64}
MICROBATCH=${MICROBATCH:-16}
RUN_TIMEOUT=${RUN_TIMEOUT:-130}
TEXTDATA=${TEXTDATA:-../shared/textdata}
CORES=$(nproc)
PREPARE_WORKERS=${PREPARE_WORKERS:-$(( CORES < 8 ? CORES : 8 ))}
RECIPES=(base_24x1 loop_12x2 reg_loop_12x2)
mkdir -p "$WORK/logs" "$SUMMARY"
BEGIN=$SECONDS
say() { printf '[gpu_check %4ss] %s\n' "$(( SECONDS - BEGIN ))" "$*"; }

if [ "$MODE" = gpu ] && ! "$PY" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)'; then
  echo "error: no CUDA device visible; run with --dry-run or --cpu-smoke on a machine without a GPU" >&2
  exit 2
fi

# --- 1. the tokenizer: GPT-NeoX from the local HF cache, else byte_level ---------------------------------------
NEOX=$(HF_HUB_OFFLINE=1 timeout 60 "$PY" -c 'from huggingface_hub import hf_hub_download
print(hf_hub_download("EleutherAI/gpt-neox-20b", "tokenizer.json", local_files_only=True))' 2>/dev/null || true)
if [ -n "$NEOX" ] && [ -f "$NEOX" ]; then
  TOKENIZER="file:$NEOX"; TOKENIZER_ARGS=(tokenizer.kind=file "tokenizer.name=$NEOX"); DATA_NAME=neox_1280
  TOKENIZER_LABEL=gpt-neox-20b
  say "tokenizer: GPT-NeoX (EleutherAI/gpt-neox-20b, local HF cache: $NEOX)"
else
  TOKENIZER=byte_level; TOKENIZER_ARGS=(tokenizer.kind=byte_level tokenizer.name=null); DATA_NAME=byte_1280
  TOKENIZER_LABEL=byte_level
  say "tokenizer: byte_level (GPT-NeoX's tokenizer.json is not in the local Hugging Face cache)"
fi

# --- 2. a small MDS set --------------------------------------------------------------------------------------
DATA="$WORK/mds/$DATA_NAME/train"
if [ -f "$DATA/loopreg_mds.json" ]; then
  say "data: reusing $DATA"
else
  rm -rf "$DATA"
  say "data: loopreg data prepare $TEXTDATA/wiki_passages_train.jsonl -> $DATA ($PREPARE_WORKERS workers)"
  "$PY" -m loopreg.cli data prepare "$TEXTDATA/wiki_passages_train.jsonl" --tokenizer "$TOKENIZER" --seq-len 1280 \
    --out "$DATA" --workers "$PREPARE_WORKERS" --quiet
fi

# --- 3. the overrides of each run ----------------------------------------------------------------------------
COMMON=("train_data.source=$DATA" eval_data=null max_seq_len=1280 "max_duration=${STEPS}ba"
        "global_train_batch_size=$GLOBAL_BATCH" "device_train_microbatch_size=$MICROBATCH" scheduler.t_warmup=5ba
        save_folder=null autoresume=false export_folder=null progress_bar=false log_to_console=true
        console_log_interval=5ba callbacks.speed_monitor.window_size=5 callbacks.runtime_estimator=null
        "${TOKENIZER_ARGS[@]}")
if [ "$MODE" = smoke ]; then
  MODE_ARGS=(device=cpu precision=fp32 model.init_device=cpu fsdp_config=null model.d_model=64 model.n_heads=4
             model.d_ff=128 max_duration=3ba global_train_batch_size=4 device_train_microbatch_size=2
             callbacks.speed_monitor.window_size=1 train_data.num_workers=0)
  if [ "$TOKENIZER" = byte_level ]; then MODE_ARGS+=(model.vocab_size=257); fi
else
  MODE_ARGS=(device=gpu precision=amp_bf16 model.init_device=meta fsdp_config.sharding_strategy=FULL_SHARD
             fsdp_config.mixed_precision=DEFAULT fsdp_config.activation_checkpointing=true)
fi
run_args() {  # the overrides of recipe $1, one per line
  printf '%s\n' "${COMMON[@]}" "${MODE_ARGS[@]}" "run_name=gpu_check_$1" \
    "loggers.file.filename=$WORK/logs/$1.metrics.txt" loggers.file.flush_interval=1 loggers.file.overwrite=true \
    loggers.file.capture_stdout=false loggers.file.capture_stderr=false
}

# --- 4. validate: every recipe with exactly its run's overrides, on the CPU ------------------------------------
VALIDATE=()
for name in "${RECIPES[@]}"; do
  VALIDATE+=("@recipe=$name")
  mapfile -t args < <(run_args "$name")
  VALIDATE+=("${args[@]}")
done
say "validate: ${RECIPES[*]} ($MODE overrides)"
MODE=$MODE STEPS=$STEPS GLOBAL_BATCH=$GLOBAL_BATCH MICROBATCH=$MICROBATCH OMP_NUM_THREADS=1 \
  "$PY" - "${VALIDATE[@]}" <<'PY'
import os
import sys

import torch

from loopreg.composer_model import ComposerLoopedLM
from loopreg.config import check_kwargs, load_recipe, model_config
from loopreg.errors import UserError
from loopreg.registry import ALGORITHMS, CALLBACKS, LOGGERS
from loopreg.train import build_dataloaders

mode, steps, batch = os.environ["MODE"], int(os.environ["STEPS"]), int(os.environ["GLOBAL_BATCH"])
runs, name = {}, None
for arg in sys.argv[1:]:
    if arg.startswith("@recipe="):
        name = arg.removeprefix("@recipe=")
        runs[name] = []
    else:
        runs[name].append(arg)
expected = {"base_24x1": ("24x1", True, False), "loop_12x2": ("12x2", True, False),
            "reg_loop_12x2": ("12x2", False, True)}
problems = []


def want(name, what, actual, value):
    if actual != value:
        problems.append(f"{name}: {what} is {actual!r}, expected {value!r}")


def validate(name, overrides):
    recipe = load_recipe(f"recipes/{name}.yaml", overrides)
    spec, tied, regularized = expected[name]
    want(name, "model.spec", recipe.model.spec, spec)
    want(name, "model.tied", recipe.model.tied, tied)
    want(name, "algorithms.loop_regularizer set", "loop_regularizer" in recipe.algorithms, regularized)
    want(name, "max_seq_len", recipe.max_seq_len, 1280)
    want(name, "train_data.kind", recipe.train_data.kind, "mds")
    want(name, "eval_data", recipe.eval_data, None)
    want(name, "save_folder", recipe.save_folder, None)
    want(name, "export_folder", recipe.export_folder, None)
    for callback in ("speed_monitor", "memory_monitor"):
        want(name, f"callbacks.{callback} set", callback in recipe.callbacks, True)
    if mode != "smoke":
        want(name, "max_duration", recipe.max_duration, f"{steps}ba")
        want(name, "global_train_batch_size", recipe.global_train_batch_size, batch)
        want(name, "(d_model, n_heads, d_ff)", (recipe.model.d_model, recipe.model.n_heads, recipe.model.d_ff),
             (2048, 32, 5120))
        want(name, "device", recipe.device, "gpu")
        want(name, "precision", recipe.precision, "amp_bf16")
        want(name, "model.init_device", recipe.model.init_device, "meta")
        fsdp = recipe.fsdp_config or {}
        want(name, "fsdp_config.sharding_strategy", fsdp.get("sharding_strategy"), "FULL_SHARD")
        want(name, "fsdp_config.activation_checkpointing", fsdp.get("activation_checkpointing"), True)
        want(name, "fsdp_config.mixed_precision", fsdp.get("mixed_precision"), "DEFAULT")
    for registry, section in ((CALLBACKS, "callbacks"), (LOGGERS, "loggers"), (ALGORITHMS, "algorithms")):
        for key, kwargs in getattr(recipe, section).items():
            factory = registry.lookup(key, f"{section}.{key}")
            check_kwargs(factory, dict(kwargs or {}), f"{section}.{key}")
            if section != "loggers":  # a FileLogger opens nothing until the run starts, but keep this side-effect free
                factory(**dict(kwargs or {}))
    recipe.train_data.num_workers = 0  # one batch in this process: the shards fit the recipe (tokenizer, seq_len)
    data = build_dataloaders(recipe, world_size=1, rank=0)
    sample = next(iter(data.train))
    want(name, "batch input_ids shape", tuple(sample["input_ids"].shape), (recipe.global_train_batch_size, 1280))
    if int(sample["input_ids"].max()) >= recipe.model.vocab_size:
        problems.append(f"{name}: token id {int(sample['input_ids'].max())} >= model.vocab_size")
    del data, sample
    with torch.device("meta"):
        model = ComposerLoopedLM(model_config(recipe.model))
    params = sum(p.numel() for p in model.parameters())
    flops = model.flops_per_batch({"input_ids": torch.zeros(1, 1280, dtype=torch.long)}) / 1280
    print(f"  checked {name}: spec {recipe.model.spec} tied={recipe.model.tied}, {params / 1e6:,.0f}M params, "
          f"{flops:.3e} train FLOPs/token, {len(overrides)} overrides")


for name, overrides in runs.items():
    try:
        validate(name, overrides)
    except UserError as err:  # a bad override or data that does not fit the recipe: one line, as the run would say
        problems.append(f"{name}: {err}")
if problems:
    print("error: the overrides do not give the runs this check means to make:\n  " + "\n  ".join(problems),
          file=sys.stderr)
    sys.exit(2)
PY
if [ "$MODE" = dry ]; then
  say "dry run: data prepared and every recipe + override validated; nothing trained"
  for name in "${RECIPES[@]}"; do
    mapfile -t args < <(run_args "$name")
    printf '  would run: %s -m composer.cli.launcher -n 1 recipes/%s.yaml' "$PY" "$name"; printf ' %q' "${args[@]}"
    echo
  done
  exit 0
fi

# --- 5. train each recipe for STEPS steps ----------------------------------------------------------------------
: > "$WORK/logs/status.txt"
for name in "${RECIPES[@]}"; do
  mapfile -t args < <(run_args "$name")
  rm -f "$WORK/logs/$name.metrics.txt"
  say "train: composer -n 1 recipes/$name.yaml (${#args[@]} overrides; console: $WORK/logs/$name.console.txt)"
  start=$SECONDS
  set +e
  timeout --kill-after=15 "$RUN_TIMEOUT" "$PY" -m composer.cli.launcher -n 1 "recipes/$name.yaml" "${args[@]}" \
    > "$WORK/logs/$name.console.txt" 2>&1
  status=$?
  set -e
  echo "$name $status $(( SECONDS - start ))" >> "$WORK/logs/status.txt"
  say "  $name: exit $status after $(( SECONDS - start )) s"
  if [ "$status" != 0 ]; then tail -n 15 "$WORK/logs/$name.console.txt" | sed 's/^/    /'; fi
done

# --- 6. bf16 cached vs uncached generation (GPU only) ------------------------------------------------------------
if [ "$MODE" = gpu ]; then
  say "generation: loop_12x2 at paper width, random init, cached vs uncached greedy decoding"
  "$PY" - > "$WORK/logs/generation.json" <<'PY' || echo '{"error": "the generation check failed"}' > "$WORK/logs/generation.json"
import json

import torch

from loopreg.config import load_recipe, model_config
from loopreg.model import LoopedLM

recipe = load_recipe("recipes/loop_12x2.yaml")
torch.manual_seed(0)
with torch.device("cuda"):
    model = LoopedLM(model_config(recipe.model)).eval()
prompts = torch.randint(0, 50000, (4, 64), device="cuda")
result = {"prompts": 4, "prompt_tokens": 64, "new_tokens": 32}
with torch.no_grad():
    for dtype in (torch.bfloat16, torch.float32):
        model.to(dtype)
        cached, uncached = model.generate(prompts, 32), model.generate(prompts, 32, use_cache=False)
        same = (cached == uncached).all(dim=1)
        differs = (cached != uncached).any(dim=0).nonzero()
        result[str(dtype).removeprefix("torch.")] = {
            "identical_rows": int(same.sum()), "first_difference": int(differs[0]) if len(differs) else None}
print(json.dumps(result))
PY
fi

# --- 7. the summary --------------------------------------------------------------------------------------------
if [ "$MODE" = smoke ]; then STEPS=3 GLOBAL_BATCH=4 MICROBATCH=2; fi  # what MODE_ARGS set
WORK=$WORK SUMMARY=$SUMMARY MODE=$MODE TOKENIZER=$TOKENIZER_LABEL STEPS=$STEPS GLOBAL_BATCH=$GLOBAL_BATCH \
  MICROBATCH=$MICROBATCH ELAPSED=$(( SECONDS - BEGIN )) "$PY" - "${RECIPES[@]}" <<'PY'
import json
import os
import re
import sys
from datetime import datetime, timezone
from pathlib import Path

work, summary_dir = Path(os.environ["WORK"]), Path(os.environ["SUMMARY"])
line = re.compile(r"^\[metric\]\[batch=(\d+)\]: (\S+): (\S+)")
status = {name: (int(code), int(wall)) for name, code, wall in
          (row.split() for row in (work / "logs" / "status.txt").read_text().splitlines() if row.strip())}


def metrics(name: str) -> dict:
    last, first_loss = {}, None
    path = work / "logs" / f"{name}.metrics.txt"
    for text in (path.read_text().splitlines() if path.is_file() else []):
        match = line.match(text)
        if match:
            batch, key, value = int(match[1]), match[2], match[3]
            try:
                value = float(value)
            except ValueError:
                continue
            last[key] = (batch, value)
            if key == "loss/train/total" and first_loss is None:
                first_loss = value
    value = lambda key: last.get(key, (None, None))[1]  # noqa: E731
    batches_per_s = value("throughput/batches_per_sec")
    return {"exit": status.get(name, (None, None))[0], "wall_s": status.get(name, (None, None))[1],
            "steps": max((b for b, _ in last.values()), default=0),
            "step_s": 1 / batches_per_s if batches_per_s else None,
            "tokens_per_s": value("throughput/device/tokens_per_sec"), "mfu": value("throughput/device/mfu"),
            "peak_allocated_gb": value("memory/peak_allocated_mem"),
            "peak_reserved_gb": value("memory/peak_reserved_mem"),
            "first_loss": first_loss, "final_loss": value("loss/train/total"), "final_ce": value("loss/train/ce")}


runs = {name: metrics(name) for name in sys.argv[1:]}
generation_file = work / "logs" / "generation.json"
generation = json.loads(generation_file.read_text()) if generation_file.is_file() else None


def ratio(a: str, b: str):
    x, y = runs.get(a, {}).get("step_s"), runs.get(b, {}).get("step_s")
    return x / y if x and y else None


ratios = {"regularizer reg_loop_12x2 / base_24x1": ratio("reg_loop_12x2", "base_24x1"),
          "looping loop_12x2 / base_24x1": ratio("loop_12x2", "base_24x1")}
fmt = lambda v, spec: "—" if v is None else format(v, spec)  # noqa: E731
when = f"{datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC"
env = os.environ
rows = [f"gpu_check ({env['MODE']}) {when}: {env['STEPS']} steps, global batch {env['GLOBAL_BATCH']} x 1280, "
        f"microbatch {env['MICROBATCH']}, tokenizer {env['TOKENIZER']}, "
        f"{env['ELAPSED']} s before this summary",
        "",
        "| recipe | exit | wall s | steps | step s | tokens/s | MFU | peak alloc GB | first loss | final loss | final CE |",
        "|---|---|---|---|---|---|---|---|---|---|---|"]
for name, r in runs.items():
    rows.append(f"| {name} | {r['exit']} | {r['wall_s']} | {r['steps']} | {fmt(r['step_s'], '.3f')} | "
                f"{fmt(r['tokens_per_s'], ',.0f')} | {fmt(r['mfu'], '.3f')} | {fmt(r['peak_allocated_gb'], '.1f')} | "
                f"{fmt(r['first_loss'], '.3f')} | {fmt(r['final_loss'], '.3f')} | "
                f"{fmt(r['final_ce'] if r['final_ce'] is not None else r['final_loss'], '.3f')} |")
rows.append("")
rows += [f"step-time ratio, {label}: {fmt(value, '.3f')}" for label, value in ratios.items()]
if generation is not None:
    rows.append(f"generation (loop_12x2, random init, {generation.get('prompts')} prompts x "
                f"{generation.get('new_tokens')} greedy tokens), cached == uncached rows: "
                + ", ".join(f"{dtype} {g['identical_rows']}/{generation['prompts']}"
                            + ("" if g["first_difference"] is None else f" (first difference at token "
                                                                         f"{g['first_difference']})")
                            for dtype, g in generation.items() if isinstance(g, dict))
                + (f" {generation['error']}" if "error" in generation else ""))
text = "\n".join(rows)
print(text)
(summary_dir / "gpu_check_summary.md").write_text(text + "\n")
(summary_dir / "gpu_check_summary.json").write_text(json.dumps(
    {"when": when, "mode": env["MODE"], "tokenizer": env["TOKENIZER"], "steps": int(env["STEPS"]),
     "global_batch": int(env["GLOBAL_BATCH"]), "microbatch": int(env["MICROBATCH"]), "runs": runs,
     "ratios": ratios, "generation": generation}, indent=2))
failed = [name for name, r in runs.items() if r["exit"] != 0]
if failed:
    print(f"error: {', '.join(failed)} did not finish (see {work}/logs/<recipe>.console.txt)", file=sys.stderr)
    sys.exit(1)
PY
say "summary: $SUMMARY/gpu_check_summary.md"
