import json
import math
import os
import re
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
from conftest import REPO, cli_overrides, run_cli, streamed, xla_flags

from llm import model
from llm.model import ModelConfig
from llm.training import guard, sharding, state as state_lib

EIGHT = {"XLA_FLAGS": xla_flags("--xla_force_host_platform_device_count=8"), "JAX_PLATFORMS": "cpu"}


def _runs(kind: str, corpus, root, env=None) -> dict:
    result = subprocess.run([sys.executable, "tests/sharding_runs.py", kind, str(corpus), str(root)], cwd=REPO,
                            capture_output=True, text=True, timeout=900, env={**os.environ, **(env or {})})
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def mesh_runs(tmp_path_factory):
    from conftest import documents, write_corpus, write_shards

    root = tmp_path_factory.mktemp("mesh")
    corpus = write_corpus(root / "corpus.txt")
    write_shards(root / "shards", documents(300))
    eight = _runs("eight", corpus, root, EIGHT)
    one = _runs("one", corpus, root)
    return eight, one, corpus, root


@pytest.mark.parametrize("mesh", ["(8, 1, 1)", "(1, 8, 1)", "(2, 2, 2)", "(1, 1, 8)"])
def test_every_mesh_gives_the_single_device_loss_curve(mesh_runs, mesh):
    eight, one, _, _ = mesh_runs
    assert eight["devices"] == 8 and one["devices"] == 1
    from sharding_runs import STEPS

    assert len(eight[mesh]) == STEPS
    assert np.max(np.abs(np.array(eight[mesh]) - np.array(one["(1,1,1)"]))) < 1e-4


def test_checkpoints_restore_onto_another_mesh_and_device_count(mesh_runs):
    eight, one, _, _ = mesh_runs
    reference = np.array(one["(1,1,1)"])
    # (8,1,1) -> (2,2,2) and 8 devices -> 1 device, each resumed halfway.
    assert np.max(np.abs(np.array(eight["cross_mesh"]) - reference)) < 1e-4
    assert np.max(np.abs(np.array(one["eight_to_one"]) - reference)) < 1e-4


def test_a_mesh_that_does_not_divide_the_heads_is_refused(mesh_runs):
    eight, _, _, _ = mesh_runs
    assert "model.num_heads=4 is not divisible by mesh.tensor=8" in eight["bad_heads_error"]


def _multi_overrides(corpus) -> list[str]:
    """The two-process runs stream a sharded JSONL corpus (each host its own rows) through a data worker."""
    from sharding_runs import MODEL, MULTI_STEPS, SHARDS

    return cli_overrides(corpus, num_train_steps=MULTI_STEPS, log_every_steps=1, checkpoint_every_steps=5, **MODEL,
                         **streamed(SHARDS.format(root=corpus.parent), data__num_workers=1))


@pytest.fixture(scope="module")
def two_process_run(mesh_runs):
    _, _, corpus, root = mesh_runs
    workdir = root / "multi"
    result = subprocess.run(["./run.sh", "launch-local", "2", "train", f"--workdir={workdir}", *_multi_overrides(corpus)], cwd=REPO,
                            capture_output=True, text=True, timeout=600, env={**os.environ, "LLM_LOCAL_DEVICES": "4"})
    assert result.returncode == 0, result.stderr[-3000:]
    return workdir


def test_two_processes_give_the_one_process_loss_curve(mesh_runs, two_process_run):
    eight, _, _, _ = mesh_runs
    losses = [r["loss"] for r in map(json.loads, open(two_process_run / "metrics.jsonl")) if "loss" in r]
    # A constant schedule: the first steps are the short single-process run's.
    reference = eight["streamed (8, 1, 1)"]
    assert np.max(np.abs(np.array(losses[: len(reference)]) - np.array(reference))) < 1e-4
    from sharding_runs import MULTI_STEPS

    checkpoints = sorted(int(s) for s in os.listdir(two_process_run / "checkpoints") if s.isdigit())
    assert checkpoints == [MULTI_STEPS - 10, MULTI_STEPS - 5, MULTI_STEPS]  # keep_checkpoints=3, every 5 steps


def test_a_preemption_notice_to_one_process_stops_the_job_at_one_step_and_the_rerun_is_bit_identical(mesh_runs, two_process_run, tmp_path):
    _, _, corpus, _ = mesh_runs
    workdir = tmp_path / "preempted"
    # As launch-local runs the reference: 2 processes x 2 devices, gloo collectives.
    env = {**os.environ, "XLA_FLAGS": xla_flags("--xla_force_host_platform_device_count=2"), "JAX_PLATFORMS": "cpu"}

    def start_job():
        port = 25000 + (os.getpid() + int(time.time())) % 1000
        common = [sys.executable, "-m", "llm.cli", "train", f"--workdir={workdir}", *_multi_overrides(corpus),
                  f"--coordinator_address=localhost:{port}", "--num_processes=2"]
        return [subprocess.Popen([*common, f"--process_id={i}"], cwd=REPO, env=env, stdout=subprocess.DEVNULL,
                                 stderr=subprocess.PIPE, text=True) for i in range(2)]

    procs = start_job()
    deadline = time.time() + 300
    while not (workdir / "checkpoints" / "5").exists():
        assert all(p.poll() is None for p in procs) and time.time() < deadline
        time.sleep(0.02)
    procs[1].send_signal(signal.SIGTERM)  # the notice reaches one host only
    stderr = [p.communicate(timeout=180)[1] for p in procs]
    assert [p.returncode for p in procs] == [guard.EXIT_INTERRUPTED] * 2, stderr[0][-2000:] + stderr[1][-2000:]
    steps = {int(re.search(r"interrupted: .* stopped at step (\d+)", e).group(1)) for e in stderr}
    from sharding_runs import MULTI_STEPS

    assert len(steps) == 1 and 5 < steps.pop() < MULTI_STEPS

    procs = start_job()
    stderr = [p.communicate(timeout=300)[1] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], stderr[0][-2000:] + stderr[1][-2000:]
    from llm.run import api

    jax.tree.map(np.testing.assert_array_equal, api.load(str(workdir)).params, api.load(str(two_process_run)).params)


def test_bad_distributed_flags_get_one_clear_message(tmp_path, corpus):
    result = run_cli("train", f"--workdir={tmp_path}", *cli_overrides(corpus), "--coordinator_address=localhost:12999",
                     "--num_processes=2", "--process_id=2")
    assert result.returncode == 2 and "--process_id=2 is out of range for --num_processes=2" in result.stderr
    result = run_cli("train", f"--workdir={tmp_path}", *cli_overrides(corpus), "--coordinator_address=localhost:1",
                     "--num_processes=2", "--process_id=1", "--distributed_timeout_s=2")
    assert result.returncode == 2 and "the coordinator localhost:1 cannot be reached from process 1" in result.stderr
    assert "Traceback" not in result.stderr


def _compile_seconds_and_hlo_size(num_layers: int) -> tuple[float, int]:
    cfg = ModelConfig(V=64, D=64, F=128, N=num_layers, H=4, G=4, L=32, scan_layers=True)
    import flax.linen as nn
    import jax.numpy as jnp

    from llm.training import optimizer as optim

    oc = optim.OptConfig(10, 1e-3, 0, "constant", 1.0, 0.2, 0.9, 0.99, 1e-8, 0.0, False, 1.0, 1, 0.0)
    tx = optim.make(oc)
    params = nn.unbox(jax.eval_shape(lambda: model.init(cfg, jax.random.key(0))))
    state = state_lib.TrainState(jax.ShapeDtypeStruct((), jnp.int32), params, jax.eval_shape(tx.init, params))
    batch = {k: jax.ShapeDtypeStruct((4, 32), jnp.int32) for k in ("inputs", "targets")}
    batch["weights"] = jax.ShapeDtypeStruct((4, 32), jnp.float32)
    lowered = jax.jit(state_lib.make_train_step(cfg, tx, oc)).lower(state, batch)
    jax.config.update("jax_enable_compilation_cache", False)  # a compile time, not a cache read (conftest)
    try:
        start = time.perf_counter()
        lowered.compile()
        return time.perf_counter() - start, len(lowered.as_text())
    finally:
        jax.config.update("jax_enable_compilation_cache", True)


def test_scanned_layers_compile_once_whatever_the_depth():
    seconds_2, size_2 = _compile_seconds_and_hlo_size(2)
    seconds_12, size_12 = _compile_seconds_and_hlo_size(12)
    assert size_12 < 1.05 * size_2  # one body, whatever the depth
    assert seconds_12 < 2.0 * seconds_2 + 1.0


def test_cpu_cores_become_devices_only_when_asked_and_not_overridden(monkeypatch):
    cores = sharding.host_cores()
    monkeypatch.delenv("XLA_FLAGS", raising=False)
    assert sharding.split_host_cpu(0, [12], default_mesh=True) == 0
    assert "XLA_FLAGS" not in os.environ
    assert sharding.split_host_cpu(-1, [12, 64], default_mesh=False) == 0  # an explicit mesh keeps its devices
    split = math.gcd(cores, 12, 64)
    assert sharding.split_host_cpu(-1, [12, 64], default_mesh=True) == (split if split > 1 else 0)
    if split > 1:
        assert os.environ["XLA_FLAGS"] == f"--xla_force_host_platform_device_count={split}"
    monkeypatch.setenv("XLA_FLAGS", "--xla_force_host_platform_device_count=8 --xla_dump_to=/tmp/x")
    assert sharding.split_host_cpu(3, [12], default_mesh=True) == 0  # the user's XLA_FLAGS win
    monkeypatch.setenv("XLA_FLAGS", "--xla_dump_to=/tmp/x")
    assert sharding.split_host_cpu(3, [12], default_mesh=True) == 3
    assert os.environ["XLA_FLAGS"] == "--xla_dump_to=/tmp/x --xla_force_host_platform_device_count=3"


def test_each_process_splits_its_own_share_of_the_batch_and_when_one_dies_the_other_stops_in_bounded_time(tmp_path, corpus):
    # No XLA_FLAGS: each process splits its cores for its own 3 of the 6 rows (and 8 of the 16 eval rows);
    # splitting for all 6 rows would give 2 x 2 devices, which do not divide the batch.
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"} | {"JAX_PLATFORMS": "cpu", "XLA_FLAGS": xla_flags()}
    port = 24000 + os.getpid() % 1000
    common = ["train", f"--workdir={tmp_path}", *cli_overrides(corpus, batch_size=6, num_train_steps=100000, eval_every_steps=4,
                                                                checkpoint_every_steps=8),
              f"--coordinator_address=localhost:{port}", "--num_processes=2", "--heartbeat_timeout_s=5"]
    procs = [subprocess.Popen([sys.executable, "-m", "llm.cli", *common, f"--process_id={i}"], cwd=REPO, env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True) for i in range(2)]
    deadline = time.time() + 300
    while not (tmp_path / "checkpoints" / "8").exists():  # past the first eval and a checkpoint
        assert all(p.poll() is None for p in procs), procs[0].communicate()[1][-3000:]
        assert time.time() < deadline
        time.sleep(0.1)
    procs[1].send_signal(signal.SIGKILL)
    killed = time.time()
    try:
        _, stderr = procs[0].communicate(timeout=90)
    finally:
        procs[0].kill()
    assert procs[0].returncode != 0
    assert time.time() - killed < 90
    assert "another task died" in stderr
    per_process = math.gcd(sharding.host_cores(), 3, 8)
    assert f"mesh {{'data': {2 * per_process}, 'fsdp': 1, 'tensor': 1}}" in stderr
