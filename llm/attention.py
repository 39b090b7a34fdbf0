"""Causal grouped-query attention, rotary embeddings, masks and the KV cache used by sampling."""

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import struct

from llm.dense import project

NEG_INF = -1e30  # finite, so a fully masked row gives a uniform softmax instead of NaN


@struct.dataclass
class KVCache:
    """Keys/values of every layer at cache slots 0..S-1; row b's tokens live in slots start_B[b]..index-1."""

    k_NxBxSxGxK: jax.Array
    v_NxBxSxGxK: jax.Array
    index: jax.Array  # int32 scalar: the next slot to write
    start_B: jax.Array  # int32: first real slot of each row (left padding before it)

    @classmethod
    def zeros(cls, num_layers, batch, max_len, kv_heads, head_dim, dtype, start_B=None):
        shape = (num_layers, batch, max_len, kv_heads, head_dim)
        if start_B is None:
            start_B = jnp.zeros((batch,), jnp.int32)
        return cls(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype), jnp.zeros((), jnp.int32), start_B)


def causal_mask(segment_ids_BxL: jax.Array | None, length: int) -> jax.Array:
    """Query i sees key j iff j <= i and both are in the same (non-padding) segment."""
    mask_1xLxL = jnp.tril(jnp.ones((length, length), jnp.bool_))[None]
    if segment_ids_BxL is None:
        return mask_1xLxL
    same_BxLxL = segment_ids_BxL[:, :, None] == segment_ids_BxL[:, None, :]
    return mask_1xLxL & same_BxLxL & (segment_ids_BxL[:, None, :] != 0)


def cache_mask(cache: KVCache, length: int) -> tuple[jax.Array, jax.Array]:
    """Mask and positions for `length` new tokens written at cache.index onwards."""
    slots_L = cache.index + jnp.arange(length)
    max_len = cache.k_NxBxSxGxK.shape[2]
    keys_S = jnp.arange(max_len)
    mask_BxLxS = (keys_S[None, None, :] <= slots_L[None, :, None]) & (
        keys_S[None, None, :] >= cache.start_B[:, None, None]
    )
    positions_BxL = slots_L[None, :] - cache.start_B[:, None]
    return mask_BxLxS, positions_BxL


def rope(x_BxLxHxK: jax.Array, positions_BxL: jax.Array, theta: float) -> jax.Array:
    half = x_BxLxHxK.shape[-1] // 2
    freq_K2 = theta ** (-jnp.arange(half, dtype=jnp.float32) / half)
    angle_BxLx1xK2 = (positions_BxL[:, :, None, None].astype(jnp.float32)) * freq_K2
    sin, cos = jnp.sin(angle_BxLx1xK2), jnp.cos(angle_BxLx1xK2)
    x1, x2 = jnp.split(x_BxLxHxK.astype(jnp.float32), 2, axis=-1)
    out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return out.astype(x_BxLxHxK.dtype)


def attend(q_BxLxHxK, k_BxSxGxK, v_BxSxGxK, mask_BxLxS) -> jax.Array:
    """Softmax attention in float32; the H query heads share G key/value heads in groups of H // G."""
    B, L, H, K = q_BxLxHxK.shape
    G = k_BxSxGxK.shape[2]
    q_BxLxGxRxK = q_BxLxHxK.reshape(B, L, G, H // G, K)
    logits_BxGxRxLxS = jnp.einsum("blgrk,bsgk->bgrls", q_BxLxGxRxK, k_BxSxGxK, preferred_element_type=jnp.float32)
    logits_BxGxRxLxS = logits_BxGxRxLxS * (K**-0.5)
    logits_BxGxRxLxS = jnp.where(mask_BxLxS[:, None, None], logits_BxGxRxLxS, NEG_INF)
    probs_BxGxRxLxS = jax.nn.softmax(logits_BxGxRxLxS, axis=-1).astype(v_BxSxGxK.dtype)
    out_BxLxGxRxK = jnp.einsum("bgrls,bsgk->blgrk", probs_BxGxRxLxS, v_BxSxGxK)
    return out_BxLxGxRxK.reshape(B, L, H, K)


class Attention(nn.Module):
    H: int
    G: int
    K: int
    pos_encoding: str
    rope_theta: float
    dtype: jnp.dtype
    param_dtype: jnp.dtype
    out_init_std: float

    @nn.compact
    def __call__(self, x_BxLxD, positions_BxL, mask_BxLxS, kv=None, cache_index=None, layer=None):
        D = x_BxLxD.shape[-1]
        init = nn.initializers.normal(0.02)
        wq_DxHxK = self.param("wq", nn.with_logical_partitioning(init, ("embed", "heads", "kv")), (D, self.H, self.K), self.param_dtype)
        wk_DxGxK = self.param("wk", nn.with_logical_partitioning(init, ("embed", "kv_heads", "kv")), (D, self.G, self.K), self.param_dtype)
        wv_DxGxK = self.param("wv", nn.with_logical_partitioning(init, ("embed", "kv_heads", "kv")), (D, self.G, self.K), self.param_dtype)
        out_init = nn.initializers.normal(self.out_init_std)
        wo_HxKxD = self.param("wo", nn.with_logical_partitioning(out_init, ("heads", "kv", "embed")), (self.H, self.K, D), self.param_dtype)

        x_BxLxD = x_BxLxD.astype(self.dtype)
        # q, k and v from one matmul: the same products in one larger GEMM (Q = (H + 2G) K columns).
        B, L, _ = x_BxLxD.shape
        H, G, K = self.H, self.G, self.K
        w_DxQ = jnp.concatenate([w.reshape(D, -1) for w in (wq_DxHxK, wk_DxGxK, wv_DxGxK)], axis=1)
        qkv_BxLxQ = project(x_BxLxD, w_DxQ.astype(self.dtype))
        q_BxLxHK, k_BxLxGK, v_BxLxGK = jnp.split(qkv_BxLxQ, [H * K, (H + G) * K], axis=-1)
        q_BxLxHxK = q_BxLxHK.reshape(B, L, H, K)
        k_BxLxGxK = k_BxLxGK.reshape(B, L, G, K)
        v_BxLxGxK = v_BxLxGK.reshape(B, L, G, K)
        if self.pos_encoding == "rope":
            q_BxLxHxK = rope(q_BxLxHxK, positions_BxL, self.rope_theta)
            k_BxLxGxK = rope(k_BxLxGxK, positions_BxL, self.rope_theta)

        if kv is not None:
            # Every layer's cache is one [N, B, S, G, K] array, written in place: no per-layer copies per token.
            def write(cache, new_BxLxGxK):
                return jax.lax.dynamic_update_slice(cache, new_BxLxGxK.astype(cache.dtype)[None], (layer, 0, cache_index, 0, 0))

            kv = (write(kv[0], k_BxLxGxK), write(kv[1], v_BxLxGxK))
            k_BxSxGxK, v_BxSxGxK = kv[0][layer].astype(self.dtype), kv[1][layer].astype(self.dtype)
        else:
            k_BxSxGxK, v_BxSxGxK = k_BxLxGxK, v_BxLxGxK

        out_BxLxHxK = attend(q_BxLxHxK, k_BxSxGxK, v_BxSxGxK, mask_BxLxS)
        out_BxLxD = project(out_BxLxHxK, wo_HxKxD.astype(self.dtype), contract=2)
        return out_BxLxD, kv
