"""Device mesh, logical-axis rules and the shardings of state and batches; jax.distributed start-up."""

from typing import Sequence

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

AXES = ("data", "fsdp", "tensor")

# logical axis -> mesh axes; the model names logical axes only.
DEFAULT_RULES = (
    ("batch", ("data", "fsdp")),
    ("vocab", "tensor"),
    ("embed", "fsdp"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("kv", None),
    ("layers", None),
    ("norm", None),
    ("pos", None),
)


class MeshError(ValueError):
    pass


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


def param_shardings(logical_specs, abstract_params, mesh: Mesh, rules=DEFAULT_RULES):
    """NamedShardings for a params-shaped tree, from its logical PartitionSpecs."""
    mesh_specs = nn.logical_to_mesh(logical_specs, rules)
    return jax.tree.map(
        lambda spec, x: NamedSharding(mesh, _fit(spec, x.shape, mesh)),
        mesh_specs, abstract_params, is_leaf=lambda x: isinstance(x, P),
    )


def batch_sharding(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P(("data", "fsdp")))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def data_parallel_size(mesh: Mesh) -> int:
    return mesh.shape["data"] * mesh.shape["fsdp"]


def global_batch(local_batch: dict[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
    """Assembles each host's rows into global arrays sharded over the batch axes."""
    sharding = batch_sharding(mesh)
    return {k: jax.make_array_from_process_local_data(sharding, v) for k, v in local_batch.items()}
