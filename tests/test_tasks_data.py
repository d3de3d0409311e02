"""The synthetic-task data pipeline: encoding, streams split across ranks, the answer metric, training."""

import torch
from composer.loggers import InMemoryLogger

from loopreg.data import IGNORE_INDEX
from loopreg.config import load_recipe
from loopreg.data.synthetic import NaryAddition, PHop
from loopreg.data.tasks import AnswerExactMatch, FixedSet, TaskData, TrainStream, pad_collate
from loopreg.train import build_trainer

from .conftest import REPO


def test_answer_only_encoding_puts_labels_on_answer_and_eos():
    data = TaskData(NaryAddition(n_operands=2))
    example = data.task.fixed_set("test", 1, seed=0)[0]
    item = data.encode(example)
    text = example.prompt + example.answer
    assert item["input_ids"].tolist() == [data.bos_id] + data.ids(text)
    labelled = item["labels"][item["labels"] != IGNORE_INDEX].tolist()
    assert labelled == data.ids(example.answer) + [data.eos_id]
    # the label at position t is the token at t + 1: the first answer token is predicted from the '='
    first = (item["labels"] != IGNORE_INDEX).nonzero()[0].item()
    assert item["input_ids"][first].item() == data.ids("=")[0]
    assert item["answer_mask"].sum().item() == len(example.answer) + 1


def test_per_position_encoding_reads_answer_at_last_position():
    data = TaskData(PHop(length=16, hops=2))
    example = data.task.fixed_set("test", 1, seed=0)[0]
    item = data.encode(example)
    assert item["input_ids"].shape == item["labels"].shape == (17,)
    assert item["labels"][-1].item() == data.ids(example.answer)[0]
    assert item["answer_mask"].tolist() == [False] * 16 + [True]
    assert item["labels"][1:].tolist() == data.ids("".join(example.position_labels))


def test_rank_streams_partition_one_stream():
    data = TaskData(PHop(length=8, hops=1))
    one = [x["input_ids"].tolist() for _, x in zip(range(8), TrainStream(data, seed=3))]
    r0 = [x["input_ids"].tolist() for _, x in zip(range(4), TrainStream(data, seed=3, rank=0, world_size=2))]
    r1 = [x["input_ids"].tolist() for _, x in zip(range(4), TrainStream(data, seed=3, rank=1, world_size=2))]
    assert one[0::2] == r0 and one[1::2] == r1


def test_answer_exact_match_on_hand_made_predictions():
    labels = torch.tensor([[IGNORE_INDEX, 5, 6], [IGNORE_INDEX, 5, 6], [IGNORE_INDEX, 7, IGNORE_INDEX]])
    mask = labels != IGNORE_INDEX
    predicted = torch.tensor([[0, 5, 6], [0, 5, 1], [3, 7, 0]])  # right, one token wrong, right
    logits = torch.nn.functional.one_hot(predicted, 10).float()
    metric = AnswerExactMatch()
    metric.update(logits, {"labels": labels, "answer_mask": mask})
    assert abs(metric.compute().item() - 2 / 3) < 1e-6


def test_pad_collate_pads_right():
    data = TaskData(NaryAddition(n_operands=(2, 4)))
    items = [data.encode(e) for e in data.task.fixed_set("test", 4, seed=1)]
    batch = pad_collate(items, data.pad_id)
    width = max(len(i["input_ids"]) for i in items)
    assert batch["input_ids"].shape == (4, width)
    short = min(range(4), key=lambda i: len(items[i]["input_ids"]))
    n = len(items[short]["input_ids"])
    assert (batch["labels"][short, n:] == IGNORE_INDEX).all() and not batch["answer_mask"][short, n:].any()


def test_fixed_set_is_test_split_and_deterministic():
    data = TaskData(PHop(length=8, hops=1))
    a, b = FixedSet(data, 20, seed=5), FixedSet(data, 20, seed=5)
    assert [e.prompt for e in a.examples] == [e.prompt for e in b.examples]
    assert all(data.task.split_of(e) == "test" for e in a.examples)


def test_short_training_run_lowers_loss():
    recipe = load_recipe(REPO / "recipes" / "cpu_phop.yaml", [
        "train_data.task_kwargs.length=12", "train_data.task_kwargs.hops=1", "model.d_model=32", "model.spec=1x2",
        "max_duration=60ba", "eval_interval=60ba", "eval_data.eval_size=64", "global_train_batch_size=32",
        "device_train_microbatch_size=32", "optimizer.lr=3e-3", "scheduler.t_warmup=5ba", "loggers.in_memory={}"])
    trainer = build_trainer(recipe)
    trainer.fit()
    memory = next(d for d in trainer.logger.destinations if isinstance(d, InMemoryLogger))
    losses = [float(value) for _, value in memory.data["loss/train/total"]]
    assert sum(losses[-10:]) / 10 < 0.8 * sum(losses[:10]) / 10
    accuracy = trainer.state.eval_metrics["eval"]["AnswerExactMatch"].compute().item()
    assert 0.0 <= accuracy <= 1.0


def test_the_loss_is_the_mean_over_every_answer_target_however_the_batch_is_split():
    """Answer-only labels: microbatches hold different numbers of targets. The first step's gradient (so the
    second step's weights and loss) is the one of the whole batch's target mean at any microbatch size."""

    def losses(microbatch: int) -> list[float]:
        recipe = load_recipe(REPO / "recipes" / "cpu_addition.yaml", [
            "model.d_model=32", "model.n_heads=2", "model.d_ff=64", "model.spec=1x2", "max_duration=3ba",
            "eval_interval=3ba", "eval_data.eval_size=8", "global_train_batch_size=8", "scheduler.t_warmup=1ba",
            f"device_train_microbatch_size={microbatch}", "loggers.in_memory={}", "progress_bar=false"])
        trainer = build_trainer(recipe)
        trainer.fit()
        memory = next(d for d in trainer.logger.destinations if isinstance(d, InMemoryLogger))
        trainer.close()
        return [float(value) for _, value in memory.data["loss/train/total"]]

    whole, split = losses(8), losses(1)
    assert all(abs(a - b) <= 1e-5 * abs(a) for a, b in zip(whole, split)), (whole, split)
