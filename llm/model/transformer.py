"""The Transformer in its three arrangements (model.arch): embeddings, position encodings, pre-norm
blocks, output head.

    decoder          causal self-attention blocks, next-token prediction (GPT)
    encoder          the same blocks with bidirectional self-attention, masked-token prediction (BERT)
    encoder_decoder  an encoder stack, and a decoder stack whose blocks add cross-attention over the
                     encoder's output (Vaswani et al. 2017, T5); one embedding table for both and the head

Every parameter carries logical axis names (vocab, embed, heads, kv_heads, kv, mlp, pos, norm,
layers); llm/training/sharding.py maps them to mesh axes, so the model never mentions a mesh.
"""

import dataclasses
import math
from typing import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from llm.model.attention import Attention, KVCache, Mask, cache_positions
from llm.model.constrain import HIDDEN, LOGITS, RESIDUAL, constrain
from llm.model.dense import project
from llm.model.parametrization import Parametrization, init_depth, init_std_scale, logit_scale, qk_scale, residual_scale
from llm.model.tap import tap


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    V: int  # vocabulary (padded)
    D: int  # model width
    F: int  # feed-forward width; 0: attention-only blocks, no MLP sublayer
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
    attention: str = "xla"  # an implementation of attention.py's dispatch (llm/spec.py resolves "auto")
    fused_qkv: bool = True  # one q/k/v matmul (XLA:CPU without tensor parallelism) or one per weight
    trace: bool = False  # llm/inspect: sow every named activation (llm/model/tap.py); off in training
    arch: str = "decoder"  # 'decoder' | 'encoder' | 'encoder_decoder'
    E: int = 0  # encoder_decoder: encoder layers (N counts the decoder's)
    T: int = 0  # encoder_decoder: decoder (target) length; L is the encoder's input length
    parametrization: Parametrization = Parametrization()  # sp, or mup / completep (llm/model/parametrization.py)

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
    init_std: float = 0.02

    @nn.compact
    def __call__(self, x_BxLxD):
        D = x_BxLxD.shape[-1]
        init = nn.initializers.normal(self.init_std)
        out_init = nn.initializers.normal(self.out_init_std)
        wi_DxF = self.param("wi", nn.with_logical_partitioning(init, ("embed", "mlp")), (D, self.F), self.param_dtype)
        wo_FxD = self.param("wo", nn.with_logical_partitioning(out_init, ("mlp", "embed")), (self.F, D), self.param_dtype)
        h_BxLxF = constrain(project(x_BxLxD, wi_DxF.astype(self.dtype)), HIDDEN)
        if self.kind == "swiglu":
            wg_DxF = self.param("wg", nn.with_logical_partitioning(init, ("embed", "mlp")), (D, self.F), self.param_dtype)
            gate_BxLxF = constrain(project(x_BxLxD, wg_DxF.astype(self.dtype)), HIDDEN)
            h_BxLxF = nn.silu(gate_BxLxF) * h_BxLxF
        else:
            h_BxLxF = nn.gelu(h_BxLxF, approximate=False)  # the exact erf form, as in the GELU paper and PyTorch
        if self.trace:
            h_BxLxF = tap(self, "mlp_hidden_BxLxF", h_BxLxF)
        return project(h_BxLxF, wo_FxD.astype(self.dtype))


class Block(nn.Module):
    cfg: ModelConfig
    cross: bool = False  # a decoder block of encoder_decoder: cross-attention over the encoder's output

    @nn.compact
    def __call__(self, carry, positions_BxL, mask: Mask, cache_index, layer, memory_BxExD=None, cross_mask: Mask | None = None):
        # carry: the residual stream and the whole self- and cross-attention caches (None without them),
        # as nn.scan threads it.
        x_BxLxD, kv, cross_kv = carry
        x_BxLxD = constrain(x_BxLxD, RESIDUAL)
        cfg = self.cfg
        if cfg.trace:
            x_BxLxD = tap(self, "resid_pre_BxLxD", x_BxLxD)
        dtype, param_dtype = jnp.dtype(cfg.dtype), jnp.dtype(cfg.param_dtype)
        p = cfg.parametrization
        std = 0.02 * init_std_scale(p)
        # GPT-2's scaled init of the projections that write into the residual stream.
        out_std = 0.02 / math.sqrt(2 * init_depth(p, cfg.N + cfg.E)) * init_std_scale(p)
        norm = lambda name: Norm(cfg.norm, param_dtype, cfg.norm_bias, cfg.norm_eps, name=name)
        attention = lambda name, cross=False: Attention(cfg.H, cfg.G, cfg.K, cfg.pos_encoding, cfg.rope_theta, dtype, param_dtype,
                                                        out_std, cfg.attention, cfg.fused_qkv, cfg.trace, cross, std, qk_scale(p),
                                                        name=name)
        branch = _times(residual_scale(p))  # completep's residual-branch multiplier
        a_BxLxD, kv = attention("attn")(norm("attn_norm")(x_BxLxD), positions_BxL, mask, kv, cache_index, layer)
        a_BxLxD = branch(a_BxLxD)
        if cfg.trace:
            a_BxLxD = tap(self, "write_attn_BxLxD", a_BxLxD)
        x_BxLxD = x_BxLxD + a_BxLxD
        if self.cross:
            c_BxLxD, cross_kv = attention("cross_attn", cross=True)(norm("cross_norm")(x_BxLxD), None, cross_mask, cross_kv,
                                                                   None, layer, memory_BxExD)
            x_BxLxD = x_BxLxD + branch(c_BxLxD)
        if cfg.trace:
            x_BxLxD = tap(self, "resid_mid_BxLxD", x_BxLxD)
        if cfg.F:  # F = 0: an attention-only block (Elhage et al. 2021's toy models), no MLP params at all
            h_BxLxD = norm("mlp_norm")(x_BxLxD)
            m_BxLxD = branch(Mlp(cfg.mlp, cfg.F, dtype, param_dtype, out_std, cfg.trace, std, name="mlp")(h_BxLxD))
            if cfg.trace:
                m_BxLxD = tap(self, "write_mlp_BxLxD", m_BxLxD)
            x_BxLxD = x_BxLxD + m_BxLxD
        if cfg.trace:
            x_BxLxD = tap(self, "resid_post_BxLxD", x_BxLxD)
        return (x_BxLxD, kv, cross_kv), None


def _times(scale: float) -> Callable:
    """Multiplies by a parametrization's constant (llm/model/parametrization.py); sp's 1 adds no op, so
    its programs stay as they were."""
    return (lambda a: a) if scale == 1.0 else (lambda a: a * jnp.asarray(scale, a.dtype))


def sinusoidal(positions_BxL: jax.Array, D: int) -> jax.Array:
    """Vaswani et al.: sin(i / 10000^(2k/D)) at index 2k, cos of the same angle at 2k + 1."""
    inv_freq_D2 = 10000.0 ** (-jnp.arange(0, D, 2, dtype=jnp.float32) / D)
    angle_BxLxD2 = positions_BxL[..., None].astype(jnp.float32) * inv_freq_D2
    return jnp.stack([jnp.sin(angle_BxLxD2), jnp.cos(angle_BxLxD2)], axis=-1).reshape(*positions_BxL.shape, D)


_REMAT_POLICIES = {
    "block": None,  # save nothing inside a block: recompute it all in the backward pass
    "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


def _embed(module: nn.Module, cfg: ModelConfig, embed_VxD, tokens_BxL, positions_BxL, length: int, name: str = "pos_embed"):
    """Token embeddings plus the position encoding (a learned one is a table of `length` rows)."""
    x_BxLxD = jnp.take(embed_VxD, tokens_BxL, axis=0).astype(jnp.dtype(cfg.dtype))
    if cfg.pos_encoding == "sinusoidal":
        # The paper scales token embeddings by sqrt(D) so they are not drowned by the unit-size encoding.
        return (x_BxLxD * math.sqrt(cfg.D) + sinusoidal(positions_BxL, cfg.D)).astype(x_BxLxD.dtype)
    if cfg.pos_encoding == "learned":
        init = nn.with_logical_partitioning(nn.initializers.normal(0.02), ("pos", "embed"))
        pos_LxD = module.param(name, init, (length, cfg.D), jnp.dtype(cfg.param_dtype))
        return x_BxLxD + jnp.take(pos_LxD, positions_BxL, axis=0).astype(x_BxLxD.dtype)
    return x_BxLxD  # rope rotates queries and keys inside attention


def _blocks(cfg: ModelConfig, num_layers: int, prefix: str, carry, positions_BxL, mask: Mask, cache_index,
            cross: bool = False, memory_BxExD=None, cross_mask: Mask | None = None):
    """`num_layers` blocks over carry (x, kv, cross_kv): scanned as `{prefix}s`, or unrolled as `{prefix}_{i}`."""
    block = Block
    if cfg.remat != "none":
        block = nn.remat(Block, policy=_REMAT_POLICIES[cfg.remat], prevent_cse=not cfg.scan_layers)
    if cfg.scan_layers:
        stack = nn.scan(
            block,
            variable_axes={"params": 0, "intermediates": 0},  # each layer's sown activations stack on axis 0
            split_rngs={"params": True},
            in_axes=(nn.broadcast, nn.broadcast, nn.broadcast, 0, nn.broadcast, nn.broadcast),
            length=num_layers,
            metadata_params={nn.PARTITION_NAME: "layers"},
        )
        carry, _ = stack(cfg, cross, name=f"{prefix}s")(carry, positions_BxL, mask, cache_index, jnp.arange(num_layers),
                                                        memory_BxExD, cross_mask)
        return carry
    for i in range(num_layers):
        carry, _ = block(cfg, cross, name=f"{prefix}_{i}")(carry, positions_BxL, mask, cache_index, i, memory_BxExD, cross_mask)
    return carry


def _embedding_table(module: nn.Module, cfg: ModelConfig):
    init = nn.with_logical_partitioning(nn.initializers.normal(0.02), ("vocab", "embed"))
    return module.param("embed", init, (cfg.V, cfg.D), jnp.dtype(cfg.param_dtype))


def _head(module: nn.Module, cfg: ModelConfig, embed_VxD, x_BxLxD, features: bool):
    final_norm = Norm(cfg.norm, jnp.dtype(cfg.param_dtype), cfg.norm_bias, cfg.norm_eps, name="final_norm")
    if cfg.tie_embeddings:
        out_weight = embed_VxD
    else:
        init = nn.with_logical_partitioning(nn.initializers.normal(0.02), ("embed", "vocab"))
        out_weight = module.param("head", init, (cfg.D, cfg.V), jnp.dtype(cfg.param_dtype))
    if features:  # a reward head reads the final-normed hidden state, not the logits (under mup, scaled as they are)
        return _output_scale(cfg)(final_norm(x_BxLxD))
    return _unembed(cfg, final_norm, out_weight, x_BxLxD)


def _default_positions(positions_BxL, B: int, L: int):
    return jnp.broadcast_to(jnp.arange(L), (B, L)) if positions_BxL is None else positions_BxL


class Transformer(nn.Module):
    """arch 'decoder' (causal) and 'encoder' (bidirectional): one stack, embeddings to logits."""

    cfg: ModelConfig

    @nn.compact
    def __call__(self, tokens_BxL, segment_ids_BxL=None, positions_BxL=None, cache: KVCache | None = None,
                 last_only: bool = False, features: bool = False):
        cfg = self.cfg
        B, L = tokens_BxL.shape
        embed_VxD = _embedding_table(self, cfg)
        if cache is not None:
            mask, positions_BxL = Mask.for_cache(cache), cache_positions(cache, L)
            kv = (cache.k_NxBxSxGxK, cache.v_NxBxSxGxK)
        else:
            mask, positions_BxL = Mask.for_sequence(segment_ids_BxL, causal=cfg.arch != "encoder"), _default_positions(positions_BxL, B, L)
            kv = None
        x_BxLxD = _embed(self, cfg, embed_VxD, tokens_BxL, positions_BxL, cfg.L)
        x_BxLxD, kv, _ = _blocks(cfg, cfg.N, "block", (x_BxLxD, kv, None), positions_BxL, mask, None if cache is None else cache.index)

        if last_only:  # a sampler's prefill needs only the next token's logits, not [B, L, V] of them
            x_BxLxD = x_BxLxD[:, -1:]
        if cfg.trace:
            x_BxLxD = tap(self, "final_resid_BxLxD", x_BxLxD)
        out = _head(self, cfg, embed_VxD, x_BxLxD, features)
        if cache is not None:
            cache = cache.replace(k_NxBxSxGxK=kv[0], v_NxBxSxGxK=kv[1], index=cache.index + L)
        return out, cache


class Encoder(nn.Module):
    """encoder_decoder's encoder: bidirectional blocks and a final norm over the shared embedding."""

    cfg: ModelConfig

    @nn.compact
    def __call__(self, embed_VxD, tokens_BxE, segment_ids_BxE=None, positions_BxE=None):
        cfg = self.cfg
        B, E = tokens_BxE.shape
        positions_BxE = _default_positions(positions_BxE, B, E)
        x_BxExD = _embed(self, cfg, embed_VxD, tokens_BxE, positions_BxE, cfg.L)
        mask = Mask.for_sequence(segment_ids_BxE, causal=False)
        x_BxExD, _, _ = _blocks(cfg, cfg.E, "block", (x_BxExD, None, None), positions_BxE, mask, None)
        return Norm(cfg.norm, jnp.dtype(cfg.param_dtype), cfg.norm_bias, cfg.norm_eps, name="final_norm")(x_BxExD)


class EncoderDecoder(nn.Module):
    """arch 'encoder_decoder': params {embed, encoder: {...}, block_i | blocks, final_norm[, head, pos_embed]}.

    Training passes the encoder's tokens with the decoder's; so does the sampler's prefill, which
    writes every layer's cross-attention keys/values into the cache once; later decoding steps pass
    no encoder tokens and read them from the cache.
    """

    cfg: ModelConfig

    @nn.compact
    def __call__(self, tokens_BxT, segment_ids_BxT=None, positions_BxT=None, cache: KVCache | None = None,
                 last_only: bool = False, features: bool = False, encoder_tokens_BxE=None, encoder_segment_ids_BxE=None,
                 encoder_positions_BxE=None):
        cfg = self.cfg
        B, T = tokens_BxT.shape
        embed_VxD = _embedding_table(self, cfg)
        memory_BxExD = None
        if encoder_tokens_BxE is not None:
            memory_BxExD = Encoder(cfg, name="encoder")(embed_VxD, encoder_tokens_BxE, encoder_segment_ids_BxE, encoder_positions_BxE)
        if cache is not None:
            if encoder_tokens_BxE is not None:
                real_BxE = jnp.ones_like(encoder_tokens_BxE) if encoder_segment_ids_BxE is None else encoder_segment_ids_BxE
                cache = cache.replace(cross_segment_BxE=real_BxE.astype(jnp.int32))
            mask, positions_BxT = Mask.for_cache(cache), cache_positions(cache, T)
            cross_mask = Mask.across(None, cache.cross_segment_BxE)
            kv, cross_kv = (cache.k_NxBxSxGxK, cache.v_NxBxSxGxK), (cache.cross_k_NxBxExGxK, cache.cross_v_NxBxExGxK)
        else:
            mask, positions_BxT = Mask.for_sequence(segment_ids_BxT), _default_positions(positions_BxT, B, T)
            cross_mask = Mask.across(segment_ids_BxT, encoder_segment_ids_BxE)
            kv = cross_kv = None
        x_BxTxD = _embed(self, cfg, embed_VxD, tokens_BxT, positions_BxT, cfg.T)
        x_BxTxD, kv, cross_kv = _blocks(cfg, cfg.N, "block", (x_BxTxD, kv, cross_kv), positions_BxT, mask,
                                        None if cache is None else cache.index, True, memory_BxExD, cross_mask)
        if last_only:
            x_BxTxD = x_BxTxD[:, -1:]
        out = _head(self, cfg, embed_VxD, x_BxTxD, features)
        if cache is not None:
            cache = cache.replace(k_NxBxSxGxK=kv[0], v_NxBxSxGxK=kv[1], cross_k_NxBxExGxK=cross_kv[0],
                                  cross_v_NxBxExGxK=cross_kv[1], index=cache.index + T)
        return out, cache


def _output_scale(cfg: ModelConfig) -> Callable:
    """mup's output multiplier, on the final-normed stream before the head (the same as on the logits)."""
    return _times(logit_scale(cfg.parametrization))


def _unembed(cfg: ModelConfig, final_norm: Callable, out_weight: jax.Array, x_BxLxD: jax.Array) -> jax.Array:
    """out_weight: the embedding table [V, D] when tied (transposed here), else the head [D, V]."""
    x_BxLxD = _output_scale(cfg)(final_norm(x_BxLxD))
    out_DxV = out_weight.T if cfg.tie_embeddings else out_weight
    return constrain(project(x_BxLxD, out_DxV.astype(jnp.dtype(cfg.dtype)), preferred_element_type=jnp.float32), LOGITS)


def unembed(cfg: ModelConfig, params, x_BxLxD: jax.Array) -> jax.Array:
    """float32 logits of any residual stream through the final norm and output head (the logit lens)."""
    final_norm = Norm(cfg.norm, jnp.dtype(cfg.param_dtype), cfg.norm_bias, cfg.norm_eps)
    out_weight = params["embed"] if cfg.tie_embeddings else params["head"]
    return _unembed(cfg, lambda x: final_norm.apply({"params": params["final_norm"]}, x), out_weight, x_BxLxD)


def init(cfg: ModelConfig, rng: jax.Array):
    """Boxed params (nn.Partitioned leaves carrying logical axis names)."""
    if cfg.arch == "encoder_decoder":
        tokens_1xT, tokens_1xL = jnp.zeros((1, cfg.T), jnp.int32), jnp.zeros((1, cfg.L), jnp.int32)
        return EncoderDecoder(cfg).init(rng, tokens_1xT, encoder_tokens_BxE=tokens_1xL)["params"]
    return Transformer(cfg).init(rng, jnp.zeros((1, cfg.L), jnp.int32))["params"]


def apply(cfg: ModelConfig, params, tokens_BxL, segment_ids_BxL=None, positions_BxL=None, cache=None, last_only=False,
          features=False, encoder: tuple | None = None):
    """(logits [B, L, V] float32, or [B, 1, V] at the last position with last_only, or with features the
    final-normed hidden state [B, L, D]; the updated cache). encoder: encoder_decoder's
    (tokens [B, E], segment ids or None, positions or None), which a decoding step after the prefill omits."""
    if cfg.arch == "encoder_decoder":
        return EncoderDecoder(cfg).apply({"params": params}, tokens_BxL, segment_ids_BxL, positions_BxL, cache, last_only,
                                         features, *(encoder or ()))
    return Transformer(cfg).apply({"params": params}, tokens_BxL, segment_ids_BxL, positions_BxL, cache, last_only, features)


def forward(cfg: ModelConfig, params, batch: dict) -> jax.Array:
    """float32 logits of a training or eval batch's targets, for every arch."""
    encoder = None
    if cfg.arch == "encoder_decoder":
        encoder = (batch["encoder_inputs"], batch.get("encoder_segment_ids"), batch.get("encoder_positions"))
    return apply(cfg, params, batch["inputs"], batch.get("segment_ids"), batch.get("positions"), encoder=encoder)[0]
