"""The run spec: a run's ConfigDict (a config file with the CLI's overrides, a sweep point, a saved
config.json) checked and turned into one frozen, typed RunSpec, once.

Only this module and the entry points (cli, bench, scaling/sweep, scaling/coordcheck, llm.load) read a ConfigDict;
everything below them takes the RunSpec or a piece of it: ModelConfig (the model), DataConfig (the
data), OptConfig (the optimizer), MeshConfig, LoopConfig, ObjectiveConfig. Two things a config file
cannot say on its own are settled by `resolve`, where they become known: the vocabulary (it needs the
tokenizer; `vocabulary` is the one rule for it) and the choices that depend on the backend a model
runs on (the attention kernel, fused q/k/v), which must not start JAX before the CLI has set up its
devices.

Over 400 lines because the checks and the conversion are one pass over the same keys, kept together
so that a new key is added in one place.
"""

import dataclasses
import json

import ml_collections

from llm.data import denoise, mixture, template
from llm.data.config import LOSS_ON, PACKINGS, SAMPLINGS, DataConfig, DataError, is_streamed, kind_of
from llm.data.tokenizer import KINDS as TOKENIZERS, Tokenizer
from llm.model import ModelConfig
from llm.model.attention import IMPLEMENTATIONS as ATTENTIONS, resolve as resolve_attention
from llm.model.parametrization import Parametrization

POS_ENCODINGS = ("sinusoidal", "learned", "rope")
NORMS = ("layernorm", "rmsnorm")
MLPS = ("gelu", "swiglu")
DTYPES = ("float32", "bfloat16", "float16")
REMATS = ("none", "block", "dots")
ARCHS = ("decoder", "encoder", "encoder_decoder")
SCHEDULES = ("cosine", "linear", "constant", "wsd")
OPTIMIZERS = ("adamw", "muon")
PARAMETRIZATIONS = ("sp", "mup")
DEPTH_PARAMETRIZATIONS = ("none", "completep")
OBJECTIVES = ("lm", "reward", "dpo", "grpo")
MESH_AXES = ("data", "fsdp", "tensor")
LOOP_KEYS = ("num_train_steps", "log_every_steps", "eval_every_steps", "eval_batch_size", "eval_max_batches",
             "checkpoint_every_steps", "keep_checkpoints", "peak_tflops", "sample_prompt", "sample_tokens", "eval_tasks",
             "eval_tasks_limit")


class ConfigError(ValueError):
    pass


@dataclasses.dataclass(frozen=True)
class OptConfig:
    num_train_steps: int
    learning_rate: float
    warmup_steps: int
    schedule: str
    final_lr_ratio: float
    decay_fraction: float
    b1: float
    b2: float
    eps: float
    weight_decay: float
    decay_embeddings: bool
    clip_norm: float
    grad_accum_steps: int
    z_loss: float
    optimizer: str = "adamw"
    muon_learning_rate: float = 0.02
    muon_weight_decay: float = 0.0
    muon_momentum: float = 0.95


@dataclasses.dataclass(frozen=True)
class MeshConfig:
    data: int
    fsdp: int
    tensor: int
    cpu_devices: int
    rules: tuple  # (logical axis, mesh axes or None) pairs; llm/training/sharding.py applies them


@dataclasses.dataclass(frozen=True)
class LoopConfig:
    num_train_steps: int
    log_every_steps: int
    eval_every_steps: int  # 0: no eval during training
    eval_batch_size: int
    eval_max_batches: int  # 0: the whole split
    checkpoint_every_steps: int
    keep_checkpoints: int
    peak_tflops: float  # per device (per host on CPU); 0: measured at start
    sample_prompt: str
    sample_tokens: int
    eval_tasks: str = ""  # lm_eval tasks run at each eval, comma-separated
    eval_tasks_limit: int = 0  # documents per task (0: all)

    @property
    def tasks(self) -> tuple[str, ...]:
        return tuple(t.strip() for t in self.eval_tasks.split(",") if t.strip())


@dataclasses.dataclass(frozen=True)
class GrpoConfig:
    group_size: int
    max_new_tokens: int
    temperature: float
    top_k: int
    clip_eps: float
    kl_coef: float
    reward_fn: str
    reward_run: str
    eval_prompts: int


@dataclasses.dataclass(frozen=True)
class ObjectiveConfig:
    name: str  # 'lm' | 'reward' | 'dpo' | 'grpo'
    init_from: str  # another run's workdir: the params to start from, and dpo/grpo's frozen reference
    dpo_beta: float
    grpo: GrpoConfig
    # A non-decoder on a text corpus trains its own objective on noised rows: 'span_corruption'
    # (encoder_decoder) or 'mlm' (encoder); None: next token (or seq2seq pairs).
    pretext: str | None


@dataclasses.dataclass(frozen=True)
class Vocabulary:
    """A run's ids: the tokenizer's, then those its objective reserves after them (span corruption's
    sentinels or BERT's [CLS] [SEP] [MASK]; a chat run's four role markers unless the tokenizer has
    them as pieces), inside the model's padded vocabulary of `size` rows."""

    tokenizer: int
    needed: int  # the tokenizer's ids and every id the run reserves after them
    size: int
    reserved: int  # the arch's ids right after the tokenizer's: sentinels, or [CLS] [SEP] [MASK]
    roles: template.RoleIds | None  # the chat template's ids, where the model has room for them

    @property
    def sample_limit(self) -> int:
        """One past the largest id a sampler may emit outside chat (span corruption's answers hold sentinels)."""
        return self.tokenizer + self.reserved

    def require_roles(self) -> template.RoleIds:
        """The chat template's ids, or the TemplateError saying why this model has none."""
        return self.roles or template.role_ids(self.tokenizer, self.size)


@dataclasses.dataclass(frozen=True)
class RunSpec:
    name: str
    seed: int
    batch_size: int  # global rows per optimizer step
    seq_len: int  # the context (an encoder-decoder: the encoder's input)
    model: ModelConfig  # V is 0 and attention the config's choice until `resolve`
    opt: OptConfig
    data: DataConfig
    mesh: MeshConfig
    loop: LoopConfig
    objective: ObjectiveConfig
    model_vocab_size: int  # model.vocab_size as configured (0: the tokenizer's, padded)
    vocab_multiple: int
    config: str  # the config as JSON, what config.json holds; settings are read from the fields above, never from here
    vocab: Vocabulary | None = None  # set by `resolve`

    @property
    def reserved_ids(self) -> int:
        """Ids after the tokenizer's that the arch's objective reserves: sentinels, or [CLS] [SEP] [MASK]."""
        if self.objective.pretext == "span_corruption":
            return span_lengths(self.seq_len, self.data.noise_density, self.data.mean_noise_span_length)[2]
        return len(denoise.MlmIds.__dataclass_fields__) if self.objective.pretext == "mlm" else 0

    @property
    def text_row_len(self) -> int:
        """The length of the text rows the arch reads from a corpus before its objective noises them."""
        if self.objective.pretext == "span_corruption":
            return span_lengths(self.seq_len, self.data.noise_density, self.data.mean_noise_span_length)[0] - 1
        return self.seq_len - 2 if self.objective.pretext == "mlm" else self.seq_len

    @property
    def tokens_per_step(self) -> int:
        return self.batch_size * self.seq_len

    def saved(self) -> dict:
        """The config.json of this run (with the vocabulary size `resolve` settled, where it grew)."""
        return json.loads(self.config)


def span_lengths(seq_len: int, density: float, mean_span: float) -> tuple[int, int, int]:
    """(raw tokens per row, decoder length, sentinels) of span corruption whose encoder input is seq_len."""
    raw = denoise.raw_length_for(seq_len, density, mean_span)
    return raw, denoise.corrupted_lengths(raw, density, mean_span)[1], denoise.span_counts(raw, density, mean_span)[1]


def _pretext(cfg: ml_collections.ConfigDict) -> str | None:
    if kind_of(cfg.data.dataset) is not None:
        return None
    return {"encoder_decoder": "span_corruption", "encoder": "mlm"}.get(cfg.model.arch)


# ---------------------------------------------------------------------------------------------------------
# From a ConfigDict


def _reference() -> ml_collections.ConfigDict:
    # configs/default.py lists every key a run config may have.
    from configs import default

    return default.get_config()


def from_saved(saved: dict) -> ml_collections.ConfigDict:
    """A run's config.json as a ConfigDict, with keys added to configs/default.py since it was written
    set to their defaults (each new key's default keeps the old behaviour), so older runs still load."""
    cfg = _reference()

    def merge(into: ml_collections.ConfigDict, values: dict):
        for key, value in values.items():
            if isinstance(value, dict) and isinstance(into.get(key), ml_collections.ConfigDict):
                merge(into[key], value)
            else:
                into[key] = value

    merge(cfg, saved)
    return cfg


def rules_of(rules) -> tuple:
    """config.json turns tuples into lists; rules need tuples of mesh axes (none given: the defaults)."""
    if not rules:
        rules = _reference().mesh.rules
    return tuple((name, tuple(axes) if isinstance(axes, list) else axes) for name, axes in rules)


def parametrization_of(cfg: ml_collections.ConfigDict) -> Parametrization:
    m = cfg.model
    layers = m.num_layers + ((m.num_encoder_layers or m.num_layers) if m.arch == "encoder_decoder" else 0)
    base_head_dim = m.base_head_dim or m.base_width / m.num_heads
    return Parametrization(width=m.parametrization, depth=m.depth_parametrization, width_mult=m.d_model / m.base_width,
                           head_dim_mult=m.d_model / m.num_heads / base_head_dim, depth_mult=layers / m.base_depth,
                           output_multiplier=m.output_multiplier)


PARAMETRIZATION_KEYS = ("model.parametrization", "model.base_width", "model.base_head_dim", "model.output_multiplier",
                        "model.depth_parametrization", "model.base_depth")


def parametrization_keys(saved: dict, optimizer: bool = False) -> dict:
    """{key: value} of the keys that say what a run's params (with `optimizer`, its optimizer state) mean,
    from a saved config.json (older ones: their defaults)."""
    cfg = from_saved(saved)
    keys = PARAMETRIZATION_KEYS + (("opt.optimizer",) if optimizer else ())
    return {k: cfg[k.split(".")[0]][k.split(".")[1]] for k in keys}


def from_config(cfg: ml_collections.ConfigDict | dict) -> RunSpec:
    """The checked, typed spec of a config (a dict is a saved config.json); one ConfigError listing
    every problem otherwise. Starts nothing: JAX's backend is first asked for in `resolve`."""
    if isinstance(cfg, dict):
        cfg = from_saved(cfg)
    validate(cfg)
    m, d, o, g = cfg.model, cfg.data, cfg.opt, cfg.grpo
    pretext = _pretext(cfg)
    decoder_len = 0
    if m.arch == "encoder_decoder":
        decoder_len = span_lengths(cfg.seq_len, d.noise_density, d.mean_noise_span_length)[1] if pretext else (cfg.target_len or cfg.seq_len)
    model = ModelConfig(
        V=0, D=m.d_model, F=m.d_ff, N=m.num_layers, H=m.num_heads, G=m.num_kv_heads, L=cfg.seq_len,
        pos_encoding=m.pos_encoding, rope_theta=m.rope_theta, norm=m.norm, norm_bias=m.norm_bias, norm_eps=m.norm_eps, mlp=m.mlp,
        tie_embeddings=m.tie_embeddings, dtype=m.dtype, param_dtype=m.param_dtype, remat=m.remat, scan_layers=m.scan_layers,
        attention=m.attention, arch=m.arch, E=(m.num_encoder_layers or m.num_layers) if m.arch == "encoder_decoder" else 0,
        T=decoder_len, parametrization=parametrization_of(cfg),
    )
    opt = o.to_dict()
    opt["warmup_steps"] = min(opt["warmup_steps"], cfg.num_train_steps)  # short runs warm up for their whole length
    data = DataConfig(**{f.name: d[f.name] for f in dataclasses.fields(DataConfig)})
    return RunSpec(
        name=cfg.name, seed=cfg.seed, batch_size=cfg.batch_size, seq_len=cfg.seq_len, model=model,
        opt=OptConfig(num_train_steps=cfg.num_train_steps, **opt), data=data,
        mesh=MeshConfig(cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor, cfg.mesh.cpu_devices, rules_of(cfg.mesh.rules)),
        loop=LoopConfig(**{k: cfg[k] for k in LOOP_KEYS}),
        objective=ObjectiveConfig(cfg.objective, cfg.init_from, cfg.dpo.beta, GrpoConfig(**g.to_dict()), pretext),
        model_vocab_size=m.vocab_size, vocab_multiple=m.vocab_multiple, config=json.dumps(cfg.to_dict()),
    )


# ---------------------------------------------------------------------------------------------------------
# What the config cannot say alone: the vocabulary and the backend's choices


def vocabulary(run: RunSpec, tokenizer: Tokenizer | int) -> Vocabulary:
    """The one rule for a run's vocabulary, given its tokenizer (or, with no corpus at hand, the
    tokenizer's size). Ids the run reserves after the tokenizer's are counted; where the padded
    vocabulary has no room for them the model grows by one vocab_multiple or more (recorded in the
    run's config.json), and a model.vocab_size set too small for them is an error."""
    size = tokenizer if isinstance(tokenizer, int) else tokenizer.vocab_size
    pieces = template.marker_pieces(tokenizer)
    markers = len(template.MARKERS) if run.data.chat and pieces is None else 0
    needed = size + run.reserved_ids + markers
    if run.model_vocab_size:
        if run.model_vocab_size < size:
            raise ConfigError(f"model.vocab_size={run.model_vocab_size} is smaller than the tokenizer's {size} ids")
        if needed > run.model_vocab_size:
            raise ConfigError(f"model.vocab_size={run.model_vocab_size} leaves no room for the {needed - size} ids this run "
                              f"reserves after the tokenizer's {size}")
        rows = run.model_vocab_size
    else:
        rows = -(-needed // run.vocab_multiple) * run.vocab_multiple
    try:
        roles = template.role_ids(tokenizer, rows)
    except template.TemplateError:
        roles = None
    return Vocabulary(size, needed, rows, run.reserved_ids, roles)


def resolve(run: RunSpec, tokenizer: Tokenizer | int, backend: str | None = None) -> RunSpec:
    """The run with its vocabulary and its model complete for `backend` (default: the one JAX runs
    on; a compile target's platform for a device that is not attached). The attention implementation
    (`auto`, and an error for `cudnn` where it cannot run) and whether q/k/v are one fused matmul (on
    XLA:CPU without tensor parallelism, where it is faster) are decided here, once."""
    if backend is None:
        import jax

        backend = jax.default_backend()
    vocab = vocabulary(run, tokenizer)
    m = run.model
    model = dataclasses.replace(m, V=vocab.size, attention=resolve_attention(m.attention, m.dtype, m.D // m.H, backend),
                                fused_qkv=backend == "cpu" and run.mesh.tensor == 1)
    config = run.config
    if vocab.needed > vocab.tokenizer and not run.model_vocab_size:
        saved = json.loads(config)
        saved["model"]["vocab_size"] = vocab.size  # so that a resumed run, llm.load and init_from read the same rows
        config = json.dumps(saved)
    return dataclasses.replace(run, model=model, vocab=vocab, config=config)


# ---------------------------------------------------------------------------------------------------------
# Checks


def _unknown_keys(cfg, ref, prefix="") -> list[str]:
    unknown = []
    for key, value in cfg.items():
        if key not in ref:
            unknown.append(prefix + key)
        elif isinstance(value, ml_collections.ConfigDict) and isinstance(ref[key], ml_collections.ConfigDict):
            unknown += _unknown_keys(value, ref[key], prefix + key + ".")
    return unknown


def validate(cfg: ml_collections.ConfigDict) -> None:
    """Every problem of a config in one ConfigError (what `from_config` runs first)."""
    ref = _reference()
    unknown = _unknown_keys(cfg, ref)
    if unknown:
        raise ConfigError(f"unknown config keys: {', '.join(unknown)} (configs/default.py lists every key)")
    missing = [k for k in ref if k not in cfg]
    if missing:
        raise ConfigError(f"config is missing keys: {', '.join(missing)} (start from configs/default.py)")

    m, o = cfg.model, cfg.opt
    problems = []

    def need(ok: bool, message: str):
        if not ok:
            problems.append(message)

    def one_of(value, choices, key):
        need(value in choices, f"{key}={value!r} is not one of {', '.join(choices)}")

    for key in ("batch_size", "seq_len", "num_train_steps", "checkpoint_every_steps", "keep_checkpoints", "eval_batch_size"):
        need(cfg[key] > 0, f"{key} must be positive, got {cfg[key]}")
    for key in ("d_model", "num_layers", "num_heads", "num_kv_heads"):
        need(m[key] > 0, f"model.{key} must be positive, got {m[key]}")
    need(m.d_ff >= 0, f"model.d_ff must be >= 0 (0: attention-only blocks), got {m.d_ff}")
    need(m.d_ff != 0 or m.arch == "decoder", f"model.d_ff=0 (attention-only blocks) is for model.arch='decoder' only, not {m.arch!r}")
    need(cfg.eval_every_steps >= 0, "eval_every_steps must be >= 0 (0 disables eval during training)")
    need(cfg.eval_tasks_limit >= 0, f"eval_tasks_limit must be >= 0 (0: every document), got {cfg.eval_tasks_limit}")
    need(not cfg.eval_tasks.strip() or (cfg.model.arch == "decoder" and cfg.objective == "lm"),
         f"eval_tasks scores continuations with a decoder language model, not model.arch={cfg.model.arch!r}, objective={cfg.objective!r}")
    if m.num_heads > 0 and m.d_model % m.num_heads:
        problems.append(f"model.d_model={m.d_model} is not divisible by model.num_heads={m.num_heads}")
    if m.num_kv_heads > 0 and m.num_heads % m.num_kv_heads:
        problems.append(f"model.num_heads={m.num_heads} is not divisible by model.num_kv_heads={m.num_kv_heads}")
    if m.pos_encoding in ("rope", "sinusoidal") and m.num_heads > 0 and m.d_model % m.num_heads == 0:
        dim = m.d_model // m.num_heads if m.pos_encoding == "rope" else m.d_model
        need(dim % 2 == 0, f"model.pos_encoding={m.pos_encoding!r} needs an even {'head' if m.pos_encoding == 'rope' else 'model'} dimension, got {dim}")
    one_of(m.pos_encoding, POS_ENCODINGS, "model.pos_encoding")
    one_of(m.norm, NORMS, "model.norm")
    one_of(m.mlp, MLPS, "model.mlp")
    one_of(m.dtype, DTYPES, "model.dtype")
    one_of(m.param_dtype, DTYPES, "model.param_dtype")
    one_of(m.remat, REMATS, "model.remat")
    one_of(m.attention, ("auto",) + ATTENTIONS, "model.attention")
    need(m.norm_eps >= 0, f"model.norm_eps must be >= 0 (0: the norm's usual epsilon), got {m.norm_eps}")
    need(m.vocab_size >= 0 and m.vocab_multiple >= 1, "model.vocab_size must be >= 0 and model.vocab_multiple >= 1")
    one_of(m.parametrization, PARAMETRIZATIONS, "model.parametrization")
    one_of(m.depth_parametrization, DEPTH_PARAMETRIZATIONS, "model.depth_parametrization")
    need(m.base_width > 0 and m.base_depth > 0 and m.base_head_dim >= 0,
         f"model.base_width and model.base_depth must be positive and model.base_head_dim >= 0, got {m.base_width}, {m.base_depth}, {m.base_head_dim}")
    need(m.output_multiplier > 0, f"model.output_multiplier must be positive, got {m.output_multiplier}")
    _check_data(cfg, need, one_of)
    _check_objective(cfg, need, one_of)
    _check_arch(cfg, need, one_of)

    one_of(o.schedule, SCHEDULES, "opt.schedule")
    one_of(o.optimizer, OPTIMIZERS, "opt.optimizer")
    need(o.muon_learning_rate > 0 and o.muon_weight_decay >= 0 and 0 <= o.muon_momentum < 1,
         "opt.muon_learning_rate must be > 0, opt.muon_weight_decay >= 0 and opt.muon_momentum in [0, 1)")
    need(o.learning_rate > 0, f"opt.learning_rate must be positive, got {o.learning_rate}")
    need(o.warmup_steps >= 0, f"opt.warmup_steps must be >= 0, got {o.warmup_steps}")
    need(0 <= o.final_lr_ratio <= 1, f"opt.final_lr_ratio must be in [0, 1], got {o.final_lr_ratio}")
    need(0 < o.decay_fraction <= 1, f"opt.decay_fraction must be in (0, 1], got {o.decay_fraction}")
    need(0 <= o.b1 < 1 and 0 <= o.b2 < 1, f"opt.b1 and opt.b2 must be in [0, 1), got {o.b1}, {o.b2}")
    need(o.eps > 0 and o.weight_decay >= 0 and o.clip_norm >= 0 and o.z_loss >= 0, "opt.eps must be > 0; opt.weight_decay, opt.clip_norm, opt.z_loss >= 0")
    need(o.grad_accum_steps >= 1, f"opt.grad_accum_steps must be >= 1, got {o.grad_accum_steps}")
    if o.grad_accum_steps >= 1 and cfg.batch_size % o.grad_accum_steps:
        problems.append(f"batch_size={cfg.batch_size} is not divisible by opt.grad_accum_steps={o.grad_accum_steps}")
    for axis in MESH_AXES:
        need(cfg.mesh[axis] == -1 or cfg.mesh[axis] >= 1, f"mesh.{axis} must be >= 1 or -1, got {cfg.mesh[axis]}")
    need(cfg.mesh.cpu_devices >= -1, f"mesh.cpu_devices must be >= -1, got {cfg.mesh.cpu_devices}")
    need([cfg.mesh[a] for a in MESH_AXES].count(-1) <= 1, "at most one of mesh.data, mesh.fsdp, mesh.tensor may be -1")
    if problems:
        raise ConfigError("invalid config:\n  " + "\n  ".join(problems))


def _check_data(cfg: ml_collections.ConfigDict, need, one_of) -> None:
    d = cfg.data
    one_of(d.tokenizer, TOKENIZERS, "data.tokenizer")
    one_of(d.sampling, SAMPLINGS, "data.sampling")
    one_of(d.packing, PACKINGS, "data.packing")
    one_of(d.spm_model_type, ("bpe", "unigram"), "data.spm_model_type")
    need(d.sampling != "windows" or d.packing == "concat", "data.sampling='windows' needs data.packing='concat'")
    if d.tokenizer == "sentencepiece" and not d.tokenizer_path:
        # Byte fallback alone takes 256 pieces, plus pad/bos/eos/unk and the newline piece.
        need(d.vocab_size > 261, f"data.vocab_size={d.vocab_size} is too small for SentencePiece with byte fallback (> 261)")
    need(d.spm_input_sentences > 0, "data.spm_input_sentences must be positive")
    need(d.num_workers >= 0, f"data.num_workers must be >= 0, got {d.num_workers}")
    if is_streamed(d.dataset):
        need(d.tokenizer != "char", f"data.tokenizer='char' needs every character of the corpus up front; a streamed "
             f"{d.dataset.split(':')[0]}: corpus takes 'byte' or 'sentencepiece'")
        need(d.sampling == "rows", "data.sampling='windows' needs random access to every token; streamed corpora take 'rows'")
    else:
        need(not d.validation_dataset, "data.validation_dataset is for streamed corpora ('jsonl:GLOB', 'parquet:GLOB')")
        need(not d.mixture, "data.mixture draws domains of a streamed corpus: data.dataset must be 'jsonl:GLOB' or 'parquet:GLOB'")
    if d.mixture:
        try:
            mixture.parse(d.mixture)
        except DataError as e:
            need(False, str(e))
    need(
        0 <= d.validation_fraction < 1 and 0 <= d.test_fraction < 1 and d.validation_fraction + d.test_fraction < 1,
        "data.validation_fraction and data.test_fraction must be in [0, 1) and sum to less than 1",
    )


def _check_objective(cfg: ml_collections.ConfigDict, need, one_of) -> None:
    one_of(cfg.objective, OBJECTIVES, "objective")
    one_of(cfg.data.loss_on, LOSS_ON, "data.loss_on")
    kind = kind_of(cfg.data.dataset)
    wanted = {"lm": (None, "sft", "seq2seq"), "reward": ("preference",), "dpo": ("preference",), "grpo": ("prompts",)}.get(cfg.objective, ())
    if wanted:
        need(kind in wanted, f"objective={cfg.objective!r} trains on " + " or ".join(
            "a text corpus" if k is None else f"'{k}:GLOB'" for k in wanted) + f", not data.dataset={cfg.data.dataset!r}")
    if cfg.objective in ("reward", "dpo", "grpo"):
        need(bool(cfg.init_from), f"objective={cfg.objective!r} starts from a trained run: set init_from (its frozen reference, "
             f"for dpo and grpo)")
    need(cfg.dpo.beta > 0, f"dpo.beta must be positive, got {cfg.dpo.beta}")
    g = cfg.grpo
    if cfg.objective == "grpo":
        need(g.group_size >= 2, f"grpo.group_size must be >= 2 (advantages compare answers within a group), got {g.group_size}")
        need(g.max_new_tokens >= 1, f"grpo.max_new_tokens must be >= 1, got {g.max_new_tokens}")
        need(g.temperature > 0, f"grpo.temperature must be > 0 (a greedy group has nothing to compare), got {g.temperature}")
        need(g.clip_eps > 0 and g.kl_coef >= 0, "grpo.clip_eps must be > 0 and grpo.kl_coef >= 0")
        need(bool(g.reward_fn) != bool(g.reward_run), "objective='grpo' needs exactly one of grpo.reward_fn ('module:function') "
             "and grpo.reward_run (a reward model's workdir)")
        need(not g.reward_fn or ":" in g.reward_fn, f"grpo.reward_fn={g.reward_fn!r} must be 'module:function'")
        need(cfg.opt.grad_accum_steps == 1, "objective='grpo' takes opt.grad_accum_steps=1")


def _check_arch(cfg: ml_collections.ConfigDict, need, one_of) -> None:
    arch, d = cfg.model.arch, cfg.data
    one_of(arch, ARCHS, "model.arch")
    kind = kind_of(d.dataset)
    need(cfg.model.num_encoder_layers >= 0, f"model.num_encoder_layers must be >= 0 (0: num_layers), got {cfg.model.num_encoder_layers}")
    need(cfg.target_len >= 0, f"target_len must be >= 0 (0: seq_len), got {cfg.target_len}")
    need(kind != "seq2seq" or arch in ("decoder", "encoder_decoder"), f"'seq2seq:' data trains model.arch='decoder' or 'encoder_decoder', not {arch!r}")
    need(kind != "seq2seq" or cfg.objective == "lm", f"'seq2seq:' data trains objective='lm', not {cfg.objective!r}")
    if arch == "decoder":
        need(not cfg.target_len, "target_len is the decoder length of model.arch='encoder_decoder'")
        return
    need(cfg.objective == "lm", f"model.arch={arch!r} trains objective='lm' (its own pretraining objective), not {cfg.objective!r}")
    need(kind in (None, "seq2seq") if arch == "encoder_decoder" else kind is None,
         f"model.arch={arch!r} trains on a text corpus" + (" or 'seq2seq:GLOB'" if arch == "encoder_decoder" else "")
         + f", not data.dataset={d.dataset!r}")
    need(not cfg.init_from, f"init_from loads a decoder's params; model.arch={arch!r} starts from scratch")
    if arch == "encoder":
        need(0 < d.mask_fraction < 1, f"data.mask_fraction must be in (0, 1), got {d.mask_fraction}")
        need(cfg.seq_len >= 3, f"model.arch='encoder' needs seq_len >= 3 ([CLS], a token, [SEP]), got {cfg.seq_len}")
        need(not cfg.target_len, "target_len is the decoder length of model.arch='encoder_decoder'")
    elif kind is None:
        need(d.packing == "concat", "span corruption reads the concatenated token stream: set data.packing='concat'")
        need(not cfg.target_len, "span corruption derives the decoder length from seq_len: leave target_len at 0")
        try:
            span_lengths(cfg.seq_len, d.noise_density, d.mean_noise_span_length)
        except ValueError as e:
            need(False, f"span corruption (data.noise_density, data.mean_noise_span_length, seq_len): {e}")
