import json
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import tiny_config, train_run

from llm import model
from llm.model import ModelConfig
from llm.training import checkpoint, loop, optimizer as optim, state as state_lib


def _step_fn(cfg: ModelConfig, **opt):
    base = dict(num_train_steps=100, learning_rate=1e-2, warmup_steps=0, schedule="constant", final_lr_ratio=1.0,
                decay_fraction=0.2, b1=0.9, b2=0.99, eps=1e-8, weight_decay=0.0, decay_embeddings=False,
                clip_norm=0.0, grad_accum_steps=1, z_loss=0.0)
    oc = optim.OptConfig(**{**base, **opt})
    tx = optim.make(oc)
    params = nn.unbox(model.init(cfg, jax.random.key(0)))
    state = state_lib.TrainState(jnp.int32(0), params, tx.init(params))
    return state, jax.jit(state_lib.make_train_step(cfg, tx, oc))


def _batch(B, L, V, seed=0, weights=None):
    tokens = np.asarray(jax.random.randint(jax.random.key(seed), (B, L + 1), 3, V))
    w = np.ones((B, L), np.float32) if weights is None else weights
    return {"inputs": tokens[:, :-1], "targets": tokens[:, 1:], "weights": w}


CFG = ModelConfig(V=50, D=32, F=64, N=2, H=4, G=2, L=16)


def test_gradient_accumulation_equals_one_big_batch():
    # Uneven token counts per micro-batch: per-token normalisation must still match the big batch.
    weights = np.ones((8, 16), np.float32)
    weights[0, 5:] = 0
    weights[3, 1:] = 0
    batch = _batch(8, 16, 50, weights=weights)
    # eps=1 makes Adam's first update linear in the gradient instead of ~sign(g), which would
    # blow float rounding of near-zero gradient entries up to a full learning-rate step.
    state1, step1 = _step_fn(CFG, grad_accum_steps=1, z_loss=1e-4, eps=1.0)
    state4, step4 = _step_fn(CFG, grad_accum_steps=4, z_loss=1e-4, eps=1.0)
    new1, m1 = step1(state1, batch)
    new4, m4 = step4(state4, batch)
    assert float(m1["loss"]) == pytest.approx(float(m4["loss"]), rel=1e-6)
    assert float(m1["grad_norm"]) == pytest.approx(float(m4["grad_norm"]), rel=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-8), new1.params, new4.params)


def test_a_tiny_model_overfits_one_batch():
    batch = _batch(4, 16, 50, seed=1)
    state, step = _step_fn(CFG, learning_rate=1e-2)
    for _ in range(150):
        state, metrics = step(state, batch)
    assert float(metrics["loss"]) < 0.05


def test_checkpoint_round_trip_is_exact(tmp_path):
    state, step = _step_fn(CFG)
    state, _ = step(state, _batch(4, 16, 50))
    mngr = checkpoint.manager(str(tmp_path), keep=2)
    checkpoint.save(mngr, 7, state.params, state.opt_state, {"step": 7, "data": {"epoch": 1, "batch_in_epoch": 3}})
    mngr.wait_until_finished()
    abstract = lambda tree: jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), tree)
    params, opt_state, meta = checkpoint.restore(mngr, 7, abstract(state.params), abstract(state.opt_state))
    mngr.close()
    assert meta == {"step": 7, "data": {"epoch": 1, "batch_in_epoch": 3}}
    jax.tree.map(np.testing.assert_array_equal, params, state.params)
    jax.tree.map(np.testing.assert_array_equal, opt_state, state.opt_state)
    assert checkpoint.latest_step(str(tmp_path)) == 7


def test_non_finite_loss_stops_the_run_and_keeps_the_last_good_checkpoint(tmp_path, corpus):
    cfg = tiny_config(corpus, num_train_steps=20, checkpoint_every_steps=1, opt__learning_rate=1e30, opt__warmup_steps=0,
                      opt__schedule="constant", opt__clip_norm=0.0)
    with pytest.raises(loop.NonFiniteLossError, match=r"at step (\d+)") as err:
        train_run(cfg, str(tmp_path), quiet=True)
    bad_step = int(err.value.args[0].split("at step ")[1].split(";")[0])
    good = checkpoint.latest_step(str(tmp_path))
    assert good == bad_step - 1
    from llm.run import api

    params = api.load(str(tmp_path)).params
    assert all(np.isfinite(np.asarray(p)).all() for p in jax.tree.leaves(params))


def test_metrics_tensorboard_and_workdir_contents(tmp_path, corpus):
    cfg = tiny_config(corpus, num_train_steps=12, log_every_steps=5, eval_every_steps=5, checkpoint_every_steps=6)
    summary = train_run(cfg, str(tmp_path), quiet=True)
    records = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
    train_records = [r for r in records if "loss" in r]
    eval_records = [r for r in records if "eval_loss" in r]
    assert [r["step"] for r in train_records] == [5, 10, 12]  # the last step is always logged
    for key in ("loss", "perplexity", "learning_rate", "grad_norm", "tokens_per_s", "mfu"):
        assert key in train_records[-1]
    assert all(r["tokens_per_s"] > 0 and r["mfu"] > 0 for r in train_records)  # steps 5 and 10 also run an eval
    assert [r["step"] for r in eval_records] == [5, 10, 12]
    assert eval_records[-1]["eval_perplexity"] == pytest.approx(np.exp(eval_records[-1]["eval_loss"]))
    assert summary["eval_loss"] == eval_records[-1]["eval_loss"]
    assert os.listdir(tmp_path / "tensorboard")
    assert json.load(open(tmp_path / "config.json"))["model"]["d_model"] == 32
    assert (tmp_path / "tokenizer.json").exists()
    assert sorted(int(s) for s in os.listdir(tmp_path / "checkpoints") if s.isdigit()) == [6, 12]


def test_init_from_fine_tunes_from_another_runs_params(tmp_path, corpus):
    pre = tmp_path / "pre"
    train_run(tiny_config(corpus, num_train_steps=10), str(pre), quiet=True)
    fine = tmp_path / "fine"
    cfg = tiny_config(corpus, num_train_steps=1, init_from=str(pre), opt__learning_rate=1e-12, opt__warmup_steps=0,
                      opt__schedule="constant", opt__weight_decay=0.0)
    train_run(cfg, str(fine), quiet=True)
    from llm.run import api

    a, b = api.load(str(pre)).params, api.load(str(fine)).params
    jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, atol=1e-9), a, b)
    assert api.load(str(fine)).step == 1


def test_bfloat16_compute_trains_evaluates_and_samples(tmp_path, corpus):
    """bf16 compute (params, softmax and loss in float32) follows the float32 run, learns, and its greedy
    sample is the argmax of its own logits."""
    runs = {dtype: train_run(tiny_config(corpus, num_train_steps=10, eval_every_steps=10, model__dtype=dtype),
                             str(tmp_path / dtype), quiet=True) for dtype in ("bfloat16", "float32")}
    from llm.run import api

    run = api.load(str(tmp_path / "bfloat16"))
    assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(run.params))
    assert runs["bfloat16"]["eval_loss"] == pytest.approx(runs["float32"]["eval_loss"], abs=0.05)
    assert runs["bfloat16"]["eval_loss"] < np.log(run.model_config.V) - 0.3  # below the uniform guess it starts from
    prompt = run.tokenizer.encode("The ")
    first = run.generate("The ", max_new_tokens=1, temperature=0.0)[0]
    assert run.tokenizer.encode(first).tolist() == [int(np.argmax(run.logits(prompt)[-1]))]
