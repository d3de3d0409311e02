"""LoopedLM folders load tied in plain transformers: ``AutoModelForCausalLM.from_pretrained(folder,
trust_remote_code=True)`` with loopreg unimportable gives loopreg's own logits and tokens, with the distinct
parameter count, through GenerationMixin and its DynamicCache (one cache layer per layer application). LoopedLM is
itself the transformers model. (Other transformers versions: tests/test_consumers.py.)"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import loopreg.configuration_loopreg
import loopreg.looped_hf
import loopreg.model
from loopreg.callbacks.export import ExportModel
from loopreg.configuration_loopreg import LoopregConfig, load_config
from loopreg.data.text import byte_level_tokenizer
from loopreg.folders import write_model_folder
from loopreg.model import AUTO_MAP, LoopedLM, LoopedLMConfig
from loopreg.remote_code import remote_code_files
from loopreg.snap import cli_main as snap_main

from .conftest import run_without_loopreg

pytestmark = pytest.mark.usefixtures("single_thread")

REMOTE_FILES = {"adaptive.py", "configuration_loopreg.py", "errors.py", "hf_compat.py", "latent.py", "looping.py",
                "model.py", "relaxed.py", "remote_code.py", "spec.py", "update_rules.py"}
NEW = 6  # generated tokens
LOOPS = {"tied": [None, 5, 3], "untied": [None], "snapped": [None]}  # loop counts generated at, per folder
# init_std 0.3: a random tiny model whose greedy tokens vary (the default 0.02 repeats one token)
TIED = dict(spec="1x1+2x3+1x1", vocab_size=257, d_model=32, n_heads=4, n_kv_heads=2, tie_word_embeddings=True,
            init_std=0.3)
UNTIED = dict(spec="2x2", tied=False, vocab_size=257, d_model=32, n_heads=4, init_std=0.3)


def greedy(model: LoopedLM, ids: torch.Tensor, mask: torch.Tensor, loops: int | None = None) -> torch.Tensor:
    """loopreg's own greedy tokens (transformers' generate on the LoopedLM)."""
    tokens = model.generate(ids, attention_mask=mask, max_new_tokens=NEW, do_sample=False, pad_token_id=0, loops=loops)
    return tokens[:, ids.shape[1]:]


def inputs() -> tuple[torch.Tensor, torch.Tensor]:
    """A batch of 2 prompts of 7 tokens, the first left-padded by 3."""
    ids = torch.randint(3, 257, (2, 7), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[0, :3] = 0
    return ids.masked_fill(mask == 0, 0), mask


@pytest.fixture(scope="module")
def folders(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A tied LoopedLM written by the export callback, an untied one by write_model_folder, and the snap of the
    untied one by ``loopreg snap``: the toolkit's writers."""
    root = tmp_path_factory.mktemp("looped_folders")
    torch.manual_seed(0)
    ExportModel(root / "tied", byte_level_tokenizer())._write(LoopedLM(LoopedLMConfig(**TIED)))
    write_model_folder(LoopedLM(LoopedLMConfig(**UNTIED)), root / "untied", byte_level_tokenizer())
    assert snap_main([str(root / "untied"), "--block-size", "1", "--out", str(root / "snapped")]) == 0
    return {"tied": root / "tied", "untied": root / "untied", "snapped": root / "snapped"}


# What the script below records, per folder, and loopreg's own loader gives in this process.
HF_SCRIPT = r'''
import json
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, DynamicCache

folders, ids, mask, new, loops_of, out = json.loads(ARGUMENTS)
ids, mask = torch.tensor(ids), torch.tensor(mask)
results = {}
for name, folder in folders.items():
    model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)
    cache = model(ids, use_cache=True).past_key_values
    found = {"class": type(model).__module__ + "." + type(model).__name__,
             "params": model.num_parameters(),
             "tied_head": model.get_output_embeddings().weight is model.get_input_embeddings().weight,
             "logits": model(ids).logits, "masked_logits": model(ids, attention_mask=mask).logits,
             "cache": [isinstance(cache, DynamicCache), len(cache), model.config.num_hidden_layers]}
    for loops in loops_of[name]:
        run = dict(attention_mask=mask, max_new_tokens=new, do_sample=False, pad_token_id=0, loops=loops)
        found[f"cached_{loops}"] = model.generate(ids, **run)[:, ids.shape[1]:]
        found[f"uncached_{loops}"] = model.generate(ids, use_cache=False, **run)[:, ids.shape[1]:]
    if name == "tied":  # the loop count from the config (from_pretrained's config override); per call wins
        at5 = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True, loops=5)
        run = dict(attention_mask=mask, max_new_tokens=new, do_sample=False, pad_token_id=0)
        found["config_5"] = at5.generate(ids, **run)[:, ids.shape[1]:]
        found["config_5_call_3"] = at5.generate(ids, loops=3, **run)[:, ids.shape[1]:]
        found["config_5_cache"] = [len(at5(ids, use_cache=True).past_key_values), at5.config.num_hidden_layers]
        torch.manual_seed(0)
        first = model.generate(ids, attention_mask=mask, max_new_tokens=new, do_sample=True, top_k=20, pad_token_id=0)
        torch.manual_seed(0)
        again = model.generate(ids, attention_mask=mask, max_new_tokens=new, do_sample=True, top_k=20, pad_token_id=0)
        found["sampled"] = [first, again]
        found["tokenized"] = AutoTokenizer.from_pretrained(folder)("hi!")["input_ids"]
    if name == "untied":  # a loop override needs a tied model: loopreg's one-line error, per call and by config
        errors = []
        for attempt in (lambda: model(ids, loops=3),
                        lambda: AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True, loops=3)):
            try:
                attempt()
                errors.append(None)
            except ValueError as err:
                errors.append(str(err))
        found["errors"] = errors
    results[name] = found
torch.save(results, out)
'''


@pytest.fixture(scope="module")
def loaded(folders: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict]:
    """The script's results (loopreg unimportable); run once for all folders."""
    work = tmp_path_factory.mktemp("hf_side")
    ids, mask = inputs()
    arguments = [{name: str(folder) for name, folder in folders.items()}, ids.tolist(), mask.tolist(), NEW, LOOPS,
                 str(work / "results.pt")]
    run_without_loopreg(HF_SCRIPT.replace("ARGUMENTS", repr(json.dumps(arguments))),
                        {"HF_MODULES_CACHE": str(work / "modules")})
    return torch.load(work / "results.pt")


def test_folders_carry_their_remote_code_and_an_hf_config(folders):
    for name, folder in folders.items():
        files = {path.name for path in folder.iterdir()}
        assert REMOTE_FILES <= files and {"config.json", "model.safetensors"} <= files, name
        config = json.loads((folder / "config.json").read_text())
        looped = load_config(folder)  # loopreg's own reader still finds its object
        assert config["model_type"] == "loopreg" and config["architectures"] == ["LoopedLM"], name
        assert config["auto_map"] == AUTO_MAP, name
        assert (config["vocab_size"], config["hidden_size"], config["tie_word_embeddings"], config["torch_dtype"]) == (
            looped.vocab_size, looped.d_model, looped.tie_word_embeddings, "float32"), name
    assert json.loads((folders["tied"] / "config.json").read_text())["num_hidden_layers"] == 8  # applications
    # the copied files are loopreg's own modules, byte for byte (one source of truth)
    for source in remote_code_files(loopreg.model.__file__):
        assert (folders["tied"] / source.name).read_bytes() == source.read_bytes()
    assert (folders["snapped"] / "tokenizer.json").is_file()  # snap now carries a loopreg folder's tokenizer


def test_hf_load_matches_loopreg_without_loopreg(folders, loaded):
    ids, mask = inputs()
    for name, folder in folders.items():
        model, found = LoopedLM.from_pretrained(folder), loaded[name]
        assert found["class"].startswith("transformers_modules.") and found["class"].endswith("model.LoopedLM")
        assert found["params"] == sum(p.numel() for p in model.parameters()), name  # distinct, not unrolled
        assert found["tied_head"] == model.config.tie_word_embeddings, name
        with torch.no_grad():
            assert torch.equal(found["logits"], model(ids).logits), name
            assert torch.equal(found["masked_logits"], model(ids, attention_mask=mask).logits), name
        applications = len(model.schedule())
        assert found["cache"] == [True, applications, applications], name  # a DynamicCache, a layer per application
        for loops in LOOPS[name]:
            reference = greedy(model, ids, mask, loops)
            assert torch.equal(found[f"cached_{loops}"], reference), (name, loops)
            assert torch.equal(found[f"uncached_{loops}"], reference), (name, loops)
        assert len(set(found["cached_None"].flatten().tolist())) > 2, name  # the tokens vary: a real comparison


def test_loop_count_per_call_and_by_config(folders, loaded):
    ids, mask = inputs()
    model, found = LoopedLM.from_pretrained(folders["tied"]), loaded["tied"]
    at = {loops: greedy(model, ids, mask, loops) for loops in (None, 3, 5)}
    assert not torch.equal(at[5], at[None]) and not torch.equal(at[3], at[5])  # the loop count matters here
    assert torch.equal(found["config_5"], at[5])
    assert torch.equal(found["config_5_call_3"], at[3])  # per call wins over the config
    assert found["config_5_cache"] == [12, 12]  # 1 + 2·5 + 1 applications
    untied = loaded["untied"]["errors"]
    message = "loops=3 needs a tied looped model; this one is untied ('2x2', 4 separate layers)"
    assert all(error is not None and error.startswith(message) and "\n" not in error for error in untied), untied


def test_sampling_and_tokenizer_without_loopreg(loaded):
    first, again = loaded["tied"]["sampled"]
    assert first.shape == (2, 7 + NEW) and torch.equal(first, again)  # seeded sampling runs and repeats
    assert loaded["tied"]["tokenized"] == byte_level_tokenizer().encode("hi!").ids


@pytest.mark.parametrize("entry", [loopreg.model.__file__, loopreg.configuration_loopreg.__file__,
                                   loopreg.looped_hf.__file__], ids=lambda path: Path(path).name)
def test_remote_entries_import_their_whole_closure_directly(entry):
    """transformers 4.53 copies only an entry's direct relative imports out of a local folder: each entry must
    name every sibling that it needs, directly. A retrofit's entry needs no model.py."""
    from transformers.dynamic_module_utils import get_relative_imports

    closure = {path.stem for path in remote_code_files(entry)} - {Path(entry).stem}
    assert closure <= set(get_relative_imports(entry))
    if Path(entry).name == "looped_hf.py":
        assert "model" not in closure and "configuration_loopreg" not in closure


def test_labels_give_transformers_shifted_loss():
    torch.manual_seed(0)
    model = LoopedLM(LoopregConfig(loopreg=TIED, loops=3))
    assert model.config.num_hidden_layers == 1 + 2 * 3 + 1
    ids, _ = inputs()
    loss = model(ids, labels=ids).loss  # allclose: it reduces over one more, ignored, position
    with torch.no_grad():
        reference = F.cross_entropy(model(ids).logits[:, :-1].reshape(-1, 257), ids[:, 1:].reshape(-1))
        assert torch.equal(model(ids).logits, model(ids, loops=3).logits)  # the config's loop count by default
    torch.testing.assert_close(loss, reference, rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match="loops=3 needs a tied looped model"):
        LoopedLM(LoopregConfig(loopreg=UNTIED, loops=3))


def test_old_folders_and_config_conflicts(tmp_path):
    torch.manual_seed(0)
    model = LoopedLM(LoopedLMConfig(**TIED))
    model.save_pretrained(tmp_path / "old")
    config_path = tmp_path / "old" / "config.json"
    config = json.loads(config_path.read_text())
    config_path.write_text(json.dumps({"loopreg": config["loopreg"]}))  # a folder written before model_type
    ids, _ = inputs()
    with torch.no_grad():
        assert torch.equal(LoopedLM.from_pretrained(tmp_path / "old")(ids).logits, model(ids).logits)
    with pytest.raises(ValueError, match=r"config.json: vocab_size=300 disagrees with its 'loopreg' object"):
        LoopregConfig(loopreg=config["loopreg"], vocab_size=300)
    assert not LoopregConfig(loopreg={**config["loopreg"], "tie_word_embeddings": False}).tie_word_embeddings


def test_a_folder_loaded_by_transformers_saves_itself_again(folders, tmp_path):
    """A LoopedLM loaded from a folder writes a folder with its remote code again (the tied head stored once)."""
    hf = LoopedLM.from_pretrained(folders["tied"])
    hf.save_pretrained(tmp_path / "resaved")
    ids, mask = inputs()
    assert REMOTE_FILES <= {path.name for path in (tmp_path / "resaved").iterdir()}
    with torch.no_grad():
        reference = hf(ids, attention_mask=mask).logits
        again = LoopedLM.from_pretrained(tmp_path / "resaved")
        assert torch.equal(again(ids, attention_mask=mask).logits, reference)
    assert again.lm_head.weight is again.embed.weight
