"""CoT-to-latent distillation: paired renderings, latent-thought forward, loss terms, curriculum, algorithm."""

from __future__ import annotations

import copy
import itertools
import json
import random
from pathlib import Path

import pytest
import torch
from composer.core import Callback

from loopreg.algorithms.cot_distillation import (CoTDistillation, DistillationStudent, LatentCurriculum,
                                                 WeightSchedule, cot_distillation_loss, hidden_layer_map)
from loopreg.data import IGNORE_INDEX
from loopreg.data.paired import PairedData, ProblemStream, read_jsonl_problems
from loopreg.data.tasks import pad_collate
from loopreg.data.synthetic import build_task
from loopreg.errors import UserError
from loopreg.model import LoopedLM, LoopedLMConfig, LoopedLMOutput, batch_option, rotary
from loopreg.spec import LoopSpec

REPO = Path(__file__).resolve().parents[1]
SUM_TASK = {"n_operands": 5, "digits": 1, "modulus": 10}


def student_for(data: PairedData, spec: str = "1x5", feedback: str = "soft_token", per_step: int = 1,
                d_model: int = 32, seed: int = 0, learned_positions: bool = False) -> LoopedLM:
    torch.manual_seed(seed)
    return LoopedLM(LoopedLMConfig(spec=spec, vocab_size=data.vocab_size, d_model=d_model, n_heads=4, d_ff=64,
                                   mlp="gelu", max_seq_len=200, placeholder_id=data.placeholder_id,
                                   placeholders_per_step=per_step, latent_feedback=feedback,
                                   learned_positions=learned_positions))


# ------------------------------------------------------------------------------------ paired data
@pytest.mark.parametrize("task, knobs", [("addition", SUM_TASK), ("addition", {"n_operands": 4}),
                                         ("igsm", {"num_ops": 4}), ("multiplication", {"digits": 3})])
def test_paired_renderings_agree_on_the_answer(task, knobs):
    data = PairedData.from_task(task, **knobs)
    for problem in data.test_set(5, seed=0):
        example = next(e for e in data.task.fixed_set("test", 5, seed=0) if e.prompt == problem.question)
        assert data.text(data.render(problem, 0)) == f"<bos>{data.task.render_cot(example)}"  # + <eos> as label
        for latent_steps in range(len(problem.steps) + 1):
            for per_step in (1, 2):
                item = data.render(problem, latent_steps, per_step)
                answer = item["labels"][item["answer_mask"]].tolist()
                assert data.tokenizer.decode(answer[:-1], skip_special_tokens=False) == problem.answer
                assert answer[-1] == data.eos_id
                ids = item["input_ids"].tolist()
                assert ids.count(data.placeholder_id) == (latent_steps + (latent_steps > 0)) * per_step  # + echo
                # the answer trigger is the last token of " #### " and predicts the first answer token
                trigger = int(item["trigger"])
                assert data.tokenizer.decode(ids[trigger - 5:trigger + 1]) == " #### "
                assert item["labels"][trigger] == data.ids(problem.answer)[0]
                gold = [t for t in item["step_labels"].tolist() if t != IGNORE_INDEX]
                assert gold == [t for step in problem.steps[:latent_steps] for t in data.ids(step)[:per_step]]
                kept_text = [t for t in item["cot_labels"].tolist() if t != IGNORE_INDEX]
                if latent_steps < len(problem.steps):
                    tail = data.step_separator.join(problem.steps[latent_steps:]) + " #### "
                    assert data.tokenizer.decode(kept_text) == tail
                else:
                    assert kept_text == []


@pytest.mark.parametrize("from_first", [False, True])
def test_modular_addition_cot_is_running_sums_mod_m(from_first):
    task = build_task("addition", **SUM_TASK, cot_from_first=from_first)
    for example in task.fixed_set("train", 50, seed=1):
        digits = [int(d) for d in example.prompt[:-1].split("+")]
        sums = [sum(digits[:k + 1]) % 10 for k in range(0 if from_first else 1, len(digits))]
        assert example.cot == tuple(map(str, sums)) and example.answer == str(sums[-1])


def test_jsonl_adapter_and_malformed_lines(tmp_path):
    good = tmp_path / "cot.jsonl"
    good.write_text("\n".join(json.dumps({"question": f"{a}+{b}=", "cot": [str(a), str(a + b)], "answer": str(a + b)})
                              for a, b in [(1, 2), (3, 4), (2, 2)]) + "\n")
    data = PairedData.from_jsonl(good)
    assert data.test_set(5, seed=0)[0].steps == ("1", "3")
    assert data.text(data.render(data.problems[1], 1)) == "<bos>3+4=||<ph><ph>7 #### 7"
    for line, fragment in [("not json", ":2: not valid JSON"), ('{"question": "x", "answer": "1"}', ":2: missing key"),
                           ('{"question": "x", "cot": [], "answer": "1"}', ":2: 'cot' must be a non-empty list")]:
        bad = tmp_path / "bad.jsonl"
        bad.write_text(good.read_text().splitlines()[0] + "\n" + line + "\n")
        with pytest.raises(ValueError, match=fragment) as err:
            read_jsonl_problems(bad)
        assert str(bad) in str(err.value) and "\n" not in str(err.value)


@pytest.mark.parametrize("source", ["task", "jsonl"])
def test_problem_stream_resumes_and_shards_exactly(source, tmp_path):
    if source == "task":
        data = PairedData.from_task("addition", **SUM_TASK)
    else:
        path = tmp_path / "p.jsonl"
        path.write_text("".join(json.dumps({"question": f"{i}=", "cot": [str(i)], "answer": str(i)}) + "\n"
                                for i in range(50)))
        data = PairedData.from_jsonl(path)
    single = list(itertools.islice(iter(ProblemStream(data, seed=3, batch_size=4)), 40))
    ranks = [list(itertools.islice(iter(ProblemStream(data, 3, rank, 2, 2)), 20)) for rank in (0, 1)]
    assert [p for pair in zip(*ranks) for p in pair] == single  # two ranks see the one-process batches
    resumed = ProblemStream(data, seed=3, batch_size=4)
    resumed.load_state_dict(ProblemStream(data, 3, batch_size=4).state_dict(num_samples=24))
    assert list(itertools.islice(iter(resumed), 16)) == single[24:]


# ------------------------------------------------------------------------- latent-thought forward
def reference_forward(model: LoopedLM, ids: torch.Tensor) -> torch.Tensor:
    """Soft-token feedback written out step by step (no vectorisation), for a ``1xL`` model."""
    c = model.config.placeholders_per_step
    steps = model.placeholder_steps(ids)
    x = model.embed(ids)
    positions = torch.arange(ids.shape[1]).expand_as(ids)
    if model.config.learned_positions:
        x = x + model.position_embed(positions)
    rope = rotary(positions, model.config.head_dim, model.config.rope_theta, x.dtype)
    for loop in range(model.spec.effective_depth):
        start = x
        x = model.layers[0](x, rope)
        if model.config.latent_mask:  # only placeholders of steps >= loop and what follows them change
            for b in range(ids.shape[0]):
                first = int((steps[b] >= 0).nonzero()[0])
                for t in range(ids.shape[1]):
                    if t < first and steps[b, t] < 0 or 0 <= steps[b, t] < loop:
                        x = x.clone()
                        x[b, t] = start[b, t]
        new = x.clone()
        for b in range(ids.shape[0]):
            for t in range(ids.shape[1]):
                if steps[b, t] == loop and t + c < ids.shape[1] and steps[b, t + c] == loop + 1:
                    probs = model.lm_head(model.norm(x[b, t])).softmax(-1)
                    new[b, t + c] = probs @ model.embed.weight
                    if model.config.learned_positions:
                        new[b, t + c] += model.position_embed.weight[t + c]
        x = new
    return model.lm_head(model.norm(x))


@pytest.mark.parametrize("per_step, learned, mask", [(1, False, False), (2, False, False), (2, True, True)])
def test_soft_token_forward_matches_reference_and_cache(per_step, learned, mask):
    data = PairedData.from_task("addition", **SUM_TASK)
    model = student_for(data, per_step=per_step, learned_positions=learned).eval()
    model.config.latent_mask = mask
    batch = pad_collate([data.render(p, 4, per_step) for p in data.test_set(3, seed=0)])
    with torch.no_grad():
        torch.testing.assert_close(model(batch["input_ids"]).logits, reference_forward(model, batch["input_ids"]),
                                   rtol=1e-5, atol=1e-5)
        residual = copy.deepcopy(model)
        residual.config.latent_feedback, residual.config.latent_mask = "residual", False
        assert not torch.allclose(residual(batch["input_ids"]).logits, model(batch["input_ids"]).logits)  # it matters
        prompt = torch.tensor([data.prompt_ids(p, latent=True, per_step=per_step) for p in data.test_set(3, seed=0)])
        run = dict(max_new_tokens=4, do_sample=False, pad_token_id=0)
        cached = model.generate(prompt, use_cache=True, **run)
        uncached = model.generate(prompt, use_cache=False, **run)
    assert torch.equal(cached, uncached)


def test_grad_loops_and_checkpoint():
    data = PairedData.from_task("addition", **SUM_TASK)
    model = student_for(data)
    ids = pad_collate([data.render(p, 4) for p in data.test_set(2, seed=0)])["input_ids"]

    def grads(**options):
        model.zero_grad()
        out = model(ids, **options).logits
        out.square().mean().backward()
        return out.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}

    full_out, full = grads()
    ckpt_out, ckpt = grads(checkpoint=True)
    short_out, short = grads(grad_loops=2)
    assert torch.equal(full_out, ckpt_out) and torch.equal(full_out, short_out)  # same values
    for name in full:
        torch.testing.assert_close(ckpt[name], full[name], rtol=1e-5, atol=1e-7)
    assert short["embed.weight"].abs().sum() > 0  # skipped loops count as identity: the embedding still learns
    assert not torch.allclose(short["layers.0.mlp.up_proj.weight"], full["layers.0.mlp.up_proj.weight"])


def test_soft_token_and_learned_position_models_refuse_the_llama_export(tmp_path):
    from loopreg.surgery.export import export_unrolled

    common = {"spec": "1x2", "vocab_size": 24, "d_model": 32, "n_heads": 4, "mlp": "swiglu"}
    for model in (LoopedLM(LoopedLMConfig(**common, placeholder_id=3, latent_feedback="soft_token")),
                  LoopedLM(LoopedLMConfig(**common, learned_positions=True))):
        with pytest.raises(ValueError, match="no Llama equivalent"):
            export_unrolled(model, tmp_path / "out")


def test_loop_ends_follow_the_thinking_block():
    assert LoopSpec.parse("1x8").loop_ends == tuple(range(8))
    assert LoopSpec.parse("2x(1,3,1)").loop_ends == (3, 5, 7)
    assert LoopSpec.parse("2x1+4x3+2x1").with_loops([1, 2, 1]).loop_ends == (5, 9)
    assert hidden_layer_map(3, 6) == [(0, 1), (1, 3), (2, 5)]
    assert hidden_layer_map(4, 2) == [(0, 0), (1, 0), (2, 1), (3, 1)]  # a shallower student: never application -1


# ----------------------------------------------------------------------------------- loss terms
def test_hidden_and_kl_vanish_when_the_student_is_the_teacher():
    data = PairedData.from_task("addition", **SUM_TASK)
    model = student_for(data, spec="2x1", feedback="residual")
    batch = pad_collate([data.render_pair(p, 0) for p in data.test_set(4, seed=0)])  # identical inputs
    terms = cot_distillation_loss(model, batch, teacher=copy.deepcopy(model))
    assert terms["hidden"].item() == 0.0 and abs(terms["kl"].item()) < 1e-7
    assert terms["answer"].item() > 0 and terms["cot"].item() > 0
    latent = pad_collate([data.render_pair(p, 3) for p in data.test_set(4, seed=0)])
    hidden = cot_distillation_loss(model, latent, teacher=copy.deepcopy(model), weights={"hidden": 1.0})["hidden"]
    assert hidden.item() > 0  # placeholders instead of the CoT change the trigger's hidden state


def test_step_ce_reads_the_diagonal():
    """Diagonal step CE equals CE of placeholder j's state after loop j, computed by hand."""
    data = PairedData.from_task("addition", **SUM_TASK)
    model = student_for(data)
    batch = pad_collate([data.render_pair(p, 4) for p in data.test_set(3, seed=0)])
    step = cot_distillation_loss(model, batch, weights={"step": 1.0})["step"]
    states = model(batch["input_ids"], output_hidden=True).hidden_states
    steps = model.placeholder_steps(batch["input_ids"])
    losses = []
    for b, t in zip(*torch.nonzero((steps >= 0) & (batch["step_labels"] != IGNORE_INDEX), as_tuple=True)):
        logits = model.lm_head(model.norm(states[int(steps[b, t])][b, t]))
        losses.append(torch.nn.functional.cross_entropy(logits[None], batch["step_labels"][b, t][None]))
    torch.testing.assert_close(step, torch.stack(losses).mean())
    final = cot_distillation_loss(model, batch, weights={"step": 1.0}, step_read="final")["step"]
    assert not torch.isclose(final, step)


@pytest.mark.parametrize("term", ["answer", "cot", "step", "hidden", "kl"])
def test_short_run_lowers_each_term_and_teacher_gets_no_gradient(term):
    data = PairedData.from_task("addition", **SUM_TASK)
    student = student_for(data, seed=1)
    teacher = student_for(data, spec="2x1", feedback="residual", seed=2).requires_grad_(False)
    teacher_before = {n: p.clone() for n, p in teacher.named_parameters()}
    optimizer = torch.optim.AdamW(student.parameters(), lr=3e-3)
    rng, stream = random.Random(0), data.train_problems(0, itertools.count())
    batches = [pad_collate([data.render_pair(next(stream), rng.randint(0, 3)) for _ in range(32)])
               for _ in range(4)]
    history = []
    for step in range(25):
        value = cot_distillation_loss(student, batches[step % 4], teacher=teacher, weights={term: 1.0})[term]
        optimizer.zero_grad()
        value.backward()
        optimizer.step()
        history.append(value.item())
    assert sum(history[-4:]) < 0.9 * sum(history[:4])
    assert all(p.grad is None for p in teacher.parameters())
    assert all(torch.equal(p, teacher_before[n]) for n, p in teacher.named_parameters())


# ---------------------------------------------------------------------------------- curriculum
def test_curriculum_stages_smoothing_and_mixing():
    curriculum = LatentCurriculum(every="100ba", start=1, max_stage=4)
    assert [curriculum.stage_at(t) for t in (0, 99, 100, 250, 10_000)] == [1, 1, 2, 3, 4]
    assert LatentCurriculum(start=3).stage_at(10_000) == 3
    rng = random.Random(0)
    smooth = LatentCurriculum(smoothing=2)
    assert {smooth.latent_steps(2, 7, rng) for _ in range(200)} == {2, 3, 4}
    assert {smooth.latent_steps(6, 7, rng) for _ in range(50)} == {6, 7}  # capped at the step count
    mixed = LatentCurriculum(mix_prob=1.0)
    assert {mixed.latent_steps(3, 7, rng) for _ in range(200)} == {0, 1, 2}
    assert WeightSchedule({"0ba": 1.0, "10ba": 0.0}).at_value(5) == 0.5
    with pytest.raises(ValueError, match="one unit"):
        WeightSchedule({"0ba": 1.0, "0.5dur": 0.0})


# ------------------------------------------------------------------------------ in the Trainer
def distill_overrides(tmp_path: Path, *extra: str) -> list[str]:
    return ["model.d_model=32", "model.n_heads=2", "model.d_ff=64", "global_train_batch_size=8",
            "device_train_microbatch_size=4", "device_eval_batch_size=50", "eval_data.eval_size=50",
            "eval_interval=1000ba", "progress_bar=false", "log_to_console=false",
            f"export_folder={tmp_path}/model", *extra]


def test_algorithm_curriculum_resumes_from_checkpoint(tmp_path):
    from composer.loggers import InMemoryLogger

    from loopreg.config import load_recipe
    from loopreg.train import build_trainer

    recipe_path = REPO / "recipes" / "distill" / "cpu_sum_teacher.yaml"
    common = distill_overrides(tmp_path, "algorithms.cot_distillation.curriculum.every=2ba",
                               "algorithms.cot_distillation.curriculum.reset_optimizer=true",
                               "algorithms.cot_distillation.weights.step=1.0", "model.spec=1x8",
                               f"save_folder={tmp_path}/ckpt", "save_interval=3ba")
    trainer = build_trainer(load_recipe(recipe_path, [*common, "max_duration=3ba", "loggers.in_memory={}"]))
    logger = next(d for d in trainer.logger.destinations if isinstance(d, InMemoryLogger))
    trainer.fit()
    algorithm = next(a for a in trainer.state.algorithms if isinstance(a, CoTDistillation))
    assert [v for _, v in logger.data["distill/stage"]] == [0, 0, 1]
    assert algorithm.stage == 1
    trainer.close()
    resumed = build_trainer(load_recipe(recipe_path, [*common, "max_duration=5ba",
                                                      f"load_path={tmp_path}/ckpt/ep0-ba3-rank0.pt"]))
    restored = next(a for a in resumed.state.algorithms if isinstance(a, CoTDistillation))
    assert restored.stage == 1 and int(resumed.state.timestamp.batch) == 3
    resumed.fit()
    assert restored.stage == 2
    resumed.close()


def test_distill_recipes_train_with_teacher_and_log_each_term(tmp_path):
    from composer.loggers import InMemoryLogger

    from loopreg.config import load_recipe
    from loopreg.train import build_trainer

    teacher_recipe = load_recipe(REPO / "recipes" / "distill" / "cpu_sum_teacher.yaml",
                                 distill_overrides(tmp_path / "teacher", "max_duration=2ba"))
    trainer = build_trainer(teacher_recipe)
    trainer.fit()
    trainer.close()
    student_recipe = load_recipe(REPO / "recipes" / "distill" / "cpu_sum_student.yaml",
                                 distill_overrides(tmp_path / "student", "max_duration=2ba", "model.d_model=48",
                                                   f"algorithms.cot_distillation.teacher={tmp_path}/teacher/model",
                                                   "loggers.in_memory={}"))
    trainer = build_trainer(student_recipe)
    logger = next(d for d in trainer.logger.destinations if isinstance(d, InMemoryLogger))
    trainer.fit()
    for term in ("answer", "cot", "step", "hidden", "kl"):
        assert f"loss/train/{term}" in logger.data, term
    # the batch is rendered with the model's placeholders per step (2 in this recipe): whole groups only
    counts = (trainer.state.batch["input_ids"] == 3).sum(-1)
    assert bool((counts % 2 == 0).all()) and bool((counts > 0).any())
    model = trainer.state.model
    assert model.distill_projection.weight.shape == (32, 48)  # widths differ: a trained projection
    assert any(p is model.distill_projection.weight for g in trainer.state.optimizers[0].param_groups
               for p in g["params"])
    trainer.close()
    assert LoopedLM.from_pretrained(tmp_path / "student" / "model").config.latent_feedback == "soft_token"


@pytest.mark.parametrize("override, fragment", [
    ("model.vocab_size=30", "vocab_size 24 but the student has 30"),
    ("model.placeholder_id=4", "model.placeholder_id=4 must be the data's <ph> token id (3)"),
    ("algorithms.cot_distillation.weights.stpe=1.0", "unknown term(s) ['stpe']"),
    ("algorithms.cot_distillation.teacher=/nonexistent", "/nonexistent/config.json: not found"),
])
def test_mismatches_are_one_line_errors_exit_2(tmp_path, override, fragment, capsys):
    from loopreg.cli import main as loopreg_main

    teacher = tmp_path / "teacher"
    LoopedLM(LoopedLMConfig(spec="1x1", vocab_size=24, d_model=32, n_heads=2)).save_pretrained(teacher)
    argv = ["train", str(REPO / "recipes" / "distill" / "cpu_sum_student.yaml"),
            *distill_overrides(tmp_path, "max_duration=1ba"), f"algorithms.cot_distillation.teacher={teacher}",
            override]
    with pytest.raises(SystemExit) as exit_info:
        loopreg_main(argv)
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1 and fragment in err


def test_gpu_distill_recipes_run_tiny_on_cpu(tmp_path):
    """The GPU-scale 4x4 multiplication teacher and middle-looped student recipes, shrunk, train on the CPU."""
    from loopreg.config import load_recipe
    from loopreg.train import build_trainer

    tiny = ["device=cpu", "precision=fp32", "model.d_model=32", "model.n_heads=2", "global_train_batch_size=4",
            "device_train_microbatch_size=2", "device_eval_batch_size=8", "eval_data.eval_size=8", "max_duration=1ba",
            "eval_interval=1ba", "progress_bar=false", "log_to_console=false", "autoresume=false", "save_folder=null",
            "callbacks={}"]
    for name, extra in [("teacher", []), ("student", [f"algorithms.cot_distillation.teacher={tmp_path}/teacher"])]:
        recipe = load_recipe(REPO / "recipes" / "distill" / f"gpu_mult4x4_{name}.yaml",
                             [*tiny, f"export_folder={tmp_path}/{name}", *extra])
        trainer = build_trainer(recipe)
        trainer.fit()
        trainer.close()
    student = LoopedLM.from_pretrained(tmp_path / "student")
    assert student.num_distinct_layers == 6 and student.spec.effective_depth == 14


class RecordBatches(Callback):
    """The training batches as the model gets them (callbacks run after the algorithms)."""

    def __init__(self) -> None:
        self.batches: list[dict[str, torch.Tensor]] = []

    def after_dataloader(self, state, logger) -> None:
        self.batches.append({key: value.clone() for key, value in state.batch.items()})


def test_random_loop_counts_cover_the_latent_steps(tmp_path):
    from composer.loggers import InMemoryLogger

    from loopreg.config import load_recipe
    from loopreg.train import build_trainer

    recipe = load_recipe(REPO / "recipes" / "distill" / "cpu_sum_teacher.yaml", distill_overrides(
        tmp_path, "max_duration=6ba", "model.spec=1x4", "algorithms.cot_distillation.loops=[2,7]",
        "algorithms.cot_distillation.curriculum.start=3", "algorithms.cot_distillation.weights.step=1.0",
        "loggers.in_memory={}"))
    batches = RecordBatches()
    trainer = build_trainer(recipe, extra_callbacks=[batches])
    logger = next(d for d in trainer.logger.destinations if isinstance(d, InMemoryLogger))
    trainer.fit()
    trainer.close()
    loops = [v for _, v in logger.data["distill/loops"]]
    assert len(loops) == 6 and all(2 <= n <= 7 for n in loops) and len(set(loops)) > 1
    # the batch carries the count the student runs: per row (Composer splits it), at least the 3 latent steps
    assert all(batch["loops"].shape == (8,) for batch in batches.batches)
    assert [batch_option(batch["loops"]) for batch in batches.batches] == [max(n, 3) for n in loops]


def test_student_forward_reads_what_the_loss_needs_and_eval_runs_plain():
    data = PairedData.from_task("addition", **SUM_TASK)
    student = DistillationStudent(student_for(data, spec="1x5"), teacher_depth=2).train()
    batch = pad_collate([data.render_pair(p, 4) for p in data.test_set(3, seed=0)])
    batch["loops"] = torch.full((3,), 6)
    layout = student.layout(6)
    assert layout.loop_ends == tuple(range(6)) and layout.hidden_pairs == ((0, 2), (1, 5))
    assert student.layout(6) is layout  # resolved once per loop count
    out = student(batch)
    assert isinstance(out, LoopedLMOutput) and sorted(out.hidden_states) == list(layout.student_reads)
    torch.testing.assert_close(out.logits, student.model(batch["input_ids"], loops=6).logits, rtol=0, atol=0)
    assert torch.equal(student.eval_forward(batch, out), out.logits)
    assert torch.equal(student.eval_forward(batch), out.logits)  # the metrics get plain logits


def test_projection_is_trained_and_checkpointed_from_the_first_step(tmp_path):
    from loopreg.config import load_recipe
    from loopreg.train import build_trainer

    LoopedLM(LoopedLMConfig(spec="2x1", vocab_size=24, d_model=32, n_heads=2, placeholder_id=3)).save_pretrained(
        tmp_path / "teacher")
    common = distill_overrides(tmp_path, "model.d_model=48", f"algorithms.cot_distillation.teacher={tmp_path}/teacher",
                               f"save_folder={tmp_path}/ckpt", "save_interval=2ba", "scheduler.t_warmup=0ba")
    recipe_path = REPO / "recipes" / "distill" / "cpu_sum_student.yaml"
    trainer = build_trainer(load_recipe(recipe_path, [*common, "max_duration=2ba"]))
    projection = trainer.state.model.distill_projection.weight
    assert projection.shape == (32, 48)
    assert [len(group["params"]) for group in trainer.state.optimizers[0].param_groups] == \
        [len(list(trainer.state.model.parameters()))]  # one group: the projection is an ordinary parameter
    initial = projection.detach().clone()
    trainer.fit()
    trained, moments = projection.detach().clone(), trainer.state.optimizers[0].state[projection]["exp_avg"].clone()
    assert not torch.equal(trained, initial)
    trainer.close()
    resumed = build_trainer(load_recipe(recipe_path, [*common, "max_duration=3ba",
                                                      f"load_path={tmp_path}/ckpt/ep0-ba2-rank0.pt"]))
    restored = resumed.state.model.distill_projection.weight
    assert torch.equal(restored, trained)
    assert torch.equal(resumed.state.optimizers[0].state[restored]["exp_avg"], moments)
    resumed.fit()
    assert not torch.equal(restored, trained)
    resumed.close()


@pytest.mark.parametrize("override, line", [
    ("algorithms.cot_distillation.weights.stpe=1.0",
     "algorithms.cot_distillation.weights: unknown term(s) ['stpe']; valid: ['answer', 'cot', 'step', 'hidden', 'kl']"),
    ("algorithms.cot_distillation.weights.kl={0ba: 1.0, 0.5dur: 0.0}",
     "algorithms.cot_distillation.weights.kl: all times must share one unit, got ['ba', 'dur']"),
    ("algorithms.cot_distillation.curriculum.every=0ba",
     "algorithms.cot_distillation.curriculum: every must be a positive time, got '0ba'"),
    ("algorithms.cot_distillation.curriculum.evry=2ba",
     "algorithms.cot_distillation.curriculum: unknown key(s) ['evry']; valid: ['every', 'start', 'max_stage', "
     "'smoothing', 'mix_prob', 'reset_optimizer']"),
    ("algorithms.cot_distillation.step_read=diag",
     "algorithms.cot_distillation.step_read: must be 'diagonal' or 'final', got 'diag'"),
    ("algorithms.cot_distillation.teacher=null",
     "algorithms.cot_distillation.teacher: weights for 'hidden'/'kl' need a teacher (a model folder or 'self')"),
])
def test_algorithm_errors_name_their_key_once(tmp_path, override, line):
    from loopreg.config import load_recipe
    from loopreg.train import build_trainer

    recipe = load_recipe(REPO / "recipes" / "distill" / "cpu_sum_student.yaml",
                         distill_overrides(tmp_path, "max_duration=1ba", override))
    with pytest.raises(UserError) as err:
        build_trainer(recipe)
    assert str(err.value) == line


def test_paired_data_without_the_algorithm_is_a_one_line_error(tmp_path, capsys):
    from loopreg.cli import main as loopreg_main

    recipe = REPO / "recipes" / "distill" / "cpu_sum_teacher.yaml"
    assert "cot_distillation:" in recipe.read_text()
    with pytest.raises(SystemExit) as exit_info:  # null turns the recipe's algorithm off
        loopreg_main(["train", str(recipe), *distill_overrides(tmp_path, "max_duration=1ba"),
                      "algorithms.cot_distillation=null"])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err == ("error: train_data.kind: paired data is raw CoT problems that only the "
                                       "cot_distillation algorithm renders; add algorithms.cot_distillation "
                                       "(see recipes/distill/)\n")


def test_batches_are_rendered_in_the_main_process_whatever_the_workers(tmp_path):
    """The stage lives in the main process, and so does the rendering: DataLoader workers only load raw problems."""
    from composer.loggers import InMemoryLogger

    from loopreg.config import load_recipe
    from loopreg.train import build_trainer

    runs = []
    for workers in (0, 2):
        recipe = load_recipe(REPO / "recipes" / "distill" / "cpu_sum_teacher.yaml", distill_overrides(
            tmp_path / str(workers), "max_duration=3ba", "algorithms.cot_distillation.curriculum.every=1ba",
            "algorithms.cot_distillation.weights.step=1.0", "model.spec=1x8", f"train_data.num_workers={workers}",
            "loggers.in_memory={}"))
        batches = RecordBatches()
        trainer = build_trainer(recipe, extra_callbacks=[batches])
        logger = next(d for d in trainer.logger.destinations if isinstance(d, InMemoryLogger))
        trainer.fit()
        runs.append(({key: [float(v) for _, v in logger.data[key]] for key in ("distill/stage", "loss/train/step")},
                     batches.batches))
        trainer.close()
    (logs, batches), (worker_logs, worker_batches) = runs
    assert logs == worker_logs and logs["distill/stage"] == [0.0, 1.0, 2.0]
    placeholders = [int((batch["input_ids"] == 3).sum()) for batch in batches]
    assert placeholders[0] == 0 < placeholders[1] < placeholders[2]  # rendered at each batch's own stage
    assert all(torch.equal(a[key], b[key]) for a, b in zip(batches, worker_batches, strict=True) for key in a)
