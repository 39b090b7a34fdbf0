"""A run's guard rails: one writer per workdir, a clean stop on SIGTERM/SIGINT, and the exit codes.

Exit codes of ./run.sh train / sweep (README, "Errors and exit codes"):
  0   finished
  2   one `error:` line: bad input (before anything is compiled), a workdir in use or not writable,
      unreadable checkpoints, or a non-finite loss (the last good checkpoint is kept)
  74  a write to the workdir failed mid-run (e.g. the disk is full); the last committed checkpoint is intact
  75  stopped by SIGTERM/SIGINT after committing a checkpoint; rerun the same command to resume
"""

import contextlib
import datetime
import fcntl
import json
import os
import signal
import socket
import sys
import threading
from typing import IO, Iterator

import jax
import numpy as np
from jax.experimental import multihost_utils

EXIT_ERROR, EXIT_WRITE_FAILED, EXIT_INTERRUPTED = 2, 74, 75
LOCK_FILE = "lock"


class WorkdirError(ValueError):
    pass


class WriteFailed(RuntimeError):
    """A write into the workdir failed during training (disk full, quota, storage gone)."""


class Interrupted(Exception):
    def __init__(self, cause: str, step: int, workdir: str):
        super().__init__(f"{cause}: stopped at step {step} after writing its checkpoint; "
                         f"rerun the same command to resume {workdir}")
        self.step = step


def _all_processes_ok(ok: bool) -> np.ndarray:
    """Every process's flag, in process order (a no-op collective on one process)."""
    if jax.process_count() == 1:
        return np.asarray([ok])
    return np.asarray(multihost_utils.process_allgather(np.int32(ok))).astype(bool).reshape(-1)


_MESSAGE_BYTES = 1024  # a collective needs the same shape on every process: a message is sent padded to this


def _process_0s(message: str | None) -> str | None:
    """Process 0's message (None: none) on every process (a no-op collective on one process)."""
    if jax.process_count() == 1:
        return message
    row_B = np.frombuffer((message or "").encode()[:_MESSAGE_BYTES].ljust(_MESSAGE_BYTES, b"\0"), np.uint8)
    text = bytes(np.asarray(multihost_utils.broadcast_one_to_all(row_B))).rstrip(b"\0")
    return text.decode(errors="ignore") or None


def _shorten(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _holder(path: str) -> str:
    try:
        with open(path) as f:
            info = json.load(f)
        return f"process {info['pid']} on {info['host']} (since {info['started']}: {info['command']})"
    except (OSError, ValueError, KeyError):
        return "another process"


def _write_problem(workdir: str) -> str | None:
    """Why this process cannot write into the workdir, or None."""
    probe = os.path.join(workdir, f".write_probe.{socket.gethostname()}.{os.getpid()}")
    try:
        os.makedirs(workdir, exist_ok=True)
        try:
            with open(probe, "w") as f:
                f.write("ok")
        finally:
            with contextlib.suppress(OSError):  # a probe that could be created but not written is not left behind
                os.remove(probe)
    except OSError as e:
        return f"cannot write to the workdir {workdir}: {e.strerror or e}"
    return None


def _take_lock(workdir: str) -> tuple[IO | None, str | None]:
    """(the held lock file, None), or (None, why it cannot be taken)."""
    path = os.path.join(workdir, LOCK_FILE)
    try:
        lock = open(path, "a+")
    except OSError as e:
        return None, f"cannot write to the workdir {workdir}: {e.strerror or e}"
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        lock.close()
        return None, f"{workdir} is in use by {_holder(path)}; wait for that run to finish, stop it, or use another --workdir"
    lock.seek(0)
    lock.truncate()
    json.dump({"pid": os.getpid(), "host": socket.gethostname(), "processes": jax.process_count(),
               "started": datetime.datetime.now().isoformat(timespec="seconds"),
               "command": _shorten(" ".join(sys.argv), 160)}, lock)
    lock.flush()
    return lock, None


@contextlib.contextmanager
def hold_workdir(workdir: str) -> Iterator[None]:
    """Makes sure the workdir is writable and that this job is its only writer, before any compiling.

    Every process writes its own checkpoint shards, so every process first checks that it can write;
    if one cannot, every process stops. Then process 0 takes an exclusive flock on WORKDIR/lock and
    keeps it while the block runs; the kernel drops it when the process dies, however it dies, so a
    killed run never leaves a stale lock. The other processes of a multi-host job share the workdir
    through process 0's lock: when it cannot be taken, every process stops with process 0's message,
    which names the holder.
    """
    problem = _write_problem(workdir)
    failed = np.flatnonzero(~_all_processes_ok(problem is None))
    if problem is None and failed.size:
        problem = (f"process(es) {', '.join(str(i) for i in failed)} of this job cannot use the "
                   f"workdir {workdir} (their logs say why)")
    if problem:
        raise WorkdirError(problem)
    lock, problem = _take_lock(workdir) if jax.process_index() == 0 else (None, None)
    try:
        problem = _process_0s(problem)
        if problem:
            raise WorkdirError(problem)
        yield
    finally:
        if lock is not None:
            fcntl.flock(lock, fcntl.LOCK_UN)
            lock.close()


class StopSignals:
    """SIGTERM (a preemption notice) and SIGINT (Ctrl-C) ask the train loop to stop after the current
    step; the loop then writes a checkpoint, waits for it to commit and raises Interrupted. Further
    signals while that happens are reported and ignored, so nothing is cut short mid-write.

    On several processes the stop must land on the same step everywhere, or the processes that
    stopped would leave the others waiting in a collective: jax.distributed's preemption service
    owns SIGTERM there and agrees on the step (multihost_utils.reached_preemption_sync_point), and
    SIGINT is passed on to it as a SIGTERM.
    """

    def __init__(self):
        self.received: str | None = None
        self.stop_step: int | None = None
        self._previous: dict[int, object] = {}
        self._multi = jax.process_count() > 1

    def __enter__(self) -> "StopSignals":
        if threading.current_thread() is not threading.main_thread():
            return self  # Python delivers signals to the main thread only; a train() elsewhere keeps the defaults
        signals = (signal.SIGINT,) if self._multi else (signal.SIGTERM, signal.SIGINT)
        if self._multi and not self._preemption_service():
            signals = ()
            print("warning: jax's preemption service is off (jax_enable_preemption_service): SIGTERM and SIGINT "
                  "stop this multi-process run without a checkpoint", file=sys.stderr)
        for sig in signals:
            self._previous[sig] = signal.signal(sig, self._on_signal)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    @staticmethod
    def _preemption_service() -> bool:
        try:
            multihost_utils.reached_preemption_sync_point(0)
            return True
        except RuntimeError:
            return False

    def _on_signal(self, signum: int, frame) -> None:
        name = signal.Signals(signum).name
        if self.received is not None:
            print(f"\n{name}: already stopping; the checkpoint is being written, please wait", file=sys.stderr, flush=True)
            return
        self.received = name
        print(f"\n{name}: stopping after this step and writing a checkpoint", file=sys.stderr, flush=True)
        if self._multi:
            signal.raise_signal(signal.SIGTERM)

    def requested(self, step: int) -> bool:
        """Whether the loop stops after `step` (and writes its checkpoint); on several processes, called
        at every step by every process."""
        stop = multihost_utils.reached_preemption_sync_point(step) if self._multi else self.received is not None
        if stop and self.stop_step is None:
            self.stop_step = step
            # Names the step, so a log (or a test) can tell the stop's save from an earlier periodic one.
            print(f"{self.received or 'SIGTERM'}: writing the checkpoint of step {step}", file=sys.stderr, flush=True)
        return stop

    def cause(self) -> str:
        return self.received or "a preemption notice (SIGTERM) reached this job"
