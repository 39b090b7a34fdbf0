"""TrainState, the jitted train step, and `setup`: the one builder of what a run compiles, with its
shardings, used alike by the train loop, the benchmark and the experiments."""

import dataclasses
from typing import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from flax import struct

from llm.model import ModelConfig, heads
from llm.spec import OptConfig, RunSpec
from llm.training import evaluate, objectives, optimizer as optimizer_lib, sharding


@struct.dataclass
class TrainState:
    step: jax.Array
    params: dict
    opt_state: optax.OptState


def make_train_step(cfg: ModelConfig, optimizer: optax.GradientTransformation, opt_cfg: OptConfig,
                    objective: Callable | None = None):
    """objective: llm/training/objectives.py's (params, batch) -> (sum, (metric sums, units)); default next-token."""
    schedule = optimizer_lib.learning_rate(opt_cfg)
    k = opt_cfg.grad_accum_steps
    objective = objective or objectives.make("lm", cfg, opt_cfg.z_loss)
    grad_fn = jax.value_and_grad(objective, has_aux=True)

    def train_step(state: TrainState, batch: dict):
        if k == 1:
            (_, (sums, units)), grads = grad_fn(state.params, batch)
        else:
            # Micro-batch i takes rows i, i+k, ...: every device keeps contributing rows to each one.
            micro = jax.tree.map(lambda x: x.reshape(x.shape[0] // k, k, *x.shape[1:]).swapaxes(0, 1), batch)

            def accumulate(carry, micro_batch):
                (_, aux), grads = grad_fn(state.params, micro_batch)
                return jax.tree.map(jnp.add, carry, (grads, aux)), None

            aux_shape = jax.eval_shape(objective, state.params, jax.tree.map(lambda x: x[0], micro))[1]
            zeros = (jax.tree.map(jnp.zeros_like, state.params), jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), aux_shape))
            (grads, (sums, units)), _ = jax.lax.scan(accumulate, zeros, micro)
        # Sums over units (tokens, pairs) divided once by their count: k micro-batches equal one k-times-larger batch.
        grads = jax.tree.map(lambda g: g / units, grads)
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        metrics = {**{name: v / units for name, v in sums.items()}, "grad_norm": optax.global_norm(grads),
                   "learning_rate": schedule(state.step)}
        return TrainState(state.step + 1, params, opt_state), metrics

    return train_step


@dataclasses.dataclass(frozen=True)
class Setup:
    """What a run compiles, with its shardings: built by one function for train(), the benchmark and
    experiments alike, so that a benchmark times exactly the step that training runs."""

    optimizer: optax.GradientTransformation
    abstract_params: dict  # ShapeDtypeStructs
    param_sh: dict  # NamedShardings from the params' logical axes
    abstract_opt: optax.OptState
    opt_sh: optax.OptState
    state_sh: TrainState
    batch_sh: jax.sharding.NamedSharding
    init_state: Callable[[jax.Array], TrainState]  # rng -> a TrainState created already sharded
    train_step: Callable  # (state, batch) -> (state, metrics); donates the old state
    eval_step: Callable  # (params, batch) -> (summed loss, tokens); lm objectives only
    objective_step: Callable  # (params, batch) -> (metric sums, units) of the objective, without gradients


def _on_mesh(fn: Callable, mesh: jax.sharding.Mesh, rules: tuple) -> Callable:
    """fn traced under the mesh and the axis rules, so that the model's activation constraints
    (llm/model/constrain.py) take effect."""

    def traced(*args):
        with jax.sharding.use_abstract_mesh(mesh.abstract_mesh), nn.logical_axis_rules(rules):
            return fn(*args)

    return traced


def _opt_shardings(abstract_opt, abstract_params, param_sh, mesh: jax.sharding.Mesh):
    """Each optimizer-state leaf that mirrors a param (a moment, a momentum: under any chain, partition or
    mask, the state's path ends with the param's) takes that param's sharding; every other leaf is a
    replicated scalar."""
    names = lambda path: tuple(k.key for k in path if isinstance(k, jax.tree_util.DictKey))
    by_path = {names(path): (x.shape, sh) for (path, x), sh in
               zip(jax.tree_util.tree_leaves_with_path(abstract_params), jax.tree.leaves(param_sh))}

    def pick(path, x):
        keys = names(path)
        for i in range(len(keys)):
            shape, sh = by_path.get(keys[i:], (None, None))
            if shape == x.shape:
                return sh
        return sharding.replicated(mesh)

    return jax.tree_util.tree_map_with_path(pick, abstract_opt)


def setup(mc: ModelConfig, oc: OptConfig, mesh: jax.sharding.Mesh, rules: tuple, objective: str = "lm",
          **objective_options) -> Setup:
    """objective_options: objectives.make's (dpo_beta, dpo_nll_coef, clip_eps, kl_coef, temperature, vocab_limit)."""
    optimizer = optimizer_lib.make(oc, mc.parametrization)
    reward_head = objective == "reward"
    boxed = jax.eval_shape(lambda: heads.init_params(mc, jax.random.key(0), reward_head))
    abstract_params = nn.unbox(boxed)
    param_sh = sharding.param_shardings(nn.get_partition_spec(boxed), abstract_params, mesh, rules)
    abstract_opt = jax.eval_shape(optimizer.init, abstract_params)
    opt_sh = _opt_shardings(abstract_opt, abstract_params, param_sh, mesh)
    state_sh = TrainState(sharding.replicated(mesh), param_sh, opt_sh)
    batch_sh = sharding.batch_sharding(mesh)

    def init_state(rng):
        params = nn.unbox(heads.init_params(mc, rng, reward_head))
        return TrainState(jnp.int32(0), params, optimizer.init(params))

    objective_fn = objectives.make(objective, mc, oc.z_loss, **objective_options)
    return Setup(
        optimizer, abstract_params, param_sh, abstract_opt, opt_sh, state_sh, batch_sh,
        init_state=jax.jit(init_state, out_shardings=state_sh),
        train_step=jax.jit(_on_mesh(make_train_step(mc, optimizer, oc, objective_fn), mesh, rules), in_shardings=(state_sh, batch_sh),
                           out_shardings=(state_sh, None), donate_argnums=0),
        eval_step=jax.jit(_on_mesh(evaluate.make_eval_step(mc), mesh, rules), in_shardings=(param_sh, batch_sh)),
        objective_step=jax.jit(_on_mesh(lambda params, batch: objective_fn(params, batch)[1], mesh, rules),
                               in_shardings=(param_sh, batch_sh)),
    )


def setup_run(run: RunSpec, mesh: jax.sharding.Mesh) -> Setup:
    """`setup` of a resolved run spec: its model, optimizer, sharding rules and objective."""
    o = run.objective
    return setup(run.model, run.opt, mesh, run.mesh.rules, o.name, dpo_beta=o.dpo_beta, dpo_nll_coef=o.dpo_nll_coef, clip_eps=o.grpo.clip_eps,
                 kl_coef=o.grpo.kl_coef, **sampled_distribution(run))


def sampled_distribution(run: RunSpec) -> dict:
    """The temperature and vocabulary limit that DPO's and GRPO's log-probs are taken under: those of the
    sampler that draws (GRPO) or would draw (DPO, at temperature 1) the answers, so that the gradient and
    the KL refer to the distribution the answers come from."""
    name = run.objective.name
    if name not in ("dpo", "grpo"):
        return {}
    return {"temperature": run.objective.grpo.temperature if name == "grpo" else 1.0, "vocab_limit": run.vocab.require_roles().limit}
