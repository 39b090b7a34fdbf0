"""model.parametrization (sp | mup), model.depth_parametrization (none | completep) and opt.optimizer
(adamw | muon): sp is the code before them, mup and completep equal sp at their base shape and
differ from it by the factors llm/model/parametrization.py names elsewhere, the coordinate check tells
the two apart, Muon orthogonalizes with Newton-Schulz, and a checkpoint resumes only under what wrote it."""

import json

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import cli_overrides, default_config, run_cli, tiny_config, train_run

import llm
from llm import spec
from llm.model import heads, parametrization
from llm.scaling import coordcheck
from llm.training import guard, optimizer, sharding, state

SMALL = {"model.d_model": 32, "model.num_layers": 2, "model.num_heads": 4, "model.num_kv_heads": 2, "model.d_ff": 64,
         "model.attention": "xla", "batch_size": 4, "seq_len": 16, "opt.warmup_steps": 1}
# The losses of 3 steps and the sum of squared params after them, from the code before parametrization
# and Muon existed (commit d7692e8, the same _steps): sp must not have moved. Equal to the last bit at
# XLA's default optimization level; the suite compiles at level 0 (conftest.py), which moves the last
# bits, and another CPU's vector width may too: hence 1e-6.
BEFORE = {
    "plain": ([4.866201877593994, 4.866201877593994, 4.720954418182373], 168.32803818283355),
    "gelu_layernorm_learned_untied": ([4.862601280212402, 4.862601280212402, 4.647365570068359], 168.47649445592995),
}
VARIANTS = {"plain": {}, "gelu_layernorm_learned_untied": {"model.mlp": "gelu", "model.norm": "layernorm",
                                                            "model.pos_encoding": "learned", "model.tie_embeddings": False}}


def _steps(**dotted) -> tuple[list[float], float, dict]:
    run = spec.resolve(spec.from_config(default_config(**{**SMALL, **dotted})), 60)
    mesh = sharding.make_mesh(1, 1, 1, jax.devices()[:1])
    built = state.setup(run.model, run.opt, mesh, run.mesh.rules)
    st = built.init_state(jax.random.key(0))
    tokens = np.random.default_rng(0).integers(3, 60, (4, 17), dtype=np.int32)
    batch = sharding.global_batch({"inputs": tokens[:, :-1], "targets": tokens[:, 1:], "weights": np.ones((4, 16), np.float32)}, mesh, 4)
    losses = []
    for _ in range(3):
        st, metrics = built.train_step(st, batch)
        losses.append(float(metrics["loss"]))
    squares = float(sum(np.sum(np.asarray(x, np.float64) ** 2) for x in jax.tree.leaves(st.params)))
    return losses, squares, st.params


@pytest.mark.parametrize("variant", VARIANTS)
def test_sp_is_the_code_before_parametrizations_existed(variant):
    losses, squares, _ = _steps(**VARIANTS[variant])
    np.testing.assert_allclose(losses, BEFORE[variant][0], rtol=1e-6)
    assert squares == pytest.approx(BEFORE[variant][1], rel=1e-6)


def test_mup_and_completep_at_their_base_shape_are_sp_and_elsewhere_scale_init_rates_and_logits():
    _, _, sp = _steps()
    _, _, at_base = _steps(**{"model.parametrization": "mup", "model.base_width": 32, "model.depth_parametrization": "completep",
                              "model.base_depth": 2})
    jax.tree.map(np.testing.assert_array_equal, at_base, sp)

    # Away from the base: width x4 and depth x2 over it.
    cfg = default_config(**{**SMALL, "model.parametrization": "mup", "model.base_width": 8, "model.depth_parametrization": "completep",
                            "model.base_depth": 1, "model.output_multiplier": 2.0})
    run = spec.resolve(spec.from_config(cfg), 60)
    p = run.model.parametrization
    assert (p.width_mult, p.depth_mult) == (4.0, 2.0)
    assert (parametrization.qk_scale(p), parametrization.residual_scale(p), parametrization.logit_scale(p)) == (0.5, 0.5, 0.5)
    params = jax.tree.map(np.asarray, nn.unbox(heads.init_params(run.model, jax.random.key(0))))
    block = params["block_0"]
    assert np.std(block["attn"]["wq"]) == pytest.approx(0.02 / 2, rel=0.1)  # std / sqrt(m)
    assert np.std(block["mlp"]["wi"]) == pytest.approx(0.02 / 2, rel=0.1)
    assert np.std(block["mlp"]["wo"]) == pytest.approx(0.02 / np.sqrt(2 * 1) / 2, rel=0.1)  # GPT-2's 1/sqrt(2L) at the base depth
    assert np.std(params["embed"]) == pytest.approx(0.02, rel=0.1)  # embeddings keep sp's init

    # Adam's first step moves every weight by its learning rate: hidden matrices by lr / m, the rest by lr.
    adam_run = spec.from_config(default_config(**{**SMALL, "model.parametrization": "mup", "model.base_width": 8, "opt.warmup_steps": 0,
                                                  "opt.schedule": "constant", "opt.weight_decay": 0.0, "opt.clip_norm": 0.0}))
    opt = optimizer.make(adam_run.opt, adam_run.model.parametrization)
    grads = jax.tree.map(jnp.ones_like, params)
    updates, _ = opt.update(grads, opt.init(params), params)
    lr = cfg.opt.learning_rate
    np.testing.assert_allclose(updates["block_0"]["attn"]["wq"], -lr / 4, rtol=1e-5)
    np.testing.assert_allclose(updates["block_0"]["mlp"]["wo"], -lr / 4, rtol=1e-5)
    np.testing.assert_allclose(updates["embed"], -lr, rtol=1e-5)
    np.testing.assert_allclose(updates["block_0"]["attn_norm"]["scale"], -lr, rtol=1e-5)


def _newton_schulz(G: np.ndarray, steps: int = 5) -> np.ndarray:
    """Muon's quintic iteration, written out (Jordan et al. 2024)."""
    a, b, c = 3.4445, -4.7750, 2.0315
    X = G / (np.linalg.norm(G) + 1e-7)
    tall = X.shape[0] > X.shape[1]
    X = X.T if tall else X
    for _ in range(steps):
        A = X @ X.T
        X = a * X + (b * A + c * A @ A) @ X
    return X.T if tall else X


def test_muon_orthogonalizes_the_hidden_matrices_with_newton_schulz_and_adam_moves_the_rest():
    cfg = default_config(**{**SMALL, "opt.optimizer": "muon", "opt.warmup_steps": 0, "opt.schedule": "constant",
                            "opt.weight_decay": 0.0, "opt.muon_weight_decay": 0.0, "opt.clip_norm": 0.0})
    oc = spec.from_config(cfg).opt
    rng = np.random.default_rng(0)
    params = {"embed": rng.normal(size=(60, 32)).astype(np.float32),
              "block_0": {"mlp": {"wi": rng.normal(size=(32, 64)).astype(np.float32), "wo": rng.normal(size=(64, 32)).astype(np.float32)},
                          "attn": {"wq": rng.normal(size=(32, 4, 8)).astype(np.float32)}},
              "blocks": {"mlp": {"wi": rng.normal(size=(3, 32, 64)).astype(np.float32)}}}  # a scanned stack of 3 layers
    grads = jax.tree.map(lambda x: rng.normal(size=x.shape).astype(np.float32), params)
    opt = optimizer.make(oc)
    updates, _ = opt.update(grads, opt.init(params), params)
    lr = oc.muon_learning_rate
    # Step 1's Nesterov momentum is a positive multiple of the gradient, and the iteration normalizes it away.
    wi, wo = grads["block_0"]["mlp"]["wi"], grads["block_0"]["mlp"]["wo"]
    np.testing.assert_allclose(updates["block_0"]["mlp"]["wi"], -lr * np.sqrt(64 / 32) * _newton_schulz(wi), atol=2e-4)
    np.testing.assert_allclose(updates["block_0"]["mlp"]["wo"], -lr * _newton_schulz(wo), atol=2e-4)
    wq = grads["block_0"]["attn"]["wq"]  # [D, H, K]: one [D, H * K] matrix
    np.testing.assert_allclose(updates["block_0"]["attn"]["wq"].reshape(32, 32), -lr * _newton_schulz(wq.reshape(32, 32)), atol=2e-4)
    for layer in range(3):  # each layer of a scanned stack alone
        np.testing.assert_allclose(updates["blocks"]["mlp"]["wi"][layer], -lr * np.sqrt(2) * _newton_schulz(grads["blocks"]["mlp"]["wi"][layer]),
                                   atol=2e-4)
    # The embedding is Adam's: its first step is -lr * g / (|g| + eps).
    g = grads["embed"]
    np.testing.assert_allclose(updates["embed"], -oc.learning_rate * g / (np.abs(g) + oc.eps), rtol=1e-4)
    singular = np.linalg.svd(_newton_schulz(wi), compute_uv=False)
    assert 0.6 < singular.min() and singular.max() < 1.3  # what the iteration is for: all singular values near 1


@pytest.fixture(scope="module")
def mup_muon_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("mup")
    from conftest import write_corpus

    corpus = write_corpus(root / "corpus.txt", 20_000)
    overrides = dict(num_train_steps=8, checkpoint_every_steps=4, eval_every_steps=8, log_every_steps=1, opt__warmup_steps=1,
                     model__parametrization="mup", model__base_width=16, model__depth_parametrization="completep",
                     model__base_depth=1, opt__optimizer="muon")
    summary = train_run(tiny_config(corpus, **overrides), root / "run", quiet=True)
    return root / "run", corpus, overrides, summary


def test_a_mup_muon_run_trains_reloads_with_its_parametrization_and_resumes_only_under_it(mup_muon_run):
    workdir, corpus, overrides, summary = mup_muon_run
    losses = [r["loss"] for r in map(json.loads, open(workdir / "metrics.jsonl")) if "loss" in r]
    assert losses[-1] < losses[0] - 0.1
    run = llm.load(str(workdir))
    assert run.model_config.parametrization.width_mult == 2.0 and run.model_config.parametrization.completep
    assert run.evaluate()["loss"] == pytest.approx(summary["eval_loss"], rel=1e-5)  # the forward multipliers came back

    changed = {**overrides, "model__parametrization": "sp", "opt__optimizer": "adamw", "num_train_steps": 12}
    result = run_cli("train", f"--workdir={workdir}", *cli_overrides(corpus, mesh__cpu_devices=0, **changed))
    assert result.returncode == guard.EXIT_ERROR
    assert result.stderr.strip().splitlines()[-1] == (
        f"error: cannot start from {workdir}: model.parametrization='mup' in the checkpoint, 'sp' now; opt.optimizer='muon' in the "
        "checkpoint, 'adamw' now (set them as they were, or use a new workdir)")
    assert llm.load(str(workdir)).step == 8  # nothing was written
    # Fine-tuning reads the params under the config's parametrization too (another optimizer is fine).
    fine = {**changed, "opt__optimizer": "muon", "init_from": str(workdir)}
    result = run_cli("train", f"--workdir={workdir.parent / 'fine'}", *cli_overrides(corpus, mesh__cpu_devices=0, **fine))
    assert result.returncode == guard.EXIT_ERROR and "model.parametrization='mup' in the run it starts from, 'sp' now" in result.stderr


@pytest.mark.parametrize("overrides, message", [
    ({"model.parametrization": "ntk"}, "model.parametrization='ntk' is not one of sp, mup"),
    ({"model.depth_parametrization": "depth-mup"}, "model.depth_parametrization='depth-mup' is not one of none, completep"),
    ({"opt.optimizer": "sgd"}, "opt.optimizer='sgd' is not one of adamw, muon"),
    ({"model.base_width": 0}, "model.base_width and model.base_depth must be positive"),
])
def test_bad_parametrization_keys_are_one_clear_message(overrides, message):
    with pytest.raises(spec.ConfigError, match=message):
        spec.validate(default_config(**overrides))


def test_the_coordinate_check_finds_mup_flat_in_width_and_sp_growing(tmp_path):
    cfg = default_config(**{"model.num_heads": 4, "model.num_kv_heads": 2, "model.num_layers": 2, "model.d_model": 64,
                            "model.d_ff": 128, "batch_size": 8, "seq_len": 32, "model.attention": "xla"})
    sp = coordcheck.slopes(coordcheck.measure(cfg, [32, 64, 128], 3))
    assert sp["logits"] > 0.5 and sp["attention"] > 1.0 and sp["mlp"] > 1.0  # after updates, SP's outputs grow with width

    flags = [f"--config.{k}={v}" for k, v in {"model.num_heads": 4, "model.num_kv_heads": 2, "model.num_layers": 2, "model.d_model": 64,
                                               "model.d_ff": 128, "batch_size": 8, "seq_len": 32, "model.parametrization": "mup",
                                               "model.base_width": 64}.items()]
    result = run_cli("coordcheck", "--widths=32,64,128", "--steps=3", f"--out={tmp_path}", *flags)
    assert result.returncode == 0, result.stderr[-2000:]
    out = json.loads(result.stdout.strip().splitlines()[-1])
    assert (out["parametrization"], out["widths"], out["steps"]) == ("mup", [32, 64, 128], 3)
    assert set(out["slopes"]) == set(coordcheck.KINDS)
    assert all(abs(s) < 0.3 for s in out["slopes"].values()), out["slopes"]
    assert (tmp_path / "coordcheck_mup.png").stat().st_size > 10_000

    bad = run_cli("coordcheck", "--widths=32,30", f"--out={tmp_path}", *flags)
    assert bad.returncode == guard.EXIT_ERROR and "model.d_model=30 is not divisible by model.num_heads=4" in bad.stderr
