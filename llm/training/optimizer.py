"""The optimizer from config: AdamW with a decay mask, warmup + schedule, global-norm clipping."""

import jax
import optax

from llm.spec import OptConfig


def learning_rate(c: OptConfig) -> optax.Schedule:
    peak, final = c.learning_rate, c.learning_rate * c.final_lr_ratio
    warmup = optax.linear_schedule(0.0, peak, max(c.warmup_steps, 1))
    rest = max(c.num_train_steps - c.warmup_steps, 1)
    if c.schedule == "cosine":
        after = optax.cosine_decay_schedule(peak, rest, alpha=c.final_lr_ratio)
    elif c.schedule == "linear":
        after = optax.linear_schedule(peak, final, rest)
    elif c.schedule == "constant":
        after = optax.constant_schedule(peak)
    elif c.schedule == "wsd":
        decay = max(int(round(c.decay_fraction * c.num_train_steps)), 1)
        stable = max(rest - decay, 0)
        after = optax.join_schedules([optax.constant_schedule(peak), optax.linear_schedule(peak, final, decay)], [stable])
    else:
        raise ValueError(f"unknown schedule {c.schedule!r}")
    return optax.join_schedules([warmup, after], [c.warmup_steps])


_NO_DECAY = ("scale", "bias")
_EMBEDDINGS = ("embed", "pos_embed")


def decay_mask(params, decay_embeddings: bool):
    """Weight decay on matmul kernels only: never norms or biases, embeddings only if asked."""

    def decays(path, _):
        name = path[-1].key
        return name not in _NO_DECAY and (decay_embeddings or name not in _EMBEDDINGS)

    return jax.tree_util.tree_map_with_path(decays, params)


def make(c: OptConfig) -> optax.GradientTransformation:
    adamw = optax.adamw(
        learning_rate(c), b1=c.b1, b2=c.b2, eps=c.eps, weight_decay=c.weight_decay,
        mask=lambda params: decay_mask(params, c.decay_embeddings),
    )
    if c.clip_norm > 0:
        return optax.chain(optax.clip_by_global_norm(c.clip_norm), adamw)
    return adamw
