"""What a compiled program costs one chip: its HBM (read from XLA's memory analysis), its FLOPs and
bytes (XLA's cost analysis), its collectives (read from the optimized HLO), and a roofline step time.

The roofline, per chip: compute = FLOPs / peak bf16; memory = bytes accessed / HBM bandwidth;
communication = bytes on the wire / ICI bandwidth, where a collective over a group of n chips moves
(n - 1) / n of its buffer for an all-gather or a reduce-scatter, twice that for an all-reduce (a ring's
reduce-scatter then all-gather), and the whole buffer for an all-to-all or a permute. The step takes
max(compute, memory) + communication: matmuls are taken at peak (optimistic: real kernels reach 50-70%
of it), and no collective is overlapped with compute (pessimistic where XLA overlaps them).
"""

import dataclasses
import re

import numpy as np

from llm.compile.topology import Chip

GIB = float(1 << 30)
COLLECTIVES = ("all-gather", "reduce-scatter", "all-reduce", "all-to-all", "collective-permute")
_BYTES = {"pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "f16": 2, "bf16": 2, "s32": 4, "u32": 4, "f32": 4, "s64": 8,
          "u64": 8, "f64": 8, "c64": 8, "c128": 16, "f8e4m3fn": 1, "f8e5m2": 1}


def hbm(compiled) -> dict[str, float]:
    """GiB per chip: the arguments (state and batch), the outputs less what they alias (a donated state is
    written in place), the temporaries, and the program; `total` is their sum."""
    m = compiled.memory_analysis()
    parts = {
        "arguments": m.argument_size_in_bytes / GIB,
        "outputs": max(m.output_size_in_bytes - m.alias_size_in_bytes, 0) / GIB,
        "temporaries": m.temp_size_in_bytes / GIB,
        "program": m.generated_code_size_in_bytes / GIB,
    }
    return {**parts, "total": sum(parts.values())}


def shape_of(array_type: str) -> tuple[int, ...]:
    """'bf16[8,128]' -> (8, 128)."""
    dims = array_type[array_type.index("[") + 1 : -1]
    return tuple(int(d) for d in dims.split(",") if d)


def _shape_bytes(text: str) -> int:
    """Bytes of the arrays in an HLO type, e.g. 'bf16[8,128]{1,0}' or a tuple of them."""
    total = 0
    for dtype, dims in re.findall(r"\b([a-z]+\d*(?:e\dm\dfn)?)\[([\d,]*)\]", text):
        if dtype in _BYTES:
            total += _BYTES[dtype] * int(np.prod([int(d) for d in dims.split(",") if d] or [1]))
    return total


def _group_size(line: str, chips: int) -> int:
    mesh = re.search(r"replica_groups=mesh\[([^\]]*)\]\s*\{([^}]*)\}", line)  # mesh['axis_0'=1,'axis_1'=8] {'axis_1'}
    if mesh:
        sizes = dict(re.findall(r"'(\w+)'=(\d+)", mesh.group(1)))
        return int(np.prod([int(sizes[a]) for a in re.findall(r"'(\w+)'", mesh.group(2))] or [1]))
    iota = re.search(r"replica_groups=\[(\d+),(\d+)\]", line)
    if iota:
        return int(iota.group(2))
    listed = re.search(r"replica_groups=\{\{([\d,]+)\}", line)
    if listed:
        return len(listed.group(1).split(","))
    pairs = re.search(r"source_target_pairs=\{(.*?)\}\}?", line)
    return 2 if pairs else chips


def _computations(hlo: str) -> dict[str, list[str]]:
    bodies, current = {}, None
    for line in hlo.splitlines():
        header = re.match(r"^(?:ENTRY\s+)?%?([\w.\-]+)\s.*\{\s*$", line)
        if header and not line.startswith(" "):
            current = "ENTRY" if line.startswith("ENTRY") else header.group(1)
            bodies[current] = []
        elif current is not None:
            bodies[current].append(line)
    return bodies


def _trip_count(line: str, bodies: dict[str, list[str]]) -> int:
    """A while loop's trip count: XLA:CPU/GPU note it as known_trip_count; XLA:TPU leaves it in the loop's
    condition, `counter < constant` with the counter from 0 (both a scanned stack of layers and the windowed
    einsums that overlap FSDP's gathers with matmuls are written so). 1 where neither says."""
    known = re.search(r'"known_trip_count":\{"n":"(\d+)"', line)
    if known:
        return int(known.group(1))
    condition = re.search(r"condition=%?([\w.\-]+)", line)
    cond = bodies.get(condition.group(1), []) if condition else []
    constants = dict(re.findall(r"%([\w.\-]+) = [su]\d+\[\]\S* constant\((\d+)\)", "\n".join(cond)))
    for l in cond:
        root = re.search(r"ROOT .*compare\(%[\w.\-]+, %([\w.\-]+)\), direction=LT", l)
        if root and root.group(1) in constants:
            return int(constants[root.group(1)])
    return 1


def _multipliers(bodies: dict[str, list[str]]) -> dict[str, int]:
    """How often each computation runs per step, down the call graph from the entry: a while loop's body
    (a scanned stack of layers) runs its trip count times per run of its caller, anything else it calls
    (fusions, async collectives) once per run."""
    times = {"ENTRY": 1}
    todo = ["ENTRY"]
    while todo:
        name = todo.pop()
        for line in bodies.get(name, []):
            loop = re.search(r"\bwhile\(.*body=%?([\w.\-]+)", line)
            trips = _trip_count(line, bodies) if loop else 1
            for callee in re.findall(r"%([\w.\-]+)", line):
                if callee in bodies and callee != name and callee not in times:
                    times[callee] = times[name] * (trips if loop and callee == loop.group(1) else 1)
                    todo.append(callee)
    return times


def collectives(compiled, chips: int) -> dict[str, dict]:
    """Per collective kind: how many run per step, the bytes of their buffers (a reduce-scatter's:
    its result, one device's shard), the bytes each chip sends over ICI (see the module's docstring)
    and the shapes of their buffers, from the optimized HLO of the compiled program. XLA:TPU writes a
    reduce-scatter as an all-reduce and a slice fused into a computation named all-reduce-scatter; and
    where it overlaps an all-gather or a reduce-scatter with the matmul that uses it (a windowed einsum),
    as a loop of collective-permutes, each moving one shard: those count as the collective they make up,
    and `windowed` says how many of the count were such permutes."""
    bodies = _computations(compiled.as_text())
    times = _multipliers(bodies)
    out = {kind: {"count": 0, "windowed": 0, "buffer_bytes": 0.0, "wire_bytes": 0.0, "shapes": []} for kind in COLLECTIVES}
    for name, lines in bodies.items():
        for line in lines:
            op = re.search(r"=\s*(.*?)\s+(all-gather|reduce-scatter|all-reduce|all-to-all|collective-permute)(-start)?\(", line)
            if not op:
                continue
            result, kind = op.group(1), op.group(2)
            size = _shape_bytes(result)
            if op.group(3):  # an async start's result is (operands, outputs, ...): count the outputs once
                size //= 2
            n = _group_size(line, chips)
            if kind == "all-reduce" and name.startswith("all-reduce-scatter"):
                kind, size = "reduce-scatter", size // max(n, 1)
            share = (n - 1) / n if n > 1 else 0.0
            wire = {"all-gather": share, "reduce-scatter": share * n, "all-reduce": 2 * share}.get(kind, 1.0 if n > 1 else 0.0)
            k = times.get(name, 1)
            windowed = re.search(r"windowed_dot_general_body_(ag|rs)", name)
            if kind == "collective-permute" and windowed:
                kind = {"ag": "all-gather", "rs": "reduce-scatter"}[windowed.group(1)]
                out[kind]["windowed"] += k
            out[kind]["shapes"] += re.findall(r"\b[a-z]+\d*\[[\d,]*\]", result)
            out[kind]["count"] += k
            out[kind]["buffer_bytes"] += k * size
            out[kind]["wire_bytes"] += k * size * wire
    return out


@dataclasses.dataclass(frozen=True)
class Roofline:
    compute_ms: float
    memory_ms: float
    communication_ms: float

    @property
    def step_ms(self) -> float:
        return max(self.compute_ms, self.memory_ms) + self.communication_ms

    @property
    def bound(self) -> str:
        terms = {"compute": self.compute_ms, "memory": self.memory_ms, "communication": self.communication_ms}
        return max(terms, key=terms.get)


def roofline(chip: Chip, flops_per_chip: float, bytes_per_chip: float, wire_bytes_per_chip: float) -> Roofline:
    return Roofline(1e3 * flops_per_chip / (chip.bf16_tflops * 1e12), 1e3 * bytes_per_chip / (chip.hbm_gbps * 1e9),
                    1e3 * wire_bytes_per_chip / (chip.ici_gbps * 1e9))
