"""Running a sweep: its points (llm/scaling/points.py) one after another in DIR/<point name>/, each
appending one row to DIR/results.csv (the input of llm/scaling/fit.py). A finished point leaves its row in
DIR/<point name>/result.json, so a rerun skips it and an interrupted one resumes from its checkpoint.
"""

import csv
import json
import math
import os
import time

import ml_collections

from llm import spec
from llm.data import tokenizer as tokenizer_lib
from llm.scaling import cooldowns
from llm.scaling.points import (CPU_THROUGHPUT, Point, duration, estimate_seconds, expand, format_table, repetition_warning,
                                select_shard, sweep_tokenizer)
from llm.spec import ConfigError
from llm.training import checkpoint, loop

# The first nine are what the issue asks for and fit.load_points reads (with `budget`, its IsoFLOP groups);
# the rest help a reader of the table. wall_seconds covers the process that finished the point: a resumed
# point counts only its last session.
COLUMNS = ("name", "params", "non_embedding_params", "tokens", "flops", "train_loss", "eval_loss", "bits_per_byte",
           "wall_seconds", "flops_6n", "tokens_6n", "budget", "d_model", "num_layers", "num_heads", "d_ff",
           "batch_size", "num_train_steps", "learning_rate")
# After them, per domain of a data.mixture and per eval_tasks task, in the run's order: eval_loss_<domain>,
# bits_per_byte_<domain>, acc_<task> (and acc_norm_<task> where the task has it).
EXTRA_PREFIXES = ("eval_loss_", "bits_per_byte_", "acc_")
RESULTS = "results.csv"
MARKER = "result.json"  # in a point's subdirectory once it is finished, holding its row


def finished_names(workdir: str) -> set[str]:
    path = os.path.join(workdir, RESULTS)
    if not os.path.exists(path):
        return set()
    with open(path, newline="") as f:
        reader = csv.reader(f)
        header = next(reader, None)
        if header is not None and (tuple(header[:len(COLUMNS)]) != COLUMNS
                                   or not all(h.startswith(EXTRA_PREFIXES) for h in header[len(COLUMNS):])):
            raise ConfigError(f"{path} has the columns {header}, not this sweep's {list(COLUMNS)} (+ per-domain and task columns)")
        return {row[0] for row in reader if row}


def _append_row(workdir: str, row: dict) -> None:
    path = os.path.join(workdir, RESULTS)
    header = list(COLUMNS) + [k for k in row if k not in COLUMNS]
    try:
        # 'x' creates the file only if no other shard got there first, so the header is written once.
        with open(path, "x", newline="") as f:
            csv.writer(f).writerows([header, [row[k] for k in header]])
    except FileExistsError:
        with open(path, newline="") as f:
            header = next(csv.reader(f), header)
        with open(path, "a", newline="") as f:
            csv.writer(f).writerow([row.get(k, "") for k in header])


def _write_marker(point_dir: str, row: dict) -> None:
    tmp = os.path.join(point_dir, MARKER + ".tmp")
    with open(tmp, "w") as f:
        json.dump(row, f, indent=2)
    os.replace(tmp, os.path.join(point_dir, MARKER))


def _check_same_config(point: Point, point_dir: str) -> None:
    path = os.path.join(point_dir, "config.json")
    if not os.path.exists(path):
        return
    with open(path) as f:
        saved = json.load(f)
    if saved != json.loads(json.dumps(point.config.to_dict())):
        raise ConfigError(
            f"{point_dir} was started with a different config than the sweep now gives point {point.name}; "
            f"delete that directory or use another --workdir")


def _last_train_loss(point_dir: str) -> float:
    """The last logged train loss, for a point whose training finished in an earlier process."""
    loss = math.nan
    with open(os.path.join(point_dir, "metrics.jsonl")) as f:
        for line in f:
            record = json.loads(line)
            loss = record.get("loss", loss)
    return loss


def _row(point: Point, summary: dict, point_dir: str, wall_seconds: float) -> dict:
    cfg = point.config
    train_loss = summary["loss"] if "loss" in summary else _last_train_loss(point_dir)
    return dict(
        name=point.name, params=point.params, non_embedding_params=point.non_embedding_params, tokens=point.tokens,
        flops=f"{point.flops:.6g}", train_loss=f"{train_loss:.6f}",
        eval_loss=f"{summary['eval_loss']:.6f}", bits_per_byte=f"{summary['eval_bits_per_byte']:.6f}",
        wall_seconds=f"{wall_seconds:.1f}", flops_6n=f"{point.flops_6n:.6g}", tokens_6n=f"{point.tokens_6n:.0f}",
        budget=f"{point.budget:.6g}", d_model=cfg.model.d_model, num_layers=cfg.model.num_layers,
        num_heads=cfg.model.num_heads, d_ff=cfg.model.d_ff, batch_size=cfg.batch_size,
        num_train_steps=cfg.num_train_steps, learning_rate=f"{cfg.opt.learning_rate:g}",
        **{k.removeprefix("eval_") if k.startswith(("eval_bits_per_byte_", "eval_acc_")) else k: f"{v:.6f}"
           for k, v in summary.items() if k.startswith(("eval_loss_", "eval_bits_per_byte_", "eval_acc_"))})


def train_point(point: Point, workdir: str) -> dict:
    """Trains one point in workdir/<name>/ (resuming from its last checkpoint) and returns its row, which it
    also leaves in the point's result.json; appending it to results.csv is the caller's."""
    point_dir = os.path.join(workdir, point.name)
    _check_same_config(point, point_dir)
    os.makedirs(point_dir, exist_ok=True)
    if not os.path.exists(os.path.join(point_dir, tokenizer_lib.FILENAME)):
        tokenizer_lib.save(sweep_tokenizer(point.config), point_dir)
    t0 = time.perf_counter()
    if point.cooldown_start:
        cooldowns.fork(point, point_dir, workdir)  # trains its size's stable prefix first if no point has yet
    summary = loop.train(spec.from_config(point.config), point_dir, quiet=True)
    row = _row(point, summary, point_dir, time.perf_counter() - t0)
    _write_marker(point_dir, row)
    return row


def finished_row(point: Point, workdir: str) -> dict | None:
    """The row a finished point left behind, or None if it has not finished."""
    marker = os.path.join(workdir, point.name, MARKER)
    if not os.path.exists(marker):
        return None
    with open(marker) as f:
        return json.load(f)


def announce(sweep_cfg: ml_collections.ConfigDict, workdir: str, shard: str, where: str = "", dry_run: bool = False
             ) -> tuple[list[Point], dict]:
    """What every runner does first: expands the sweep (once), selects the shard's points, prints their table,
    the repetition warning and the cooldown forks' savings, and unless dry_run creates workdir and records
    the savings there. Returns (the shard's points, the throughput the estimates used)."""
    throughput = {**CPU_THROUGHPUT, **(sweep_cfg.get("throughput") or {})}
    everything = expand(sweep_cfg)
    points = select_shard(everything, shard)
    print(f"sweep {sweep_cfg.name} ({sweep_cfg.kind}){f', shard {shard}' if shard else ''}{where} -> {workdir}")
    print(format_table(points, throughput), flush=True)
    repeats = repetition_warning(points)
    if repeats:
        print(repeats, flush=True)
    saved = cooldowns.savings(everything) if sweep_cfg.get("cooldowns") else None
    if saved:
        print(cooldowns.describe(saved), flush=True)
    if not dry_run:
        os.makedirs(workdir, exist_ok=True)
        if saved:
            cooldowns.write_savings(workdir, saved)
    return points, throughput


def run(sweep_cfg: ml_collections.ConfigDict, workdir: str, dry_run: bool = False, shard: str = "") -> list[dict]:
    """Prints the table of points; unless dry_run, trains each unfinished one and returns the new rows."""
    points, throughput = announce(sweep_cfg, workdir, shard, dry_run=dry_run)
    if dry_run:
        return []

    done = finished_names(workdir)
    new_rows = []
    for i, point in enumerate(points):
        prefix = f"[{i + 1}/{len(points)}] {point.name}:"
        if point.name in done:
            print(f"{prefix} finished, skipping")
            continue
        row = finished_row(point, workdir)
        if row is not None:
            # Finished, but the process stopped before its row reached results.csv.
            _append_row(workdir, row)
            print(f"{prefix} finished, row restored from {os.path.join(point.name, MARKER)}")
            continue
        point_dir = os.path.join(workdir, point.name)
        start = checkpoint.latest_step(point_dir) if os.path.isdir(point_dir) else None
        resuming = f" (resuming from step {start})" if start else ""
        print(f"{prefix} {point.config.num_train_steps} steps{resuming}, estimated "
              f"{duration(estimate_seconds(point, throughput))}", flush=True)
        row = train_point(point, workdir)
        _append_row(workdir, row)
        new_rows.append(row)
        print(f"{prefix} eval loss {row['eval_loss']}, {row['bits_per_byte']} bits/byte, "
              f"train loss {row['train_loss']}, {row['wall_seconds']} s", flush=True)
    return new_rows
