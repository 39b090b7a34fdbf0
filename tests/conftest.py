import os
import random
import subprocess
import sys
import tempfile
from pathlib import Path

# The suite compiles the same tiny train and eval steps in dozens of processes; JAX's persistent
# compilation cache, one directory per test run (shared by the xdist workers and every CLI subprocess
# they start), compiles each program once. Set before anything imports jax.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.join(
    tempfile.gettempdir(), f"llm-tests-jax-cache-{os.environ.get('PYTEST_XDIST_TESTRUNUID', os.getpid())}"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.2")
# The suite compiles hundreds of tiny programs and runs each a few steps: LLVM's optimizations cost more
# than they save (a third of the CPU of a compile-bound test file). Every process the suite starts
# inherits the flag; tests that set XLA_FLAGS for a subprocess add it with xla_flags().
FAST_COMPILE = "--xla_backend_optimization_level=0"
if FAST_COMPILE not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {FAST_COMPILE}".strip()


def xla_flags(*flags: str) -> str:
    return " ".join([*flags, FAST_COMPILE])


import ml_collections  # noqa: E402
import pytest  # noqa: E402

from configs import default  # noqa: E402
from llm.training import sharding  # noqa: E402

sharding.leave_out_absent_tpu()  # as the CLI does: libtpu (installed for `compile`) stays unloaded without a TPU

# `./run.sh test` hands whole files to whichever xdist worker is free, in collection order
# (--no-loadscope-reorder): the files that take the most CPU on a clean clone go first, so that the two
# workers finish together instead of one waiting on a long file started last.
LONGEST_FIRST = ("test_compile.py", "test_sharding.py", "test_resume.py", "test_posttrain.py", "test_encoder_decoder.py",
                 "test_hf.py", "test_inspect.py", "test_ray_sweep.py")


def pytest_collection_modifyitems(items):
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: the others keep their order


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


def documents(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(2, 40))) + "." for _ in range(n)]


def write_shards(root: Path, docs: list[str], num_shards: int = 3, fmt: str = "jsonl", key: str = "text") -> str:
    """docs split over num_shards files of one format (jsonl, gz, zst, parquet); returns the data.dataset value."""
    import gzip
    import json

    root.mkdir(parents=True, exist_ok=True)
    per = -(-len(docs) // num_shards)
    for s in range(num_shards):
        part = docs[s * per : (s + 1) * per]
        lines = "".join(json.dumps({"id": i, key: t}) + "\n" for i, t in enumerate(part)).encode()
        path = root / f"shard-{s:03d}.{'parquet' if fmt == 'parquet' else 'jsonl'}"
        if fmt == "jsonl":
            path.write_bytes(lines)
        elif fmt == "gz":
            path.with_name(path.name + ".gz").write_bytes(gzip.compress(lines))
        elif fmt == "zst":
            import zstandard

            path.with_name(path.name + ".zst").write_bytes(zstandard.ZstdCompressor().compress(lines))
        else:
            import pyarrow as pa
            import pyarrow.parquet as pq

            pq.write_table(pa.table({"id": list(range(len(part))), key: part}), path, row_group_size=7)
    pattern = {"jsonl": "*.jsonl", "gz": "*.jsonl.gz", "zst": "*.jsonl.zst", "parquet": "*.parquet"}[fmt]
    return f"{'parquet' if fmt == 'parquet' else 'jsonl'}:{root}/{pattern}"


def write_domain_shards(root: Path, domains: dict[str, list[str]], num_shards: int = 2) -> str:
    """Each domain's documents, interleaved, as {"text", "domain"} records over num_shards JSONL files;
    returns the data.dataset value (a data.mixture names the domains)."""
    import json

    records = [{"text": docs[k], "domain": d} for k in range(max(map(len, domains.values()))) for d, docs in domains.items() if k < len(docs)]
    root.mkdir(parents=True, exist_ok=True)
    per = -(-len(records) // num_shards)
    for s in range(num_shards):
        (root / f"shard-{s:03d}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records[s * per : (s + 1) * per]))
    return f"jsonl:{root}/*.jsonl"


def assert_same_batches(a: list[dict], b: list[dict]) -> None:
    """Two lists of host batches are equal, array by array."""
    import numpy as np

    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.keys() == y.keys()
        for k in x:
            np.testing.assert_array_equal(x[k], y[k])


def streamed(dataset: str, **overrides) -> dict:
    """Overrides for cli_overrides/tiny_config that train on a streamed corpus."""
    return dict(data__dataset=dataset, data__tokenizer="byte", data__validation_fraction=0.1, **overrides)


@pytest.fixture
def corpus(tmp_path) -> Path:
    return write_corpus(tmp_path / "corpus.txt")


TINY = {
    "batch_size": 8, "seq_len": 32, "num_train_steps": 20, "log_every_steps": 5, "eval_every_steps": 0,
    "eval_batch_size": 16, "checkpoint_every_steps": 10, "peak_tflops": 1.0, "sample_tokens": 0,
    "model.d_model": 32, "model.num_layers": 2, "model.num_heads": 4, "model.num_kv_heads": 2, "model.d_ff": 64,
    "opt.warmup_steps": 2, "opt.learning_rate": 3e-3,
}


def default_config(**dotted) -> ml_collections.ConfigDict:
    """configs/default.py with {"model.d_model": 64, ...} set."""
    cfg = default.get_config()
    for key, value in dotted.items():
        node = cfg
        *parents, leaf = key.split(".")
        for p in parents:
            node = node[p]
        node[leaf] = value
    return cfg


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


def kill_at_checkpoint_and_resume(command: list[str], workdir: Path, step: int = 3, timeout: int = 300) -> tuple[int, subprocess.CompletedProcess]:
    """Starts `command` (a CLI train into `workdir`), SIGKILLs it once checkpoint `step` exists, runs it
    again; returns (the step it had committed when killed, the resumed run's result)."""
    import signal
    import time

    from llm.training import checkpoint

    proc = subprocess.Popen(command, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    while not (workdir / "checkpoints" / str(step)).exists():
        assert proc.poll() is None and time.time() < deadline
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    killed_at = checkpoint.latest_step(str(workdir))
    return killed_at, subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=timeout)


def train_run(cfg: ml_collections.ConfigDict, workdir, quiet: bool = False, **kwargs) -> dict:
    """What `./run.sh train` does with a config: its spec (checked), then the train loop."""
    from llm import spec
    from llm.training import loop

    return loop.train(spec.from_config(cfg), str(workdir), quiet, **kwargs)


def addition_problem(rng: random.Random) -> tuple[str, str]:
    a, b = rng.randint(0, 49), rng.randint(0, 49)
    return f"{a}+{b}", str(a + b)


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    import json

    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def posttrain_sets(root: Path) -> dict:
    """A pretrained char model and the post-training files of a small addition task."""
    rng = random.Random(0)
    lines = [f"{p}={a}" for p, a in (addition_problem(rng) for _ in range(1500))]
    corpus = root / "pre.txt"
    corpus.write_text("\n".join(lines) + "\n")
    train_run(tiny_config(corpus, num_train_steps=20), str(root / "pre"), quiet=True)
    sft = write_jsonl(root / "sft.jsonl", [dict(zip(("prompt", "response"), addition_problem(rng))) for _ in range(120)])
    pref = []
    for _ in range(120):
        p, a = addition_problem(rng)
        pref.append({"prompt": p, "chosen": a, "rejected": str(int(a) + rng.choice([-10, -1, 1, 10]))})
    pref = write_jsonl(root / "pref.jsonl", pref)
    prompts = write_jsonl(root / "prompts.jsonl", [dict(zip(("prompt", "answer"), addition_problem(rng))) for _ in range(40)])
    return {"root": root, "corpus": corpus, "pre": str(root / "pre"), "sft": sft, "pref": pref, "prompts": prompts}


def objective_overrides(sets: dict, objective: str, steps: int) -> dict:
    """A post-training run of `objective` on the addition task, from the pretrained model."""
    common = dict(num_train_steps=steps, checkpoint_every_steps=3, log_every_steps=1, objective=objective,
                  init_from=sets["pre"], opt__schedule="constant")
    if objective == "lm":
        return dict(data__dataset=f"sft:{sets['sft']}", **common)
    if objective in ("reward", "dpo"):
        return dict(data__dataset=f"preference:{sets['pref']}", **common)
    return dict(data__dataset=f"prompts:{sets['prompts']}", batch_size=4, grpo__group_size=4, grpo__max_new_tokens=4,
                grpo__reward_fn="llm.training.rl:exact_match_reward", **common)
