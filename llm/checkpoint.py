"""Orbax checkpoints: a step directory per save holding params, optimizer state and a JSON of the
data position; keep the last N; restore the latest onto whatever mesh the abstract target names."""

import os

import orbax.checkpoint as ocp

DIRNAME = "checkpoints"


class CheckpointError(ValueError):
    pass


def manager(workdir: str, keep: int = 3, async_save: bool = True) -> ocp.CheckpointManager:
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True, enable_async_checkpointing=async_save)
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


def latest_step(workdir: str) -> int | None:
    path = os.path.join(workdir, DIRNAME)
    if not os.path.isdir(path):
        return None
    mngr = manager(workdir, async_save=False)
    step = mngr.latest_step()
    mngr.close()
    return step


def restore_params(workdir: str, abstract_params, step: int | None = None):
    """Params only (for evaluation, sampling and init_from); the latest step unless one is given."""
    if not os.path.isdir(os.path.join(workdir, DIRNAME)):
        raise CheckpointError(f"{workdir} has no checkpoints/ directory: nothing to load")
    mngr = manager(workdir, async_save=False)
    try:
        steps = mngr.all_steps()
        if not steps:
            raise CheckpointError(f"{workdir}/checkpoints holds no finished checkpoint")
        if step is None:
            step = max(steps)
        elif step not in steps:
            raise CheckpointError(f"{workdir} has no checkpoint at step {step}; it has steps {sorted(steps)}")
        try:
            restored = mngr.restore(step, args=ocp.args.Composite(params=ocp.args.StandardRestore(abstract_params)))
        except (ValueError, KeyError) as e:
            raise CheckpointError(f"the checkpoint in {workdir} (step {step}) does not fit this model: {e}") from e
        return restored["params"], step
    finally:
        mngr.close()
