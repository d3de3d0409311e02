"""Tied Hugging Face retrofits in plain transformers (issue #16): a folder that loopreg writes loads with
``AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)`` where loopreg cannot be imported, tied (the
distinct parameters only, no missing or re-initialised keys), with loopreg's logits and greedy tokens bit for bit,
KV-cached generation equal to uncached, at the saved loop count, ``loops=`` per call and ``loopreg_loops`` in the
config, on a left-padded batch. Plus: untied retrofits keep the one-line "snap it first" error, the surgery CLI's
folder carries the code, a plain model's folder gets none."""

from __future__ import annotations

import json

import pytest
import torch

from loopreg.folders import write_model_folder
from loopreg.surgery import loop_surgery
from loopreg.loading import load
from loopreg.surgery.core import distinct_param_count
from loopreg.surgery.export import unrolled_model

from .conftest import run_cli, run_without_loopreg
from .families import BUILDERS as ALL_BUILDERS
from .families import HF_FAMILIES, TOKENS, VOCAB

PAD = TOKENS["pad_token_id"]
BUILDERS = {family: ALL_BUILDERS[family] for family in HF_FAMILIES}  # every family loop surgery retrofits
SPEC = "1x1+2x3+1x1"  # 4 distinct layers from the 6, the middle two looped 3 times: depth 8
CALL_LOOPS, CONFIG_LOOPS = 2, 4
REMOTE_FILES = {"adaptive.py", "errors.py", "hf_compat.py", "looped_hf.py", "looping.py", "relaxed.py",
                "remote_code.py", "spec.py", "update_rules.py"}

pytestmark = pytest.mark.usefixtures("single_thread")


def left_padded_batch() -> tuple[torch.Tensor, torch.Tensor]:
    """Two prompts of 9 tokens, the first left-padded by 3."""
    ids = torch.randint(3, VOCAB, (2, 9), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    ids[0, :3], mask[0, :3] = PAD, 0
    return ids, mask


def save_retrofit(model: torch.nn.Module, folder) -> None:
    """Save as loopreg does (``write_model_folder``; a looped model's ``save_pretrained`` adds the remote code)."""
    write_model_folder(model, folder)


@pytest.fixture(scope="module")
def retrofits(tmp_path_factory) -> dict:
    """family → folder of its tied retrofit (``SPEC``), and ``llama_untied``."""
    root = tmp_path_factory.mktemp("retrofits")
    folders = {}
    for family, build in BUILDERS.items():
        torch.manual_seed(0)
        save_retrofit(loop_surgery(build().eval(), SPEC), root / family)
        folders[family] = root / family
    torch.manual_seed(0)
    save_retrofit(loop_surgery(BUILDERS["llama"]().eval(), SPEC, tied=False), root / "llama_untied")
    folders["llama_untied"] = root / "llama_untied"
    return folders


# Runs without loopreg: loads the folder through its remote code, twice (as saved, and with loopreg_loops set by a
# from_pretrained keyword), and records what the test compares with loopreg's own loader.
REMOTE_SCRIPT = """
import torch
from transformers import AutoModelForCausalLM

torch.set_num_threads(1)
folder, inputs, out, call_loops, config_loops = {args!r}
ids, mask = torch.load(inputs)
model, info = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True, output_loading_info=True)
try:  # an untied retrofit refuses a loop count already here
    configured = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True, loopreg_loops=config_loops)
except ValueError as error:
    configured = str(error)


def greedy(model, use_cache, **loops):
    tokens = model.generate(ids, attention_mask=mask, max_new_tokens=6, min_new_tokens=6, do_sample=False,
                            use_cache=use_cache, pad_token_id=0, **loops)
    return tokens[:, ids.shape[1]:]


results = dict(cls=f"{{type(model).__module__}}.{{type(model).__name__}}", info=info,
               params=sum(p.numel() for p in model.parameters()), depth=model.config.num_hidden_layers)
with torch.no_grad():
    runs = [("saved", model, {{}}), ("call", model, {{"loops": call_loops}}), ("config", configured, {{}}),
            ("call_over_config", configured, {{"loops": call_loops}})]
    for name, runner, loops in runs:
        if isinstance(runner, str):
            results[name] = runner
            continue
        runner.eval()
        try:
            output = runner(ids, attention_mask=mask, use_cache=True, **loops)
        except ValueError as error:
            results[name] = str(error)
            continue
        results[name] = dict(logits=output.logits, slots=len(output.past_key_values),
                             cached=greedy(runner, True, **loops), uncached=greedy(runner, False, **loops))
torch.save(results, out)
"""


def load_without_loopreg(folder, tmp_path) -> tuple[dict, str]:
    """``REMOTE_SCRIPT``'s results on ``folder`` and its stderr."""
    inputs, out = tmp_path / "inputs.pt", tmp_path / "remote.pt"
    torch.save(left_padded_batch(), inputs)
    script = REMOTE_SCRIPT.format(args=(str(folder), str(inputs), str(out), CALL_LOOPS, CONFIG_LOOPS))
    ran = run_without_loopreg(script, {"HF_MODULES_CACHE": str(tmp_path / "hf_modules"), "OMP_NUM_THREADS": "1"})
    return torch.load(out), ran.stderr


def greedy(model, ids, mask, **options) -> torch.Tensor:
    tokens = model.generate(ids, attention_mask=mask, max_new_tokens=6, min_new_tokens=6, do_sample=False,
                            pad_token_id=PAD, **options)
    return tokens[:, ids.shape[1]:]


@pytest.mark.parametrize("family", list(BUILDERS))
@torch.no_grad()
def test_tied_retrofit_loads_tied_in_plain_transformers(retrofits, family, tmp_path):
    remote, stderr = load_without_loopreg(retrofits[family], tmp_path)
    reference = load(retrofits[family]).eval()
    base = type(reference).__mro__[2].__name__  # looped class, LoopedCausalLM, the family's own class
    assert remote["cls"].startswith("transformers_modules.") and remote["cls"].endswith(f".looped_hf.{base}")
    assert remote["info"] == {"missing_keys": [], "unexpected_keys": [], "mismatched_keys": [], "error_msgs": []}
    assert "newly initialized" not in stderr
    assert remote["depth"] == 8
    # Tied: the distinct parameters, two layers fewer than the unrolled model (8 applications of 4 layers).
    assert remote["params"] == distinct_param_count(reference) < distinct_param_count(unrolled_model(reference))

    ids, mask = left_padded_batch()
    for name, loops, slots in [("saved", None, 8), ("call", CALL_LOOPS, 6), ("config", CONFIG_LOOPS, 10),
                               ("call_over_config", CALL_LOOPS, 6)]:
        got = remote[name]
        assert torch.equal(got["logits"], reference(ids, attention_mask=mask, loops=loops).logits), name
        assert got["slots"] == slots, name  # one KV-cache slot per layer application
        expected = greedy(reference, ids, mask, loops=loops)
        assert torch.equal(got["cached"], expected) and torch.equal(got["uncached"], expected), name
    assert not torch.equal(remote["saved"]["logits"], remote["call"]["logits"])  # the loop count is in effect


@pytest.mark.parametrize("loops", [None, CALL_LOOPS, CONFIG_LOOPS])
@torch.no_grad()
def test_preallocated_caches_follow_the_loop_count(retrofits, loops):
    """Static caches are laid out by the config's ``num_hidden_layers`` and (hybrid: sliding windows) ``layer_types``,
    which follow the loop count the model is loaded at; a call at another count is a one-line error."""
    model = load(retrofits["qwen2"], loops=loops).eval()
    ids, mask = left_padded_batch()
    expected = greedy(model, ids, mask, use_cache=False)
    assert torch.equal(expected, greedy(load(retrofits["qwen2"]).eval(), ids, mask, loops=loops))
    for cache in ("static", "hybrid"):
        assert torch.equal(greedy(model, ids, mask, cache_implementation=cache), expected), cache
    with pytest.raises(ValueError, match="a preallocated cache is laid out for the config's"):
        greedy(model, ids, mask, loops=6, cache_implementation="static")


@torch.no_grad()
def test_untied_retrofit_loads_unrolled_and_refuses_loops(retrofits, tmp_path):
    folder = retrofits["llama_untied"]
    remote, _ = load_without_loopreg(folder, tmp_path)
    reference = load(folder).eval()
    ids, mask = left_padded_batch()
    assert remote["params"] == distinct_param_count(reference)  # one layer per application, as stored
    assert torch.equal(remote["saved"]["logits"], reference(ids, attention_mask=mask).logits)
    assert torch.equal(remote["saved"]["cached"], greedy(reference, ids, mask))
    with pytest.raises(ValueError) as error:
        reference(ids, loops=CALL_LOOPS)
    assert remote["call"] == str(error.value)
    assert str(error.value).endswith(f"('{SPEC}', 8 separate layers): snap it to a looped model first")
    # a loop count in the config is refused alike, when the model is built
    assert remote["config"] == remote["call_over_config"] == remote["call"].replace(f"loops={CALL_LOOPS}",
                                                                                    f"loops={CONFIG_LOOPS}")


def test_load_takes_the_loop_count(retrofits):
    model = load(retrofits["llama"], loops=CONFIG_LOOPS)
    assert model.config.loopreg_loops == CONFIG_LOOPS and model.config.num_hidden_layers == 1 + 2 * CONFIG_LOOPS + 1
    assert json.loads((retrofits["llama"] / "config.json").read_text())["loopreg_loops"] is None


# lm-eval's own `hf` model on a retrofit folder, without loopreg: the loop count is a model_args key.
LMEVAL_SCRIPT = """
import torch
from lm_eval.api.instance import Instance
from lm_eval.models.huggingface import HFLM

torch.set_num_threads(1)
folder, out, requests, loops = {args!r}
lm = HFLM(pretrained=folder, trust_remote_code=True, loopreg_loops=loops, device="cpu", batch_size=2)
scores = lm.loglikelihood([Instance("loglikelihood", {{}}, request, index) for index, request in enumerate(requests)])
torch.save(dict(scores=scores, params=sum(p.numel() for p in lm.model.parameters())), out)
"""
LMEVAL_REQUESTS = [("the looped", " model applies"), ("a block", " again and again")]


def test_lm_eval_hf_model_runs_a_retrofit_at_a_config_loop_count(source, tmp_path):
    pytest.importorskip("lm_eval")
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM

    from loopreg.surgery.sources import load_source_tokenizer

    folder, out = tmp_path / "retrofit", tmp_path / "lmeval.pt"
    save_retrofit(loop_surgery(load(source), SPEC), folder)
    load_source_tokenizer(source).save_pretrained(folder)
    script = LMEVAL_SCRIPT.format(args=(str(folder), str(out), LMEVAL_REQUESTS, CONFIG_LOOPS))
    run_without_loopreg(script, {"HF_MODULES_CACHE": str(tmp_path / "hf_modules"), "OMP_NUM_THREADS": "1"})
    remote = torch.load(out)
    requests = [Instance("loglikelihood", {}, request, index) for index, request in enumerate(LMEVAL_REQUESTS)]
    for loops, equal in [(CONFIG_LOOPS, True), (None, False)]:
        reference = load(folder, loops=loops)
        lm = HFLM(pretrained=reference, tokenizer=load_source_tokenizer(source), device="cpu", batch_size=2)
        assert (lm.loglikelihood(requests) == remote["scores"]) is equal, loops
    assert remote["params"] == distinct_param_count(reference)


def test_cli_surgery_folder_carries_remote_code_and_export_none(source, tmp_path, capsys):
    looped, unrolled = tmp_path / "looped", tmp_path / "unrolled"
    status, _, err = run_cli(["surgery", str(source), "--spec", SPEC, "--out", str(looped)], capsys)
    assert status == 0, err
    assert REMOTE_FILES <= {path.name for path in looped.iterdir()}
    config = json.loads((looped / "config.json").read_text())
    assert config["auto_map"] == {"AutoModelForCausalLM": "looped_hf.LlamaForCausalLM"}
    status, _, err = run_cli(["export", str(looped), "--unroll", "--out", str(unrolled)], capsys)
    assert status == 0, err
    assert not list(unrolled.glob("*.py"))
    assert not any(key.startswith("loopreg_") or key == "auto_map"
                   for key in json.loads((unrolled / "config.json").read_text()))


def test_plain_model_folder_gets_no_remote_code(tmp_path):
    torch.manual_seed(0)
    plain = BUILDERS["llama"]()
    write_model_folder(plain, tmp_path)
    assert not list(tmp_path.glob("*.py")) and "auto_map" not in json.loads((tmp_path / "config.json").read_text())


@torch.no_grad()
def test_remote_classes_are_the_looped_classes_by_name(retrofits):
    import loopreg.looped_hf as looped_hf

    model = load(retrofits["qwen2"])
    assert looped_hf.Qwen2ForCausalLM is type(model) and type(model).__qualname__ == "Qwen2ForCausalLM"
    with pytest.raises(AttributeError, match="has no attribute 'Tensor'"):
        looped_hf.Tensor  # noqa: B018 - not a model class
