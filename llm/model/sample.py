"""The sampler: one prefill pass fills the KV cache, then a while_loop decodes one token per step.

Token choice applies, in this order:
  1. top-k (k > 0): keep the k largest logits;
  2. top-p (p < 1): of those, keep the smallest set of most likely tokens whose probability
     (softmax of the untempered logits that top-k kept) reaches p;
  3. temperature: divide the survivors by it and sample; temperature == 0 is greedy (argmax).
Prompts are left-padded so that every row writes its next token to the same cache slot; positions
count from each row's first real token, so a row's padding changes nothing that row computes.

An encoder-decoder's inputs are right-padded (padding is masked out of cross-attention); the prefill
encodes them once and writes every decoder layer's cross-attention keys/values into the cache, and
the decoder starts from bos.
"""

import functools
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import io_callback

from llm.model.attention import NEG_INF, KVCache
from llm.model.transformer import ModelConfig, apply


class SampleError(ValueError):
    pass


def _truncate(logits_BxV: jax.Array, top_k: jax.Array, top_p: jax.Array) -> jax.Array:
    B, V = logits_BxV.shape
    # One descending sort serves both filters; keeping by rank (not by comparing values) means ties
    # can never let more than k tokens, or more than the smallest nucleus, through.
    order_BxV = jnp.argsort(-logits_BxV, axis=-1)
    sorted_BxV = jnp.take_along_axis(logits_BxV, order_BxV, axis=-1)
    in_top_k_1xV = (jnp.arange(V) < top_k)[None] | (top_k <= 0)
    probs_sorted_BxV = jax.nn.softmax(jnp.where(in_top_k_1xV, sorted_BxV, NEG_INF), axis=-1)
    # Mass strictly before each rank (an exclusive cumsum): a token stays iff the more likely ones hold
    # less than top_p, which is exactly the smallest prefix whose mass reaches top_p.
    cumsum_BxV = jnp.cumsum(probs_sorted_BxV, axis=-1)
    before_BxV = jnp.concatenate([jnp.zeros((B, 1), cumsum_BxV.dtype), cumsum_BxV[:, :-1]], axis=-1)
    # top_p == 1 keeps everything even where rounding makes the cumsum reach 1 early.
    keep_sorted_BxV = in_top_k_1xV & ((before_BxV < top_p) | (top_p >= 1))
    keep_BxV = jnp.zeros((B, V), jnp.bool_).at[jnp.arange(B)[:, None], order_BxV].set(keep_sorted_BxV)
    return jnp.where(keep_BxV, logits_BxV, NEG_INF)


def filter_logits(logits_BxV: jax.Array, top_k: int | jax.Array, top_p: float | jax.Array) -> jax.Array:
    """Sets the logits that top-k and then top-p drop to NEG_INF; top_k=0 and top_p=1 keep everything."""
    top_k, top_p = jnp.asarray(top_k, jnp.int32), jnp.asarray(top_p, jnp.float32)
    # The sort costs O(V log V) per step: skip it when neither filter is on.
    active = (top_k > 0) | (top_p < 1)
    return jax.lax.cond(active, _truncate, lambda logits_BxV, *_: logits_BxV, logits_BxV, top_k, top_p)


def choose(logits_BxV: jax.Array, rng: jax.Array, temperature, top_k, top_p) -> jax.Array:
    """The next token of each row (int32 [B])."""
    temperature = jnp.asarray(temperature, jnp.float32)

    def sample(logits_BxV):
        filtered_BxV = filter_logits(logits_BxV, top_k, top_p)
        return jax.random.categorical(rng, filtered_BxV / temperature, axis=-1).astype(jnp.int32)

    def greedy(logits_BxV):
        return jnp.argmax(logits_BxV, axis=-1).astype(jnp.int32)

    return jax.lax.cond(temperature > 0, sample, greedy, logits_BxV)


@functools.partial(jax.jit, static_argnames=("cfg", "max_new_tokens", "stream"))
def generate_tokens(
    params, prompts_BxP, start_B, rng, temperature, top_p, eos_id, vocab_limit, *,
    cfg: ModelConfig, max_new_tokens: int, top_k: int | jax.Array = 0, stream: Callable | None = None,
    encoder_BxE=None, encoder_segment_BxE=None,
):
    """Row b's prompt is prompts_BxP[b, start_B[b]:] (left-padded); an encoder-decoder's input is
    encoder_BxE, real where encoder_segment_BxE is 1.

    Returns (new tokens [B, max_new_tokens], eos_id after a row stops; how many token positions the
    loop filled). A row stops after it emits eos_id; the loop stops once every row has (eos_id=-1: never).
    `stream`, if given, receives each step's tokens [B] on the host, in order.
    """
    B, P = prompts_BxP.shape
    M = max_new_tokens
    # The last new token is never fed back, so the cache needs P + M - 1 slots.
    E = 0 if encoder_BxE is None else encoder_BxE.shape[1]
    cache = KVCache.zeros(cfg.N, B, P + M - 1, cfg.G, cfg.K, jnp.dtype(cfg.dtype), start_B, encoder_len=E)
    encoder = None if encoder_BxE is None else (encoder_BxE, encoder_segment_BxE, None)
    logits_Bx1xV, cache = apply(cfg, params, prompts_BxP, cache=cache, last_only=True, encoder=encoder)
    # Padded vocabulary rows were never trained as targets: never emit them.
    valid_V = jnp.arange(cfg.V) < vocab_limit

    def next_token(logits_BxV, step, done_B):
        logits_BxV = jnp.where(valid_V, logits_BxV.astype(jnp.float32), NEG_INF)
        token_B = choose(logits_BxV, jax.random.fold_in(rng, step), temperature, top_k, top_p)
        return jnp.where(done_B, eos_id, token_B)

    def emit(step, token_B, out_BxM, done_B):
        if stream is not None:
            io_callback(stream, None, token_B, ordered=True)
        return out_BxM.at[:, step].set(token_B), done_B | (token_B == eos_id)

    def cond(carry):
        step, _, _, done_B, _ = carry
        return (step < M) & ~jnp.all(done_B)

    def body(carry):
        step, token_B, out_BxM, done_B, cache = carry
        logits_Bx1xV, cache = apply(cfg, params, token_B[:, None], cache=cache)
        token_B = next_token(logits_Bx1xV[:, 0], step, done_B)
        out_BxM, done_B = emit(step, token_B, out_BxM, done_B)
        return step + 1, token_B, out_BxM, done_B, cache

    first_B = next_token(logits_Bx1xV[:, 0], 0, jnp.zeros((B,), jnp.bool_))
    out_BxM, done_B = emit(0, first_B, jnp.full((B, M), eos_id, jnp.int32), jnp.zeros((B,), jnp.bool_))
    steps, _, out_BxM, _, _ = jax.lax.while_loop(cond, body, (jnp.int32(1), first_B, out_BxM, done_B, cache))
    return out_BxM, steps


def left_pad(prompts: Sequence[Sequence[int]], pad_id: int, width: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """[B, width] tokens with each prompt flush right, and the index of each prompt's first token."""
    width = width or max(len(p) for p in prompts)
    tokens_BxP = np.full((len(prompts), width), pad_id, np.int32)
    start_B = np.zeros(len(prompts), np.int32)
    for b, p in enumerate(prompts):
        tokens_BxP[b, width - len(p) :] = p
        start_B[b] = width - len(p)
    return tokens_BxP, start_B


def check_options(temperature: float, top_k: int, top_p: float, max_new_tokens: int) -> None:
    if not temperature >= 0:  # written so that NaN fails too
        raise SampleError(f"temperature must be >= 0 (0 is greedy), got {temperature}")
    if not 0 < top_p <= 1:
        raise SampleError(f"top_p must be in (0, 1] (1 disables it), got {top_p}")
    if top_k < 0:
        raise SampleError(f"top_k must be >= 0 (0 disables it), got {top_k}")
    if max_new_tokens < 1:
        raise SampleError(f"max_new_tokens must be >= 1, got {max_new_tokens}")


def check_prompts(prompts: Sequence[Sequence[int]], max_new_tokens: int, context: int) -> None:
    if not prompts:
        raise SampleError("no prompts to continue")
    if min(len(p) for p in prompts) == 0:
        raise SampleError("every prompt needs at least one token")
    longest = max(len(p) for p in prompts)
    if longest >= context:
        raise SampleError(
            f"the prompt is {longest} tokens long, but the model's context is {context} tokens "
            f"(a prompt may use at most {context - 1}, leaving room for one new token)"
        )
    if longest + max_new_tokens > context:
        raise SampleError(
            f"a prompt of {longest} tokens plus max_new_tokens={max_new_tokens} exceeds the model's context of "
            f"{context} tokens; ask for at most {context - longest} new tokens"
        )


def check_inputs(inputs: Sequence[Sequence[int]], max_new_tokens: int, cfg: ModelConfig) -> None:
    """An encoder-decoder's: inputs of at most L tokens, answers of at most T."""
    if not inputs:
        raise SampleError("no inputs to answer")
    if max(len(x) for x in inputs) > cfg.L:
        raise SampleError(f"an input is {max(len(x) for x in inputs)} tokens long, but the encoder takes at most {cfg.L}")
    if max_new_tokens > cfg.T:
        raise SampleError(f"max_new_tokens={max_new_tokens} exceeds the decoder's length of {cfg.T} tokens")


def generate_seq2seq(
    cfg: ModelConfig, params, inputs: Sequence[Sequence[int]], *, max_new_tokens: int, bos_id: int, eos_id: int,
    pad_id: int, vocab_limit: int, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
    seed: int = 0, stream: Callable | None = None,
) -> list[list[int]]:
    """An encoder-decoder's answer to each input, up to and including the first eos."""
    check_options(temperature, top_k, top_p, max_new_tokens)
    check_inputs(inputs, max_new_tokens, cfg)
    width = min(-(-max(len(x) for x in inputs) // 16) * 16, cfg.L)  # few compiled shapes, as for prompts
    encoder_BxE = np.full((len(inputs), width), pad_id, np.int32)
    segment_BxE = np.zeros((len(inputs), width), np.int32)
    for b, x in enumerate(inputs):
        encoder_BxE[b, : len(x)], segment_BxE[b, : len(x)] = x, 1
    B = len(inputs)
    out_BxM, _ = generate_tokens(
        params, jnp.full((B, 1), bos_id, jnp.int32), jnp.zeros((B,), jnp.int32), jax.random.key(seed), jnp.float32(temperature),
        jnp.float32(top_p), jnp.int32(eos_id), jnp.int32(vocab_limit), cfg=cfg, max_new_tokens=max_new_tokens,
        top_k=jnp.int32(top_k), stream=stream, encoder_BxE=jnp.asarray(encoder_BxE), encoder_segment_BxE=jnp.asarray(segment_BxE),
    )
    return _until_eos(out_BxM, eos_id)


def _until_eos(out_BxM, eos_id: int) -> list[list[int]]:
    results = []
    for row in np.asarray(out_BxM).tolist():
        results.append(row[: row.index(eos_id) + 1] if eos_id in row else row)
    return results


def check_continues(cfg: ModelConfig) -> None:
    if cfg.arch != "decoder":
        raise SampleError(f"model.arch={cfg.arch!r} does not continue prompts" + (
            ": give it inputs to answer (run.answer, generate_seq2seq, sample --input)" if cfg.arch == "encoder_decoder" else " (a masked-token encoder)"))


def generate(
    cfg: ModelConfig, params, prompts: Sequence[Sequence[int]], *, max_new_tokens: int, eos_id: int,
    pad_id: int, vocab_limit: int, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
    seed: int = 0, stream: Callable | None = None,
) -> list[list[int]]:
    """New tokens for each prompt, up to and including the first eos."""
    check_continues(cfg)
    check_options(temperature, top_k, top_p, max_new_tokens)
    check_prompts(prompts, max_new_tokens, cfg.L)
    longest = max(len(p) for p in prompts)
    # Round the padded width up so that prompts of similar lengths share one compiled sampler.
    width = min(-(-longest // 16) * 16, cfg.L - max_new_tokens)
    tokens_BxP, start_B = left_pad(prompts, pad_id, width)
    out_BxM, _ = generate_tokens(
        params, jnp.asarray(tokens_BxP), jnp.asarray(start_B), jax.random.key(seed), jnp.float32(temperature),
        jnp.float32(top_p), jnp.int32(eos_id), jnp.int32(vocab_limit),
        cfg=cfg, max_new_tokens=max_new_tokens, top_k=jnp.int32(top_k), stream=stream,
    )
    return _until_eos(out_BxM, eos_id)
