"""The decoder-only Transformer: embeddings, position encodings, pre-norm blocks, output head.

Every parameter carries logical axis names (vocab, embed, heads, kv_heads, kv, mlp, pos, norm,
layers); llm/sharding.py maps them to mesh axes, so the model never mentions a mesh.
"""

import dataclasses
import math
from typing import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from llm.attention import Attention, KVCache, Mask, cache_positions
from llm.dense import project
from llm.tap import tap


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    V: int  # vocabulary (padded)
    D: int  # model width
    F: int  # feed-forward width
    N: int  # layers
    H: int  # query heads
    G: int  # key/value heads (H // G query heads share one)
    L: int  # context length
    pos_encoding: str = "rope"
    rope_theta: float = 10000.0
    norm: str = "rmsnorm"
    norm_bias: bool = True  # layernorm only; nanoGPT and many newer models drop it
    norm_eps: float = 0.0  # 0: 1e-6 for rmsnorm, 1e-5 for layernorm (Llama checkpoints bring their own)
    mlp: str = "swiglu"
    tie_embeddings: bool = True
    dtype: str = "float32"
    param_dtype: str = "float32"
    remat: str = "none"
    scan_layers: bool = False
    attention: str = "xla"  # an implementation of llm/attention.py's dispatch (config.py resolves "auto")
    fused_qkv: bool = True  # one q/k/v matmul (XLA:CPU without tensor parallelism) or one per weight
    trace: bool = False  # llm/inspect: sow every named activation (llm/tap.py); off in training

    @property
    def K(self) -> int:
        return self.D // self.H


class Norm(nn.Module):
    kind: str
    param_dtype: jnp.dtype
    use_bias: bool = True
    eps: float = 0.0  # 0: 1e-6 for rmsnorm, 1e-5 for layernorm

    @nn.compact
    def __call__(self, x_BxLxD):
        D = x_BxLxD.shape[-1]
        x = x_BxLxD.astype(jnp.float32)
        scale = self.param("scale", nn.with_logical_partitioning(nn.initializers.ones, ("norm",)), (D,), self.param_dtype)
        if self.kind == "rmsnorm":
            y = x * jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + (self.eps or 1e-6)) * scale
        else:
            mean = jnp.mean(x, axis=-1, keepdims=True)
            var = jnp.mean(jnp.square(x - mean), axis=-1, keepdims=True)
            y = (x - mean) * jax.lax.rsqrt(var + (self.eps or 1e-5)) * scale
            if self.use_bias:
                y = y + self.param("bias", nn.with_logical_partitioning(nn.initializers.zeros, ("norm",)), (D,), self.param_dtype)
        return y.astype(x_BxLxD.dtype)


class Mlp(nn.Module):
    kind: str
    F: int
    dtype: jnp.dtype
    param_dtype: jnp.dtype
    out_init_std: float
    trace: bool = False

    @nn.compact
    def __call__(self, x_BxLxD):
        D = x_BxLxD.shape[-1]
        init = nn.initializers.normal(0.02)
        out_init = nn.initializers.normal(self.out_init_std)
        wi_DxF = self.param("wi", nn.with_logical_partitioning(init, ("embed", "mlp")), (D, self.F), self.param_dtype)
        wo_FxD = self.param("wo", nn.with_logical_partitioning(out_init, ("mlp", "embed")), (self.F, D), self.param_dtype)
        h_BxLxF = project(x_BxLxD, wi_DxF.astype(self.dtype))
        if self.kind == "swiglu":
            wg_DxF = self.param("wg", nn.with_logical_partitioning(init, ("embed", "mlp")), (D, self.F), self.param_dtype)
            gate_BxLxF = project(x_BxLxD, wg_DxF.astype(self.dtype))
            h_BxLxF = nn.silu(gate_BxLxF) * h_BxLxF
        else:
            h_BxLxF = nn.gelu(h_BxLxF, approximate=False)  # the exact erf form, as in the GELU paper and PyTorch
        if self.trace:
            h_BxLxF = tap(self, "mlp_hidden_BxLxF", h_BxLxF)
        return project(h_BxLxF, wo_FxD.astype(self.dtype))


class Block(nn.Module):
    cfg: ModelConfig

    @nn.compact
    def __call__(self, carry, positions_BxL, mask: Mask, cache_index, layer):
        # carry: the residual stream and the whole KV cache (None without one), as nn.scan threads it.
        x_BxLxD, kv = carry
        cfg = self.cfg
        if cfg.trace:
            x_BxLxD = tap(self, "resid_pre_BxLxD", x_BxLxD)
        dtype, param_dtype = jnp.dtype(cfg.dtype), jnp.dtype(cfg.param_dtype)
        # GPT-2's scaled init of the projections that write into the residual stream.
        out_std = 0.02 / math.sqrt(2 * cfg.N)
        h_BxLxD = Norm(cfg.norm, param_dtype, cfg.norm_bias, cfg.norm_eps, name="attn_norm")(x_BxLxD)
        attn = Attention(cfg.H, cfg.G, cfg.K, cfg.pos_encoding, cfg.rope_theta, dtype, param_dtype, out_std,
                         cfg.attention, cfg.fused_qkv, cfg.trace, name="attn")
        a_BxLxD, kv = attn(h_BxLxD, positions_BxL, mask, kv, cache_index, layer)
        x_BxLxD = x_BxLxD + a_BxLxD
        if cfg.trace:
            x_BxLxD = tap(self, "resid_mid_BxLxD", x_BxLxD)
        h_BxLxD = Norm(cfg.norm, param_dtype, cfg.norm_bias, cfg.norm_eps, name="mlp_norm")(x_BxLxD)
        x_BxLxD = x_BxLxD + Mlp(cfg.mlp, cfg.F, dtype, param_dtype, out_std, cfg.trace, name="mlp")(h_BxLxD)
        if cfg.trace:
            x_BxLxD = tap(self, "resid_post_BxLxD", x_BxLxD)
        return (x_BxLxD, kv), None


def sinusoidal(positions_BxL: jax.Array, D: int) -> jax.Array:
    """Vaswani et al.: sin(i / 10000^(2k/D)) at index 2k, cos of the same angle at 2k + 1."""
    inv_freq_D2 = 10000.0 ** (-jnp.arange(0, D, 2, dtype=jnp.float32) / D)
    angle_BxLxD2 = positions_BxL[..., None].astype(jnp.float32) * inv_freq_D2
    return jnp.stack([jnp.sin(angle_BxLxD2), jnp.cos(angle_BxLxD2)], axis=-1).reshape(*positions_BxL.shape, D)


_REMAT_POLICIES = {
    "block": None,  # save nothing inside a block: recompute it all in the backward pass
    "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


class Transformer(nn.Module):
    cfg: ModelConfig

    @nn.compact
    def __call__(self, tokens_BxL, segment_ids_BxL=None, positions_BxL=None, cache: KVCache | None = None,
                 last_only: bool = False, features: bool = False):
        cfg = self.cfg
        dtype, param_dtype = jnp.dtype(cfg.dtype), jnp.dtype(cfg.param_dtype)
        B, L = tokens_BxL.shape
        embed_VxD = self.param(
            "embed", nn.with_logical_partitioning(nn.initializers.normal(0.02), ("vocab", "embed")), (cfg.V, cfg.D), param_dtype
        )
        x_BxLxD = jnp.take(embed_VxD, tokens_BxL, axis=0).astype(dtype)

        if cache is not None:
            mask, positions_BxL = Mask.for_cache(cache), cache_positions(cache, L)
            kv = (cache.k_NxBxSxGxK, cache.v_NxBxSxGxK)
        else:
            mask = Mask.for_sequence(segment_ids_BxL)
            if positions_BxL is None:
                positions_BxL = jnp.broadcast_to(jnp.arange(L), (B, L))
            kv = None

        if cfg.pos_encoding == "sinusoidal":
            # The paper scales token embeddings by sqrt(D) so they are not drowned by the unit-size encoding.
            x_BxLxD = (x_BxLxD * math.sqrt(cfg.D) + sinusoidal(positions_BxL, cfg.D)).astype(dtype)
        elif cfg.pos_encoding == "learned":
            pos_LxD = self.param(
                "pos_embed", nn.with_logical_partitioning(nn.initializers.normal(0.02), ("pos", "embed")), (cfg.L, cfg.D), param_dtype
            )
            x_BxLxD = x_BxLxD + jnp.take(pos_LxD, positions_BxL, axis=0).astype(dtype)

        block = Block
        if cfg.remat != "none":
            block = nn.remat(Block, policy=_REMAT_POLICIES[cfg.remat], prevent_cse=not cfg.scan_layers)
        index = None if cache is None else cache.index
        if cfg.scan_layers:
            stack = nn.scan(
                block,
                variable_axes={"params": 0, "intermediates": 0},  # each layer's sown activations stack on axis 0
                split_rngs={"params": True},
                in_axes=(nn.broadcast, nn.broadcast, nn.broadcast, 0),
                length=cfg.N,
                metadata_params={nn.PARTITION_NAME: "layers"},
            )
            (x_BxLxD, kv), _ = stack(cfg, name="blocks")((x_BxLxD, kv), positions_BxL, mask, index, jnp.arange(cfg.N))
        else:
            for i in range(cfg.N):
                (x_BxLxD, kv), _ = block(cfg, name=f"block_{i}")((x_BxLxD, kv), positions_BxL, mask, index, i)

        if last_only:  # a sampler's prefill needs only the next token's logits, not [B, L, V] of them
            x_BxLxD = x_BxLxD[:, -1:]
        if cfg.trace:
            x_BxLxD = tap(self, "final_resid_BxLxD", x_BxLxD)
        final_norm = Norm(cfg.norm, param_dtype, cfg.norm_bias, cfg.norm_eps, name="final_norm")
        if cfg.tie_embeddings:
            out_weight = embed_VxD
        else:
            out_weight = self.param(
                "head", nn.with_logical_partitioning(nn.initializers.normal(0.02), ("embed", "vocab")), (cfg.D, cfg.V), param_dtype
            )
        if features:  # a reward head reads the final-normed hidden state, not the logits
            return final_norm(x_BxLxD), cache
        logits_BxLxV = _unembed(cfg, final_norm, out_weight, x_BxLxD)

        if cache is not None:
            cache = cache.replace(k_NxBxSxGxK=kv[0], v_NxBxSxGxK=kv[1], index=cache.index + L)
        return logits_BxLxV, cache


def _unembed(cfg: ModelConfig, final_norm: Callable, out_weight: jax.Array, x_BxLxD: jax.Array) -> jax.Array:
    """out_weight: the embedding table [V, D] when tied (transposed here), else the head [D, V]."""
    x_BxLxD = final_norm(x_BxLxD)
    out_DxV = out_weight.T if cfg.tie_embeddings else out_weight
    return project(x_BxLxD, out_DxV.astype(jnp.dtype(cfg.dtype)), preferred_element_type=jnp.float32)


def unembed(cfg: ModelConfig, params, x_BxLxD: jax.Array) -> jax.Array:
    """float32 logits of any residual stream through the final norm and output head (the logit lens)."""
    final_norm = Norm(cfg.norm, jnp.dtype(cfg.param_dtype), cfg.norm_bias, cfg.norm_eps)
    out_weight = params["embed"] if cfg.tie_embeddings else params["head"]
    return _unembed(cfg, lambda x: final_norm.apply({"params": params["final_norm"]}, x), out_weight, x_BxLxD)


def param_counts(cfg: ModelConfig) -> dict[str, int]:
    """Exact counts; non-embedding excludes the token and position embeddings and an untied head."""
    norm = cfg.D * (2 if cfg.norm == "layernorm" and cfg.norm_bias else 1)
    attn = cfg.D * cfg.K * (2 * cfg.H + 2 * cfg.G)
    mlp = cfg.D * cfg.F * (3 if cfg.mlp == "swiglu" else 2)
    non_embedding = cfg.N * (2 * norm + attn + mlp) + norm
    embedding = cfg.V * cfg.D
    embedding += cfg.L * cfg.D if cfg.pos_encoding == "learned" else 0
    embedding += 0 if cfg.tie_embeddings else cfg.D * cfg.V
    return {"total": non_embedding + embedding, "non_embedding": non_embedding}


def flops_per_token(cfg: ModelConfig) -> int:
    """Training FLOPs per token: 6 x (matmul params incl. the output head) + 12 N H K L for attention.

    The attention term counts the full L x L score matrix (PaLM's convention, also nanoGPT's MFU).
    """
    matmul_params = param_counts(cfg)["non_embedding"] + cfg.D * cfg.V
    return 6 * matmul_params + 12 * cfg.N * cfg.H * cfg.K * cfg.L


def init(cfg: ModelConfig, rng: jax.Array):
    """Boxed params (nn.Partitioned leaves carrying logical axis names)."""
    tokens_1xL = jnp.zeros((1, cfg.L), jnp.int32)
    return Transformer(cfg).init(rng, tokens_1xL)["params"]


def apply(cfg: ModelConfig, params, tokens_BxL, segment_ids_BxL=None, positions_BxL=None, cache=None, last_only=False,
          features=False):
    """(logits [B, L, V] float32, or [B, 1, V] at the last position with last_only, or with features the
    final-normed hidden state [B, L, D]; the updated cache)."""
    return Transformer(cfg).apply({"params": params}, tokens_BxL, segment_ids_BxL, positions_BxL, cache, last_only, features)
