"""Grouped-query attention: the one dispatch over its implementations, masks as data, rotary
embeddings and the KV cache used by sampling. Causal self-attention (decoders), bidirectional
self-attention (encoders) and cross-attention (a decoder's queries over an encoder's output) are
the same module and the same dispatch, told apart by the mask and by where keys and values come from."""

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import struct

from llm.model.constrain import HEADS, KV_HEADS, constrain
from llm.model.dense import project
from llm.model.tap import tap

NEG_INF = -1e30  # finite, so a fully masked row gives a uniform softmax instead of NaN


@struct.dataclass
class KVCache:
    """Keys/values of every layer at cache slots 0..S-1; row b's tokens live in slots start_B[b]..index-1.

    An encoder-decoder's cache also holds each decoder layer's cross-attention keys/values over the
    encoder's output (E slots), written once by the prefill, and which of those slots are real."""

    k_NxBxSxGxK: jax.Array
    v_NxBxSxGxK: jax.Array
    index: jax.Array  # int32 scalar: the next slot to write
    start_B: jax.Array  # int32: first real slot of each row (left padding before it)
    cross_k_NxBxExGxK: jax.Array | None = None
    cross_v_NxBxExGxK: jax.Array | None = None
    cross_segment_BxE: jax.Array | None = None  # 0 at the encoder input's padding

    @classmethod
    def zeros(cls, num_layers, batch, max_len, kv_heads, head_dim, dtype, start_B=None, encoder_len: int = 0):
        shape = (num_layers, batch, max_len, kv_heads, head_dim)
        if start_B is None:
            start_B = jnp.zeros((batch,), jnp.int32)
        cross = (None, None, None)
        if encoder_len:
            cross_shape = (num_layers, batch, encoder_len, kv_heads, head_dim)
            cross = (jnp.zeros(cross_shape, dtype), jnp.zeros(cross_shape, dtype), jnp.zeros((batch, encoder_len), jnp.int32))
        return cls(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype), jnp.zeros((), jnp.int32), start_B, *cross)


IMPLEMENTATIONS = ("xla", "dot_product", "cudnn")  # model.attention; "auto" resolves to one of them


class AttentionError(ValueError):
    pass


def _cudnn_problem(backend: str, dtype: str, head_dim: int) -> str | None:
    if backend != "gpu":
        return f"cuDNN attention runs on an NVIDIA GPU, and this backend is {backend!r}"
    if dtype not in ("bfloat16", "float16"):
        return f"cuDNN flash attention computes in bfloat16 or float16, not model.dtype={dtype!r}"
    if head_dim % 8 or head_dim > 128:
        return f"cuDNN flash attention needs a head dim (d_model / num_heads) that is a multiple of 8 and at most 128, not {head_dim}"
    return None


def resolve(implementation: str, dtype: str, head_dim: int, backend: str | None = None) -> str:
    """The implementation a run uses on `backend` (default: the one in use), before anything is compiled:
    `auto` is cuDNN's fused kernel where it can run and XLA elsewhere; `cudnn` where it cannot is an error."""
    problem = _cudnn_problem(backend or jax.default_backend(), dtype, head_dim)
    if implementation == "auto":
        return "xla" if problem else "cudnn"
    if implementation == "cudnn" and problem:
        raise AttentionError(f"model.attention='cudnn' cannot run here: {problem}; use 'auto', 'dot_product' or 'xla'")
    if implementation not in IMPLEMENTATIONS:
        raise AttentionError(f"model.attention={implementation!r} is not one of auto, {', '.join(IMPLEMENTATIONS)}")
    return implementation


@struct.dataclass
class Mask:
    """Which keys each query sees, as data rather than a [B, L, S] array: key slot j is visible to query
    i when j <= q_offset + i (causal), the two share a segment id and the key's is not 0 (padding).

    Training passes document segment ids for both sides (document packing); the sampler passes the
    cache's slots, 0 before each row's start (left padding), and q_offset = the slot the first new
    token is written to. Only an implementation that needs a dense array builds one (`dense`).
    """

    q_segment_BxL: jax.Array | None = None  # None: every query is real and they all share one segment
    kv_segment_BxS: jax.Array | None = None
    q_offset: jax.Array | None = None  # None: 0 (a None stays None under jit and nn.scan, a 0 would not)
    causal: bool = struct.field(pytree_node=False, default=True)

    @classmethod
    def for_sequence(cls, segment_ids_BxL: jax.Array | None, causal: bool = True) -> "Mask":
        return cls(segment_ids_BxL, segment_ids_BxL, causal=causal)

    @classmethod
    def across(cls, q_segment_BxL: jax.Array | None, kv_segment_BxS: jax.Array | None) -> "Mask":
        """Cross-attention: every query sees every real key of its own example (the same segment id)."""
        return cls(q_segment_BxL, kv_segment_BxS, causal=False)

    @classmethod
    def for_cache(cls, cache: "KVCache") -> "Mask":
        slots_S = jnp.arange(cache.k_NxBxSxGxK.shape[2])
        return cls(None, (slots_S[None, :] >= cache.start_B[:, None]).astype(jnp.int32), cache.index)

    @property
    def plain_causal(self) -> bool:
        """Causal over one unpadded sequence from slot 0: what a fused kernel's is_causal means."""
        return self.causal and self.kv_segment_BxS is None and self.q_offset is None

    def dense(self, L: int, S: int) -> jax.Array:
        """bool [B or 1, L, S]."""
        q_slot_L, k_slot_S = (0 if self.q_offset is None else self.q_offset) + jnp.arange(L), jnp.arange(S)
        mask_1xLxS = (k_slot_S[None, :] <= q_slot_L[:, None])[None] if self.causal else jnp.ones((1, L, S), jnp.bool_)
        if self.kv_segment_BxS is None:
            return mask_1xLxS
        mask_BxLxS = mask_1xLxS & (self.kv_segment_BxS[:, None, :] != 0)
        if self.q_segment_BxL is not None:
            mask_BxLxS &= self.q_segment_BxL[:, :, None] == self.kv_segment_BxS[:, None, :]
        return mask_BxLxS


def cache_positions(cache: "KVCache", length: int) -> jax.Array:
    """Positions of `length` new tokens written at cache.index onwards (left padding takes none)."""
    return (cache.index + jnp.arange(length))[None, :] - cache.start_B[:, None]


def rope(x_BxLxHxK: jax.Array, positions_BxL: jax.Array, theta: float) -> jax.Array:
    half = x_BxLxHxK.shape[-1] // 2
    freq_K2 = theta ** (-jnp.arange(half, dtype=jnp.float32) / half)
    angle_BxLx1xK2 = (positions_BxL[:, :, None, None].astype(jnp.float32)) * freq_K2
    sin, cos = jnp.sin(angle_BxLx1xK2), jnp.cos(angle_BxLx1xK2)
    x1, x2 = jnp.split(x_BxLxHxK.astype(jnp.float32), 2, axis=-1)
    out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return out.astype(x_BxLxHxK.dtype)


def _probs(q_BxLxHxK, k_BxSxGxK, mask_BxLxS) -> jax.Array:
    """float32 [B, G, H // G, L, S]: the H query heads share G key/value heads in groups of H // G."""
    B, L, H, K = q_BxLxHxK.shape
    G = k_BxSxGxK.shape[2]
    q_BxLxGxRxK = q_BxLxHxK.reshape(B, L, G, H // G, K)
    logits_BxGxRxLxS = jnp.einsum("blgrk,bsgk->bgrls", q_BxLxGxRxK, k_BxSxGxK, preferred_element_type=jnp.float32)
    logits_BxGxRxLxS = logits_BxGxRxLxS * (K**-0.5)
    logits_BxGxRxLxS = jnp.where(mask_BxLxS[:, None, None], logits_BxGxRxLxS, NEG_INF)
    return jax.nn.softmax(logits_BxGxRxLxS, axis=-1)


def _mix(probs_BxGxRxLxS, v_BxSxGxK) -> jax.Array:
    B, G, R, L, _ = probs_BxGxRxLxS.shape
    out_BxLxGxRxK = jnp.einsum("bgrls,bsgk->blgrk", probs_BxGxRxLxS, v_BxSxGxK)
    return out_BxLxGxRxK.reshape(B, L, G * R, v_BxSxGxK.shape[-1])


def _xla(q_BxLxHxK, k_BxSxGxK, v_BxSxGxK, mask_BxLxS) -> jax.Array:
    """Softmax attention in float32, on a dense mask."""
    return _mix(_probs(q_BxLxHxK, k_BxSxGxK, mask_BxLxS).astype(v_BxSxGxK.dtype), v_BxSxGxK)


def attention_probs(q_BxLxHxK, k_BxSxGxK, mask: Mask) -> jax.Array:
    """float32 [B, H, L, S] from the einsum path, whatever model.attention is: what llm/inspect records."""
    B, L, H, _ = q_BxLxHxK.shape
    S = k_BxSxGxK.shape[1]
    return _probs(q_BxLxHxK, k_BxSxGxK, mask.dense(L, S)).reshape(B, H, L, S)


def mix_values(probs_BxHxLxS, v_BxSxGxK) -> jax.Array:
    """[B, L, H, K]: each head's probability-weighted values (the heads' outputs before wo)."""
    B, H, L, S = probs_BxHxLxS.shape
    G = v_BxSxGxK.shape[2]
    return _mix(probs_BxHxLxS.reshape(B, G, H // G, L, S).astype(v_BxSxGxK.dtype), v_BxSxGxK)


def attention(q_BxLxHxK, k_BxSxGxK, v_BxSxGxK, mask: Mask, implementation: str) -> jax.Array:
    """The one dispatch: every attention in the model goes through here, whatever computes it.

    xla          the einsum above, on a dense mask
    dot_product  jax.nn.dot_product_attention(implementation=None): the kernel JAX picks (XLA today)
    cudnn        jax.nn.dot_product_attention(implementation="cudnn"), cuDNN's flash attention, where
                 queries and keys are one sequence (training, eval). Decoding against the KV cache
                 (a few queries, S slots) is memory-bound and runs the XLA einsum.
    A fused kernel gets is_causal for a plain causal mask; with segments or padding it gets the dense
    mask (JAX turns it into an additive bias), so packed documents never see each other.
    """
    L, S = q_BxLxHxK.shape[1], k_BxSxGxK.shape[1]
    if implementation == "xla" or (implementation == "cudnn" and L != S):
        return _xla(q_BxLxHxK, k_BxSxGxK, v_BxSxGxK, mask.dense(L, S))
    if implementation not in ("dot_product", "cudnn"):
        raise AttentionError(f"unknown attention implementation {implementation!r}")
    kernel = "cudnn" if implementation == "cudnn" else None
    if mask.plain_causal and L == S:
        return jax.nn.dot_product_attention(q_BxLxHxK, k_BxSxGxK, v_BxSxGxK, is_causal=True, implementation=kernel)
    mask_Bx1xLxS = mask.dense(L, S)[:, None]
    return jax.nn.dot_product_attention(q_BxLxHxK, k_BxSxGxK, v_BxSxGxK, mask=mask_Bx1xLxS, implementation=kernel)


class Attention(nn.Module):
    H: int
    G: int
    K: int
    pos_encoding: str
    rope_theta: float
    dtype: jnp.dtype
    param_dtype: jnp.dtype
    out_init_std: float
    implementation: str = "xla"
    fused_qkv: bool = True
    trace: bool = False  # llm/inspect: record probabilities and per-head outputs (llm/model/tap.py)
    cross: bool = False  # keys and values from another sequence (memory_BxExD), never rotated
    init_std: float = 0.02
    qk_scale: float = 1.0  # multiplies the queries: mup's 1/d_head attention (llm/model/parametrization.py)

    @nn.compact
    def __call__(self, x_BxLxD, positions_BxL, mask: Mask, kv=None, cache_index=None, layer=None, memory_BxExD=None):
        """kv: the cache's (k, v) of every layer, or None. Cross-attention takes its keys/values from
        memory_BxExD (writing them into kv when there is a cache: the sampler's prefill) or, without
        memory, from kv (every later decoding step)."""
        D = x_BxLxD.shape[-1]
        init = nn.initializers.normal(self.init_std)
        wq_DxHxK = self.param("wq", nn.with_logical_partitioning(init, ("embed", "heads", "kv")), (D, self.H, self.K), self.param_dtype)
        wk_DxGxK = self.param("wk", nn.with_logical_partitioning(init, ("embed", "kv_heads", "kv")), (D, self.G, self.K), self.param_dtype)
        wv_DxGxK = self.param("wv", nn.with_logical_partitioning(init, ("embed", "kv_heads", "kv")), (D, self.G, self.K), self.param_dtype)
        out_init = nn.initializers.normal(self.out_init_std)
        wo_HxKxD = self.param("wo", nn.with_logical_partitioning(out_init, ("heads", "kv", "embed")), (self.H, self.K, D), self.param_dtype)

        x_BxLxD = x_BxLxD.astype(self.dtype)
        B, L, _ = x_BxLxD.shape
        H, G, K = self.H, self.G, self.K
        if self.cross:
            q_BxLxHxK = project(x_BxLxD, wq_DxHxK.astype(self.dtype))
            if memory_BxExD is not None:
                memory_BxExD = memory_BxExD.astype(self.dtype)
                k_BxExGxK = project(memory_BxExD, wk_DxGxK.astype(self.dtype))
                v_BxExGxK = project(memory_BxExD, wv_DxGxK.astype(self.dtype))
                if kv is not None:
                    write = lambda cache, new: jax.lax.dynamic_update_slice(cache, new.astype(cache.dtype)[None], (layer, 0, 0, 0, 0))
                    kv = (write(kv[0], k_BxExGxK), write(kv[1], v_BxExGxK))
            else:
                k_BxExGxK, v_BxExGxK = kv[0][layer].astype(self.dtype), kv[1][layer].astype(self.dtype)
            return self._attend(q_BxLxHxK, k_BxExGxK, v_BxExGxK, mask, wo_HxKxD), kv
        if self.fused_qkv:
            # One GEMM of (H + 2G) K columns instead of three: faster on XLA:CPU (experiments/perf). The
            # weights are concatenated per step, so it is only used where they are not tensor-sharded.
            w_DxQ = jnp.concatenate([w.reshape(D, -1) for w in (wq_DxHxK, wk_DxGxK, wv_DxGxK)], axis=1)
            qkv_BxLxQ = project(x_BxLxD, w_DxQ.astype(self.dtype))
            q_BxLxHK, k_BxLxGK, v_BxLxGK = jnp.split(qkv_BxLxQ, [H * K, (H + G) * K], axis=-1)
            q_BxLxHxK = q_BxLxHK.reshape(B, L, H, K)
            k_BxLxGxK = k_BxLxGK.reshape(B, L, G, K)
            v_BxLxGxK = v_BxLxGK.reshape(B, L, G, K)
        else:
            q_BxLxHxK = project(x_BxLxD, wq_DxHxK.astype(self.dtype))
            k_BxLxGxK = project(x_BxLxD, wk_DxGxK.astype(self.dtype))
            v_BxLxGxK = project(x_BxLxD, wv_DxGxK.astype(self.dtype))
        q_BxLxHxK, k_BxLxGxK = constrain(q_BxLxHxK, HEADS), constrain(k_BxLxGxK, KV_HEADS)
        v_BxLxGxK = constrain(v_BxLxGxK, KV_HEADS)
        if self.pos_encoding == "rope":
            q_BxLxHxK = rope(q_BxLxHxK, positions_BxL, self.rope_theta)
            k_BxLxGxK = rope(k_BxLxGxK, positions_BxL, self.rope_theta)
        if self.trace:  # path patching swaps one of them (a receiver head's keys, say) and leaves the others
            q_BxLxHxK, k_BxLxGxK = tap(self, "q_BxLxHxK", q_BxLxHxK), tap(self, "k_BxLxGxK", k_BxLxGxK)
            v_BxLxGxK = tap(self, "v_BxLxGxK", v_BxLxGxK)

        if kv is not None:
            # Every layer's cache is one [N, B, S, G, K] array, written in place: no per-layer copies per token.
            def write(cache, new_BxLxGxK):
                return jax.lax.dynamic_update_slice(cache, new_BxLxGxK.astype(cache.dtype)[None], (layer, 0, cache_index, 0, 0))

            kv = (write(kv[0], k_BxLxGxK), write(kv[1], v_BxLxGxK))
            k_BxSxGxK, v_BxSxGxK = kv[0][layer].astype(self.dtype), kv[1][layer].astype(self.dtype)
        else:
            k_BxSxGxK, v_BxSxGxK = k_BxLxGxK, v_BxLxGxK
        return self._attend(q_BxLxHxK, k_BxSxGxK, v_BxSxGxK, mask, wo_HxKxD), kv

    def _attend(self, q_BxLxHxK, k_BxSxGxK, v_BxSxGxK, mask: Mask, wo_HxKxD) -> jax.Array:
        if self.qk_scale != 1.0:
            q_BxLxHxK = q_BxLxHxK * jnp.asarray(self.qk_scale, q_BxLxHxK.dtype)
        if self.trace:
            probs_BxHxLxS = tap(self, "attn_probs_BxHxLxS", attention_probs(q_BxLxHxK, k_BxSxGxK, mask))
            out_BxLxHxK = tap(self, "head_out_BxLxHxK", mix_values(probs_BxHxLxS, v_BxSxGxK))
        else:
            out_BxLxHxK = attention(q_BxLxHxK, k_BxSxGxK, v_BxSxGxK, mask, self.implementation)
        return project(out_BxLxHxK, wo_HxKxD.astype(self.dtype), contract=2)
