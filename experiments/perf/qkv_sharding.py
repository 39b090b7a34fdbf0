"""Does the fused q/k/v matmul reshard its weights under tensor parallelism? Counts the collectives in
the compiled train step on a (1, 1, 8) CPU mesh, fused vs one matmul per weight.

    XLA_FLAGS=--xla_force_host_platform_device_count=8 python experiments/perf/qkv_sharding.py
"""

import collections
import dataclasses
import json
import re
import sys

sys.path.insert(0, ".")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from configs import default  # noqa: E402
from llm import spec as config_lib  # noqa: E402
from llm.training import (
    sharding,  # noqa: E402
    state as state_lib,
)

COLLECTIVES = ("all-gather", "all-reduce", "reduce-scatter", "collective-permute", "all-to-all")


def collectives(hlo: str) -> dict:
    """Each collective in the compiled module: how many, and how many bytes their results hold."""
    sizes = {"f32": 4, "bf16": 2, "s32": 4, "u32": 4, "pred": 1}
    found = collections.defaultdict(lambda: [0, 0])
    for line in hlo.splitlines():
        m = re.search(r"= ((?:\w+\[[\d,]*\][^ ]*|\([^)]*\))) (" + "|".join(COLLECTIVES) + r")(-start)?\(", line)
        if not m:
            continue
        shapes = re.findall(r"(\w+)\[([\d,]*)\]", m.group(1))
        nbytes = sum(sizes.get(t, 4) * int(np.prod([int(d) for d in dims.split(",") if d] or [1])) for t, dims in shapes)
        found[m.group(2)][0] += 1
        found[m.group(2)][1] += nbytes
    return {k: {"count": c, "bytes": b} for k, (c, b) in sorted(found.items())}


def main() -> None:
    cfg = default.get_config()
    cfg.model.d_model, cfg.model.num_heads, cfg.model.num_kv_heads, cfg.model.d_ff = 256, 8, 8, 1024
    cfg.mesh.data, cfg.mesh.tensor = 1, 8
    mesh = sharding.make_mesh(1, 1, 8)
    run = config_lib.resolve(config_lib.from_config(cfg), 128)
    rules, mc, oc = run.mesh.rules, run.model, run.opt
    results = {}
    for fused in (True, False):
        built = state_lib.setup(dataclasses.replace(mc, fused_qkv=fused), oc, mesh, rules)
        state = jax.eval_shape(built.init_state, jax.random.key(0))
        batch = {k: jax.ShapeDtypeStruct((cfg.batch_size, cfg.seq_len), jnp.int32, sharding=built.batch_sh) for k in ("inputs", "targets")}
        batch["weights"] = jax.ShapeDtypeStruct((cfg.batch_size, cfg.seq_len), jnp.float32, sharding=built.batch_sh)
        hlo = built.train_step.lower(state, batch).compile().as_text()
        results["fused q/k/v (one matmul)" if fused else "one matmul per weight"] = collectives(hlo)
    print(json.dumps({"mesh": "(data 1, fsdp 1, tensor 8)", "model": "d_model 256, 8 heads, d_ff 1024, 4 layers", **results}, indent=2))


if __name__ == "__main__":
    main()
