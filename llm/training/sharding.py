"""Device mesh, logical-axis rules and the shardings of state and batches; jax.distributed start-up."""

import importlib.util
import math
import os
import socket
import time
from typing import Sequence

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

AXES = ("data", "fsdp", "tensor")


class MeshError(ValueError):
    pass


HOST_DEVICES_FLAG = "--xla_force_host_platform_device_count"


def host_cores() -> int:
    """Cores this process may run on (the affinity mask where the OS has one, e.g. under taskset)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def split_host_cpu(cpu_devices: int, batch_rows: Sequence[int], default_mesh: bool) -> int:
    """Makes XLA:CPU present this host's cores as several JAX devices; call it before JAX starts.

    XLA:CPU runs a small model's ops one after another, most of them on one core; as separate
    devices the cores each take a share of the batch (data parallel), which made the nanoGPT-sized
    step 1.4x faster on 2 cores (experiments/perf/README.md). cpu_devices=-1 takes one device per
    core, reduced to divide every batch, and only for the default mesh (data=-1, fsdp=tensor=1);
    0 keeps JAX's single CPU device. XLA_FLAGS that already set the count win. Accelerators are
    unaffected: their devices are not the CPU's. Returns the count set (0: left alone).
    """
    if HOST_DEVICES_FLAG in os.environ.get("XLA_FLAGS", "") or cpu_devices == 0:
        return 0
    count = cpu_devices
    if cpu_devices < 0:
        if not default_mesh:
            return 0
        count = math.gcd(host_cores(), *batch_rows)
        if count == 1:
            return 0
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {HOST_DEVICES_FLAG}={count}".strip()
    return count


def installed(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:  # a parent package of a dotted name is absent
        return False


def leave_out_absent_tpu(host_only: bool = False) -> None:
    """With libtpu or JAX's CUDA plugin installed (for ./run.sh compile), JAX would try to start a TPU or
    CUDA runtime on every host, printing warnings about unset TPU_* variables or a failed cuInit where
    none is attached. Unless the user set JAX_PLATFORMS, JAX is told to leave out what is absent: a TPU
    where no TPU chip is on the PCI bus (JAX's own probe, which starts nothing), CUDA where the NVIDIA
    driver has no device (host_only: both). Call it before JAX starts a backend."""
    if os.environ.get("JAX_PLATFORMS") or not (installed("libtpu") or installed("jax_plugins.xla_cuda13")):
        return
    from jax._src import hardware_utils

    tpu = not host_only and hardware_utils.num_available_tpu_chips_and_device_id()[0] > 0
    gpu = not host_only and os.path.exists("/dev/nvidiactl")
    if not tpu:
        jax.config.update("jax_platforms", "cuda,cpu" if gpu else "cpu")


def mesh_shape(data: int, fsdp: int, tensor: int, num_devices: int) -> tuple[int, int, int]:
    shape = [data, fsdp, tensor]
    if shape.count(-1) > 1:
        raise MeshError("at most one of mesh.data, mesh.fsdp, mesh.tensor may be -1")
    known = int(np.prod([s for s in shape if s != -1]))
    if -1 in shape:
        if num_devices % known:
            raise MeshError(f"mesh {tuple(shape)}: {num_devices} devices are not divisible by {known}")
        shape[shape.index(-1)] = num_devices // known
    if int(np.prod(shape)) != num_devices:
        raise MeshError(
            f"mesh data={shape[0]} x fsdp={shape[1]} x tensor={shape[2]} = {int(np.prod(shape))} devices, "
            f"but there are {num_devices}"
        )
    return tuple(shape)


def make_mesh(data: int, fsdp: int, tensor: int, devices: Sequence[jax.Device] | None = None) -> Mesh:
    devices = list(jax.devices() if devices is None else devices)
    shape = mesh_shape(data, fsdp, tensor, len(devices))
    return Mesh(np.asarray(devices).reshape(shape), AXES)


def _fit(spec: P, shape: tuple[int, ...], mesh: Mesh) -> P:
    """Replicates any dimension that its mesh axes do not divide evenly (e.g. a vocab of 65)."""
    fitted = []
    for dim, axes in zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec))):
        names = (axes,) if isinstance(axes, str) else (axes or ())
        size = int(np.prod([mesh.shape[a] for a in names])) if names else 1
        fitted.append(axes if size > 1 and dim % size == 0 else None)
    return P(*fitted)


def param_shardings(logical_specs, abstract_params, mesh: Mesh, rules: tuple):
    """NamedShardings for a params-shaped tree, from its logical PartitionSpecs."""
    mesh_specs = nn.logical_to_mesh(logical_specs, rules)
    return jax.tree.map(
        lambda spec, x: NamedSharding(mesh, _fit(spec, x.shape, mesh)),
        mesh_specs, abstract_params, is_leaf=lambda x: isinstance(x, P),
    )


def check_divisible(mesh: Mesh, batch: int, num_heads: int, num_kv_heads: int, d_ff: int, d_model: int) -> None:
    """Dimensions that must split evenly; a vocab that does not is replicated instead (see _fit)."""
    dp, tensor, fsdp = data_parallel_size(mesh), mesh.shape["tensor"], mesh.shape["fsdp"]
    problems = []
    if batch % dp:
        problems.append(f"the micro-batch of {batch} rows is not divisible by the {dp} data-parallel devices (mesh.data x mesh.fsdp)")
    for name, size in (("num_heads", num_heads), ("num_kv_heads", num_kv_heads), ("d_ff", d_ff)):
        if size % tensor:
            problems.append(f"model.{name}={size} is not divisible by mesh.tensor={tensor}")
    if d_model % fsdp:
        problems.append(f"model.d_model={d_model} is not divisible by mesh.fsdp={fsdp}")
    if problems:
        raise MeshError(f"mesh {dict(mesh.shape)} does not fit this run:\n  " + "\n  ".join(problems))


def abstract(tree, shardings):
    """ShapeDtypeStructs that carry shardings: what Orbax restores onto (any mesh, any device count)."""
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)


def batch_sharding(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P(("data", "fsdp")))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def data_parallel_size(mesh: Mesh) -> int:
    return mesh.shape["data"] * mesh.shape["fsdp"]


def host_rows(mesh: Mesh, global_batch_size: int) -> tuple[int, int]:
    """The rows [lo, hi) of a global batch that this host's devices hold (all of them when the batch
    is replicated, e.g. on a tensor-only mesh)."""
    index_map = batch_sharding(mesh).addressable_devices_indices_map((global_batch_size,))
    starts = [idx[0].start or 0 for idx in index_map.values()]
    stops = [global_batch_size if idx[0].stop is None else idx[0].stop for idx in index_map.values()]
    lo, hi = min(starts), max(stops)
    covered = sum(b - a for a, b in {(a, b) for a, b in zip(starts, stops)})
    assert covered == hi - lo, "a host's batch rows must be contiguous; use a mesh whose devices are ordered by process"
    return lo, hi


def global_batch(local_batch: dict[str, np.ndarray], mesh: Mesh, global_batch_size: int) -> dict[str, jax.Array]:
    """Assembles each host's rows into global arrays sharded over the batch axes."""
    sharding = batch_sharding(mesh)
    return {
        k: jax.make_array_from_process_local_data(sharding, v, (global_batch_size, *v.shape[1:]))
        for k, v in local_batch.items()
    }


class DistributedError(RuntimeError):
    pass


def _check_coordinator(address: str, process_id: int, timeout_s: float) -> None:
    """JAX aborts the process with a misleading 'another task died' when the coordinator is missing;
    checking the socket first turns that into one clear message."""
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        raise DistributedError(f"--coordinator_address={address!r} must be HOST:PORT")
    if process_id == 0:
        with socket.socket() as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                sock.bind(("", int(port)))
            except OSError as e:
                raise DistributedError(f"process 0 cannot serve as coordinator on port {port}: {e.strerror}") from e
        return
    deadline = time.time() + timeout_s
    while True:
        try:
            socket.create_connection((host, int(port)), timeout=2).close()
            return
        except OSError as e:
            if time.time() > deadline:
                raise DistributedError(
                    f"the coordinator {address} cannot be reached from process {process_id} after {timeout_s:.0f}s "
                    f"({e.strerror or e}); is process 0 running there?"
                ) from e
            time.sleep(0.5)


def initialize_distributed(coordinator_address: str, num_processes: int, process_id: int, timeout_s: int = 300,
                           heartbeat_timeout_s: int = 60) -> None:
    """Joins a multi-process job: explicit flags, or auto-detection on Cloud TPU / SLURM when no address is given."""
    if coordinator_address:
        if num_processes < 1:
            raise DistributedError(f"--num_processes must be >= 1, got {num_processes}")
        if not 0 <= process_id < num_processes:
            raise DistributedError(f"--process_id={process_id} is out of range for --num_processes={num_processes} (0..{num_processes - 1})")
        _check_coordinator(coordinator_address, process_id, timeout_s)
    # CPU processes exchange collectives through gloo; accelerators use their own interconnect.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    try:
        jax.distributed.initialize(
            coordinator_address or None, num_processes if coordinator_address else None,
            process_id if coordinator_address else None, initialization_timeout=timeout_s,
            heartbeat_timeout_seconds=heartbeat_timeout_s,
        )
    except Exception as e:  # the runtime raises several types; all mean the job could not form
        raise DistributedError(
            f"could not join the distributed job (coordinator {coordinator_address or 'auto-detected'}, "
            f"process {process_id} of {num_processes}) within {timeout_s}s: {str(e).splitlines()[0]}"
        ) from e
