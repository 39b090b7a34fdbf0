"""The compile table of docs/compile.md: gpt2_small and the Llama ladder (configs/llama_*.py) compiled for
v5e-8, v5p-8 and v4-8, as `./run.sh compile` does, one JSON per (config, slice) in this folder.

For each: the config as it is (its batch, seq_len and mesh: FSDP over the slice for the ladder), then the
largest global batch at seq_len 2048 with model.remat=block (what `--find_batch --seq_len=2048` reports
under "block"; the other two policies are left out here to keep the table to one search per row); and
for each config the smallest v5e and v5p slice it fits on as it is (<config>_fits_on.json), which its
"Fits on" comment names.

    .venv/bin/python experiments/compile/ladder.py [--configs=gpt2_small,llama_150m] [--slices=v5e-8]
    .venv/bin/python experiments/compile/ladder.py --table     # the markdown table from the stored JSONs
"""

import argparse
import json
import os
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))
CONFIGS = ("gpt2_small", "llama_150m", "llama_400m", "llama_1b", "llama_3b", "llama_7b")
SLICES = ("v5e-8", "v5p-8", "v4-8")
SEARCHED_UP_TO = 32  # data-parallel multiples: the batch search stops there
GROWING = {"v5e": (8, 16, 32, 64, 128, 256), "v5p": (8, 16, 32, 64, 128, 256, 512)}  # Cloud names: v5p counts TensorCores


def one(config: str, slice_name: str, part: str) -> dict:
    """In this process: the report of the config as it is ('configured'), or the largest batch at 2048
    with block remat ('batch')."""
    sys.path.insert(0, REPO)
    from llm.training import sharding

    sharding.leave_out_absent_tpu(host_only=True)
    import importlib

    from llm import spec
    from llm.compile import plan, topology

    cfg = importlib.import_module(f"configs.{config}").get_config()
    tpu = topology.parse(slice_name)
    run = plan.resolve(spec.from_config(cfg), tpu)
    mesh = plan.mesh_of(run, topology.devices(tpu))
    command = f"./run.sh compile --config=configs/{config}.py --topology={slice_name}"
    if part == "configured":
        out = {"command": command, **plan.report(run, tpu, mesh, plan.compile_train_step(run, mesh))}
        out.pop("collective_shapes", None)
        return out
    start = time.perf_counter()
    found = plan.find_batch(run, mesh, tpu, seq_len=2048, remats=("block",), most=SEARCHED_UP_TO)
    return {"largest_batch_2048_block": found["block"], "find_batch_s": time.perf_counter() - start,
            "find_batch_command": command + " --find_batch --seq_len=2048"}


def table() -> str:
    rows = ["| config | slice | fits (its batch x seq) | HBM per chip, GiB | largest batch at seq 2048 (remat=block) | projected MFU "
            "| bound | compile s |", "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for config in CONFIGS:
        for slice_name in SLICES:
            path = os.path.join(HERE, f"{config}_{slice_name}.json")
            if not os.path.exists(path):
                continue
            r = json.load(open(path))
            batch = r.get("largest_batch_2048_block", r.get("batch_error", "not run"))
            if "mesh" in r and batch == SEARCHED_UP_TO * r["mesh"]["data"] * r["mesh"]["fsdp"]:
                batch = f">= {batch} (the search's limit)"
            if "error" in r:
                rows.append(f"| {config} | {slice_name} | {r['error']} | | {batch} | | | |")
                continue
            fits = f"{'yes' if r['fits'] else 'no'} ({r['batch_size']} x {r['seq_len']})"
            mfu = f"{r['projected_mfu']:.0%}" if r.get("projected_mfu") else ("none (looped costs)" if r.get("costs_from", "").startswith("the compiled step, each") else "-")
            rows.append(f"| {config} | {slice_name} | {fits} | {r['hbm_per_chip_gib']['total']:.1f} | {batch} | "
                        f"{mfu} | {r.get('bound') or '-'} | {r['compile_s']:.0f} |")
    return "\n".join(rows)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--configs", default=",".join(CONFIGS))
    ap.add_argument("--slices", default=",".join(SLICES))
    ap.add_argument("--parts", default="configured,batch,smallest",
                    help="configured: the config as it is; batch: the largest batch at 2048; smallest: the smallest v5e and v5p slice it fits on")
    ap.add_argument("--table", action="store_true")
    ap.add_argument("--one", nargs=3, metavar=("CONFIG", "SLICE", "PART"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.table:
        print(table())
        return
    if args.one:
        print(json.dumps(one(*args.one)))
        return
    parts = args.parts.split(",")
    for slice_name in args.slices.split(","):
        for config in args.configs.split(","):
            path = os.path.join(HERE, f"{config}_{slice_name}.json")
            result = json.load(open(path)) if os.path.exists(path) else {}
            for part, done_keys, failed in (("configured", ("fits", "error"), "error"),
                                            ("batch", ("largest_batch_2048_block", "batch_error"), "batch_error")):
                if part in parts and not any(k in result for k in done_keys):
                    result.update(_in_a_fresh_process(config, slice_name, part, failed))
                    with open(path, "w") as f:
                        json.dump(result, f, indent=2)
            print(config, slice_name, json.dumps({k: result.get(k) for k in ("fits", "error", "largest_batch_2048_block", "batch_error")}),
                  flush=True)
    if "smallest" in parts:
        for config in args.configs.split(","):
            print(config, json.dumps(smallest_slices(config)), flush=True)


def _in_a_fresh_process(config: str, slice_name: str, part: str, failed: str) -> dict:
    """A fresh process per part: each compile's memory goes with it, and a compiler crash is a result."""
    done = subprocess.run([sys.executable, __file__, "--one", config, slice_name, part], cwd=REPO, capture_output=True, text=True)
    if done.returncode:
        crash = "libtpu's compiler crashed (SIGSEGV)" if done.returncode in (-11, 139) else done.stderr.strip().splitlines()[-1][:120]
        return {failed: crash}
    return json.loads(done.stdout.strip().splitlines()[-1])


def smallest_slices(config: str) -> dict:
    """The smallest v5e and v5p slice on which the config fits as it is (its batch, FSDP over the slice),
    stored in <config>_fits_on.json: what its 'Fits on' comment names."""
    path = os.path.join(HERE, f"{config}_fits_on.json")
    found = json.load(open(path)) if os.path.exists(path) else {}
    for generation, sizes in GROWING.items():
        if generation in found:
            continue
        found[generation] = None
        for n in sizes:
            name = f"{generation}-{n}"
            stored = os.path.join(HERE, f"{config}_{name}.json")
            r = json.load(open(stored)) if os.path.exists(stored) else _in_a_fresh_process(config, name, "configured", "error")
            if r.get("fits"):
                found[generation] = {"slice": name, "hbm_per_chip_gib": r["hbm_per_chip_gib"]["total"],
                                     "projected_mfu": r.get("projected_mfu"), "command": r["command"]}
                break
        with open(path, "w") as f:
            json.dump(found, f, indent=2)
    return found

if __name__ == "__main__":
    main()
