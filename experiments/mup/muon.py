"""Muon against AdamW on configs/shakespeare_char.py (nanoGPT's character-level CPU run): the steps and
the training wall time each takes to reach the AdamW run's final validation loss. Results:
experiments/mup/README.md.

    .venv/bin/python experiments/mup/muon.py run [--seeds=0,1] [--muon_lrs=0.01,0.02,0.04]
    .venv/bin/python experiments/mup/muon.py analyze

Needs ../shared/data/tiny_shakespeare/input.txt, as the config does. Every run evaluates the whole
validation split every 100 steps; training time is summed from the logged throughput of each window,
so evaluations are not counted.
"""

import argparse
import json
import os
import shutil
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(os.path.dirname(HERE)))
RUNS = os.path.join(HERE, "runs_muon")  # run directories (checkpoints: not committed)
CURVES = os.path.join(HERE, "results", "muon")  # each run's metrics.jsonl, committed
EVERY = 100


def config(optimizer: str, seed: int, muon_lr: float):
    from configs import shakespeare_char

    c = shakespeare_char.get_config()
    c.seed = seed
    c.eval_every_steps = c.log_every_steps = EVERY
    c.checkpoint_every_steps = c.num_train_steps
    c.sample_tokens = 0
    c.mesh.cpu_devices = 0  # one device per run: two runs share the machine's two cores
    c.opt.optimizer = optimizer
    c.opt.muon_learning_rate = muon_lr
    return c


def name(optimizer: str, seed: int, muon_lr: float) -> str:
    return f"{optimizer}-s{seed}" + (f"-lr{muon_lr:g}" if optimizer == "muon" else "")


def run(seeds: list[int], muon_lrs: list[float], shard: str) -> None:
    from llm import spec
    from llm.training import loop, sharding

    sharding.leave_out_absent_tpu()
    todo = [("adamw", s, 0.02) for s in seeds] + [("muon", s, lr) for lr in muon_lrs for s in seeds]
    i, n = (int(x) for x in shard.split("/"))
    for point in todo[i::n]:
        workdir = os.path.join(RUNS, name(*point))
        if os.path.exists(os.path.join(workdir, "done")):
            continue
        loop.train(spec.from_config(config(*point)), workdir, quiet=True)
        open(os.path.join(workdir, "done"), "w").close()
        os.makedirs(CURVES, exist_ok=True)
        shutil.copy(os.path.join(workdir, "metrics.jsonl"), os.path.join(CURVES, name(*point) + ".jsonl"))
        print(name(*point), flush=True)


def curve(metrics: str) -> list[tuple[int, float, float]]:
    """(step, training seconds so far, eval loss) at every eval of a run's metrics.jsonl."""
    rows = [json.loads(line) for line in open(metrics)]
    seconds, last_step, out = 0.0, 0, []
    batch_tokens = 12 * 64
    for r in rows:
        if "tokens_per_s" in r:
            seconds += (r["step"] - last_step) * batch_tokens / r["tokens_per_s"]
            last_step = r["step"]
        if "eval_loss" in r:
            out.append((r["step"], seconds, r["eval_loss"]))
    return out


def analyze() -> None:
    import numpy as np

    runs = {f[: -len(".jsonl")]: curve(os.path.join(CURVES, f)) for f in sorted(os.listdir(CURVES))}
    adamw = {d: c for d, c in runs.items() if d.startswith("adamw")}
    target = float(np.mean([c[-1][2] for c in adamw.values()]))
    print(f"AdamW's final validation loss, mean of {len(adamw)} seeds: {target:.4f} "
          f"(seeds: {', '.join(f'{c[-1][2]:.4f}' for c in adamw.values())})")
    print("| run | final val loss | first eval at or below AdamW's final | training seconds to it | total training seconds |")
    print("| --- | --- | --- | --- | --- |")
    for d, c in runs.items():
        hit = next(((s, t) for s, t, loss in c if loss <= target), None)
        reached = f"step {hit[0]}" if hit else "not reached"
        print(f"| {d} | {c[-1][2]:.4f} | {reached} | {hit[1]:.0f} |" if hit else f"| {d} | {c[-1][2]:.4f} | {reached} | - |", end="")
        print(f" {c[-1][1]:.0f} |")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("what", choices=["run", "analyze"])
    ap.add_argument("--seeds", default="0,1")
    ap.add_argument("--muon_lrs", default="0.02")
    ap.add_argument("--shard", default="0/1")
    args = ap.parse_args()
    if args.what == "run":
        run([int(s) for s in args.seeds.split(",")], [float(x) for x in args.muon_lrs.split(",")], args.shard)
    else:
        analyze()


if __name__ == "__main__":
    main()
