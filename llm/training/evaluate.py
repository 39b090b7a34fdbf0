"""One deterministic pass over a split: loss (nats/token), perplexity and bits per byte.

Batches come from llm/data's eval batches: every token after the first is a target exactly once, in
order, and the padding of the last partial row weighs 0. bits_per_byte divides the summed loss by
the UTF-8 bytes of the scored targets, so runs with different tokenizers compare.
"""

import collections
import math
from typing import Callable, Iterable

import jax
import numpy as np

from llm import model
from llm.model import ModelConfig
from llm.training.loss import cross_entropy_sums


def make_eval_step(cfg: ModelConfig) -> Callable:
    """(params, batch) -> (summed loss in nats, number of scored tokens); jit it with the caller's shardings."""

    def eval_step(params, batch):
        logits_BxLxV = model.forward(cfg, params, batch)
        loss_sum, _, num_tokens = cross_entropy_sums(logits_BxLxV, batch["targets"], batch["weights"])
        return loss_sum, num_tokens

    return eval_step


def summarize(loss_sum: float, tokens: int, num_bytes: int) -> dict:
    loss = loss_sum / tokens
    return {
        "tokens": int(tokens),
        "bytes": int(num_bytes),
        "loss": loss,
        "perplexity": math.exp(loss) if loss < 700 else math.inf,  # exp overflows a double past ~709
        # loss * tokens / (bytes * ln 2), written so that tokens == bytes gives exactly loss / ln 2.
        "bits_per_byte": loss / math.log(2) * (tokens / num_bytes),
    }


def pooled(results: list[dict]) -> dict:
    """One summary of several passes (a mixture's domains): their summed losses over their summed tokens."""
    return summarize(sum(r["loss"] * r["tokens"] for r in results), sum(r["tokens"] for r in results), sum(r["bytes"] for r in results))


def by_domain(results: dict[str, dict]) -> dict:
    """A mixture's per-domain passes as the pooled eval metrics plus eval_loss_D and eval_bits_per_byte_D per domain."""
    pool = pooled(list(results.values()))
    out = {"eval_loss": pool["loss"], "eval_perplexity": pool["perplexity"], "eval_bits_per_byte": pool["bits_per_byte"]}
    for name, r in results.items():
        out[f"eval_loss_{name}"], out[f"eval_bits_per_byte_{name}"] = r["loss"], r["bits_per_byte"]
    return out


# XLA:CPU runs each split CPU device's launches on a pool of max(cores, devices) threads, and a launch
# made while 32 computations are already queued on its device parks one of those threads on a
# semaphore. With 2 devices on 2 cores that leaves no thread for the second half of the running
# step's all-reduce: a deadlock that XLA reports as a rendezvous timeout and aborts on
# (experiments/reliability/README.md). Keeping a few steps in flight never reaches the semaphore
# and still overlaps the host's batch preparation with the device's work.
MAX_IN_FLIGHT = 4


def byte_table(token_bytes: np.ndarray, V: int) -> np.ndarray:
    """token_bytes over the model's whole vocabulary: ids past the tokenizer's (the chat template's
    role markers) count as one byte, like the other special tokens."""
    return np.concatenate([token_bytes, np.ones(max(V - len(token_bytes), 0), token_bytes.dtype)])


def evaluate(
    eval_step: Callable, params, batches: Iterable[dict], token_bytes: np.ndarray, put_batch: Callable,
    max_batches: int = 0,
) -> dict:
    """`eval_step` is the jitted step; `put_batch` turns a host batch into device arrays; 0 batches: all."""
    in_flight: collections.deque = collections.deque()
    # Summed in float64 on the host in batch order: the same split gives the same numbers every time.
    loss_sum, tokens, num_bytes = 0.0, 0, 0

    def read_oldest():
        nonlocal loss_sum, tokens
        batch_loss, batch_tokens = jax.device_get(in_flight.popleft())
        loss_sum += float(batch_loss)
        tokens += int(round(float(batch_tokens)))

    for i, batch in enumerate(batches):
        if max_batches and i >= max_batches:
            break
        in_flight.append(eval_step(params, put_batch(batch)))
        num_bytes += int(np.sum(token_bytes[batch["targets"]] * (batch["weights"] > 0)))
        if len(in_flight) > MAX_IN_FLIGHT:
            read_oldest()
    while in_flight:
        read_oldest()
    if tokens == 0:
        raise ValueError("the evaluation split has no tokens to score")
    return summarize(loss_sum, tokens, num_bytes)
