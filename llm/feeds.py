"""What a run trains on: per objective and arch, the host batches, how a host batch becomes the train
step's device batch (the frozen reference's log-probs, ...) and the held-out evaluation.

    decoder, lm          a text corpus (next token) or 'sft:GLOB' (the response's tokens)
    decoder, reward/dpo  'preference:GLOB'          (grpo's lives in llm/rl.py, above the trainer)
    encoder              a text corpus through BERT's masking (llm/denoise.py)
    encoder_decoder      a text corpus through T5's span corruption (llm/denoise.py), or 'seq2seq:GLOB'
    decoder, seq2seq     'seq2seq:GLOB' as one row per example, the loss on the target (llm/seq2seq.py)
"""

import collections
import dataclasses
import functools
import sys
from typing import TYPE_CHECKING, Callable

import jax
import ml_collections

from llm import config as config_lib, data, denoise, evaluate, examples, objectives, seq2seq, sharding, template, tokenizer as tokenizer_lib
from llm.model import ModelConfig

if TYPE_CHECKING:
    from llm.train import Setup


@dataclasses.dataclass(frozen=True)
class Job:
    """What a run has built before its loop: handed to the objective's Feed."""

    cfg: ml_collections.ConfigDict
    workdir: str
    mesh: jax.sharding.Mesh
    dc: data.DataConfig
    tok: tokenizer_lib.Tokenizer
    mc: ModelConfig
    built: "Setup"  # llm/train.py's: what the run compiles
    roles: "template.RoleIds | None"  # the chat template's ids (post-training data only)
    reference: Callable[[], dict]  # the frozen reference params (init_from's), loaded on first use
    quiet: bool

    def put(self, batch: dict, rows: int | None = None) -> dict:
        """This host's rows of a global batch (of `rows`, default batch_size) as sharded device arrays."""
        return sharding.global_batch(batch, self.mesh, rows or self.cfg.batch_size)


@dataclasses.dataclass
class Feed:
    """An objective's data side: host batches, how a host batch becomes the step's device batch (the
    reference's log-probs, sampled answers), and the held-out evaluation."""

    batches: object  # next(), get_state(), set_state(), merge_states(), close()
    prepare: Callable[[object, dict, int], tuple[dict, dict]]  # (state, host batch, step) -> (device batch, host metrics)
    evaluate: Callable[[dict], dict] | None  # params -> {"eval_...": value}
    check: Callable[[], None] = lambda: None  # reads the held-out split once, so that a missing one fails before compiling


def _lm_eval(job: Job, batches: Callable[[], object]) -> Callable[[dict], dict]:
    cfg = job.cfg
    eval_lo, eval_hi = sharding.host_rows(job.mesh, cfg.eval_batch_size)
    put_eval = lambda b: job.put({k: v[eval_lo:eval_hi] for k, v in b.items()}, cfg.eval_batch_size)
    token_bytes = evaluate.byte_table(job.tok.token_bytes(), job.mc.V)

    def run(params):
        result = evaluate.evaluate(job.built.eval_step, params, batches(), token_bytes, put_eval, cfg.eval_max_batches)
        return {"eval_loss": result["loss"], "eval_perplexity": result["perplexity"], "eval_bits_per_byte": result["bits_per_byte"]}

    return run


def _objective_eval(job: Job, batches: Callable[[], object]) -> Callable[[dict], dict]:
    """Held-out means of the objective's metrics (reward, dpo), weighted by each batch's units."""
    cfg = job.cfg
    eval_lo, eval_hi = sharding.host_rows(job.mesh, cfg.eval_batch_size)

    def run(params):
        sums, units = collections.defaultdict(float), 0.0
        for i, b in enumerate(batches()):
            if cfg.eval_max_batches and i >= cfg.eval_max_batches:
                break
            batch = job.put({k: v[eval_lo:eval_hi] for k, v in b.items()}, cfg.eval_batch_size)
            if cfg.objective == "dpo":
                batch.update(_reference_logprobs(job.mc)(job.reference(), batch))
            batch_sums, batch_units = jax.device_get(job.built.objective_step(params, batch))
            for name, v in batch_sums.items():
                sums[name] += float(v)
            units += float(batch_units)
        return {f"eval_{name}": v / units for name, v in sums.items()}

    return run


@functools.lru_cache(maxsize=4)
def _reference_logprobs(mc: ModelConfig) -> Callable:
    """DPO's frozen inputs: the reference's summed answer log-probs, jitted once per model shape."""
    return jax.jit(lambda params, batch: objectives.answer_logprobs(mc, params, batch))


def _put(job: Job) -> Callable:
    return lambda state, b, step: (job.put(b), {})


def _noise(cfg: ml_collections.ConfigDict, tok: tokenizer_lib.Tokenizer) -> tuple[Callable, int]:
    """The arch's transform of a text batch and the row length (of inputs) it reads."""
    d = cfg.data
    if config_lib.pretext(cfg) == "span_corruption":
        transform = functools.partial(denoise.span_corruption, first_sentinel=tok.vocab_size, bos_id=tok.bos_id, eos_id=tok.eos_id,
                                      noise_density=d.noise_density, mean_noise_span_length=d.mean_noise_span_length)
        return transform, config_lib.span_lengths(cfg)[0] - 1  # the raw row is inputs and the last target
    ids = denoise.MlmIds(tok.vocab_size, tok.vocab_size + 1, tok.vocab_size + 2)
    transform = functools.partial(denoise.masked_lm, ids=ids, random_lo=tokenizer_lib.NUM_SPECIAL, random_hi=tok.vocab_size,
                                  mask_fraction=d.mask_fraction)
    return transform, cfg.seq_len - 2  # [CLS] and [SEP] frame each row


def _seq2seq_shape(cfg: ml_collections.ConfigDict, tok: tokenizer_lib.Tokenizer, mc: ModelConfig) -> dict:
    return dict(arch=mc.arch, seq_len=cfg.seq_len, target_len=mc.T, bos_id=tok.bos_id, eos_id=tok.eos_id)


def held_out(cfg: ml_collections.ConfigDict, tok: tokenizer_lib.Tokenizer, mc: ModelConfig, roles, split: str, batch_size: int,
             dc: data.DataConfig | None = None):
    """The batches a held-out loss is computed from, for every arch and every token-scored dataset
    (training's evals and `eval` read the same): text, 'sft:' (response tokens), 'seq2seq:' (target tokens)."""
    dc = dc or config_lib.data_config(cfg)
    kind = examples.kind_of(dc.dataset)
    if kind == "sft":
        found, _ = examples.load_sft(dc.dataset, split, tok, roles, cfg.seq_len, dc.validation_fraction, dc.test_fraction)
        return examples.sft_eval_batches(found, batch_size, cfg.seq_len, cfg.data.loss_on)
    if kind == "seq2seq":
        pairs = seq2seq.load(dc.dataset, split, tok, dc.validation_fraction, dc.test_fraction)
        return seq2seq.eval_batches(pairs, batch_size, **_seq2seq_shape(cfg, tok, mc))
    if config_lib.pretext(cfg) and kind is None:
        transform, row_len = _noise(cfg, tok)
        return denoise.noised_eval(data.split_eval_batches(dc, split, tok, batch_size, row_len), transform, cfg.seed)
    if kind is not None:
        raise data.DataError(f"{dc.dataset!r} holds no text to score token by token")
    return data.split_eval_batches(dc, split, tok, batch_size, cfg.seq_len)


def _held(job: Job) -> Callable[[], object]:
    return lambda: held_out(job.cfg, job.tok, job.mc, job.roles, "validation", job.cfg.eval_batch_size, job.dc)


def _seq2seq(job: Job) -> Feed:
    cfg, dc, tok = job.cfg, job.dc, job.tok
    pairs = seq2seq.load(dc.dataset, "train", tok, dc.validation_fraction, dc.test_fraction)
    rows = sharding.host_rows(job.mesh, cfg.batch_size)
    batches = seq2seq.Seq2SeqBatches(pairs, cfg.batch_size, cfg.seed, rows, **_seq2seq_shape(cfg, tok, job.mc))
    if batches.num_cut and not job.quiet and jax.process_index() == 0:
        print(f"{batches.num_cut} training examples are longer than the model takes and were cut", file=sys.stderr)
    return Feed(batches, _put(job), _lm_eval(job, _held(job)) if cfg.eval_every_steps else None, check=lambda: next(iter(_held(job)())))


def _denoised(job: Job) -> Feed:
    """A text corpus through the arch's objective: rows of the raw length it needs, then the noise."""
    cfg = job.cfg
    transform, row_len = _noise(cfg, job.tok)
    rows = sharding.host_rows(job.mesh, cfg.batch_size)
    text = data.train_batches(job.dc, job.tok, cfg.batch_size, row_len, cfg.seed, rows, cfg.data.sampling)
    batches = denoise.Noised(text, transform, cfg.seed, rows[0])
    return Feed(batches, _put(job), _lm_eval(job, _held(job)) if cfg.eval_every_steps else None, check=lambda: next(iter(_held(job)())))


def make(job: Job) -> Feed:
    """Batches for the objectives and archs trained here (grpo's are llm/rl.py's)."""
    cfg, dc, tok = job.cfg, job.dc, job.tok
    rows = sharding.host_rows(job.mesh, cfg.batch_size)
    kind = examples.kind_of(dc.dataset)
    put = _put(job)
    if kind == "seq2seq":
        return _seq2seq(job)
    if config_lib.pretext(cfg):
        return _denoised(job)
    if kind == "sft":
        def load(split):
            found, cut = examples.load_sft(dc.dataset, split, tok, job.roles, cfg.seq_len, dc.validation_fraction, dc.test_fraction)
            if cut and not job.quiet and jax.process_index() == 0:
                print(f"{cut} of the {len(found)} {split} examples are longer than seq_len + 1 = {cfg.seq_len + 1} tokens and were cut",
                      file=sys.stderr)
            return found

        batches = examples.SftBatches(load("train"), cfg.batch_size, cfg.seq_len, cfg.seed, rows, cfg.data.loss_on)
        return Feed(batches, put, _lm_eval(job, _held(job)) if cfg.eval_every_steps else None, check=lambda: load("validation"))
    if kind == "preference":
        load = lambda split: examples.load_pairs(dc.dataset, split, tok, job.roles, cfg.seq_len, dc.validation_fraction, dc.test_fraction)
        batches = examples.PairBatches(load("train"), cfg.batch_size, cfg.seed, rows)
        held = lambda: examples.pair_eval_batches(load("validation"), cfg.eval_batch_size)
        prepare = put
        if cfg.objective == "dpo":
            def prepare(state, b, step):
                batch = job.put(b)
                batch.update(_reference_logprobs(job.mc)(job.reference(), batch))
                return batch, {}
        return Feed(batches, prepare, _objective_eval(job, held) if cfg.eval_every_steps else None, check=lambda: load("validation"))
    batches = data.train_batches(dc, tok, cfg.batch_size, cfg.seq_len, cfg.seed, rows, cfg.data.sampling)
    return Feed(batches, put, _lm_eval(job, _held(job)) if cfg.eval_every_steps else None, check=_held(job))


