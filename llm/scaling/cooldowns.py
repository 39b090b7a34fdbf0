"""Cooldown forks (Hägele et al. 2024): under a warmup-stable-decay schedule the rate is constant until the
decay begins, whatever the run's length, so one constant-rate run per model size (its stable run, in
DIR/<size>_stable/) serves every budget. It is trained in segments, each ending in a checkpoint at one
budget's cooldown start; a point copies that checkpoint into its own directory and trains the decay as a
run resumed from it, so it ends exactly where the same schedule trained from scratch would.

A point brings its size's stable run as far as it needs under a lock, so whichever runner calls
sweep.train_point, in whatever order or in parallel, the stable prefix is trained once.
"""

import contextlib
import fcntl
import json
import os
import shutil

import ml_collections

from llm import spec
from llm.data import tokenizer as tokenizer_lib
from llm.scaling.points import Point, by_size, sweep_tokenizer, without_per_budget
from llm.spec import ConfigError
from llm.training import checkpoint, loop

SAVINGS = "cooldowns.json"  # in the sweep's directory: the FLOPs the forks save against the same grid from scratch
LOCK = "forks.lock"
KEEP_ALL = 1_000_000


def stable_dir(workdir: str, point: Point) -> str:
    return os.path.join(workdir, f"{point.size}_stable")


def stable_config(point: Point, steps: int) -> ml_collections.ConfigDict:
    """The point's run at a constant rate after the same warmup, ending at `steps`: one segment, saved
    only at its end, so every checkpoint it keeps is a cooldown start of its size."""
    cfg = ml_collections.ConfigDict(point.config.to_dict())
    cfg.name = f"{cfg.name.rsplit('/', 1)[0]}/{point.size}_stable"
    cfg.opt.schedule = "constant"
    cfg.num_train_steps = steps
    cfg.eval_every_steps = 0  # only the forks are evaluated
    cfg.checkpoint_every_steps = steps
    # Every one: its checkpoints are the cooldown starts, plus one per interruption (which must not push a
    # start out before its fork has copied it).
    cfg.keep_checkpoints = KEEP_ALL
    return cfg


@contextlib.contextmanager
def _locked(path: str):
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)  # blocks: another fork of this size is extending the stable run
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _check_same_stable(cfg: ml_collections.ConfigDict, directory: str) -> None:
    path = os.path.join(directory, "config.json")
    if not os.path.exists(path):
        return
    with open(path) as f:
        saved = ml_collections.ConfigDict(json.load(f))
    same = lambda c: {k: v for k, v in without_per_budget(c).items() if k != "keep_checkpoints"}
    if same(saved) != same(cfg):
        raise ConfigError(f"{directory} was started with a different config than the sweep now gives its size; "
                          f"delete that directory or use another --workdir")


def train_stable_prefix(point: Point, workdir: str) -> str:
    """Trains the point's stable run through every cooldown start of its size up to the point's own
    (each segment ends in a kept checkpoint) and returns the stable run's directory."""
    directory = stable_dir(workdir, point)
    os.makedirs(directory, exist_ok=True)
    with _locked(os.path.join(directory, LOCK)):
        if not os.path.exists(os.path.join(directory, tokenizer_lib.FILENAME)):
            tokenizer_lib.save(sweep_tokenizer(point.config), directory)
        for start in point.cooldown_starts:
            if start > point.cooldown_start:
                break
            latest = checkpoint.latest_step(directory)
            if latest is not None and latest >= start:
                continue
            cfg = stable_config(point, start)
            _check_same_stable(cfg, directory)
            loop.train(spec.from_config(cfg), directory, quiet=True)
    return directory


def fork(point: Point, point_dir: str, workdir: str) -> None:
    """Gives a fork point that has no checkpoint yet its size's stable checkpoint at its cooldown start."""
    if checkpoint.latest_step(point_dir) is not None:
        return  # started already: it resumes from its own checkpoints
    source = os.path.join(train_stable_prefix(point, workdir), checkpoint.DIRNAME, str(point.cooldown_start))
    if not os.path.isdir(source):
        raise ConfigError(f"the stable run of {point.size} has no checkpoint at step {point.cooldown_start}, where "
                          f"{point.name} decays from (it was trained past that step before this budget was added, or "
                          f"the checkpoint was deleted); delete {os.path.dirname(os.path.dirname(source))} to retrain it, "
                          f"or use another --workdir")
    staging = os.path.join(point_dir, ".fork_staging")
    shutil.rmtree(staging, ignore_errors=True)
    shutil.copytree(source, staging)
    os.makedirs(os.path.join(point_dir, checkpoint.DIRNAME), exist_ok=True)
    os.replace(staging, os.path.join(point_dir, checkpoint.DIRNAME, str(point.cooldown_start)))


def savings(points: list[Point]) -> dict:
    """Training FLOPs of the sweep with forks against the same points each trained from scratch."""
    scratch = sum(p.flops for p in points)
    forked = 0.0
    for group in by_size(points).values():
        per_step = group[0].flops_per_token * group[0].config.batch_size * group[0].config.seq_len
        forked += per_step * max(p.cooldown_start for p in group) + sum(p.flops - per_step * p.cooldown_start for p in group)
    return dict(points=len(points), sizes=len(by_size(points)), from_scratch_flops=scratch, forked_flops=forked,
                saved_flops=scratch - forked, saved_fraction=(scratch - forked) / scratch if scratch else 0.0)


def describe(saved: dict) -> str:
    return (f"cooldown forks: {saved['points']} points from {saved['sizes']} stable runs train {saved['forked_flops']:.3g} "
            f"FLOPs instead of {saved['from_scratch_flops']:.3g} from scratch (saves {saved['saved_flops']:.3g}, "
            f"{100 * saved['saved_fraction']:.0f}%)")


def write_savings(workdir: str, saved: dict) -> None:
    tmp = os.path.join(workdir, SAVINGS + ".tmp")
    with open(tmp, "w") as f:
        json.dump(saved, f, indent=2)
    os.replace(tmp, os.path.join(workdir, SAVINGS))
