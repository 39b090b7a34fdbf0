"""TrainState, the jitted train step and the training loop (eval, checkpoints, metrics)."""

import contextlib
import dataclasses
import functools
import json
import os
import sys
import time
from typing import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import struct
from jax.experimental import multihost_utils
from tqdm import tqdm

from llm import checkpoint, config as config_lib, data, evaluate, examples, feeds, guard, model, objectives, optim, sharding, template, tokenizer as tokenizer_lib
from llm.feeds import Feed, Job
from llm.metrics import Writer, measure_peak_tflops, mfu, peak_units
from llm.model import ModelConfig


class NonFiniteLossError(RuntimeError):
    pass


@struct.dataclass
class TrainState:
    step: jax.Array
    params: dict
    opt_state: optax.OptState


def make_train_step(cfg: ModelConfig, optimizer: optax.GradientTransformation, opt_cfg: optim.OptConfig,
                    objective: Callable | None = None):
    """objective: llm/objectives.py's (params, batch) -> (sum, (metric sums, units)); default next-token."""
    schedule = optim.learning_rate(opt_cfg)
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


def init_params(mc: ModelConfig, rng: jax.Array, objective: str = "lm") -> dict:
    """Boxed params of a fresh model (a reward model adds its scalar head)."""
    params = model.init(mc, rng)
    if objective == "reward":
        params = {**params, objectives.REWARD_HEAD: objectives.init_reward_head(mc)}
    return params


def setup(mc: ModelConfig, oc: optim.OptConfig, mesh: jax.sharding.Mesh, rules, objective: str = "lm",
          **objective_options) -> Setup:
    """objective_options: objectives.make's (dpo_beta, clip_eps, kl_coef)."""
    optimizer = optim.make(oc)
    boxed = jax.eval_shape(lambda: init_params(mc, jax.random.key(0), objective))
    abstract_params = nn.unbox(boxed)
    param_sh = sharding.param_shardings(nn.get_partition_spec(boxed), abstract_params, mesh, rules)
    abstract_opt = jax.eval_shape(optimizer.init, abstract_params)
    # Optimizer moments mirror the params they belong to; every other leaf is a replicated scalar.
    opt_sh = optax.tree_map_params(optimizer, lambda _, s: s, abstract_opt, param_sh, transform_non_params=lambda _: sharding.replicated(mesh))
    state_sh = TrainState(sharding.replicated(mesh), param_sh, opt_sh)
    batch_sh = sharding.batch_sharding(mesh)

    def init_state(rng):
        params = nn.unbox(init_params(mc, rng, objective))
        return TrainState(jnp.int32(0), params, optimizer.init(params))

    objective_fn = objectives.make(objective, mc, oc.z_loss, **objective_options)
    return Setup(
        optimizer, abstract_params, param_sh, abstract_opt, opt_sh, state_sh, batch_sh,
        init_state=jax.jit(init_state, out_shardings=state_sh),
        train_step=jax.jit(make_train_step(mc, optimizer, oc, objective_fn), in_shardings=(state_sh, batch_sh),
                           out_shardings=(state_sh, None), donate_argnums=0),
        eval_step=jax.jit(evaluate.make_eval_step(mc), in_shardings=(param_sh, batch_sh)),
        objective_step=jax.jit(lambda params, batch: objective_fn(params, batch)[1], in_shardings=(param_sh, batch_sh)),
    )


def _save_config(cfg: ml_collections.ConfigDict, workdir: str) -> None:
    with open(os.path.join(workdir, "config.json"), "w") as f:
        json.dump(cfg.to_dict(), f, indent=2)


@contextlib.contextmanager
def _writing(what: str, workdir: str):
    """Turns a failed write into the workdir (disk full, quota, storage gone) into one WriteFailed that
    says what was being written and which checkpoint is still intact."""
    try:
        yield
    except (guard.Interrupted, NonFiniteLossError):
        raise
    except Exception as e:  # OSError from Python, ValueError('RESOURCE_EXHAUSTED ...') from tensorstore
        last = checkpoint.latest_step(workdir)
        kept = f"the last committed checkpoint, step {last}, is intact" if last is not None else "no checkpoint had been committed"
        raise guard.WriteFailed(f"{what} in {workdir} failed ({checkpoint.reason(e)}); {kept}") from e


def build_tokenizer(cfg: ml_collections.ConfigDict):
    """The vocabulary a fresh run of `cfg` trains (sweeps count params and FLOPs with the same one)."""
    d, dc = cfg.data, config_lib.data_config(cfg)
    if d.tokenizer == "byte" or d.tokenizer_path:
        texts = []
    elif examples.kind_of(dc.dataset):
        texts = examples.texts(dc.dataset)
    elif d.tokenizer == "sentencepiece":
        texts = data.load_documents(dc, "train", limit=d.spm_input_sentences)
    else:  # the char vocabulary must cover every character the run will score
        texts = data.load_documents(dc, "train") + data.load_documents(dc, "validation")
    return tokenizer_lib.train(d.tokenizer, texts, d.vocab_size, d.spm_model_type, d.spm_input_sentences, d.tokenizer_path)


def _tokenizer(cfg: ml_collections.ConfigDict, workdir: str):
    if os.path.exists(os.path.join(workdir, tokenizer_lib.FILENAME)):
        return tokenizer_lib.load(workdir)  # a resumed run keeps its vocabulary
    if cfg.init_from:
        return tokenizer_lib.load(cfg.init_from)  # fine-tuning keeps the pretrained vocabulary
    return build_tokenizer(cfg)


def train(cfg: ml_collections.ConfigDict, workdir: str, quiet: bool = False, feed: Callable[[Job], Feed] | None = None) -> dict:
    """Trains (or resumes) the run in `workdir`; returns the last train and eval metrics. `feed`
    builds the batches of an objective that lives above this module (llm/rl.py's GRPO).

    Raises guard.Interrupted after SIGTERM/SIGINT (a checkpoint of the last step is committed first),
    guard.WorkdirError when the workdir is in use or not writable, guard.WriteFailed when a write into
    it fails mid-run; in every case the checkpoints already committed are left as they were.
    """
    config_lib.validate(cfg)
    with guard.hold_workdir(workdir), guard.StopSignals() as stop:
        return _train(cfg, workdir, quiet, stop, feed or feeds.make)


def _train(cfg: ml_collections.ConfigDict, workdir: str, quiet: bool, stop: guard.StopSignals, make_feed: Callable[[Job], Feed]) -> dict:
    mesh = sharding.make_mesh(cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor)
    rules = sharding.rules_from_config(cfg.mesh.rules)
    m = cfg.model
    sharding.check_divisible(mesh, cfg.batch_size // cfg.opt.grad_accum_steps, m.num_heads, m.num_kv_heads, m.d_ff, m.d_model)
    if cfg.eval_every_steps and cfg.eval_batch_size % sharding.data_parallel_size(mesh):
        raise sharding.MeshError(f"eval_batch_size={cfg.eval_batch_size} is not divisible by the {sharding.data_parallel_size(mesh)} data-parallel devices")

    dc = config_lib.data_config(cfg)
    if jax.process_count() > 1:
        # Hosts sharing a data dir would otherwise all prepare (or index) the dataset into it at once.
        if jax.process_index() == 0 and not examples.kind_of(dc.dataset):
            data.prepare(dc)
        multihost_utils.sync_global_devices("dataset prepared")
    tok = _tokenizer(cfg, workdir)
    roles = None
    needed = template.vocab_needed(tok) if examples.is_chat(dc.dataset) else tok.vocab_size + config_lib.reserved_ids(cfg)
    if needed > tok.vocab_size and not cfg.model.vocab_size:
        # The chat template's ids (or span corruption's sentinels, BERT's [CLS] [SEP] [MASK]) follow the
        # tokenizer's; where the padded vocabulary has no room for them, the model grows by one
        # vocab_multiple or more (recorded in the run's config.json).
        cfg = cfg.copy_and_resolve_references()
        cfg.model.vocab_size = config_lib.padded_vocab_size(cfg, needed)
    elif cfg.model.vocab_size and needed > cfg.model.vocab_size:
        raise config_lib.ConfigError(f"model.vocab_size={cfg.model.vocab_size} leaves no room for the {needed - tok.vocab_size} "
                                     f"ids this run reserves after the tokenizer's {tok.vocab_size}")
    mc = config_lib.model_config(cfg, config_lib.padded_vocab_size(cfg, tok.vocab_size))
    if examples.is_chat(dc.dataset):
        roles = template.role_ids(tok, mc.V)
    built = setup(mc, config_lib.opt_config(cfg), mesh, rules, cfg.objective, **config_lib.objective_options(cfg))

    @functools.lru_cache(maxsize=1)
    def reference():
        return restore_lm_params(cfg.init_from, mc, built)[0]

    job = Job(cfg, workdir, mesh, dc, tok, mc, built, roles, reference, quiet)
    feed = make_feed(job)
    try:
        if cfg.eval_every_steps:
            feed.check()  # a missing or bad held-out split fails now, not at the first eval
        return _train_loop(job, stop, feed)
    finally:
        feed.batches.close()


def restore_lm_params(source: str, mc: ModelConfig, built: Setup) -> tuple[dict, int]:
    """Another run's language-model params (and step) onto this run's shardings; a smaller vocabulary
    (a run whose chat template grew it) gets new embedding rows drawn as a fresh model's are."""
    abstract, shardings = objectives.lm_params(built.abstract_params), objectives.lm_params(built.param_sh)
    with open(os.path.join(source, "config.json")) as f:
        source_cfg = config_lib.from_saved(json.load(f))
    V = config_lib.padded_vocab_size(source_cfg, tokenizer_lib.load(source).vocab_size)
    if V == mc.V:
        return checkpoint.restore_params(source, sharding.abstract(abstract, shardings))
    if V > mc.V:
        raise config_lib.ConfigError(f"init_from={source!r} has a vocabulary of {V} rows, more than this run's {mc.V}")
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


def _data_state(batches) -> dict:
    """Every host's data position in one (the checkpoint's meta is written by the first host)."""
    state = batches.get_state()
    if jax.process_count() == 1:
        return state
    raw = json.dumps(state).encode()
    width = int(np.max(multihost_utils.process_allgather(np.int32(len(raw)))))
    gathered = multihost_utils.process_allgather(np.frombuffer(raw.ljust(width), np.uint8))
    return batches.merge_states([json.loads(bytes(row).decode().rstrip()) for row in np.asarray(gathered)])


def _train_loop(job: Job, stop: guard.StopSignals, feed: Feed) -> dict:
    cfg, workdir, quiet, mesh, tok, mc, built = job.cfg, job.workdir, job.quiet, job.mesh, job.tok, job.mc, job.built
    batches = feed.batches
    is_main = jax.process_index() == 0
    if is_main:
        with _writing("writing the tokenizer and config.json", workdir):
            if not os.path.exists(os.path.join(workdir, tokenizer_lib.FILENAME)):
                tokenizer_lib.save(tok, workdir)
            _save_config(cfg, workdir)

    p_train_step = built.train_step
    abstract_params, param_sh = built.abstract_params, built.param_sh

    mngr = checkpoint.manager(workdir, cfg.keep_checkpoints)
    restored = checkpoint.restore_latest(mngr, workdir, sharding.abstract(abstract_params, param_sh),
                                         sharding.abstract(built.abstract_opt, built.opt_sh))
    if restored is not None:
        start, params, opt_state, meta = restored
        state = TrainState(jax.device_put(jnp.int32(start), sharding.replicated(mesh)), params, opt_state)
        batches.set_state(meta["data"])
        if is_main and not quiet:
            print(f"resuming {workdir} from step {start}", file=sys.stderr)
    else:
        start = 0
        state = built.init_state(jax.random.key(cfg.seed))
        if cfg.init_from:
            # A reward model starts from the language model's params and a fresh head.
            params, src_step = restore_lm_params(cfg.init_from, mc, built)
            state = state.replace(params={**state.params, **params})
            if is_main and not quiet:
                print(f"initialised from {cfg.init_from} (step {src_step})", file=sys.stderr)

    counts = model.param_counts(mc)
    flops_per_token = model.flops_per_token(mc)
    peak_tflops = cfg.peak_tflops or measure_peak_tflops()  # per device (per host on CPU)
    with _writing("opening metrics.jsonl and tensorboard/", workdir):
        writer = Writer(workdir, enabled=is_main)
    if is_main and not quiet:
        print(f"model: {counts['total']:,} params ({counts['non_embedding']:,} non-embedding), vocab {mc.V}, "
              f"{flops_per_token / 1e6:.2f} MFLOPs/token; mesh {dict(mesh.shape)}; objective {cfg.objective}", file=sys.stderr)

    def run_eval(step: int) -> dict:
        record = feed.evaluate(state.params)
        with _writing("writing metrics.jsonl", workdir):
            writer.write(step, record)
        return record

    tokens_per_step = cfg.batch_size * cfg.seq_len
    last_train, last_eval = {}, {}
    pending = None  # (step, device metrics): checked one step late so the host never stalls the device
    window_start, window_step = time.perf_counter(), start  # throughput since the last log
    bar = tqdm(total=cfg.num_train_steps, initial=start, disable=quiet or not is_main, dynamic_ncols=True, file=sys.stderr)

    def check(step, metrics, host_metrics, force_log=False):
        nonlocal last_train, window_start, window_step
        metrics = {**{k: float(v) for k, v in jax.device_get(metrics).items()}, **host_metrics}
        if not np.isfinite(metrics["loss"]) or not np.isfinite(metrics["grad_norm"]):
            raise NonFiniteLossError(
                f"loss became {metrics['loss']} (grad norm {metrics['grad_norm']}) at step {step}; stopping. "
                f"The last good checkpoint is kept in {os.path.join(workdir, checkpoint.DIRNAME)}"
            )
        if force_log or step % cfg.log_every_steps == 0 or step == cfg.num_train_steps:
            now = time.perf_counter()
            tokens_per_s = (step - window_step) * tokens_per_step / (now - window_start)
            if cfg.objective == "lm":
                metrics["perplexity"] = float(np.exp(min(metrics["loss"], 50.0)))
            metrics.update(tokens_per_s=tokens_per_s, mfu=mfu(flops_per_token, tokens_per_s, peak_tflops * peak_units()))
            # Asked of the batches, not their type: an objective's wrapper (denoise.Noised) passes it through.
            # Host 0's count (data.StreamBatches.skipped): indexing drops, plus its rows' reads of bad records.
            skipped = getattr(batches, "skipped", None)
            if skipped is not None:
                metrics["data_skipped_records"] = skipped
            with _writing("writing metrics.jsonl", workdir):
                writer.write(step, metrics)
            bar.set_postfix(loss=f"{metrics['loss']:.3f}", tok_s=f"{tokens_per_s:,.0f}")
            last_train = metrics
            window_start, window_step = now, step

    failing = False
    try:
        for step in range(start + 1, cfg.num_train_steps + 1):
            batch, host_metrics = feed.prepare(state, next(batches), step)
            state, metrics = p_train_step(state, batch)
            if pending is not None:
                check(*pending)
            pending = (step, metrics, host_metrics)
            bar.update(1)
            stopping = stop.requested(step)
            save = step % cfg.checkpoint_every_steps == 0 or step == cfg.num_train_steps or stopping
            evaluate_now = feed.evaluate is not None and not stopping and (step % cfg.eval_every_steps == 0 or step == cfg.num_train_steps)
            if save or evaluate_now:
                # Checked now, not a step late: never checkpoint a state whose loss was not finite, and log
                # this step's throughput before an eval restarts the window.
                check(*pending)
                pending = None
            if save:
                # An earlier asynchronous save that failed raises here.
                with _writing(f"saving checkpoints (step {step} or the save before it)", workdir):
                    checkpoint.save(mngr, step, state.params, state.opt_state, {"step": step, "data": _data_state(batches)})
            if stopping:
                with _writing(f"committing the checkpoint of step {step}", workdir):
                    mngr.wait_until_finished()
                raise guard.Interrupted(stop.cause(), step, workdir)
            if evaluate_now:
                last_eval = run_eval(step)
                if not quiet and is_main:
                    bar.write(f"step {step}: " + ", ".join(f"{k.removeprefix('eval_')} {v:.4f}" for k, v in last_eval.items()))
                window_start, window_step = time.perf_counter(), step
        if pending is not None:
            check(*pending)
        if start >= cfg.num_train_steps and feed.evaluate is not None:
            last_eval = run_eval(start)
    except BaseException:
        failing = True
        raise
    finally:
        bar.close()
        try:
            # The last save commits here; if the run already failed, its error is the one to report.
            with _writing("committing the last checkpoint", workdir):
                mngr.wait_until_finished()
        except guard.WriteFailed:
            if not failing:
                raise
        finally:
            for close in (mngr.close, writer.close):
                with contextlib.suppress(Exception):  # already reported above, or by the failure being raised
                    close()
    return {"step": max(start, cfg.num_train_steps), **last_train, **last_eval, "params": counts["total"],
            "non_embedding_params": counts["non_embedding"], "flops_per_token": flops_per_token}
