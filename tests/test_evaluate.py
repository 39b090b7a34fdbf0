"""Evaluation: one deterministic pass over the whole split, bits per byte that compare across
tokenizers, the eval/sample commands end to end, and the train benchmark harness."""

import functools
import json
import math
import os
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import REPO, run_cli, tiny_config, train_run, write_corpus, xla_flags
from scipy import special

import llm
from llm import bench, model, spec
from llm.data import text as text_lib, tokenizer as tokenizer_lib
from llm.model import ModelConfig
from llm.training import evaluate, state as state_lib

KEYS = {"split", "step", "tokens", "bytes", "loss", "perplexity", "bits_per_byte"}


@pytest.fixture(scope="module")
def byte_run(tmp_path_factory):
    """A byte-level run with checkpoints at steps 3 and 6 and an in-training eval at step 6."""
    root = tmp_path_factory.mktemp("byte_run")
    corpus = write_corpus(root / "corpus.txt", num_chars=6000)
    cfg = tiny_config(corpus, data__tokenizer="byte", num_train_steps=6, checkpoint_every_steps=3, eval_every_steps=6)
    train_run(cfg, str(root / "run"), quiet=True)
    return root


def validation_text(corpus_path) -> str:
    text = corpus_path.read_text(encoding="utf-8")
    return text[int(len(text) * 0.9) :]  # data.validation_fraction = 0.1, the tail of the file


def test_eval_scores_every_target_of_the_split_once(byte_run):
    run = llm.load(str(byte_run / "run"))
    result = run.evaluate("validation")
    assert set(result) == KEYS
    assert result["split"] == "validation" and result["step"] == 6
    # The stream is the text's bytes then eos; every token after the first is a target.
    num_targets = len(validation_text(byte_run / "corpus.txt").encode("utf-8"))
    assert result["tokens"] == num_targets
    assert num_targets % run.config.seq_len != 0  # so the last row is partial, and scored
    assert result["bytes"] == num_targets  # one byte per byte token, and eos counts one
    assert result["perplexity"] == pytest.approx(math.exp(result["loss"]), rel=1e-12)


def test_eval_loss_equals_loss_recomputed_from_logits(byte_run):
    run = llm.load(str(byte_run / "run"))
    result = run.evaluate("validation", batch_size=4)
    stream = text_lib.token_stream(run.spec.data, "validation", run.tokenizer)
    L, nats = run.config.seq_len, []
    for start in range(0, len(stream) - 1, L):
        row = np.asarray(stream[start : start + L + 1])
        # The softmax runs over the whole (padded) vocabulary, as in the training loss.
        logits_TxV, _ = model.apply(run.model_config, run.params, jnp.asarray(row[None, :-1]))
        logprobs_TxV = special.log_softmax(np.asarray(logits_TxV[0], np.float64), axis=-1)
        nats.extend(-logprobs_TxV[np.arange(len(row) - 1), row[1:]])
    assert len(nats) == result["tokens"]
    assert result["loss"] == pytest.approx(np.mean(nats), rel=1e-5)


def test_bits_per_byte_of_a_byte_tokenizer_is_loss_over_ln2_exactly(byte_run):
    result = llm.load(str(byte_run / "run")).evaluate("validation")
    assert result["bits_per_byte"] == result["loss"] / math.log(2)


def test_eval_twice_gives_identical_numbers_and_batch_size_only_rounding(byte_run):
    run = llm.load(str(byte_run / "run"))
    first = run.evaluate("validation")
    assert run.evaluate("validation") == first
    assert llm.load(str(byte_run / "run")).evaluate("validation") == first
    other = run.evaluate("validation", batch_size=3)
    assert other["tokens"] == first["tokens"] and other["bytes"] == first["bytes"]
    assert other["loss"] == pytest.approx(first["loss"], rel=1e-6)


def test_in_training_eval_is_the_same_computation(byte_run):
    records = [json.loads(line) for line in (byte_run / "run" / "metrics.jsonl").read_text().splitlines()]
    in_training = [r for r in records if "eval_loss" in r][-1]
    result = llm.load(str(byte_run / "run")).evaluate("validation")
    assert in_training["step"] == result["step"] == 6
    assert in_training["eval_loss"] == pytest.approx(result["loss"], rel=1e-6)
    assert in_training["eval_bits_per_byte"] == pytest.approx(result["bits_per_byte"], rel=1e-6)


def test_step_picks_that_checkpoint(byte_run):
    early = llm.load(str(byte_run / "run"), step=3).evaluate("validation")
    late = llm.load(str(byte_run / "run")).evaluate("validation")
    assert early["step"] == 3 and late["step"] == 6
    assert early["tokens"] == late["tokens"] and early["loss"] != late["loss"]


def test_out_of_domain_dataset(byte_run, tmp_path):
    other = tmp_path / "other.txt"
    other.write_text("Ünïcode ▲ text the run never saw, " * 30, encoding="utf-8")
    result = llm.load(str(byte_run / "run")).evaluate("validation", dataset=f"text:{other}")
    assert result["tokens"] == len(validation_text(other).encode("utf-8"))
    in_domain = llm.load(str(byte_run / "run")).evaluate("validation")
    assert result["loss"] != in_domain["loss"] and np.isfinite(result["loss"])


def test_multibyte_characters_count_their_utf8_bytes():
    text = "naïve café — ünïcödé text " * 12
    tok = tokenizer_lib.CharTokenizer(text)
    cfg = ModelConfig(V=tok.vocab_size, D=32, F=64, N=1, H=2, G=2, L=16)
    params = nn.unbox(jax.jit(functools.partial(model.init, cfg))(jax.random.key(0)))
    stream = text_lib.tokenize(tok, [text])
    put = lambda b: {k: jnp.asarray(v) for k, v in b.items()}
    result = evaluate.evaluate(jax.jit(evaluate.make_eval_step(cfg)), params, text_lib.eval_batches(stream, 4, 16), tok.token_bytes(), put)
    # Targets are every char after the first, then eos (one byte).
    assert result["tokens"] == len(text)
    assert result["bytes"] == len(text[1:].encode("utf-8")) + 1
    assert result["bits_per_byte"] == pytest.approx(result["loss"] * result["tokens"] / (result["bytes"] * math.log(2)), rel=1e-12)
    assert result["bits_per_byte"] < result["loss"] / math.log(2)


def test_eval_command_prints_the_json_last(byte_run):
    proc = run_cli("eval", f"--workdir={byte_run / 'run'}", "--split=validation")
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert set(result) == KEYS
    assert result == llm.load(str(byte_run / "run")).evaluate("validation")


def test_sample_command_streams_one_sample(byte_run):
    proc = run_cli("sample", f"--workdir={byte_run / 'run'}", "--prompt=The king", "--max_new_tokens=5")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("The king")


def test_sample_command_prints_every_sample(byte_run):
    proc = run_cli("sample", f"--workdir={byte_run / 'run'}", "--prompt=The king", "--max_new_tokens=5", "--num_samples=2")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.count("The king") == 2
    assert "--- sample 0 ---" in proc.stdout and "--- sample 1 ---" in proc.stdout


def test_bench_train_reports_the_configs_flops_at_its_measured_step_time(tmp_path):
    """Each number follows from independent ones: the config's model FLOPs (counted from its shapes), its
    tokens per step and the measured median step time; MFU divides by the peak given (one CPU host)."""
    cfg = tiny_config(write_corpus(tmp_path / "corpus.txt", num_chars=2000), batch_size=4, seq_len=16)
    result = bench.bench_train(cfg, steps=2, peak_tflops=1.0)
    assert set(result) == {"config", "devices", "vocab_size", "step_ms_median", "step_ms_p90", "tokens_per_s",
                           "model_flops_per_token", "achieved_tflops", "peak_tflops", "mfu", "compile_s"}
    assert result["peak_tflops"] == 1.0 and result["devices"] == jax.device_count()
    assert result["step_ms_p90"] >= result["step_ms_median"] > 0 and result["compile_s"] > 0
    run = spec.resolve(spec.from_config(cfg), tokenizer_lib.CHAR_VOCAB)
    assert result["model_flops_per_token"] == model.flops_per_token(run.model)
    assert result["tokens_per_s"] == pytest.approx(4 * 16 / (result["step_ms_median"] / 1e3), rel=1e-9)
    achieved = result["model_flops_per_token"] * result["tokens_per_s"]
    assert result["achieved_tflops"] == pytest.approx(achieved / 1e12, rel=1e-9)
    assert result["mfu"] == pytest.approx(achieved / 1e12, rel=1e-9)  # a 1 TFLOP/s peak on one host


def test_the_benchmark_times_the_step_that_training_builds(tmp_path, monkeypatch):
    calls, build = [], state_lib.setup
    monkeypatch.setattr(state_lib, "setup", lambda *args, **kw: calls.append(args[:4]) or build(*args, **kw))  # records, then builds for real
    cfg = tiny_config(write_corpus(tmp_path / "corpus.txt", num_chars=2000), batch_size=4, seq_len=16, num_train_steps=2)
    bench.bench_train(cfg, steps=1, peak_tflops=1.0)
    train_run(cfg, str(tmp_path / "run"), quiet=True)
    (bench_model, bench_opt, bench_mesh, bench_rules), (train_model, train_opt, train_mesh, train_rules) = calls
    assert bench_model == train_model and bench_opt == train_opt and bench_rules == train_rules
    assert bench_mesh.shape == train_mesh.shape and list(bench_mesh.devices.flat) == list(train_mesh.devices.flat)


LONG_EVAL_ON_TWO_CPU_DEVICES = """
import jax, numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
from llm import model
from llm.model import ModelConfig
from llm.training import evaluate
import flax.linen as nn

cfg = ModelConfig(V=256, D=128, F=512, N=2, H=4, G=4, L=64)
mesh = Mesh(np.array(jax.devices()), ("data",))
rows, replicated = NamedSharding(mesh, P("data")), NamedSharding(mesh, P())
params = jax.device_put(nn.unbox(model.init(cfg, jax.random.key(0))), replicated)
step = jax.jit(evaluate.make_eval_step(cfg), in_shardings=(replicated, rows))
tokens = np.random.default_rng(0).integers(0, 256, (8, 65), dtype=np.int32)
batch = {"inputs": tokens[:, :-1], "targets": tokens[:, 1:], "weights": np.ones((8, 64), np.float32)}
put = lambda b: {k: jax.device_put(v, rows) for k, v in b.items()}
result = evaluate.evaluate(step, params, (batch for _ in range(1000)), np.ones(256, np.int64), put)
print("tokens", result["tokens"])
"""


def test_a_long_eval_on_split_cpu_devices_does_not_deadlock():
    # Dispatched all at once, 1000 small batches filled XLA:CPU's per-device queue of 32 and deadlocked
    # the all-reduce of the two devices (evaluate.MAX_IN_FLIGHT says how): 4 runs out of 4, idle machine.
    flags = xla_flags("--xla_force_host_platform_device_count=2", "--xla_cpu_collective_call_terminate_timeout_seconds=20")
    result = subprocess.run([sys.executable, "-c", LONG_EVAL_ON_TWO_CPU_DEVICES], cwd=REPO, capture_output=True, text=True,
                            timeout=240, env={**os.environ, "XLA_FLAGS": flags, "JAX_PLATFORMS": "cpu"})
    assert result.returncode == 0, result.stderr[-2000:]
    assert f"tokens {1000 * 8 * 64}" in result.stdout
