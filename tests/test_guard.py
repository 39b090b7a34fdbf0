"""A run never aborts or loses work: one writer per workdir, an unwritable workdir is refused before
compiling, a damaged latest checkpoint falls back to an older one, and a full disk stops the run
with the previous checkpoint intact. (Preemption and kill-then-resume: tests/test_train.py.)"""

import glob
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
from conftest import REPO, cli_overrides, run_cli, tiny_config, train_run, xla_flags

import llm
from llm.training import checkpoint, guard


def _one_clear_error(result: subprocess.CompletedProcess, message: str, code: int = guard.EXIT_ERROR) -> None:
    assert result.returncode == code, result.stderr[-3000:]
    assert message in result.stderr, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    assert [line for line in result.stderr.splitlines() if line.startswith("error:")] == [result.stderr.strip().splitlines()[-1]]


def _error_line(result: subprocess.CompletedProcess, code: int) -> str:
    """The one error line. (After a failed Orbax read or write, tensorstore's threads may still print
    tracebacks of their own from C++, which Python cannot filter.)"""
    assert result.returncode == code, result.stderr[-3000:]
    errors = re.findall(r"^error: .*$", result.stderr, re.M)
    assert len(errors) == 1, result.stderr[-3000:]
    return errors[0]


def _wait_for(path, proc: subprocess.Popen, timeout: float = 240) -> None:
    deadline = time.time() + timeout
    while not os.path.exists(path):
        assert proc.poll() is None, f"the run ended (code {proc.returncode}) before {path} appeared"
        assert time.time() < deadline, f"{path} did not appear within {timeout}s"
        time.sleep(0.02)


def test_a_second_run_on_a_workdir_in_use_stops_at_once_naming_the_holder_and_a_killed_holder_leaves_no_lock(tmp_path, corpus):
    workdir = tmp_path / "run"
    command = [sys.executable, "-m", "llm.cli", "train", f"--workdir={workdir}",
               *cli_overrides(corpus, num_train_steps=100_000, checkpoint_every_steps=20)]
    holder = subprocess.Popen(command, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        _wait_for(workdir / "checkpoints" / "20", holder)
        before = sorted(os.listdir(workdir))
        second = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=120)
        _one_clear_error(second, f"{workdir} is in use by process {holder.pid} on ")
        assert "model:" not in second.stderr  # it stopped before building or compiling anything
        assert sorted(os.listdir(workdir)) == before
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    # The kernel dropped the dead holder's lock: the next run takes the workdir without any cleanup.
    with guard.hold_workdir(str(workdir)):
        assert f'"pid": {os.getpid()}' in (workdir / guard.LOCK_FILE).read_text()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def _start_two_process_job(workdir, corpus, unwritable_on: int | None = None) -> list[subprocess.Popen]:
    """A 2-process train job on real jax.distributed processes; process `unwritable_on` cannot write any file."""
    command = [sys.executable, "-m", "llm.cli", "train", f"--workdir={workdir}", *cli_overrides(corpus),
               f"--coordinator_address=localhost:{_free_port()}", "--num_processes=2", "--distributed_timeout_s=60"]
    # A file size limit of 0 (Python ignores SIGXFSZ, so every write fails with EFBIG): that process's view of
    # the workdir is unwritable, as on a host whose local disk is full or mounted read-only.
    no_writes = ["sh", "-c", 'ulimit -f 0 && exec "$@"', "sh"]
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": xla_flags("--xla_force_host_platform_device_count=1")}
    return [subprocess.Popen([*(no_writes if i == unwritable_on else []), *command, f"--process_id={i}"], cwd=REPO, env=env,
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True) for i in range(2)]


def _results(procs: list[subprocess.Popen]) -> list[subprocess.CompletedProcess]:
    try:
        stderr = [p.communicate(timeout=120)[1] for p in procs]
    finally:
        for p in procs:
            p.kill()
    return [subprocess.CompletedProcess(p.args, p.returncode, "", e) for p, e in zip(procs, stderr)]


def test_a_multi_process_job_stops_on_every_process_when_its_workdir_is_in_use_or_one_process_cannot_write_it(tmp_path, corpus):
    workdir, other = tmp_path / "run", tmp_path / "other"
    # Both jobs at once: each spends its few seconds importing and joining its jax.distributed job.
    with guard.hold_workdir(str(workdir)):  # this test's process is the other job holding the workdir
        held, unwritable = _start_two_process_job(workdir, corpus), _start_two_process_job(other, corpus, unwritable_on=1)
        held = _results(held)
    for result in held:  # process 1 gets process 0's message: the holder is named on every process
        _one_clear_error(result, f"{workdir} is in use by process {os.getpid()} on ")
        assert "model:" not in result.stderr  # it stopped before building or compiling anything
    assert os.listdir(workdir) == [guard.LOCK_FILE]

    # One process cannot write into the workdir: it says why, and every other process stops with it.
    writer, cannot = _results(unwritable)
    _one_clear_error(cannot, f"cannot write to the workdir {other}: File too large")
    _one_clear_error(writer, f"error: process(es) 1 of this job cannot use the workdir {other} (their logs say why)")
    assert "model:" not in writer.stderr + cannot.stderr
    assert os.listdir(other) == []  # no lock taken, no probe left behind


def test_an_unwritable_workdir_is_one_error_before_compiling(tmp_path, corpus):
    not_a_dir = tmp_path / "file"
    not_a_dir.write_text("x")
    result = run_cli("train", f"--workdir={not_a_dir / 'run'}", *cli_overrides(corpus))
    _one_clear_error(result, f"cannot write to the workdir {not_a_dir / 'run'}: ")
    assert "model:" not in result.stderr


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only directories; the test above covers an unwritable path")
def test_a_read_only_workdir_is_one_error_before_compiling(tmp_path, corpus):
    workdir = tmp_path / "run"
    workdir.mkdir()
    workdir.chmod(0o555)
    _one_clear_error(run_cli("train", f"--workdir={workdir}", *cli_overrides(corpus)), f"cannot write to the workdir {workdir}: Permission denied")


def _damage(step_dir) -> str:
    """Truncates the largest data file of the step's params: what a crash mid-copy or a bad disk leaves."""
    data_file = max(glob.glob(str(step_dir / "params" / "**" / "d" / "*"), recursive=True), key=os.path.getsize)
    with open(data_file, "r+b") as f:
        f.truncate(os.path.getsize(data_file) // 2)
    return data_file


def test_a_damaged_latest_checkpoint_is_skipped_and_reported_and_the_run_resumes_from_the_one_before(tmp_path, corpus, capsys):
    cfg = lambda steps: tiny_config(corpus, num_train_steps=steps, checkpoint_every_steps=10, opt__schedule="constant")
    workdir = tmp_path / "run"
    train_run(cfg(20), str(workdir), quiet=True)
    _damage(workdir / "checkpoints" / "20")
    capsys.readouterr()

    # eval / sample: the newest readable step, with a warning; an explicit step says why it cannot be read.
    assert llm.load(str(workdir)).step == 10
    assert "cannot read the checkpoint of step 20" in capsys.readouterr().err
    with pytest.raises(checkpoint.CheckpointError, match=r"step 20: ValueError: OUT_OF_RANGE"):
        llm.load(str(workdir), step=20)

    # Training: step 20 is moved aside (kept, not deleted) and the run goes on from step 10.
    train_run(cfg(30), str(workdir), quiet=False)
    err = capsys.readouterr().err
    assert "cannot read the checkpoint of step 20" in err and "trying an older one" in err
    assert f"resuming {workdir} from step 10" in err
    moved = os.listdir(workdir / checkpoint.DAMAGED_DIRNAME)
    assert len(moved) == 1 and moved[0].startswith("20-")
    assert sorted(int(s) for s in os.listdir(workdir / "checkpoints")) == [10, 20, 30]  # step 20 saved anew


def test_when_no_checkpoint_can_be_read_the_run_refuses_to_start_from_scratch(tmp_path, corpus):
    workdir = tmp_path / "run"
    train_run(tiny_config(corpus, num_train_steps=20, checkpoint_every_steps=10), str(workdir), quiet=True)
    for step in (10, 20):
        _damage(workdir / "checkpoints" / str(step))
    result = run_cli("train", f"--workdir={workdir}", *cli_overrides(corpus, num_train_steps=30))
    error = _error_line(result, guard.EXIT_ERROR)
    assert "none of the checkpoints in" in error and "step 20: ValueError: OUT_OF_RANGE" in error and "step 10: ValueError: OUT_OF_RANGE" in error
    assert sorted(os.listdir(workdir / "checkpoints")) == ["10", "20"]  # nothing deleted or moved
    assert "cannot read the checkpoints in" in _error_line(run_cli("eval", f"--workdir={workdir}"), guard.EXIT_ERROR)


@pytest.fixture
def small_disk(tmp_path):
    mount = tmp_path / "disk"
    mount.mkdir()
    made = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16m", "tmpfs", str(mount)], capture_output=True, text=True)
    if made.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here ({made.stderr.strip() or made.returncode}); "
                    f"the disk-full path is then untested on this machine")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=False)


def _fill(mount) -> None:
    try:
        f = open(mount / "filler", "wb", buffering=0)  # unbuffered: closing it has nothing left to flush onto the full disk
    except OSError as e:
        # Seen once on a CI runner: the fresh 16 MB tmpfs refused to create one file while the run's
        # checkpoints held under 2 MB. Then the disk-full path cannot be staged here; say so.
        usage = os.statvfs(mount)
        pytest.skip(f"cannot create a file on the small tmpfs ({e.strerror}; {usage.f_bavail * usage.f_frsize} bytes and "
                    f"{usage.f_favail} inodes free): the disk-full path is untested on this machine")
    with f:
        chunk = b"\0" * (1 << 16)
        try:
            while True:
                f.write(chunk)
                f.flush()
        except OSError:
            pass


def test_a_full_disk_stops_the_run_with_the_previous_checkpoint_intact_and_the_run_resumes_once_there_is_room(small_disk, corpus):
    workdir = small_disk / "run"
    command = [sys.executable, "-m", "llm.cli", "train", f"--workdir={workdir}",
               *cli_overrides(corpus, num_train_steps=100_000, checkpoint_every_steps=50, log_every_steps=10)]
    proc = subprocess.Popen(command, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        _wait_for(workdir / "checkpoints" / "50", proc)
        _fill(small_disk)
        _, stderr = proc.communicate(timeout=240)
    finally:
        proc.kill()
    error = _error_line(subprocess.CompletedProcess(command, proc.returncode, "", stderr), guard.EXIT_WRITE_FAILED)
    assert "No space left on device" in error, error
    kept = checkpoint.latest_step(str(workdir))
    assert kept is not None and kept >= 50 and f"the last committed checkpoint, step {kept}, is intact" in error
    restored = llm.load(str(workdir))  # the step the message names, not a silent fallback to an older one
    assert restored.step == kept
    assert np.isfinite(np.asarray(jax.tree.leaves(restored.params)[0])).all()

    os.remove(small_disk / "filler")
    resumed = run_cli("train", f"--workdir={workdir}", *cli_overrides(corpus, num_train_steps=kept + 20, checkpoint_every_steps=50))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resuming {workdir} from step {kept}" in resumed.stderr
    assert checkpoint.latest_step(str(workdir)) == kept + 20


def test_a_half_written_metrics_record_is_dropped_before_a_resumed_run_appends(tmp_path):
    from llm.training.metrics import Writer

    (tmp_path / "metrics.jsonl").write_text('{"step": 10, "loss": 2.5}\n{"step": 20, "lo')
    writer = Writer(str(tmp_path))
    writer.write(11, {"loss": 2.4})
    writer.close()
    records = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
    assert [(r["step"], r["loss"]) for r in records] == [(10, 2.5), (11, 2.4)]
