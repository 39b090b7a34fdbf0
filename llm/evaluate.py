"""One deterministic pass over a split: loss (nats/token), perplexity and bits per byte."""

import math
from typing import Iterable

import jax
import numpy as np

from llm import model
from llm.loss import cross_entropy_sums
from llm.model import ModelConfig


def make_eval_step(cfg: ModelConfig):
    def eval_step(params, batch):
        logits_BxLxV, _ = model.apply(cfg, params, batch["inputs"], batch.get("segment_ids"), batch.get("positions"))
        loss_sum, _, num_tokens = cross_entropy_sums(logits_BxLxV, batch["targets"], batch["weights"])
        return loss_sum, num_tokens

    return eval_step


def summarize(loss_sum: float, tokens: int, num_bytes: int) -> dict:
    loss = loss_sum / tokens
    return {
        "tokens": int(tokens),
        "bytes": int(num_bytes),
        "loss": loss,
        "perplexity": math.exp(loss),
        # Written so that tokens == bytes gives exactly loss / ln 2.
        "bits_per_byte": loss / math.log(2) * (tokens / num_bytes),
    }


def evaluate(eval_step, params, batches: Iterable[dict], token_bytes: np.ndarray, put_batch, max_batches: int = 0) -> dict:
    """`eval_step` is the jitted step; `put_batch` turns a host batch into device arrays."""
    loss_sum, tokens, num_bytes = 0.0, 0, 0
    for i, batch in enumerate(batches):
        if max_batches and i >= max_batches:
            break
        batch_loss, batch_tokens = jax.device_get(eval_step(params, put_batch(batch)))
        loss_sum += float(batch_loss)
        tokens += int(round(float(batch_tokens)))
        num_bytes += int(np.sum(token_bytes[batch["targets"]] * (batch["weights"] > 0)))
    if tokens == 0:
        raise ValueError("the evaluation split has no tokens to score")
    return summarize(loss_sum, tokens, num_bytes)
