"""The cooldown-fork IsoFLOP experiment, end to end and resumable (rerun the same command after a stop):

  1. sweep    --sweep (configs/sweeps/isoflop_cpu_cooldowns_wide.py) on the unrepeated corpus
              (experiments/scaling/build_corpus.py) as a 3-domain mixture, into WORKDIR/sweep; its wall and CPU
              time into WORKDIR/timing.json
  2. predict  approaches 2 and 3 with bootstrap intervals on eval_loss (WORKDIR/fits.json); then, before the
              held-out run is trained, its size (approach 3's compute-optimal params at VERIFY_FACTOR x the
              largest budget, as the sweep's shape rule builds it) and its final loss with an interval, into
              WORKDIR/prediction.json (never rewritten once it exists)
  3. verify   trains that run (the sweep's schedule, from scratch) into WORKDIR/verify and compares
  4. domains  the same fits of each domain's eval_loss_<domain>
  5. report   the tables of experiments/scaling/cooldowns/README.md into WORKDIR/report.md, and the
              results, fits and prediction copied into --out (experiments/scaling/cooldowns/)

    python experiments/scaling/build_corpus.py --out=runs/corpus
    nohup nice -n 10 python experiments/scaling/cooldowns/run.py --workdir=runs/isoflop_cooldowns_wide --corpus=runs/corpus &
    python experiments/scaling/cooldowns/run.py --workdir=runs/isoflop_cooldowns_wide --corpus=runs/corpus --report_only

The first design (0.8 decades of budgets, one list of mixed-depth sizes):
    python experiments/scaling/cooldowns/run.py --workdir=runs/isoflop_cooldowns_first --corpus=runs/corpus \
        --sweep=isoflop_cpu_cooldowns --mixture=shakespeare=0.2,code=0.3,docs=0.5 --out=experiments/scaling/cooldowns/first_design
"""

import argparse
import csv
import datetime
import importlib
import json
import math
import os
import shutil
import sys
import time

import ml_collections
import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
sys.path.insert(0, ROOT)

from llm.scaling import cooldowns, fit, points as points_lib, sweep  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
# The domains in proportion to their sizes (5.1M, 31.0M, 29.6M byte tokens): each lasts about 63M tokens.
MIXTURE = "shakespeare=0.08,code=0.47,docs=0.45"
DOMAINS = ("shakespeare", "code", "docs")
VERIFY_FACTOR = 3.5
BOOTSTRAP = 100
DOMAIN_BOOTSTRAP = 50
NUM_STARTS = 40  # approach 3's L-BFGS starts (of Hoffmann et al.'s 4500-point grid, the best by objective)


def sweep_config(corpus: str, name: str, mixture: str) -> ml_collections.ConfigDict:
    c = importlib.import_module(f"configs.sweeps.{name}").get_config()
    d = c.base.data
    d.dataset = f"jsonl:{os.path.abspath(corpus)}/*.jsonl"
    d.mixture = mixture
    d.tokenizer = "byte"
    d.data_dir = os.path.join(os.path.abspath(corpus), "cache")  # its index, beside the corpus
    c.base.eval_max_batches = 16  # per domain: 16 x 64 rows of 128 tokens, the same for every point
    return c


def timed(what: str, workdir: str, fn):
    """Runs fn, adding its wall and CPU seconds (this process, all threads) to WORKDIR/timing.json."""
    path = os.path.join(workdir, "timing.json")
    timing = json.load(open(path)) if os.path.exists(path) else {}
    t0, c0 = time.time(), time.process_time()
    out = fn()
    entry = timing.setdefault(what, dict(wall_seconds=0.0, cpu_seconds=0.0, sessions=0))
    entry["wall_seconds"] += time.time() - t0
    entry["cpu_seconds"] += time.process_time() - c0
    entry["sessions"] += 1
    with open(path, "w") as f:
        json.dump(timing, f, indent=2)
    return out


def domain_fits(workdir: str) -> dict:
    """Each domain's law (after the verify run: the prediction needs only the overall one)."""
    path = os.path.join(workdir, "fits.json")
    fitted = json.load(open(path))
    results = os.path.join(workdir, "sweep", sweep.RESULTS)
    for domain in DOMAINS:
        if domain not in fitted:
            fitted[domain] = fit.fit_all(fit.load_points(results, target=domain), bootstrap=DOMAIN_BOOTSTRAP,
                                         num_starts=NUM_STARTS)
            with open(path, "w") as f:
                json.dump(fitted, f, indent=2)
    return fitted


def verify_point(c: ml_collections.ConfigDict, flops: float, params: float) -> points_lib.Point:
    """The one point of an isoflop sweep at `flops` whose total params are nearest `params` (the fit counts
    total params; the shape rule targets non-embedding ones)."""
    if not math.isfinite(params) or params <= 0:
        raise ValueError(f"the fit's compute-optimal size is {params}: no run to verify (see fits.json)")
    v = ml_collections.ConfigDict(c.to_dict())
    v.name, v.cooldowns, v.budgets = "verify", False, [flops]
    target = params
    for _ in range(4):
        v.targets = [target]
        point = points_lib.expand(v)[0]
        target *= params / point.params
    return point


def predict(workdir: str, c: ml_collections.ConfigDict) -> dict:
    path = os.path.join(workdir, "prediction.json")
    if os.path.exists(path):
        return json.load(open(path))
    results = os.path.join(workdir, "sweep", sweep.RESULTS)
    flops = VERIFY_FACTOR * max(c.budgets)
    samples = {}
    fitted = {"all": fit.fit_all(fit.load_points(results), bootstrap=BOOTSTRAP, num_starts=NUM_STARTS,
                                 predict_flops=flops, samples=samples)}
    with open(os.path.join(workdir, "fits.json"), "w") as f:
        json.dump(fitted, f, indent=2)
    optimum = fitted["all"]["predict"]
    point = verify_point(c, flops, optimum["approach3"]["params"])
    at_run = fit.predict(fit.load_points(results), flops, samples["approach3"], (None, []),
                         params=point.params, tokens=point.tokens)
    prediction = dict(
        made_at=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"), flops=flops,
        optimum=optimum, run=dict(name=point.name, params=point.params, tokens=point.tokens, exact_flops=point.flops,
                                  shape=[point.config.model.d_model, point.config.model.num_layers],
                                  steps=point.config.num_train_steps),
        loss=at_run["approach3"]["loss"], loss_interval=at_run["approach3"]["loss_interval"],
        loss_fit_interval=at_run["approach3"]["loss_fit_interval"], level=fit.LEVEL)
    with open(path, "w") as f:
        json.dump(prediction, f, indent=2)
    return prediction


def verify(workdir: str, c: ml_collections.ConfigDict, prediction: dict) -> dict:
    point = verify_point(c, prediction["flops"], prediction["optimum"]["approach3"]["params"])
    assert point.name == prediction["run"]["name"], (point.name, prediction["run"])
    v = ml_collections.ConfigDict(c.to_dict())
    v.name, v.cooldowns, v.budgets, v.targets = "verify", False, [prediction["flops"]], [point.non_embedding_params]
    rows = sweep.run(v, os.path.join(workdir, "verify"))
    row = rows[0] if rows else sweep.finished_row(point, os.path.join(workdir, "verify"))
    loss = float(row["eval_loss"])
    lo, hi = prediction["loss_interval"]
    return dict(name=point.name, eval_loss=loss, predicted=prediction["loss"], interval=[lo, hi],
                inside=bool(lo <= loss <= hi), error=loss - prediction["loss"])


def _ci(fit_: dict, key: str) -> str:
    lo, hi = fit_[f"{key}_interval"]
    return f"{fit_[key]:.3f} [{lo:.3f}, {hi:.3f}] (half-width {(hi - lo) / 2:.3f})"


def loss_table(results: str) -> list[str]:
    """Eval loss (steps) per budget and size, the budget's lowest in bold."""
    rows = list(csv.DictReader(open(results)))
    sizes = sorted({(int(r["params"]), f"d{r['d_model']}l{r['num_layers']}") for r in rows})
    budgets = sorted({float(r["budget"]) for r in rows})
    lines = ["| budget (FLOPs) | " + " | ".join(f"{s} ({p / 1e3:.0f}k)" for p, s in sizes) + " |",
             "|---:|" + "---:|" * len(sizes)]
    for b in budgets:
        at = {int(r["params"]): r for r in rows if float(r["budget"]) == b}
        best = min(at, key=lambda p: float(at[p]["eval_loss"]))
        cells = []
        for p, _ in sizes:
            if p not in at:
                cells.append("")
                continue
            cell = f"{float(at[p]['eval_loss']):.3f}"
            cells.append((f"**{cell}**" if p == best else cell) + f" ({at[p]['num_train_steps']})")
        lines.append(f"| {b:.3g} | " + " | ".join(cells) + " |")
    return lines


def report(workdir: str) -> str:
    fitted = json.load(open(os.path.join(workdir, "fits.json")))
    timing = json.load(open(os.path.join(workdir, "timing.json")))
    saved = json.load(open(os.path.join(workdir, "sweep", cooldowns.SAVINGS)))
    lines = ["## Eval loss (training steps in brackets; bold: the budget's lowest)", "",
             *loss_table(os.path.join(workdir, "sweep", sweep.RESULTS)), "",
             "## Fits (95% bootstrap intervals)", "",
             "| loss | approach 2: a | approach 2: b | approach 3: a | approach 3: alpha | approach 3: beta | approach 3: E |",
             "|---|---|---|---|---|---|---|"]
    for name, f_ in fitted.items():
        a2, a3 = f_["approach2"], f_["approach3"]
        a2_cells = (f"{_ci(a2, 'a')} | {_ci(a2, 'b')}" if a2 and "a_interval" in a2 else "no IsoFLOP minima | -")
        lines.append(f"| {'eval_loss' if name == 'all' else 'eval_loss_' + name} | {a2_cells} | {_ci(a3, 'a')} | "
                     f"{a3['alpha']:.3f} ± {a3['alpha_se']:.3f} | {a3['beta']:.3f} ± {a3['beta_se']:.3f} | "
                     f"{a3['E']:.3f} ± {a3['E_se']:.3f} |")
    if fitted["all"]["approach2"]:
        lines += ["", "| budget (FLOPs) | N_opt | D_opt | loss at the minimum | interior |", "|---:|---:|---:|---:|---|"]
        for b in fitted["all"]["approach2"]["budgets"]:
            lines.append(f"| {b['flops']:.3g} | {b['n_opt']:.3g} | {b['d_opt']:.3g} | {b['loss_opt']:.4f} | {b['interior']} |")
    lines += ["", "## Compute", "",
              "C" + cooldowns.describe(saved)[1:] + "."]
    for what, t in timing.items():
        lines.append(f"- {what}: {t['wall_seconds'] / 60:.1f} min wall, {t['cpu_seconds'] / 60:.1f} min CPU "
                     f"(all threads of the process) over {t['sessions']} session(s)")
    pred_path = os.path.join(workdir, "prediction.json")
    if os.path.exists(pred_path):
        p = json.load(open(pred_path))
        o = p["optimum"]["approach3"]
        lines += ["", "## Predict, then verify", "",
                  f"Made at {p['made_at']}, before the run was trained. At C = {p['flops']:.3g} FLOPs ({VERIFY_FACTOR}x the "
                  f"largest budget) approach 3 puts the optimum at {o['params']:.3g} params "
                  f"[{o['params_interval'][0]:.3g}, {o['params_interval'][1]:.3g}] and {o['tokens']:.3g} tokens "
                  f"[{o['tokens_interval'][0]:.3g}, {o['tokens_interval'][1]:.3g}]. The shape rule's nearest model is "
                  f"{p['run']['name']} ({p['run']['params']:,} params, {p['run']['tokens']:,} tokens, "
                  f"{p['run']['exact_flops']:.3g} exact FLOPs); predicted eval loss {p['loss']:.4f}, "
                  f"{100 * p['level']:.0f}% interval [{p['loss_interval'][0]:.4f}, {p['loss_interval'][1]:.4f}] "
                  f"(the law alone: [{p['loss_fit_interval'][0]:.4f}, {p['loss_fit_interval'][1]:.4f}])."]
        verify_path = os.path.join(workdir, "verify.json")
        if os.path.exists(verify_path):
            v = json.load(open(verify_path))
            lines.append(f"Measured: {v['eval_loss']:.4f} ({v['error']:+.4f} from the prediction): "
                         f"{'inside' if v['inside'] else 'outside'} the interval.")
    return "\n".join(lines)


def publish(workdir: str, out: str) -> None:
    os.makedirs(out, exist_ok=True)
    for name in ("fits.json", "prediction.json", "verify.json", "timing.json", "report.md"):
        if os.path.exists(os.path.join(workdir, name)):
            shutil.copy(os.path.join(workdir, name), os.path.join(out, name))
    for name in (sweep.RESULTS, cooldowns.SAVINGS):
        shutil.copy(os.path.join(workdir, "sweep", name), os.path.join(out, name))


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--workdir", required=True)
    parser.add_argument("--corpus", required=True, help="the directory build_corpus.py wrote")
    parser.add_argument("--sweep", default="isoflop_cpu_cooldowns_wide", help="a module of configs/sweeps/")
    parser.add_argument("--mixture", default=MIXTURE)
    parser.add_argument("--out", default=HERE, help="where the results, fits and report are copied")
    parser.add_argument("--seed", type=int, default=0, help="init and data order of every point")
    parser.add_argument("--sweep_only", action="store_true", help="a replicate: the sweep, no fits or verify run")
    parser.add_argument("--report_only", action="store_true")
    args = parser.parse_args()
    c = sweep_config(args.corpus, args.sweep, args.mixture)
    c.base.seed = args.seed
    os.makedirs(args.workdir, exist_ok=True)
    if not args.report_only:
        timed("sweep", args.workdir, lambda: sweep.run(c, os.path.join(args.workdir, "sweep")))
        if args.sweep_only:
            return
        prediction = timed("fit and predict", args.workdir, lambda: predict(args.workdir, c))
        print(json.dumps(prediction), flush=True)
        result = timed("verify run", args.workdir, lambda: verify(args.workdir, c, prediction))
        with open(os.path.join(args.workdir, "verify.json"), "w") as f:
            json.dump(result, f, indent=2)
        timed("domain fits", args.workdir, lambda: domain_fits(args.workdir))
    text = report(args.workdir)
    with open(os.path.join(args.workdir, "report.md"), "w") as f:
        f.write(text + "\n")
    publish(args.workdir, args.out)
    print(text)


if __name__ == "__main__":
    main()
