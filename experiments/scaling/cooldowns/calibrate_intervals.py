"""Do approach 2's 95% intervals on a hold 95% of the time? Synthetic sweeps with the real sweep's design
(its sizes, budgets and tokens, results.csv), a known law (the sweep's own approach-3 fit) and noise, each fitted
as the real one is; the share of intervals that contain the true exponent, for three intervals:

  pooled   the residual bootstrap that pools every budget's parabola residuals (fit.approach2_samples)
  wild     each point's own residual with a random sign (approach2_samples(wild=True))
  t        the least-squares line's standard error times Student's t with (budgets - 2) degrees of freedom
  between two seeds  two independent sweeps' estimates: their mean +- t(1 dof) x their standard error

under noise models: every run with the same spread, each budget with its own (the real parabolas' residual
rms per budget, which differ tenfold), and with --seeds (seeds.py's seeds.json) each budget's measured
seed-to-seed spread, first independent per run, then with the share of it that a size's budgets have in
common (their stable run) as measured, divided by sqrt(k) for the mean of k seeds: what more seeds buy. The
true exponent is the slope of the law's exact optima, so the parabolas' misfit to the law's profiles counts
as error too.

    python experiments/scaling/cooldowns/calibrate_intervals.py --seeds=experiments/scaling/cooldowns/seeds.json
"""

import argparse
import csv
import json
import os
import sys

import numpy as np
from scipy import stats

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
sys.path.insert(0, ROOT)

from llm.scaling import fit  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))


def true_exponent(points: dict, law: dict, flops_per_token) -> float:
    """The slope of log N* on log C, N* the law's optimum at each budget under the exact FLOP count."""
    n_grid = np.geomspace(points["params"].min() / 4, points["params"].max() * 4, 4000)
    budgets = np.unique(points["budget"])
    n_star = [n_grid[np.argmin(fit.predict_loss(n_grid, c / flops_per_token(n_grid), law))] for c in budgets]
    return float(np.polyfit(np.log(budgets), np.log(n_star), 1)[0])


def residual_rms(points: dict) -> dict[float, float]:
    """Each budget's parabola residual rms, scaled by sqrt(n / (n - 3)) for the parabola's parameters."""
    out = {}
    for idx in fit.budget_groups(points):
        log_n, loss = np.log(points["params"][idx]), points["loss"][idx]
        r = loss - np.polyval(np.polyfit(log_n, loss, 2), log_n)
        out[float(points["budget"][idx][0])] = float(np.sqrt(np.mean(r**2) * len(idx) / (len(idx) - 3)))
    return out


def shared_fraction(per_point: dict[str, list[float]]) -> float:
    """The share of a run's seed variance that its size's other budgets share (their common stable run):
    from two seeds' differences, each less its budget's mean difference (a shift of a whole budget moves no
    vertex), 1 - (their variance within a size) / (their total variance)."""
    by_budget: dict[str, dict[str, float]] = {}
    for name, (first, second) in per_point.items():
        budget, size = name.split("_", 1)
        by_budget.setdefault(budget, {})[size] = second - first
    diffs: dict[str, list[float]] = {}
    for at in by_budget.values():
        for size, d in at.items():
            diffs.setdefault(size, []).append(d - np.mean(list(at.values())))
    total = np.mean([d**2 for group in diffs.values() for d in group])
    within = np.mean([np.var(g, ddof=1) for g in diffs.values() if len(g) > 1])
    return float(np.clip(1 - within / total, 0.0, 1.0))


def coverage(points: dict, law: dict, a_true: float, sd: np.ndarray, sweeps: int, bootstrap: int, seed: int,
             sizes: np.ndarray, shared: float = 0.0) -> dict:
    """`shared`: the share of each run's noise variance common to its size (one draw per size per sweep)."""
    rng = np.random.default_rng(seed)
    clean = fit.predict_loss(points["params"], points["tokens"], law)
    hits = {"pooled": [], "wild": [], "t": []}
    widths = {k: [] for k in hits}
    estimates = []
    size_ids = np.unique(sizes, return_inverse=True)[1]
    for i in range(sweeps):
        z = np.sqrt(shared) * rng.standard_normal(size_ids.max() + 1)[size_ids]
        z += np.sqrt(1 - shared) * rng.standard_normal(len(clean))
        noisy = {**points, "loss": clean + sd * z}
        a2 = fit.approach2(noisy)
        if a2 is None:
            continue
        estimates.append(a2["a"])
        dof = len(a2["budgets"]) - 2
        half = stats.t.ppf(0.975, dof) * a2["a_se"]
        intervals = {"t": (a2["a"] - half, a2["a"] + half)}
        for kind in ("pooled", "wild"):
            samples = fit.approach2_samples(noisy, bootstrap, seed=i, wild=kind == "wild")
            intervals[kind] = tuple(fit.interval([s["a"] for s in samples]))
        for kind, (lo, hi) in intervals.items():
            hits[kind].append(lo <= a_true <= hi)
            widths[kind].append((hi - lo) / 2)
    # Two whole sweeps (seeds) per draw: Student's t with 1 degree of freedom on their two estimates.
    pairs = np.array(estimates[:len(estimates) // 2 * 2]).reshape(-1, 2)
    centre, half = pairs.mean(axis=1), stats.t.ppf(0.975, 1) * np.abs(pairs[:, 0] - pairs[:, 1]) / 2
    hits["between two seeds"] = list(np.abs(centre - a_true) <= half)
    widths["between two seeds"] = list(half)
    lo, hi = np.percentile(estimates, [2.5, 97.5])
    # Medians: a sweep whose noisiest budget gives a nearly flat parabola puts a anywhere, and a mean would be its.
    return dict(sweeps=len(estimates), a_median=float(np.median(estimates)), a_central_95_half_width=float((hi - lo) / 2),
                **{kind: dict(coverage=float(np.mean(hits[kind])), median_half_width=float(np.median(widths[kind])))
                   for kind in hits})


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--results", default=os.path.join(HERE, "results.csv"))
    parser.add_argument("--fits", default=os.path.join(HERE, "fits.json"))
    parser.add_argument("--seeds", default="", help="seeds.py's output: adds the measured seed spread")
    parser.add_argument("--sweeps", type=int, default=300)
    parser.add_argument("--bootstrap", type=int, default=100)
    parser.add_argument("--out", default=os.path.join(HERE, "calibration.json"))
    args = parser.parse_args()
    points = fit.load_points(args.results)
    with open(args.results, newline="") as f:
        sizes = np.array([r["name"].split("_", 1)[1] for r in csv.DictReader(f)])
    a3 = json.load(open(args.fits))["all"]["approach3"]
    law = fit.law(a3["E"], a3["A"], a3["B"], a3["alpha"], a3["beta"])
    # FLOPs per token relative to params falls with size (the byte embedding's share): interpolated in log N.
    order = np.argsort(points["params"])
    log_n, log_ratio = np.log(points["params"][order]), np.log(points["flops"][order] / points["tokens"][order] / points["params"][order])
    flops_per_token = lambda n: n * np.exp(np.polyval(np.polyfit(log_n, log_ratio, 2), np.log(n)))
    a_true = true_exponent(points, law, flops_per_token)
    rms = residual_rms(points)
    per_budget = np.array([rms[float(b)] for b in points["budget"]])
    pooled_sd = float(np.sqrt(np.mean(per_budget**2)))
    result = dict(law=law, a_true=a_true, residual_rms_per_budget=rms, noise={})
    models = [("same spread for every run (residual rms)", np.full(len(per_budget), pooled_sd), 0.0),
              ("each budget its own spread (residual rms)", per_budget, 0.0)]
    if args.seeds:
        seeds = json.load(open(args.seeds))
        measured = np.array([seeds["seed_sd_per_budget"][f"{b:g}"] for b in points["budget"]])
        result["shared_fraction"] = shared = shared_fraction(seeds["per_point"])
        models += [("measured seed spread, independent runs", measured, 0.0)]
        models += [(f"measured seed spread / sqrt({k}), shared within a size", measured / np.sqrt(k), shared)
                   for k in (1, 2, 4, 8, 16)]
    for name, sd, shared in models:
        result["noise"][name] = coverage(points, law, a_true, sd, args.sweeps, args.bootstrap, seed=0, sizes=sizes,
                                         shared=shared)
        print(name, json.dumps(result["noise"][name]), flush=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
