"""What a run reads, on the host, per objective and arch: the tokenizer a fresh run trains, its
training batches and the held-out batches its loss is computed from (training's evals, `eval` and
llm/inspect read the same ones).

    decoder, lm          a text corpus (next token) or 'sft:GLOB' (the response's tokens)
    decoder, reward/dpo  'preference:GLOB'          (grpo's prompts are read by llm/training/rl.py)
    encoder              a text corpus through BERT's masking (llm/data/denoise.py)
    encoder_decoder      a text corpus through T5's span corruption (llm/data/denoise.py), or 'seq2seq:GLOB'
    decoder, seq2seq     'seq2seq:GLOB' as one row per example, the loss on the target (llm/data/seq2seq.py)
"""

import dataclasses
import functools
import sys
from typing import Callable, Iterator

import numpy as np

from llm.data import corpus, denoise, examples, seq2seq, tokenizer as tokenizer_lib
from llm.data.config import DataConfig, DataError
from llm.data.tokenizer import Tokenizer
from llm.spec import RunSpec


def build_tokenizer(run: RunSpec) -> Tokenizer:
    """The vocabulary a fresh run of `run` trains (sweeps count params and FLOPs with the same one)."""
    d = run.data
    if d.tokenizer == "byte" or d.tokenizer_path:
        texts = []
    elif d.kind:
        texts = examples.texts(d.dataset)
    elif d.tokenizer == "sentencepiece":
        texts = corpus.load_documents(d, "train", limit=d.spm_input_sentences)
    else:  # the char vocabulary must cover every character the run will score
        texts = corpus.load_documents(d, "train") + corpus.load_documents(d, "validation")
    return tokenizer_lib.train(d.tokenizer, texts, d.vocab_size, d.spm_model_type, d.spm_input_sentences, d.tokenizer_path)


def noise(run: RunSpec, tok: Tokenizer) -> Callable[[dict, np.random.Generator], dict]:
    """The arch's transform of a text batch (rows of run.text_row_len) into its objective's batch."""
    d = run.data
    if run.objective.pretext == "span_corruption":
        return functools.partial(denoise.span_corruption, first_sentinel=tok.vocab_size, bos_id=tok.bos_id, eos_id=tok.eos_id,
                                 noise_density=d.noise_density, mean_noise_span_length=d.mean_noise_span_length)
    ids = denoise.MlmIds(tok.vocab_size, tok.vocab_size + 1, tok.vocab_size + 2)
    return functools.partial(denoise.masked_lm, ids=ids, random_lo=tokenizer_lib.NUM_SPECIAL, random_hi=tok.vocab_size,
                             mask_fraction=d.mask_fraction)


def seq2seq_shape(run: RunSpec, tok: Tokenizer) -> dict:
    return dict(arch=run.model.arch, seq_len=run.seq_len, target_len=run.model.T, bos_id=tok.bos_id, eos_id=tok.eos_id)


def _say(message: str, quiet: bool) -> None:
    if not quiet:
        print(message, file=sys.stderr)


def sft_examples(run: RunSpec, tok: Tokenizer, split: str, dc: DataConfig | None = None, quiet: bool = True) -> list[examples.Example]:
    dc = dc or run.data
    found, cut = examples.load_sft(dc.dataset, split, tok, run.vocab.require_roles(), run.seq_len, dc.validation_fraction,
                                   dc.test_fraction)
    if cut:
        _say(f"{cut} of the {len(found)} {split} examples are longer than seq_len + 1 = {run.seq_len + 1} tokens and were cut", quiet)
    return found


def preference_pairs(run: RunSpec, tok: Tokenizer, split: str, dc: DataConfig | None = None) -> dict[str, np.ndarray]:
    dc = dc or run.data
    return examples.load_pairs(dc.dataset, split, tok, run.vocab.require_roles(), run.seq_len, dc.validation_fraction,
                               dc.test_fraction)


def train_batches(run: RunSpec, tok: Tokenizer, rows: tuple[int, int], quiet: bool = True):
    """Endless, resumable training batches (this host's rows of each global batch) for lm, reward and dpo."""
    d = run.data
    if d.kind == "seq2seq":
        pairs = seq2seq.load(d.dataset, "train", tok, d.validation_fraction, d.test_fraction)
        batches = seq2seq.Seq2SeqBatches(pairs, run.batch_size, run.seed, rows, **seq2seq_shape(run, tok))
        if batches.num_cut:
            _say(f"{batches.num_cut} training examples are longer than the model takes and were cut", quiet)
        return batches
    if run.objective.pretext:
        # A text corpus through the arch's objective: rows of the raw length it needs, then the noise.
        text = corpus.train_batches(d, tok, run.batch_size, run.text_row_len, run.seed, rows)
        return denoise.Noised(text, noise(run, tok), run.seed, rows[0])
    if d.kind == "sft":
        return examples.SftBatches(sft_examples(run, tok, "train", quiet=quiet), run.batch_size, run.seq_len, run.seed, rows, d.loss_on)
    if d.kind == "preference":
        return examples.PairBatches(preference_pairs(run, tok, "train"), run.batch_size, run.seed, rows)
    return corpus.train_batches(d, tok, run.batch_size, run.seq_len, run.seed, rows)


def held_out(run: RunSpec, tok: Tokenizer, split: str, batch_size: int, dataset: str | None = None, domain: str = "") -> Iterator[dict]:
    """The batches a held-out loss is computed from, for every arch and every token-scored dataset
    (of `dataset` instead of the run's, for an out-of-domain eval; of one `domain` of a mixture): text,
    'sft:' (response tokens), 'seq2seq:' (target tokens)."""
    dc = dataclasses.replace(run.data, dataset=dataset, mixture="") if dataset else run.data
    if dc.kind == "sft":
        return examples.sft_eval_batches(sft_examples(run, tok, split, dc), batch_size, run.seq_len, dc.loss_on)
    if dc.kind == "seq2seq":
        pairs = seq2seq.load(dc.dataset, split, tok, dc.validation_fraction, dc.test_fraction)
        return seq2seq.eval_batches(pairs, batch_size, **seq2seq_shape(run, tok))
    if dc.kind is not None:
        raise DataError(f"{dc.dataset!r} holds no text to score token by token")
    if run.objective.pretext:
        return denoise.noised_eval(corpus.split_eval_batches(dc, split, tok, batch_size, run.text_row_len, domain), noise(run, tok), run.seed)
    return corpus.split_eval_batches(dc, split, tok, batch_size, run.seq_len, domain)
