"""A run's params from a run directory: another run's language model onto this run's shardings
(init_from, growing the vocabulary where this run's is larger), or a whole run onto one device
(llm.load, and a reward model that scores GRPO's answers)."""

import dataclasses
import json
import os

import flax.linen as nn
import jax
import jax.numpy as jnp

from llm import spec
from llm.data import tokenizer as tokenizer_lib
from llm.data.tokenizer import Tokenizer
from llm.model import ModelConfig, heads
from llm.training import checkpoint, sharding
from llm.training.state import Setup


def saved_spec(workdir: str) -> spec.RunSpec:
    """The spec of the run in `workdir` (its config.json), not yet resolved."""
    if not os.path.isdir(workdir):
        raise checkpoint.CheckpointError(f"{workdir} does not exist: nothing to load")
    config_path = os.path.join(workdir, "config.json")
    if not os.path.exists(config_path):
        raise checkpoint.CheckpointError(f"{workdir} is not a run directory (no config.json): nothing to load")
    with open(config_path) as f:
        return spec.from_config(json.load(f))


@dataclasses.dataclass(frozen=True)
class Loaded:
    run: spec.RunSpec  # resolved for the backend in use
    tokenizer: Tokenizer
    params: dict
    step: int


def load(workdir: str, step: int | None = None) -> Loaded:
    """A run's spec, tokenizer and params (a reward model's with its head) on the first device: the
    given checkpoint step, or the newest readable one."""
    run = saved_spec(workdir)
    tok = tokenizer_lib.load(workdir)
    run = spec.resolve(run, tok)
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    boxed = jax.eval_shape(lambda: heads.init_params(run.model, jax.random.key(0), run.objective.name == "reward"))
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device), nn.unbox(boxed))
    params, found = checkpoint.restore_params(workdir, abstract, step)
    return Loaded(run, tok, params, found)


def marker_rows(run: spec.RunSpec, tok: Tokenizer) -> dict[int, list[int]]:
    """{role marker id: the token ids whose mean embedding starts its row} of a run (its config's
    `markers`) that starts from a model whose markers were never trained (init_from is not a chat run)."""
    source = run.objective.init_from
    if not run.objective.marker_init or not source or saved_spec(source).data.kind in ("sft", "preference", "prompts"):
        return {}
    roles = run.vocab.require_roles()
    return {roles.of(role): tok.encode(text).tolist() for role, text in run.objective.marker_init}


def restore_lm_params(source: str, mc: ModelConfig, built: Setup, markers: dict[int, list[int]] | None = None) -> tuple[dict, int]:
    """Another run's language-model params (and step) onto this run's shardings; a smaller vocabulary
    (a run whose chat template grew it) gets new embedding rows drawn as a fresh model's are; then
    each of `markers` (marker_rows) starts at the mean embedding of its tokens (and head column, untied)."""
    params, step = _restore_grown(source, mc, built)
    shardings = heads.lm_params(built.param_sh)
    for marker, ids in (markers or {}).items():
        ids = jnp.asarray(ids)
        params["embed"] = jax.device_put(params["embed"].at[marker].set(params["embed"][ids].mean(axis=0)), shardings["embed"])
        if not mc.tie_embeddings:
            params["head"] = jax.device_put(params["head"].at[:, marker].set(params["head"][:, ids].mean(axis=1)), shardings["head"])
    return params, step


def _restore_grown(source: str, mc: ModelConfig, built: Setup) -> tuple[dict, int]:
    abstract, shardings = heads.lm_params(built.abstract_params), heads.lm_params(built.param_sh)
    V = spec.vocabulary(saved_spec(source), tokenizer_lib.load(source)).size
    if V == mc.V:
        return checkpoint.restore_params(source, sharding.abstract(abstract, shardings))
    if V > mc.V:
        raise spec.ConfigError(f"init_from={source!r} has a vocabulary of {V} rows, more than this run's {mc.V}")
    grown = {"embed": 0} | ({} if mc.tie_embeddings else {"head": 1})  # the vocab axis of each
    replicated = sharding.replicated(built.param_sh["embed"].mesh)
    smaller = sharding.abstract(abstract, shardings)
    for k, axis in grown.items():
        x = abstract[k]
        smaller[k] = jax.ShapeDtypeStruct(tuple(V if a == axis else n for a, n in enumerate(x.shape)), x.dtype, sharding=replicated)
    params, step = checkpoint.restore_params(source, smaller)
    for k, axis in grown.items():
        shape = list(abstract[k].shape)
        shape[axis] = mc.V - V
        rows = 0.02 * jax.random.normal(jax.random.key(V), shape, jnp.float32)
        params[k] = jax.device_put(jnp.concatenate([params[k], rows.astype(params[k].dtype)], axis=axis), shardings[k])
    return params, step
