"""Every synthetic generator against an independent solver written here from the task definitions."""

from __future__ import annotations

import contextlib
import io
import itertools
import random
import re
import string
from collections import Counter

import pytest
import torch

from loopreg.data.synthetic import (
    Multiplication,
    NaryAddition,
    PHop,
    SymbolicIGSM,
    VariableAssignment,
)
from loopreg.data.synthetic.phop import find_1, find_p, hop_p, prefix_hops
from loopreg.data.synthetic.primitives import SHOT_SEPARATOR

SAMPLES = 300


def examples(task, count: int = SAMPLES, seed: int = 0):
    rng = random.Random(seed)
    return [task.sample(rng) for _ in range(count)]


# ---------------------------------------------------------------------------------------- addition
@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("sep", ["+", " + "])
def test_addition_matches_python_sum(reverse: bool, sep: str) -> None:
    task = NaryAddition(n_operands=(2, 4, 8, 16, 32), digits=3, reverse_answer=reverse, sep=sep)
    seen_counts = set()
    for example in examples(task):
        match = re.fullmatch(rf"\d{{3}}(?:{re.escape(sep)}\d{{3}})*=", example.prompt)
        assert match, example.prompt
        operands = [int(text) for text in re.findall(r"\d+", example.prompt)]
        seen_counts.add(len(operands))
        running, total = [], 0
        for operand in operands:
            total += operand
            running.append(str(total)[::-1] if reverse else str(total))
        assert example.answer == running[-1]
        assert example.cot == tuple(running[1:])
    assert seen_counts == {2, 4, 8, 16, 32}


def test_addition_exact_format() -> None:
    example = NaryAddition(n_operands=4).sample(random.Random(0))
    assert (example.prompt, example.answer, example.cot) == ("776+911+430+041=", "2158", ("1687", "2117", "2158"))
    assert NaryAddition(n_operands=4).render_cot(example) == "776+911+430+041=||1687 2117 2158 #### 2158"
    reversed_example = NaryAddition(n_operands=4, reverse_answer=True).sample(random.Random(0))
    assert (reversed_example.answer, reversed_example.cot) == ("8512", ("7861", "7112", "8512"))


def test_addition_real_operands_curriculum() -> None:
    """Every problem keeps its n slots; the non-zero operands number at most the drawn real count, the
    rest are 000, and the answer is still the sum."""
    task = NaryAddition(n_operands=(4, 8), real_operands=(1, 2), reverse_answer=True)
    real_counts = set()
    for example in examples(task):
        operands = [int(text) for text in example.prompt[:-1].split("+")]
        assert len(operands) in (4, 8)
        assert example.answer == str(sum(operands))[::-1]
        real_counts.add(sum(value != 0 for value in operands))
    assert real_counts <= {0, 1, 2} and {1, 2} <= real_counts
    with pytest.raises(ValueError, match="real_operands"):
        NaryAddition(real_operands=(0,))


# ------------------------------------------------------------------------------------------- p-hop
def naive_hop(sequence: str, hops: int) -> str | None:
    """Follow the hops directly: find the previous occurrence of the current token, step right."""
    position = len(sequence) - 1  # 0-indexed
    for _ in range(hops):
        token = sequence[position]
        previous = [q for q in range(position) if sequence[q] == token]
        if not previous:
            return None
        position = previous[-1] + 1
    return sequence[position]


def test_reference_definition_on_hand_cases() -> None:
    assert find_1("abcab", 5) == 3  # v_5 = b, previous b at 2, so j = 3
    assert find_1("abcab", 3) == 0  # c never occurred before
    assert find_1("aa", 2) == 2  # j = i is allowed: v_1 = v_2
    assert find_p("abcab", 5, 2) == 0
    assert hop_p("abcab", 1) == "c" and hop_p("abcab", 2) is None
    # abab, p=2: v_4 = b, previous b at 2 -> position 3 (a); previous a at 1 -> position 2 (b)
    assert find_p("abab", 4, 2) == 2 and hop_p("abab", 2) == "b"


def test_reference_hop_agrees_with_naive_on_random_sequences() -> None:
    rng = random.Random(1)
    for _ in range(2000):
        alphabet = string.ascii_lowercase[: rng.randint(2, 5)]
        sequence = "".join(rng.choice(alphabet) for _ in range(rng.randint(1, 24)))
        hops = rng.randint(1, 6)
        assert hop_p(sequence, hops) == naive_hop(sequence, hops), (sequence, hops)
        prefixes = [naive_hop(sequence[:i], hops) for i in range(1, len(sequence) + 1)]
        assert prefix_hops(sequence, hops) == prefixes, (sequence, hops)


@pytest.mark.parametrize(
    "alphabet_size, length, hops",
    [(4, 32, 4), (2, 9, 4), (2, 64, 16), (3, 20, 1), (26, 40, 8), (4, 256, 32)],
)
def test_phop_chain_always_exists_and_labels_follow_prefixes(alphabet_size: int, length: int, hops: int) -> None:
    task = PHop(alphabet_size=alphabet_size, length=length, hops=hops)
    count = 40 if length > 100 else SAMPLES
    for example in examples(task, count):
        assert len(example.prompt) == length and set(example.prompt) <= set(task.alphabet)
        assert example.answer in task.alphabet
        assert naive_hop(example.prompt, hops) == example.answer
        labels = example.position_labels
        assert labels is not None and len(labels) == length and labels[-1] == example.answer
        for i in range(0, length, max(1, length // 16)):
            assert labels[i] == (naive_hop(example.prompt[: i + 1], hops) or "_")


def test_phop_answers_are_not_degenerate() -> None:
    answers = {example.answer for example in examples(PHop(), 200)}
    assert answers == set("abcd")
    assert PHop(per_position_labels=False).sample(random.Random(0)).position_labels is None


# ------------------------------------------------------------------------------------------- i-GSM
STATEMENT = re.compile(r"([A-Z]#[A-Z]) := ([^.]+)\.")
TERM = re.compile(r"(?:(\d) \* )?([A-Z]#[A-Z])")
STEP = re.compile(r"([A-Z]#[A-Z])=([^=]+)=>\1=(\d)\.")


def parse_igsm(prompt: str) -> tuple[dict[str, str], str]:
    body, query = prompt.rsplit(" ", 1)
    statements = STATEMENT.findall(body)
    assert " ".join(f"{name} := {expr}." for name, expr in statements) == body, "prompt is not only statements"
    assert query.endswith("?")
    definitions = dict(statements)
    assert len(definitions) == len(statements), "a parameter is defined twice"
    return definitions, query[:-1]


def operands_of(expression: str) -> list[str]:
    return [name for _, name in TERM.findall(expression)]


def solve_igsm(definitions: dict[str, str], name: str, modulus: int, memo: dict[str, int]) -> int:
    if name not in memo:
        expression = definitions[name]
        if expression.isdigit():
            memo[name] = int(expression)
        else:
            pieces = re.split(r" ([+-]) ", expression)  # term, op, term, op, ...
            total = 0
            for sign, term in zip(["+"] + pieces[1::2], pieces[0::2]):
                coefficient, operand = re.fullmatch(r"(?:(\d) \* )?([A-Z]#[A-Z])", term).groups()
                value = int(coefficient or 1) * solve_igsm(definitions, operand, modulus, memo)
                total += value if sign == "+" else -value
            memo[name] = total % modulus
    return memo[name]


def needed_by(definitions: dict[str, str], query: str) -> set[str]:
    needed, frontier = set(), [query]
    while frontier:
        name = frontier.pop()
        if name not in needed:
            needed.add(name)
            frontier.extend(operands_of(definitions[name]))
    return needed


def longest_path(definitions: dict[str, str], name: str) -> int:
    return max((1 + longest_path(definitions, operand) for operand in operands_of(definitions[name])), default=0)


@pytest.mark.parametrize(
    "knobs",
    [
        {},
        {"num_ops": 12, "max_edges": 3, "max_depth": 4, "num_distractors": 6},
        {"num_ops": 5, "max_edges": 1, "max_depth": 4, "num_distractors": 2},
        {"num_ops": 1, "num_distractors": 3},
        {"num_ops": 20, "max_edges": 4, "max_depth": 2, "num_distractors": 0, "modulus": 5},
    ],
)
def test_igsm_matches_independent_solver(knobs: dict) -> None:
    task = SymbolicIGSM(**knobs)
    letter_level = {letter: index // task.entities_per_level for index, letter in enumerate(string.ascii_uppercase)}
    for example in examples(task, 200):
        definitions, query = parse_igsm(example.prompt)
        assert len(definitions) == task.num_ops + task.num_distractors
        for name in definitions:  # structure-graph edges go one level down
            assert letter_level[name[2]] == letter_level[name[0]] + 1 < task.levels
        for expression in definitions.values():
            assert len(operands_of(expression)) <= task.max_edges
        memo: dict[str, int] = {}
        answer = solve_igsm(definitions, query, task.modulus, memo)
        assert example.answer == str(answer)

        needed = needed_by(definitions, query)
        assert len(needed) == task.num_ops and len(definitions) - len(needed) == task.num_distractors
        assert longest_path(definitions, query) <= task.max_depth

        # the CoT evaluates exactly the needed parameters, operands first, with correct values
        steps = [STEP.fullmatch(step) for step in example.cot]
        assert all(steps), example.cot
        assert [step[1] for step in steps] == list(dict.fromkeys(step[1] for step in steps))
        assert {step[1] for step in steps} == needed and steps[-1][1] == query
        done: set[str] = set()
        for step in steps:
            name, expression, value = step.groups()
            assert expression == definitions[name].replace(" ", "")
            assert set(operands_of(definitions[name])) <= done
            assert int(value) == memo[name]
            done.add(name)

        # dropping the distractors leaves the answer unchanged
        kept = " ".join(f"{name} := {definitions[name]}." for name in definitions if name in needed)
        kept_definitions, _ = parse_igsm(f"{kept} {query}?")
        assert solve_igsm(kept_definitions, query, task.modulus, {}) == answer


def test_igsm_size_curriculum_draws_every_count_and_keeps_fixed_streams() -> None:
    curriculum = SymbolicIGSM(num_ops=(1, 3, 5), num_distractors=2)
    sizes = Counter()
    for example in examples(curriculum, 600):
        definitions, query = parse_igsm(example.prompt)
        needed = needed_by(definitions, query)
        assert len(example.cot) == len(needed) and len(definitions) == len(needed) + 2
        assert solve_igsm(definitions, query, curriculum.modulus, {}) == int(example.answer)
        sizes[len(needed)] += 1
    assert set(sizes) == {1, 3, 5} and min(sizes.values()) > 150, sizes
    # a one-count tuple is the fixed-size task, problem for problem
    assert examples(SymbolicIGSM(num_ops=(4,)), 50) == examples(SymbolicIGSM(num_ops=4), 50)


def test_igsm_uses_the_whole_answer_range_and_scrambles() -> None:
    sampled = examples(SymbolicIGSM(), 300)
    assert {example.answer for example in sampled} == set("0123456")
    # the generator defines the query first; scrambling puts its statement anywhere
    query_positions = set()
    for example in sampled:
        definitions, query = parse_igsm(example.prompt)
        query_positions.add(list(definitions).index(query))
    assert len(query_positions) > 5


# -------------------------------------------------------------------------------------- primitives
def solve_math(prompt: str) -> str:
    *assignments, query = prompt.split(", ")
    values = dict(assignment.split("=") for assignment in assignments)
    name = query.removesuffix("=?")
    while not values[name].isdigit():
        name = values[name]
    return values[name]


def solve_code(prompt: str) -> str:
    output = io.StringIO()
    with contextlib.redirect_stdout(output):
        exec(prompt, {})  # noqa: S102 - the generated program is the thing under test
    return output.getvalue().strip()


@pytest.mark.parametrize("depth", [0, 1])
@pytest.mark.parametrize("fmt", ["math", "code"])
def test_primitives_match_solver(depth: int, fmt: str) -> None:
    task = VariableAssignment(depth=depth, fmt=fmt, num_variables=4, min_value=0, max_value=99)
    solve = solve_math if fmt == "math" else solve_code
    for example in examples(task):
        assert solve(example.prompt) == example.answer
        if depth == 1:  # the query is an alias, never a constant
            query = re.search(r"([a-z])=\?$|print\(([a-z])\)", example.prompt).group(1, 2)
            assert max(filter(None, query)) >= "e"


def test_primitive_formats_exactly() -> None:
    cases = {
        (0, "math"): "a=6, b=6, c=0, b=?",
        (0, "code"): "a = 6\nb = 6\nc = 0\nprint(b)\n",
        (1, "math"): "a=6, b=6, c=0, d=b, e=c, f=a, e=?",
        (1, "code"): "a = 6\nb = 6\nc = 0\nd = b\ne = c\nf = a\nprint(e)\n",
    }
    for (depth, fmt), prompt in cases.items():
        example = VariableAssignment(depth=depth, fmt=fmt).sample(random.Random(0))
        assert (example.prompt, example.answer) == (prompt, "6" if depth == 0 else "0")
    # the paper's examples parse the same way
    assert solve_math("a=1, b=2, c=6, b=?") == "2" and solve_math("a=1, b=2, c=a, d=b, d=?") == "2"


def test_few_shot_prompt_exact_and_excludes_query() -> None:
    task = VariableAssignment(depth=1, fmt="code", num_variables=2)
    prompt = task.few_shot_prompt(random.Random(0), shots=2)
    assert prompt.prompt == (
        "a = 6\nb = 4\nc = b\nd = a\nprint(c)\n4\n\n"
        "a = 8\nb = 2\nc = b\nd = a\nprint(c)\n2\n\n"
        "a = 6\nb = 6\nc = a\nd = b\nprint(d)\n"
    )
    assert prompt.answer == "6"


@pytest.mark.parametrize("fmt", ["math", "code"])
def test_few_shot_shots_are_distinct_correct_and_never_the_query(fmt: str) -> None:
    # a tiny problem space (2 values ** 2 variables * 2 queries = 8) makes collisions likely if allowed
    task = VariableAssignment(depth=0, fmt=fmt, num_variables=2, min_value=0, max_value=1)
    gap = " " if fmt == "math" else ""
    solve = solve_math if fmt == "math" else solve_code
    rng = random.Random(3)
    for _ in range(100):
        few_shot = task.few_shot_prompt(rng, shots=5)
        *shots, query_prompt = few_shot.prompt.split(SHOT_SEPARATOR)
        assert len(shots) == 5
        assert query_prompt.endswith(gap)
        query_prompt = query_prompt[: len(query_prompt) - len(gap)]
        assert solve(query_prompt) == few_shot.answer
        shot_prompts = []
        for shot in shots:
            shot_prompt, answer = shot[: -1 - len(gap)], shot[-1]  # answers are one digit here
            assert shot[-1 - len(gap) : -1] == gap and solve(shot_prompt) == answer
            shot_prompts.append(shot_prompt)
        assert query_prompt not in shot_prompts and len(set(shot_prompts)) == 5
    with pytest.raises(ValueError, match="shots"):
        task.few_shot_prompt(rng, shots=8)


# ---------------------------------------------------------------------------------- multiplication
def from_reversed(text: str) -> int:
    return int("".join(reversed(text.split(" "))))


@pytest.mark.parametrize("digits", [1, 2, 4, 5])
def test_multiplication_matches_python_product(digits: int) -> None:
    task = Multiplication(digits=digits)
    for example in examples(task):
        left_text, right_text = example.prompt.split(" * ")
        left, right = from_reversed(left_text), from_reversed(right_text)
        assert 10 ** (digits - 1) <= left < 10**digits and 10 ** (digits - 1) <= right < 10**digits
        assert len(example.answer.split(" ")) == 2 * digits
        assert from_reversed(example.answer) == left * right
        assert len(example.cot) == digits
        running = 0
        for place, step in enumerate(example.cot):
            match = re.fullmatch(r"([\d ]+?)(?: \( ([\d ]+) \))?", step)
            partial_text, sum_text = match.groups()
            assert len(partial_text.split(" ")) == digits + 1 + place
            digit = right // 10**place % 10
            assert from_reversed(partial_text) == left * digit * 10**place
            running += left * digit * 10**place
            has_sum = 0 < place < digits - 1
            assert (sum_text is not None) == has_sum
            if has_sum:
                assert len(sum_text.split(" ")) == digits + 1 + place and from_reversed(sum_text) == running


class ScriptedOperands(random.Random):
    """An RNG whose ``randrange`` returns the given operands in order, to rebuild a known problem."""

    def __init__(self, *operands: int) -> None:
        super().__init__(0)
        self.operands = list(operands)

    def randrange(self, *_: object, **__: object) -> int:
        return self.operands.pop(0)


def test_multiplication_renders_the_icot_line() -> None:
    # a line of Deng et al.'s 4x4 data: 5431 * 3918
    expected = (
        "1 3 4 5 * 8 1 9 3||8 4 4 3 4 + 0 1 3 4 5 0 ( 8 5 7 7 9 0 ) + 0 0 9 7 8 8 4 ( 8 5 6 5 8 9 4 ) "
        "+ 0 0 0 3 9 2 6 1 #### 8 5 6 8 7 2 1 2"
    )
    task = Multiplication(digits=4)
    assert task.render_cot(task.sample(ScriptedOperands(5431, 3918))) == expected


def test_igsm_has_no_shortcut_around_its_chain() -> None:
    """Every constant the query reads moves its answer (no ``X − X`` cancellation), so neither the majority
    answer nor a linear probe on shallow features (digits, signs, statement count, the query's letters)
    beats chance on held-out problems of the CPU-mini setting's scored size (``recipes/cpu_igsm.yaml``, its
    largest ``num_ops``; the smaller ones are the training curriculum's lookups)."""
    from loopreg.config import load_recipe

    from .conftest import REPO

    knobs = load_recipe(REPO / "recipes" / "cpu_igsm.yaml").train_data.task_kwargs
    task = SymbolicIGSM(**{**knobs, "num_ops": max(SymbolicIGSM(**knobs).op_counts)})
    sampled = list(itertools.islice(task.stream("train", seed=0), 4000))
    for example in sampled[:300]:
        definitions, query = parse_igsm(example.prompt)
        for name in needed_by(definitions, query):
            if definitions[name].isdigit():  # a constant the query reads: change it, the answer changes
                moved = {**definitions, name: str((int(definitions[name]) + 1) % task.modulus)}
                assert solve_igsm(moved, query, task.modulus, {}) != int(example.answer), example.prompt

    def features(example) -> list[float]:
        text, query = example.prompt, example.prompt.split()[-1]
        return [*(text.count(d) for d in "0123456"), text.count("-"), text.count("+"), text.count(":="),
                *(float(query[0] == c) for c in "ABCDEFGHIJKL"), *(float(query[2] == c) for c in "EFGHIJKLMNOP")]

    train, test = sampled[:3000], sampled[3000:]
    x = torch.tensor([features(e) for e in train]), torch.tensor([features(e) for e in test])
    y = torch.tensor([int(e.answer) for e in train]), torch.tensor([int(e.answer) for e in test])
    chance = 1 / task.modulus
    majority = Counter(e.answer for e in train).most_common(1)[0][0]
    assert sum(e.answer == majority for e in test) / len(test) < chance + 0.04
    torch.manual_seed(0)
    probe = torch.nn.Linear(x[0].shape[1], task.modulus)
    optimizer = torch.optim.Adam(probe.parameters(), lr=0.05)
    mean, std = x[0].mean(0), x[0].std(0) + 1e-6
    for _ in range(300):
        optimizer.zero_grad()
        torch.nn.functional.cross_entropy(probe((x[0] - mean) / std), y[0]).backward()
        optimizer.step()
    accuracy = (probe((x[1] - mean) / std).argmax(-1) == y[1]).float().mean().item()
    assert accuracy < chance + 0.05, accuracy
