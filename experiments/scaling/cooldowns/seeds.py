"""Two seeds of the same sweep (run.py --seed=1 --sweep_only for the second): each run's seed-to-seed
difference, the spread per budget, each seed's exponents, and the fits of the two seeds' mean loss.

    python experiments/scaling/cooldowns/run.py --workdir=runs/isoflop_cooldowns_wide_seed1 --corpus=runs/corpus --seed=1 --sweep_only
    python experiments/scaling/cooldowns/seeds.py runs/isoflop_cooldowns_wide runs/isoflop_cooldowns_wide_seed1
"""

import argparse
import csv
import json
import os
import sys

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
sys.path.insert(0, ROOT)

from llm.scaling import fit, sweep  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
BOOTSTRAP = 100
NUM_STARTS = 40


def rows(workdir: str) -> dict[str, dict]:
    with open(os.path.join(workdir, "sweep", sweep.RESULTS), newline="") as f:
        return {r["name"]: r for r in csv.DictReader(f)}


def exponents(points: dict) -> dict:
    f = fit.fit_all(points, bootstrap=BOOTSTRAP, num_starts=NUM_STARTS)
    a2, a3 = f["approach2"], f["approach3"]
    return dict(approach2=dict(a=a2["a"], a_interval=a2.get("a_interval"), a_se=a2["a_se"],
                               n_opt=[b["n_opt"] for b in a2["budgets"]]),
                approach3=dict(a=a3["a"], a_interval=a3["a_interval"], alpha=a3["alpha"], beta=a3["beta"], E=a3["E"]))


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("workdirs", nargs="+")
    parser.add_argument("--out", default=os.path.join(HERE, "seeds.json"))
    args = parser.parse_args()
    seeds = [rows(w) for w in args.workdirs]
    names = [n for n in seeds[0] if all(n in s for s in seeds)]
    loss = np.array([[float(s[n]["eval_loss"]) for s in seeds] for n in names])  # points x seeds
    budget = np.array([float(seeds[0][n]["budget"]) for n in names])
    columns = {k: np.array([float(seeds[0][n][k]) for n in names]) for k in ("params", "tokens", "flops", "budget")}
    spread, shift = {}, {}
    for b in np.unique(budget):
        at = loss[budget == b]  # sizes x seeds
        # A seed that lowers every size of a budget alike (its data order, say) moves no vertex: the spread
        # that matters is about each seed's budget mean, corrected for the mean's one degree of freedom.
        centred = at - at.mean(axis=0)
        spread[f"{b:g}"] = float(np.sqrt(np.mean(np.var(centred, axis=1, ddof=1)) * len(at) / (len(at) - 1)))
        shift[f"{b:g}"] = (at.mean(axis=0) - at.mean()).tolist()
    result = dict(workdirs=args.workdirs, points=len(names),
                  per_point={n: loss[i].tolist() for i, n in enumerate(names)}, seed_sd_per_budget=spread,
                  seed_shift_per_budget=shift, mean_difference=float(np.mean(loss[:, -1] - loss[:, 0])),
                  per_seed=[exponents({**columns, "loss": loss[:, k]}) for k in range(loss.shape[1])],
                  mean=exponents({**columns, "loss": loss.mean(axis=1)}))
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2)
    print(json.dumps({k: v for k, v in result.items() if k != "per_point"}, indent=1))


if __name__ == "__main__":
    main()
