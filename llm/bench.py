"""Benchmarks behind `./run.sh bench train|sample`; each returns one dict that the CLI prints as JSON.

bench_train  times the real jitted train step on a synthetic batch: step time, tokens/s, MFU.
bench_sample times the cached sampler against recomputing the whole prefix at every new token.
Neither reads data: random token ids cost nothing to make and keep input loading out of the timing.
"""

import dataclasses
import statistics
import time
from typing import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from llm import model, spec
from llm.data.tokenizer import NUM_SPECIAL, size_without_corpus
from llm.model import ModelConfig, sample
from llm.model.attention import NEG_INF
from llm.spec import RunSpec
from llm.training import sharding, state
from llm.training.metrics import measure_peak_tflops, peak_units


def _tokenizer_vocab(run: RunSpec) -> int:
    return size_without_corpus(run.data.tokenizer, run.data.vocab_size)


def _median_seconds(compiled: Callable, *args, repeats: int = 5, budget_s: float = 30.0) -> float:
    """Median wall time of an already compiled function; fewer repeats when one call is slow."""
    times = []
    while len(times) < repeats and sum(times) < budget_s:
        start = time.perf_counter()
        jax.block_until_ready(compiled(*args))
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def bench_train(cfg: ml_collections.ConfigDict, steps: int = 20, peak_tflops: float = 0.0) -> dict:
    """Times `steps` train steps after 2 warm-up steps of the step the train loop runs (state.setup).

    peak_tflops is per device (per host on CPU); 0 measures a large matmul. mfu = achieved / (peak x peak_units()).
    """
    run = spec.from_config(cfg)
    mesh = sharding.make_mesh(run.mesh.data, run.mesh.fsdp, run.mesh.tensor)
    m = run.model
    sharding.check_divisible(mesh, run.batch_size // run.opt.grad_accum_steps, m.H, m.G, m.F, m.D)
    vocab = _tokenizer_vocab(run)
    run = spec.resolve(run, vocab)  # the vocabulary by training's rule, from the tokenizer's size alone
    mc = run.model
    # state.setup: the state, shardings and jitted step that the train loop runs (an lm objective's).
    built = state.setup(mc, run.opt, mesh, run.mesh.rules)
    train_state = built.init_state(jax.random.key(run.seed))
    p_train_step = built.train_step

    lo, hi = sharding.host_rows(mesh, run.batch_size)
    rng = np.random.default_rng(run.seed)
    target_len = mc.T or run.seq_len
    tokens = rng.integers(NUM_SPECIAL, vocab, (hi - lo, target_len + 1), dtype=np.int32)
    host_batch = {"inputs": tokens[:, :-1], "targets": tokens[:, 1:], "weights": np.ones((hi - lo, target_len), np.float32)}
    if mc.arch == "encoder_decoder":  # the decoder's T tokens above, the encoder's L here
        host_batch["encoder_inputs"] = rng.integers(NUM_SPECIAL, vocab, (hi - lo, run.seq_len), dtype=np.int32)
    batch = sharding.global_batch(host_batch, mesh, run.batch_size)

    start = time.perf_counter()
    compiled = p_train_step.lower(train_state, batch).compile()
    compile_s = time.perf_counter() - start
    for _ in range(2):
        train_state, metrics = compiled(train_state, batch)
    jax.block_until_ready(metrics)
    step_s = []
    for _ in range(steps):
        start = time.perf_counter()
        train_state, metrics = compiled(train_state, batch)
        jax.block_until_ready(metrics)
        step_s.append(time.perf_counter() - start)

    devices = jax.device_count()
    peak = peak_tflops if peak_tflops > 0 else measure_peak_tflops(jnp.dtype(mc.dtype))
    median_s = float(np.median(step_s))
    tokens_per_s = run.tokens_per_step / median_s
    flops_per_token = model.flops_per_token(mc)
    achieved_tflops = flops_per_token * tokens_per_s / 1e12
    return {
        "config": run.name,
        "devices": devices,
        "vocab_size": mc.V,
        "step_ms_median": 1e3 * median_s,
        "step_ms_p90": 1e3 * float(np.percentile(step_s, 90)),
        "tokens_per_s": tokens_per_s,
        "model_flops_per_token": flops_per_token,
        "achieved_tflops": achieved_tflops,
        "peak_tflops": peak,
        "mfu": achieved_tflops / (peak * peak_units()),
        "compile_s": compile_s,
    }


def _recompute_generate(cfg: ModelConfig, prompt_len: int, new_tokens: int, vocab_limit: int) -> Callable:
    """The no-cache baseline: each new token reruns the model over a fixed-size buffer of every token so far."""

    @jax.jit
    def generate(params, prompts_BxP, rng):
        B = prompts_BxP.shape[0]
        buffer_BxT = jnp.zeros((B, prompt_len + new_tokens), jnp.int32).at[:, :prompt_len].set(prompts_BxP)

        def body(i, buffer_BxT):
            logits_BxTxV, _ = model.apply(cfg, params, buffer_BxT)
            # Causal attention: the unfilled tail of the buffer cannot change the logits at prompt_len + i - 1.
            logits_BxV = jax.lax.dynamic_index_in_dim(logits_BxTxV, prompt_len + i - 1, axis=1, keepdims=False)
            logits_BxV = jnp.where(jnp.arange(cfg.V) < vocab_limit, logits_BxV, NEG_INF)  # as the sampler does
            token_B = sample.choose(logits_BxV, jax.random.fold_in(rng, i), 1.0, 0, 1.0)
            return jax.lax.dynamic_update_index_in_dim(buffer_BxT, token_B, prompt_len + i, axis=1)

        return jax.lax.fori_loop(0, new_tokens, body, buffer_BxT)[:, prompt_len:]

    return generate


def bench_sample(cfg: ml_collections.ConfigDict, new_tokens: int = 256, prompt_len: int = 16, batches=(1, 32)) -> dict:
    """Tokens/s of the cached sampler vs the recompute baseline, both sampling at temperature 1.

    The model is the config's with random weights (speed does not depend on them), the vocabulary of
    its tokenizer (87 for char, padded as the config says) and a context of 512, since the default
    seq_len (128) is shorter than a prompt plus 256 new tokens; with rope or sinusoidal positions the
    parameter count is unchanged.
    """
    run = spec.from_config(cfg)
    if run.model.arch != "decoder":
        raise spec.ConfigError(f"bench sample times the decoder's prompt continuation; model.arch={run.model.arch!r} has none")
    context = max(512, prompt_len + new_tokens)
    vocab = _tokenizer_vocab(run)
    mc = dataclasses.replace(spec.resolve(run, vocab).model, L=context)
    params = nn.unbox(jax.jit(lambda rng: model.init(mc, rng))(jax.random.key(0)))
    recompute = _recompute_generate(mc, prompt_len, new_tokens, vocab)
    result = {"config": run.name, "context": context, "prompt_len": prompt_len, "new_tokens": new_tokens}
    for B in batches:
        prompts_BxP = jax.random.randint(jax.random.key(B), (B, prompt_len), NUM_SPECIAL, vocab, jnp.int32)
        # Both sample at temperature 1; eos_id=-1 is never sampled, so every row generates all new_tokens.
        cached_args = (params, prompts_BxP, jnp.zeros((B,), jnp.int32), jax.random.key(1), jnp.float32(1.0),
                       jnp.float32(1.0), jnp.int32(-1), jnp.int32(vocab))
        cached = sample.generate_tokens.lower(*cached_args, cfg=mc, max_new_tokens=new_tokens).compile()
        _, steps = cached(*cached_args)
        assert int(steps) == new_tokens, f"the cached sampler stopped after {int(steps)} of {new_tokens} tokens"
        recompute_args = (params, prompts_BxP, jax.random.key(1))
        recompute_compiled = recompute.lower(*recompute_args).compile()
        cached_s = _median_seconds(cached, *cached_args)
        recompute_s = _median_seconds(recompute_compiled, *recompute_args)
        result[f"tokens_per_s_cached_b{B}"] = B * new_tokens / cached_s
        result[f"tokens_per_s_recompute_b{B}"] = B * new_tokens / recompute_s
        result[f"speedup_batch{B}"] = recompute_s / cached_s
    return result
