"""Next-token cross-entropy in float32, summed (not averaged) so callers can normalise per token."""

import jax
import jax.numpy as jnp


def cross_entropy_sums(logits_BxLxV, targets_BxL, weights_BxL, z_loss: float = 0.0):
    """Returns (sum of token losses, sum of z-loss terms, number of weighted tokens)."""
    logits_BxLxV = logits_BxLxV.astype(jnp.float32)
    lse_BxL = jax.nn.logsumexp(logits_BxLxV, axis=-1)
    target_logit_BxL = jnp.take_along_axis(logits_BxLxV, targets_BxL[..., None], axis=-1)[..., 0]
    loss_sum = jnp.sum((lse_BxL - target_logit_BxL) * weights_BxL)
    # PaLM's z-loss keeps log Z near 0 so the softmax stays well conditioned in low precision.
    z_sum = z_loss * jnp.sum(jnp.square(lse_BxL) * weights_BxL)
    return loss_sum, z_sum, jnp.sum(weights_BxL)
