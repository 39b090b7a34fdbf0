"""A reward model's scalar head on the final-normed hidden state, and the params of a run's model
with or without it (a reward model starts from a language model's params and a fresh head)."""

import flax.linen as nn
import jax
import jax.numpy as jnp

from llm.model.transformer import ModelConfig, apply, init

REWARD_HEAD = "reward_head"


def init_reward_head(cfg: ModelConfig) -> dict:
    """A zero head: a fresh reward model scores every answer 0 (boxed with its logical axes)."""
    zeros = lambda shape: nn.Partitioned(jnp.zeros(shape, jnp.dtype(cfg.param_dtype)), names=("embed",)[: len(shape)])
    return {"w": zeros((cfg.D,)), "b": nn.Partitioned(jnp.zeros((), jnp.dtype(cfg.param_dtype)), names=())}


def init_params(cfg: ModelConfig, rng: jax.Array, reward_head: bool = False) -> dict:
    """Boxed params of a fresh model (a reward model adds its scalar head)."""
    params = init(cfg, rng)
    if reward_head:
        params = {**params, REWARD_HEAD: init_reward_head(cfg)}
    return params


def lm_params(params: dict) -> dict:
    return {k: v for k, v in params.items() if k != REWARD_HEAD}


def rewards(cfg: ModelConfig, params, inputs_BxL, last_B):
    """The scalar reward of each row: the head on the final-normed hidden state at position last_B."""
    hidden_BxLxD, _ = apply(cfg, lm_params(params), inputs_BxL, features=True)
    hidden_BxD = jnp.take_along_axis(hidden_BxLxD, last_B[:, None, None], axis=1)[:, 0].astype(jnp.float32)
    head = params[REWARD_HEAD]
    return hidden_BxD @ head["w"].astype(jnp.float32) + head["b"].astype(jnp.float32)
