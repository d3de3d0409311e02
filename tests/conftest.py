"""Shared fixtures: a small local text corpus and the tiny-size overrides every recipe smoke test uses."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

# The README's documented override set that shrinks any paper recipe to a 2-batch CPU run.
TINY_OVERRIDES = [
    "model.d_model=32", "model.n_heads=2", "model.d_ff=64", "model.vocab_size=257",
    "model.init_device=cpu", "max_seq_len=32", "tokenizer.kind=byte_level", "tokenizer.name=null",
    "global_train_batch_size=4", "device_train_microbatch_size=2", "device_eval_batch_size=4",
    "eval_data.eval_size=4", "max_duration=2ba", "eval_interval=2ba", "device=cpu", "precision=fp32",
    "fsdp_config=null", "autoresume=false", "train_data.num_workers=0", "eval_data.num_workers=0",
    "progress_bar=false",
]


@pytest.fixture
def single_thread():
    """Tiny models on a shared 2-core machine: one intra-op thread avoids oversubscription (10x faster).
    Modules opt in with ``pytestmark = pytest.mark.usefixtures("single_thread")``."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def text_corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder of .txt documents (one document per file) made of random words."""
    folder = tmp_path_factory.mktemp("corpus")
    rng = random.Random(0)
    words = "the a looped model layer block applies its weights again and reasons over latent thoughts".split()
    for index in range(40):
        text = " ".join(rng.choice(words) for _ in range(rng.randint(30, 120))) + "."
        (folder / f"doc{index:03d}.txt").write_text(text)
    return folder


def tiny_overrides(corpus: Path, save_folder: Path | None = None) -> list[str]:
    extra = [f"train_data.source={corpus}", f"eval_data.source={corpus}", "train_data.text_field=text",
             "eval_data.text_field=text"]
    if save_folder is not None:
        extra += [f"save_folder={save_folder}", f"export_folder={save_folder}/model"]
    return TINY_OVERRIDES + extra


@pytest.fixture(scope="session")
def tiny_mds(tmp_path_factory: pytest.TempPathFactory, text_corpus: Path) -> Path:
    """:func:`text_corpus` prepared as MDS shards for :data:`TINY_OVERRIDES` (byte-level, 32 tokens): ``train/``
    and ``validation/``, the layout of the Pile rows' data."""
    from loopreg.data.mds import prepare_mds

    folder = tmp_path_factory.mktemp("tiny_mds")
    for split in ("train", "validation"):
        prepare_mds(str(text_corpus), "byte_level", 32, str(folder / split), progress=False)
    return folder


def mds_overrides(folder: Path) -> list[str]:
    """Point an mds recipe (the Pile rows) at :func:`tiny_mds`'s shards."""
    return [f"train_data.source={folder}/train", f"eval_data.source={folder}/validation"]


def hf_byte_tokenizer():
    """A Llama-style Hugging Face tokenizer over bytes (258 ids: 256 bytes, EOS, ``<s>``), ``<s>`` prepended to
    every encoded input: the tokenizer of the tiny HF test models."""
    from tokenizers import processors
    from transformers import PreTrainedTokenizerFast

    from loopreg.data.text import byte_level_tokenizer

    raw = byte_level_tokenizer()
    raw.add_special_tokens(["<s>"])
    raw.post_processor = processors.TemplateProcessing(single="<s> $A",
                                                       special_tokens=[("<s>", raw.token_to_id("<s>"))])
    eos = raw.id_to_token(256)
    return PreTrainedTokenizerFast(tokenizer_object=raw, bos_token="<s>", eos_token=eos, pad_token=eos)


def tiny_llama(folder: Path, vocab_size: int = 260, extra_tokens: tuple[str, ...] = (), seed: int = 0) -> Path:
    """A random 6-layer Llama saved with a byte-level fast tokenizer (257 tokens + ``extra_tokens``)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    from loopreg.data.text import EOS_TOKEN, byte_level_tokenizer

    torch.manual_seed(seed)
    model = LlamaForCausalLM(LlamaConfig(num_hidden_layers=6, hidden_size=32, intermediate_size=64,
                                         num_attention_heads=4, num_key_value_heads=2, vocab_size=vocab_size,
                                         max_position_embeddings=128, bos_token_id=None, eos_token_id=256,
                                         pad_token_id=None))
    backend = byte_level_tokenizer()
    backend.add_tokens(list(extra_tokens))
    model.save_pretrained(folder)
    PreTrainedTokenizerFast(tokenizer_object=backend, eos_token=EOS_TOKEN).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def source(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny Llama of :func:`tiny_llama`, once per module: the source model of the retrofit tests."""
    return tiny_llama(tmp_path_factory.mktemp("source") / "llama")


def run_cli(argv: list[str], capsys: pytest.CaptureFixture) -> tuple[int, str, str]:
    """``loopreg ARGV...`` in this process through the console script's entry: (exit status, stdout, stderr)."""
    from loopreg.cli import main

    with pytest.raises(SystemExit) as exited:
        main(argv)
    out, err = capsys.readouterr()
    return int(exited.value.code or 0), out, err


def free_port() -> int:
    """A TCP port no one is listening on now, for a launcher's ``--master_port`` (fixed ports collide when
    test runs share a machine)."""
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def run_launcher(argv: list[str], timeout: float, **kwargs) -> subprocess.CompletedProcess:
    """``subprocess.run(argv, capture_output=True, text=True)`` in its own process group: on a timeout the
    whole group (the launcher and every rank it started) is killed, so a hung rank never outlives the test."""
    with subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
                          **kwargs) as process:
        try:
            stdout, stderr = process.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.communicate()
            raise
    return subprocess.CompletedProcess(argv, process.returncode, stdout, stderr)


# Prepended to run_without_loopreg's scripts: a meta-path finder that refuses loopreg, checked before the script runs.
_NO_LOOPREG = """
import sys


class _NoLoopreg:
    def find_spec(self, name, path=None, target=None):
        if name == "loopreg" or name.startswith("loopreg."):
            raise ImportError(f"No module named {name!r} (made unimportable)")


sys.meta_path.insert(0, _NoLoopreg())
try:
    import loopreg  # noqa: F401
except ImportError:
    pass
else:
    raise SystemExit("loopreg is still importable")
"""


def run_without_loopreg(script: str, env: dict[str, str] | None = None,
                        timeout: float = 600) -> subprocess.CompletedProcess:
    """Run the Python source ``script`` in a fresh interpreter of this venv in which loopreg cannot be imported, as
    where it is not installed (``env`` adds to the environment, e.g. ``HF_MODULES_CACHE``); a non-zero exit fails
    the test with the script's stderr.

    >>> # run_without_loopreg("from transformers import AutoModel", {"HF_MODULES_CACHE": str(tmp_path)})
    """
    result = subprocess.run([sys.executable, "-c", _NO_LOOPREG + script], env={**os.environ, **(env or {})},
                            capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, f"script without loopreg failed:\n{result.stderr[-6000:]}"
    return result

