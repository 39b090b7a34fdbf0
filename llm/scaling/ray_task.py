"""What a Ray worker runs for one point of a `--ray` sweep (llm/scaling/ray_sweep.py is the driver): the
single-point path in a child process, `python -m llm.cli sweep-point`, so the point trains exactly as
`./run.sh sweep` trains it and its exit code says what happened. Standard library only: a Ray worker that
imports this module loads neither jax nor ray's driver side; only the child does.
"""

import contextlib
import ctypes
import fcntl
import os
import pickle
import signal
import socket
import subprocess
import sys
import tempfile
import time
from typing import Iterator

LOG = "sweep.log"  # in a point's directory: what its child processes printed, a header line per attempt
LOCK_FILE = "lock"  # llm/training/guard.py's (importing guard would load jax into every worker)
LOCK_WAIT_S = 120.0  # how long a retry waits for a killed attempt's child to let go of the point's lock
# The checkout the worker imported llm from: the child runs there, as ./run.sh runs from its checkout.
_REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def die_with_parent(parent_pid: int) -> None:
    """The child trains only while the task that started it lives: a worker killed by SIGKILL (or its node
    gone) takes the child with it, so a retry never shares the point's directory with a stray trainer."""
    with contextlib.suppress(OSError, AttributeError):  # Linux only: prctl(PR_SET_PDEATHSIG, SIGKILL)
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)
    if os.getppid() != parent_pid:  # the parent died before prctl took effect
        os._exit(1)


def read_point(path: str):
    """In the child: (the point, the sweep's base config) that the task wrote, after die_with_parent."""
    with open(path, "rb") as f:
        parent_pid = pickle.load(f)
        die_with_parent(parent_pid)
        return pickle.load(f)


def _wait_for_lock(point_dir: str) -> None:
    """A retry can start before the killed attempt's child has died (its node is still being torn down, or
    an NFS lock's lease has not expired); wait for its lock rather than fail with 'in use' (exit 2)."""
    deadline = time.monotonic() + LOCK_WAIT_S
    with open(os.path.join(point_dir, LOCK_FILE), "a+") as lock:
        while True:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
                fcntl.flock(lock, fcntl.LOCK_UN)
                return
            except BlockingIOError:
                if time.monotonic() > deadline:
                    return  # the child then says who holds it
                time.sleep(0.5)


def _last_error(log_path: str, offset: int) -> str:
    with open(log_path, errors="replace") as f:
        f.seek(offset)
        lines = [line.strip() for line in f if line.strip()]
    errors = [line for line in lines if line.startswith(("error:", "interrupted:"))]
    return (errors or lines or ["(no output)"])[-1]


def train(point_blob: bytes, name: str, workdir: str, attempt: int) -> Iterator[dict]:
    """A Ray generator task: yields {'host', 'pid'} as soon as a worker runs it, then {'returncode', 'error'}
    of the child that trained the point (point_blob: the pickled (point, base config))."""
    yield {"host": socket.gethostname(), "pid": os.getpid()}
    point_dir = os.path.join(workdir, name)
    os.makedirs(point_dir, exist_ok=True)
    _wait_for_lock(point_dir)
    log_path = os.path.join(point_dir, LOG)
    with tempfile.TemporaryDirectory() as tmp, open(log_path, "a") as log:
        point_file = os.path.join(tmp, "point.pkl")
        with open(point_file, "wb") as f:
            pickle.dump(os.getpid(), f)
            f.write(point_blob)
        log.write(f"=== attempt {attempt + 1} on {socket.gethostname()} (worker pid {os.getpid()}), "
                  f"{time.strftime('%Y-%m-%d %H:%M:%S')}\n")
        log.flush()
        offset = log.tell()
        proc = subprocess.run([sys.executable, "-m", "llm.cli", "sweep-point", f"--point_file={point_file}",
                               f"--workdir={workdir}"], cwd=_REPO, stdin=subprocess.DEVNULL, stdout=log,
                              stderr=subprocess.STDOUT)
    yield {"returncode": proc.returncode, "error": "" if proc.returncode == 0 else _last_error(log_path, offset)}
