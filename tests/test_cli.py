import json
import math
import re
import subprocess

from conftest import REPO, cli_overrides, run_cli, xla_flags

from llm.training import sharding


def test_run_sh_train_end_to_end_prints_a_sample(tmp_path, corpus):
    workdir = tmp_path / "run"
    result = subprocess.run(
        ["./run.sh", "train", f"--workdir={workdir}", *cli_overrides(corpus, num_train_steps=30, eval_every_steps=15,
                                                                      sample_tokens=20, sample_prompt="The ")],
        cwd=REPO, capture_output=True, text=True, timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    # libtpu (installed for `compile`) is never started on this CPU host: nothing about TPU_* variables.
    assert "TPU" not in result.stderr
    # The CPU cores became data-parallel devices (mesh.cpu_devices=-1): batch 8, eval batch 16.
    cores = math.gcd(sharding.host_cores(), 8, 16)
    assert re.search(rf"mesh \{{'data': {cores}, 'fsdp': 1, 'tensor': 1\}}", result.stderr), result.stderr[-3000:]
    assert "--- sample (step 30" in result.stdout
    sample = result.stdout.split("---\n", 1)[1]
    assert sample.startswith("The ") and len(sample.strip()) > len("The")
    records = [json.loads(line) for line in open(workdir / "metrics.jsonl")]
    assert records[-1]["step"] == 30 and "eval_loss" in records[-1]
    assert max(r["step"] for r in records if "loss" in r) == 30


def _assert_one_clear_error(result, message):
    assert result.returncode == 2
    assert message in result.stderr, result.stderr[-2000:]
    assert "Traceback" not in result.stderr


def test_unknown_config_key_on_the_command_line(tmp_path):
    result = run_cli("train", f"--workdir={tmp_path}", "--config.model.dmodel=64")
    _assert_one_clear_error(result, "unknown config key 'dmodel'")


def test_invalid_model_shape_fails_before_compiling(tmp_path, corpus):
    result = run_cli("train", f"--workdir={tmp_path}", *cli_overrides(corpus, model__num_heads=5, model__num_kv_heads=5))
    _assert_one_clear_error(result, "model.d_model=32 is not divisible by model.num_heads=5")
    assert not (tmp_path / "checkpoints").exists()


def test_batch_not_divisible_by_device_count(tmp_path, corpus):
    result = run_cli("train", f"--workdir={tmp_path}", *cli_overrides(corpus, batch_size=12),
                     env={"XLA_FLAGS": xla_flags("--xla_force_host_platform_device_count=8")})
    _assert_one_clear_error(result, "is not divisible by the 8 data-parallel devices")


def test_empty_and_non_utf8_corpora(tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    _assert_one_clear_error(run_cli("train", f"--workdir={tmp_path / 'a'}", *cli_overrides(empty)), "empty.txt is empty")
    latin = tmp_path / "latin1.txt"
    latin.write_bytes("café au lait\n".encode("latin-1") * 100)
    _assert_one_clear_error(run_cli("train", f"--workdir={tmp_path / 'b'}", *cli_overrides(latin)), "latin1.txt is not UTF-8 text")
