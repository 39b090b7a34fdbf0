import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import default
from llm import model, spec as config_lib
from llm.model import ModelConfig, transformer
from llm.training.loss import cross_entropy_sums

VARIANTS = [
    dict(pos_encoding="rope", norm="rmsnorm", mlp="swiglu", tie_embeddings=True, G=2),
    dict(pos_encoding="learned", norm="layernorm", mlp="gelu", tie_embeddings=False, G=4),
    dict(pos_encoding="sinusoidal", norm="layernorm", mlp="swiglu", tie_embeddings=True, G=1, norm_bias=False),
    dict(pos_encoding="rope", norm="rmsnorm", mlp="gelu", tie_embeddings=False, G=2, scan_layers=True),
]


def make(**kw) -> ModelConfig:
    base = dict(V=61, D=32, F=96, N=2, H=4, G=2, L=16)
    return ModelConfig(**{**base, **kw})


@pytest.mark.parametrize("variant", VARIANTS)
def test_param_count_matches_formula(variant):
    cfg = make(**variant)
    params = nn.unbox(model.init(cfg, jax.random.key(0)))
    leaves = jax.tree_util.tree_leaves_with_path(params)
    total = sum(x.size for _, x in leaves)
    embedding = sum(x.size for path, x in leaves if path[-1].key in ("embed", "pos_embed", "head"))
    counts = model.param_counts(cfg)
    assert counts["total"] == total
    assert counts["non_embedding"] == total - embedding


def test_flops_per_token_is_6n_plus_attention():
    cfg = make(N=3, L=64)
    n_matmul = model.param_counts(cfg)["non_embedding"] + cfg.V * cfg.D
    assert model.flops_per_token(cfg) == 6 * n_matmul + 12 * 3 * cfg.H * cfg.K * 64


@pytest.mark.parametrize("variant", VARIANTS)
def test_changing_a_future_token_leaves_past_logits_unchanged(variant):
    cfg = make(**variant)
    params = nn.unbox(model.init(cfg, jax.random.key(1)))
    tokens = jax.random.randint(jax.random.key(2), (2, cfg.L), 0, cfg.V)
    t = 9
    changed = tokens.at[:, t + 1].set((tokens[:, t + 1] + 7) % cfg.V)
    logits_a, _ = model.apply(cfg, params, tokens)
    logits_b, _ = model.apply(cfg, params, changed)
    np.testing.assert_array_equal(np.asarray(logits_a[:, : t + 1]), np.asarray(logits_b[:, : t + 1]))
    assert not np.allclose(logits_a[:, t + 1 :], logits_b[:, t + 1 :])


@pytest.mark.parametrize("variant", VARIANTS)
def test_initial_loss_is_close_to_log_vocab(variant):
    cfg = make(**variant, V=200)
    params = nn.unbox(model.init(cfg, jax.random.key(3)))
    tokens = jax.random.randint(jax.random.key(4), (8, cfg.L + 1), 0, cfg.V)
    logits, _ = model.apply(cfg, params, tokens[:, :-1])
    loss_sum, _, n = cross_entropy_sums(logits, tokens[:, 1:], jnp.ones((8, cfg.L)))
    assert abs(float(loss_sum / n) - math.log(cfg.V)) < 0.1


def test_sinusoidal_encoding_matches_the_formula():
    D, positions = 16, np.arange(50)
    expected = np.zeros((50, D))
    for i in positions:
        for k in range(D // 2):
            angle = i / 10000 ** (2 * k / D)
            expected[i, 2 * k] = math.sin(angle)
            expected[i, 2 * k + 1] = math.cos(angle)
    got = np.asarray(transformer.sinusoidal(jnp.asarray(positions)[None], D))[0]
    np.testing.assert_allclose(got, expected, atol=2e-5)


def test_every_param_has_logical_axis_names():
    cfg = make(pos_encoding="learned", tie_embeddings=False, scan_layers=True)
    specs = jax.tree.leaves(nn.get_partition_spec(model.init(cfg, jax.random.key(0))), is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec))
    params = jax.tree.leaves(nn.unbox(model.init(cfg, jax.random.key(0))))
    assert len(specs) == len(params)
    for spec, p in zip(specs, params):
        assert len(spec) == p.ndim and all(isinstance(name, str) for name in spec)


def test_scan_and_loop_give_the_same_function():
    cfg_loop, cfg_scan = make(), make(scan_layers=True)
    params_loop = nn.unbox(model.init(cfg_loop, jax.random.key(0)))
    # Stack the per-layer params of the loop model into the scanned layout.
    blocks = [params_loop[f"block_{i}"] for i in range(cfg_loop.N)]
    params_scan = {k: v for k, v in params_loop.items() if not k.startswith("block_")}
    params_scan["blocks"] = jax.tree.map(lambda *xs: jnp.stack(xs), *blocks)
    tokens = jax.random.randint(jax.random.key(5), (2, cfg_loop.L), 0, cfg_loop.V)
    a, _ = model.apply(cfg_loop, params_loop, tokens)
    b, _ = model.apply(cfg_scan, params_scan, tokens)
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5)


@pytest.mark.parametrize("remat", ["block", "dots"])
def test_remat_leaves_loss_and_grads_unchanged(remat):
    tokens = jax.random.randint(jax.random.key(6), (2, 17), 0, 61)

    def loss(cfg, params):
        logits, _ = model.apply(cfg, params, tokens[:, :-1])
        return cross_entropy_sums(logits, tokens[:, 1:], jnp.ones((2, 16)))[0]

    plain, with_remat = make(), make(remat=remat)
    params = nn.unbox(model.init(plain, jax.random.key(0)))
    l1, g1 = jax.value_and_grad(lambda p: loss(plain, p))(params)
    l2, g2 = jax.value_and_grad(lambda p: loss(with_remat, p))(params)
    assert float(l1) == pytest.approx(float(l2), rel=1e-6)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6), g1, g2)


def test_bfloat16_compute_keeps_float32_params_and_logits():
    cfg = make(dtype="bfloat16")
    params = nn.unbox(model.init(cfg, jax.random.key(0)))
    assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(params))
    logits, _ = model.apply(cfg, params, jnp.zeros((1, 16), jnp.int32))
    assert logits.dtype == jnp.float32


@pytest.mark.parametrize("scan_layers", [False, True])
def test_attention_only_blocks_have_no_mlp_and_exact_param_and_flop_counts(scan_layers):
    cfg = make(F=0, D=64, H=4, G=4, V=256, L=32, fused_qkv=False, scan_layers=scan_layers)
    params = nn.unbox(jax.eval_shape(lambda: model.init(cfg, jax.random.key(0))))
    block = params["blocks"] if scan_layers else params["block_0"]
    assert sorted(block) == ["attn", "attn_norm"]
    leaves = jax.tree_util.tree_leaves_with_path(params)
    total = sum(x.size for _, x in leaves)
    assert model.param_counts(cfg) == {"total": total, "non_embedding": total - cfg.V * cfg.D}
    if not scan_layers:  # XLA's cost analysis counts a scanned loop's body once, not once per layer
        # XLA's FLOPs of the forward, x3 for training; the formula leaves out only elementwise work.
        batch = {"inputs": jnp.zeros((2, cfg.L), jnp.int32)}
        cost = jax.jit(lambda p, b: model.forward(cfg, p, b)).lower(params, batch).compile().cost_analysis()
        measured = 3 * float((cost[0] if isinstance(cost, list) else cost)["flops"]) / (2 * cfg.L)
        assert 0.85 < model.flops_per_token(cfg) / measured <= 1.0
    # config: 0 is allowed for the decoder only, below 0 never
    c = default.get_config()
    c.model.d_ff = 0
    config_lib.validate(c)
    c.model.arch = "encoder_decoder"
    with pytest.raises(config_lib.ConfigError, match="d_ff=0 .* is for model.arch='decoder' only"):
        config_lib.validate(c)
    c.model.arch, c.model.d_ff = "decoder", -1
    with pytest.raises(config_lib.ConfigError, match="d_ff must be >= 0"):
        config_lib.validate(c)
