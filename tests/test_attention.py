"""One attention dispatch: every implementation gives the plain reference's outputs and gradients on
packed documents, left-padded prompts and cached decoding, none lets attention cross a document
boundary, and `cudnn` where it cannot run is refused before anything is compiled."""

import dataclasses
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import cli_overrides, run_cli

from llm import model
from llm.model import ModelConfig, attention, sample
from llm.model.attention import KVCache, Mask

ON_GPU = jax.default_backend() == "gpu"
IMPLEMENTATIONS = ["xla", "dot_product", pytest.param("cudnn", marks=pytest.mark.skipif(
    not ON_GPU, reason="cuDNN attention needs an NVIDIA GPU; on CPU the dispatch refuses it (tested below)"))]
# cuDNN computes in bfloat16, so its comparison is to bfloat16 precision.
TOLERANCE = {"xla": 1e-5, "dot_product": 1e-5, "cudnn": 2e-2}


def reference(q_BxLxHxK, k_BxSxGxK, v_BxSxGxK, visible_BxLxS):
    """Attention as written in the paper, one query at a time, with the mask given by its definition."""
    B, L, H, K = q_BxLxHxK.shape
    k_BxSxHxK = jnp.repeat(k_BxSxGxK, H // k_BxSxGxK.shape[2], axis=2).astype(jnp.float32)
    v_BxSxHxK = jnp.repeat(v_BxSxGxK, H // v_BxSxGxK.shape[2], axis=2).astype(jnp.float32)
    scores_BxHxLxS = jnp.einsum("blhk,bshk->bhls", q_BxLxHxK.astype(jnp.float32), k_BxSxHxK) / np.sqrt(K)
    scores_BxHxLxS = jnp.where(visible_BxLxS[:, None], scores_BxHxLxS, -1e9)  # finite: a padding query stays finite
    return jnp.einsum("bhls,bshk->blhk", jax.nn.softmax(scores_BxHxLxS, axis=-1), v_BxSxHxK)


def packed_segments() -> np.ndarray:
    """Two rows of 16: documents of 5, 7 and 3 tokens plus one padding slot; then 9 and 7 tokens."""
    return np.array([[1] * 5 + [2] * 7 + [3] * 3 + [0], [1] * 9 + [2] * 7], np.int32)


def visible_by_definition(segments_BxL: np.ndarray) -> np.ndarray:
    B, L = segments_BxL.shape
    visible = np.zeros((B, L, L), bool)
    for b in range(B):
        for i in range(L):
            for j in range(i + 1):
                visible[b, i, j] = segments_BxL[b, i] == segments_BxL[b, j] != 0
    return visible


def qkv(B=2, L=16, H=4, G=2, K=8, dtype=jnp.float32, seed=0):
    kq, kk, kv = jax.random.split(jax.random.key(seed), 3)
    return (jax.random.normal(kq, (B, L, H, K), dtype), jax.random.normal(kk, (B, L, G, K), dtype),
            jax.random.normal(kv, (B, L, G, K), dtype))


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
@pytest.mark.parametrize("packed", [False, True], ids=["causal", "packed"])
def test_every_implementation_gives_the_reference_outputs_and_gradients(implementation, packed):
    dtype = jnp.bfloat16 if implementation == "cudnn" else jnp.float32
    q, k, v = qkv(dtype=dtype)
    segments = packed_segments() if packed else None
    visible = visible_by_definition(segments if packed else np.ones((2, 16), np.int32))
    real_BxL = jnp.asarray(visible.any(-1))  # a padding query sees nothing; its output is never used
    cotangent = jax.random.normal(jax.random.key(3), q.shape, jnp.float32) * real_BxL[..., None, None]
    mask = Mask.for_sequence(None if segments is None else jnp.asarray(segments))

    def loss(fn, q, k, v):
        return jnp.sum(fn(q, k, v).astype(jnp.float32) * cotangent)

    ours = lambda q, k, v: attention.attention(q, k, v, mask, implementation)
    plain = lambda q, k, v: reference(q, k, v, jnp.asarray(visible))
    tol = TOLERANCE[implementation]
    np.testing.assert_allclose(ours(q, k, v).astype(jnp.float32) * real_BxL[..., None, None],
                               plain(q, k, v) * real_BxL[..., None, None], atol=tol, rtol=tol)
    for got, want in zip(jax.grad(functools.partial(loss, ours), (0, 1, 2))(q, k, v),
                         jax.grad(functools.partial(loss, plain), (0, 1, 2))(q, k, v)):
        np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want, np.float32), atol=tol * 10, rtol=tol * 10)


MODEL = ModelConfig(V=64, D=32, F=64, N=2, H=4, G=2, L=16)


@functools.lru_cache(maxsize=None)
def _params(cfg: ModelConfig):
    return jax.tree.map(lambda p: 3.0 * p, nn.unbox(model.init(cfg, jax.random.key(0))))


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_no_implementation_lets_a_packed_document_see_another(implementation):
    cfg = dataclasses.replace(MODEL, attention=implementation, dtype="bfloat16" if implementation == "cudnn" else "float32")
    params = _params(dataclasses.replace(cfg, attention="xla"))
    segments = jnp.asarray(packed_segments())
    positions = jnp.asarray([[0, 1, 2, 3, 4, 0, 1, 2, 3, 4, 5, 6, 0, 1, 2, 0], list(range(9)) + list(range(7))])
    tokens = jax.random.randint(jax.random.key(1), (2, 16), 3, cfg.V)
    logits = model.apply(cfg, params, tokens, segments, positions)[0]
    # Rewrite every other document: the logits of each document must not move at all.
    changed = tokens.at[0, 0:5].set(7).at[0, 12:15].set(9).at[1, 0:9].set(11)
    logits_changed = model.apply(cfg, params, changed, segments, positions)[0]
    np.testing.assert_array_equal(logits[0, 5:12], logits_changed[0, 5:12])
    np.testing.assert_array_equal(logits[1, 9:16], logits_changed[1, 9:16])
    assert not np.allclose(logits[0, 0:5], logits_changed[0, 0:5])  # the rewrite did change something
    # And a document packed among others gets the logits it gets alone in a row.
    alone = model.apply(cfg, params, tokens[:1, 5:12])[0]
    np.testing.assert_allclose(logits[0, 5:12], alone[0], atol=TOLERANCE[implementation] * 10, rtol=TOLERANCE[implementation] * 10)


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_left_padded_cached_decoding_gives_the_full_forward_logits(implementation):
    dtype = "bfloat16" if implementation == "cudnn" else "float32"
    cfg = dataclasses.replace(MODEL, attention=implementation, dtype=dtype)
    params = _params(dataclasses.replace(cfg, attention="xla", dtype="float32"))
    rng = np.random.default_rng(0)
    prompts = [rng.integers(3, cfg.V, n).tolist() for n in (5, 1, 9)]
    continuations = [rng.integers(3, cfg.V, 4).tolist() for _ in prompts]
    tokens_BxP, start_B = sample.left_pad(prompts, pad_id=0)
    B, P = tokens_BxP.shape
    cache = KVCache.zeros(cfg.N, B, P + 4, cfg.G, cfg.K, jnp.dtype(dtype), jnp.asarray(start_B))
    prefill_BxPxV, cache = model.apply(cfg, params, jnp.asarray(tokens_BxP), cache=cache)
    decoded = []
    for t in range(4):
        logits_Bx1xV, cache = model.apply(cfg, params, jnp.asarray([[c[t]] for c in continuations]), cache=cache)
        decoded.append(np.asarray(logits_Bx1xV[:, 0]))
    tol = TOLERANCE[implementation] * 10
    for b in range(B):
        full_LxV = model.apply(cfg, params, jnp.asarray([prompts[b] + continuations[b]]))[0][0]
        cached_LxV = np.concatenate([np.asarray(prefill_BxPxV[b, start_B[b]:])] + [d[b:b + 1] for d in decoded])
        np.testing.assert_allclose(cached_LxV, full_LxV, atol=tol, rtol=tol)


def test_fused_and_per_weight_projections_are_the_same_function():
    tokens = jax.random.randint(jax.random.key(1), (2, 16), 3, MODEL.V)
    params = _params(MODEL)
    fused = model.apply(dataclasses.replace(MODEL, fused_qkv=True), params, tokens)[0]
    per_weight = model.apply(dataclasses.replace(MODEL, fused_qkv=False), params, tokens)[0]
    np.testing.assert_allclose(fused, per_weight, atol=1e-5, rtol=1e-5)


def test_cudnn_is_refused_where_it_cannot_run_and_auto_picks_what_can():
    assert attention._cudnn_problem("cpu", "bfloat16", 64).startswith("cuDNN attention runs on an NVIDIA GPU")
    assert "not model.dtype='float32'" in attention._cudnn_problem("gpu", "float32", 64)
    assert "not 160" in attention._cudnn_problem("gpu", "bfloat16", 160)
    assert "not 12" in attention._cudnn_problem("gpu", "bfloat16", 12)
    assert attention._cudnn_problem("gpu", "bfloat16", 64) is None
    if not ON_GPU:
        assert attention.resolve("auto", "bfloat16", 64) == "xla"
        with pytest.raises(attention.AttentionError, match="model.attention='cudnn' cannot run here: cuDNN attention runs on an NVIDIA GPU"):
            attention.resolve("cudnn", "bfloat16", 64)
    else:
        assert attention.resolve("auto", "bfloat16", 64) == "cudnn"
        assert attention.resolve("auto", "float32", 64) == "xla"
    assert attention.resolve("dot_product", "float32", 64) == "dot_product"


@pytest.mark.skipif(ON_GPU, reason="on a GPU, bfloat16 cuDNN attention is allowed")
def test_train_with_cudnn_on_this_backend_is_one_error_before_compiling(tmp_path, corpus):
    result = run_cli("train", f"--workdir={tmp_path}", *cli_overrides(corpus, model__attention="cudnn", model__dtype="bfloat16"))
    assert result.returncode == 2, result.stderr[-2000:]
    assert "error: model.attention='cudnn' cannot run here: cuDNN attention runs on an NVIDIA GPU" in result.stderr
    assert "Traceback" not in result.stderr and "model:" not in result.stderr
