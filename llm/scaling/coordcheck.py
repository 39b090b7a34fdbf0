"""`./run.sh coordcheck`: the coordinate check of a parametrization (Tensor Programs V, section 7;
the mup package's coord_check). Each width trains a few steps from the same seed on the config's
corpus, and after every step the RMS of each kind of activation is measured on one fixed batch. Under
mup the RMS does not move with width; under sp the logits' and the sublayers' outputs grow with it once
the weights have been updated.

The width is d_model; the heads keep their number (the head dimension grows, as mup's 1/d_head
attention assumes) and d_ff keeps its ratio to d_model. The learning rate is the config's peak rate,
constant from the first step: a warmup would keep a few steps from moving the weights at all.
"""

import copy
import fnmatch
import os

import jax
import ml_collections
import numpy as np
from matplotlib.figure import Figure

from llm import spec
from llm.inspect import trace as trace_lib
from llm.training import batches as batches_lib, sharding
from llm.training.state import setup_run

KINDS = ("embedding", "attention", "mlp", "residual", "logits")
_NAMES = {"embedding": "block_0/resid_pre_BxLxD", "attention": "block_*/write_attn_BxLxD", "mlp": "block_*/write_mlp_BxLxD",
          "residual": "final_resid_BxLxD"}


def at_width(cfg: ml_collections.ConfigDict, width: int) -> ml_collections.ConfigDict:
    cfg = copy.deepcopy(cfg)
    with cfg.unlocked():
        m = cfg.model
        m.d_ff = m.d_ff * width // m.d_model
        m.d_model = width
        m.scan_layers = False  # the trace names each layer's activations
        cfg.opt.warmup_steps = 0
        cfg.opt.schedule = "constant"
        cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor = 1, 1, 1
    return cfg


def check(cfg: ml_collections.ConfigDict, widths: list[int], steps: int) -> None:
    """Every width's config is valid (heads divide it, rope's head dim is even): one error before anything runs."""
    if len(widths) < 2 or steps < 1:
        raise spec.ConfigError(f"coordcheck needs two or more --widths and --steps >= 1, got {widths} and {steps}")
    for width in widths:
        spec.from_config(at_width(cfg, width))
    if cfg.model.d_ff and any(cfg.model.d_ff * w % cfg.model.d_model for w in widths):
        raise spec.ConfigError(f"model.d_ff={cfg.model.d_ff} does not keep its ratio to d_model={cfg.model.d_model} at every width {widths}")


def _rms(x) -> float:
    x = np.asarray(x, np.float64)
    return float(np.sqrt(np.mean(x * x)))


def _measure(run, params, probe_BxL) -> dict[str, float]:
    logits_BxLxV, cache = trace_lib.trace(run.model, params, probe_BxL, names=list(_NAMES.values()))
    out = {kind: float(np.mean([_rms(v) for k, v in cache.items() if fnmatch.fnmatchcase(k, name)]))
           for kind, name in _NAMES.items() if any(fnmatch.fnmatchcase(k, name) for k in cache)}
    out["logits"] = _rms(logits_BxLxV)
    return out


def measure(cfg: ml_collections.ConfigDict, widths: list[int], steps: int) -> dict[int, list[dict[str, float]]]:
    """{width: [RMS of each kind after 0 (init), 1, ..., steps updates]}."""
    check(cfg, widths, steps)
    tok = batches_lib.build_tokenizer(spec.from_config(at_width(cfg, widths[0])))
    mesh = sharding.make_mesh(1, 1, 1, jax.devices()[:1])
    out = {}
    for width in widths:
        run = spec.resolve(spec.from_config(at_width(cfg, width)), tok)
        built = setup_run(run, mesh)
        state = built.init_state(jax.random.key(run.seed))
        batches = batches_lib.train_batches(run, tok, (0, run.batch_size))
        batch = next(batches)
        probe_BxL = batch["inputs"]
        rows = [_measure(run, state.params, probe_BxL)]
        for _ in range(steps):
            state, _ = built.train_step(state, sharding.global_batch(batch, mesh, run.batch_size))
            rows.append(_measure(run, state.params, probe_BxL))
            batch = next(batches)
        batches.close()
        out[width] = rows
    return out


def slopes(rms: dict[int, list[dict[str, float]]], step: int = -1) -> dict[str, float]:
    """The log-log slope of each kind's RMS against width at `step` (default the last)."""
    widths = np.array(sorted(rms), float)
    kinds = [k for k in KINDS if k in rms[int(widths[0])][step]]
    return {k: float(np.polyfit(np.log(widths), np.log([rms[int(w)][step][k] for w in widths]), 1)[0]) for k in kinds}


def plot(rms: dict[int, list[dict[str, float]]], title: str, path: str) -> None:
    widths = sorted(rms)
    kinds = [k for k in KINDS if k in rms[widths[0]][0]]
    fig = Figure(figsize=(3.2 * len(kinds), 3.2))
    for ax, kind in zip(fig.subplots(1, len(kinds), squeeze=False)[0], kinds):
        for t in range(len(rms[widths[0]])):
            ax.plot(widths, [rms[w][t][kind] for w in widths], "o-", ms=3, lw=1, label=f"t={t}", color=f"C{t % 10}")
        ax.set(xscale="log", yscale="log", title=kind, xlabel="width (d_model)")
    fig.axes[0].set_ylabel("RMS")
    fig.axes[-1].legend(fontsize=7)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def run(cfg: ml_collections.ConfigDict, widths: list[int], steps: int, out: str) -> dict:
    rms = measure(cfg, widths, steps)
    m = cfg.model
    name = m.parametrization + ("+" + m.depth_parametrization if m.depth_parametrization != "none" else "")
    os.makedirs(out, exist_ok=True)
    png = os.path.join(out, f"coordcheck_{name}.png")
    plot(rms, f"{cfg.name}: {name}, base width {cfg.model.base_width}", png)
    return {"parametrization": m.parametrization, "depth_parametrization": m.depth_parametrization, "widths": widths, "steps": steps,
            "slopes": slopes(rms), "rms": {str(w): rows for w, rows in rms.items()}, "plot": png}
