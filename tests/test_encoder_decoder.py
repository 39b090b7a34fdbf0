"""model.arch='encoder' and 'encoder_decoder': the stacks, cross-attention, packing, cached decoding,
parameter and FLOP counts, and training (span corruption, MLM, seq2seq) that resumes exactly."""

import dataclasses
import json
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import REPO, run_cli, tiny_config, train_run

import llm
from llm import model, spec as config_lib
from llm.model import ModelConfig, sample
from llm.spec import ConfigError

VARIANTS = [
    dict(pos_encoding="rope", norm="rmsnorm", mlp="swiglu", tie_embeddings=True, G=2),
    dict(pos_encoding="learned", norm="layernorm", mlp="gelu", tie_embeddings=False, G=4),
    dict(pos_encoding="sinusoidal", norm="layernorm", mlp="swiglu", tie_embeddings=True, G=1, scan_layers=True),
]
FEW = VARIANTS[1:]  # learned and sinusoidal positions, both norms and MLPs, tied and untied, scanned and not


def make(arch: str, **kw) -> ModelConfig:
    base = dict(V=61, D=32, F=48, N=2, H=4, G=2, L=12, arch=arch)
    if arch == "encoder_decoder":
        base.update(E=3, T=10)
    return ModelConfig(**{**base, **kw})


def params_of(cfg: ModelConfig, seed: int = 0):
    # Larger than init's 0.02 so that every position's logits visibly depend on what it attends to.
    return jax.tree.map(lambda p: 4.0 * p, nn.unbox(jax.jit(lambda key: model.init(cfg, key))(jax.random.key(seed))))


def tokens(shape, seed: int, V: int = 61):
    return jax.random.randint(jax.random.key(seed), shape, 3, V)


@pytest.mark.parametrize("arch", ["decoder", "encoder", "encoder_decoder"])
@pytest.mark.parametrize("variant", VARIANTS)
def test_each_archs_param_count_equals_its_formula(arch, variant):
    cfg = make(arch, **variant)
    params = nn.unbox(jax.eval_shape(lambda: model.init(cfg, jax.random.key(0))))  # the real tree's shapes, nothing computed
    leaves = jax.tree_util.tree_leaves_with_path(params)
    total = sum(x.size for _, x in leaves)
    embedding = sum(x.size for path, x in leaves if path[-1].key in ("embed", "pos_embed", "head"))
    counts = model.param_counts(cfg)
    assert counts == {"total": total, "non_embedding": total - embedding}


def _matmul_flops(cfg: ModelConfig, params, batch) -> float:
    """XLA's count of the forward pass's dot FLOPs (2 per multiply-add), from the compiled HLO."""
    compiled = jax.jit(lambda p, b: model.forward(cfg, p, b)).lower(params, batch).compile()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    return float(cost["flops"])


@pytest.mark.parametrize("arch", ["decoder", "encoder_decoder"])
def test_flops_per_token_matches_xlas_count_of_the_forward_pass(arch):
    # Training is forward + backward = 3 x forward; XLA also counts the elementwise work (norms,
    # softmax, activations), a few percent at this width, so the formula may only be slightly below.
    cfg = make(arch, D=64, F=256, H=4, G=4, V=256, L=32, fused_qkv=False, **({"T": 16} if arch == "encoder_decoder" else {}))
    params = nn.unbox(model.init(cfg, jax.random.key(0)))
    B = 2
    batch = {"inputs": jnp.zeros((B, cfg.T or cfg.L), jnp.int32)}
    if arch == "encoder_decoder":
        batch["encoder_inputs"] = jnp.zeros((B, cfg.L), jnp.int32)
    measured = 3 * _matmul_flops(cfg, params, batch) / (B * cfg.L)
    assert 0.85 < model.flops_per_token(cfg) / measured <= 1.0


def test_encoder_decoder_flops_grow_with_each_stack():
    cfg = make("encoder_decoder")
    more_encoder, more_decoder = dataclasses.replace(cfg, E=cfg.E + 1), dataclasses.replace(cfg, N=cfg.N + 1)
    longer_target = dataclasses.replace(cfg, T=cfg.T * 2)
    f = model.flops_per_token
    assert f(more_encoder) > f(cfg) and f(more_decoder) > f(more_encoder) and f(longer_target) > f(cfg)


def _reference_cross_attention(attn_params, x_BxTxD, memory_BxExD, q_segment_BxT, kv_segment_BxE, H, G):
    """Multi-head attention written out with numpy loops: queries of x, keys and values of memory."""
    wq, wk, wv, wo = (np.asarray(attn_params[k], np.float64) for k in ("wq", "wk", "wv", "wo"))
    x, m = np.asarray(x_BxTxD, np.float64), np.asarray(memory_BxExD, np.float64)
    B, T, D = x.shape
    K = wq.shape[-1]
    out = np.zeros((B, T, D))
    for b in range(B):
        for h in range(H):
            g = h // (H // G)
            q, k, v = x[b] @ wq[:, h], m[b] @ wk[:, g], m[b] @ wv[:, g]
            scores = q @ k.T / np.sqrt(K)
            visible = (q_segment_BxT[b][:, None] == kv_segment_BxE[b][None, :]) & (kv_segment_BxE[b][None, :] != 0)
            scores = np.where(visible, scores, -1e30)
            p = np.exp(scores - scores.max(-1, keepdims=True))
            p /= p.sum(-1, keepdims=True)
            out[b] += (p @ v) @ wo[h]
    return out


def test_cross_attention_is_the_attention_module_fed_with_another_sequences_keys_and_values():
    from llm.model.attention import Attention, Mask

    H, G, K, D = 4, 2, 8, 32
    attn = Attention(H, G, K, "rope", 10000.0, jnp.float32, jnp.float32, 0.02, cross=True)
    x_BxTxD, memory_BxExD = jax.random.normal(jax.random.key(0), (2, 5, D)), jax.random.normal(jax.random.key(1), (2, 7, D))
    q_segment = np.array([[1, 1, 2, 2, 0], [1, 1, 1, 1, 1]])
    kv_segment = np.array([[1, 1, 1, 2, 2, 2, 0], [1, 1, 1, 1, 1, 0, 0]])
    params = attn.init(jax.random.key(2), x_BxTxD, None, Mask.across(q_segment, kv_segment), memory_BxExD=memory_BxExD)["params"]
    params = jax.tree.map(lambda p: 5.0 * p, nn.unbox(params))
    out, _ = attn.apply({"params": params}, x_BxTxD, None, Mask.across(jnp.asarray(q_segment), jnp.asarray(kv_segment)),
                        memory_BxExD=memory_BxExD)
    expected = _reference_cross_attention(params, x_BxTxD, memory_BxExD, q_segment, kv_segment, H, G)
    real = q_segment != 0  # a padding query sees no key: its output is a uniform mix, never compared
    np.testing.assert_allclose(np.asarray(out)[real], expected[real], rtol=2e-4, atol=2e-5)


@pytest.mark.parametrize("variant", FEW[:1])  # the masks are the variants' shared code; cached decoding covers both
def test_the_encoder_decoders_decoder_is_causal_and_its_encoder_bidirectional(variant):
    cfg = make("encoder_decoder", **variant)
    params = params_of(cfg)
    enc, dec = tokens((2, cfg.L), 1), tokens((2, cfg.T), 2)
    forward = jax.jit(lambda e, d: model.apply(cfg, params, d, encoder=(e, None, None))[0])
    logits = lambda e, d: np.asarray(forward(e, d))
    base = logits(enc, dec)
    t = 4
    later_target = dec.at[:, t + 1].set((dec[:, t + 1] + 5) % cfg.V)
    changed = logits(enc, later_target)
    np.testing.assert_array_equal(base[:, : t + 1], changed[:, : t + 1])
    assert not np.allclose(base[:, t + 1 :], changed[:, t + 1 :])
    # The last encoder token reaches every decoder position, the first included.
    last_input = enc.at[:, -1].set((enc[:, -1] + 5) % cfg.V)
    assert not np.allclose(logits(last_input, dec)[:, 0], base[:, 0])


@pytest.mark.parametrize("variant", FEW[1:])
def test_an_encoder_sees_both_ways(variant):
    cfg = make("encoder", **variant)
    params = params_of(cfg)
    x = tokens((2, cfg.L), 3)
    forward = jax.jit(lambda x: model.apply(cfg, params, x)[0])
    base = np.asarray(forward(x))
    later = x.at[:, -1].set((x[:, -1] + 5) % cfg.V)
    assert not np.allclose(np.asarray(forward(later))[:, 0], base[:, 0])


@pytest.mark.parametrize("variant", FEW[1:])
def test_packed_examples_never_see_each_other_in_either_stack(variant):
    cfg = make("encoder_decoder", **variant)
    params = params_of(cfg)
    # Example 1 takes encoder slots 0-4 and decoder slots 0-3; example 2 the rest (then padding).
    enc_seg = jnp.asarray([[1] * 5 + [2] * 6 + [0]])
    dec_seg = jnp.asarray([[1] * 4 + [2] * 5 + [0]])
    positions = lambda seg: jnp.asarray([[i - int(np.argmax(np.asarray(seg[0]) == s)) if s else 0 for i, s in enumerate(np.asarray(seg[0]))]])
    enc_pos, dec_pos = positions(enc_seg), positions(dec_seg)
    enc, dec = tokens((1, cfg.L), 4), tokens((1, cfg.T), 5)

    forward = jax.jit(lambda e, d: model.apply(cfg, params, d, dec_seg, dec_pos, encoder=(e, enc_seg, enc_pos))[0])

    def logits(e, d):
        return np.asarray(forward(e, d))

    base = logits(enc, dec)
    other_a = logits(enc.at[0, :5].set((enc[0, :5] + 7) % cfg.V), dec.at[0, :4].set((dec[0, :4] + 7) % cfg.V))
    np.testing.assert_allclose(other_a[0, 4:9], base[0, 4:9], rtol=1e-5, atol=1e-5)
    assert not np.allclose(other_a[0, :4], base[0, :4])
    # Example 2 alone, unpacked, computes the same.
    alone = np.asarray(jax.jit(lambda e, d: model.apply(cfg, params, d, encoder=(e, None, None))[0])(enc[:, 5:11], dec[:, 4:9]))
    np.testing.assert_allclose(alone[0], base[0, 4:9], rtol=1e-4, atol=1e-4)


def test_packed_examples_never_see_each_other_in_an_encoder():
    cfg = make("encoder")
    params = params_of(cfg)
    seg = jnp.asarray([[1] * 5 + [2] * 7])
    pos = jnp.asarray([list(range(5)) + list(range(7))])
    x = tokens((1, cfg.L), 6)
    forward = jax.jit(lambda x, seg, pos: model.apply(cfg, params, x, seg, pos)[0])
    base = np.asarray(forward(x, seg, pos))
    changed = np.asarray(forward(x.at[0, :5].set((x[0, :5] + 7) % cfg.V), seg, pos))
    np.testing.assert_allclose(changed[0, 5:], base[0, 5:], rtol=1e-5, atol=1e-5)
    alone = np.asarray(jax.jit(lambda x: model.apply(cfg, params, x)[0])(x[:, 5:]))
    np.testing.assert_allclose(alone[0], base[0, 5:], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("variant", FEW)
def test_cached_seq2seq_decoding_equals_recomputing_the_whole_target(variant):
    cfg = make("encoder_decoder", **variant)
    params = params_of(cfg)
    inputs = [[5, 9, 11, 7, 20], [8, 3, 30, 31, 12, 13, 14, 40, 41]]  # different lengths: right padding is masked
    out = sample.generate_seq2seq(cfg, params, inputs, max_new_tokens=cfg.T, bos_id=1, eos_id=-1, pad_id=0,
                                  vocab_limit=cfg.V, temperature=0.0)
    # Greedy by recomputation: each next token is the argmax of a full, uncached forward pass over a
    # fixed-size target buffer (one compiled shape; causal, so the unfilled tail changes nothing).
    full = jax.jit(lambda d, e: model.apply(cfg, params, d, encoder=(e, None, None))[0])
    for x, answer in zip(inputs, out):
        assert len(answer) == cfg.T
        decoded = np.zeros((1, cfg.T), np.int32)
        decoded[0, 0] = 1
        for t in range(cfg.T):
            token = int(jnp.argmax(full(jnp.asarray(decoded), jnp.asarray([x]))[0, t]))
            if t + 1 < cfg.T:
                decoded[0, t + 1] = token
            else:
                last = token
        assert answer == decoded[0, 1:].tolist() + [last]


def test_the_sampler_writes_the_cross_attention_cache_once_and_decodes_from_it():
    cfg = make("encoder_decoder")
    params = params_of(cfg)
    from llm.model.attention import KVCache

    cache = KVCache.zeros(cfg.N, 1, cfg.T, cfg.G, cfg.K, jnp.float32, encoder_len=cfg.L)
    enc = tokens((1, cfg.L), 7)
    _, cache = jax.jit(lambda c, e: model.apply(cfg, params, jnp.asarray([[1]]), cache=c, encoder=(e, None, None)))(cache, enc)
    assert bool(jnp.all(cache.cross_segment_BxE == 1))
    assert bool(jnp.all(jnp.any(cache.cross_k_NxBxExGxK != 0, axis=(1, 2, 3, 4))))  # every layer's keys were written
    written = cache.cross_k_NxBxExGxK
    _, cache = jax.jit(lambda c: model.apply(cfg, params, jnp.asarray([[9]]), cache=c))(cache)  # no encoder input: the cached keys are used as they are
    np.testing.assert_array_equal(np.asarray(cache.cross_k_NxBxExGxK), np.asarray(written))


# Training: the configs, the data, exact resume.


def test_bad_arch_configs_fail_with_one_message_before_compiling(corpus):
    for overrides, message in [
        (dict(model__arch="decoder_encoder"), "model.arch='decoder_encoder' is not one of"),
        (dict(model__arch="encoder", objective="dpo", init_from="x"), "model.arch='encoder' trains objective='lm'"),
        (dict(model__arch="encoder_decoder", data__packing="documents"), "span corruption reads the concatenated"),
        (dict(model__arch="encoder_decoder", seq_len=2), "span corruption"),
        (dict(model__arch="encoder", data__mask_fraction=0.0), "data.mask_fraction must be in (0, 1)"),
        (dict(model__arch="decoder", target_len=8), "target_len is the decoder length"),
        (dict(model__arch="encoder", data__dataset="seq2seq:/nowhere/*.jsonl"), "'seq2seq:' data trains model.arch='decoder' or"),
    ]:
        with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
            config_lib.validate(tiny_config(corpus, **overrides))


def _logged(workdir) -> dict[int, dict]:
    return {r["step"]: r for r in map(json.loads, open(workdir / "metrics.jsonl")) if "loss" in r}


def _seq2seq_file(tmp_path) -> str:
    sys.path.insert(0, str(REPO))
    from experiments.encoder_decoder import task

    path = task.write(str(tmp_path / "reverse.jsonl"), task.make("reverse", 300, seed=0))
    return f"seq2seq:{path}"


def _check_seq2seq_run(workdir, summary, validation_examples: int):
    """Held-out loss as training logged it, exact match, and the CLI's answer to --input."""
    run = llm.load(str(workdir))
    result = run.evaluate()
    assert result["loss"] == pytest.approx(summary["eval_loss"], rel=1e-6)
    assert 0.0 <= result["exact_match"] <= 1.0 and result["examples"] == validation_examples
    answer = run.answer("abcdef", max_new_tokens=8)[0]
    if run.model_config.arch == "encoder_decoder":  # the CLI is the same run.answer for both archs: one process start
        cli = run_cli("sample", f"--workdir={workdir}", "--input=abcdef", "--temperature=0", "--max_new_tokens=8")
        assert cli.returncode == 0, cli.stderr[-2000:]
        assert cli.stdout.strip("\n") == answer
    else:
        assert isinstance(answer, str)


@pytest.mark.parametrize("arch", ["decoder", "encoder_decoder"])
def test_seq2seq_runs_report_exact_match_and_answer_from_the_cli(corpus, tmp_path, arch):
    workdir = tmp_path / arch
    cfg = tiny_config(corpus, model__arch=arch, data__dataset=_seq2seq_file(tmp_path), num_train_steps=20, eval_every_steps=20,
                      checkpoint_every_steps=20, seq_len=40, target_len=20 if arch == "encoder_decoder" else 0)
    _check_seq2seq_run(workdir, train_run(cfg, str(workdir), quiet=True), 30)


def test_an_arch_sweep_repeats_every_point_per_arch_with_its_own_flops(tmp_path):
    from configs.sweeps import arch_isoflop_cpu
    from llm.scaling import fit, points as points_lib, sweep

    points = points_lib.expand(arch_isoflop_cpu.get_config())
    by_arch = {arch: [p for p in points if p.name.startswith(f"{arch}-")] for arch in ("decoder", "encoder_decoder")}
    assert len(by_arch["decoder"]) == len(by_arch["encoder_decoder"]) == len(points) // 2
    for arch, chosen in by_arch.items():
        for p in chosen:
            assert p.config.model.arch == arch and p.config.name.endswith(p.name)
            mc = config_lib.resolve(config_lib.from_config(p.config), points_lib.sweep_tokenizer(p.config)).model
            assert p.flops_per_token == model.flops_per_token(mc) and p.params == model.param_counts(mc)["total"]
            assert abs(p.flops / p.budget - 1) < 0.05  # each arch spends the budget on its own FLOPs
    # fit --arch reads one arch's rows of a mixed results.csv.
    rows = ["name,params,tokens,loss"] + [f"{p.name},{p.params},{p.tokens},{1 + 1e3 / p.params ** 0.3}" for p in points]
    (tmp_path / "results.csv").write_text("\n".join(rows) + "\n")
    assert len(fit.load_points(str(tmp_path / "results.csv"), "encoder_decoder")["loss"]) == len(by_arch["encoder_decoder"])
    with pytest.raises(ValueError, match="no rows of arch 'encoder'"):
        fit.load_points(str(tmp_path / "results.csv"), "encoder")
