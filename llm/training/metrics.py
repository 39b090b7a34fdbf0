"""Metric writers (JSONL + TensorBoard) and the throughput arithmetic: tokens/s, FLOP/s, MFU."""

import json
import os
import time

import jax
import jax.numpy as jnp
import numpy as np

from llm import upstream


def _drop_torn_last_line(path: str) -> None:
    """A run stopped mid-write (a full disk, a kill) can leave half a record; a resumed run would append
    after it and make the file unreadable as JSON lines."""
    if not os.path.exists(path) or os.path.getsize(path) == 0:
        return
    with open(path, "rb+") as f:
        f.seek(-1, os.SEEK_END)
        if f.read(1) == b"\n":
            return
        f.seek(0)
        content = f.read()
        f.truncate(content.rfind(b"\n") + 1)


class Writer:
    """Appends one JSON object per record to metrics.jsonl and mirrors scalars to TensorBoard."""

    def __init__(self, workdir: str, enabled: bool = True):
        self.enabled = enabled
        if not enabled:
            return
        path = os.path.join(workdir, "metrics.jsonl")
        _drop_torn_last_line(path)
        self._jsonl = open(path, "a")
        self._tb = upstream.tensorboardx_summary_writer()(os.path.join(workdir, "tensorboard"))

    def write(self, step: int, values: dict) -> None:
        if not self.enabled:
            return
        # Wall time (unix seconds) makes time-to-quality readable from the file alone.
        record = {"step": int(step), "time": round(time.time(), 3), **{k: float(v) for k, v in values.items()}}
        self._jsonl.write(json.dumps(record) + "\n")
        self._jsonl.flush()
        for key, value in values.items():
            self._tb.add_scalar(key, float(value), int(step))

    def close(self) -> None:
        if self.enabled:
            self._jsonl.close()
            self._tb.close()


def measure_peak_tflops(dtype=jnp.float32, size: int = 2048, repeats: int = 5) -> float:
    """Best of a few large square matmuls on the default device: what this machine can actually do."""
    key_a, key_b = jax.random.split(jax.random.key(0))
    a = jax.random.normal(key_a, (size, size), dtype)
    b = jax.random.normal(key_b, (size, size), dtype)
    matmul = jax.jit(lambda a, b: a @ b)
    matmul(a, b).block_until_ready()
    best = np.inf
    for _ in range(repeats):
        start = time.perf_counter()
        matmul(a, b).block_until_ready()
        best = min(best, time.perf_counter() - start)
    return 2 * size**3 / best / 1e12


def peak_units() -> int:
    """How many times a per-device peak counts: once per device, but on CPU once per process, because
    split CPU devices (mesh.cpu_devices) share one host's cores and the matmul measured all of them."""
    return jax.process_count() if jax.default_backend() == "cpu" else jax.device_count()


def mfu(flops_per_token: float, tokens_per_s: float, peak_tflops: float) -> float:
    return flops_per_token * tokens_per_s / (peak_tflops * 1e12)
