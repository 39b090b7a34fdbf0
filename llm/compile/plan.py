"""The train step a run would compile on a slice that is not attached: built by the same builder as
`./run.sh train` (llm/training/state.py), on a mesh of the slice's devices, lowered on abstract sharded
inputs and compiled by the slice's own compiler (libtpu's, here on a CPU host). What it needs per chip,
whether that fits, its collectives and a roofline step time; the largest batch that fits; the sampler's
prefill and decode step with their KV cache.
"""

import dataclasses
import functools
import re
import time

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from llm import model, spec
from llm.compile import cost
from llm.compile.topology import Slice
from llm.data.tokenizer import size_without_corpus
from llm.model.attention import KVCache
from llm.spec import RunSpec
from llm.training import metrics, sharding, state as state_lib

REMATS = ("none", "dots", "block")  # the model.remat policies, from the least memory saved to the most


def resolve(run: RunSpec, tpu: Slice) -> RunSpec:
    """The run's model as the slice runs it: the vocabulary its tokenizer would give (as bench counts it)
    and the choices of the TPU backend (attention, unfused q/k/v)."""
    return spec.resolve(run, size_without_corpus(run.data.tokenizer, run.data.vocab_size), backend="tpu")


def mesh_of(run: RunSpec, devices: list) -> jax.sharding.Mesh:
    """The config's mesh.* axes over the slice's devices, checked against the model as training checks it."""
    mesh = sharding.make_mesh(run.mesh.data, run.mesh.fsdp, run.mesh.tensor, devices)
    m = run.model
    sharding.check_divisible(mesh, run.batch_size // run.opt.grad_accum_steps, m.H, m.G, m.F, m.D)
    return mesh


def _abstract_batch(run: RunSpec, mesh: jax.sharding.Mesh) -> dict:
    rows = sharding.batch_sharding(mesh)
    length = run.model.T or run.seq_len
    ids = jax.ShapeDtypeStruct((run.batch_size, length), jnp.int32, sharding=rows)
    batch = {"inputs": ids, "targets": ids, "weights": jax.ShapeDtypeStruct(ids.shape, jnp.float32, sharding=rows)}
    if run.model.arch == "encoder_decoder":
        batch["encoder_inputs"] = jax.ShapeDtypeStruct((run.batch_size, run.seq_len), jnp.int32, sharding=rows)
    return batch


@dataclasses.dataclass(frozen=True)
class Compiled:
    hbm: dict[str, float]  # GiB per chip, by part (llm/compile/cost.py)
    flops_per_chip: float
    bytes_per_chip: float
    collectives: dict[str, dict[str, float]]
    compile_s: float
    out_of_memory: str = ""  # the compiler's refusal when the program does not fit; hbm then holds what it said
    costs_from: str = "the compiled step"  # where flops_per_chip and bytes_per_chip were read


COSTS_UNWINDOWED = "the step compiled again without windowed einsums"
COSTS_UNROLLED = "the step unrolled at depth 1 and 2 without windowed einsums, extended to its layers and micro-batches"
COSTS_LOOPED = "the compiled step, each loop body once (its unrolled copy did not fit)"
# XLA:TPU overlaps an FSDP all-gather or reduce-scatter with the matmul that uses it in a loop over the
# shards (a windowed einsum), and its cost analysis counts that loop's body once: a 3-layer FSDP step on
# v5e-8 read 0.80 of its FLOPs. The copies compiled only to be counted leave them out; the matmuls are
# the same.
COUNTABLE = {"xla_tpu_enable_windowed_einsum_for_all_gather": False, "xla_tpu_enable_windowed_einsum_for_reduce_scatter": False}


def _analyse(compiled, chips: int, compile_s: float) -> Compiled:
    costs = compiled.cost_analysis() or {}  # XLA's GPU compiler gives none without a card attached
    costs = costs[0] if isinstance(costs, (list, tuple)) else costs
    return Compiled(cost.hbm(compiled), float(costs.get("flops", 0.0)), float(costs.get("bytes accessed", 0.0)),
                    cost.collectives(compiled, chips), compile_s)


def _bytes_per_chip(tree) -> float:
    """GiB one chip holds of a tree of sharded abstract arrays (its largest shard of each)."""
    shards = [int(np.prod(x.sharding.shard_shape(x.shape))) * x.dtype.itemsize for x in jax.tree.leaves(tree)]
    return sum(shards) / cost.GIB


def _refused(error: Exception, arguments_gib: float, compile_s: float) -> Compiled:
    """A compile that ran out of HBM, as a result: the compiler names the part it could not place and
    what was available ('... required for HLO temporaries (18.29G) exceeds available HBM (15.75G)')."""
    text = str(error)
    unit = {"K": 2.0**-20, "M": 2.0**-10, "G": 1.0, "T": 2.0**10}
    named = re.search(r"required for ([\w ]+?) \(([\d.]+)([KMGT])\) exceeds available HBM \(([\d.]+)([KMGT])\)", text)
    used = re.search(r"Used ([\d.]+)([KMGT]) of ([\d.]+)([KMGT]) hbm", text)
    hbm = {"arguments": arguments_gib}
    if named:
        part = "temporaries" if "temporar" in named.group(1) else named.group(1).strip().replace(" ", "_")
        hbm[part] = float(named.group(2)) * unit[named.group(3)]
    elif used:
        hbm["other"] = max(float(used.group(1)) * unit[used.group(2)] - arguments_gib, 0.0)
    hbm["total"] = sum(hbm.values())
    return Compiled(hbm, 0.0, 0.0, {}, compile_s, out_of_memory=text.strip().splitlines()[0][:400])


def compile_train_step(run: RunSpec, mesh: jax.sharding.Mesh, costs: bool = True) -> Compiled:
    """The jitted train step of state.setup, the one `./run.sh train` runs, compiled for the mesh's devices.
    A step that does not fit in HBM is a result (Compiled.out_of_memory), not an error. costs=False skips
    the extra compiles that count the FLOPs and bytes of a step with loops (a fit is all find_batch asks)."""
    compiled = _compile(run, mesh)
    if compiled.out_of_memory or not costs or not compiled.flops_per_chip:
        return compiled
    windowed = any(v["windowed"] for v in compiled.collectives.values())
    if not _has_loops(run) and not windowed:
        return compiled
    counted = _unrolled_costs(run, mesh)
    if counted is None:
        return dataclasses.replace(compiled, costs_from=COSTS_LOOPED)
    return dataclasses.replace(compiled, flops_per_chip=counted[0], bytes_per_chip=counted[1],
                               costs_from=COSTS_UNROLLED if _has_loops(run) else COSTS_UNWINDOWED)


def _has_loops(run: RunSpec) -> bool:
    return run.model.scan_layers or run.opt.grad_accum_steps > 1


def _unrolled_costs(run: RunSpec, mesh: jax.sharding.Mesh) -> tuple[float, float] | None:
    """FLOPs and bytes per chip of a step with loops in it. XLA's cost analysis counts a while loop's body
    once, so a scanned stack of N layers reads as one layer, K accumulated micro-batches as one, and a
    windowed einsum as one shard's matmul (copies compiled without them: COUNTABLE). The
    layers are alike, so a step's cost is affine in its depth: it is read from one micro-batch's step,
    unrolled, at depth 1 and at depth 2 for each stack (decoder N, encoder E), extended to the real
    depth, times K (which counts the optimizer update K times: small beside K forward and backward passes)."""
    k, m = run.opt.grad_accum_steps, run.model
    micro = dataclasses.replace(run, batch_size=run.batch_size // k, opt=dataclasses.replace(run.opt, grad_accum_steps=1))
    options = COUNTABLE if mesh.devices.flat[0].platform == "tpu" else None

    def at(**depth: int) -> np.ndarray:
        c = _compile(dataclasses.replace(micro, model=dataclasses.replace(m, scan_layers=False, **depth)), mesh, options)
        return np.array([c.flops_per_chip, c.bytes_per_chip]) if not c.out_of_memory else np.full(2, np.nan)

    depths = {"N": m.N, **({"E": m.E} if m.E else {})}
    if not m.scan_layers:
        total = at(**depths)
    else:
        ones = {name: 1 for name in depths}
        base = at(**ones)
        total = base + sum((d - 1) * (at(**{**ones, name: 2}) - base) for name, d in depths.items() if d > 1)
    return None if np.isnan(total).any() else (float(k * total[0]), float(k * total[1]))


def _compile(run: RunSpec, mesh: jax.sharding.Mesh, options: dict | None = None) -> Compiled:
    built = state_lib.setup(run.model, run.opt, mesh, run.mesh.rules)
    abstract_state = state_lib.TrainState(jax.ShapeDtypeStruct((), jnp.int32, sharding=sharding.replicated(mesh)),
                                          sharding.abstract(built.abstract_params, built.param_sh),
                                          sharding.abstract(built.abstract_opt, built.opt_sh))
    batch = _abstract_batch(run, mesh)
    start = time.perf_counter()
    try:
        compiled = built.train_step.lower(abstract_state, batch).compile(compiler_options=options)
    except jax.errors.JaxRuntimeError as e:
        if "RESOURCE_EXHAUSTED" not in str(e):
            raise
        return _refused(e, _bytes_per_chip((abstract_state, batch)), time.perf_counter() - start)
    return _analyse(compiled, mesh.devices.size, time.perf_counter() - start)


def capacity_gib(tpu: Slice, mesh: jax.sharding.Mesh) -> float:
    """HBM per device: a chip's, split between its devices where each TensorCore is one (v4)."""
    return tpu.chip.hbm_gib * tpu.chips / mesh.devices.size


def fits(c: Compiled, tpu: Slice, mesh: jax.sharding.Mesh) -> bool:
    return not c.out_of_memory and c.hbm["total"] <= capacity_gib(tpu, mesh)


def report(run: RunSpec, tpu: Slice, mesh: jax.sharding.Mesh, c: Compiled) -> dict:
    """The JSON a compile prints: fit, memory by part, FLOPs beside our count, collectives, roofline. A step
    that does not fit says by how much and which part is largest, and has no FLOPs or roofline."""
    devices = mesh.devices.size
    model_flops = model.flops_per_token(run.model) * run.tokens_per_step
    capacity = capacity_gib(tpu, mesh)
    out = {
        "topology": tpu.name, "chips": tpu.chips, "devices": devices, "mesh": dict(mesh.shape), "batch_size": run.batch_size,
        "seq_len": run.seq_len, "remat": run.model.remat, "fits": fits(c, tpu, mesh),
        "hbm_per_chip_gib": {k: round(v, 4) for k, v in c.hbm.items()}, "hbm_capacity_gib": capacity,
        "model_flops_per_step": model_flops, "compile_s": c.compile_s,
    }
    if not out["fits"]:
        parts = {k: v for k, v in c.hbm.items() if k != "total"}
        out.update(over_gib=c.hbm["total"] - capacity, largest_part=max(parts, key=parts.get))
        if c.out_of_memory:
            out["compiler"] = c.out_of_memory
            return out
    wire = sum(v["wire_bytes"] for v in c.collectives.values())
    # A device that is one of a chip's TensorCores has its share of the chip's peak and bandwidths.
    share = tpu.chips / devices
    # Without XLA's counts (a GPU), the roofline takes our model FLOPs and has no memory term.
    flops = c.flops_per_chip or model_flops / devices
    out.update(
        flops_per_step=c.flops_per_chip * devices or None, flops_ratio=c.flops_per_chip * devices / model_flops or None,
        costs_from=c.costs_from,
        collectives={k: {"count": v["count"], "bytes": v["buffer_bytes"], **({"windowed": v["windowed"]} if v["windowed"] else {})}
                     for k, v in c.collectives.items() if v["count"]},
        collective_shapes={k: sorted(set(v["shapes"])) for k, v in c.collectives.items() if v["count"]},
        projected_step_ms=None, projected_mfu=None, roofline_ms=None, bound=None)
    if c.costs_from == COSTS_LOOPED:  # FLOPs and bytes of one layer and one micro-batch: no projection from them
        return out
    line = cost.roofline(tpu.chip, flops / share, c.bytes_per_chip / share, wire / share)
    out.update(
        projected_step_ms=line.step_ms, projected_mfu=metrics.mfu(model_flops / run.tokens_per_step, run.tokens_per_step * 1e3 / line.step_ms, tpu.chips * tpu.chip.bf16_tflops),
        roofline_ms={"compute": line.compute_ms, "memory": line.memory_ms, "communication": line.communication_ms},
        bound=line.bound)
    return out


def find_batch(run: RunSpec, mesh: jax.sharding.Mesh, tpu: Slice, seq_len: int = 0, remats=REMATS,
               most: int = 1 << 16) -> dict[str, int]:
    """The largest global batch (a multiple of the data-parallel size, at most `most` of them) whose train
    step fits on the slice at seq_len (the config's if 0), for each remat policy: `most` first when it is
    finite (one compile when it fits; a step that does not fit fails its compile in seconds), then
    doubling and bisection. 0: none fits."""
    dp = sharding.data_parallel_size(mesh)
    unit = dp * run.opt.grad_accum_steps
    found = {}
    for remat in remats:
        trial = dataclasses.replace(run, seq_len=seq_len or run.seq_len,
                                    model=dataclasses.replace(run.model, remat=remat, L=seq_len or run.model.L))

        @functools.cache
        def fits_at(multiple: int) -> bool:
            return fits(compile_train_step(dataclasses.replace(trial, batch_size=multiple * unit), mesh, costs=False), tpu, mesh)

        if most < 1 << 16 and fits_at(most):
            found[remat] = most * unit
            continue
        lo, hi = 0, 1
        while hi <= most and fits_at(hi):
            lo, hi = hi, 2 * hi
        hi = min(hi, most + 1)
        while hi - lo > 1:
            mid = (lo + hi) // 2
            lo, hi = (mid, hi) if fits_at(mid) else (lo, mid)
        found[remat] = lo * unit
    return found


def compile_sampler(run: RunSpec, mesh: jax.sharding.Mesh, batch: int, cache_len: int) -> dict:
    """The sampler's prefill (a prompt of cache_len // 2 tokens) and one decode step at `batch` rows with a
    KV cache of cache_len slots, params sharded as training shards them, the batch over the data axes."""
    mc = dataclasses.replace(run.model, L=max(run.model.L, cache_len))
    built = state_lib.setup(mc, run.opt, mesh, run.mesh.rules)
    params = sharding.abstract(built.abstract_params, built.param_sh)
    rows = NamedSharding(mesh, P(("data", "fsdp")))
    cache_sh = NamedSharding(mesh, P(None, ("data", "fsdp")))  # [N, B, S, G, K]: rows split like the batch
    dtype = jnp.dtype(mc.dtype)
    cache = KVCache(*(jax.ShapeDtypeStruct((mc.N, batch, cache_len, mc.G, mc.K), dtype, sharding=cache_sh) for _ in range(2)),
                    jax.ShapeDtypeStruct((), jnp.int32, sharding=sharding.replicated(mesh)),
                    jax.ShapeDtypeStruct((batch,), jnp.int32, sharding=rows))
    prompt = jax.ShapeDtypeStruct((batch, cache_len // 2), jnp.int32, sharding=rows)
    token = jax.ShapeDtypeStruct((batch, 1), jnp.int32, sharding=rows)
    step = jax.jit(lambda p, t, c: model.apply(mc, p, t, cache=c, last_only=True), donate_argnums=2)
    out = {}
    for name, tokens in (("prefill", prompt), ("decode", token)):
        start = time.perf_counter()
        compiled = step.lower(params, tokens, cache).compile()
        out[name] = {"hbm_per_chip_gib": {k: round(v, 4) for k, v in cost.hbm(compiled).items()},
                     "compile_s": time.perf_counter() - start}
    cache_bytes = 2 * mc.N * batch * cache_len * mc.G * mc.K * dtype.itemsize
    out["kv_cache_gib_per_chip"] = cache_bytes / cost.GIB / sharding.data_parallel_size(mesh)
    return out


def check_batch(run: RunSpec, mesh: jax.sharding.Mesh) -> None:
    dp = sharding.data_parallel_size(mesh)
    if run.batch_size % (dp * run.opt.grad_accum_steps):
        raise sharding.MeshError(f"batch_size={run.batch_size} is not a multiple of the {dp} data-parallel devices x "
                                 f"opt.grad_accum_steps={run.opt.grad_accum_steps}")


def seq_len_of(run: RunSpec, seq_len: int) -> RunSpec:
    """The run at another context length (--seq_len)."""
    if not seq_len:
        return run
    return dataclasses.replace(run, seq_len=seq_len, model=dataclasses.replace(run.model, L=seq_len))
