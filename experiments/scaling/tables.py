"""Markdown tables for README.md from a sweep's results.csv and the fitter's fit.json.

python experiments/scaling/tables.py experiments/scaling/results.csv experiments/scaling/fit.json
"""

import csv
import json
import sys


def points_table(rows: list[dict]) -> str:
    lines = ["| point | shape (d_model x layers) | params | non-emb | tokens | tokens/param | FLOPs (exact) | FLOPs (6ND) "
             "| train loss | eval loss | bits/byte | wall s |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(
            f"| {r['name']} | {r['d_model']} x {r['num_layers']} | {int(r['params']):,} | {int(r['non_embedding_params']):,} "
            f"| {int(r['tokens']):,} | {int(r['tokens']) / int(r['params']):.1f} | {float(r['flops']):.3g} "
            f"| {float(r['flops_6n']):.3g} | {float(r['train_loss']):.3f} | {float(r['eval_loss']):.3f} "
            f"| {float(r['bits_per_byte']):.3f} | {float(r['wall_seconds']):.0f} |")
    return "\n".join(lines)


def _pm(fit: dict, key: str) -> str:
    se = fit.get(f"{key}_se")
    return f"{fit[key]:.3g} ± {se:.2g}" if se is not None else f"{fit[key]:.3g}"


def fit_tables(result: dict) -> str:
    a3 = result["approach3"]
    lines = ["| approach 3: L = E + A/N^alpha + B/D^beta | E | A | B | alpha | beta | a = beta/(alpha+beta) | b |",
             "|---|---:|---:|---:|---:|---:|---:|---:|",
             "| fit ± bootstrap s.e. | " + " | ".join(_pm(a3, k) for k in ("E", "A", "B", "alpha", "beta", "a", "b")) + " |"]
    a2 = result["approach2"]
    if a2:
        lines += ["", "| approach 2: budget C | N* (parabola vertex) | D* = C/(6N*) | loss at N* | vertex inside the sizes tried |",
                  "|---:|---:|---:|---:|---|"]
        for b in a2["budgets"]:
            lines.append(f"| {b['flops']:.3g} | {b['n_opt']:,.0f} | {b['d_opt']:,.0f} | {b['loss_opt']:.3f} | {'yes' if b['interior'] else 'no'} |")
        lines += ["", f"approach 2: N* ~ C^a with a = {_pm(a2, 'a')}; D* ~ C^b with b = {_pm(a2, 'b')} "
                      f"(s.e. of the log-log slope over {len(a2['budgets'])} budgets)"]
    return "\n".join(lines)


if __name__ == "__main__":
    results_csv, fit_json = sys.argv[1:3]
    with open(results_csv, newline="") as f:
        print(points_table(list(csv.DictReader(f))))
    print()
    with open(fit_json) as f:
        print(fit_tables(json.load(f)))
