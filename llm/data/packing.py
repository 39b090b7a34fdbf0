"""The one packer, and the batch layout every packed row shares.

An item is a document, a post-training example or a seq2seq pair: one or more parts (an
encoder-decoder pair has an encoder part and a decoder part), each a dict of aligned channels
(tokens, the response mask, ...). Items are placed greedily, in order: an item that does not fit
what is left of a row starts the next row, unless it is longer than a whole row (a one-part
document), which then starts where it is and runs on into the next rows. Item k of a row has
segment id k in every part of that row, 0 is padding. Pretraining documents (in memory and
streamed, a row at a time per lane), SFT examples and seq2seq pairs all pack through `fill_row`.
"""

import dataclasses
from typing import Callable, Sequence

import numpy as np

Item = tuple[dict[str, np.ndarray], ...]  # parts, each {channel: [n] array}
Channels = tuple[dict[str, np.dtype], ...]  # each part's channels and their dtypes
TOKENS: Channels = ({"tokens": np.dtype(np.int32)},)  # a plain document


@dataclasses.dataclass
class Cursor:
    """Where packing stands inside the current item: how many of its tokens earlier rows took."""

    offset: int = 0


def _length(part: dict[str, np.ndarray]) -> int:
    return len(next(iter(part.values())))


def fill_row(current: Callable[[], Item | None], advance: Callable[[], None], widths: Sequence[int], channels: Channels,
             cursor: Cursor) -> tuple[list[dict[str, np.ndarray]], int]:
    """One row of `widths` per part: each part's channels [W] and "segments" [W], and how many
    positions of the first part were filled. current() is the item to place next (None at the end
    of a finite sequence), advance() moves past it; cursor.offset carries a split item to the next row."""
    row = [{**{name: np.zeros(w, dtype) for name, dtype in part.items()}, "segments": np.zeros(w, np.int32)}
           for part, w in zip(channels, widths)]
    fills, segment = [0] * len(widths), 0
    while any(f < w for f, w in zip(fills, widths)):
        item = current()
        if item is None:
            break
        rest = [{name: v[cursor.offset:] for name, v in part.items()} for part in item]
        lengths = [_length(part) for part in rest]
        if not any(lengths):  # an item with no tokens (a skipped bad record) takes no room
            cursor.offset = 0
            advance()
            continue
        longer_than_a_row = len(widths) == 1 and lengths[0] > widths[0]
        fits = all(f + n <= w for f, n, w in zip(fills, lengths, widths))
        if any(fills) and not fits and not longer_than_a_row:
            break
        takes = [min(n, w - f) for f, n, w in zip(fills, lengths, widths)]
        if len(widths) > 1 and takes != lengths:
            raise ValueError(f"an item of {lengths} tokens per part does not fit an empty row of {list(widths)}; cut it first")
        segment += 1
        for out, part, f, take in zip(row, rest, fills, takes):
            for name, v in part.items():
                out[name][f:f + take] = v[:take]
            out["segments"][f:f + take] = segment
        fills = [f + take for f, take in zip(fills, takes)]
        if takes[0] < lengths[0]:
            cursor.offset += takes[0]  # the row is full; the item goes on in the next one
        else:
            cursor.offset = 0
            advance()
    return row, fills[0]


def pack(items: Sequence[Item], widths: Sequence[int], channels: Channels) -> list[dict[str, np.ndarray]]:
    """Every item packed into as many rows as it takes: per part, each channel and "segments" as [R, W]."""
    k, cursor, rows = 0, Cursor(), []

    def current():
        return items[k] if k < len(items) else None

    def advance():
        nonlocal k
        k += 1

    while current() is not None:
        row, fill = fill_row(current, advance, widths, channels, cursor)
        if fill:
            rows.append(row)
    if not rows:
        return [{**{name: np.zeros((0, w), dtype) for name, dtype in part.items()}, "segments": np.zeros((0, w), np.int32)}
                for part, w in zip(channels, widths)]
    return [{name: np.stack([r[p][name] for r in rows]) for name in rows[0][p]} for p in range(len(widths))]


def segment_positions(segments_RxW: np.ndarray) -> np.ndarray:
    """Each token's position within its run of equal segment ids (0 at every run's first token)."""
    index = np.arange(segments_RxW.shape[1])
    first = np.concatenate([np.ones((len(segments_RxW), 1), bool), segments_RxW[:, 1:] != segments_RxW[:, :-1]], axis=1)
    return index - np.maximum.accumulate(np.where(first, index, 0), axis=1)


def document_batch(tokens_RxW: np.ndarray, segments_RxW: np.ndarray) -> dict[str, np.ndarray]:
    """Rows of W = seq_len + 1 packed tokens as the train step's inputs, targets, weights, segment ids
    and per-document positions."""
    segments_in, segments_out = segments_RxW[:, :-1], segments_RxW[:, 1:]
    positions = segment_positions(segments_in)
    return {
        "inputs": tokens_RxW[:, :-1],
        "targets": tokens_RxW[:, 1:],
        # A target counts only inside its input's document: never across a boundary, never padding.
        "weights": ((segments_out == segments_in) & (segments_out != 0)).astype(np.float32),
        "segment_ids": segments_in,
        "positions": positions.astype(np.int32),
    }


def take_rows(batch: dict[str, np.ndarray], lo: int, hi: int) -> dict[str, np.ndarray]:
    return {k: v[lo:hi] for k, v in batch.items()}


def pad_batch(batch: dict[str, np.ndarray], batch_size: int) -> dict[str, np.ndarray]:
    short = batch_size - len(next(iter(batch.values())))
    if not short:
        return batch
    # A fixed batch shape keeps one compiled eval step; the filler rows weigh nothing.
    return {k: np.concatenate([v, np.zeros((short, *v.shape[1:]), v.dtype)]) for k, v in batch.items()}
