"""The learning-rate scan behind isoflop_cpu_cooldowns_wide.py's one mup rate: a narrow and a wide model of
the sweep's family, each at a budget near its optimum, trained from scratch at 4 rates a factor 2 apart; the
vertex of a parabola in log2(rate) through each width's best three. Under mup the two vertices should agree.

    python experiments/scaling/cooldowns/lr_scan.py --workdir=runs/lr_scan --corpus=runs/corpus
"""

import argparse
import json
import os
import sys

import ml_collections
import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
sys.path.insert(0, ROOT)

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import run as experiment  # noqa: E402  (this directory's run.py: the sweep's config on the corpus)
from llm.scaling import points as points_lib, sweep  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
RATES = (1.5e-3, 3e-3, 6e-3, 1.2e-2)
POINTS = (("d24l2", 1.26e12), ("d80l2", 5e12))


def vertex(rates: list[float], losses: list[float]) -> float:
    """The rate at the minimum of a parabola in log2(rate) through the best rate and its two neighbours."""
    i = int(np.clip(np.argmin(losses), 1, len(losses) - 2))
    x = np.log2(rates[i - 1:i + 2])
    a, b, _ = np.polyfit(x, losses[i - 1:i + 2], 2)
    return float(2 ** (-b / (2 * a)))


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--workdir", required=True)
    parser.add_argument("--corpus", required=True)
    args = parser.parse_args()
    c = experiment.sweep_config(args.corpus, "isoflop_cpu_cooldowns_wide", experiment.MIXTURE)
    c.cooldowns = False
    result = {}
    for size, budget in POINTS:
        point = next(p for p in points_lib.expand(c) if p.name == f"C{points_lib._short(budget)}_{size}")
        losses = []
        for rate in RATES:
            s = ml_collections.ConfigDict(c.to_dict())
            s.name, s.budgets, s.targets = f"lr{rate:g}", [budget], [point.non_embedding_params]
            s.base.opt.learning_rate = rate
            workdir = os.path.join(args.workdir, f"{size}_lr{rate:g}")
            rows = sweep.run(s, workdir)
            row = rows[0] if rows else sweep.finished_row(points_lib.expand(s)[0], workdir)
            losses.append(float(row["eval_loss"]))
        result[point.name] = dict(params=point.params, steps=point.config.num_train_steps, rates=list(RATES),
                                  eval_loss=losses, best_rate=vertex(list(RATES), losses))
        print(point.name, json.dumps(result[point.name]), flush=True)
    with open(os.path.join(HERE, "lr_scan.json"), "w") as f:
        json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
