"""Activation patching and path patching (Vig et al. 2020; Meng et al. 2022; Wang et al. 2022).

The corrupted input runs with one activation (a whole layer's, one position's, one head's) taken from
the clean run; the metric at the last position says how much of the clean answer comes back. Path
patching carries one sender head's clean output into one receiver head's query, key or value only.
Both inputs have the same length, so positions line up. Every sweep is batched: one row per patch.

A site is written `[block_I/]LEAF[:H]`: LEAF one of LEAVES, I a layer, H a head (of a leaf with heads;
for k and v a key/value head).
"""

import dataclasses
import re

import jax
import jax.numpy as jnp
import numpy as np

from llm.inspect import InspectError
from llm.inspect.trace import trace, unscanned
from llm.model import ModelConfig
from llm.model.parametrization import residual_scale

LEAVES = {"resid_pre": "resid_pre_BxLxD", "resid_mid": "resid_mid_BxLxD", "resid_post": "resid_post_BxLxD",
          "write_attn": "write_attn_BxLxD", "write_mlp": "write_mlp_BxLxD", "mlp_hidden": "mlp_hidden_BxLxF",
          "q": "q_BxLxHxK", "k": "k_BxLxGxK", "v": "v_BxLxGxK", "attn_probs": "attn_probs_BxHxLxS", "head_out": "head_out_BxLxHxK"}
HEAD_AXIS = {"q": 2, "k": 2, "v": 2, "head_out": 2, "attn_probs": 1}  # the rest have none
WHAT = ("layers", "positions", "heads")
CHUNK = 64  # patched rows per forward pass


@dataclasses.dataclass(frozen=True)
class Site:
    leaf: str  # a key of LEAVES
    layer: int | None = None  # None: every layer
    head: int | None = None  # None: every head


@dataclasses.dataclass(frozen=True)
class Metric:
    """At the last position: logit(token) - logit(against), or without `against` the loss of `token`."""
    token: int
    against: int | None = None

    @property
    def name(self) -> str:
        return "loss" if self.against is None else "logit_diff"

    def __call__(self, logits_BxLxV: jax.Array) -> jax.Array:
        last_BxV = logits_BxLxV[:, -1].astype(jnp.float32)
        if self.against is None:
            return -jax.nn.log_softmax(last_BxV, axis=-1)[:, self.token]
        return last_BxV[:, self.token] - last_BxV[:, self.against]


def heads_of(cfg: ModelConfig, leaf: str) -> int:
    return cfg.G if leaf in ("k", "v") else cfg.H


def parse_site(cfg: ModelConfig, at: str) -> Site:
    match = re.fullmatch(r"(?:block_(\d+)/)?([a-z_]+)(?::(\d+))?", at)
    if not match or match.group(2) not in LEAVES:
        raise InspectError(f"--at={at!r} is not [block_I/]LEAF[:HEAD] with LEAF one of {', '.join(LEAVES)}")
    layer, leaf, head = (None if match.group(1) is None else int(match.group(1))), match.group(2), match.group(3)
    if layer is not None and layer >= cfg.N:
        raise InspectError(f"--at={at!r}: the layer must lie in 0..{cfg.N - 1}")
    if leaf in ("mlp_hidden", "write_mlp") and not cfg.F:
        raise InspectError(f"--at={at!r}: this model is attention-only (model.d_ff=0): it has no MLP")
    if head is not None:
        if leaf not in HEAD_AXIS:
            raise InspectError(f"--at={at!r}: {leaf} has no heads to pick (those that do: {', '.join(HEAD_AXIS)})")
        if int(head) >= heads_of(cfg, leaf):
            raise InspectError(f"--at={at!r}: the head must lie in 0..{heads_of(cfg, leaf) - 1}")
    return Site(leaf, layer, None if head is None else int(head))


def positions_axis(leaf: str) -> int:
    return 2 if leaf == "attn_probs" else 1  # attn_probs: the query position


def sweep_rows(cfg: ModelConfig, site: Site, what: str, L: int) -> list[tuple[int, dict]]:
    """One (layer, {axis: index}) per patched row, in the order the result's matrix reads."""
    if what not in WHAT:
        raise InspectError(f"--what must be one of {', '.join(WHAT)}, not {what!r}")
    if what == "heads" and site.leaf not in HEAD_AXIS:
        raise InspectError(f"--what=heads patches an activation with heads ({', '.join(HEAD_AXIS)}), not {site.leaf}")
    layers = range(cfg.N) if site.layer is None else [site.layer]
    fixed = {} if site.head is None else {HEAD_AXIS[site.leaf]: site.head}
    if what == "layers":
        return [(i, fixed) for i in layers]
    if what == "positions":
        return [(i, {**fixed, positions_axis(site.leaf): p}) for i in layers for p in range(L)]
    heads = range(heads_of(cfg, site.leaf)) if site.head is None else [site.head]
    return [(i, {HEAD_AXIS[site.leaf]: h}) for i in layers for h in heads]


def _where(shape: tuple[int, ...], rows: list[tuple[int, dict]], layer: int) -> np.ndarray:
    """bool [R, 1 or the axis' size, ...]: which entries of the rows' activation at `layer` are patched."""
    axes = sorted({a for _, sel in rows for a in sel})
    where = np.zeros((len(rows), *[shape[a] if a in axes else 1 for a in range(1, len(shape))]), bool)
    for r, (i, sel) in enumerate(rows):
        if i == layer:
            where[(r, *[sel.get(a, slice(None)) if a in axes else 0 for a in range(1, len(shape))])] = True
    return where


def patched_metrics(cfg: ModelConfig, params, metric: Metric, corrupted_1xL, clean_cache: dict, leaf: str,
                    rows: list[tuple[int, dict]]) -> np.ndarray:
    """[len(rows)]: the metric of the corrupted run with each row's part of `leaf` from the clean cache."""
    out = []
    for first in range(0, len(rows), CHUNK):
        chunk = rows[first : first + CHUNK]
        chunk += [(-1, {})] * (min(CHUNK, len(rows)) - len(chunk))  # one shape, one compile
        interventions = {}
        for layer in sorted({i for i, _ in chunk if i >= 0}):
            name = f"block_{layer}/{LEAVES[leaf]}"
            interventions[name] = (jnp.asarray(_where(clean_cache[name].shape, chunk, layer)), clean_cache[name])
        tokens_RxL = np.repeat(np.asarray(corrupted_1xL), len(chunk), axis=0)
        logits_RxLxV, _ = trace(cfg, params, tokens_RxL, names=[], interventions=interventions)
        out.append(np.asarray(metric(logits_RxLxV))[: len(rows) - first])
    return np.concatenate(out)


def patch(cfg: ModelConfig, params, clean_1xL, corrupted_1xL, metric: Metric, site: Site, what: str) -> dict:
    """The sweep's metrics as a matrix (layers x positions / heads; a column for `layers`), raw and as the
    fraction of the clean-minus-corrupted gap restored."""
    if np.shape(clean_1xL) != np.shape(corrupted_1xL):
        raise InspectError(f"the clean and corrupted inputs must have the same length in tokens, not {np.shape(clean_1xL)[-1]} "
                           f"and {np.shape(corrupted_1xL)[-1]}")
    L = np.shape(clean_1xL)[-1]
    rows = sweep_rows(cfg, site, what, L)
    layers = list(range(cfg.N)) if site.layer is None else [site.layer]
    clean_logits, clean_cache = trace(cfg, params, clean_1xL, names=[f"block_{i}/{LEAVES[site.leaf]}" for i in layers])
    corrupted_logits, _ = trace(cfg, params, corrupted_1xL, names=[])
    clean, corrupted = float(metric(clean_logits)[0]), float(metric(corrupted_logits)[0])
    values = patched_metrics(cfg, params, metric, corrupted_1xL, clean_cache, site.leaf, rows).reshape(len(layers), -1)
    gap = clean - corrupted
    return {"metric": metric.name, "clean": clean, "corrupted": corrupted, "at": site.leaf, "what": what,
            "layers": [f"block_{i}" for i in layers], "patched": values.tolist(),
            "restored": ((values - corrupted) / gap).tolist() if gap else None}


def head_writes(cfg: ModelConfig, params, head_out_BxLxHxK, layer: int) -> jax.Array:
    """[B, L, H, D]: what each head of `layer` adds to the residual stream (head_out @ wo[h], times
    completep's branch multiplier)."""
    wo_HxKxD = params[f"block_{layer}"]["attn"]["wo"]
    return jnp.einsum("blhk,hkd->blhd", jnp.asarray(head_out_BxLxHxK, jnp.float32), wo_HxKxD.astype(jnp.float32)) * residual_scale(
        cfg.parametrization)


def path_patch(cfg: ModelConfig, params, clean_1xL, corrupted_1xL, metric: Metric, sender: tuple[int, int],
               receiver: tuple[int, int], via: str) -> dict:
    """The corrupted run with only the receiver head's `via` input (q, k or v) computed from a residual
    stream in which the sender head's direct write is the clean run's: the edge sender -> receiver.via."""
    cfg, params = unscanned(cfg, params)
    (s_layer, s_head), (r_layer, r_head) = sender, receiver
    if via not in ("q", "k", "v"):
        raise InspectError(f"path patching goes into a head's q, k or v, not {via!r}")
    if not (0 <= s_layer < r_layer < cfg.N and 0 <= s_head < cfg.H and 0 <= r_head < cfg.H):
        raise InspectError(f"path patching needs a sender head before its receiver: layers 0 <= {s_layer} < {r_layer} < {cfg.N}, "
                           f"heads below {cfg.H}")
    heads_name, resid_name = f"block_{s_layer}/head_out_BxLxHxK", f"block_{r_layer}/resid_pre_BxLxD"
    clean_logits, clean = trace(cfg, params, clean_1xL, names=[heads_name])
    corrupted_logits, corrupted = trace(cfg, params, corrupted_1xL, names=[heads_name, resid_name])
    swap_BxLxD = (head_writes(cfg, params, clean[heads_name], s_layer) - head_writes(cfg, params, corrupted[heads_name], s_layer))[:, :, s_head]
    into = f"block_{r_layer}/{LEAVES[via]}"
    _, receiving = trace(cfg, params, corrupted_1xL, names=[into],
                         interventions={resid_name: (jnp.ones((), bool), corrupted[resid_name] + swap_BxLxD)})
    head = r_head if via == "q" else r_head // (cfg.H // cfg.G)
    where = np.zeros((1, 1, heads_of(cfg, via), 1), bool)
    where[0, 0, head] = True
    logits, _ = trace(cfg, params, corrupted_1xL, names=[], interventions={into: (jnp.asarray(where), receiving[into])})
    c, r, p = float(metric(clean_logits)[0]), float(metric(corrupted_logits)[0]), float(metric(logits)[0])
    return {"metric": metric.name, "clean": c, "corrupted": r, "patched": p, "restored": (p - r) / (c - r) if c != r else None,
            "sender": f"block_{s_layer}:{s_head}", "receiver": f"block_{r_layer}:{r_head}", "via": via}
