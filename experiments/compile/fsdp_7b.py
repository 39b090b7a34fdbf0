"""The 7B config's train step compiled for v5p-64 with FSDP over its 32 chips: what its collectives are
(docs/compile.md, "Sharding: what FSDP moves"). Writes fsdp_7b.json beside this file.

    .venv/bin/python experiments/compile/fsdp_7b.py
"""

import collections
import json
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(os.path.dirname(HERE)))

from llm.training import sharding  # noqa: E402

sharding.leave_out_absent_tpu(host_only=True)

from configs import llama_7b  # noqa: E402
from llm import spec  # noqa: E402
from llm.compile import cost, plan, topology  # noqa: E402


def main() -> None:
    cfg = llama_7b.get_config()
    cfg.batch_size, cfg.seq_len = 64, 2048  # 2 rows per chip; 2048, a length no weight of this model has
    tpu = topology.parse("v5p-64")
    run = plan.resolve(spec.from_config(cfg), tpu)
    mesh = plan.mesh_of(run, topology.devices(tpu))
    compiled = plan.compile_train_step(run, mesh)
    out = plan.report(run, tpu, mesh, compiled)
    out["collective_shapes"] = {kind: collections.Counter(v["shapes"]).most_common() for kind, v in compiled.collectives.items()
                                if v["count"]}
    # An activation has the context (2048) among its dimensions; no weight of this model does.
    out["activation_collectives"] = {kind: [s for s in v["shapes"] if 2048 in cost.shape_of(s) and s.startswith(("bf16", "f32"))]
                                     for kind, v in compiled.collectives.items()}
    with open(os.path.join(HERE, "fsdp_7b.json"), "w") as f:
        json.dump(out, f, indent=2)
    print(json.dumps({k: out[k] for k in ("fits", "hbm_per_chip_gib", "collectives", "activation_collectives", "compile_s")}))


if __name__ == "__main__":
    main()
