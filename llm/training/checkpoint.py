"""Orbax checkpoints: a step directory per save holding params, optimizer state and a JSON of the
data position; keep the last N; restore the newest readable one onto whatever mesh the abstract
target names, skipping (and reporting) any that cannot be read."""

import os
import sys
import time

import jax
import numpy as np
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils

from llm import upstream

DIRNAME = "checkpoints"
DAMAGED_DIRNAME = "damaged_checkpoints"  # unreadable steps are moved here, never deleted


class CheckpointError(ValueError):
    pass


def manager(workdir: str, keep: int = 3, async_save: bool = True) -> ocp.CheckpointManager:
    """The run's writer (the train loop, which holds the workdir lock)."""
    upstream.silence_orbax_stragglers()
    options = ocp.CheckpointManagerOptions(
        max_to_keep=keep, create=True, enable_async_checkpointing=async_save,
        # A save that failed (disk full, a crash) leaves a *.orbax-checkpoint-tmp directory; the next writer removes it.
        cleanup_tmp_directories=True,
    )
    return ocp.CheckpointManager(os.path.abspath(os.path.join(workdir, DIRNAME)), options=options)


def reader(workdir: str) -> ocp.CheckpointManager:
    """For eval, sampling and init_from, which may run while the run trains: it never creates, deletes
    or cleans up anything (a *.orbax-checkpoint-tmp directory may be a save in progress)."""
    upstream.silence_orbax_stragglers()
    options = ocp.CheckpointManagerOptions(max_to_keep=None, create=False, cleanup_tmp_directories=False,
                                           enable_async_checkpointing=False)
    return ocp.CheckpointManager(os.path.abspath(os.path.join(workdir, DIRNAME)), options=options)


def save(mngr: ocp.CheckpointManager, step: int, params, opt_state, meta: dict) -> None:
    mngr.save(
        step,
        args=ocp.args.Composite(
            params=ocp.args.StandardSave(params),
            opt_state=ocp.args.StandardSave(opt_state),
            meta=ocp.args.JsonSave(meta),
        ),
    )


def restore(mngr: ocp.CheckpointManager, step: int, abstract_params, abstract_opt_state):
    restored = mngr.restore(
        step,
        args=ocp.args.Composite(
            params=ocp.args.StandardRestore(abstract_params),
            opt_state=ocp.args.StandardRestore(abstract_opt_state),
            meta=ocp.args.JsonRestore(),
        ),
    )
    return restored["params"], restored["opt_state"], restored["meta"]


def reason(error: BaseException) -> str:
    """The innermost cause's first line: tensorstore's 'byte range ... is not valid' says more than Orbax's wrapper."""
    while (error.__cause__ or error.__context__) is not None:
        error = error.__cause__ or error.__context__
    text = (str(error).strip().splitlines() or [""])[0]
    return f"{type(error).__name__}: {text[:300]}"


def _attempt(read, workdir: str, step: int):
    """(result, None), or (None, why the step cannot be read); a checkpoint of another model is an error of its own."""
    try:
        return read(), None
    except Exception as e:  # Orbax and tensorstore raise many types; any of them means "cannot read this step"
        if any(s in str(e) for s in ("not compatible with the stored", "tree structures do not match")):
            raise CheckpointError(f"the checkpoint in {workdir} (step {step}) does not fit this model: "
                                  f"{str(e).splitlines()[0]}") from e
        return None, reason(e)


def _everywhere(ok: bool) -> bool:
    """True when every process succeeded, so that all processes of a job move on to the same step."""
    if jax.process_count() == 1:
        return ok
    return bool(np.asarray(multihost_utils.process_allgather(np.int32(ok))).all())


def _warn(message: str) -> None:
    if jax.process_index() == 0:
        print(f"warning: {message}", file=sys.stderr, flush=True)


def _move_aside(workdir: str, step: int) -> str:
    damaged = os.path.join(workdir, DAMAGED_DIRNAME)
    target = os.path.join(damaged, f"{step}-{time.strftime('%Y%m%dT%H%M%S')}")
    if jax.process_index() == 0:
        os.makedirs(damaged, exist_ok=True)
        os.rename(os.path.join(workdir, DIRNAME, str(step)), target)
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices(f"moved aside checkpoint {step}")
    return target


def restore_latest(mngr: ocp.CheckpointManager, workdir: str, abstract_params, abstract_opt_state):
    """(step, params, opt_state, meta) of the newest readable checkpoint, or None when there is none.

    An unreadable step (truncated file, missing item, corrupt JSON) is reported, moved to
    WORKDIR/damaged_checkpoints/ so that the resumed run can save that step again, and the next
    older one is tried. When checkpoints exist but none can be read, this raises rather than let the
    run start again from scratch.
    """
    steps = sorted(mngr.all_steps(), reverse=True)
    failures = []
    for step in steps:
        restored, error = _attempt(lambda: restore(mngr, step, abstract_params, abstract_opt_state), workdir, step)
        if _everywhere(error is None):
            for bad_step, _ in failures:
                _warn(f"moved the unreadable checkpoint of step {bad_step} to {_move_aside(workdir, bad_step)}")
            if failures:
                mngr.reload()
            return (step, *restored)
        failures.append((step, error or "unreadable on another process"))
        _warn(f"cannot read the checkpoint of step {step} in {mngr.directory} ({failures[-1][1]}); trying an older one")
    if failures:
        listed = "; ".join(f"step {s}: {r}" for s, r in failures)
        raise CheckpointError(f"none of the checkpoints in {mngr.directory} can be read ({listed}). Nothing was "
                              f"deleted; move {os.path.join(workdir, DIRNAME)} away to start this run from scratch")
    return None


def latest_step(workdir: str) -> int | None:
    path = os.path.join(workdir, DIRNAME)
    if not os.path.isdir(path):
        return None
    mngr = reader(workdir)
    step = mngr.latest_step()
    mngr.close()
    return step


def restore_params(workdir: str, abstract_params, step: int | None = None):
    """Params only (for evaluation, sampling and init_from): the given step, or the newest readable one."""
    if not os.path.isdir(os.path.join(workdir, DIRNAME)):
        raise CheckpointError(f"{workdir} has no checkpoints/ directory: nothing to load")
    mngr = reader(workdir)
    try:
        steps = sorted(mngr.all_steps(), reverse=True)
        if not steps:
            raise CheckpointError(f"{workdir}/checkpoints holds no finished checkpoint")
        if step is not None and step not in steps:
            raise CheckpointError(f"{workdir} has no checkpoint at step {step}; it has steps {sorted(steps)}")
        failures = []
        for candidate in [step] if step is not None else steps:
            args = ocp.args.Composite(params=ocp.args.StandardRestore(abstract_params))
            restored, error = _attempt(lambda: mngr.restore(candidate, args=args), workdir, candidate)
            if error is None:
                return restored["params"], candidate
            failures.append((candidate, error))
            if step is None:
                _warn(f"cannot read the checkpoint of step {candidate} in {workdir} ({error}); trying an older one")
        listed = "; ".join(f"step {s}: {r}" for s, r in failures)
        raise CheckpointError(f"cannot read the checkpoint{'' if step is not None else 's'} in {workdir} ({listed})")
    finally:
        mngr.close()
