"""Learning-rate transfer across width (sp vs mup) and depth (none vs completep) on the built-in
Shakespeare corpus, and "tune small, train big". Results: experiments/mup/README.md.

    .venv/bin/python experiments/mup/transfer.py run --study=width --shard=0/2 &   # two processes, one per core
    .venv/bin/python experiments/mup/transfer.py run --study=width --shard=1/2
    .venv/bin/python experiments/mup/transfer.py run --study=depth --shard=0/2 ...
    .venv/bin/python experiments/mup/transfer.py analyze            # fits, plots, the tables of the README
    .venv/bin/python experiments/mup/transfer.py run --study=big    # the smallest width's mup optimum at the largest

Each run appends one JSON line to experiments/mup/results/<study>.jsonl (resumable: a finished run is skipped).
"""

import argparse
import json
import math
import os
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(os.path.dirname(HERE)))

RESULTS = os.path.join(HERE, "results")
LRS = [2.0**e for e in range(-11, -2)]  # 4.9e-4 ... 0.125, factor 2 apart
WIDTHS = [32, 64, 128, 256]  # 8x, heads fixed at 4 (the head dim grows, as mup's 1/d_head assumes)
DEPTHS = [2, 4, 8]  # 4x, at width 64
SEEDS = [0, 1]
STEPS = 300
BASE_WIDTH, BASE_DEPTH = 32, 2
# mup's output multiplier, tuned at the base width (experiments/mup/README.md: 1, 2, 4, 8, 16 at two rates).
ALPHA_OUT = 4.0


def config(width: int, depth: int, lr: float, seed: int, parametrization: str, depth_parametrization: str,
           output_multiplier: float = 1.0):
    from configs import default

    c = default.get_config()
    c.name = f"mup/{parametrization}-{depth_parametrization}-w{width}-l{depth}-lr{lr:.3g}-s{seed}"
    c.seed = seed
    c.batch_size, c.seq_len = 16, 128
    c.num_train_steps = STEPS
    c.log_every_steps = STEPS
    c.eval_every_steps = STEPS
    c.eval_batch_size = 64
    c.eval_max_batches = 16  # 131k held-out tokens: the same ones for every run
    c.checkpoint_every_steps = STEPS
    c.keep_checkpoints = 1
    c.sample_tokens = 0
    c.peak_tflops = 1.0
    c.mesh.cpu_devices = 0
    m = c.model
    m.d_model, m.num_layers, m.num_heads, m.num_kv_heads, m.d_ff = width, depth, 4, 4, 4 * width
    m.parametrization, m.base_width, m.output_multiplier = parametrization, BASE_WIDTH, output_multiplier
    m.depth_parametrization, m.base_depth = depth_parametrization, BASE_DEPTH
    c.opt.learning_rate = lr
    c.opt.warmup_steps = 30
    c.opt.schedule = "cosine"
    return c


def grid(study: str, seeds: list[int] = SEEDS, alpha: float = 1.0) -> list[dict]:
    """alpha: mup's output multiplier (1: sp's output at the base width; ALPHA_OUT: tuned there)."""
    extra = {} if alpha == 1.0 else {"output_multiplier": alpha}
    if study == "width":
        return [dict(width=w, depth=2, lr=lr, seed=s, parametrization=p, depth_parametrization="none", **(extra if p == "mup" else {}))
                for s in seeds for p in ("sp", "mup") for w in WIDTHS for lr in LRS]
    if study == "depth":
        return [dict(width=64, depth=d, lr=lr, seed=s, parametrization="mup", depth_parametrization=dp, **extra)
                for s in seeds for dp in ("none", "completep") for d in DEPTHS for lr in LRS]
    if study == "big":  # the smallest width's fitted mup optimum, at the largest width (and depth: completep)
        fits = json.load(open(os.path.join(HERE, "fits.json")))
        w_lr = fits["width"][label(dict(parametrization="mup", output_multiplier=ALPHA_OUT), "width")][str(WIDTHS[0])]["lr"]
        d_lr = fits["depth"]["completep"][str(DEPTHS[0])]["lr"]
        return ([dict(width=WIDTHS[-1], depth=2, lr=w_lr, seed=s, parametrization="mup", depth_parametrization="none",
                      output_multiplier=ALPHA_OUT) for s in seeds]
                + [dict(width=64, depth=DEPTHS[-1], lr=d_lr, seed=s, parametrization="mup", depth_parametrization="completep")
                   for s in seeds])
    raise SystemExit(f"unknown study {study!r}")


def label(p: dict, study: str) -> str:
    """The curve a point belongs to: its (depth) parametrization, and mup's output multiplier where not 1."""
    name = p["parametrization"] if study == "width" else p["depth_parametrization"]
    return name + (f" alpha_out={p['output_multiplier']:g}" if p.get("output_multiplier", 1.0) != 1.0 else "")


def _key(p: dict) -> str:
    return json.dumps({k: p[k] for k in sorted(p)})


def run(study: str, shard: str, seeds: list[int], alpha: float, where: dict) -> None:
    from llm import spec
    from llm.training import loop, sharding

    sharding.leave_out_absent_tpu()

    i, n = (int(x) for x in shard.split("/"))
    os.makedirs(RESULTS, exist_ok=True)
    path = os.path.join(RESULTS, f"{study}.jsonl")
    done = {_key(r["point"]) for r in map(json.loads, open(path))} if os.path.exists(path) else set()
    # where: run only the grid's points whose keys take these values (e.g. more seeds near one optimum)
    todo = [p for p in grid(study, seeds, alpha) if all(p[k] in v for k, v in where.items())]
    for point in todo[i::n]:
        if _key(point) in done:
            continue
        start = time.perf_counter()
        with tempfile.TemporaryDirectory() as workdir:
            try:
                summary = loop.train(spec.from_config(config(**point)), workdir, quiet=True)
                loss = summary["eval_loss"]
            except loop.NonFiniteLossError:
                loss = float("nan")  # diverged: a result, plotted as missing
        record = {"point": point, "eval_loss": loss, "seconds": time.perf_counter() - start}
        with open(path, "a") as f:
            f.write(json.dumps(record) + "\n")
        print(json.dumps(record), flush=True)


def optimum(lrs, losses) -> dict:
    """The vertex of a parabola in log2(lr) through the lowest point and its neighbours (up to 2 a side),
    with its standard error by the delta method from the fit's covariance (None with only 3 points)."""
    import numpy as np

    x, y = np.log2(np.asarray(lrs, float)), np.asarray(losses, float)
    ok = np.isfinite(y)
    x, y = x[ok], y[ok]
    order = np.argsort(x)
    x, y = x[order], y[order]
    best = int(np.argmin(y))
    lo, hi = max(0, best - 2), min(len(x), best + 3)
    xs, ys = x[lo:hi], y[lo:hi]
    edge = best in (0, len(x) - 1)
    if len(xs) < 3:
        return {"lr": float(2 ** x[best]), "se_log2": None, "loss": float(y[best]), "at_edge": True}
    if len(xs) > 3:
        (a, b, c), cov = np.polyfit(xs, ys, 2, cov=True)
    else:
        (a, b, c), cov = np.polyfit(xs, ys, 2), None
    if a <= 0:
        return {"lr": float(2 ** x[best]), "se_log2": None, "loss": float(y[best]), "at_edge": True}
    v = -b / (2 * a)
    se = None
    if cov is not None:
        grad = np.array([b / (2 * a * a), -1 / (2 * a), 0.0])
        se = float(np.sqrt(grad @ cov @ grad))
    return {"lr": float(2**v), "se_log2": se, "loss": float(c - b * b / (4 * a)), "at_edge": edge}


def _load(study: str) -> list[dict]:
    path = os.path.join(RESULTS, f"{study}.jsonl")
    return [json.loads(line) for line in open(path)] if os.path.exists(path) else []


def analyze() -> None:
    import numpy as np
    from matplotlib.figure import Figure

    fits, tables = {}, []
    for study, inner, sizes in (("width", "width", WIDTHS), ("depth", "depth", DEPTHS)):
        rows = _load(study)
        if not rows:
            continue
        for r in rows:
            r["group"] = label(r["point"], study)
        groups = sorted({r["group"] for r in rows})
        fits[study] = {}
        fig = Figure(figsize=(5 * len(groups), 4))
        axes = fig.subplots(1, len(groups), squeeze=False)[0]
        for ax, g in zip(axes, groups):
            fits[study][g] = {}
            for k, size in enumerate(sizes):
                mine = [r for r in rows if r["group"] == g and r["point"][inner] == size]
                lrs = sorted({r["point"]["lr"] for r in mine})
                per_seed = {s: [next((r["eval_loss"] for r in mine if r["point"]["lr"] == lr and r["point"]["seed"] == s), np.nan)
                                for lr in lrs] for s in sorted({r["point"]["seed"] for r in mine})}
                if not lrs:
                    continue
                mean = np.nanmean(np.array(list(per_seed.values())), axis=0)
                spread = np.nanstd(np.array(list(per_seed.values())), axis=0)
                fit = optimum(lrs, mean)
                # The seed-to-seed spread of the optimum: each seed's own vertex.
                seeds = [optimum(lrs, v)["lr"] for v in per_seed.values() if np.isfinite(v).sum() >= 3]
                fit["seeds"] = len(per_seed)
                fit["seed_lrs"] = seeds
                fits[study][g][str(size)] = fit
                ax.errorbar(lrs, mean, yerr=spread, fmt="o-", ms=3, lw=1, color=f"C{k}", label=f"{inner} {size}")
                ax.axvline(fit["lr"], color=f"C{k}", lw=0.6, ls="--")
            ax.set(xscale="log", xlabel="peak learning rate", ylabel="eval loss (mean of seeds)", title=f"{study}: {g}")
            finite = [r["eval_loss"] for r in rows if np.isfinite(r["eval_loss"]) and r["group"] == g]
            if finite:
                ax.set_ylim(min(finite) - 0.02, min(min(finite) + 1.0, max(finite) + 0.02))
            ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(os.path.join(HERE, f"{study}_transfer.png"), dpi=110)
        for g in list(fits[study]):
            by_size = dict(fits[study][g])
            lrs = [v["lr"] for v in by_size.values()]
            drift = max(lrs) / min(lrs) if lrs else float("nan")
            fits[study][g]["drift"] = drift
            cells = " | ".join(f"{v['lr']:.2e}" + (f" (x/ {2 ** v['se_log2']:.2f})" if v["se_log2"] else "") + (" edge" if v["at_edge"] else "")
                               for v in by_size.values())
            tables.append(f"| {study} | {g} | {cells} | {drift:.2f}x |")
    with open(os.path.join(HERE, "fits.json"), "w") as f:
        json.dump(fits, f, indent=2)
    print("\n".join(tables))
    big = _load("big")
    for r in big:
        p = r["point"]
        study, size = ("width", str(p["width"])) if p["depth_parametrization"] == "none" else ("depth", str(p["depth"]))
        g = label(p, study)
        best = fits[study][g][size]["loss"]
        print(f"big {study} {size} seed {p['seed']} lr {p['lr']:.3g}: loss {r['eval_loss']:.4f} vs best of its own sweep "
              f"{best:.4f} ({100 * (r['eval_loss'] / best - 1):+.2f}%)")
    paired_transfer(big)


def paired_transfer(big: list[dict]) -> None:
    """Tune small, train big, seed by seed: the transferred rate's loss against the best of the same seed's
    sweep at the largest width (the lowest of its rates, and its parabola's vertex). Seeds move the whole
    curve by a few percent; the difference within a seed is what the 1% criterion is about."""
    import numpy as np

    grid_rows = [r for r in _load("width") if r["point"]["parametrization"] == "mup"
                 and r["point"].get("output_multiplier", 1.0) == ALPHA_OUT and r["point"]["width"] == WIDTHS[-1]]
    diffs = {"lowest": [], "vertex": []}
    for r in big:
        p = r["point"]
        if p["depth_parametrization"] != "none":
            continue
        mine = [g for g in grid_rows if g["point"]["seed"] == p["seed"]]
        lrs = sorted(g["point"]["lr"] for g in mine)
        if len(lrs) < 4:
            continue
        losses = [next(g["eval_loss"] for g in mine if g["point"]["lr"] == lr) for lr in lrs]
        lowest, vertex = min(losses), optimum(lrs, losses)["loss"]
        for kind, best in (("lowest", lowest), ("vertex", vertex)):
            diffs[kind].append(100 * (r["eval_loss"] / best - 1))
        print(f"paired seed {p['seed']}: transferred {r['eval_loss']:.4f}; its own sweep at width {WIDTHS[-1]}: "
              f"lowest {lowest:.4f} over {len(lrs)} rates, vertex {vertex:.4f}")
    for kind, d in diffs.items():
        if d:
            se = np.std(d, ddof=1) / np.sqrt(len(d)) if len(d) > 1 else float("nan")
            print(f"paired transferred vs {kind}: {np.mean(d):+.2f}% +- {se:.2f}% (mean +- se over {len(d)} seeds: "
                  f"{', '.join(f'{x:+.2f}%' for x in d)})")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("what", choices=["run", "analyze"])
    ap.add_argument("--study", default="width", choices=["width", "depth", "big"])
    ap.add_argument("--shard", default="0/1")
    ap.add_argument("--seeds", default=",".join(map(str, SEEDS)))
    ap.add_argument("--alpha_out", type=float, default=1.0, help="mup's output multiplier")
    ap.add_argument("--where", default="{}", help='JSON: only the points whose keys take these values, '
                    'e.g. {"width": [256], "parametrization": ["mup"]}')
    args = ap.parse_args()
    if args.what == "run":
        run(args.study, args.shard, [int(s) for s in args.seeds.split(",")], args.alpha_out, json.loads(args.where))
    else:
        analyze()


if __name__ == "__main__":
    main()
