"""The ``mixture`` data kind: weighted sources in one packed stream, exact over ranks, workers and resumes;
its evaluators; its recipe errors; and the multi-hop variable assignment it mixes in."""

from __future__ import annotations

import random
from collections import Counter
from itertools import islice
from pathlib import Path

import pytest
import torch
from torch.utils.data import DataLoader

from loopreg.config import load_recipe
from loopreg.data import IGNORE_INDEX
from loopreg.data.mixture import CHUNK, MixtureStream, chunk_counts, problem_windows
from loopreg.data.synthetic import VariableAssignment
from loopreg.data.tasks import TaskData, train_examples
from loopreg.data.text import EOS_TOKEN as EOS_TEXT, byte_level_tokenizer, eos_id
from loopreg.errors import RecipeError, UserError
from loopreg.train import build_dataloaders

from .conftest import REPO

RECIPE = REPO / "recipes" / "lm_mini.yaml"


def tagged(tag: int) -> callable:
    """A source whose k-th window has inputs ``[tag, k]``: where each sequence came from is readable."""
    return lambda: (([tag, k], [k, k]) for k in range(10**9))


def stream(weights=(2.0, 1.0, 1.0), **kwargs) -> MixtureStream:
    return MixtureStream({f"s{t}": (w, tagged(t)) for t, w in enumerate(weights)}, seed=3, **kwargs)


def split_at(tokens: list[int], separator: int) -> list[list[int]]:
    """The non-empty runs of ``tokens`` between ``separator`` tokens."""
    runs: list[list[int]] = [[]]
    for token in tokens:
        runs.append([]) if token == separator else runs[-1].append(token)
    return [run for run in runs if run]


def windows(items) -> list[tuple[int, int]]:
    return [tuple(item["input_ids"].tolist()) for item in items]


def tiny(corpus: Path, *extra: str) -> list[str]:
    return [f"train_data.sources.wiki.source={corpus}", f"eval_data.sources.wiki.source={corpus}",
            "eval_data.sources.wiki.eval_size=4", "eval_data.sources.vars.eval_size=6",
            "eval_data.sources.phop.eval_size=6", "eval_data.sources.addition.eval_size=6", "model.d_model=32",
            "model.n_heads=2", "model.d_ff=64", "global_train_batch_size=8", "device_train_microbatch_size=8", *extra]


def test_chunk_shares_follow_the_weights():
    assert chunk_counts([2, 1, 1]) == [128, 64, 64]
    counts = chunk_counts([1, 1, 1])
    assert sum(counts) == CHUNK and max(counts) - min(counts) == 1
    taken = Counter(source for source, _ in windows(islice(iter(stream()), 4 * CHUNK)))
    assert taken == {0: 512, 1: 256, 2: 256}  # exact per chunk, not only on average


def test_each_source_is_read_in_order_without_gaps():
    seen: dict[int, list[int]] = {}
    for source, position in windows(islice(iter(stream()), 3 * CHUNK)):
        seen.setdefault(source, []).append(position)
    assert all(positions == list(range(len(positions))) for positions in seen.values())


def test_ranks_and_workers_split_one_stream_exactly():
    whole = windows(islice(iter(stream()), 96))
    for world_size, workers in ((2, 1), (2, 2), (3, 1)):
        per_rank = 12 // world_size
        taken = []
        for rank in range(world_size):
            loader = DataLoader(stream(rank=rank, world_size=world_size, batch_size=per_rank), batch_size=per_rank,
                                num_workers=workers)
            taken.append([[tuple(row) for row in batch["input_ids"].tolist()] for batch in islice(loader, 96 // 12)])
        for b in range(96 // 12):  # global batch b: rank r holds the indices ≡ r (mod world_size)
            merged = [taken[r][b][i] for i in range(per_rank) for r in range(world_size)]
            assert merged == whole[12 * b:12 * (b + 1)], (world_size, workers, b)


def test_resume_continues_the_stream_under_another_world_size():
    whole = windows(islice(iter(stream()), 2 * CHUNK + 40))
    saved = stream().state_dict(num_samples=2 * CHUNK, from_beginning=True)
    for rank in range(2):
        resumed = stream(rank=rank, world_size=2, batch_size=4)
        resumed.load_state_dict(saved)
        assert windows(islice(iter(resumed), 20)) == whole[2 * CHUNK + rank::2][:20]


def test_text_tokenizer_encodes_a_problem_as_a_document():
    tokenizer = byte_level_tokenizer()
    data = TaskData(VariableAssignment(depth=2, num_variables=2), tokenizer)
    example = data.task.sample(random.Random(0))
    item = data.encode(example)
    eos = eos_id(tokenizer)
    assert item["input_ids"][0] == eos  # documents are packed after an end-of-text
    text = example.prompt + example.answer
    assert tokenizer.decode(item["input_ids"][1:].tolist()) == text  # as the training stream writes it
    assert item["labels"][-1] == eos and item["answer_mask"].sum() == len(example.answer) + 1


def test_problem_windows_hold_whole_problems_in_order():
    tokenizer = byte_level_tokenizer()
    eos = eos_id(tokenizer)
    data = TaskData(VariableAssignment(depth=(0, 2), num_variables=3), tokenizer)
    problems = list(train_examples(data.task, 0, range(400)))
    windows = list(islice(problem_windows(data, problems, seq_len=64), 150))
    assert all(len(inputs) == len(labels) == 64 and inputs[0] == eos for inputs, labels in windows)
    assert all(labels == inputs[1:] + [eos] for inputs, labels in windows)  # every token a target
    pieces = [tokenizer.decode(piece) for inputs, _ in windows for piece in split_at(inputs, eos)]
    assert pieces == [p.prompt + p.answer for p in problems[: len(pieces)]] and len(pieces) > 150  # whole, in order
    with pytest.raises(ValueError, match="does not fit in a window of 8 tokens"):
        next(problem_windows(data, problems, seq_len=8))


def test_answer_targets_train_on_answers_only():
    """``targets: answers`` keeps the windows and masks every target but the answers and their end-of-text:
    the prompts, and the filler after the last whole problem."""
    tokenizer = byte_level_tokenizer()
    eos = eos_id(tokenizer)
    data = TaskData(VariableAssignment(depth=(0, 2), num_variables=3), tokenizer)
    problems = list(train_examples(data.task, 0, range(200)))
    every = list(islice(problem_windows(data, problems, seq_len=64), 50))
    answers = list(islice(problem_windows(data, problems, seq_len=64, targets="answers"), 50))
    assert [inputs for inputs, _ in every] == [inputs for inputs, _ in answers]
    kept = [tokenizer.decode([t for t in labels if t != IGNORE_INDEX]) for _, labels in answers]
    in_window = [split_at(inputs, eos) for inputs, _ in answers]
    first = [sum(map(len, in_window[:w])) for w in range(len(in_window) + 1)]  # each window's first problem
    expected = ["".join(p.answer for p in problems[first[w]:first[w + 1]]) for w in range(len(in_window))]
    assert [text.replace(EOS_TEXT, "") for text in kept] == expected
    assert all(sum(t == eos for t in labels) == len(pieces) for (_, labels), pieces in zip(answers, in_window))
    for (_, labels), (_, all_labels) in zip(answers, every):  # a kept target is the all-targets one
        assert all(t == a for t, a in zip(labels, all_labels) if t != IGNORE_INDEX)


def follow(prompt: str) -> tuple[int, str]:
    """(pointer hops, value) of a math-format variable-assignment query, by following its chain."""
    statements = dict(part.split("=") for part in prompt.split(", ")[:-1])
    name, hops = prompt.split(", ")[-1].removesuffix("=?"), 0
    while not statements[name].isdigit():
        name, hops = statements[name], hops + 1
    return hops, statements[name]


def test_variable_assignment_answers_follow_the_chain():
    task = VariableAssignment(depth=(2, 4), num_variables=3)
    rng = random.Random(1)
    depths = Counter()
    for _ in range(200):
        example = task.sample(rng)
        hops, value = follow(example.prompt)
        assert value == example.answer
        depths[hops] += 1
    assert set(depths) == {2, 4}
    with pytest.raises(ValueError, match="depth"):
        VariableAssignment(depth=-1)
    with pytest.raises(ValueError, match="num_variables"):
        VariableAssignment(depth=(1, 9), num_variables=3)


def test_recipe_builds_one_evaluator_per_source_and_variant(text_corpus: Path):
    recipe = load_recipe(RECIPE, tiny(text_corpus))
    data = build_dataloaders(recipe, 1, 0)
    labels = [evaluator.label for evaluator in data.evaluation]
    assert labels == ["wiki", "vars_d2", "vars_d4", "phop_p2", "phop_p3", "addition_n2", "addition_n3"]
    hard = next(e for e in data.evaluation if e.label == "vars_d4").dataloader.dataloader.dataset
    assert {follow(example.prompt)[0] for example in hard.examples} == {4}  # the harder split: 4 hops
    batches = list(islice(data.train, 8))
    assert batches[0]["input_ids"].shape == (8, recipe.max_seq_len)
    text = "".join(byte_level_tokenizer().decode(row.tolist()) for b in batches for row in b["input_ids"])
    assert "=?" in text and "looped" in text  # problems are in the packed stream beside the corpus text
    eos = eos_id(byte_level_tokenizer())
    for batch in batches:
        for inputs, labels in zip(batch["input_ids"].tolist(), batch["labels"].tolist()):
            problems = [byte_level_tokenizer().decode(piece) for piece in split_at(inputs, eos)]
            if any("=?" in problem for problem in problems):  # a variable-assignment window: whole problems only
                assert inputs[0] == eos and all(follow(p[:p.index("?") + 1])[1] == p[p.index("?") + 1:]
                                                for p in problems)
                targets = [label for label in labels if label != IGNORE_INDEX]  # targets: answers
                assert byte_level_tokenizer().decode(targets) == "".join(p[p.index("?") + 1:] for p in problems)


def test_a_short_mixture_run_trains_and_scores(text_corpus: Path):
    from loopreg.train import build_trainer

    trainer = build_trainer(load_recipe(RECIPE, tiny(text_corpus, "max_duration=20ba", "eval_interval=20ba",
                                                     "model.spec=1x2", "console_log_interval=100ba")))
    trainer.fit()
    metrics = trainer.state.eval_metrics
    assert float(metrics["wiki"]["LanguagePerplexity"].compute()) < 257  # better than uniform over bytes
    assert 0.0 <= float(metrics["vars_d2"]["AnswerExactMatch"].compute()) <= 1.0
    trainer.close()


@pytest.mark.parametrize("override, message", [
    ("train_data.sources.wiki.kind=mds", "sources.wiki.kind=mds: a mixture source is one of text, synthetic"),
    ("train_data.sources.vars.weight=0", "train_data.sources.vars.weight must be > 0, got 0"),
    ("train_data.sources.vars.weight=0.001", "train_data.sources.vars.weight is below 1/256 of the total"),
    ("train_data.sources.vars.wieght=1", "train_data.sources.vars: Key 'wieght' not in 'DataSection'"),
    ("train_data.sources.phop.task_kwargs.per_position_labels=true", "set per_position_labels: false"),
    ("train_data.sources.vars.task_kwargs.depth=-2", "train_data.sources.vars.task_kwargs: primitives: bad knob depth"),
    ("eval_data.kind=text", "eval_data.kind=text with a mixture: use eval_data.kind=mixture"),
    ("tokenizer.kind=synthetic", "a mixture needs a text tokenizer"),
    ("max_seq_len=64", "sources.vars.eval_variants.d4: problems of up to 80 tokens do not fit max_seq_len=64"),
    ("train_data.sources.wiki.source=/nonexistent/wiki.jsonl", "train_data.sources.wiki.source"),
    ("train_data.sources.vars.targets=prompts", "train_data.sources.vars.targets=prompts: a synthetic source trains "
                                                "on all or answers"),
    ("train_data.sources.wiki.targets=answers", "train_data.sources.wiki.targets=answers: a text source trains on all"),
    ("max_seq_len=24", "train_data.sources.vars.task_kwargs: problems of up to 50 tokens"),  # depth 2: 48 bytes + 2
])
def test_bad_mixture_sections_are_one_line_errors(text_corpus: Path, override: str, message: str):
    with pytest.raises(UserError) as error:  # a RecipeError, or a DataError for the missing file
        build_dataloaders(load_recipe(RECIPE, [*tiny(text_corpus), override, "eval_data.source=x"]), 1, 0)
    assert message in str(error.value) and "\n" not in str(error.value)


def test_a_mixture_needs_sources():
    with pytest.raises(RecipeError, match=r"train_data.sources is required for a mixture"):
        load_recipe(REPO / "recipes" / "cpu_tiny_text.yaml", ["train_data.kind=mixture"])


def test_learned_positions_end_at_max_seq_len_with_a_clear_error():
    from loopreg.configuration_loopreg import LoopedLMConfig
    from loopreg.model import LoopedLM

    model = LoopedLM(LoopedLMConfig(spec="1x2", vocab_size=16, d_model=8, n_heads=2, d_ff=16, max_seq_len=6,
                                    learned_positions=True))
    assert model(torch.zeros(1, 6, dtype=torch.long)).logits.shape == (1, 6, 16)
    with pytest.raises(UserError, match=r"7 positions exceed max_seq_len=6, the learned position table"):
        model(torch.zeros(1, 7, dtype=torch.long))


def test_a_source_set_to_null_is_off(text_corpus: Path):
    recipe = load_recipe(RECIPE, tiny(text_corpus, "train_data.sources.phop=null", "eval_data.sources.phop=null"))
    data = build_dataloaders(recipe, 1, 0)
    assert [e.label for e in data.evaluation] == ["wiki", "vars_d2", "vars_d4", "addition_n2", "addition_n3"]
    assert data.train.dataset.names == ["wiki", "vars", "addition"]
    with pytest.raises(RecipeError, match=r"train_data.sources is required"):
        load_recipe(RECIPE, [*tiny(text_corpus), *(f"train_data.sources.{n}=null" for n in
                                                   ("wiki", "vars", "phop", "addition"))])
