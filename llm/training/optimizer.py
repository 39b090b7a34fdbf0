"""The optimizer from config: AdamW (or Muon on the hidden matrices) with a decay mask, warmup +
schedule, global-norm clipping, and the per-parameter learning rates and epsilon of mup/completep
(llm/model/parametrization.py)."""

import math
from typing import Callable

import jax
import jax.numpy as jnp
import optax
from optax.contrib import MuonDimensionNumbers, scale_by_muon

from llm.model import parametrization
from llm.model.parametrization import Parametrization
from llm.spec import OptConfig


def learning_rate(c: OptConfig, peak: float | None = None) -> optax.Schedule:
    """The schedule to `peak` (default opt.learning_rate); Muon's rate follows the same shape to its own peak."""
    peak = c.learning_rate if peak is None else peak
    final = peak * c.final_lr_ratio
    warmup = optax.linear_schedule(0.0, peak, max(c.warmup_steps, 1))
    rest = max(c.num_train_steps - c.warmup_steps, 1)
    if c.schedule == "cosine":
        after = optax.cosine_decay_schedule(peak, rest, alpha=c.final_lr_ratio)
    elif c.schedule == "linear":
        after = optax.linear_schedule(peak, final, rest)
    elif c.schedule == "constant":
        after = optax.constant_schedule(peak)
    elif c.schedule == "wsd":
        stable = cooldown_start(c) - c.warmup_steps
        after = optax.join_schedules([optax.constant_schedule(peak), optax.linear_schedule(peak, final, _decay_steps(c))], [stable])
    else:
        raise ValueError(f"unknown schedule {c.schedule!r}")
    return optax.join_schedules([warmup, after], [c.warmup_steps])


def _decay_steps(c: OptConfig) -> int:
    return max(int(round(c.decay_fraction * c.num_train_steps)), 1)


def cooldown_start(c: OptConfig) -> int:
    """wsd: the steps before the decay begins; up to here the rate is warmup then constant, whatever
    num_train_steps is, so a constant-rate run's checkpoint at this step can start the cooldown
    (llm/scaling/cooldowns.py)."""
    return c.warmup_steps + max(max(c.num_train_steps - c.warmup_steps, 1) - _decay_steps(c), 0)


_NO_DECAY = ("scale", "bias")
_EMBEDDINGS = ("embed", "pos_embed")


def decay_mask(params, decay_embeddings: bool):
    """Weight decay on matmul kernels only: never norms or biases, embeddings only if asked."""

    def decays(path, _):
        name = path[-1].key
        return name not in _NO_DECAY and (decay_embeddings or name not in _EMBEDDINGS)

    return jax.tree_util.tree_map_with_path(decays, params)


def _scale_by_tree(scales: Callable) -> optax.GradientTransformation:
    """Multiplies each update by its own constant: scales(tree) -> a tree of floats like it."""

    def update(updates, state, params=None):
        return jax.tree.map(lambda u, s: u if s == 1.0 else u * jnp.asarray(s, u.dtype), updates, scales(updates)), state

    return optax.GradientTransformation(lambda params: optax.EmptyState(), update)


def _adamw(c: OptConfig, p: Parametrization, schedule: optax.Schedule) -> optax.GradientTransformation:
    mask = lambda params: decay_mask(params, c.decay_embeddings)
    if not (p.mup or p.completep):  # sp: optax's own AdamW, exactly as before mup existed
        return optax.adamw(schedule, b1=c.b1, b2=c.b2, eps=c.eps, weight_decay=c.weight_decay, mask=mask)
    inverse = lambda tree: jax.tree.map(lambda s: 1.0 / s, parametrization.eps_scales(p, tree))
    return optax.chain(
        _scale_by_tree(inverse),  # Adam of (g / s) is Adam of g with epsilon s * eps: a per-parameter epsilon
        optax.scale_by_adam(b1=c.b1, b2=c.b2, eps=c.eps),
        optax.add_decayed_weights(c.weight_decay, mask),
        _scale_by_tree(lambda tree: parametrization.lr_scales(p, tree)),
        optax.scale_by_learning_rate(schedule),
    )


def _in_layers(path) -> bool:
    return any(getattr(k, "key", None) == "blocks" for k in path)  # a scanned stack: axis 0 counts layers


def muon_dims(params):
    """Hidden matrices' (reduction, output) axes for Muon, None elsewhere: q/k/v [D, heads, K] reduce over
    D; attention's out [H, K, D] and the MLP's [D, F] / [F, D] reduce over all but the last axis. A
    scanned stack's layer axis is a batch axis (each layer orthogonalized alone)."""

    def dims(path, x):
        if getattr(path[-1], "key", None) not in parametrization.HIDDEN:
            return None
        first = 1 if _in_layers(path) else 0
        if path[-1].key in ("wq", "wk", "wv"):
            return MuonDimensionNumbers(reduction_axis=(first,), output_axis=tuple(range(first + 1, x.ndim)))
        return MuonDimensionNumbers(reduction_axis=tuple(range(first, x.ndim - 1)), output_axis=(x.ndim - 1,))

    return jax.tree_util.tree_map_with_path(dims, params)


def _muon_shape_scales(tree):
    """sqrt(max(1, fan_out / fan_in)) (Jordan et al.'s): an orthogonalized update then has the spectral
    norm that mup's spectral condition asks of a hidden matrix (Yang, Simon & Bernstein 2023), so Muon's
    rate needs no 1/m under mup."""

    def scale(d: MuonDimensionNumbers, x) -> float:
        fan_in, fan_out = (math.prod(x.shape[a] for a in axes) for axes in (d.reduction_axis, d.output_axis))
        return max(1.0, fan_out / fan_in) ** 0.5

    return jax.tree.map(scale, muon_dims(tree), tree, is_leaf=_is_dims)


def _is_dims(v) -> bool:
    return v is None or isinstance(v, MuonDimensionNumbers)


def _muon(c: OptConfig, p: Parametrization) -> optax.GradientTransformation:
    hidden = optax.chain(
        scale_by_muon(beta=c.muon_momentum, weight_dimension_numbers=muon_dims),
        _scale_by_tree(_muon_shape_scales),
        optax.add_decayed_weights(c.muon_weight_decay),
        optax.scale_by_learning_rate(learning_rate(c, c.muon_learning_rate)),
    )
    labels = lambda params: jax.tree.map(lambda d: "adam" if d is None else "muon", muon_dims(params), is_leaf=_is_dims)
    return optax.partition({"muon": hidden, "adam": _adamw(c, p, learning_rate(c))}, labels)


def make(c: OptConfig, p: Parametrization = Parametrization()) -> optax.GradientTransformation:
    """p: the model's parametrization (its per-parameter learning rates and epsilon; sp: none)."""
    opt = _muon(c, p) if c.optimizer == "muon" else _adamw(c, p, learning_rate(c))
    if c.clip_norm > 0:
        return optax.chain(optax.clip_by_global_norm(c.clip_norm), opt)
    return opt
