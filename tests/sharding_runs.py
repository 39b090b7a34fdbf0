"""Runs for tests/test_sharding.py, in a fresh process so that XLA_FLAGS decides the device count.

usage: python tests/sharding_runs.py eight|one CORPUS WORKDIR  -> prints one JSON object
"""

import json
import sys

sys.path[:0] = [".", "tests"]

import jax  # noqa: E402
from conftest import streamed, tiny_config, train_run  # noqa: E402

from llm.training import sharding  # noqa: E402

STEPS = 10
MULTI_STEPS = 40  # long enough that a preemption notice lands before the end
SHARDS = "jsonl:{root}/shards/*.jsonl"
# A constant schedule makes a 10-step run the exact prefix of the 20-step one.
MODEL = dict(model__d_model=64, model__num_heads=8, model__num_kv_heads=8, model__d_ff=128, model__vocab_multiple=8,
             opt__schedule="constant")


def losses(workdir: str) -> list[float]:
    return [r["loss"] for r in map(json.loads, open(f"{workdir}/metrics.jsonl")) if "loss" in r]


def run(corpus, workdir, mesh=(-1, 1, 1), steps=STEPS, **data) -> list[float]:
    cfg = tiny_config(corpus, num_train_steps=steps, log_every_steps=1, checkpoint_every_steps=STEPS // 2, **MODEL,
                      mesh__data=mesh[0], mesh__fsdp=mesh[1], mesh__tensor=mesh[2], **data)
    train_run(cfg, workdir, quiet=True)
    return losses(workdir)


def main(kind: str, corpus: str, root: str) -> None:
    out = {"devices": jax.device_count()}
    if kind == "eight":
        for mesh in [(8, 1, 1), (1, 8, 1), (2, 2, 2), (1, 1, 8)]:
            out[str(mesh)] = run(corpus, f"{root}/mesh_{'_'.join(map(str, mesh))}", mesh)
        # The reference of the two-process runs, which stream the shards that tests/test_sharding.py wrote.
        out["streamed (8, 1, 1)"] = run(corpus, f"{root}/streamed", (8, 1, 1), steps=STEPS, **streamed(SHARDS.format(root=root)))
        # Save on (8,1,1) halfway, resume on (2,2,2) to the end.
        run(corpus, f"{root}/cross", (8, 1, 1), steps=STEPS // 2)
        out["cross_mesh"] = run(corpus, f"{root}/cross", (2, 2, 2))
        run(corpus, f"{root}/to_one_device", (8, 1, 1), steps=STEPS // 2)  # resumed by the one-device process
        try:
            cfg = tiny_config(corpus, model__num_heads=4, model__num_kv_heads=4, mesh__data=1, mesh__tensor=8)
            train_run(cfg, f"{root}/bad", quiet=True)
        except sharding.MeshError as e:
            out["bad_heads_error"] = str(e)
    else:
        out["(1,1,1)"] = run(corpus, f"{root}/single")
        out["eight_to_one"] = run(corpus, f"{root}/to_one_device")
    print(json.dumps(out))


if __name__ == "__main__":
    main(*sys.argv[1:])
