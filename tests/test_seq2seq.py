import json
import string

import numpy as np
import pytest

from experiments.encoder_decoder import task
from llm.data import DataError, examples, seq2seq, tokenizer
from llm.data.tokenizer import BOS_ID, EOS_ID

TOK = tokenizer.train("char", [string.ascii_lowercase])


def pair(source: str, target: str, where: str = "x:1") -> seq2seq.Pair:
    return seq2seq.Pair(TOK.encode(source), TOK.encode(target), where)


def random_pairs(n: int, seed: int = 0) -> list[seq2seq.Pair]:
    return [pair(r["input"], r["target"], f"x:{i}") for i, r in enumerate(task.make("reverse", n, seed))]


def write_lines(path, lines: list) -> str:
    path.write_text("".join((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines))
    return f"seq2seq:{path}"


def segments_of(row_tokens: np.ndarray, row_segments: np.ndarray) -> list[list[int]]:
    return [row_tokens[row_segments == k].tolist() for k in range(1, row_segments.max() + 1)]


@pytest.mark.parametrize("bad, field", [
    ({"input": "ab"}, "target"),
    ({"input": 3, "target": "ab"}, "input"),
    ({"input": "ab", "target": ""}, "target"),
])
def test_a_bad_line_names_its_file_line_and_field(tmp_path, bad, field):
    dataset = write_lines(tmp_path / "d.jsonl", [{"input": "ab", "target": "ba"}, "", bad])
    with pytest.raises(DataError, match=rf"d\.jsonl:3: the field '{field}'"):
        seq2seq.load(dataset, "train", TOK, 0.0, 0.0)


def test_load_tokenizes_the_fields_and_ignores_the_others(tmp_path):
    dataset = write_lines(tmp_path / "d.jsonl", [{"input": "abc", "target": "cba", "id": 7}])
    [p] = seq2seq.load(dataset, "train", TOK, 0.0, 0.0)
    assert TOK.decode(p.source) == "abc" and TOK.decode(p.target) == "cba"
    assert p.where.endswith("d.jsonl:1") and p.source.dtype == np.int32
    assert seq2seq.prompt(p, EOS_ID) == p.source.tolist() + [EOS_ID]


def test_held_out_splits_are_disjoint_and_cover_every_line(tmp_path):
    dataset = write_lines(tmp_path / "d.jsonl", task.make("sort", 200, seed=1))
    splits = {s: seq2seq.load(dataset, s, TOK, 0.1, 0.05) for s in ("train", "validation", "test")}
    wheres = {s: {p.where for p in pairs} for s, pairs in splits.items()}
    assert len(wheres["validation"]) == 20 and len(wheres["test"]) == 10
    assert not wheres["train"] & wheres["validation"] and not wheres["train"] & wheres["test"]
    assert not wheres["validation"] & wheres["test"]
    assert len(set().union(*wheres.values())) == 200


def test_packing_keeps_examples_whole_and_in_order_with_agreeing_segment_ids():
    pairs = random_pairs(60)
    batch, num_cut = seq2seq.pack_encoder_decoder(pairs, source_len=40, target_len=40, bos_id=BOS_ID, eos_id=EOS_ID)
    assert num_cut == 0 and batch["encoder_inputs"].shape[1] == 40 and batch["inputs"].shape[1] == 40
    sources, targets, inputs = [], [], []
    for r in range(len(batch["inputs"])):
        encoder_segments, segments = batch["encoder_segment_ids"][r], batch["segment_ids"][r]
        assert set(np.unique(encoder_segments)) == set(np.unique(segments))
        sources += segments_of(batch["encoder_inputs"][r], encoder_segments)
        targets += segments_of(batch["targets"][r], segments)
        inputs += segments_of(batch["inputs"][r], segments)
    assert sources == [p.source.tolist() + [EOS_ID] for p in pairs]
    assert targets == [p.target.tolist() + [EOS_ID] for p in pairs]
    assert inputs == [[BOS_ID] + p.target.tolist() for p in pairs]
    # Greedy: no row's first example would have fitted in the row before it.
    for r in range(1, len(batch["inputs"])):
        first_source, first_target = (np.sum(s[r] == 1) for s in (batch["encoder_segment_ids"], batch["segment_ids"]))
        assert (np.sum(batch["encoder_segment_ids"][r - 1] == 0) < first_source
                or np.sum(batch["segment_ids"][r - 1] == 0) < first_target)


def test_weights_fall_exactly_on_target_tokens_and_eos_and_positions_restart():
    pairs = [pair("abc", "de"), pair("f", "ghij"), pair("kl", "m")]
    batch, _ = seq2seq.pack_encoder_decoder(pairs, source_len=9, target_len=12, bos_id=BOS_ID, eos_id=EOS_ID)
    assert len(batch["inputs"]) == 1
    np.testing.assert_array_equal(batch["segment_ids"][0], [1, 1, 1, 2, 2, 2, 2, 2, 3, 3, 0, 0])
    np.testing.assert_array_equal(batch["weights"][0], [1] * 10 + [0] * 2)
    np.testing.assert_array_equal(batch["positions"][0], [0, 1, 2, 0, 1, 2, 3, 4, 0, 1, 0, 0])
    np.testing.assert_array_equal(batch["encoder_segment_ids"][0], [1, 1, 1, 1, 2, 2, 3, 3, 3])
    np.testing.assert_array_equal(batch["encoder_positions"][0], [0, 1, 2, 3, 0, 1, 0, 1, 2])
    assert TOK.decode(batch["targets"][0][batch["weights"][0] > 0]) == "deghijm"
    assert batch["weights"].dtype == np.float32
    assert all(batch[k].dtype == np.int32 for k in batch if k != "weights")


def test_decoder_only_packing_weights_only_the_target_and_its_eos():
    pairs = random_pairs(30)
    exs, num_cut = seq2seq.decoder_examples(pairs, width=65, eos_id=EOS_ID)
    assert num_cut == 0
    batch = examples.pack(exs, 65, "response")
    rows = []  # (inputs, weighted targets) of every example, in order
    for r in range(len(batch["inputs"])):
        for k in range(1, batch["segment_ids"][r].max() + 1):
            in_segment = batch["segment_ids"][r] == k
            weighted = in_segment & (batch["weights"][r] > 0)
            rows.append((batch["inputs"][r][in_segment].tolist(), batch["targets"][r][weighted].tolist()))
    assert [t for _, t in rows] == [p.target.tolist() + [EOS_ID] for p in pairs]
    assert all(i[: len(p.source) + 1] == seq2seq.prompt(p, EOS_ID) for (i, _), p in zip(rows, pairs))


def test_cut_examples_are_counted_and_cut_to_fit():
    pairs = [pair("ab", "cd"), pair("abcdefghij", "c"), pair("a", "bcdefghij")]
    batch, num_cut = seq2seq.pack_encoder_decoder(pairs, source_len=6, target_len=6, bos_id=BOS_ID, eos_id=EOS_ID)
    assert num_cut == 2 and len(batch["inputs"]) == 3
    assert TOK.decode(batch["encoder_inputs"][1]) == "abcdef" and batch["encoder_segment_ids"][1].tolist() == [1] * 6
    assert TOK.decode(batch["targets"][2]) == "bcdefg" and batch["weights"][2].sum() == 6
    exs, num_cut = seq2seq.decoder_examples(pairs, width=12, eos_id=EOS_ID)
    assert num_cut == 1 and [len(e.tokens) for e in exs] == [6, 12, 12]
    with pytest.raises(DataError, match="x:1: the input is 10 tokens"):
        seq2seq.decoder_examples(pairs, width=11, eos_id=EOS_ID)


ARCHS = {
    "encoder_decoder": dict(arch="encoder_decoder", seq_len=24, target_len=24, bos_id=BOS_ID, eos_id=EOS_ID),
    "decoder": dict(arch="decoder", seq_len=48, target_len=0, bos_id=BOS_ID, eos_id=EOS_ID),
}


def take(batches, n: int) -> list[dict]:
    return [next(batches) for _ in range(n)]


def assert_same(a: list[dict], b: list[dict]) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.keys() == y.keys()
        for k in x:
            np.testing.assert_array_equal(x[k], y[k])


@pytest.mark.parametrize("arch", ARCHS)
def test_batches_are_deterministic_from_the_seed_and_resume_exactly_from_state(arch):
    pairs = random_pairs(80)
    make = lambda seed: seq2seq.Seq2SeqBatches(pairs, 4, seed, **ARCHS[arch])
    rows_per_epoch = make(0)._items_per_epoch()
    n = 2 * rows_per_epoch // 4 + 3  # across two epoch boundaries
    first = make(0)
    assert_same(take(first, n), take(make(0), n))
    assert not np.array_equal(next(make(0))["inputs"], next(make(1))["inputs"])

    k = rows_per_epoch // 4 + 1
    run = make(0)
    take(run, k)
    state = run.get_state()
    resumed = make(0)
    resumed.set_state(json.loads(json.dumps(state)))
    assert_same(take(run, n - k), take(resumed, n - k))


@pytest.mark.parametrize("arch", ARCHS)
def test_every_epoch_sees_every_example_once(arch):
    pairs = random_pairs(40)
    batches = seq2seq.Seq2SeqBatches(pairs, 1, 3, **ARCHS[arch])
    rows = take(batches, batches._items_per_epoch())
    targets = sorted(sum((segments_of(b["targets"][0], b["segment_ids"][0] * (b["weights"][0] > 0)) for b in rows), []))
    assert targets == sorted(p.target.tolist() + [EOS_ID] for p in pairs)


def test_a_split_too_small_for_one_batch_is_an_error():
    with pytest.raises(DataError, match="too few for one batch of 8"):
        seq2seq.Seq2SeqBatches(random_pairs(10), 8, 0, **ARCHS["encoder_decoder"])
    with pytest.raises(DataError, match="unknown seq2seq architecture 'encdec'"):
        seq2seq.Seq2SeqBatches(random_pairs(10), 1, 0, **{**ARCHS["decoder"], "arch": "encdec"})


@pytest.mark.parametrize("arch", ARCHS)
def test_eval_batches_weigh_every_target_once_and_pad_the_last(arch):
    pairs = random_pairs(25)
    batches = list(seq2seq.eval_batches(pairs, 4, **ARCHS[arch]))
    assert {b["inputs"].shape[0] for b in batches} == {4}
    assert sum(b["weights"].sum() for b in batches) == sum(len(p.target) + 1 for p in pairs)
    rows_with_weight = sum(int((b["weights"].sum(axis=1) > 0).sum()) for b in batches)
    assert 4 * (len(batches) - 1) < rows_with_weight < 4 * len(batches)  # 25 pairs do not fill whole batches here


def test_the_generated_tasks_have_distinct_inputs_and_right_targets():
    reverse, sorted_ = task.make("reverse", 500, seed=0), task.make("sort", 500, seed=0)
    assert len({r["input"] for r in reverse}) == 500 and reverse == task.make("reverse", 500, seed=0)
    assert all(4 <= len(r["input"]) <= 16 and set(r["input"]) <= set(string.ascii_lowercase) for r in reverse)
    assert all(r["target"] == r["input"][::-1] for r in reverse)
    assert all(s["input"] == r["input"] and s["target"] == "".join(sorted(r["input"])) for r, s in zip(reverse, sorted_))
    with pytest.raises(ValueError, match="unknown task"):
        task.make("rotate", 1, 0)
