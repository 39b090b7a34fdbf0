"""The sampler: one prefill pass fills the KV cache, then a while_loop decodes a token per step.

Token choice, in this order: top-k keeps the k largest logits; top-p keeps the smallest set of the
remaining tokens whose probability (softmax of the untempered logits) reaches p; the survivors are
divided by the temperature and sampled. temperature == 0 is greedy (argmax).
"""

import functools
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import io_callback

from llm import model
from llm.attention import NEG_INF, KVCache
from llm.model import ModelConfig


class SampleError(ValueError):
    pass


def filter_logits(logits_BxV: jax.Array, top_k: int, top_p: jax.Array) -> jax.Array:
    if top_k:
        kth_B1 = jax.lax.top_k(logits_BxV, top_k)[0][:, -1:]
        logits_BxV = jnp.where(logits_BxV < kth_B1, NEG_INF, logits_BxV)
    probs_BxV = jax.nn.softmax(logits_BxV, axis=-1)
    sorted_BxV = jnp.sort(probs_BxV, axis=-1)[:, ::-1]
    # A token stays if the tokens more likely than it hold less than top_p of the mass.
    keep_BxV = (jnp.cumsum(sorted_BxV, axis=-1) - sorted_BxV) < top_p
    threshold_B1 = jnp.min(jnp.where(keep_BxV, sorted_BxV, jnp.inf), axis=-1, keepdims=True)
    return jnp.where(probs_BxV < threshold_B1, NEG_INF, logits_BxV)


def choose(logits_BxV, rng, temperature, top_k: int, top_p) -> jax.Array:
    filtered_BxV = filter_logits(logits_BxV, top_k, top_p)
    sampled_B = jax.random.categorical(rng, filtered_BxV / jnp.maximum(temperature, 1e-6), axis=-1)
    return jnp.where(temperature > 0, sampled_B, jnp.argmax(logits_BxV, axis=-1)).astype(jnp.int32)


@functools.partial(jax.jit, static_argnames=("cfg", "max_new_tokens", "top_k", "stream"))
def generate_tokens(
    params, prompts_BxP, start_B, rng, temperature, top_p, eos_id, vocab_limit, *,
    cfg: ModelConfig, max_new_tokens: int, top_k: int = 0, stream: Callable | None = None,
):
    """Prompts are left-padded: row b's prompt occupies prompts_BxP[b, start_B[b]:]."""
    B, P = prompts_BxP.shape
    cache = KVCache.zeros(cfg.N, B, P + max_new_tokens, cfg.G, cfg.K, jnp.dtype(cfg.dtype), start_B)
    logits_BxPxV, cache = model.apply(cfg, params, prompts_BxP, cache=cache)
    valid_V = jnp.arange(cfg.V) < vocab_limit

    def next_token(logits_BxV, step):
        logits_BxV = jnp.where(valid_V, logits_BxV, NEG_INF)
        return choose(logits_BxV, jax.random.fold_in(rng, step), temperature, top_k, top_p)

    def cond(carry):
        step, _, _, done_B, _ = carry
        return (step < max_new_tokens) & ~jnp.all(done_B)

    def body(carry):
        step, token_B, out_BxM, done_B, cache = carry
        out_BxM = out_BxM.at[:, step].set(token_B)
        if stream is not None:
            io_callback(stream, None, token_B, ordered=True)
        done_B = done_B | (token_B == eos_id)
        logits_Bx1xV, cache = model.apply(cfg, params, token_B[:, None], cache=cache)
        token_B = jnp.where(done_B, eos_id, next_token(logits_Bx1xV[:, 0], step + 1))
        return step + 1, token_B, out_BxM, done_B, cache

    first_B = next_token(logits_BxPxV[:, -1], 0)
    out_BxM = jnp.full((B, max_new_tokens), eos_id, jnp.int32)
    carry = (jnp.int32(0), first_B, out_BxM, jnp.zeros((B,), jnp.bool_), cache)
    steps, _, out_BxM, _, _ = jax.lax.while_loop(cond, body, carry)
    return out_BxM, steps


def left_pad(prompts: Sequence[Sequence[int]], pad_id: int) -> tuple[np.ndarray, np.ndarray]:
    width = max(len(p) for p in prompts)
    tokens_BxP = np.full((len(prompts), width), pad_id, np.int32)
    start_B = np.zeros(len(prompts), np.int32)
    for b, p in enumerate(prompts):
        tokens_BxP[b, width - len(p) :] = p
        start_B[b] = width - len(p)
    return tokens_BxP, start_B


def check_options(temperature: float, top_k: int, top_p: float, max_new_tokens: int) -> None:
    if temperature < 0:
        raise SampleError(f"temperature must be >= 0 (0 is greedy), got {temperature}")
    if not 0 < top_p <= 1:
        raise SampleError(f"top_p must be in (0, 1], got {top_p}")
    if top_k < 0:
        raise SampleError(f"top_k must be >= 0 (0 disables it), got {top_k}")
    if max_new_tokens < 1:
        raise SampleError(f"max_new_tokens must be >= 1, got {max_new_tokens}")


def generate(
    cfg: ModelConfig, params, prompts: Sequence[Sequence[int]], *, max_new_tokens: int, eos_id: int,
    pad_id: int, vocab_limit: int, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
    seed: int = 0, stream: Callable | None = None,
) -> list[list[int]]:
    """New tokens for each prompt, cut after the first eos."""
    check_options(temperature, top_k, top_p, max_new_tokens)
    longest = max(len(p) for p in prompts)
    if min(len(p) for p in prompts) == 0:
        raise SampleError("every prompt needs at least one token")
    if longest + max_new_tokens > cfg.L:
        raise SampleError(
            f"a prompt of {longest} tokens plus max_new_tokens={max_new_tokens} exceeds the model's context of "
            f"{cfg.L} tokens"
        )
    tokens_BxP, start_B = left_pad(prompts, pad_id)
    out_BxM, _ = generate_tokens(
        params, jnp.asarray(tokens_BxP), jnp.asarray(start_B), jax.random.key(seed), jnp.float32(temperature),
        jnp.float32(top_p), jnp.int32(eos_id), jnp.int32(vocab_limit),
        cfg=cfg, max_new_tokens=max_new_tokens, top_k=min(top_k, cfg.V), stream=stream,
    )
    results = []
    for row in np.asarray(out_BxM).tolist():
        results.append(row[: row.index(eos_id) + 1] if eos_id in row else row)
    return results
