"""Interventions by name: zero- or mean-ablate heads and MLP neurons, patch any activation from
another input, and the loss / logit change they cause against the clean run.

All three become (where, value) pairs on an activation (llm/model/tap.py): a head is ablated on
head_out_BxLxHxK (its value mix before wo, so its write into the residual stream goes with it), a
neuron on mlp_hidden_BxLxF.
"""

import re

import jax
import jax.numpy as jnp
import numpy as np

from llm.inspect import InspectError
from llm.inspect.trace import select, trace
from llm.model import ModelConfig

_TARGET = {"heads": ("head_out_BxLxHxK", 2), "neurons": ("mlp_hidden_BxLxF", 2)}  # activation, axis of the unit


def _units(cfg: ModelConfig, key: str, units) -> tuple[int, str, np.ndarray]:
    match = re.fullmatch(r"block_(\d+)/(heads|neurons)", key)
    if not match or int(match.group(1)) >= cfg.N:
        raise InspectError(f"ablate key {key!r} is not block_I/heads or block_I/neurons with I < {cfg.N}")
    layer, kind = int(match.group(1)), match.group(2)
    if kind == "neurons" and not cfg.F:
        raise InspectError(f"{key}: this model is attention-only (model.d_ff=0): it has no MLP neurons to ablate")
    size = cfg.H if kind == "heads" else cfg.F
    units = np.asarray(sorted(set(int(u) for u in units)), np.int64)
    if units.size and (units.min() < 0 or units.max() >= size):
        raise InspectError(f"{key}: units must lie in 0..{size - 1}, got {units.tolist()}")
    return layer, kind, units


def means(cfg: ModelConfig, params, tokens_BxL, segment_ids_BxL=None) -> dict[str, jax.Array]:
    """Every head's output [H, K] and every neuron's activation [F] averaged over a batch: mean-ablation values."""
    names = ["block_*/head_out_BxLxHxK"] + (["block_*/mlp_hidden_BxLxF"] if cfg.F else [])
    _, cache = trace(cfg, params, tokens_BxL, segment_ids_BxL, names=names)
    return {name: x.mean(axis=(0, 1)) for name, x in cache.items()}


def ablation(cfg: ModelConfig, ablate: dict[str, list[int]], mean_values: dict[str, jax.Array] | None = None) -> dict[str, tuple]:
    """{"block_0/heads": [1, 3], "block_1/neurons": [5]} -> interventions: 0, or the mean where given."""
    out = {}
    for key, units in ablate.items():
        layer, kind, units = _units(cfg, key, units)
        name = f"block_{layer}/{_TARGET[kind][0]}"
        size = cfg.H if kind == "heads" else cfg.F
        where = np.zeros(size, bool)
        where[units] = True
        where = where[:, None] if kind == "heads" else where  # [H, 1] broadcasts over K, [F] is last
        value = jnp.zeros((), jnp.float32) if mean_values is None else mean_values[name]
        out[name] = (jnp.asarray(where), value)
    return out


def patching(cfg: ModelConfig, patch: dict[str, jax.Array]) -> dict[str, tuple]:
    """{name: activation from another run} -> interventions that replace that activation everywhere."""
    for name in patch:
        if select(cfg, name) != (name,):
            raise InspectError(f"patch takes exact activation names, not {name!r}")
    return {name: (jnp.ones((), bool), jnp.asarray(value)) for name, value in patch.items()}


def _loss_BxL(logits_BxLxV, tokens_BxL) -> jax.Array:
    """Next-token loss at positions 0..L-2 (the last has no target)."""
    logp_BxLxV = jax.nn.log_softmax(logits_BxLxV[:, :-1].astype(jnp.float32), axis=-1)
    return -jnp.take_along_axis(logp_BxLxV, jnp.asarray(tokens_BxL)[:, 1:, None], axis=-1)[..., 0]


def effect(cfg: ModelConfig, params, tokens_BxL, interventions: dict[str, tuple], segment_ids_BxL=None) -> dict:
    """Mean next-token loss with and without the interventions, and how far the logits moved."""
    clean_BxLxV, _ = trace(cfg, params, tokens_BxL, segment_ids_BxL, names=[])
    changed_BxLxV, _ = trace(cfg, params, tokens_BxL, segment_ids_BxL, names=[], interventions=interventions)
    clean, changed = float(_loss_BxL(clean_BxLxV, tokens_BxL).mean()), float(_loss_BxL(changed_BxLxV, tokens_BxL).mean())
    diff = jnp.abs(changed_BxLxV - clean_BxLxV)
    return {"loss_clean": clean, "loss": changed, "loss_change": changed - clean,
            "max_abs_logit_change": float(diff.max()), "mean_abs_logit_change": float(diff.mean())}
