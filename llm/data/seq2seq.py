"""Sequence-to-sequence data: 'seq2seq:GLOB', one {"input": str, "target": str} object per line.

The same pairs feed either architecture:
    encoder_decoder  the encoder reads input + eos; the decoder reads bos + target (teacher forcing, bos is
                     the decoder start token) and predicts target + eos
    decoder          one row input + eos + target + eos, the loss on target + eos only (as SFT)
Files, lines and the hold-out rule are those of the other post-training sets (llm/data/examples.py); batches
are deterministic from (seed, epoch) and resumable from (epoch, batch in epoch).
"""

import dataclasses
from typing import Iterator, Sequence

import numpy as np

from llm.data import examples
from llm.data.config import DataError
from llm.data.epochs import PackedEpochs
from llm.data.packing import pack, pad_batch, segment_positions, take_rows
from llm.data.tokenizer import Tokenizer, TokenizerError

ARCHS = ("encoder_decoder", "decoder")
FIELDS = ("input", "target")


@dataclasses.dataclass(frozen=True)
class Pair:
    source: np.ndarray  # [S] int32 tokens of the input, without eos
    target: np.ndarray  # [T] int32 tokens of the target, without eos
    where: str  # file:line, for messages


def _check(record: examples.Record) -> None:
    for field in FIELDS:
        if not isinstance(record.value.get(field), str):
            problem = "is missing" if field not in record.value else f"is a {type(record.value[field]).__name__}, not a string"
            raise DataError(f"{record.where}: the field {field!r} {problem} (a seq2seq line is {{'input': str, 'target': str}})")


def _pair(record: examples.Record, tok: Tokenizer) -> Pair:
    try:
        source, target = (np.asarray(tok.encode(record.value[f]), np.int32) for f in FIELDS)
    except TokenizerError as e:
        raise DataError(f"{record.where}: {e}") from None
    if not len(target):
        raise DataError(f"{record.where}: the field 'target' is empty: there is nothing to learn to produce")
    return Pair(source, target, record.where)


def load(dataset: str, split: str, tok: Tokenizer, validation_fraction: float, test_fraction: float) -> list[Pair]:
    records = examples.read(dataset)
    # Every line is checked, not only the split's: a malformed file should fail the same way for train and eval.
    for r in records:
        _check(r)
    return [_pair(r, tok) for r in examples.held_out(records, split, validation_fraction, test_fraction)]


def prompt(pair: Pair, eos_id: int) -> list[int]:
    """What a model is given to answer: the encoder's input, or the decoder-only model's prompt."""
    return [int(t) for t in pair.source] + [eos_id]


def _positions(segments_RxL: np.ndarray) -> np.ndarray:
    return np.where(segments_RxL != 0, segment_positions(segments_RxL), 0).astype(np.int32)  # 0 on padding


def pack_encoder_decoder(pairs: Sequence[Pair], source_len: int, target_len: int, bos_id: int,
                         eos_id: int) -> tuple[dict[str, np.ndarray], int]:
    """Whole examples packed by the one packer (llm/data/packing.py), in order, into rows of source_len
    encoder and target_len decoder tokens; example k of a row has segment id k in both halves (padding
    0), so cross-attention with query segment == key segment keeps the examples apart. Returns the
    batch and how many examples were cut to fit (their ends dropped)."""
    items, num_cut = [], 0
    for p in pairs:
        encoder = np.append(p.source, eos_id).astype(np.int32)
        decoder_in = np.append(bos_id, p.target).astype(np.int32)
        decoder_out = np.append(p.target, eos_id).astype(np.int32)
        num_cut += len(encoder) > source_len or len(decoder_out) > target_len
        items.append(({"tokens": encoder[:source_len]}, {"inputs": decoder_in[:target_len], "targets": decoder_out[:target_len]}))
    ids = np.dtype(np.int32)
    encoder_part, decoder_part = pack(items, (source_len, target_len), ({"tokens": ids}, {"inputs": ids, "targets": ids}))
    encoder_segments_RxS, segments_RxT = encoder_part["segments"], decoder_part["segments"]
    batch = {
        "encoder_inputs": encoder_part["tokens"],
        "encoder_segment_ids": encoder_segments_RxS,
        "encoder_positions": _positions(encoder_segments_RxS),
        "inputs": decoder_part["inputs"],
        "targets": decoder_part["targets"],
        "weights": (segments_RxT != 0).astype(np.float32),
        "segment_ids": segments_RxT,
        "positions": _positions(segments_RxT),
    }
    return batch, int(num_cut)


def decoder_examples(pairs: Sequence[Pair], width: int, eos_id: int) -> tuple[list[examples.Example], int]:
    """Each pair as one decoder-only example, source + eos + target + eos with the response on target + eos
    (examples.pack(..., loss_on='response') weights only those), cut to `width` tokens; returns the
    examples and how many were cut. A source that leaves no room for one target token is an error."""
    out, num_cut = [], 0
    for p in pairs:
        tokens = np.concatenate([p.source, [eos_id], p.target, [eos_id]]).astype(np.int32)
        response = np.arange(len(tokens)) > len(p.source)
        if len(p.source) + 1 >= width:
            raise DataError(f"{p.where}: the input is {len(p.source)} tokens, which with its eos leaves no room for the target "
                            f"in seq_len + 1 = {width} tokens")
        num_cut += len(tokens) > width
        out.append(examples.Example(tokens[:width], response[:width]))
    return out, num_cut


def _check_arch(arch: str) -> None:
    if arch not in ARCHS:
        raise DataError(f"unknown seq2seq architecture {arch!r}; known: {', '.join(ARCHS)}")


class Seq2SeqBatches(PackedEpochs):
    """Each epoch shuffles the pairs and packs them, in that order, into rows (examples.SftBatches' rule).
    encoder_decoder: encoder rows of seq_len and decoder rows of target_len tokens; decoder: rows of
    seq_len (target_len unused). num_cut: how many examples do not fit whole."""

    def __init__(self, pairs: Sequence[Pair], batch_size: int, seed: int, rows=None, *, arch: str, seq_len: int,
                 target_len: int, bos_id: int, eos_id: int):
        _check_arch(arch)
        self.pairs, self.arch, self.seq_len, self.target_len = list(pairs), arch, seq_len, target_len
        self.bos_id, self.eos_id = bos_id, eos_id
        if arch == "decoder":
            # Cutting does not depend on the order: render once, shuffle the rendered examples.
            self._examples, self.num_cut = decoder_examples(self.pairs, seq_len + 1, eos_id)
        super().__init__(len(self.pairs), batch_size, seed, rows)
        num_rows = self._items_per_epoch()
        if num_rows < batch_size:
            raise DataError(f"the seq2seq training split packs into {num_rows} rows ({arch}, seq_len={seq_len}"
                            f"{f', target_len={target_len}' if arch == 'encoder_decoder' else ''}), too few for one batch of {batch_size}")

    def _pack_items(self, order: np.ndarray) -> dict[str, np.ndarray]:
        if self.arch == "decoder":
            return examples.pack([self._examples[i] for i in order], self.seq_len + 1, "response")
        # Cutting does not depend on the order either, so every epoch counts the same num_cut.
        packed, self.num_cut = pack_encoder_decoder([self.pairs[i] for i in order], self.seq_len, self.target_len,
                                                    self.bos_id, self.eos_id)
        return packed


def eval_batches(pairs: Sequence[Pair], batch_size: int, *, arch: str, seq_len: int, target_len: int, bos_id: int,
                 eos_id: int) -> Iterator[dict]:
    """One pass in order; the last batch is padded with rows that weigh nothing."""
    _check_arch(arch)
    if arch == "decoder":
        packed = examples.pack(decoder_examples(pairs, seq_len + 1, eos_id)[0], seq_len + 1, "response")
    else:
        packed = pack_encoder_decoder(pairs, seq_len, target_len, bos_id, eos_id)[0]
    for first in range(0, len(packed["inputs"]), batch_size):
        yield pad_batch(take_rows(packed, first, first + batch_size), batch_size)
