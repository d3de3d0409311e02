"""``loopreg.load``: one loader for every source kind, each returned as a transformers model that answers the same
loop protocol (``loop_spec``, ``tied``); bad sources are one-line user errors, never a silently re-initialised model.
Plus the structural guards of the one-model refactor: no ``isinstance(…, LoopedLM)`` outside the model module and
the loader, and one place that checks loop options."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

import loopreg
from loopreg.errors import UserError
from loopreg.model import LoopedLM, LoopedLMConfig
from loopreg.surgery import loop_surgery
from loopreg.surgery.core import is_tied, looped_spec

pytestmark = pytest.mark.usefixtures("single_thread")

ROOT = Path(__file__).resolve().parents[1]
IDS = torch.randint(3, 64, (2, 6), generator=torch.Generator().manual_seed(0))


def llama() -> LlamaForCausalLM:
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=4,
                                        num_attention_heads=4, num_key_value_heads=2)).eval()


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("sources")
    torch.manual_seed(0)
    LoopedLM(LoopedLMConfig(spec="1x1+2x3", vocab_size=64, d_model=32, n_heads=4)).save_pretrained(root / "looped")
    llama().save_pretrained(root / "plain")
    loop_surgery(llama(), "1x1+2x2+1x1").save_pretrained(root / "tied")
    loop_surgery(llama(), "1x1+2x2+1x1", tied=False).save_pretrained(root / "untied")
    return {folder.name: folder for folder in root.iterdir()}


@pytest.mark.parametrize("kind, spec, tied", [("looped", "1x1+2x3", True), ("tied", "1x1+2x2+1x1", True),
                                              ("untied", "1x1+2x2+1x1", False), ("plain", None, False)])
def test_every_folder_kind_loads_with_the_loop_protocol(folders, kind, spec, tied):
    model = loopreg.load(folders[kind]).eval()
    assert (str(looped_spec(model)) if spec else looped_spec(model)) == spec and is_tied(model) == tied
    with torch.no_grad():
        assert model(IDS).logits.shape == (2, 6, 64)  # every kind is a transformers model


def test_loops_sets_the_default_loop_count(folders):
    for kind in ("looped", "tied"):
        default, deeper = loopreg.load(folders[kind]).eval(), loopreg.load(folders[kind], loops=4).eval()
        with torch.no_grad():
            assert torch.equal(deeper(IDS).logits, default(IDS, loops=4).logits), kind
            assert not torch.equal(deeper(IDS).logits, default(IDS).logits), kind


@pytest.mark.parametrize("kind", ["tied", "looped"])
def test_a_hub_id_loads_from_the_local_cache(folders, kind, tmp_path, monkeypatch):
    """The hub path is real: an id resolves through huggingface_hub's cache, here laid out locally, offline."""
    snapshot = tmp_path / "hub" / f"models--loopreg--tiny-{kind}" / "snapshots" / ("0" * 40)
    snapshot.mkdir(parents=True)
    for file in folders[kind].iterdir():
        (snapshot / file.name).write_bytes(file.read_bytes())
    (snapshot.parents[1] / "refs").mkdir()
    (snapshot.parents[1] / "refs" / "main").write_text("0" * 40)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)
    monkeypatch.setattr("transformers.utils.hub.constants.HF_HUB_OFFLINE", True, raising=False)
    model = loopreg.load(f"loopreg/tiny-{kind}", cache_dir=str(tmp_path / "hub")).eval()
    with torch.no_grad():
        assert torch.equal(model(IDS).logits, loopreg.load(folders[kind]).eval()(IDS).logits)


@pytest.mark.slow
def test_a_gguf_file_loads_dequantized():
    from loopreg.surgery import smollm2_gguf

    model = loopreg.load(smollm2_gguf())
    assert looped_spec(model) is None and model.config.num_hidden_layers == 30


# ------------------------------------------------------------------ bad input: one line naming the culprit
def _copy(folder: Path, to: Path) -> Path:
    to.mkdir()
    for file in folder.iterdir():
        (to / file.name).write_bytes(file.read_bytes())
    return to


def test_not_a_model_folder(tmp_path):
    with pytest.raises(UserError, match=rf"^{re.escape(str(tmp_path))}: not a model folder \(no config.json\)"):
        loopreg.load(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(UserError, match=r"config.json: not JSON"):
        loopreg.load(tmp_path)
    with pytest.raises(UserError, match="not a model folder, a .gguf file, a Composer checkpoint or a hub id"):
        loopreg.load(tmp_path / "missing")


@pytest.mark.parametrize("kind", ["looped", "tied"])
def test_a_truncated_weights_file(folders, kind, tmp_path):
    folder = _copy(folders[kind], tmp_path / kind)
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.raises(UserError) as error:
        loopreg.load(folder)
    assert str(folder) in str(error.value) and "\n" not in str(error.value)


@pytest.mark.parametrize("kind, key, value", [("looped", ("loopreg", "spec"), "1x1+2x4+1x1"),
                                              ("looped", ("loopreg", "spec"), "2x3"),
                                              ("tied", ("loopreg_spec",), "1x1+3x2+1x1")])
def test_a_config_whose_loop_spec_its_weights_do_not_match(folders, kind, key, value, tmp_path):
    folder = _copy(folders[kind], tmp_path / kind)
    config = json.loads((folder / "config.json").read_text())
    (config[key[0]] if len(key) == 2 else config)[key[-1]] = value
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(UserError, match="its weights do not fit its config") as error:
        loopreg.load(folder)
    assert "\n" not in str(error.value)


def test_loops_on_a_model_that_cannot_run_them(folders):
    with pytest.raises(UserError, match=r"^loops=3: .* is a plain checkpoint; loop it first"):
        loopreg.load(folders["plain"], loops=3)
    with pytest.raises(UserError, match=r"^loops=3 needs a tied looped model; this one is untied"):
        loopreg.load(folders["untied"], loops=3)
    untied = loopreg.load(folders["untied"])
    with pytest.raises(UserError, match=r"^loops=2 needs a tied looped model; this one is untied"):
        untied(IDS, loops=2)
    with pytest.raises(UserError, match=r"^loops=2 needs a tied looped model; this one is untied"):
        LoopedLM(LoopedLMConfig(spec="2x2", tied=False, vocab_size=64, d_model=32, n_heads=4))(IDS, loops=2)


# ------------------------------------------------------------------ the structure stays one model
def _sources() -> list[Path]:
    folders = ("loopreg", "evals", "callbacks", "benchmarks")
    return [path for folder in folders for path in (ROOT / folder).rglob("*.py")]


def test_no_isinstance_looped_lm_outside_the_model_and_the_loader():
    found = [f"{path.relative_to(ROOT)}:{number}" for path in _sources()
             for number, line in enumerate(path.read_text().splitlines(), 1)
             if re.search(r"isinstance\([^)]*\bLoopedLM\)", line)]
    assert found == []


def test_loop_options_are_checked_in_one_place():
    """Every "needs a tied model" error and every option check comes from looping.check_loop_options."""
    found = sorted(str(path.relative_to(ROOT)) for path in _sources()
                   if "needs a tied looped model" in path.read_text() or "def check_exit" in path.read_text())
    assert found == ["loopreg/looping.py"]


def test_a_retrofit_config_whose_layer_types_do_not_fit_its_spec(tmp_path):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    source = Qwen2ForCausalLM(Qwen2Config(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=4,
                                          num_attention_heads=4, num_key_value_heads=2))
    loop_surgery(source, "1x1+2x2+1x1").save_pretrained(tmp_path / "qwen2")
    config = json.loads((tmp_path / "qwen2" / "config.json").read_text())
    config["layer_types"] = config["layer_types"][:-1]
    (tmp_path / "qwen2" / "config.json").write_text(json.dumps(config))
    with pytest.raises(UserError, match="layer_types has 5 entries, but loop spec") as error:
        loopreg.load(tmp_path / "qwen2")
    assert "\n" not in str(error.value)
