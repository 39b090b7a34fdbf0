"""Cooldown forks against independent runs: 2 sizes x 2 budgets, each trained (a) as cooldown forks of one
stable run per size and (b) as independent warmup-stable-decay runs from scratch (each with its own 5%
warmup, as a user would configure them), for 3 seeds (init and data order). A fork is validated when its
eval loss differs from the independent run's by less than the seed-to-seed spread.

    python experiments/scaling/cooldowns/validate_forks.py --workdir=runs/validate_forks   # trains, then reports
    python experiments/scaling/cooldowns/validate_forks.py --workdir=runs/validate_forks --report_only
    python experiments/scaling/cooldowns/validate_forks.py --workdir=runs/validate_forks_long --budgets=1e12,2e12 --targets=7.3e4
"""

import argparse
import csv
import json
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))))

from configs.sweeps import isoflop_cpu_cooldowns  # noqa: E402
from llm.scaling import sweep  # noqa: E402

SEEDS = (0, 1, 2)
MODES = ("forked", "independent")


def config(mode: str, seed: int, budgets: list[float], targets: list[float]):
    c = isoflop_cpu_cooldowns.get_config()
    c.name = f"validate_{mode}_s{seed}"
    c.budgets = budgets
    c.targets = targets
    c.cooldowns = mode == "forked"
    c.base.seed = seed
    return c


def rows(workdir: str, mode: str, seed: int) -> dict[str, dict]:
    with open(os.path.join(workdir, f"{mode}_s{seed}", sweep.RESULTS), newline="") as f:
        return {r["name"]: r for r in csv.DictReader(f)}


def report(workdir: str) -> str:
    data = {(m, s): rows(workdir, m, s) for m in MODES for s in SEEDS}
    names = sorted(data[MODES[0], SEEDS[0]], key=lambda n: (n.split("_")[1], float(n.split("_")[0][1:])))
    lines = ["| point | forked: eval loss (mean ± sd, 3 seeds) | independent WSD | forked - independent (paired mean ± se) "
             "| seed sd (independent) | within spread |", "|---|---:|---:|---:|---:|---|"]
    out = []
    for name in names:
        f_ = np.array([float(data["forked", s][name]["eval_loss"]) for s in SEEDS])
        i_ = np.array([float(data["independent", s][name]["eval_loss"]) for s in SEEDS])
        d = f_ - i_
        spread = i_.std(ddof=1)
        ok = abs(d.mean()) <= spread
        out.append(dict(name=name, forked=f_.tolist(), independent=i_.tolist(), diff_mean=d.mean(),
                        diff_se=d.std(ddof=1) / np.sqrt(len(d)), seed_sd=spread, within=bool(ok)))
        lines.append(f"| {name} | {f_.mean():.4f} ± {f_.std(ddof=1):.4f} | {i_.mean():.4f} ± {spread:.4f} | "
                     f"{d.mean():+.4f} ± {d.std(ddof=1) / np.sqrt(len(d)):.4f} | {spread:.4f} | {'yes' if ok else 'no'} |")
    with open(os.path.join(workdir, "validation.json"), "w") as f:
        json.dump(out, f, indent=2)
    saved = json.load(open(os.path.join(workdir, f"forked_s{SEEDS[0]}", "cooldowns.json")))
    lines.append(f"\nForks trained {saved['forked_flops']:.3g} FLOPs per seed against {saved['from_scratch_flops']:.3g} "
                 f"independently ({100 * saved['saved_fraction']:.0f}% saved).")
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--workdir", required=True)
    parser.add_argument("--report_only", action="store_true")
    parser.add_argument("--budgets", default="3e11,6e11", help="FLOPs, comma-separated")
    parser.add_argument("--targets", default="7.3e4,2e5", help="non-embedding params, comma-separated")
    args = parser.parse_args()
    if not args.report_only:
        for seed in SEEDS:
            for mode in MODES:
                t0, c0 = time.time(), time.process_time()
                c = config(mode, seed, [float(b) for b in args.budgets.split(",")], [float(t) for t in args.targets.split(",")])
                sweep.run(c, os.path.join(args.workdir, f"{mode}_s{seed}"))
                print(f"{mode} seed {seed}: {time.time() - t0:.0f} s wall, {time.process_time() - c0:.0f} s CPU", flush=True)
    print(report(args.workdir))


if __name__ == "__main__":
    main()
