"""Every folder kind loopreg writes, read where researchers are: plain ``transformers`` with loopreg unimportable, in
the project venv (the pinned 4.53.3) and in the consumer venvs that ``make test`` builds next to it (CPU torch,
one transformers, safetensors: the newest 4.x and a current 5.x; ``LOOPREG_CONSUMER_VENVS``, docs/ECOSYSTEM.md).

Per folder and transformers: no missing, unexpected or mismatched key; logits equal to loopreg's own (≤ 1e-5) at the
stored loop count and, for tied looped models, at an overridden one; cached greedy generation equal to uncached on a
left-padded batch of 2 (and, for tied ones, to adaptive exit at threshold 0); the distinct parameter count."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
import torch

from loopreg.callbacks.export import ExportModel
from loopreg.data.text import byte_level_tokenizer
from loopreg.folders import write_model_folder
from loopreg.loading import load
from loopreg.model import LoopedLM, LoopedLMConfig
from loopreg.snap import cli_main as snap_main
from loopreg.surgery import loop_surgery
from loopreg.surgery.core import distinct_param_count, is_tied
from loopreg.surgery.export import export_unrolled

from .conftest import _NO_LOOPREG
from .families import BUILDERS as ALL_BUILDERS
from .families import HF_FAMILIES

BUILDERS = {family: ALL_BUILDERS[family] for family in HF_FAMILIES}

pytestmark = [pytest.mark.usefixtures("single_thread"), pytest.mark.multiprocess]

ROOT = Path(__file__).resolve().parents[1]
OVERRIDE = 5  # the loop count every tied folder is also read at
NEW = 5  # generated tokens
LOOPED = dict(vocab_size=96, d_model=32, n_heads=4, n_kv_heads=2, init_std=0.3)  # 0.3: greedy tokens that vary


def consumer_pythons() -> list[tuple[str, str]]:
    """(label, interpreter): the project venv and each consumer venv ``make test`` names."""
    pythons = [("project venv", str(ROOT / ".venv" / "bin" / "python"))]
    for venv in os.environ.get("LOOPREG_CONSUMER_VENVS", "").split():
        pythons.append((venv.removeprefix(".venv-"), str(ROOT / venv / "bin" / "python")))
    return pythons


def inputs() -> tuple[torch.Tensor, torch.Tensor]:
    """Two prompts of 8 tokens, the first left-padded by 3."""
    ids = torch.randint(3, 96, (2, 8), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    ids[0, :3], mask[0, :3] = 0, 0
    return ids, mask


@pytest.fixture(scope="module")
def folders(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Every kind of folder loopreg writes: LoopedLM through each writer, tied retrofits of every family, relaxed
    ones (per-application deltas: Gemma 3 and a LoopedLM), an untied retrofit and the unrolled export (both plain
    HF)."""
    root = tmp_path_factory.mktemp("consumers")
    written: dict[str, Path] = {}

    def looped(spec: str, **kw) -> LoopedLM:
        torch.manual_seed(0)
        return LoopedLM(LoopedLMConfig(spec=spec, **LOOPED, **kw)).eval()

    looped("1x1+2x3+1x1", tie_word_embeddings=True).save_pretrained(root / "looped_save_pretrained")
    ExportModel(root / "looped_export", byte_level_tokenizer())._write(looped("1x1+2x2+1x1", learned_positions=True))
    write_model_folder(looped("2x2", tied=False), root / "looped_untied")
    assert snap_main([str(root / "looped_untied"), "--block-size", "1", "--out", str(root / "looped_snap")]) == 0
    export_unrolled(looped("1x1+2x3+1x1"), root / "looped_unrolled")
    for family, build in BUILDERS.items():
        torch.manual_seed(0)
        write_model_folder(loop_surgery(build().eval(), "1x1+2x3+1x1"), root / f"retrofit_{family}")
    torch.manual_seed(0)
    write_model_folder(loop_surgery(BUILDERS["llama"]().eval(), "1x1+2x2+1x1", tied=False), root / "retrofit_untied")
    for family in ("gemma3", "loopreg"):
        torch.manual_seed(0)
        write_model_folder(loop_surgery(ALL_BUILDERS[family]().eval(), "1x1+2x2+1x1", layers="0,1-4,5", init="average",
                                        lora_rank=3), root / f"relaxed_{family}")
    for folder in root.iterdir():
        written[folder.name] = folder
    return written


# Runs in each interpreter with loopreg unimportable: what plain transformers makes of every folder.
CONSUMER_SCRIPT = r'''
import json, sys
import torch
import transformers
from transformers import AutoModelForCausalLM

torch.set_num_threads(1)
folders, ids, mask, override, new, out = json.loads(sys.argv[1])
ids, mask = torch.tensor(ids), torch.tensor(mask)
results = {"transformers": transformers.__version__}
for name, (folder, tied) in folders.items():
    model, info = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True, output_loading_info=True)
    model.eval()
    wrong = {key: sorted(info.get(key) or ()) for key in ("missing_keys", "unexpected_keys", "mismatched_keys")}
    found = {"info": wrong, "params": sum(p.numel() for p in model.parameters())}
    for loops in [None, override] if tied else [None]:
        extra = {} if loops is None else {"loops": loops}
        with torch.no_grad():
            found[f"logits_{loops}"] = model(ids, attention_mask=mask, **extra).logits
        run = dict(attention_mask=mask, max_new_tokens=new, min_new_tokens=new, do_sample=False, pad_token_id=0,
                   **extra)
        found[f"cached_{loops}"] = model.generate(ids, **run)[:, ids.shape[1]:]
        found[f"uncached_{loops}"] = model.generate(ids, use_cache=False, **run)[:, ids.shape[1]:]
        if tied:  # adaptive exit at threshold 0 is the fixed loop, through the exit cache wrapper
            found[f"exit_{loops}"] = model.generate(ids, exit="kl:0", **run)[:, ids.shape[1]:]
    results[name] = found
torch.save(results, out)
'''


@pytest.fixture(scope="module", params=consumer_pythons(), ids=lambda python: python[0])
def consumed(request, folders, tmp_path_factory) -> tuple[str, dict]:
    """(label, the script's results) in one interpreter."""
    label, python = request.param
    if not Path(python).is_file():
        pytest.fail(f"{python} missing: `make consumer-venvs` builds the consumer venvs (make test does)")
    work = tmp_path_factory.mktemp("consumer")
    ids, mask = inputs()
    tied = {name: is_tied(load(folder)) for name, folder in folders.items()}
    arguments = [{name: [str(folder), tied[name]] for name, folder in folders.items()}, ids.tolist(), mask.tolist(),
                 OVERRIDE, NEW, str(work / "results.pt")]
    ran = subprocess.run([python, "-c", _NO_LOOPREG + CONSUMER_SCRIPT, json.dumps(arguments)], capture_output=True,
                         text=True, timeout=900, cwd=work,
                         env={**os.environ, "HF_MODULES_CACHE": str(work / "modules"), "OMP_NUM_THREADS": "1"})
    assert ran.returncode == 0, f"{label}:\n{ran.stderr[-6000:]}"
    return label, torch.load(work / "results.pt")


def test_the_matrix_covers_every_folder_kind(folders):
    assert len(folders) == 5 + len(BUILDERS) + 1 + 2
    assert {"looped_unrolled", "retrofit_untied"} <= set(folders)


def test_every_folder_loads_whole_and_computes_loopregs_logits(folders, consumed):
    label, results = consumed
    ids, mask = inputs()
    for name, folder in folders.items():
        found = results[name]
        assert not any(found["info"].values()), (label, name, found["info"])
        model = load(folder).eval()
        assert found["params"] == distinct_param_count(model), (label, name)
        for loops in [None, OVERRIDE] if is_tied(model) else [None]:
            with torch.no_grad():
                ours = model(ids, attention_mask=mask, **({} if loops is None else {"loops": loops})).logits
            real = mask.bool()  # padding positions' logits are unused (and differ between attention kernels)
            torch.testing.assert_close(found[f"logits_{loops}"][real], ours[real], rtol=0, atol=1e-5,
                                       msg=lambda text, name=name, loops=loops: f"{label} {name} loops={loops}: {text}")


def test_cached_generation_equals_uncached(folders, consumed):
    label, results = consumed
    for name in folders:
        found = results[name]
        for key in [key for key in found if key.startswith("cached_")]:
            assert torch.equal(found[key], found["un" + key]), (label, name, key)
            if "exit_" + key.removeprefix("cached_") in found:
                assert torch.equal(found[key], found["exit_" + key.removeprefix("cached_")]), (label, name, key)
