import csv
import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import ml_collections
import numpy as np
import pytest

from configs import default
from configs.sweeps import grid_example, isoflop_cpu, isoflop_cpu_cooldowns_wide
from llm.scaling import fit, points as points_lib, sweep
from llm.training import checkpoint

ROOT = Path(__file__).resolve().parents[1]
ISSUE_COLUMNS = ["name", "params", "non_embedding_params", "tokens", "flops", "train_loss", "eval_loss",
                 "bits_per_byte", "wall_seconds"]


def read_rows(workdir: Path) -> list[dict]:
    with open(workdir / sweep.RESULTS, newline="") as f:
        return list(csv.DictReader(f))


# ---------------------------------------------------------------------------------------------------------
# Expansion


def test_isoflop_cpu_expands_to_3_budgets_x_5_sizes_of_at_least_100k_params():
    cfg = isoflop_cpu.get_config()
    points = points_lib.expand(cfg)
    budgets = sorted({p.budget for p in points})
    assert len(budgets) >= 3
    for budget in budgets:
        at_budget = [p for p in points if p.budget == budget]
        assert len({p.params for p in at_budget}) >= 5
    for p in points:
        run = p.config
        assert p.params >= 100_000
        assert p.tokens == run.num_train_steps * run.batch_size * run.seq_len
        # D = C / exact FLOPs per token, to the nearest whole step; the 6N count is recorded beside it.
        assert abs(p.flops - p.budget) <= 0.5 * p.flops_per_token * run.batch_size * run.seq_len
        assert p.tokens_6n == pytest.approx(p.budget / (6 * p.params))
        assert p.flops_6n == pytest.approx(6 * p.params * p.tokens)
        assert p.flops_per_token > 6 * p.params  # attention and the output head are on top of 6N
        assert run.eval_every_steps == run.num_train_steps
        assert run.model.num_layers >= 2


def test_isoflop_cpu_models_hit_their_target_sizes():
    cfg = isoflop_cpu.get_config()
    points = points_lib.expand(cfg)
    targets = [t for budget_targets in cfg.targets for t in budget_targets]
    assert len(targets) == len(points)
    for p, target in zip(points, targets):
        assert abs(math.log(p.non_embedding_params / target)) < math.log(1.1), (p.name, target)


def test_wide_cooldown_sweep_is_one_width_family_with_a_window_per_budget():
    cfg = isoflop_cpu_cooldowns_wide.get_config()
    points = points_lib.expand(cfg)
    budgets = sorted({p.budget for p in points})
    assert len(budgets) == 6 and budgets[-1] / budgets[0] > 30  # 1.5 decades
    windows = [[p.config.model.d_model for p in points if p.budget == b] for b in budgets]
    assert sorted(windows[0]) == [16, 24, 32, 40, 48] and sorted(windows[-1]) == [48, 64, 80, 96, 112]
    assert all(len(set(w)) == 5 and min(w) <= min(v) and max(w) <= max(v) for w, v in zip(windows, windows[1:]))
    for p in points:
        m = p.config.model
        assert (m.num_layers, m.d_model // m.num_heads, m.base_head_dim) == (2, 8, 8), p.name
        assert p.config.opt.warmup_steps == 100 and p.cooldown_start > 100
    # Each width is one stable run, forked at each of its budgets' cooldown starts.
    assert {size: len(group) for size, group in points_lib.by_size(points).items()} == {
        "d16l2": 2, "d24l2": 3, "d32l2": 4, "d40l2": 5, "d48l2": 6, "d64l2": 4, "d80l2": 3, "d96l2": 2, "d112l2": 1}


@pytest.mark.parametrize("target", np.geomspace(1.3e5, 5e6, 9).tolist())
def test_shape_rule_gives_two_or_more_layers_near_the_target(target):
    cfg = isoflop_cpu.get_config()
    d_model, num_layers, num_heads, d_ff = points_lib.shape_for(target, cfg.base, cfg.shape)
    run = ml_collections.ConfigDict(cfg.base.to_dict())
    points_lib._set_shape(run, d_model, num_layers, num_heads, d_ff)
    counts, _ = points_lib._counts(run)
    assert num_layers >= 2
    head_dim = d_model // num_heads
    assert d_model % num_heads == 0 and head_dim % 2 == 0  # rope rotates pairs
    assert cfg.shape.head_dim / 1.5 <= head_dim <= cfg.shape.head_dim * 1.5
    lo, hi = cfg.shape.d_model_per_layer
    assert lo * num_layers <= d_model <= hi * num_layers
    assert abs(math.log(counts["non_embedding"] / target)) < math.log(1.3)


def test_per_size_overrides_pick_the_first_matching_entry():
    cfg = isoflop_cpu.get_config()
    cfg.overrides = [{"max_params": 2e5, "opt.learning_rate": 4e-3, "batch_size": 8},
                     {"max_params": 4e5, "opt.learning_rate": 2.5e-3}]
    for p in points_lib.expand(cfg):
        small, medium = p.non_embedding_params <= 2e5, p.non_embedding_params <= 4e5
        assert p.config.opt.learning_rate == (4e-3 if small else 2.5e-3 if medium else cfg.base.opt.learning_rate)
        assert p.config.batch_size == (8 if small else cfg.base.batch_size)
        # Steps follow the overridden batch size, so the budget still holds.
        assert abs(p.flops - p.budget) <= 0.5 * p.flops_per_token * p.config.batch_size * p.config.seq_len


def test_unknown_override_key_is_refused():
    cfg = isoflop_cpu.get_config()
    cfg.overrides = [{"max_params": float("inf"), "opt.learning_rat": 1e-3}]
    with pytest.raises(ValueError, match="learning_rat"):
        points_lib.expand(cfg)


def test_grid_example_expands_sizes_times_tokens():
    cfg = grid_example.get_config()
    points = points_lib.expand(cfg)
    assert len(points) == len(cfg.sizes) * len(cfg.tokens)
    assert len({p.name for p in points}) == len(points)
    for p in points:
        tokens_per_step = p.config.batch_size * p.config.seq_len
        assert any(abs(p.tokens - t) <= tokens_per_step / 2 for t in cfg.tokens)
        assert p.budget == p.flops


def test_shards_partition_the_points():
    points = points_lib.expand(grid_example.get_config())
    shards = [points_lib.select_shard(points, f"{i}/3") for i in range(3)]
    names = [p.name for shard in shards for p in shard]
    assert sorted(names) == sorted(p.name for p in points)
    with pytest.raises(ValueError):
        points_lib.select_shard(points, "3/3")


# ---------------------------------------------------------------------------------------------------------
# Dry run


def test_dry_run_prints_every_point_and_a_total_and_trains_nothing(tmp_path, capsys):
    cfg = isoflop_cpu.get_config()
    workdir = tmp_path / "sweep"
    assert sweep.run(cfg, str(workdir), dry_run=True) == []
    out = capsys.readouterr().out
    for p in points_lib.expand(cfg):
        assert p.name in out
    assert "estimated total time" in out
    assert not workdir.exists()


def test_cli_dry_run(tmp_path):
    workdir = tmp_path / "sweep"
    proc = subprocess.run(
        [sys.executable, "-m", "llm.cli", "sweep", "--config=configs/sweeps/isoflop_cpu.py", f"--workdir={workdir}", "--dry_run"],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "C1e13_" in proc.stdout and "estimated total time" in proc.stdout
    assert not workdir.exists()


# ---------------------------------------------------------------------------------------------------------
# Running a tiny sweep end to end


def tiny_sweep_config(text_path: Path) -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.name = "tiny"
    c.kind = "isoflop"
    c.budgets = [4e7, 8e7]
    c.targets = [8e3, 1.6e4]
    c.shape = ml_collections.ConfigDict(dict(d_model_step=16, d_model_per_layer=(4, 16), head_dim=16, ff_ratio=4, min_layers=2, max_layers=4))
    c.overrides = [{"max_params": 1e4, "opt.learning_rate": 1e-2}]
    c.warmup_fraction = 0.2
    c.checkpoints_per_point = 2
    base = default.get_config()
    base.batch_size = 4
    base.seq_len = 32
    base.log_every_steps = 1
    base.eval_batch_size = 8
    base.peak_tflops = 1.0
    base.data.dataset = f"text:{text_path}"
    c.base = base
    return c


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """The tiny sweep run as two shards, one after the other; returns (config, workdir, rows after each shard)."""
    root = tmp_path_factory.mktemp("tiny_sweep")
    rng = np.random.default_rng(0)
    words = ["the", "king", "queen", "shall", "not", "be", "to", "of", "and", "my", "lord", "sweet", "love"]
    text_path = root / "corpus.txt"
    text_path.write_text("\n".join(" ".join(rng.choice(words, 12)) for _ in range(600)))
    cfg = tiny_sweep_config(text_path)
    workdir = root / "sweep"
    first = sweep.run(cfg, str(workdir), shard="0/2")
    rows_after_first = read_rows(workdir)
    second = sweep.run(cfg, str(workdir), shard="1/2")
    return cfg, workdir, rows_after_first, first + second


def test_tiny_sweep_writes_one_row_per_point_with_the_issue_columns(tiny):
    cfg, workdir, _, _ = tiny
    points = points_lib.expand(cfg)
    assert len(points) == 4
    with open(workdir / sweep.RESULTS, newline="") as f:
        header = next(csv.reader(f))
    assert header[: len(ISSUE_COLUMNS)] == ISSUE_COLUMNS
    rows = read_rows(workdir)
    assert sorted(r["name"] for r in rows) == sorted(p.name for p in points)
    for row in rows:
        point = next(p for p in points if p.name == row["name"])
        assert int(row["params"]) == point.params and int(row["tokens"]) == point.tokens
        assert float(row["flops"]) == pytest.approx(point.flops, rel=1e-5)
        assert 0 < float(row["eval_loss"]) < 10 and 0 < float(row["bits_per_byte"]) < 15
        assert float(row["wall_seconds"]) > 0
        assert (workdir / row["name"] / sweep.MARKER).exists()


def test_shards_together_cover_every_point_once(tiny):
    cfg, workdir, rows_after_first, new_rows = tiny
    names = [p.name for p in points_lib.expand(cfg)]
    assert [r["name"] for r in rows_after_first] == names[0::2]
    assert sorted(r["name"] for r in read_rows(workdir)) == sorted(names)
    assert len(new_rows) == len(names)


def test_rerun_skips_finished_points(tiny):
    cfg, workdir, _, _ = tiny
    before = (workdir / sweep.RESULTS).read_bytes()
    metrics = {p: os.path.getmtime(p) for p in workdir.glob("*/metrics.jsonl")}
    assert sweep.run(cfg, str(workdir)) == []
    assert (workdir / sweep.RESULTS).read_bytes() == before
    assert {p: os.path.getmtime(p) for p in workdir.glob("*/metrics.jsonl")} == metrics


def test_lost_results_csv_is_rebuilt_from_the_markers_without_training(tiny, tmp_path):
    cfg, workdir, _, _ = tiny
    copy = tmp_path / "sweep"
    shutil.copytree(workdir, copy)
    expected = read_rows(copy)
    (copy / sweep.RESULTS).unlink()
    assert sweep.run(cfg, str(copy)) == []
    assert sorted(read_rows(copy), key=lambda r: r["name"]) == sorted(expected, key=lambda r: r["name"])


def test_half_finished_point_resumes_from_its_checkpoint(tiny, tmp_path):
    cfg, workdir, _, _ = tiny
    point = max(points_lib.expand(cfg), key=lambda p: p.config.num_train_steps)
    steps, every = point.config.num_train_steps, point.config.checkpoint_every_steps
    assert every < steps
    copy = tmp_path / "sweep"
    shutil.copytree(workdir, copy)
    original = next(r for r in read_rows(copy) if r["name"] == point.name)
    # Undo the end of the run: drop its row, its marker and its final checkpoint, keeping the one halfway.
    kept = [r for r in read_rows(copy) if r["name"] != point.name]
    with open(copy / sweep.RESULTS, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=sweep.COLUMNS)
        writer.writeheader()
        writer.writerows(kept)
    point_dir = copy / point.name
    (point_dir / sweep.MARKER).unlink()
    shutil.rmtree(point_dir / checkpoint.DIRNAME / str(steps))
    assert checkpoint.latest_step(str(point_dir)) == every
    lines_before = len((point_dir / "metrics.jsonl").read_text().splitlines())

    new_rows = sweep.run(cfg, str(copy))
    assert [r["name"] for r in new_rows] == [point.name]
    records = [json.loads(line) for line in (point_dir / "metrics.jsonl").read_text().splitlines()[lines_before:]]
    trained = sorted({r["step"] for r in records if "loss" in r})
    assert trained == list(range(every + 1, steps + 1))  # only the steps after the checkpoint ran again
    # Same batches, same params: the resumed run ends where the uninterrupted one did.
    assert float(new_rows[0]["eval_loss"]) == pytest.approx(float(original["eval_loss"]), abs=1e-4)
    assert len(read_rows(copy)) == len(points_lib.expand(cfg))


def test_changed_config_for_a_started_point_is_refused(tiny, tmp_path):
    cfg, workdir, _, _ = tiny
    copy = tmp_path / "sweep"
    shutil.copytree(workdir, copy)
    (copy / sweep.RESULTS).unlink()
    for marker in copy.glob(f"*/{sweep.MARKER}"):
        marker.unlink()
    changed = ml_collections.ConfigDict(cfg.to_dict())
    changed.base.opt.weight_decay = 0.0
    with pytest.raises(ValueError, match="different config"):
        sweep.run(changed, str(copy))


# ---------------------------------------------------------------------------------------------------------
# The fitter reads what the sweep writes


def test_fit_cli_reads_a_sweep_results_csv(tmp_path):
    true = dict(E=1.0, A=40.0, B=60.0, alpha=0.35, beta=0.3)
    rng = np.random.default_rng(0)
    for budget in (1e12, 3e12, 1e13):
        for n in np.geomspace(1e5, 3e6, 5):
            # The exact FLOPs sit a little off the nominal budget, as a real sweep's do.
            flops = budget * rng.uniform(0.95, 1.05)
            tokens = flops / (7 * n)
            loss = fit.predict_loss(n, tokens, true) * rng.lognormal(0, 0.003)
            sweep._append_row(str(tmp_path), dict(
                name=f"C{budget:g}_{n:.0f}", params=int(n), non_embedding_params=int(0.97 * n), tokens=int(tokens),
                flops=flops, train_loss=loss, eval_loss=loss, bits_per_byte=loss / math.log(2), wall_seconds=1.0,
                flops_6n=6 * n * tokens, tokens_6n=budget / (6 * n), budget=budget, d_model=64, num_layers=2,
                num_heads=2, d_ff=256, batch_size=16, num_train_steps=100, learning_rate=1e-3))
    proc = subprocess.run(
        [sys.executable, "-m", "llm.cli", "fit", f"--workdir={tmp_path}", "--bootstrap=0"],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["approach3"]["alpha"] == pytest.approx(true["alpha"], abs=0.1)
    assert len(result["approach2"]["budgets"]) == 3  # grouped by the sweep's budget column
    assert (tmp_path / "isoflops.png").exists()


# ---------------------------------------------------------------------------------------------------------
# Cooldown forks


@pytest.fixture(scope="module")
def forked(tiny):
    """The tiny sweep's smaller size with cooldown forks; returns (config, workdir, rows)."""
    cfg, workdir, _, _ = tiny
    cfg = ml_collections.ConfigDict(cfg.to_dict())
    cfg.cooldowns, cfg.decay_fraction, cfg.targets = True, 0.25, [8e3]
    forked_dir = workdir.parent / "forked"
    return cfg, forked_dir, sweep.run(cfg, str(forked_dir))


def test_forked_cooldown_equals_the_full_run_with_the_same_schedule_bit_for_bit(forked, tmp_path):
    import orbax.checkpoint as ocp

    from llm.data import tokenizer as tokenizer_lib
    from tests.conftest import train_run

    cfg, workdir, rows = forked
    point = max(points_lib.expand(cfg), key=lambda p: p.config.num_train_steps)
    steps = point.config.num_train_steps
    assert 0 < point.cooldown_start < steps and point.config.opt.schedule == "wsd"
    full = tmp_path / "full"
    full.mkdir()
    tokenizer_lib.save(points_lib.sweep_tokenizer(point.config), str(full))
    summary = train_run(point.config, full, quiet=True)
    row = next(r for r in rows if r["name"] == point.name)
    assert row["eval_loss"] == f"{summary['eval_loss']:.6f}"

    def final_params(run_dir):
        return ocp.PyTreeCheckpointer().restore(str(run_dir / checkpoint.DIRNAME / str(steps) / "params"))

    forked_params, full_params = final_params(workdir / point.name), final_params(full)
    leaves = jax_leaves(forked_params)
    assert len(leaves) == len(jax_leaves(full_params)) > 0
    for a, b in zip(leaves, jax_leaves(full_params)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    # The fork trained only its cooldown: its own metrics start after the stable run's checkpoint.
    trained = [json.loads(line)["step"] for line in (workdir / point.name / "metrics.jsonl").read_text().splitlines()]
    assert min(trained) == point.cooldown_start + 1


def jax_leaves(tree):
    import jax

    return jax.tree.leaves(tree)


def test_cooldown_sweep_writes_a_row_per_size_and_budget_and_its_savings(forked):
    from llm.scaling import cooldowns

    cfg, workdir, rows = forked
    points = points_lib.expand(cfg)
    assert sorted(r["name"] for r in read_rows(workdir)) == sorted(p.name for p in points)
    for p in points:
        row = next(r for r in rows if r["name"] == p.name)
        assert float(row["flops"]) == pytest.approx(p.flops, rel=1e-5)  # stable prefix + its own cooldown
        # Each size's stable run kept a checkpoint at every one of its cooldown starts.
        assert checkpoint.reader(str(workdir / f"{p.size}_stable")).all_steps() == list(p.cooldown_starts)
    saved = json.loads((workdir / cooldowns.SAVINGS).read_text())
    per_step = {p.size: p.flops / p.config.num_train_steps for p in points}
    forked_flops = sum(per_step[p.size] * (p.config.num_train_steps - p.cooldown_start) for p in points) + sum(
        per_step[s] * max(p.cooldown_start for p in points if p.size == s) for s in per_step)
    assert saved["from_scratch_flops"] == pytest.approx(sum(p.flops for p in points))
    assert saved["forked_flops"] == pytest.approx(forked_flops)
    assert 0 < saved["saved_fraction"] < 1


def test_interrupted_fork_resumes_from_its_last_checkpoint(forked, tmp_path):
    cfg, workdir, rows = forked
    point = max(points_lib.expand(cfg), key=lambda p: p.config.num_train_steps)
    steps = point.config.num_train_steps
    copy = tmp_path / "sweep"
    shutil.copytree(workdir, copy)
    # Undo the end of the fork: its row, its marker and its final checkpoint; what is left is a checkpoint
    # of its cooldown (or the stable run's, copied in at its cooldown start).
    kept = [r for r in read_rows(copy) if r["name"] != point.name]
    (copy / sweep.RESULTS).unlink()
    for r in kept:
        sweep._append_row(str(copy), r)
    point_dir = copy / point.name
    (point_dir / sweep.MARKER).unlink()
    shutil.rmtree(point_dir / checkpoint.DIRNAME / str(steps))
    resume_at = checkpoint.latest_step(str(point_dir))
    assert point.cooldown_start <= resume_at < steps
    lines_before = len((point_dir / "metrics.jsonl").read_text().splitlines())

    new_rows = sweep.run(cfg, str(copy))
    assert [r["name"] for r in new_rows] == [point.name]
    records = [json.loads(line) for line in (point_dir / "metrics.jsonl").read_text().splitlines()[lines_before:]]
    assert sorted({r["step"] for r in records if "loss" in r}) == list(range(resume_at + 1, steps + 1))
    original = next(r for r in rows if r["name"] == point.name)
    assert new_rows[0]["eval_loss"] == original["eval_loss"]


def test_cooldown_shards_hold_whole_sizes(tiny):
    cfg, _, _, _ = tiny
    cfg = ml_collections.ConfigDict(cfg.to_dict())
    cfg.cooldowns = True
    points = points_lib.expand(cfg)
    shards = [points_lib.select_shard(points, f"{i}/2") for i in range(2)]
    assert sorted(p.name for shard in shards for p in shard) == sorted(p.name for p in points)
    # One host trains each stable run.
    assert {p.size for p in shards[0]}.isdisjoint(p.size for p in shards[1]) and all(shards)


def test_misspelt_sweep_key_is_one_error_line_before_compiling(tmp_path):
    config = tmp_path / "my_sweep.py"
    config.write_text(
        "from configs.sweeps import isoflop_cpu\n\n"
        "def get_config():\n"
        "    c = isoflop_cpu.get_config()\n"
        "    c.cooldown = True\n"
        "    return c\n")
    proc = subprocess.run([sys.executable, "-m", "llm.cli", "sweep", f"--config={config}", f"--workdir={tmp_path / 'w'}"],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "'cooldown' (did you mean 'cooldowns'?)" in errors[0], proc.stderr[-2000:]
    assert not (tmp_path / "w").exists()


def test_dry_run_warns_when_a_point_would_repeat_the_training_split(tiny, capsys):
    from llm import spec
    from llm.data import corpus

    cfg, workdir, _, _ = tiny
    cfg = ml_collections.ConfigDict(cfg.to_dict())
    cfg.budgets = [4e7, 4e9]
    points = points_lib.expand(cfg)
    available = corpus.num_tokens(spec.from_config(points[0].config).data, "train", points_lib.sweep_tokenizer(points[0].config))
    capsys.readouterr()
    sweep.run(cfg, str(workdir.parent / "never"), dry_run=True)
    warnings = [line for line in capsys.readouterr().out.splitlines() if line.startswith("warning:")]
    over = [p for p in points if p.tokens > available]
    assert len(warnings) == 1 and 0 < len(over) < len(points)
    assert f"{len(over)} of {len(points)} points" in warnings[0] and f"{available:,}" in warnings[0]
    for p in over:
        assert f"{p.name} {p.tokens / available:.2f}" in warnings[0]
    assert not (workdir.parent / "never").exists()
