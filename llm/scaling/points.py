"""A sweep config (configs/sweeps/) expanded into its points: one full run config each, with its params,
FLOPs and tokens, in a fixed order; and the --dry_run table with its time estimate. llm/scaling/sweep.py runs them.

Sweep config keys (configs/sweeps/isoflop_cpu.py is the worked example):
  name           the sweep's name; each run is named '<name>/<point name>'
  kind           'isoflop': for each compute budget C in `budgets` (FLOPs), one model per target in
                 `targets` (non-embedding params; one list for all budgets, or one list per budget)
                 trained for round(C / (flops_per_token * batch_size * seq_len)) steps;
                 'grid': every named size in `sizes` (configs/sizes.py) x every token count in `tokens`
  base           a full run config (configs/default.py's keys); each point copies and changes it
  shape          the shape rule for isoflop targets: d_model_step, d_model_per_layer (lo, hi), head_dim
                 (heads are about this wide), ff_ratio, min_layers, max_layers
  overrides      list of dicts {'max_params': N, 'opt.learning_rate': ..., 'batch_size': ...}: the first
                 entry (in order) whose max_params >= a point's non-embedding params sets those keys. With
                 base.model.parametrization='mup' one learning rate serves every size: leave it out
                 (configs/sweeps/isoflop_cpu_mup.py); an isoflop sweep's mup points take shape.head_dim
                 as model.base_head_dim unless the base sets one
  warmup_fraction  warmup_steps = round(warmup_fraction * num_train_steps); < 0 keeps the base's
  checkpoints_per_point  checkpoint_every_steps = ceil(num_train_steps / checkpoints_per_point)
  throughput     for the --dry_run time estimate: flops_per_second, seconds_per_token, seconds_per_point
  cooldowns      optional, True: cooldown forks (llm/scaling/cooldowns.py). Every point trains the
                 warmup-stable-decay schedule ('wsd'); the points of one size share one constant-rate stable
                 run and fork their decay from its checkpoint at their cooldown start. Points are then ordered
                 size by size, budgets ascending, and every size has the warmup of its shortest point
  decay_fraction optional: the wsd decay's share of each point's steps (default: base.opt.decay_fraction)
  archs          optional: model.arch values ('decoder', 'encoder_decoder', ...); every point is repeated for
                 each, named '<arch>-<point>', its FLOPs counted for its arch (configs/sweeps/arch_isoflop_cpu.py);
                 `./run.sh fit --arch=A` fits one arch's rows
  resources_per_point, max_retries  optional, for `--ray` only (llm/scaling/ray_sweep.py)
"""

import dataclasses
import difflib
import functools
import json
import math

import ml_collections

from llm import model, spec
from llm.data import corpus, tokenizer as tokenizer_lib
from llm.data.config import DataConfig
from llm.spec import ConfigError
from llm.training import batches, optimizer

# Measured on this project's 2-core CPU machine (see experiments/scaling/README.md); a sweep config's
# `throughput` replaces it. Small models are dominated by per-token overheads, large ones by matmuls.
CPU_THROUGHPUT = dict(flops_per_second=7e10, seconds_per_token=2.5e-5, seconds_per_point=12.0)

# Every top-level key a sweep config may have, and the ones each kind needs: anything else is refused, so
# a misspelt key cannot silently run a different sweep.
KEYS = {"name", "kind", "budgets", "targets", "shape", "sizes", "tokens", "base", "overrides", "warmup_fraction",
        "checkpoints_per_point", "throughput", "archs", "cooldowns", "decay_fraction", "resources_per_point",
        "max_retries"}
REQUIRED = {"isoflop": ("name", "base", "budgets", "targets", "shape"), "grid": ("name", "base", "sizes", "tokens")}
DEFAULTS = dict(overrides=[], warmup_fraction=-1.0, checkpoints_per_point=2, cooldowns=False)


@dataclasses.dataclass
class Point:
    name: str
    config: ml_collections.ConfigDict  # the full run config
    budget: float  # isoflop: the nominal C; grid: the run's own exact FLOPs
    params: int
    non_embedding_params: int
    flops_per_token: int  # exact: 6 x matmul params + attention (llm.model.flops_per_token)
    tokens: int  # num_train_steps x batch_size x seq_len
    tokens_6n: float  # isoflop: what C = 6 N D would have given, budget / (6 params); grid: tokens
    size: str = ""  # the model's name within the sweep (isoflop: 'd<D>l<L>'; grid: the size's name)
    cooldown_start: int = 0  # cooldown forks: the step this point forks from its size's stable run; else 0
    cooldown_starts: tuple[int, ...] = ()  # cooldown forks: every cooldown start of its size, ascending

    @property
    def trained_tokens(self) -> int:
        """Tokens this point trains itself: a fork's stable prefix is trained once, by its size's stable run."""
        return self.tokens - self.cooldown_start * self.config.batch_size * self.config.seq_len

    @property
    def flops(self) -> float:
        return float(self.flops_per_token) * self.tokens

    @property
    def flops_6n(self) -> float:
        return 6.0 * self.params * self.tokens


# ---------------------------------------------------------------------------------------------------------
# Expansion


_TOKENIZERS: dict[str, tokenizer_lib.Tokenizer] = {}


def sweep_tokenizer(cfg: ml_collections.ConfigDict) -> tokenizer_lib.Tokenizer:
    """One tokenizer for every point: each run finds it in its workdir and keeps it, so the vocabulary the
    sweep counts params and FLOPs with is the one that trains (and SentencePiece is trained once)."""
    key = json.dumps(cfg.data.to_dict(), sort_keys=True)  # expansion asks once per point; build once per corpus
    if key not in _TOKENIZERS:
        _TOKENIZERS[key] = batches.build_tokenizer(spec.from_config(cfg))
    return _TOKENIZERS[key]


@functools.lru_cache(maxsize=8)
def _validation_tokens(dc: DataConfig, tok: tokenizer_lib.Tokenizer) -> int:
    return corpus.num_tokens(dc, "validation", tok)


@functools.lru_cache(maxsize=8)
def _train_tokens(dc: DataConfig, tok: tokenizer_lib.Tokenizer) -> int:
    return corpus.num_tokens(dc, "train", tok)


def repetition_warning(points: list[Point]) -> str | None:
    """One line naming the points that need more tokens than the training split holds, with the epochs
    each would train (Muennighoff et al. 2023: repeated data bends a scaling law), or None."""
    over, available = [], 0
    for p in points:
        available = _train_tokens(spec.from_config(p.config).data, sweep_tokenizer(p.config))
        if p.tokens > available:
            over.append(f"{p.name} {p.tokens / max(available, 1):.2f}")
    if not over:
        return None
    return (f"warning: {len(over)} of {len(points)} points need more tokens than the training split's {available:,}, "
            f"so they would repeat it (epochs): {', '.join(over)}")


def _short(x: float) -> str:
    return f"{x:.3g}".replace("e+0", "e").replace("e+", "e")


def _set(cfg: ml_collections.ConfigDict, dotted: str, value) -> None:
    *parents, key = dotted.split(".")
    node = cfg
    for p in parents:
        if p not in node or not isinstance(node[p], ml_collections.ConfigDict):
            raise ConfigError(f"sweep override {dotted!r}: the run config has no section {p!r}")
        node = node[p]
    if key not in node:
        raise ConfigError(f"sweep override {dotted!r}: the run config has no key {key!r}")
    node[key] = value


def _set_shape(cfg: ml_collections.ConfigDict, d_model: int, num_layers: int, num_heads: int, d_ff: int) -> None:
    cfg.model.d_model, cfg.model.num_layers, cfg.model.d_ff = d_model, num_layers, d_ff
    cfg.model.num_heads = cfg.model.num_kv_heads = num_heads


def _heads(d_model: int, head_dim: int) -> int:
    """The head count whose (even, for rope) head dimension is nearest head_dim."""
    divisors = [h for h in range(1, d_model + 1) if d_model % h == 0 and (d_model // h) % 2 == 0]
    return min(divisors, key=lambda h: (abs(math.log(d_model / h / head_dim)), h))


def shape_for(target: float, base: ml_collections.ConfigDict, rule: ml_collections.ConfigDict) -> tuple[int, int, int, int]:
    """(d_model, num_layers, num_heads, d_ff) whose non-embedding params are closest to `target` in log space,
    among d_model a multiple of d_model_step within d_model_per_layer x num_layers, min_layers..max_layers,
    heads of about head_dim and d_ff = ff_ratio x d_model."""
    template = _model_config(base)
    # An encoder-decoder whose num_encoder_layers is 0 stacks as many encoder layers as decoder layers.
    tied_encoder = template.arch == "encoder_decoder" and not base.model.num_encoder_layers
    lo, hi = rule.d_model_per_layer
    step = rule.d_model_step
    best, best_err = None, math.inf
    for num_layers in range(rule.min_layers, rule.max_layers + 1):
        for d_model in range(step * math.ceil(lo * num_layers / step), int(hi * num_layers) + 1, step):
            heads, d_ff = _heads(d_model, rule.head_dim), int(rule.ff_ratio * d_model)
            mc = dataclasses.replace(template, D=d_model, N=num_layers, H=heads, G=heads, F=d_ff,
                                     E=num_layers if tied_encoder else template.E)
            err = abs(math.log(model.param_counts(mc)["non_embedding"] / target))
            if err < best_err:  # strict: among equals the shallowest wins
                best, best_err = (d_model, num_layers, heads, d_ff), err
    if best is None:
        raise ConfigError(f"the shape rule {rule.to_dict()} allows no model shape")
    return best


def _model_config(cfg: ml_collections.ConfigDict) -> model.ModelConfig:
    """The model a point trains, its vocabulary by the one rule training uses (spec.vocabulary)."""
    return spec.resolve(spec.from_config(cfg), sweep_tokenizer(cfg)).model


def _counts(cfg: ml_collections.ConfigDict) -> tuple[dict, int]:
    mc = _model_config(cfg)
    return model.param_counts(mc), model.flops_per_token(mc)


def _apply_overrides(cfg: ml_collections.ConfigDict, overrides, non_embedding: int) -> None:
    for entry in overrides:
        if non_embedding <= entry["max_params"]:
            for key, value in entry.items():
                if key != "max_params":
                    _set(cfg, key, value)
            return


def _finish(sweep: ml_collections.ConfigDict, cfg: ml_collections.ConfigDict, name: str, steps: int) -> None:
    """Step-dependent settings: the schedule, one eval at the end, a few checkpoints to resume from."""
    cfg.name = f"{sweep.name}/{name}"
    cfg.num_train_steps = steps
    cfg.eval_every_steps = steps
    cfg.checkpoint_every_steps = math.ceil(steps / sweep.checkpoints_per_point)
    if sweep.warmup_fraction >= 0:
        cfg.opt.warmup_steps = int(round(sweep.warmup_fraction * steps))
    cfg.sample_tokens = 0
    if sweep.cooldowns:
        cfg.opt.schedule = "wsd"
    if "decay_fraction" in sweep:
        cfg.opt.decay_fraction = sweep.decay_fraction
    spec.validate(cfg)


def _isoflop_points(sweep: ml_collections.ConfigDict) -> list[Point]:
    targets = list(sweep.targets)
    if targets and not isinstance(targets[0], (list, tuple)):
        targets = [targets] * len(sweep.budgets)
    if len(targets) != len(sweep.budgets):
        raise ConfigError(f"isoflop: {len(sweep.budgets)} budgets but {len(targets)} lists of targets")
    points = []
    for budget, budget_targets in zip(sweep.budgets, targets):
        shapes = {}
        for target in budget_targets:
            shape = shape_for(target, sweep.base, sweep.shape)
            if shape in shapes:
                raise ConfigError(
                    f"isoflop: targets {_short(shapes[shape])} and {_short(target)} both map to the shape {shape}; spread them out")
            shapes[shape] = target
            cfg = ml_collections.ConfigDict(sweep.base.to_dict())
            _set_shape(cfg, *shape)
            if cfg.model.parametrization == "mup" and not cfg.model.base_head_dim:
                cfg.model.base_head_dim = sweep.shape.head_dim  # heads grow at this width: 1/d_head is then constant
            _apply_overrides(cfg, sweep.overrides, _counts(cfg)[0]["non_embedding"])
            counts, fpt = _counts(cfg)
            tokens_per_step = cfg.batch_size * cfg.seq_len
            steps = round(budget / (fpt * tokens_per_step))
            name = f"C{_short(budget)}_d{cfg.model.d_model}l{cfg.model.num_layers}"
            if steps < 1:
                raise ConfigError(
                    f"isoflop point {name}: one step ({_short(fpt * tokens_per_step)} FLOPs) exceeds the budget {_short(budget)}")
            _finish(sweep, cfg, name, steps)
            points.append(Point(name, cfg, float(budget), counts["total"], counts["non_embedding"], fpt,
                                steps * tokens_per_step, budget / (6 * counts["total"]),
                                size=f"d{cfg.model.d_model}l{cfg.model.num_layers}"))
    return points


def _grid_points(sweep: ml_collections.ConfigDict) -> list[Point]:
    from configs import sizes as sizes_lib

    points = []
    for size in sweep.sizes:
        for tokens in sweep.tokens:
            cfg = ml_collections.ConfigDict(sweep.base.to_dict())
            try:
                sizes_lib.apply_size(cfg, size)
            except ValueError as e:
                raise ConfigError(str(e)) from e
            _apply_overrides(cfg, sweep.overrides, _counts(cfg)[0]["non_embedding"])
            counts, fpt = _counts(cfg)
            tokens_per_step = cfg.batch_size * cfg.seq_len
            steps = max(1, round(tokens / tokens_per_step))
            name = f"{size}_D{_short(tokens)}"
            _finish(sweep, cfg, name, steps)
            real_tokens = steps * tokens_per_step
            points.append(Point(name, cfg, float(fpt) * real_tokens, counts["total"], counts["non_embedding"], fpt,
                                real_tokens, real_tokens, size=size))
    return points


def check_keys(sweep: ml_collections.ConfigDict) -> None:
    unknown = sorted(set(sweep.keys()) - KEYS)
    if unknown:
        hints = [f"{k!r} (did you mean {close[0]!r}?)" if (close := difflib.get_close_matches(k, KEYS, 1)) else repr(k)
                 for k in unknown]
        raise ConfigError(f"unknown sweep config key{'s' if len(unknown) > 1 else ''} {', '.join(hints)}; "
                          f"a sweep config takes {', '.join(sorted(KEYS))}")
    kind = sweep.get("kind")
    if kind not in REQUIRED:
        raise ConfigError(f"sweep kind {kind!r} is not one of 'isoflop', 'grid'")
    missing = [k for k in REQUIRED[kind] if k not in sweep]
    if missing:
        raise ConfigError(f"a {kind} sweep config needs {', '.join(missing)}")
    if not isinstance(sweep.get("cooldowns", False), bool):
        raise ConfigError(f"cooldowns must be True or False, got {sweep.cooldowns!r}")
    if "decay_fraction" in sweep and not 0 < sweep.decay_fraction < 1:
        raise ConfigError(f"decay_fraction must be in (0, 1), got {sweep.decay_fraction}")


def expand(sweep: ml_collections.ConfigDict) -> list[Point]:
    """Every point of the sweep in a fixed order (shards and resumption rely on it)."""
    check_keys(sweep)
    sweep = ml_collections.ConfigDict({**DEFAULTS, **sweep.to_dict()})  # config_flags locks the config it loads
    if "archs" in sweep:
        points = []
        for arch in sweep.archs:
            one = ml_collections.ConfigDict({k: v for k, v in sweep.to_dict().items() if k != "archs"})
            one.base.model.arch = arch
            for point in expand(one):
                point.name, point.size = f"{arch}-{point.name}", f"{arch}-{point.size}"
                point.config.name = f"{sweep.name}/{point.name}"
                points.append(point)
        return points
    points = _isoflop_points(sweep) if sweep.kind == "isoflop" else _grid_points(sweep)
    names = [p.name for p in points]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise ConfigError(f"the sweep repeats points: {', '.join(duplicates)}")
    return _plan_forks(points) if sweep.cooldowns else points


# Settings that differ between the budgets of one size; everything else must match for them to share a stable run.
_PER_BUDGET = ("name", "num_train_steps", "eval_every_steps", "checkpoint_every_steps", "opt.warmup_steps")


def without_per_budget(cfg: ml_collections.ConfigDict) -> dict:
    d = json.loads(json.dumps(cfg.to_dict()))
    for dotted in _PER_BUDGET:
        *parents, key = dotted.split(".")
        node = d
        for p in parents:
            node = node[p]
        node.pop(key)
    return d


def by_size(points: list[Point]) -> dict[str, list[Point]]:
    """The points of each size, sizes in order of first appearance, budgets ascending."""
    groups: dict[str, list[Point]] = {}
    for p in points:
        groups.setdefault(p.size, []).append(p)
    return {size: sorted(group, key=lambda p: p.tokens) for size, group in groups.items()}


def _plan_forks(points: list[Point]) -> list[Point]:
    """Size-major order; one warmup per size (its shortest point's); each point's cooldown start."""
    planned = []
    for size, group in by_size(points).items():
        shared = without_per_budget(group[0].config)
        for p in group[1:]:
            if without_per_budget(p.config) != shared:
                raise ConfigError(f"cooldowns: points {group[0].name} and {p.name} of size {size} differ in more than "
                                  f"their length, so they cannot share a stable run (per-size overrides only)")
        warmup = group[0].config.opt.warmup_steps
        for p in group:
            p.config.opt.warmup_steps = warmup
            spec.validate(p.config)
            p.cooldown_start = optimizer.cooldown_start(spec.from_config(p.config).opt)
            if p.cooldown_start <= warmup:
                raise ConfigError(f"cooldowns: point {p.name} ({p.config.num_train_steps} steps) decays from step "
                                  f"{p.cooldown_start}, not after its size's {warmup} warmup steps; lower decay_fraction "
                                  f"or warmup_fraction")
        starts = tuple(sorted({p.cooldown_start for p in group}))
        for p in group:
            p.cooldown_starts = starts
            planned.append(p)
    return planned


def select_shard(points: list[Point], shard: str) -> list[Point]:
    """'i/n' keeps every n-th point from the i-th (0-based): n hosts split a sweep with no coordinator.
    With cooldown forks it keeps every n-th size instead, so each stable run is trained on one host."""
    if not shard:
        return points
    try:
        index, count = (int(x) for x in shard.split("/"))
    except ValueError:
        raise ConfigError(f"--shard={shard!r} is not of the form i/n") from None
    if not 0 <= index < count:
        raise ConfigError(f"--shard={shard!r}: need 0 <= i < n")
    if any(p.cooldown_start for p in points):
        return [p for group in list(by_size(points).values())[index::count] for p in group]
    return points[index::count]


# ---------------------------------------------------------------------------------------------------------
# Time estimate and the table


def estimate_seconds(point: Point, throughput: dict) -> float:
    """Fixed start-up cost + per-token overhead + matmul FLOPs at a sustained rate, for training and the final eval."""
    cfg = point.config
    eval_tokens = _validation_tokens(spec.from_config(cfg).data, sweep_tokenizer(cfg))
    if cfg.eval_max_batches:
        eval_tokens = min(eval_tokens, cfg.eval_max_batches * cfg.eval_batch_size * cfg.seq_len)
    train_s = point.trained_tokens * (throughput["seconds_per_token"] + point.flops_per_token / throughput["flops_per_second"])
    # The forward pass is a third of a training step's FLOPs.
    eval_s = eval_tokens * (throughput["seconds_per_token"] + point.flops_per_token / throughput["flops_per_second"]) / 3
    return throughput["seconds_per_point"] + train_s + eval_s


def duration(seconds: float) -> str:
    return f"{seconds:.0f}s" if seconds < 120 else f"{seconds / 60:.1f}min"


def format_table(points: list[Point], throughput: dict) -> str:
    header = ("name", "shape DxLxHxF", "params", "non_emb", "batch", "steps", "tokens", "tok/param", "tokens_6n",
              "flops", "flops_6n", "lr", "est")
    rows, total = [], 0.0
    for p in points:
        m, seconds = p.config.model, estimate_seconds(p, throughput)
        total += seconds
        rows.append((p.name, f"{m.d_model}x{m.num_layers}x{m.num_heads}x{m.d_ff}", f"{p.params:,}",
                     f"{p.non_embedding_params:,}", str(p.config.batch_size), str(p.config.num_train_steps),
                     f"{p.tokens:,}", f"{p.tokens / p.params:.2f}", f"{p.tokens_6n:,.0f}", f"{p.flops:.3g}",
                     f"{p.flops_6n:.3g}", f"{p.config.opt.learning_rate:g}", duration(seconds)))
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    line = lambda r: "  ".join(c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))
    for group in by_size(points).values() if any(p.cooldown_start for p in points) else ():
        # Each stable run: one start-up per segment, and its tokens up to the last cooldown start.
        p = group[-1]
        tokens = p.cooldown_starts[-1] * p.config.batch_size * p.config.seq_len
        total += len(p.cooldown_starts) * throughput["seconds_per_point"] + tokens * (
            throughput["seconds_per_token"] + p.flops_per_token / throughput["flops_per_second"])
    flops = sum(p.flops for p in points)
    rate = throughput["flops_per_second"]
    return "\n".join([line(header), *map(line, rows),
                      f"{len(points)} points, {flops:.3g} training FLOPs; estimated total time {duration(total)} "
                      f"(at {rate / 1e9:g} GFLOP/s + {throughput['seconds_per_token'] * 1e6:g} us/token "
                      f"+ {throughput['seconds_per_point']:g} s/point)"])
