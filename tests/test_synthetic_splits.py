"""Determinism, train/test separation, tokenizer round trips, knob validation and the registry."""

from __future__ import annotations

import doctest
import itertools
import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest

import loopreg.data.synthetic as synthetic
from loopreg.data.synthetic import TASKS, Example, build_task, char_tokenizer, decode, encode
from loopreg.data.synthetic import addition, base, igsm, multiplication, phop, primitives, tokenizer
from loopreg.data.synthetic.tokenizer import SPECIAL_TOKENS

# one configuration per task and format, small enough to keep the suite fast
CONFIGS = {
    "addition": {"n_operands": (2, 4, 8)},
    "addition-reversed-spaced": {"n_operands": 4, "reverse_answer": True, "sep": " + "},
    "phop": {},
    "igsm": {},
    "primitives-math-1": {"depth": 1, "fmt": "math"},
    "primitives-code-1": {"depth": 1, "fmt": "code"},
    "multiplication": {"digits": 4},
}


def make(config: str):
    return build_task(config.split("-")[0], **CONFIGS[config])


def texts_of(task, example: Example) -> list[str]:
    """Every string the task produces for one example, rendered CoT and few-shot prompt included."""
    texts = [example.prompt, example.answer, *example.cot, "".join(example.position_labels or ())]
    if example.cot:
        texts.append(task.render_cot(example))
    if isinstance(task, synthetic.VariableAssignment):
        texts.append(task.few_shot_prompt(random.Random(0), query=example).prompt)
    return texts


# ------------------------------------------------------------------------------------- determinism
@pytest.mark.parametrize("config", CONFIGS)
def test_same_seed_same_examples_and_different_seeds_differ(config: str) -> None:
    first = make(config).fixed_set("train", 20, seed=7)
    assert first == make(config).fixed_set("train", 20, seed=7)
    assert first == list(itertools.islice(make(config).stream("train", seed=7), 20))
    assert first != make(config).fixed_set("train", 20, seed=8)


# ----------------------------------------------------------------------------------- split hygiene
@pytest.mark.parametrize("config", CONFIGS)
def test_fixed_test_set_never_appears_in_train_stream(config: str) -> None:
    task = make(config)
    test_prompts = {example.prompt for example in task.fixed_set("test", 30, seed=0)}
    assert all(task.split_of(example) == "test" for example in task.fixed_set("test", 30, seed=0))
    train = itertools.islice(task.stream("train", seed=0), 1500)
    assert not test_prompts & {example.prompt for example in train}


# tiny problem spaces: every problem shows up in both streams' samples unless the split holds
SMALL_SPACES = [
    ("addition", {"n_operands": 2, "digits": 1}),  # 100 problems
    ("phop", {"alphabet_size": 2, "length": 6, "hops": 2}),
    ("primitives", {"num_variables": 2, "max_value": 4}),  # 50 problems
    ("multiplication", {"digits": 1}),  # 81 problems
]


@pytest.mark.parametrize("name, knobs", SMALL_SPACES)
def test_split_is_by_problem_even_in_tiny_problem_spaces(name: str, knobs: dict) -> None:
    task = build_task(name, test_fraction=0.3, **knobs)
    train = {example.prompt for example in itertools.islice(task.stream("train", seed=1), 2000)}
    test = {example.prompt for example in itertools.islice(task.stream("test", seed=2), 800)}
    assert train and test and not train & test


def test_test_fraction_is_respected() -> None:
    task = build_task("addition", test_fraction=0.1)
    rng = random.Random(0)
    share = sum(task.split_of(task.sample(rng)) == "test" for _ in range(5000)) / 5000
    assert 0.08 < share < 0.12


def test_split_of_is_stable_across_processes() -> None:
    """Python's ``hash()`` is salted per process; the split must not be."""
    prompts = [example.prompt for example in make("addition").fixed_set("train", 200, seed=3)]
    prompts += [example.prompt for example in make("addition").fixed_set("test", 50, seed=3)]
    here = [make("addition").split_of(Example(prompt, "")) for prompt in prompts]
    script = (
        "import json, sys\n"
        "from loopreg.data.synthetic import Example, build_task\n"
        "task = build_task('addition')\n"
        "print(json.dumps([task.split_of(Example(p, '')) for p in json.load(sys.stdin)]))\n"
    )
    root = Path(__file__).resolve().parents[1]
    environment = {**os.environ, "PYTHONHASHSEED": "12345", "PYTHONPATH": str(root)}
    result = subprocess.run([sys.executable, "-c", script], input=json.dumps(prompts), capture_output=True,
                            text=True, check=True, env=environment)
    assert json.loads(result.stdout) == here
    assert here.count("test") == 50


# --------------------------------------------------------------------------------------- tokenizer
@pytest.mark.parametrize("config", CONFIGS)
def test_symbols_cover_every_text_and_tokenizer_round_trips(config: str) -> None:
    task = make(config)
    tok = char_tokenizer(task.symbols)
    assert task.symbols == "".join(sorted(set(task.symbols)))
    for example in task.fixed_set("train", 30, seed=0) + task.fixed_set("test", 5, seed=0):
        for text in texts_of(task, example):
            assert set(text) <= set(task.symbols), (config, set(text) - set(task.symbols))
            ids = encode(tok, text)
            assert len(ids) == len(text)  # one token per character
            assert decode(tok, ids) == text


def test_tokenizer_specials_spaces_and_newlines() -> None:
    tok = char_tokenizer("ab =\n")
    assert [tok.token_to_id(token) for token in SPECIAL_TOKENS] == [0, 1, 2, 3, 4]
    text = "a = b\n\n  b"
    ids = encode(tok, text)
    assert [tok.id_to_token(i) for i in ids] == list(text)
    with_specials = [tok.token_to_id("<bos>"), *ids, tok.token_to_id("<ph>"), tok.token_to_id("<eos>")]
    assert decode(tok, with_specials) == f"<bos>{text}<ph><eos>"
    assert encode(tok, "a<ph>b") == [encode(tok, "a")[0], 3, encode(tok, "b")[0]]
    # A character outside the vocabulary fails loudly; the tokenizers library raises a bare Exception.
    with pytest.raises(Exception, match=r"Missing \[UNK\] token"):
        encode(tok, "c")


# -------------------------------------------------------------------------------- knobs & registry
BAD_KNOBS = [
    ("phop", {"hops": 0}, "hops"),
    ("phop", {"alphabet_size": 1}, "alphabet_size"),
    ("phop", {"hops": 8, "length": 16}, "length"),
    ("addition", {"n_operands": 1}, "n_operands"),
    ("addition", {"n_operands": (2, 0)}, "n_operands"),
    ("addition", {"digits": 0}, "digits"),
    ("addition", {"sep": "="}, "sep"),
    ("igsm", {"num_ops": 0}, "num_ops"),
    ("igsm", {"num_ops": (2, 60)}, "num_ops"),
    ("igsm", {"num_ops": ()}, "num_ops"),
    ("igsm", {"num_ops": 10, "max_edges": 1, "max_depth": 4}, "num_ops"),
    ("igsm", {"max_edges": 0}, "max_edges"),
    ("igsm", {"max_depth": 0}, "max_depth"),
    ("igsm", {"num_distractors": 100}, "num_distractors"),
    ("igsm", {"modulus": 11}, "modulus"),
    ("igsm", {"entities_per_level": 7}, "entities_per_level"),
    ("primitives", {"depth": -1}, "depth"),
    ("primitives", {"fmt": "latex"}, "fmt"),
    ("primitives", {"num_variables": 14, "depth": 1}, "num_variables"),
    ("primitives", {"min_value": 5, "max_value": 4}, "max_value"),
    ("multiplication", {"digits": 0}, "digits"),
    ("multiplication", {"test_fraction": 1.0}, "test_fraction"),
    ("phop", {"colour": "red"}, "colour"),
]


@pytest.mark.parametrize("name, knobs, knob", BAD_KNOBS)
def test_bad_knobs_raise_value_error_naming_the_knob(name: str, knobs: dict, knob: str) -> None:
    with pytest.raises(ValueError, match=knob):
        build_task(name, **knobs)


def test_registry_and_unknown_task() -> None:
    assert set(TASKS) == {"addition", "phop", "igsm", "primitives", "multiplication"}
    assert all(TASKS[name].name == name for name in TASKS)
    with pytest.raises(ValueError, match=r"unknown synthetic task 'x'; expected one of: addition, phop"):
        build_task("x")
    with pytest.raises(ValueError, match="split"):
        next(build_task("phop").stream("valid", seed=0))


def test_render_cot_needs_a_cot() -> None:
    with pytest.raises(ValueError, match="chain of thought"):
        build_task("phop").render_cot(Example("ab", "a"))


@pytest.mark.parametrize("module", [synthetic, base, addition, phop, igsm, primitives, multiplication, tokenizer])
def test_docstring_examples_hold(module) -> None:
    failures, _ = doctest.testmod(module, verbose=False)
    assert failures == 0
