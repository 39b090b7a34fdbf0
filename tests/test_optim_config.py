import importlib
import json

import jax.numpy as jnp
import ml_collections
import optax
import pytest
from conftest import default_config

from configs import default
from llm import spec as config
from llm.training import optimizer as optim


def opt_config(**kw) -> config.OptConfig:
    cfg = default.get_config()
    cfg.num_train_steps = 1000
    cfg.opt.warmup_steps = 100
    for k, v in kw.items():
        cfg.opt[k] = v
    return config.from_config(cfg).opt


@pytest.mark.parametrize("schedule", ["cosine", "linear", "constant", "wsd"])
def test_schedules_warm_up_linearly_then_end_where_asked(schedule):
    c = opt_config(schedule=schedule, learning_rate=1e-3, final_lr_ratio=0.1, decay_fraction=0.2)
    lr = optim.learning_rate(c)
    assert float(lr(0)) == 0.0
    assert float(lr(50)) == pytest.approx(5e-4)
    assert float(lr(100)) == pytest.approx(1e-3)
    end = 1e-3 if schedule == "constant" else 1e-4
    assert float(lr(1000)) == pytest.approx(end, rel=1e-4)
    if schedule == "wsd":
        assert float(lr(799)) == pytest.approx(1e-3)  # stable until the last 20%
        assert float(lr(900)) == pytest.approx(5.5e-4, rel=1e-3)


def test_weight_decay_skips_norms_biases_and_embeddings():
    params = {"embed": 1, "pos_embed": 1, "head": 1, "final_norm": {"scale": 1, "bias": 1}, "block_0": {"attn": {"wq": 1}, "mlp": {"wi": 1}}}
    mask = optim.decay_mask(params, decay_embeddings=False)
    assert mask == {"embed": False, "pos_embed": False, "head": True, "final_norm": {"scale": False, "bias": False},
                    "block_0": {"attn": {"wq": True}, "mlp": {"wi": True}}}
    assert optim.decay_mask(params, decay_embeddings=True)["embed"] is True


def test_gradients_are_clipped_to_the_global_norm_before_adam():
    tx = optim.make(opt_config(clip_norm=1.0, b1=0.9))
    params = {"w": jnp.zeros(4)}
    _, state = tx.update({"w": jnp.full(4, 100.0)}, tx.init(params), params)
    # Adam's first moment after one step is (1 - b1) * grad; the clipped grad has norm 1.
    mu = optax.tree_utils.tree_get(state, "mu")["w"]
    assert jnp.allclose(mu, 0.1 * 0.5)


def _cfg(**kw) -> ml_collections.ConfigDict:
    return default_config(**kw)


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"model.d_model": 100, "model.num_heads": 3, "model.num_kv_heads": 3}, "model.d_model=100 is not divisible by model.num_heads=3"),
        ({"model.num_heads": 4, "model.num_kv_heads": 3}, "model.num_heads=4 is not divisible by model.num_kv_heads=3"),
        ({"batch_size": 10, "opt.grad_accum_steps": 4}, "batch_size=10 is not divisible by opt.grad_accum_steps=4"),
        ({"model.pos_encoding": "alibi"}, "model.pos_encoding='alibi' is not one of"),
        ({"opt.schedule": "step"}, "opt.schedule='step' is not one of"),
        ({"data.tokenizer": "wordpiece"}, "data.tokenizer='wordpiece' is not one of"),
        ({"seq_len": 0}, "seq_len must be positive"),
        ({"mesh.data": -1, "mesh.fsdp": -1}, "at most one of mesh.data"),
    ],
)
def test_invalid_configs_get_one_clear_message(overrides, message):
    with pytest.raises(config.ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        config.validate(_cfg(**overrides))


def test_unknown_keys_are_named():
    cfg = default.get_config()
    cfg.model.unlock()
    cfg.model.dmodel = 3
    with pytest.raises(config.ConfigError, match="unknown config keys: model.dmodel"):
        config.validate(cfg)


@pytest.mark.parametrize("name", ["default", "shakespeare_bpe", "shakespeare_char", "shakespeare_char_nanogpt", "gpt2_small", "gpt2_medium"])
def test_shipped_run_configs_are_valid(name):
    cfg = importlib.import_module(f"configs.{name}").get_config()
    config.validate(cfg)
    assert cfg.name == name  # a run without --workdir writes to runs/<name>/


def test_vocab_is_padded():
    cfg = default.get_config()
    cfg.model.vocab_multiple = 128
    assert config.vocabulary(config.from_config(cfg), 87).size == 128
    cfg.model.vocab_size = 100
    assert config.vocabulary(config.from_config(cfg), 87).size == 100


def test_a_saved_config_from_before_a_new_key_loads_with_the_old_behaviour():
    saved = json.loads(json.dumps(default.get_config().to_dict()))  # as config.json stores it
    saved["model"]["d_model"] = 96
    del saved["model"]["norm_bias"], saved["mesh"]["cpu_devices"]
    cfg = config.from_saved(saved)
    config.validate(cfg)
    assert cfg.model.d_model == 96 and cfg.model.norm_bias is True and cfg.mesh.cpu_devices == -1
    assert config.resolve(config.from_config(cfg), 128).model.norm_bias
