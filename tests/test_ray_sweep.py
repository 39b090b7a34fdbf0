"""./run.sh sweep --ray: a sweep's points as tasks on a real Ray cluster on 127.0.0.1. Each test starts its own
cluster and kills it at the end, each node a `ray start --block` process group: a head that trains nothing
and two one-CPU worker nodes where a node is killed, else a head alone with two CPUs. The local run they
are compared to is run once for the module."""

import contextlib
import csv
import fcntl
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest

from conftest import REPO, run_cli
from llm.scaling import ray_task, sweep
from llm.training import guard

pytest.importorskip("ray", reason="the ray extra (./run.sh setup installs it)")

RAY = Path(sys.executable).with_name("ray")
NODE_START_S = 90  # a node that has not joined by then fails the test
SWEEP_S = 240  # bound on one driver run


def write_sweep(root: Path) -> Path:
    """tests/test_sweep.py's 4-point sweep with the larger budget x4, checkpointing every step: a kill
    after the longest point's first checkpoints lands with most of its steps to go."""
    rng = np.random.default_rng(0)
    words = ["the", "king", "queen", "shall", "not", "be", "to", "of", "and", "my", "lord", "sweet", "love"]
    corpus = root / "corpus.txt"
    corpus.write_text("\n".join(" ".join(rng.choice(words, 12)) for _ in range(600)))
    config = root / "tiny_sweep.py"
    config.write_text(f"""
import sys
from pathlib import Path

sys.path.insert(0, {str(REPO / 'tests')!r})
from test_sweep import tiny_sweep_config


def get_config():
    c = tiny_sweep_config(Path({str(corpus)!r}))
    c.budgets = [4e7, 3.2e8]
    c.checkpoints_per_point = 100  # capped at one per step
    c.resources_per_point = {{"CPU": 1}}
    c.max_retries = 2
    return c
""")
    return config


def read_rows(workdir: Path) -> list[dict]:
    with open(workdir / sweep.RESULTS, newline="") as f:
        return list(csv.DictReader(f))


def same_columns(rows: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if k != "wall_seconds"} for r in rows]


@pytest.fixture(scope="module")
def sweep_config(tmp_path_factory) -> Path:
    return write_sweep(tmp_path_factory.mktemp("ray_sweep"))


@pytest.fixture(scope="module")
def local(sweep_config):
    """(the sweep config file, the local run's rows): `./run.sh sweep` without --ray."""
    config, workdir = sweep_config, sweep_config.parent / "local"
    proc = run_cli("sweep", f"--config={config}", f"--workdir={workdir}", timeout=SWEEP_S)
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = read_rows(workdir)
    assert len(rows) == 4
    return config, rows


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def ray_cluster(workers: int = 2):
    """Yields (address, {worker node's pgid: its ray start process}); kills every node's process group after.
    workers=0: the head alone trains, on both of this machine's cores (a test that kills no node)."""
    temp = tempfile.mkdtemp(prefix="ray", dir="/tmp")  # Ray's unix sockets live here: the path must stay short
    port = _free_port()
    # Every port a node opens, chosen here: other clusters may be running on this machine.
    common = lambda: ["--block", "--node-ip-address=127.0.0.1", "--disable-usage-stats", f"--temp-dir={temp}",
                      "--include-log-monitor=false",  # the driver asks for no worker logs
                      f"--dashboard-agent-listen-port={_free_port()}", f"--metrics-export-port={_free_port()}"]
    head = [str(RAY), "start", "--head", f"--port={port}", f"--num-cpus={0 if workers else 2}", "--include-dashboard=false",
            f"--dashboard-port={_free_port()}", f"--ray-client-server-port={_free_port()}", *common()]
    worker = lambda: [str(RAY), "start", f"--address=127.0.0.1:{port}", "--num-cpus=1", *common()]
    nodes: list[subprocess.Popen] = []
    started: list[subprocess.Popen] = []  # every `ray start`, a failed one included: each is killed after
    # The GCS declares a node that stopped answering dead after 4 missed 1 s health checks (Ray's default
    # is about 10 s here): until then the scheduler may hold a retry for the dead node's free CPU.
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "RAY_health_check_period_ms": "1000",
           "RAY_health_check_failure_threshold": "4"}

    def start(i: int, command: list[str]) -> subprocess.Popen:
        with open(Path(temp) / f"node{i}.log", "w") as log:
            started.append(subprocess.Popen(command, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT,
                                            start_new_session=True))
        return started[-1]

    try:
        commands = [head] + [worker() for _ in range(workers)]
        nodes.append(start(0, head))
        assert _wait_for_node(nodes[0], Path(temp) / "node0.log"), (Path(temp) / "node0.log").read_text()[-3000:]
        nodes += [start(i, command) for i, command in enumerate(commands[1:], start=1)]
        for i in range(1, len(nodes)):
            # Ray gives a raylet 30 s to register: on a loaded machine a node may need a second start.
            if not _wait_for_node(nodes[i], Path(temp) / f"node{i}.log"):
                nodes[i] = start(i, commands[i])
                assert _wait_for_node(nodes[i], Path(temp) / f"node{i}.log"), (Path(temp) / f"node{i}.log").read_text()[-3000:]
        yield f"127.0.0.1:{port}", {n.pid: n for n in nodes[1:]}
    finally:
        for node in started:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(node.pid, signal.SIGKILL)
            node.wait()
        shutil.rmtree(temp, ignore_errors=True)


def _wait_for(condition, timeout: float, what: str = "") -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out {what() if callable(what) else what}"
        time.sleep(0.02)


def _wait_for_node(node: subprocess.Popen, log: Path) -> bool:
    """Whether the node started (False: its `ray start` gave up)."""
    _wait_for(lambda: "Ray runtime started" in log.read_text() or node.poll() is not None, NODE_START_S,
              lambda: f"starting a Ray node: {log.read_text()[-3000:]}")
    return node.poll() is None


def ray_sweep(config: Path, workdir: Path, address: str, *flags: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "llm.cli", "sweep", f"--config={config}", f"--workdir={workdir}",
                             f"--ray={address}", *flags], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)


def finish(proc: subprocess.Popen) -> tuple[int, str, str]:
    out, err = proc.communicate(timeout=SWEEP_S)
    return proc.returncode, out, err


def locks_free(workdir: Path) -> bool:
    for path in workdir.glob(f"*/{guard.LOCK_FILE}"):
        with open(path) as f:
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return False
    return True


def test_ray_task_knows_the_lock_file_of_the_guard():
    assert ray_task.LOCK_FILE == guard.LOCK_FILE


def test_ray_sweep_writes_the_local_rows_though_a_worker_node_dies_midpoint(local, tmp_path):
    """A head and two worker nodes train the 4 points; the node training the longest is killed after its
    first checkpoint. The point is retried on the other node, resumes there, and the rows are the local
    run's, bit for bit (the losses to their last printed digit) and in the same order."""
    config, expected = local
    workdir = tmp_path / "sweep"
    longest = max(expected, key=lambda row: int(row["num_train_steps"]))
    victim = longest["name"]
    with ray_cluster() as (address, nodes):
        driver = ray_sweep(config, workdir, address)
        # Step 3 logged: the save of step 2 waited for step 1's checkpoint to commit (the directory itself
        # can appear late, after Orbax's asynchronous finalize).
        _wait_for(lambda: _last_step(workdir / victim) >= 3 or driver.poll() is not None, SWEEP_S)
        assert driver.poll() is None, driver.communicate()
        worker_pid = int((workdir / victim / ray_task.LOG).read_text().split("worker pid ")[1].split(")")[0])
        node = os.getpgid(_parent(worker_pid))  # the worker's raylet: the node's process group
        assert node in nodes
        os.killpg(node, signal.SIGKILL)  # the whole node, as when a preemptible VM goes
        code, out, err = finish(driver)
    assert code == 0, err[-3000:]
    # Lost with its node, or (if the worker saw its child die first) exit code -9: either way retried once.
    retried = [line for line in out.splitlines() if line.startswith(f"{victim}: ") and "retry 1 of 2" in line]
    assert len(retried) == 1, out
    assert "[ray] 4/4 done, 0 running, 0 pending, 0 failed" in out
    log = (workdir / victim / ray_task.LOG).read_text()
    assert "=== attempt 2" in log and f"{victim}: {longest['num_train_steps']} steps, resuming from step" in log
    assert same_columns(read_rows(workdir)) == same_columns(expected)


def test_a_point_that_fails_for_good_is_reported_once_and_the_others_finish(local, tmp_path):
    """Points 0 and 2 (--shard=0/2, to save time) on a one-node cluster; point 0's directory holds another
    run's config."""
    config, expected = local
    workdir = tmp_path / "sweep"
    bad = expected[0]["name"]
    (workdir / bad).mkdir(parents=True)
    (workdir / bad / "config.json").write_text(json.dumps({"a": "different run"}))
    with ray_cluster(workers=0) as (address, _):
        code, out, err = finish(ray_sweep(config, workdir, address, "--shard=0/2"))
    assert code == 2
    failed = [line for line in out.splitlines() if line.startswith(f"{bad}: failed")]
    assert len(failed) == 1 and "not retried: error:" in failed[0] and "different config" in failed[0]
    assert err.strip().splitlines()[-1].startswith(f"error: 1 of 2 points failed ({bad};")
    assert (workdir / bad / ray_task.LOG).read_text().count("=== attempt") == 1
    assert same_columns(read_rows(workdir)) == same_columns([expected[2]])


def test_a_killed_driver_reruns_without_duplicate_rows_or_training_a_point_again(local, tmp_path):
    """Points 1 and 3 (--shard=1/2) on a one-node cluster: the driver is killed when the first finishes,
    and run again."""
    config, expected = local
    workdir = tmp_path / "sweep"
    with ray_cluster(workers=0) as (address, _):
        driver = ray_sweep(config, workdir, address, "--shard=1/2")
        _wait_for(lambda: any(workdir.glob(f"*/{sweep.MARKER}")) or driver.poll() is not None, SWEEP_S)
        driver.kill()
        driver.wait()
        _wait_for(lambda: locks_free(workdir), 60)  # Ray ends a dead driver's tasks; their children die with them
        before = {p.name: (p / sweep.MARKER).exists() for p in workdir.iterdir() if p.is_dir()}
        steps = {name: _checkpoint(workdir / name) for name in before}
        lines = {name: _metrics(workdir / name) for name in before}
        code, out, err = finish(ray_sweep(config, workdir, address, "--shard=1/2"))
    assert code == 0, err[-3000:]
    assert any(before.values())
    assert same_columns(read_rows(workdir)) == same_columns(expected[1::2])  # each point once, in order
    for name, finished in before.items():
        trained = [r["step"] for r in _metrics(workdir / name)[len(lines[name]):] if "loss" in r]
        if finished:
            assert trained == [], name
        else:  # only the steps after its last checkpoint ran again
            assert trained == sorted(set(trained)) and (not trained or trained[0] == steps[name] + 1), name


def test_an_unreachable_cluster_is_one_error_line_before_anything_trains(sweep_config, tmp_path):
    config = sweep_config
    address = f"127.0.0.1:{_free_port()}"
    proc = run_cli("sweep", f"--config={config}", f"--workdir={tmp_path / 'sweep'}", f"--ray={address}", timeout=60)
    assert proc.returncode == 2
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and address in errors[0]
    assert not (tmp_path / "sweep").exists()


def _parent(pid: int) -> int:
    return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])


def _last_step(point_dir: Path) -> int:
    path = point_dir / "metrics.jsonl"
    lines = path.read_text().split("\n")[:-1] if path.exists() else []  # whole lines only: it is being written
    return max((r["step"] for r in map(json.loads, lines) if "loss" in r), default=0)


def _checkpoint(point_dir: Path) -> int:
    from llm.training import checkpoint

    return checkpoint.latest_step(str(point_dir)) or 0


def _metrics(point_dir: Path) -> list[dict]:
    path = point_dir / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def test_only_the_ray_driver_imports_ray():
    import ast

    importers = set()
    for path in (REPO / "llm").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            if any(n == "ray" or n.startswith("ray.") for n in names):
                importers.add(path.relative_to(REPO).as_posix())
    assert importers == {"llm/scaling/ray_sweep.py"}


def test_rows_reach_results_csv_in_the_points_order_whatever_order_they_finish(tmp_path):
    from types import SimpleNamespace

    from llm.scaling import ray_sweep

    names = ["a", "b", "c", "d"]
    rows = ray_sweep._Rows(str(tmp_path), [SimpleNamespace(name=n) for n in names])
    row = lambda name: {k: name if k == "name" else 0 for k in sweep.COLUMNS}
    rows.finish("c", row("c"))
    assert not (tmp_path / sweep.RESULTS).exists()  # c waits for a and b
    rows.finish("a", row("a"))
    assert [r["name"] for r in read_rows(tmp_path)] == ["a"]
    rows.finish("b", None)  # failed: holds up nobody
    rows.finish("d", row("d"))
    assert [r["name"] for r in read_rows(tmp_path)] == ["a", "c", "d"]
    assert [r["name"] for r in rows.written] == ["a", "c", "d"]


@pytest.mark.parametrize("key, value", [("resources_per_point", {"CPU": -1}), ("resources_per_point", {"TPU": "4"}),
                                        ("max_retries", -1), ("max_retries", 1.5)])
def test_bad_ray_keys_of_a_sweep_config_are_refused(key, value):
    import ml_collections

    from llm.scaling import ray_sweep
    from llm.spec import ConfigError

    with pytest.raises(ConfigError, match=key):
        ray_sweep.options(ml_collections.ConfigDict({key: value}))
