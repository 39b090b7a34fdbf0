"""`./run.sh launch-local N COMMAND [flags]`: N CPU processes on this machine, joined exactly as a
multi-host job is (jax.distributed), with the machine's devices split among them.

Process 0 prints to the terminal; the others write to a log each. When any process fails, the others
are stopped and the failing one's log tail is shown, so a test or a user never waits on a hang.
"""

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time

from llm.training.guard import EXIT_INTERRUPTED


def _with_host_devices(count: int) -> str:
    """The user's XLA_FLAGS with this process's CPU device count in place of any they set."""
    kept = [f for f in os.environ.get("XLA_FLAGS", "").split() if not f.startswith("--xla_force_host_platform_device_count")]
    return " ".join([*kept, f"--xla_force_host_platform_device_count={count}"])


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("", 0))
        return sock.getsockname()[1]


def _stop(procs: list[subprocess.Popen]) -> None:
    for p in procs:
        if p.poll() is None:
            p.terminate()
    deadline = time.time() + 10
    for p in procs:
        try:
            p.wait(max(deadline - time.time(), 0.1))
        except subprocess.TimeoutExpired:
            p.kill()


def main(argv: list[str]) -> int:
    if len(argv) < 2 or not argv[0].isdigit() or int(argv[0]) < 1:
        print("usage: ./run.sh launch-local N COMMAND [flags]   (N processes; LLM_LOCAL_DEVICES devices in all, default 8)", file=sys.stderr)
        return 2
    n, command = int(argv[0]), argv[1:]
    total = int(os.environ.get("LLM_LOCAL_DEVICES", "8"))
    if total % n:
        print(f"error: {total} devices (LLM_LOCAL_DEVICES) cannot be split evenly among {n} processes", file=sys.stderr)
        return 2
    port = _free_port()
    logdir = tempfile.mkdtemp(prefix="launch-local-")
    procs, logs = [], []
    for i in range(n):
        env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": _with_host_devices(total // n)}
        args = [sys.executable, "-m", "llm.cli", *command, f"--coordinator_address=localhost:{port}",
                f"--num_processes={n}", f"--process_id={i}"]
        log = None if i == 0 else open(os.path.join(logdir, f"process_{i}.log"), "w")
        logs.append(log)
        procs.append(subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT if log else None, env=env))
    # A preemption notice (SIGTERM) or Ctrl-C goes to every process, as it would on a pod; each one then
    # stops at the step the job agrees on, writes its share of the checkpoint and exits with 75.
    forward = lambda signum, frame: [p.send_signal(signum) for p in procs if p.poll() is None]
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, forward)
    while True:
        codes = [p.poll() for p in procs]
        if all(c == 0 for c in codes):
            return 0
        if all(c == EXIT_INTERRUPTED for c in codes):
            return EXIT_INTERRUPTED
        failed = [i for i, c in enumerate(codes) if c not in (None, 0, EXIT_INTERRUPTED)]
        if failed:
            i = failed[0]
            print(f"error: process {i} of {n} exited with code {codes[i]}; stopping the others", file=sys.stderr)
            _stop(procs)
            if logs[i] is not None:
                logs[i].flush()
                with open(logs[i].name) as f:
                    print(f"--- last lines of {logs[i].name} ---\n" + "".join(f.readlines()[-15:]), file=sys.stderr)
            return codes[i] if codes[i] > 0 else 1
        time.sleep(0.2)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
