"""The one place a run's ConfigDict is read: validation with clear messages, then plain values."""

import jax
import ml_collections

from llm import attention as attention_lib, denoise, examples, sources
from llm.data import PACKINGS, DataConfig
from llm.model import ModelConfig
from llm.optim import OptConfig
from llm.tokenizer import KINDS as TOKENIZERS

POS_ENCODINGS = ("sinusoidal", "learned", "rope")
NORMS = ("layernorm", "rmsnorm")
MLPS = ("gelu", "swiglu")
DTYPES = ("float32", "bfloat16", "float16")
REMATS = ("none", "block", "dots")
ARCHS = ("decoder", "encoder", "encoder_decoder")
SCHEDULES = ("cosine", "linear", "constant", "wsd")


class ConfigError(ValueError):
    pass


def _reference() -> ml_collections.ConfigDict:
    # configs/default.py lists every key a run config may have.
    from configs import default

    return default.get_config()


def _unknown_keys(cfg, ref, prefix="") -> list[str]:
    unknown = []
    for key, value in cfg.items():
        if key not in ref:
            unknown.append(prefix + key)
        elif isinstance(value, ml_collections.ConfigDict) and isinstance(ref[key], ml_collections.ConfigDict):
            unknown += _unknown_keys(value, ref[key], prefix + key + ".")
    return unknown


def validate(cfg: ml_collections.ConfigDict) -> None:
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
    one_of(m.attention, ("auto",) + attention_lib.IMPLEMENTATIONS, "model.attention")
    need(m.norm_eps >= 0, f"model.norm_eps must be >= 0 (0: the norm's usual epsilon), got {m.norm_eps}")
    need(m.vocab_size >= 0 and m.vocab_multiple >= 1, "model.vocab_size must be >= 0 and model.vocab_multiple >= 1")
    one_of(cfg.data.tokenizer, TOKENIZERS, "data.tokenizer")
    one_of(cfg.data.sampling, ("rows", "windows"), "data.sampling")
    one_of(cfg.data.packing, PACKINGS, "data.packing")
    one_of(cfg.data.spm_model_type, ("bpe", "unigram"), "data.spm_model_type")
    if cfg.data.sampling == "windows" and cfg.data.packing != "concat":
        problems.append("data.sampling='windows' needs data.packing='concat'")
    if cfg.data.tokenizer == "sentencepiece" and not cfg.data.tokenizer_path:
        # Byte fallback alone takes 256 pieces, plus pad/bos/eos/unk and the newline piece.
        need(cfg.data.vocab_size > 261, f"data.vocab_size={cfg.data.vocab_size} is too small for SentencePiece with byte fallback (> 261)")
    need(cfg.data.spm_input_sentences > 0, "data.spm_input_sentences must be positive")
    need(cfg.data.num_workers >= 0, f"data.num_workers must be >= 0, got {cfg.data.num_workers}")
    _check_objective(cfg, need, one_of)
    _check_arch(cfg, need, one_of)
    if sources.is_streamed(cfg.data.dataset):
        need(cfg.data.tokenizer != "char", f"data.tokenizer='char' needs every character of the corpus up front; a streamed "
             f"{cfg.data.dataset.split(':')[0]}: corpus takes 'byte' or 'sentencepiece'")
        need(cfg.data.sampling == "rows", "data.sampling='windows' needs random access to every token; streamed corpora take 'rows'")
    elif cfg.data.validation_dataset:
        problems.append("data.validation_dataset is for streamed corpora ('jsonl:GLOB', 'parquet:GLOB')")
    need(
        0 <= cfg.data.validation_fraction < 1 and 0 <= cfg.data.test_fraction < 1
        and cfg.data.validation_fraction + cfg.data.test_fraction < 1,
        "data.validation_fraction and data.test_fraction must be in [0, 1) and sum to less than 1",
    )

    one_of(o.schedule, SCHEDULES, "opt.schedule")
    need(o.learning_rate > 0, f"opt.learning_rate must be positive, got {o.learning_rate}")
    need(o.warmup_steps >= 0, f"opt.warmup_steps must be >= 0, got {o.warmup_steps}")
    need(0 <= o.final_lr_ratio <= 1, f"opt.final_lr_ratio must be in [0, 1], got {o.final_lr_ratio}")
    need(0 < o.decay_fraction <= 1, f"opt.decay_fraction must be in (0, 1], got {o.decay_fraction}")
    need(0 <= o.b1 < 1 and 0 <= o.b2 < 1, f"opt.b1 and opt.b2 must be in [0, 1), got {o.b1}, {o.b2}")
    need(o.eps > 0 and o.weight_decay >= 0 and o.clip_norm >= 0 and o.z_loss >= 0, "opt.eps must be > 0; opt.weight_decay, opt.clip_norm, opt.z_loss >= 0")
    need(o.grad_accum_steps >= 1, f"opt.grad_accum_steps must be >= 1, got {o.grad_accum_steps}")
    if o.grad_accum_steps >= 1 and cfg.batch_size % o.grad_accum_steps:
        problems.append(f"batch_size={cfg.batch_size} is not divisible by opt.grad_accum_steps={o.grad_accum_steps}")
    for axis in ("data", "fsdp", "tensor"):
        need(cfg.mesh[axis] == -1 or cfg.mesh[axis] >= 1, f"mesh.{axis} must be >= 1 or -1, got {cfg.mesh[axis]}")
    need(cfg.mesh.cpu_devices >= -1, f"mesh.cpu_devices must be >= -1, got {cfg.mesh.cpu_devices}")
    need([cfg.mesh[a] for a in ("data", "fsdp", "tensor")].count(-1) <= 1, "at most one of mesh.data, mesh.fsdp, mesh.tensor may be -1")
    if problems:
        raise ConfigError("invalid config:\n  " + "\n  ".join(problems))


def _check_objective(cfg: ml_collections.ConfigDict, need, one_of) -> None:
    from llm.objectives import OBJECTIVES

    one_of(cfg.objective, OBJECTIVES, "objective")
    one_of(cfg.data.loss_on, examples.LOSS_ON, "data.loss_on")
    kind = examples.kind_of(cfg.data.dataset)
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
    kind = examples.kind_of(d.dataset)
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
            span_lengths(cfg)
        except ValueError as e:
            need(False, f"span corruption (data.noise_density, data.mean_noise_span_length, seq_len): {e}")


def span_lengths(cfg: ml_collections.ConfigDict) -> tuple[int, int, int]:
    """(raw tokens per row, decoder length, sentinels) of span corruption whose encoder input is seq_len."""
    density, span = cfg.data.noise_density, cfg.data.mean_noise_span_length
    raw = denoise.raw_length_for(cfg.seq_len, density, span)
    return raw, denoise.corrupted_lengths(raw, density, span)[1], denoise.span_counts(raw, density, span)[1]


def pretext(cfg: ml_collections.ConfigDict) -> str | None:
    """The arch's objective on a text corpus: 'span_corruption', 'mlm' or None (next token; seq2seq data)."""
    if examples.kind_of(cfg.data.dataset) is not None:
        return None
    return {"encoder_decoder": "span_corruption", "encoder": "mlm"}.get(cfg.model.arch)


def reserved_ids(cfg: ml_collections.ConfigDict) -> int:
    """Ids after the tokenizer's the arch's objective reserves: sentinels, or [CLS] [SEP] [MASK]."""
    kind = pretext(cfg)
    if kind == "span_corruption":
        return span_lengths(cfg)[2]
    return len(denoise.MlmIds.__dataclass_fields__) if kind == "mlm" else 0


def objective_options(cfg: ml_collections.ConfigDict) -> dict:
    return {"dpo_beta": cfg.dpo.beta, "clip_eps": cfg.grpo.clip_eps, "kl_coef": cfg.grpo.kl_coef}


def from_saved(saved: dict) -> ml_collections.ConfigDict:
    """A run's config.json, with keys added to configs/default.py since it was written set to their
    defaults (each new key's default keeps the old behaviour), so older runs still load."""
    cfg = _reference()

    def merge(into: ml_collections.ConfigDict, values: dict):
        for key, value in values.items():
            if isinstance(value, dict) and isinstance(into.get(key), ml_collections.ConfigDict):
                merge(into[key], value)
            else:
                into[key] = value

    merge(cfg, saved)
    return cfg


def padded_vocab_size(cfg: ml_collections.ConfigDict, tokenizer_vocab: int) -> int:
    if cfg.model.vocab_size:
        if cfg.model.vocab_size < tokenizer_vocab:
            raise ConfigError(f"model.vocab_size={cfg.model.vocab_size} is smaller than the tokenizer's {tokenizer_vocab} ids")
        return cfg.model.vocab_size
    multiple = cfg.model.vocab_multiple
    return -(-tokenizer_vocab // multiple) * multiple


def model_config(cfg: ml_collections.ConfigDict, vocab_size: int) -> ModelConfig:
    """Plain values for the model, with the choices that depend on the backend in use made here, once:
    the attention implementation (`auto`, and an error for `cudnn` where it cannot run) and whether
    q/k/v are one fused matmul (on XLA:CPU without tensor parallelism, where it is faster)."""
    m = cfg.model
    return ModelConfig(
        V=vocab_size, D=m.d_model, F=m.d_ff, N=m.num_layers, H=m.num_heads, G=m.num_kv_heads, L=cfg.seq_len,
        pos_encoding=m.pos_encoding, rope_theta=m.rope_theta, norm=m.norm, norm_bias=m.norm_bias, norm_eps=m.norm_eps, mlp=m.mlp,
        tie_embeddings=m.tie_embeddings, dtype=m.dtype, param_dtype=m.param_dtype,
        remat=m.remat, scan_layers=m.scan_layers,
        attention=attention_lib.resolve(m.attention, m.dtype, m.d_model // m.num_heads),
        fused_qkv=jax.default_backend() == "cpu" and cfg.mesh.tensor == 1,
        arch=m.arch, E=(m.num_encoder_layers or m.num_layers) if m.arch == "encoder_decoder" else 0, T=decoder_len(cfg),
    )


def decoder_len(cfg: ml_collections.ConfigDict) -> int:
    """encoder_decoder's decoder length: span corruption's target length, else target_len or seq_len."""
    if cfg.model.arch != "encoder_decoder":
        return 0
    if pretext(cfg) == "span_corruption":
        return span_lengths(cfg)[1]
    return cfg.target_len or cfg.seq_len


def opt_config(cfg: ml_collections.ConfigDict) -> OptConfig:
    opt = cfg.opt.to_dict()
    opt["warmup_steps"] = min(opt["warmup_steps"], cfg.num_train_steps)  # short runs warm up for their whole length
    return OptConfig(num_train_steps=cfg.num_train_steps, **opt)


def data_config(cfg: ml_collections.ConfigDict, dataset: str | None = None) -> DataConfig:
    d = cfg.data
    return DataConfig(
        dataset=dataset or d.dataset, text_key=d.text_key, data_dir=d.data_dir, manual_dir=d.manual_dir,
        validation_fraction=d.validation_fraction, test_fraction=d.test_fraction, packing=d.packing, add_bos=d.add_bos,
        validation_dataset=d.validation_dataset, num_workers=d.num_workers, skip_bad_records=d.skip_bad_records,
    )
