"""The logit lens (nostalgebraist 2020): the final norm and output head applied to the residual
stream after every layer, as if the model stopped there. Layer 0 is the embedding (block_0's
resid_pre); layer i + 1 is block_i's resid_post, so the last layer is the model's own logits."""

import functools
from typing import Iterable

import jax
import jax.numpy as jnp
import numpy as np

from llm import model
from llm.inspect.trace import trace
from llm.training.loss import cross_entropy_sums
from llm.model import ModelConfig


def stream_names(cfg: ModelConfig) -> list[str]:
    return ["block_0/resid_pre_BxLxD"] + [f"block_{i}/resid_post_BxLxD" for i in range(cfg.N)]


def layer_labels(cfg: ModelConfig) -> list[str]:
    return ["embed"] + [f"block_{i}" for i in range(cfg.N)]


def lens_logits(cfg: ModelConfig, params, cache: dict) -> jax.Array:
    """float32 [N + 1, B, L, V] from a trace that kept stream_names(cfg)."""
    x_NxBxLxD = jnp.stack([jnp.asarray(cache[name]) for name in stream_names(cfg)])
    return jax.vmap(lambda x_BxLxD: model.unembed(cfg, params, x_BxLxD))(x_NxBxLxD)


@functools.partial(jax.jit, static_argnums=0)
def _layer_loss_sums(cfg: ModelConfig, params, batch: dict):
    _, cache = trace(cfg, params, batch["inputs"], batch.get("segment_ids"), names=stream_names(cfg), positions_BxL=batch.get("positions"))
    logits_NxBxLxV = lens_logits(cfg, params, cache)
    sums_N = jax.vmap(lambda logits: cross_entropy_sums(logits, batch["targets"], batch["weights"])[0])(logits_NxBxLxV)
    return sums_N, jnp.sum(batch["weights"])


def layer_losses(cfg: ModelConfig, params, batches: Iterable[dict], max_batches: int = 0) -> dict[str, float]:
    """Mean next-token loss of every layer's lens over batches (llm/training/batches.held_out: inputs,
    targets, weights, maybe segment_ids; 0 max_batches: all), summed in float64 on the host as llm/training/evaluate.py does."""
    sums, tokens = np.zeros(cfg.N + 1), 0.0
    for i, batch in enumerate(batches):
        if max_batches and i >= max_batches:
            break
        batch_sums, batch_tokens = jax.device_get(_layer_loss_sums(cfg, params, {k: jnp.asarray(v) for k, v in batch.items()}))
        sums += np.asarray(batch_sums, np.float64)
        tokens += float(batch_tokens)
    if tokens == 0:
        raise ValueError("the batches have no tokens to score")
    return dict(zip(layer_labels(cfg), (sums / tokens).tolist()))


def prompt_lens(cfg: ModelConfig, params, tokens_L, k: int = 5, vocab_limit: int | None = None) -> list[dict]:
    """Per layer: the loss of each of the prompt's next tokens and their mean (over the padded
    vocabulary, as llm/training/evaluate.py scores; None for a single token), and the top-k ids below
    `vocab_limit` after the prompt."""
    tokens_L = np.asarray(tokens_L, np.int32)
    _, cache = trace(cfg, params, tokens_L[None], names=stream_names(cfg))
    logp_NxLxV = np.asarray(jax.nn.log_softmax(lens_logits(cfg, params, cache)[:, 0], axis=-1))
    rows = []
    for label, logp_LxV in zip(layer_labels(cfg), logp_NxLxV):
        losses_L1 = -logp_LxV[np.arange(len(tokens_L) - 1), tokens_L[1:]]
        loss = float(losses_L1.mean()) if len(tokens_L) > 1 else None
        top = np.argsort(-logp_LxV[-1, :vocab_limit], kind="stable")[:k]
        rows.append({"layer": label, "loss": loss, "position_losses": losses_L1.tolist(), "top_ids": top.tolist(),
                     "top_probs": np.exp(logp_LxV[-1][top]).tolist()})
    return rows
