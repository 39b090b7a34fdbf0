"""PNG plots of a scaling sweep and its fits (the dict from fit.fit_all)."""

import os

import numpy as np
from matplotlib import cm, colormaps, colors, ticker
# Figure without pyplot renders PNGs with Agg and touches no global backend or figure state.
from matplotlib.figure import Figure

from llm.scaling import fit

# Beyond this many sizes or budgets, per-curve legends are clutter; a colour bar says as much.
MAX_LEGEND_ENTRIES = 16


def _size_colours(params: np.ndarray) -> tuple[colors.Normalize, colors.Colormap]:
    return colors.LogNorm(params.min(), params.max() * 1.0001), colormaps["viridis"]


def plot_loss_vs_compute(points: fit.Points, result: dict, path: str) -> None:
    norm, cmap = _size_colours(points["params"])
    fig = Figure(figsize=(7, 5))
    ax = fig.subplots()
    sizes = np.unique(points["params"])
    if len(sizes) <= MAX_LEGEND_ENTRIES:
        for n in sizes:
            m = points["params"] == n
            order = np.argsort(points["flops"][m])
            ax.plot(points["flops"][m][order], points["loss"][m][order], "o-", ms=3, lw=1,
                    color=cmap(norm(n)), label=f"N={n:.3g}")
    else:
        sc = ax.scatter(points["flops"], points["loss"], c=points["params"], norm=norm, cmap=cmap, s=8)
        fig.colorbar(sc, ax=ax, label="params N")
    pl = result["power_laws"]
    ax.plot(pl["frontier_flops"], pl["frontier_loss"], "k--", lw=1, label="frontier")
    c = np.geomspace(points["flops"].min(), points["flops"].max(), 100)
    if pl["loss_vs_flops"]:
        f = pl["loss_vs_flops"]
        ax.plot(c, f["E"] + f["A"] / c ** f["alpha"], "k:", lw=1, label=f"L(C) fit, alpha={f['alpha']:.3f}")
    a3 = result["approach3"]
    ax.plot(c, fit.predict_loss(fit.n_opt(c, a3), fit.d_opt(c, a3), a3), "r-", lw=2,
            label=f"approach 3 optimum, a={a3['a']:.3f}")
    ax.set(xscale="log", yscale="log", xlabel="training FLOPs C", ylabel="loss")
    ax.yaxis.set_major_formatter(ticker.ScalarFormatter())
    ax.yaxis.set_minor_formatter(ticker.ScalarFormatter())
    ax.legend(fontsize=6, ncol=2)
    fig.savefig(path, dpi=120, bbox_inches="tight")


def plot_isoflops(result: dict, path: str) -> None:
    budgets = result["approach2"]["budgets"]
    flops = [b["flops"] for b in budgets]
    norm, cmap = colors.LogNorm(min(flops), max(flops) * 1.0001), colormaps["plasma"]
    fig = Figure(figsize=(7, 5))
    ax = fig.subplots()
    for budget in budgets:
        colour = cmap(norm(budget["flops"]))
        n = np.array(budget["params"])
        ax.scatter(n, budget["losses"], color=colour, s=12, label=f"C={budget['flops']:.2g}")
        grid = np.geomspace(min(n.min(), budget["n_opt"]), max(n.max(), budget["n_opt"]), 100)
        ax.plot(grid, np.polyval(budget["coeffs"], np.log(grid)), color=colour, lw=1)
        ax.plot(budget["n_opt"], budget["loss_opt"], "x", color=colour, ms=8)
    ax.set(xscale="log", xlabel="params N", ylabel="loss", title="IsoFLOP profiles (x: fitted minimum)")
    if len(budgets) <= MAX_LEGEND_ENTRIES:
        ax.legend(fontsize=7)
    else:
        fig.colorbar(cm.ScalarMappable(norm, cmap), ax=ax, label="training FLOPs C")
    fig.savefig(path, dpi=120, bbox_inches="tight")


def plot_optimal_allocation(points: fit.Points, result: dict, path: str) -> None:
    a2, a3 = result["approach2"], result["approach3"]
    c = np.geomspace(points["flops"].min(), points["flops"].max(), 100)
    fig = Figure(figsize=(11, 4.5))
    axes = fig.subplots(1, 2)
    panels = ((axes[0], "n", a3["a"], fit.n_opt(c, a3)), (axes[1], "d", a3["b"], fit.d_opt(c, a3)))
    for ax, key, exp3, line3 in panels:
        label = key.upper() + "*"
        if a2:
            flops = np.array([b["flops"] for b in a2["budgets"]])
            exp2 = a2["a" if key == "n" else "b"]
            ax.plot(flops, [b[f"{key}_opt"] for b in a2["budgets"]], "o", label="IsoFLOP minima")
            ax.plot(c, a2[f"k_{key}"] * c**exp2, "-", label=f"approach 2: {label} ~ C^{exp2:.3f}")
        ax.plot(c, line3, "--", label=f"approach 3: {label} ~ C^{exp3:.3f}")
        ax.set(xscale="log", yscale="log", xlabel="training FLOPs C", ylabel=label)
        ax.legend(fontsize=8)
    fig.savefig(path, dpi=120, bbox_inches="tight")


def plot_all(points: fit.Points, fit_result: dict, out_dir: str) -> list[str]:
    points = fit.as_points(points)
    os.makedirs(out_dir, exist_ok=True)
    paths = [os.path.join(out_dir, name) for name in ("loss_vs_compute.png", "optimal_allocation.png")]
    plot_loss_vs_compute(points, fit_result, paths[0])
    plot_optimal_allocation(points, fit_result, paths[1])
    if fit_result["approach2"]:
        paths.append(os.path.join(out_dir, "isoflops.png"))
        plot_isoflops(fit_result, paths[-1])
    return paths
