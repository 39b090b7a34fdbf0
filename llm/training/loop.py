"""The training loop: resume or start, step, check, log, evaluate, checkpoint; stop cleanly on a
signal and never lose a committed checkpoint. What it steps is built by llm/training/state.py, what
it reads by the objective's feed (llm/training/feeds.py; GRPO's in llm/training/rl.py)."""

import contextlib
import functools
import json
import os
import sys
import time
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils
from tqdm import tqdm

from llm import model, spec
from llm.data import corpus, tokenizer as tokenizer_lib
from llm.data.tokenizer import Tokenizer
from llm.spec import RunSpec
from llm.training import batches as batches_lib, checkpoint, feeds, guard, sharding, tasks
from llm.training.feeds import Feed, Job
from llm.training.metrics import Writer, measure_peak_tflops, mfu, peak_units
from llm.training.params import restore_lm_params
from llm.training.state import TrainState, setup_run


class NonFiniteLossError(RuntimeError):
    pass


def _save_config(run: RunSpec, workdir: str) -> None:
    with open(os.path.join(workdir, "config.json"), "w") as f:
        json.dump(run.saved(), f, indent=2)


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


def _tokenizer(run: RunSpec, workdir: str) -> Tokenizer:
    if os.path.exists(os.path.join(workdir, tokenizer_lib.FILENAME)):
        return tokenizer_lib.load(workdir)  # a resumed run keeps its vocabulary
    if run.objective.init_from:
        return tokenizer_lib.load(run.objective.init_from)  # fine-tuning keeps the pretrained vocabulary
    return batches_lib.build_tokenizer(run)


def train(run: RunSpec, workdir: str, quiet: bool = False, feed: Callable[[Job], Feed] | None = None) -> dict:
    """Trains (or resumes) the run in `workdir`; returns the last train and eval metrics. `feed`
    builds the batches of an objective other than lm, reward and dpo (llm/training/rl.py's GRPO).

    Raises guard.Interrupted after SIGTERM/SIGINT (a checkpoint of the last step is committed first),
    guard.WorkdirError when the workdir is in use or not writable, guard.WriteFailed when a write into
    it fails mid-run; in every case the checkpoints already committed are left as they were.
    """
    with guard.hold_workdir(workdir), guard.StopSignals() as stop:
        return _train(run, workdir, quiet, stop, feed or feeds.make)


def _check_same_parametrization(run: RunSpec, other: str, what: str, optimizer: bool) -> None:
    """Params (and optimizer state) mean something only under the parametrization (and optimizer) that
    wrote them: another one would read their scale, or their layout, as something else."""
    saved_path = os.path.join(other, "config.json")
    if not os.path.exists(saved_path):
        return
    with open(saved_path) as f:
        saved = spec.parametrization_keys(json.load(f), optimizer)
    now = spec.parametrization_keys(run.saved(), optimizer)
    changed = [f"{k}={saved[k]!r} in {what}, {now[k]!r} now" for k in saved if saved[k] != now[k]]
    if changed:
        raise spec.ConfigError(f"cannot start from {other}: " + "; ".join(changed) + " (set them as they were, or use a new workdir)")


def _check_resumable(run: RunSpec, workdir: str) -> None:
    if checkpoint.latest_step(workdir) is not None:
        _check_same_parametrization(run, workdir, "the checkpoint", optimizer=True)
    elif run.objective.init_from:
        _check_same_parametrization(run, run.objective.init_from, "the run it starts from", optimizer=False)


def _train(run: RunSpec, workdir: str, quiet: bool, stop: guard.StopSignals, make_feed: Callable[[Job], Feed]) -> dict:
    _check_resumable(run, workdir)
    if run.loop.tasks and run.loop.eval_every_steps:
        tasks.find_tasks(run.loop.tasks)  # an unknown task, or no harness extra, fails before anything compiles
    mesh = sharding.make_mesh(run.mesh.data, run.mesh.fsdp, run.mesh.tensor)
    m = run.model
    sharding.check_divisible(mesh, run.batch_size // run.opt.grad_accum_steps, m.H, m.G, m.F, m.D)
    if run.loop.eval_every_steps and run.loop.eval_batch_size % sharding.data_parallel_size(mesh):
        raise sharding.MeshError(f"eval_batch_size={run.loop.eval_batch_size} is not divisible by the "
                                 f"{sharding.data_parallel_size(mesh)} data-parallel devices")
    if jax.process_count() > 1:
        # Hosts sharing a data dir would otherwise all prepare (or index) the dataset into it at once.
        if jax.process_index() == 0 and not run.data.kind:
            corpus.prepare(run.data)
        multihost_utils.sync_global_devices("dataset prepared")
    tok = _tokenizer(run, workdir)
    run = spec.resolve(run, tok)
    built = setup_run(run, mesh)

    @functools.lru_cache(maxsize=1)
    def reference():
        return restore_lm_params(run.objective.init_from, run.model, built)[0]

    job = Job(run, workdir, mesh, tok, built, reference, quiet)
    feed = make_feed(job)
    try:
        if run.loop.eval_every_steps:
            feed.check()  # a missing or bad held-out split fails now, not at the first eval
        return _train_loop(job, stop, feed)
    finally:
        feed.batches.close()


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
    run, workdir, quiet, mesh, tok, built = job.run, job.workdir, job.quiet, job.mesh, job.tok, job.built
    loop, mc = run.loop, run.model
    batches = feed.batches
    is_main = jax.process_index() == 0
    if is_main:
        with _writing("writing the tokenizer and config.json", workdir):
            if not os.path.exists(os.path.join(workdir, tokenizer_lib.FILENAME)):
                tokenizer_lib.save(tok, workdir)
            _save_config(run, workdir)

    p_train_step = built.train_step
    abstract_params, param_sh = built.abstract_params, built.param_sh

    mngr = checkpoint.manager(workdir, loop.keep_checkpoints)
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
        state = built.init_state(jax.random.key(run.seed))
        if run.objective.init_from:
            # A reward model starts from the language model's params and a fresh head.
            params, src_step = restore_lm_params(run.objective.init_from, mc, built)
            state = state.replace(params={**state.params, **params})
            if is_main and not quiet:
                print(f"initialised from {run.objective.init_from} (step {src_step})", file=sys.stderr)

    counts = model.param_counts(mc)
    flops_per_token = model.flops_per_token(mc)
    peak_tflops = loop.peak_tflops or measure_peak_tflops()  # per device (per host on CPU)
    with _writing("opening metrics.jsonl and tensorboard/", workdir):
        writer = Writer(workdir, enabled=is_main)
    if is_main and not quiet:
        print(f"model: {counts['total']:,} params ({counts['non_embedding']:,} non-embedding), vocab {mc.V}, "
              f"{flops_per_token / 1e6:.2f} MFLOPs/token; mesh {dict(mesh.shape)}; objective {run.objective.name}", file=sys.stderr)

    def run_eval(step: int) -> dict:
        record = feed.evaluate(state.params)
        with _writing("writing metrics.jsonl", workdir):
            writer.write(step, record)
        return record

    tokens_per_step = run.tokens_per_step
    last_train, last_eval = {}, {}
    pending = None  # (step, device metrics): checked one step late so the host never stalls the device
    window_start, window_step = time.perf_counter(), start  # throughput since the last log
    bar = tqdm(total=loop.num_train_steps, initial=start, disable=quiet or not is_main, dynamic_ncols=True, file=sys.stderr)

    def check(step, metrics, host_metrics, force_log=False):
        nonlocal last_train, window_start, window_step
        metrics = {**{k: float(v) for k, v in jax.device_get(metrics).items()}, **host_metrics}
        if not np.isfinite(metrics["loss"]) or not np.isfinite(metrics["grad_norm"]):
            raise NonFiniteLossError(
                f"loss became {metrics['loss']} (grad norm {metrics['grad_norm']}) at step {step}; stopping. "
                f"The last good checkpoint is kept in {os.path.join(workdir, checkpoint.DIRNAME)}"
            )
        if force_log or step % loop.log_every_steps == 0 or step == loop.num_train_steps:
            now = time.perf_counter()
            tokens_per_s = (step - window_step) * tokens_per_step / (now - window_start)
            if run.objective.name == "lm":
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
        for step in range(start + 1, loop.num_train_steps + 1):
            batch, host_metrics = feed.prepare(state, next(batches), step)
            state, metrics = p_train_step(state, batch)
            if pending is not None:
                check(*pending)
            pending = (step, metrics, host_metrics)
            bar.update(1)
            stopping = stop.requested(step)
            save = step % loop.checkpoint_every_steps == 0 or step == loop.num_train_steps or stopping
            evaluate_now = feed.evaluate is not None and not stopping and (step % loop.eval_every_steps == 0 or step == loop.num_train_steps)
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
        if start >= loop.num_train_steps and feed.evaluate is not None:
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
    return {"step": max(start, loop.num_train_steps), **last_train, **last_eval, "params": counts["total"],
            "non_embedding_params": counts["non_embedding"], "flops_per_token": flops_per_token}
