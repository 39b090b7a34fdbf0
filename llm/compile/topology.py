"""Accelerator slices by their Cloud names (`v5e-8`, `v5p-64`, ...): the chips' published figures and
the devices of a slice that is not attached, from JAX's deviceless topologies (libtpu from PyPI).

Cloud TPU names count TensorCores for v4 and v5p (two per chip) and chips for v5e and v6e. JAX has one
device per chip, except v4's compile-only topology, which has one per TensorCore: each then holds half
the chip's HBM and peak (`devices_per_chip`). Published per-chip figures (Cloud TPU system-architecture pages, NVIDIA's H100 datasheet):

    chip  bf16 TFLOP/s  HBM GiB  HBM GB/s  ICI GB/s (per chip, all links, one way)
    v4        275          32      1228      300
    v5e       197          16       819      200
    v5p       459          95      2765      600
    v6e       918          32      1640      448
    h100      989          79      3352      450   (SXM; NVLink 900 GB/s both ways; one host of up to 8)

An H100 host compiles through JAX's CUDA plugin (the `gpu` extra: jax-cuda13-plugin and -pjrt, about
130 MB, and a CUDA 13 toolkit's ptxas on the PATH) with a target description of the card instead of
one attached: `h100-1` to `h100-8`.
"""

import dataclasses
import os
import re

from llm.spec import ConfigError
from llm.training import sharding


@dataclasses.dataclass(frozen=True)
class Chip:
    name: str
    bf16_tflops: float  # peak dense bf16 matmul throughput
    hbm_gib: float  # capacity (the v5e's "16 GB" and the v5p's "95 GB" are read as GiB, as XLA reports them)
    hbm_gbps: float  # HBM bandwidth, GB/s
    ici_gbps: float  # inter-chip interconnect, GB/s per chip over all its links in one direction
    cores_in_name: int  # Cloud's name counts this many per chip (2: TensorCores of a megacore chip)
    dims: int  # 3: a 3D torus (v4, v5p), 2: a 2D torus (v5e, v6e)


CHIPS = {
    "h100": Chip("h100", 989.0, 79.14, 3352.0, 450.0, 1, 1),
    "v4": Chip("v4", 275.0, 32.0, 1228.0, 300.0, 2, 3),
    "v5e": Chip("v5e", 197.0, 16.0, 819.0, 200.0, 1, 2),
    "v5p": Chip("v5p", 459.0, 95.0, 2765.0, 600.0, 2, 3),
    "v6e": Chip("v6e", 918.0, 32.0, 1640.0, 448.0, 1, 2),
}
ALIASES = {"v5litepod": "v5e", "v6litepod": "v6e"}

# Chips of a slice -> its shape (Cloud TPU's supported slice shapes).
SHAPES_2D = {1: (1, 1), 4: (2, 2), 8: (2, 4), 16: (4, 4), 32: (4, 8), 64: (8, 8), 128: (8, 16), 256: (16, 16)}
SHAPES_GPU = {n: (1, 1, n) for n in (1, 2, 4, 8)}  # slices x hosts x GPUs per host
SHAPES_3D = {4: (2, 2, 1), 8: (2, 2, 2), 16: (2, 2, 4), 32: (2, 4, 4), 64: (4, 4, 4), 128: (4, 4, 8), 256: (4, 8, 8),
             512: (8, 8, 8), 1024: (8, 8, 16), 2048: (8, 16, 16), 4096: (16, 16, 16)}


@dataclasses.dataclass(frozen=True)
class Slice:
    name: str  # as given, e.g. 'v5e-8'
    chip: Chip
    chips: int
    shape: tuple[int, ...]

    @property
    def jax_name(self) -> str:
        """jax.experimental.topologies' name for it, e.g. 'v5e:2x4' (a GPU host's: '1x1x8')."""
        shape = "x".join(map(str, self.shape))
        return shape if self.gpu else f"{self.chip.name}:{shape}"

    @property
    def gpu(self) -> bool:
        return self.chip.name == "h100"


def _shapes(chip: Chip) -> dict:
    return SHAPES_GPU if chip.name == "h100" else SHAPES_3D if chip.dims == 3 else SHAPES_2D


def known_names() -> list[str]:
    return [f"{chip.name}-{n * chip.cores_in_name}" for chip in CHIPS.values() for n in _shapes(chip)]


def parse(name: str) -> Slice:
    """A Cloud TPU slice name (`v4-8`, `v5e-16`, `v5litepod-16`, `v5p-64`, `v6e-8`) -> its chips and shape."""
    match = re.fullmatch(r"([a-z]\d+[a-z]*)-(\d+)", name.strip())
    chip = CHIPS.get(ALIASES.get(match.group(1), match.group(1))) if match else None
    if chip is None:
        raise ConfigError(f"--topology={name!r} is not a slice this command knows; known: {', '.join(known_names())}")
    count = int(match.group(2))
    shapes = _shapes(chip)
    if count % chip.cores_in_name or count // chip.cores_in_name not in shapes:
        raise ConfigError(f"--topology={name!r}: {chip.name} slices are {', '.join(n for n in known_names() if n.startswith(chip.name + '-'))}")
    chips = count // chip.cores_in_name
    return Slice(name, chip, chips, shapes[chips])


# The H100 SXM as XLA's GPU compiler describes a card (a GpuTargetConfigProto in text form; the
# figures are NVIDIA's: 132 SMs, compute capability 9.0, 80 GB of HBM3 at 3.35 TB/s, 50 MB of L2).
H100_TARGET = """
gpu_device_info {
  threads_per_block_limit: 1024 threads_per_warp: 32 shared_memory_per_block: 49152 shared_memory_per_core: 233472
  threads_per_core_limit: 2048 core_count: 132 fpus_per_core: 128 block_dim_limit_x: 2147483647 block_dim_limit_y: 65535
  block_dim_limit_z: 65535 memory_bandwidth: 3352320000000 l2_cache_size: 52428800 clock_rate_ghz: 1.98
  device_memory_size: 84978434048 shared_memory_per_block_optin: 232448 cuda_compute_capability { major: 9 }
  registers_per_core_limit: 65536 registers_per_block_limit: 65536
}
platform_name: "CUDA"
device_description_str: "NVIDIA H100 80GB HBM3"
"""


def _gpu_devices(gpus: Slice) -> list:
    if not sharding.installed("jax_plugins.xla_cuda13"):
        raise ConfigError(f"--topology={gpus.name} compiles through JAX's CUDA plugin, which is not installed: "
                          f".venv/bin/pip install -e '.[gpu]' (JAX's CUDA 13 plugin; a CUDA 13 ptxas on the PATH)")
    from jax.experimental import topologies

    return list(topologies.get_topology_desc(platform="cuda", topology=gpus.jax_name, target_config=H100_TARGET).devices)


def devices(tpu: Slice) -> list:
    """The slice's devices, for compiling only: libtpu's compiler runs here, no TPU is needed or touched.

    libtpu reads TPU_* variables meant for a real TPU VM and warns about each one unset; set here to
    what a deviceless compile needs, they silence that. It also takes a lock file that keeps a second
    process from loading it, which guards a TPU that is not here: compiles may run side by side.
    Raises ConfigError when libtpu is missing."""
    if tpu.gpu:
        return _gpu_devices(tpu)
    try:
        import libtpu  # noqa: F401  (jax[tpu]'s runtime; ./run.sh setup installs it)
    except ImportError as e:
        raise ConfigError("compiling for a TPU needs libtpu: ./run.sh setup installs it (jax[tpu], pinned to the jax in use)") from e
    os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    os.environ.setdefault("TPU_ACCELERATOR_TYPE", f"{tpu.chip.name}-{tpu.chips * tpu.chip.cores_in_name}")
    from jax.experimental import topologies

    # A host holds 2x2 chips (a one-chip slice: one); libtpu wants the slice shape divisible by it.
    per_host = (1, 1, 1) if tpu.chips == 1 else (2, 2, 1)
    return list(topologies.get_topology_desc(topology_name=tpu.jax_name, platform="tpu", chips_per_host_bounds=per_host).devices)
