"""Denoising objectives as batches: T5 span corruption (Raffel et al. 2020) and BERT masking (Devlin et al. 2019).

Pure numpy over rows of raw token ids, randomness from an explicit np.random.Generator. The batch dicts follow
packing.document_batch's conventions: int32 ids, float32 weights, positions restarting at 0 in each segment.
"""

import dataclasses

import numpy as np

from llm.data.packing import segment_positions


def _check_noise(noise_density: float, mean_noise_span_length: float) -> None:
    # A density of 1 would leave the encoder input at 3 tokens whatever the raw length, so no raw length is "largest".
    if not 0.0 < noise_density < 1.0:
        raise ValueError(f"noise_density must be in (0, 1), got {noise_density}")
    if not mean_noise_span_length > 0.0:
        raise ValueError(f"mean_noise_span_length must be > 0, got {mean_noise_span_length}")


def span_counts(length: int, noise_density: float, mean_noise_span_length: float) -> tuple[int, int]:
    """(noise tokens, noise spans) of a row of `length` raw tokens, T5's rounding: noise = round(length * density)
    clipped to [1, length - 1]; spans = round(noise / mean) clipped to [1, min(noise, length - noise)]."""
    _check_noise(noise_density, mean_noise_span_length)
    if length < 2:
        raise ValueError(f"span corruption needs rows of at least 2 tokens, got {length}")
    # Python's round is half-to-even, as tf.round in T5's random_spans_noise_mask.
    noise = min(max(round(length * noise_density), 1), length - 1)
    spans = min(max(round(noise / mean_noise_span_length), 1), noise, length - noise)
    return noise, spans


def corrupted_lengths(raw_length: int, noise_density: float, mean_noise_span_length: float) -> tuple[int, int]:
    """(encoder input length, decoder target length): raw - noise + spans + 1 and noise + spans + 1 (each ends with eos)."""
    noise, spans = span_counts(raw_length, noise_density, mean_noise_span_length)
    return raw_length - noise + spans + 1, noise + spans + 1


def raw_length_for(input_length: int, noise_density: float, mean_noise_span_length: float) -> int:
    """The largest raw length whose corrupted input is at most input_length tokens (T5's random_spans_helper);
    raise ValueError with a clear message if none >= 2 exists."""
    def fits(raw: int) -> bool:
        return corrupted_lengths(raw, noise_density, mean_noise_span_length)[0] <= input_length

    if not fits(2):
        shortest = corrupted_lengths(2, noise_density, mean_noise_span_length)[0]
        raise ValueError(f"an encoder input of {input_length} tokens is too short for span corruption: "
                         f"even a raw row of 2 tokens corrupts to {shortest}")
    # The input length never decreases with the raw length (non-noise and span counts both only grow), so
    # doubling then bisecting finds the boundary; T5 walks up one token at a time.
    lo, hi = 2, 4
    while fits(hi):
        lo, hi = hi, 2 * hi
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    return lo


def _random_partition(rng: np.random.Generator, rows: int, total: int, parts: int) -> np.ndarray:
    """[rows, parts] positive lengths summing to total, uniform over compositions (T5's _random_segmentation)."""
    # Choosing parts - 1 distinct cut points among the total - 1 gaps between tokens is uniform over compositions.
    order_RxG = np.argsort(rng.random((rows, total - 1)), axis=1)
    cuts_RxC = np.sort(order_RxG[:, : parts - 1], axis=1) + 1
    edges_RxE = np.concatenate([np.zeros((rows, 1), np.int64), cuts_RxC, np.full((rows, 1), total)], axis=1)
    return np.diff(edges_RxE, axis=1)


def _run_index(noise_lengths_BxK: np.ndarray, nonnoise_lengths_BxK: np.ndarray, length: int) -> np.ndarray:
    """[B, length] index of each token's run in the interleaving non-noise 0, noise 0, non-noise 1, noise 1, ..."""
    batch, spans = noise_lengths_BxK.shape
    runs_Bx2K = np.stack([nonnoise_lengths_BxK, noise_lengths_BxK], axis=2).reshape(batch, 2 * spans)
    starts_BxQ = np.cumsum(runs_Bx2K, axis=1)[:, :-1]  # where runs 1 .. 2K-1 begin; run 0 begins at 0
    run_start_BxR = np.zeros((batch, length), np.int64)
    np.put_along_axis(run_start_BxR, starts_BxQ, 1, axis=1)
    return np.cumsum(run_start_BxR, axis=1)


def span_corruption_batch(tokens_BxR: np.ndarray, rng: np.random.Generator, first_sentinel: int, bos_id: int,
                          eos_id: int, noise_density: float = 0.15,
                          mean_noise_span_length: float = 3.0) -> dict[str, np.ndarray]:
    """T5 span corruption of every row: encoder input keeps the non-noise tokens with sentinel i in place of span i;
    targets are sentinel i then span i's tokens, for each span. Same counts in every row, so no padding."""
    batch, length = tokens_BxR.shape
    noise, spans = span_counts(length, noise_density, mean_noise_span_length)
    input_length, target_length = corrupted_lengths(length, noise_density, mean_noise_span_length)
    noise_lengths_BxK = _random_partition(rng, batch, noise, spans)
    nonnoise_lengths_BxK = _random_partition(rng, batch, length - noise, spans)
    run_BxR = _run_index(noise_lengths_BxK, nonnoise_lengths_BxK, length)
    is_noise_BxR = run_BxR % 2 == 1
    run_first_BxR = np.concatenate([np.ones((batch, 1), bool), run_BxR[:, 1:] != run_BxR[:, :-1]], axis=1)
    # Non-noise run i precedes span i, so both carry span i's sentinel: the input's stands in for the span,
    # the target's announces it.
    sentinel_BxR = first_sentinel + run_BxR // 2
    tokens_BxR = np.asarray(tokens_BxR, np.int64)
    keep_in_BxR = ~is_noise_BxR | run_first_BxR
    keep_out_BxR = is_noise_BxR | run_first_BxR
    # Every row keeps the same number of tokens, so a boolean gather reshapes straight back to [B, ...].
    encoder_BxS1 = np.where(is_noise_BxR, sentinel_BxR, tokens_BxR)[keep_in_BxR].reshape(batch, input_length - 1)
    targets_BxT1 = np.where(is_noise_BxR, tokens_BxR, sentinel_BxR)[keep_out_BxR].reshape(batch, target_length - 1)
    eos_Bx1 = np.full((batch, 1), eos_id, np.int64)
    encoder_inputs_BxS = np.concatenate([encoder_BxS1, eos_Bx1], axis=1).astype(np.int32)
    targets_BxT = np.concatenate([targets_BxT1, eos_Bx1], axis=1).astype(np.int32)
    # Teacher forcing with bos as the decoder's start token.
    inputs_BxT = np.concatenate([np.full((batch, 1), bos_id, np.int32), targets_BxT[:, :-1]], axis=1)
    return {
        "encoder_inputs": encoder_inputs_BxS,
        "encoder_segment_ids": np.ones((batch, input_length), np.int32),
        "encoder_positions": np.broadcast_to(np.arange(input_length, dtype=np.int32), (batch, input_length)).copy(),
        "inputs": inputs_BxT,
        "targets": targets_BxT,
        "weights": np.ones((batch, target_length), np.float32),
        "segment_ids": np.ones((batch, target_length), np.int32),
        "positions": np.broadcast_to(np.arange(target_length, dtype=np.int32), (batch, target_length)).copy(),
    }


def uncorrupt(encoder_inputs_S: np.ndarray, targets_T: np.ndarray, first_sentinel: int, num_sentinels: int,
              eos_id: int) -> np.ndarray:
    """The raw tokens back from one row's encoder input and targets (what the tests check)."""
    encoder_inputs, targets = np.asarray(encoder_inputs_S).tolist(), np.asarray(targets_T).tolist()
    if encoder_inputs[-1:] != [eos_id] or targets[-1:] != [eos_id]:
        raise ValueError("both the encoder input and the targets must end with eos")

    def is_sentinel(token: int) -> bool:
        return first_sentinel <= token < first_sentinel + num_sentinels

    spans: dict[int, list[int]] = {}
    current = None
    for token in targets[:-1]:
        if is_sentinel(token):
            current = spans.setdefault(token, [])
        elif current is None:
            raise ValueError("the targets must start with a sentinel")
        else:
            current.append(token)
    raw: list[int] = []
    for token in encoder_inputs[:-1]:
        if is_sentinel(token):
            if token not in spans:
                raise ValueError(f"sentinel {token} of the encoder input is missing from the targets")
            raw.extend(spans[token])
        else:
            raw.append(token)
    return np.asarray(raw, np.int32)


@dataclasses.dataclass(frozen=True)
class MlmIds:
    cls: int
    sep: int
    mask: int


def mlm_batch(tokens_BxR: np.ndarray, rng: np.random.Generator, ids: MlmIds, random_lo: int, random_hi: int,
              mask_fraction: float = 0.15, segments_BxR: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """BERT masking of [CLS] + row + [SEP]: exactly max(1, round(mask_fraction * real tokens)) positions per row
    are predicted; each is shown as [MASK] (80%), a random id in [random_lo, random_hi) (10%) or itself (10%)."""
    batch, length = tokens_BxR.shape
    real_BxR = np.ones((batch, length), bool) if segments_BxR is None else np.asarray(segments_BxR) != 0
    num_real_B = real_BxR.sum(axis=1)
    # A row of padding only has nothing to choose; every other row gets at least one prediction.
    num_chosen_B = np.minimum(np.maximum(1, np.rint(mask_fraction * num_real_B).astype(np.int64)), num_real_B)
    # A uniform random order of each row's real tokens (padding sorts last); its first num_chosen are chosen.
    keys_BxR = np.where(real_BxR, rng.random((batch, length)), 2.0)
    order_BxR = np.argsort(keys_BxR, axis=1)
    chosen_BxR = np.zeros((batch, length), bool)
    np.put_along_axis(chosen_BxR, order_BxR, np.arange(length) < num_chosen_B[:, None], axis=1)
    action_BxR = rng.random((batch, length))
    random_ids_BxR = rng.integers(random_lo, random_hi, (batch, length))
    tokens_BxR = np.asarray(tokens_BxR, np.int64)
    corrupted_BxR = np.where(action_BxR < 0.8, ids.mask, np.where(action_BxR < 0.9, random_ids_BxR, tokens_BxR))
    corrupted_BxR = np.where(chosen_BxR, corrupted_BxR, tokens_BxR)

    def frame(middle_BxR: np.ndarray, first: np.ndarray | int, last: np.ndarray | int) -> np.ndarray:
        first_Bx1 = np.broadcast_to(first, (batch, 1))
        last_Bx1 = np.broadcast_to(last, (batch, 1))
        return np.concatenate([first_Bx1, middle_BxR, last_Bx1], axis=1)

    if segments_BxR is None:
        segments_BxL = np.ones((batch, length + 2), np.int64)
        positions_BxL = np.broadcast_to(np.arange(length + 2), (batch, length + 2))
    else:
        segments = np.asarray(segments_BxR, np.int64)
        segments_BxL = frame(segments, segments[:, :1], segments[:, -1:])
        positions_BxL = segment_positions(segments_BxL)
    return {
        "inputs": frame(corrupted_BxR, ids.cls, ids.sep).astype(np.int32),
        "targets": frame(tokens_BxR, ids.cls, ids.sep).astype(np.int32),
        "weights": frame(chosen_BxR, False, False).astype(np.float32),
        "segment_ids": segments_BxL.astype(np.int32),
        "positions": positions_BxL.astype(np.int32),
    }


# Text-corpus batches (llm/data/corpus.py's) into the batches of each arch's pretraining objective.


def span_corruption(batch: dict[str, np.ndarray], rng: np.random.Generator, first_sentinel: int, bos_id: int, eos_id: int,
                    noise_density: float, mean_noise_span_length: float) -> dict[str, np.ndarray]:
    """Rows of R = seq_len + 1 raw tokens (inputs and the last target) corrupted; a row with padding
    (the tail of an eval split, a filler row) is scored not at all."""
    tokens_BxR = np.concatenate([batch["inputs"], batch["targets"][:, -1:]], axis=1)
    out = span_corruption_batch(tokens_BxR, rng, first_sentinel, bos_id, eos_id, noise_density, mean_noise_span_length)
    out["weights"] *= (batch["weights"].min(axis=1) > 0)[:, None]
    return out


def masked_lm(batch: dict[str, np.ndarray], rng: np.random.Generator, ids: MlmIds, random_lo: int, random_hi: int,
              mask_fraction: float) -> dict[str, np.ndarray]:
    """A batch's inputs framed by [CLS] ... [SEP] and masked; padding (segment 0, or weight 0 in a
    concat row) is never chosen."""
    segments_BxR = batch.get("segment_ids")
    if segments_BxR is None:
        segments_BxR = (batch["weights"] > 0).astype(np.int32)
    return mlm_batch(batch["inputs"], rng, ids, random_lo, random_hi, mask_fraction, segments_BxR)


class Noised:
    """Batches through a transform whose noise for batch i is drawn from (seed, i, this host's first
    row): the same batches after a resume, since the count travels in the data state."""

    def __init__(self, batches, transform, seed: int, first_row: int = 0):
        self.batches, self.transform, self.seed, self.first_row, self.count = batches, transform, seed, first_row, 0

    def __iter__(self):
        return self

    @property
    def skipped(self) -> int | None:
        """The wrapped batches' count of bad records skipped; None for batches that never skip any."""
        return getattr(self.batches, "skipped", None)

    def __next__(self) -> dict[str, np.ndarray]:
        batch = next(self.batches)
        rng = np.random.default_rng([self.seed, self.count, self.first_row, 0x5EED])
        self.count += 1
        return self.transform(batch, rng)

    def get_state(self) -> dict:
        return {**self.batches.get_state(), "noised": self.count}

    def set_state(self, state: dict) -> None:
        self.batches.set_state({k: v for k, v in state.items() if k != "noised"})
        self.count = int(state.get("noised", 0))

    def merge_states(self, states) -> dict:
        return {**self.batches.merge_states([{k: v for k, v in s.items() if k != "noised"} for s in states]), "noised": states[0]["noised"]}

    def close(self) -> None:
        self.batches.close()


def noised_eval(batches, transform, seed: int):
    """One pass with fixed noise: every eval of a run scores the same corrupted split."""
    for i, batch in enumerate(batches):
        yield transform(batch, np.random.default_rng([seed, i, 0xE7A1]))
