"""Scaling-law fits: Chinchilla approach 3 (parametric), approach 2 (IsoFLOP) and simple power laws.

Points are a dict of 1-D float arrays with keys params, tokens, flops, loss (and optionally budget).
"""

import csv
import itertools
from typing import Any, Sequence

import numpy as np
from scipy import optimize

Points = dict[str, np.ndarray]

HUBER_DELTA = 1e-3
# Hoffmann et al. 2022's initialisation grid (alpha, beta, e, a, b): 5*5*5*6*6 = 4500 starts.
ALPHAS = BETAS = (0.0, 0.5, 1.0, 1.5, 2.0)
ES = (-1.0, -0.5, 0.0, 0.5, 1.0)
AS = BS = (0.0, 5.0, 10.0, 15.0, 20.0, 25.0)
# Other spellings of our columns: a sweep's results.csv and Epoch AI's Chinchilla extraction.
ALIASES = {"eval_loss": "loss", "Model Size": "params", "Training FLOP": "flops"}
COLUMNS = ("params", "tokens", "flops", "loss", "budget")
BUDGET_RTOL = 0.1


def as_points(points: Points | Sequence[dict[str, Any]]) -> Points:
    """Validates points and fills in tokens or flops (C = 6 N D)."""
    if not isinstance(points, dict):
        points = {k: [row[k] for row in points] for k in (points[0] if len(points) else {})}
    # Other columns (a run's name, train_loss, ...) are ignored; a canonical name beats its alias.
    cols = {ALIASES.get(k, k): np.asarray(v, dtype=np.float64) for k, v in points.items()
            if k in COLUMNS or (k in ALIASES and ALIASES[k] not in points)}
    missing = [k for k in ("params", "loss") if k not in cols]
    missing += [] if {"tokens", "flops"} & cols.keys() else ["tokens or flops"]
    if missing:
        raise ValueError(f"points are missing column(s) {missing}; have {sorted(points)}")
    if "tokens" not in cols:
        cols["tokens"] = cols["flops"] / (6 * cols["params"])
    if "flops" not in cols:
        cols["flops"] = 6 * cols["params"] * cols["tokens"]
    out = {k: cols[k] for k in COLUMNS if k in cols}
    for k, v in out.items():
        if not np.all(np.isfinite(v)) or np.any(v <= 0):
            bad = v[~(np.isfinite(v) & (v > 0))]
            raise ValueError(f"column {k!r} must be finite and positive; got {bad[:5]}")
    if len(out["loss"]) < 5:
        raise ValueError(f"need at least 5 points to fit, got {len(out['loss'])}")
    return out


def load_points(path: str, arch: str = "", target: str = "") -> Points:
    """Reads a CSV with params,tokens|flops,loss (or a sweep's results.csv, or the Chinchilla extraction);
    arch: only a multi-arch sweep's rows of that arch (named '<arch>-...'); target: the loss is the
    column eval_loss_<target> (one domain's held-out loss) instead of eval_loss."""
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    if arch:
        rows = [r for r in rows if r.get("name", "").startswith(f"{arch}-")]
    if not rows:
        raise ValueError(f"{path} has no rows" + (f" of arch {arch!r}" if arch else ""))
    if target:
        column = f"eval_loss_{target}"
        if column not in rows[0]:
            have = sorted(k.removeprefix("eval_loss_") for k in rows[0] if k.startswith("eval_loss_"))
            raise ValueError(f"{path} has no column {column!r} (--target={target}); its domains: {', '.join(have) or 'none'}")
        rows = [{**{k: v for k, v in r.items() if k not in ("loss", "eval_loss")}, "loss": r[column]} for r in rows]
    wanted = [k for k in rows[0] if k in COLUMNS or k in ALIASES]
    try:
        return as_points({k: [r[k] for r in rows] for k in wanted})
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from e


def huber(r: np.ndarray, delta: float = HUBER_DELTA) -> np.ndarray:
    return np.where(np.abs(r) <= delta, 0.5 * r**2, delta * (np.abs(r) - 0.5 * delta))


def _objective(theta: np.ndarray, log_n: np.ndarray, log_d: np.ndarray, log_l: np.ndarray):
    """Summed Huber loss of log-sum-exp(a - alpha log N, b - beta log D, e) - log L, and its gradient."""
    a, b, e, alpha, beta = theta
    terms_Px3 = np.stack([a - alpha * log_n, b - beta * log_d, np.full_like(log_n, e)], axis=1)
    top_P = terms_Px3.max(axis=1)
    w_Px3 = np.exp(terms_Px3 - top_P[:, None])
    total_P = w_Px3.sum(axis=1)
    r_P = top_P + np.log(total_P) - log_l
    w_Px3 /= total_P[:, None]
    dr_P = np.clip(r_P, -HUBER_DELTA, HUBER_DELTA)  # Huber'(r)
    grad = np.array([
        dr_P @ w_Px3[:, 0], dr_P @ w_Px3[:, 1], dr_P @ w_Px3[:, 2],
        -(dr_P * log_n) @ w_Px3[:, 0], -(dr_P * log_d) @ w_Px3[:, 1]])
    return huber(r_P).sum(), grad


def _grid_values(grid_5xS: np.ndarray, log_n, log_d, log_l) -> np.ndarray:
    a, b, e, alpha, beta = (g[:, None] for g in grid_5xS)
    lse_SxP = np.logaddexp(np.logaddexp(a - alpha * log_n, b - beta * log_d), e)
    return huber(lse_SxP - log_l).sum(axis=1)


def _minimise(starts: np.ndarray, log_n, log_d, log_l) -> np.ndarray:
    best, best_val = None, np.inf
    for x0 in starts:
        # The summed Huber loss is ~1e-6 per point, so scipy's default tolerances stop far too early.
        res = optimize.minimize(_objective, x0, args=(log_n, log_d, log_l), jac=True, method="L-BFGS-B",
                                options={"ftol": 1e-15, "gtol": 1e-12, "maxiter": 2000})
        if res.fun < best_val:
            best, best_val = res.x, res.fun
    return best


def approach3_samples(points: Points, bootstrap: int = 0, seed: int = 0,
                      num_starts: int | None = 200) -> tuple[dict, list[dict]]:
    """Hoffmann et al. 2022 approach 3: L(N, D) = E + A/N^alpha + B/D^beta, and the laws refit to each
    bootstrap resample of the points.

    L-BFGS-B runs from the num_starts grid points with the lowest objective (None: all 4500).
    Each bootstrap resample is refit from the full-data optimum and the 8 best grid points.
    """
    if bootstrap == 1:
        raise ValueError("bootstrap needs at least 2 resamples for a standard error")
    log_n, log_d, log_l = np.log(points["params"]), np.log(points["tokens"]), np.log(points["loss"])
    grid = np.array([(a, b, e, al, be) for al, be, e, a, b in itertools.product(ALPHAS, BETAS, ES, AS, BS)]).T
    order = np.argsort(_grid_values(grid, log_n, log_d, log_l))
    theta = _minimise(grid[:, order[:num_starts]].T, log_n, log_d, log_l)
    out = _law_from_theta(theta)
    out.update(grid=dict(alpha=ALPHAS, beta=BETAS, e=ES, a=AS, b=BS), num_starts=num_starts or grid.shape[1])
    samples = []
    if bootstrap:
        rng = np.random.default_rng(seed)
        starts = np.concatenate([theta[None], grid[:, order[:8]].T])
        for _ in range(bootstrap):
            idx = rng.integers(0, len(log_l), len(log_l))
            samples.append(_law_from_theta(_minimise(starts, log_n[idx], log_d[idx], log_l[idx])))
        for k in ("E", "A", "B", "alpha", "beta", "a", "b", "G"):
            out[f"{k}_se"] = float(np.std([s[k] for s in samples], ddof=1))
        out["a_interval"] = interval([s["a"] for s in samples])
        out["bootstrap"] = bootstrap
    # Log residuals of the full fit: a new run's loss scatters about the law by about as much.
    out["residual_rms"] = float(np.sqrt(np.mean((log_l - np.log(predict_loss(points["params"], points["tokens"], out))) ** 2)))
    return out, samples


def approach3(points: Points, bootstrap: int = 0, seed: int = 0, num_starts: int | None = 200) -> dict:
    """Hoffmann et al. 2022 approach 3: L(N, D) = E + A/N^alpha + B/D^beta (see approach3_samples)."""
    return approach3_samples(points, bootstrap, seed, num_starts)[0]


LEVEL = 0.95  # every interval the fitter reports: bootstrap percentiles


def interval(values, level: float = LEVEL) -> list[float]:
    lo, hi = np.percentile(np.asarray(values, dtype=np.float64), [50 * (1 - level), 50 * (1 + level)])
    return [float(lo), float(hi)]


def law(E: float, A: float, B: float, alpha: float, beta: float) -> dict:
    """L(N, D) = E + A/N^alpha + B/D^beta with its compute-optimal allocation (for n_opt, d_opt)."""
    # Minimising L(N, C/(6N)) gives N_opt = G (C/6)^(beta/(alpha+beta)) and D_opt = (C/6) / N_opt.
    G = (alpha * A / (beta * B)) ** (1 / (alpha + beta))
    return dict(E=float(E), A=float(A), B=float(B), alpha=float(alpha), beta=float(beta),
                a=float(beta / (alpha + beta)), b=float(alpha / (alpha + beta)), G=float(G))


def _law_from_theta(theta: np.ndarray) -> dict:
    a, b, e, alpha, beta = theta
    return law(np.exp(e), np.exp(a), np.exp(b), alpha, beta)


def n_opt(flops: float | np.ndarray, fit: dict) -> np.ndarray:
    return fit["G"] * (np.asarray(flops) / 6) ** fit["a"]


def d_opt(flops: float | np.ndarray, fit: dict) -> np.ndarray:
    return (np.asarray(flops) / 6) ** fit["b"] / fit["G"]


def predict_loss(params: np.ndarray, tokens: np.ndarray, fit: dict) -> np.ndarray:
    n, d = np.asarray(params), np.asarray(tokens)
    return fit["E"] + fit["A"] / n ** fit["alpha"] + fit["B"] / d ** fit["beta"]


def budget_groups(points: Points) -> list[np.ndarray]:
    """Indices of points per compute budget: the `budget` column if present, else runs of sorted flops
    that stay within BUDGET_RTOL (10%) of the smallest flops in the run."""
    key = points.get("budget", points["flops"])
    rtol = 0.0 if "budget" in points else BUDGET_RTOL
    order = np.argsort(key, kind="stable")
    groups, start = [], 0
    for i in range(1, len(order) + 1):
        if i == len(order) or key[order[i]] > key[order[start]] * (1 + rtol):
            groups.append(order[start:i])
            start = i
    return groups


def _loglog_line(x: np.ndarray, y: np.ndarray) -> dict:
    """Least squares log y = log k + slope log x, with the slope's standard error when dof allow."""
    X = np.stack([np.ones_like(x), np.log(x)], axis=1)
    coef, *_ = np.linalg.lstsq(X, np.log(y), rcond=None)
    out = dict(k=float(np.exp(coef[0])), exponent=float(coef[1]), exponent_se=None)
    if len(x) >= 3:
        resid = np.log(y) - X @ coef
        cov = resid @ resid / (len(x) - 2) * np.linalg.inv(X.T @ X)
        out["exponent_se"] = float(np.sqrt(cov[1, 1]))
    return out


def approach2(points: Points) -> dict | None:
    """IsoFLOP profiles: per budget, a parabola of loss in log N; then power laws of the minima in C.

    None when fewer than 2 budgets have >= 3 distinct sizes and a convex parabola with a finite vertex.
    """
    budgets = []
    for idx in budget_groups(points):
        n = points["params"][idx]
        if len(np.unique(n)) < 3:
            continue
        c2, c1, c0 = np.polyfit(np.log(n), points["loss"][idx], 2)
        if c2 <= 0:
            continue
        flops = float(np.exp(np.mean(np.log(points["flops"][idx]))))
        log_n_star = -c1 / (2 * c2)
        n_star = float(np.exp(log_n_star))
        if not 0 < n_star < np.inf:  # a nearly flat parabola (a bootstrap resample's) puts its vertex nowhere
            continue
        budgets.append(dict(
            flops=flops, n_opt=n_star, d_opt=flops / (6 * n_star), loss_opt=float(c0 - c1**2 / (4 * c2)),
            coeffs=[float(c2), float(c1), float(c0)], params=n.tolist(), losses=points["loss"][idx].tolist(),
            # An extrapolated minimum (outside the sizes tried) is less trustworthy.
            interior=bool(n.min() <= n_star <= n.max())))
    if len(budgets) < 2:
        return None
    c = np.array([b["flops"] for b in budgets])
    n_line = _loglog_line(c, np.array([b["n_opt"] for b in budgets]))
    d_line = _loglog_line(c, np.array([b["d_opt"] for b in budgets]))
    return dict(budgets=budgets, a=n_line["exponent"], a_se=n_line["exponent_se"], k_n=n_line["k"],
                b=d_line["exponent"], b_se=d_line["exponent_se"], k_d=d_line["k"])


def _frontier(x: np.ndarray, loss: np.ndarray) -> np.ndarray:
    """Indices of the lower envelope: points with lower loss than every point with smaller or equal x."""
    order = np.lexsort((loss, x))
    running = np.minimum.accumulate(loss[order])
    keep = np.concatenate([[True], running[1:] < running[:-1]])
    return order[keep]


def _saturating_power_law(x: np.ndarray, loss: np.ndarray) -> dict | None:
    """L(x) = E + A / x^alpha by least squares on log L; x is rescaled so A stays O(1) for the solver."""
    if len(x) < 3:
        return None
    scale = float(np.exp(np.mean(np.log(x))))
    u = x / scale

    def resid(p: np.ndarray) -> np.ndarray:
        E, log_a, alpha = p
        return np.log(E + np.exp(log_a) * u**-alpha) - np.log(loss)

    best = None
    for alpha0 in (0.1, 0.3, 0.6):
        p0 = [0.5 * loss.min(), np.log(0.5 * loss.min()), alpha0]
        res = optimize.least_squares(resid, p0, bounds=([0, -30, 0], [loss.min(), 30, 3]))
        if best is None or res.cost < best.cost:
            best = res
    E, log_a, alpha = best.x
    return dict(E=float(E), A=float(np.exp(log_a) * scale**alpha), alpha=float(alpha), num_points=len(x))


def power_laws(points: Points) -> dict:
    """L(N) and L(C) fitted to the lower envelopes of loss vs N (best run per size) and loss vs C."""
    n_idx, idx = _frontier(points["params"], points["loss"]), _frontier(points["flops"], points["loss"])
    return dict(loss_vs_params=_saturating_power_law(points["params"][n_idx], points["loss"][n_idx]),
                loss_vs_flops=_saturating_power_law(points["flops"][idx], points["loss"][idx]),
                frontier_flops=points["flops"][idx].tolist(), frontier_loss=points["loss"][idx].tolist())


def approach2_samples(points: Points, bootstrap: int, seed: int = 0, wild: bool = False) -> list[dict]:
    """approach2 refit to `bootstrap` residual resamples: each budget's losses become its parabola's values
    plus residuals (scaled by sqrt(n / (n - parameters)) for the degrees of freedom the parabolas used):
    drawn from all the budgets' parabolas, or with `wild` each point's own residual with a random sign, so
    a budget whose runs scatter little keeps a small noise (short runs scatter more than long ones). The
    sizes stay those trained: resampling whole runs instead leaves a budget of five sizes with three or four
    distinct ones, whose parabola can put its vertex anywhere."""
    rng = np.random.default_rng(seed)
    fitted, used = points["loss"].copy(), []
    for idx in budget_groups(points):
        log_n = np.log(points["params"][idx])
        if len(np.unique(log_n)) < 3:
            continue
        fitted[idx] = np.polyval(np.polyfit(log_n, points["loss"][idx], 2), log_n)
        used.append(idx)
    if not used:
        return []
    idx = np.concatenate(used)
    resid = (points["loss"] - fitted)[idx] * np.sqrt(len(idx) / (len(idx) - 3 * len(used)))
    samples = []
    for _ in range(bootstrap):
        loss = fitted.copy()
        loss[idx] += resid * rng.choice([-1.0, 1.0], len(idx)) if wild else rng.choice(resid, len(idx))
        fit = approach2({**points, "loss": loss})
        if fit is not None:
            samples.append(fit)
    return samples


def _optimum(flops: float, law_: dict) -> dict:
    n, d = float(n_opt(flops, law_)), float(d_opt(flops, law_))
    return dict(params=n, tokens=d, loss=float(predict_loss(n, d, law_)))


def predict(points: Points, flops: float, a3: tuple[dict, list[dict]], a2: tuple[dict | None, list[dict]],
            seed: int = 0, params: float | None = None, tokens: float | None = None) -> dict:
    """The compute-optimal params, tokens (C = 6 N D) and loss at `flops`, with LEVEL bootstrap intervals.

    approach 3: the law and each bootstrap law at its own optimum. The loss has two intervals: `loss_fit`
    (the law's uncertainty alone) and `loss` (that plus a run's scatter about the law: each bootstrap
    prediction times exp of a residual of the full fit drawn at random), the one a new run should land in.
    With params and tokens, the loss is predicted for that run instead of the optimum.
    approach 2: n_opt = k_n C^a and d_opt = k_d C^b of the IsoFLOP minima, and the minima's loss as a
    power law of C, for the full fit and each bootstrap resample.
    """
    if flops <= 0:
        raise ValueError(f"--predict needs a positive number of FLOPs, got {flops:g}")
    law3, samples3 = a3
    if len(samples3) < 2:
        raise ValueError("a prediction needs --bootstrap >= 2 for its intervals")
    rng = np.random.default_rng(seed)
    at = lambda law_: (_optimum(flops, law_) if params is None else
                       dict(params=params, tokens=tokens, loss=float(predict_loss(params, tokens, law_))))
    best, boot = at(law3), [at(s) for s in samples3]
    resid = np.log(points["loss"]) - np.log(predict_loss(points["params"], points["tokens"], law3))
    scattered = [b["loss"] * np.exp(rng.choice(resid)) for b in boot]
    out = dict(flops=float(flops), level=LEVEL, bootstrap=len(samples3), approach3=dict(
        params=best["params"], params_interval=interval([b["params"] for b in boot]),
        tokens=best["tokens"], tokens_interval=interval([b["tokens"] for b in boot]),
        loss=best["loss"], loss_interval=interval(scattered), loss_fit_interval=interval([b["loss"] for b in boot])))
    law2, samples2 = a2
    if law2 is not None and len(samples2) >= 2:
        def line(fit2: dict) -> dict:
            c = np.array([b["flops"] for b in fit2["budgets"]])
            loss = _loglog_line(c, np.array([b["loss_opt"] for b in fit2["budgets"]]))
            return dict(params=fit2["k_n"] * flops ** fit2["a"], tokens=fit2["k_d"] * flops ** fit2["b"],
                        loss=loss["k"] * flops ** loss["exponent"])
        best2, boot2 = line(law2), [line(s) for s in samples2]
        out["approach2"] = {**{k: float(v) for k, v in best2.items()},
                            **{f"{k}_interval": interval([b[k] for b in boot2]) for k in best2}}
    return out


def describe_prediction(p: dict) -> str:
    pct = f"{100 * p['level']:.0f}%"
    lines = [f"predicted at C = {p['flops']:.3g} FLOPs ({pct} bootstrap intervals, {p['bootstrap']} resamples):"]
    for name, fit_ in (("approach 3", p["approach3"]), ("approach 2", p.get("approach2"))):
        if fit_ is None:
            continue
        row = lambda k, fmt: f"{fit_[k]:{fmt}} [{fit_[k + '_interval'][0]:{fmt}}, {fit_[k + '_interval'][1]:{fmt}}]"
        text = f"  {name}: params {row('params', '.3g')}, tokens {row('tokens', '.3g')}, loss {row('loss', '.4f')}"
        if "loss_fit_interval" in fit_:
            text += f" (the law alone: [{fit_['loss_fit_interval'][0]:.4f}, {fit_['loss_fit_interval'][1]:.4f}])"
        lines.append(text)
    return "\n".join(lines)


def fit_all(points: Points | Sequence[dict[str, Any]], bootstrap: int = 0, seed: int = 0,
            num_starts: int | None = 200, predict_flops: float | None = None, samples: dict | None = None) -> dict:
    """Every fit; with bootstrap, approach 2's exponents get intervals too; with predict_flops, `predict`.
    samples: a dict that receives the bootstrap fits (keys approach3, approach2) for further predictions."""
    points = as_points(points)
    a3 = approach3_samples(points, bootstrap, seed, num_starts)
    a2 = approach2(points)
    samples2 = approach2_samples(points, bootstrap, seed) if bootstrap and a2 is not None else []
    if len(samples2) >= 2:
        a2.update(a_interval=interval([s["a"] for s in samples2]), b_interval=interval([s["b"] for s in samples2]),
                  a_bootstrap_se=float(np.std([s["a"] for s in samples2], ddof=1)), bootstrap=len(samples2))
    if samples is not None:
        samples.update(approach3=a3, approach2=(a2, samples2))
    out = dict(approach3=a3[0], approach2=a2, power_laws=power_laws(points), num_points=len(points["loss"]))
    if predict_flops is not None:
        out["predict"] = predict(points, predict_flops, a3, (a2, samples2), seed)
    return out
