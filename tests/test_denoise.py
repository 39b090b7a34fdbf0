import collections

import numpy as np
import pytest

from llm.data import denoise

BOS, EOS, SENTINEL, NUM_SENTINELS = 1, 2, 1000, 512
IDS = denoise.MlmIds(cls=3, sep=4, mask=5)


def raw_rows(batch: int, length: int, seed: int = 0) -> np.ndarray:
    # Ids in [10, 1000): never bos, eos, a sentinel or an MLM special id.
    return np.random.default_rng(seed).integers(10, SENTINEL, (batch, length)).astype(np.int32)


def corrupt(tokens_BxR, seed=0, density=0.15, mean=3.0):
    return denoise.span_corruption_batch(tokens_BxR, np.random.default_rng(seed), SENTINEL, BOS, EOS,
                                         noise_density=density, mean_noise_span_length=mean)


def is_sentinel(x):
    return (x >= SENTINEL) & (x < SENTINEL + NUM_SENTINELS)


CASES = [(2, 0.15, 3.0), (3, 0.5, 1.0), (7, 0.15, 3.0), (33, 0.3, 2.0), (128, 0.15, 3.0), (257, 0.5, 5.0),
         (512, 0.15, 3.0), (100, 0.9, 1.5), (64, 0.05, 10.0)]


def test_span_counts_follow_t5_rounding_and_clipping():
    assert denoise.span_counts(512, 0.15, 3.0) == (77, 26)  # round(76.8), round(25.67)
    assert denoise.span_counts(2, 0.15, 3.0) == (1, 1)  # noise clipped up to 1
    assert denoise.span_counts(10, 0.99, 1.0) == (9, 1)  # noise clipped to length - 1, spans to length - noise
    assert denoise.span_counts(10, 0.25, 1.0) == (2, 2)  # round(2.5) is 2, half to even as tf.round
    with pytest.raises(ValueError, match="at least 2"):
        denoise.span_counts(1, 0.15, 3.0)
    with pytest.raises(ValueError, match="noise_density"):
        denoise.span_counts(10, 1.0, 3.0)


def test_corrupted_lengths_add_one_sentinel_per_span_and_eos():
    noise, spans = denoise.span_counts(512, 0.15, 3.0)
    assert denoise.corrupted_lengths(512, 0.15, 3.0) == (512 - noise + spans + 1, noise + spans + 1) == (462, 104)


@pytest.mark.parametrize("density,mean", [(0.15, 3.0), (0.5, 1.0), (0.3, 7.0), (0.9, 2.0)])
def test_raw_length_for_is_the_largest_raw_length_that_fits(density, mean):
    for input_length in [3, 4, 5, 17, 114, 512, 568, 1024]:
        raw = denoise.raw_length_for(input_length, density, mean)
        assert denoise.corrupted_lengths(raw, density, mean)[0] <= input_length
        assert denoise.corrupted_lengths(raw + 1, density, mean)[0] > input_length
        # Nothing longer fits either: the corrupted length never shrinks as the raw row grows.
        assert all(denoise.corrupted_lengths(r, density, mean)[0] > input_length for r in range(raw + 1, raw + 50))


def test_raw_length_for_matches_t5_default_for_inputs_of_512():
    # T5's random_spans_helper(512, 0.15, 3.0) gives 568 raw tokens (and 114 targets).
    assert denoise.raw_length_for(512, 0.15, 3.0) == 568
    assert denoise.corrupted_lengths(568, 0.15, 3.0) == (512, 114)


def test_raw_length_for_rejects_inputs_too_short_for_any_row():
    with pytest.raises(ValueError, match="too short"):
        denoise.raw_length_for(2, 0.15, 3.0)


@pytest.mark.parametrize("length,density,mean", CASES)
def test_span_corruption_round_trips_to_the_raw_row(length, density, mean):
    tokens = raw_rows(64, length, seed=length)
    batch = corrupt(tokens, seed=length + 1, density=density, mean=mean)
    for row in range(len(tokens)):
        back = denoise.uncorrupt(batch["encoder_inputs"][row], batch["targets"][row], SENTINEL, NUM_SENTINELS, EOS)
        np.testing.assert_array_equal(back, tokens[row])


@pytest.mark.parametrize("length,density,mean", CASES)
def test_span_corruption_shapes_equal_corrupted_lengths_without_padding(length, density, mean):
    batch = corrupt(raw_rows(8, length), density=density, mean=mean)
    S, T = denoise.corrupted_lengths(length, density, mean)
    assert denoise.raw_length_for(S, density, mean) >= length
    for key in ["encoder_inputs", "encoder_segment_ids", "encoder_positions"]:
        assert batch[key].shape == (8, S) and batch[key].dtype == np.int32
    for key in ["inputs", "targets", "segment_ids", "positions"]:
        assert batch[key].shape == (8, T) and batch[key].dtype == np.int32
    assert batch["weights"].dtype == np.float32 and (batch["weights"] == 1.0).all()
    assert (batch["encoder_segment_ids"] == 1).all() and (batch["segment_ids"] == 1).all()
    np.testing.assert_array_equal(batch["encoder_positions"], np.broadcast_to(np.arange(S), (8, S)))
    np.testing.assert_array_equal(batch["positions"], np.broadcast_to(np.arange(T), (8, T)))
    assert (batch["encoder_inputs"][:, -1] == EOS).all() and (batch["targets"][:, -1] == EOS).all()


@pytest.mark.parametrize("length,density,mean", CASES)
def test_sentinels_appear_in_order_and_every_span_is_non_empty(length, density, mean):
    batch = corrupt(raw_rows(32, length), density=density, mean=mean)
    noise, spans = denoise.span_counts(length, density, mean)
    for encoder_inputs, targets in zip(batch["encoder_inputs"], batch["targets"]):
        expected = SENTINEL + np.arange(spans)
        np.testing.assert_array_equal(encoder_inputs[is_sentinel(encoder_inputs)], expected)
        np.testing.assert_array_equal(targets[is_sentinel(targets)], expected)
        # The noise tokens are exactly span_counts' number, and no two sentinels are adjacent in the targets.
        assert (~is_sentinel(targets[:-1])).sum() == noise
        starts = np.flatnonzero(is_sentinel(targets))
        assert targets[0] == SENTINEL and (np.diff(np.append(starts, len(targets) - 1)) > 1).all()
        # Non-noise runs are non-empty too: the input starts with a raw token, never two sentinels in a row.
        marks = is_sentinel(encoder_inputs)
        assert not marks[0] and not (marks[1:] & marks[:-1]).any()
        # The row ends in a noise span: the last thing before eos in the input is a sentinel.
        assert is_sentinel(encoder_inputs[-2])


def test_decoder_inputs_are_targets_shifted_right_after_bos():
    batch = corrupt(raw_rows(16, 200))
    assert (batch["inputs"][:, 0] == BOS).all()
    np.testing.assert_array_equal(batch["inputs"][:, 1:], batch["targets"][:, :-1])


def test_span_corruption_is_deterministic_in_the_rng():
    tokens = raw_rows(16, 256)
    one, again, other = corrupt(tokens, seed=7), corrupt(tokens, seed=7), corrupt(tokens, seed=8)
    assert one.keys() == again.keys()
    for key in one:
        np.testing.assert_array_equal(one[key], again[key])
    assert not np.array_equal(one["encoder_inputs"], other["encoder_inputs"])


def test_span_corruption_rows_differ_from_each_other():
    batch = corrupt(np.tile(raw_rows(1, 256), (16, 1)))  # the same raw row sixteen times
    assert len({row.tobytes() for row in batch["encoder_inputs"]}) == 16


def test_span_lengths_are_uniform_over_compositions():
    # 8 tokens at density 3/8 with mean 1.5: 3 noise tokens in 2 spans, 5 non-noise tokens in 2 runs.
    density, mean = 3 / 8, 1.5
    assert denoise.span_counts(8, density, mean) == (3, 2)
    batch = corrupt(raw_rows(8000, 8), seed=3, density=density, mean=mean)
    noise_parts, nonnoise_parts = collections.Counter(), collections.Counter()
    for encoder_inputs, targets in zip(batch["encoder_inputs"], batch["targets"]):
        noise_parts[np.flatnonzero(is_sentinel(targets))[1] - 1] += 1  # length of span 0
        nonnoise_parts[np.flatnonzero(is_sentinel(encoder_inputs))[0]] += 1  # length of run 0
    assert sorted(noise_parts) == [1, 2] and sorted(nonnoise_parts) == [1, 2, 3, 4]
    np.testing.assert_allclose([noise_parts[k] / 8000 for k in (1, 2)], 0.5, atol=0.03)
    np.testing.assert_allclose([nonnoise_parts[k] / 8000 for k in (1, 2, 3, 4)], 0.25, atol=0.03)


def test_uncorrupt_rejects_rows_without_eos():
    batch = corrupt(raw_rows(1, 20))
    with pytest.raises(ValueError, match="eos"):
        denoise.uncorrupt(batch["encoder_inputs"][0, :-1], batch["targets"][0], SENTINEL, NUM_SENTINELS, EOS)


def mlm(tokens, seed=0, segments=None, fraction=0.15):
    return denoise.mlm_batch(tokens, np.random.default_rng(seed), IDS, 10, SENTINEL, mask_fraction=fraction,
                             segments_BxR=segments)


def padded_segments(batch: int, length: int, seed: int = 0) -> np.ndarray:
    """Rows of 1-3 documents then padding (segment 0), some rows all padding."""
    rng = np.random.default_rng(seed)
    segments = np.zeros((batch, length), np.int32)
    for row in range(batch):
        cuts = np.sort(rng.choice(np.arange(1, length), size=3, replace=False))
        segments[row, : cuts[0]] = 1
        segments[row, cuts[0] : cuts[1]] = 2
        segments[row, cuts[1] : cuts[2]] = rng.integers(0, 2) * 3
    segments[-1] = 0
    return segments


def test_mlm_chooses_exactly_the_rounded_fraction_of_real_tokens():
    tokens = raw_rows(64, 300)
    batch = mlm(tokens)
    assert batch["weights"].dtype == np.float32 and set(np.unique(batch["weights"])) == {0.0, 1.0}
    assert (batch["weights"].sum(axis=1) == round(0.15 * 300)).all()
    segments = padded_segments(64, 300)
    batch = mlm(tokens, segments=segments)
    num_real = (segments != 0).sum(axis=1)
    expected = np.where(num_real > 0, np.maximum(1, np.rint(0.15 * num_real)), 0)
    np.testing.assert_array_equal(batch["weights"].sum(axis=1), expected)
    assert (mlm(tokens[:, :3], fraction=0.01)["weights"].sum(axis=1) == 1).all()  # at least one per row


def test_mlm_never_chooses_cls_sep_or_padding():
    tokens, segments = raw_rows(64, 200), padded_segments(64, 200)
    batch = mlm(tokens, segments=segments)
    weights = batch["weights"]
    assert (weights[:, 0] == 0).all() and (weights[:, -1] == 0).all()
    assert (weights[:, 1:-1][segments == 0] == 0).all()
    unchosen = weights == 0
    np.testing.assert_array_equal(batch["inputs"][unchosen], batch["targets"][unchosen])


def test_mlm_targets_are_the_original_row_framed_by_cls_and_sep():
    tokens = raw_rows(8, 128)
    batch = mlm(tokens)
    assert batch["inputs"].shape == batch["targets"].shape == (8, 130)
    assert all(batch[key].dtype == np.int32 for key in ["inputs", "targets", "segment_ids", "positions"])
    np.testing.assert_array_equal(batch["targets"][:, 1:-1], tokens)
    assert (batch["targets"][:, 0] == IDS.cls).all() and (batch["targets"][:, -1] == IDS.sep).all()
    assert (batch["inputs"][:, 0] == IDS.cls).all() and (batch["inputs"][:, -1] == IDS.sep).all()


def test_mlm_replaces_chosen_tokens_80_10_10():
    tokens = raw_rows(256, 512, seed=1)
    batch = mlm(tokens, seed=2)
    chosen = batch["weights"] == 1
    shown, original = batch["inputs"][chosen], batch["targets"][chosen]
    masked = shown == IDS.mask
    unchanged = shown == original
    randomised = ~masked & ~unchanged
    assert chosen.sum() > 19_000
    assert abs(masked.mean() - 0.8) < 0.015
    assert abs(randomised.mean() - 0.1) < 0.01
    assert abs(unchanged.mean() - 0.1) < 0.01
    assert ((shown[randomised] >= 10) & (shown[randomised] < SENTINEL)).all()


def test_mlm_segments_and_positions_restart_per_document():
    tokens = raw_rows(2, 6)
    segments = np.array([[1, 1, 2, 2, 2, 0], [1, 2, 2, 3, 3, 3]], np.int32)
    batch = mlm(tokens, segments=segments)
    np.testing.assert_array_equal(batch["segment_ids"], [[1, 1, 1, 2, 2, 2, 0, 0], [1, 1, 2, 2, 3, 3, 3, 3]])
    np.testing.assert_array_equal(batch["positions"], [[0, 1, 2, 0, 1, 2, 0, 1], [0, 1, 0, 1, 0, 1, 2, 3]])
    plain = mlm(tokens)
    assert (plain["segment_ids"] == 1).all()
    np.testing.assert_array_equal(plain["positions"], np.broadcast_to(np.arange(8), (2, 8)))


def test_mlm_is_deterministic_in_the_rng():
    tokens, segments = raw_rows(32, 256), padded_segments(32, 256)
    one, again, other = mlm(tokens, 5, segments), mlm(tokens, 5, segments), mlm(tokens, 6, segments)
    for key in one:
        np.testing.assert_array_equal(one[key], again[key])
    assert not np.array_equal(one["weights"], other["weights"])
