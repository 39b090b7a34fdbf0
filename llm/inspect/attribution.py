"""Gradient and weight-based readings of a model: attribution patching (Nanda 2023; Syed et al. 2023),
direct logit attribution per head and MLP, and the Q-, K- and V-composition of heads (Elhage et al. 2021).

Attribution patching scores every head and position at once with one forward and one backward pass of
the corrupted input: the metric's gradient with respect to an activation times clean - corrupted, the
first-order estimate of what patching that activation in (llm/inspect/patching.py) does.
"""

import jax
import jax.numpy as jnp
import numpy as np

from llm.inspect.patching import HEAD_AXIS, LEAVES, Metric, Site, head_writes, positions_axis, sweep_rows
from llm.inspect.trace import FINAL, apply, nested, trace, traced, unscanned
from llm.model import ModelConfig
from llm.model.parametrization import logit_scale


def attribution_patch(cfg: ModelConfig, params, clean_1xL, corrupted_1xL, metric: Metric, site: Site, what: str) -> dict:
    """The estimated patched-minus-corrupted metric of every row `patching.patch` would run, as a
    layers x (positions | heads | 1) matrix."""
    cfg, params = unscanned(cfg, params)
    rows = sweep_rows(cfg, site, what, np.shape(clean_1xL)[-1])
    layers = list(range(cfg.N)) if site.layer is None else [site.layer]
    names = [f"block_{i}/{LEAVES[site.leaf]}" for i in layers]
    _, clean = trace(cfg, params, clean_1xL, names=names)
    _, corrupted = trace(cfg, params, corrupted_1xL, names=names)
    tokens_1xL = jnp.asarray(corrupted_1xL, jnp.int32)

    def value(deltas, params):
        logits_1xLxV, _ = apply(traced(cfg), params, tokens_1xL, None, None, None, nested(deltas))
        return metric(logits_1xLxV)[0]

    grads = jax.jit(jax.grad(value))({name: jnp.zeros_like(corrupted[name]) for name in names}, params)
    keep = {"layers": None, "positions": positions_axis(site.leaf), "heads": HEAD_AXIS.get(site.leaf)}[what]
    out = []
    for name in names:
        score = np.asarray(grads[name] * (clean[name] - corrupted[name]))[0]  # drop the batch axis
        if site.head is not None:  # the one head asked for, by the leaf's own head axis
            score = np.take(score, [site.head], axis=HEAD_AXIS[site.leaf] - 1)
        out.append(score.sum() if keep is None else score.sum(axis=tuple(a for a in range(score.ndim) if a != keep - 1)))
    return {"metric": metric.name, "at": site.leaf, "what": what, "layers": [f"block_{i}" for i in layers],
            "estimate": np.asarray(out, np.float64).reshape(len(layers), -1).tolist(), "rows": len(rows)}


def _frozen_final_norm(cfg: ModelConfig, params, x_D: np.ndarray):
    """The final norm at one position as a linear map (its scale 1/rms or 1/std frozen at x), and its bias."""
    scale_D = np.asarray(params["final_norm"]["scale"], np.float64)
    x_D = np.asarray(x_D, np.float64)
    if cfg.norm == "rmsnorm":
        r = 1.0 / np.sqrt(np.mean(x_D * x_D) + (cfg.norm_eps or 1e-6))
        return (lambda c_XxD: c_XxD * r * scale_D), np.zeros_like(scale_D)
    r = 1.0 / np.sqrt(np.var(x_D) + (cfg.norm_eps or 1e-5))
    bias_D = np.asarray(params["final_norm"]["bias"], np.float64) if cfg.norm_bias else np.zeros_like(scale_D)
    return (lambda c_XxD: (c_XxD - c_XxD.mean(axis=-1, keepdims=True)) * r * scale_D), bias_D


def direct_logit_attribution(cfg: ModelConfig, params, tokens_1xL, token: int, position: int = -1) -> dict:
    """Each head's and each MLP's direct contribution to `token`'s logit at `position`, through the final
    norm with its scale frozen: with the embedding's and the norm bias's terms they sum to the logit."""
    cfg, params = unscanned(cfg, params)
    names = ["block_0/resid_pre_BxLxD", FINAL] + [f"block_{i}/head_out_BxLxHxK" for i in range(cfg.N)]
    names += [f"block_{i}/write_mlp_BxLxD" for i in range(cfg.N)] if cfg.F else []
    logits_1xLxV, cache = trace(cfg, params, tokens_1xL, names=names)
    out_DxV = params["embed"].T if cfg.tie_embeddings else params["head"]
    u_D = np.asarray(out_DxV[:, token], np.float64) * logit_scale(cfg.parametrization)
    norm, bias_D = _frozen_final_norm(cfg, params, np.asarray(cache[FINAL][0, position]))
    to_logit = lambda c_XxD: norm(np.asarray(c_XxD, np.float64)) @ u_D
    heads = [to_logit(np.asarray(head_writes(cfg, params, cache[f"block_{i}/head_out_BxLxHxK"], i))[0, position]).tolist()
             for i in range(cfg.N)]
    mlps = [float(to_logit(cache[f"block_{i}/write_mlp_BxLxD"][0, position])) if cfg.F else 0.0 for i in range(cfg.N)]
    return {"token": int(token), "position": int(position), "logit": float(logits_1xLxV[0, position, token]),
            "embed": float(to_logit(cache["block_0/resid_pre_BxLxD"][0, position])), "bias": float(bias_D @ u_D),
            "heads": heads, "mlps": mlps}


def _circuits(cfg: ModelConfig, params, layer: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """[H, D, D] each: W_QK = Wq Wk^T, W_OV = Wv Wo and the input side Wv of every head of `layer`, with the
    layer's attention norm scale folded into its input weights (row vectors: x W)."""
    a = params[f"block_{layer}"]["attn"]
    s_Dx1 = np.asarray(params[f"block_{layer}"]["attn_norm"]["scale"], np.float64)[:, None]
    group = cfg.H // cfg.G
    wq_HxDxK = np.moveaxis(s_Dx1[:, :, None] * np.asarray(a["wq"], np.float64), 1, 0)
    wk_HxDxK = np.repeat(np.moveaxis(s_Dx1[:, :, None] * np.asarray(a["wk"], np.float64), 1, 0), group, axis=0)
    wv_HxDxK = np.repeat(np.moveaxis(s_Dx1[:, :, None] * np.asarray(a["wv"], np.float64), 1, 0), group, axis=0)
    qk_HxDxD = wq_HxDxK @ np.swapaxes(wk_HxDxK, 1, 2)
    ov_HxDxD = wv_HxDxK @ np.asarray(a["wo"], np.float64)
    return qk_HxDxD, ov_HxDxD, wv_HxDxK


def composition_scores(cfg: ModelConfig, params, sender_layer: int = 0, receiver_layer: int = 1) -> dict[str, list]:
    """{"q", "k", "v"}: [H sender, H receiver] scores |A B|_F / (|A|_F |B|_F) of the sender's OV circuit
    composed into the receiver's query, key or value side (Elhage et al. 2021); the norms' 1/rms and
    RoPE are left out, as there."""
    cfg, params = unscanned(cfg, params)
    _, ov_A, _ = _circuits(cfg, params, sender_layer)
    qk_B, ov_B, _ = _circuits(cfg, params, receiver_layer)
    fro = lambda m: np.sqrt((m * m).sum(axis=(-2, -1)))
    score = lambda m_HxHxDxD, b_H: fro(m_HxHxDxD) / (fro(ov_A)[:, None] * b_H[None, :])
    q = score(np.einsum("ade,bef->abdf", ov_A, qk_B), fro(qk_B))
    k = score(np.einsum("bde,afe->abdf", qk_B, ov_A), fro(qk_B))
    v = score(np.einsum("ade,bef->abdf", ov_A, ov_B), fro(ov_B))
    return {"q": q.tolist(), "k": k.tolist(), "v": v.tolist()}
