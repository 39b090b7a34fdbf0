import os
import random
import subprocess
import sys
from pathlib import Path

import ml_collections
import pytest

from configs import default

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
WORDS = "the king queen lord lady good night sweet love death sword crown heart hath thou thee my our".split()


def write_corpus(path: Path, num_chars: int = 40_000, seed: int = 0) -> Path:
    rng = random.Random(seed)
    lines, size = [], 0
    while size < num_chars:
        line = " ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 9))).capitalize() + rng.choice(".,;!?")
        lines.append(line)
        size += len(line) + 1
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


@pytest.fixture
def corpus(tmp_path) -> Path:
    return write_corpus(tmp_path / "corpus.txt")


TINY = {
    "batch_size": 8, "seq_len": 32, "num_train_steps": 20, "log_every_steps": 5, "eval_every_steps": 0,
    "eval_batch_size": 16, "checkpoint_every_steps": 10, "peak_tflops": 1.0, "sample_tokens": 0,
    "model.d_model": 32, "model.num_layers": 2, "model.num_heads": 4, "model.num_kv_heads": 2, "model.d_ff": 64,
    "opt.warmup_steps": 2, "opt.learning_rate": 3e-3,
}


def tiny_config(corpus_path: Path, **overrides) -> ml_collections.ConfigDict:
    """configs/default.py shrunk to a model that trains in seconds on a written corpus."""
    corpus_path = Path(corpus_path)
    cfg = default.get_config()
    cfg.data.dataset = f"text:{corpus_path}"
    cfg.data.data_dir = str(corpus_path.parent / "tfds")
    for key, value in {**TINY, **{k.replace("__", "."): v for k, v in overrides.items()}}.items():
        node = cfg
        *parents, leaf = key.split(".")
        for p in parents:
            node = node[p]
        node[leaf] = value
    return cfg


def cli_overrides(corpus_path: Path, **overrides) -> list[str]:
    corpus_path = Path(corpus_path)
    values = {"data.dataset": f"text:{corpus_path}", "data.data_dir": str(corpus_path.parent / "tfds"), **TINY, **{k.replace("__", "."): v for k, v in overrides.items()}}
    return [f"--config.{k}={v}" for k, v in values.items()]


def run_cli(*args: str, env: dict | None = None, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "llm.cli", *args], cwd=REPO, capture_output=True, text=True, timeout=timeout,
        env={**os.environ, **(env or {})},
    )
