import numpy as np
import pytest

from llm import data
from llm.data import corpus as corpus_lib, text as text_lib, tokenizer


@pytest.mark.parametrize("kind", ["char", "byte"])
def test_tokenizer_round_trip_and_reload(tmp_path, kind):
    text = "To be, or not to be: that is the question.\nÆ ü 中文"
    tok = tokenizer.train(kind, [text])
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    assert min(ids) >= 3 and max(ids) < tok.vocab_size  # pad/bos/eos stay reserved
    assert (tok.pad_id, tok.bos_id, tok.eos_id) == (0, 1, 2)
    tokenizer.save(tok, str(tmp_path))
    again = tokenizer.load(str(tmp_path))
    np.testing.assert_array_equal(again.encode(text), ids)
    assert again.vocab_size == tok.vocab_size


def test_token_bytes_count_utf8_bytes():
    tok = tokenizer.train("char", ["aé中"])
    ids = tok.encode("aé中")
    assert tok.token_bytes()[ids].tolist() == [1, 2, 3]


def test_char_tokenizer_names_characters_it_cannot_encode():
    tok = tokenizer.train("char", ["abc"])
    with pytest.raises(tokenizer.TokenizerError, match="'z'"):
        tok.encode("abz")


def test_shakespeare_splits_are_disjoint_whole_works(tmp_path):
    dc = data.DataConfig(dataset="shakespeare", data_dir=str(tmp_path))
    train = corpus_lib.load_documents(dc, "train")
    validation = corpus_lib.load_documents(dc, "validation")
    test = corpus_lib.load_documents(dc, "test")
    assert len(train) == 36 and len(validation) == 3 and len(test) == 3
    assert not set(validation) & set(train) and not set(test) & set(train)
    assert any(doc.startswith("JULIUS CAESAR") or "JULIUS CAESAR" in doc[:200] for doc in validation)


def test_text_dataset_splits_each_file_by_position(tmp_path):
    (tmp_path / "a.txt").write_text("0123456789" * 10)
    dc = data.DataConfig(dataset=f"text:{tmp_path}/*.txt", data_dir=str(tmp_path / "tfds"), validation_fraction=0.1)
    train = corpus_lib.load_documents(dc, "train")
    validation = corpus_lib.load_documents(dc, "validation")
    assert train[0] + validation[0] == "0123456789" * 10 and len(validation[0]) == 10


@pytest.mark.parametrize(
    "content, message",
    [(b"", "is empty"), (b"\xff\xfe\x00\x01binary", "not text|not UTF-8"), (b"caf\xe9 latin-1", "not UTF-8")],
)
def test_bad_files_get_one_clear_message(tmp_path, content, message):
    path = tmp_path / "bad.txt"
    path.write_bytes(content)
    with pytest.raises(data.DataError, match=message):
        corpus_lib.load_documents(data.DataConfig(dataset=f"text:{path}", data_dir=str(tmp_path / "tfds")), "train")


def test_glob_matching_nothing_and_unknown_dataset_are_named(tmp_path):
    dd = str(tmp_path / "tfds")
    with pytest.raises(data.DataError, match="matches no files"):
        corpus_lib.load_documents(data.DataConfig(dataset=f"text:{tmp_path}/*.nope", data_dir=dd), "train")
    with pytest.raises(data.DataError, match="unknown dataset 'wikitext'"):
        corpus_lib.load_documents(data.DataConfig(dataset="wikitext", data_dir=dd), "train")
    with pytest.raises(data.DataError, match="unknown split 'dev'"):
        corpus_lib.load_documents(data.DataConfig(dataset="shakespeare", data_dir=dd), "dev")


def _stream(n=5000):
    return np.arange(n, dtype=np.int32) % 97


def test_batches_are_deterministic_and_resume_exactly():
    a = text_lib.TrainBatches(_stream(), batch_size=4, seq_len=16, seed=3)
    first = [next(a) for _ in range(200)]  # crosses several epochs
    b = text_lib.TrainBatches(_stream(), batch_size=4, seq_len=16, seed=3)
    for _ in range(57):
        next(b)
    state = b.get_state()
    c = text_lib.TrainBatches(_stream(), batch_size=4, seq_len=16, seed=3)
    c.set_state(state)
    for expected in first[57:]:
        got = next(c)
        np.testing.assert_array_equal(got["inputs"], expected["inputs"])
    assert a.epoch > 0


def test_rows_are_shifted_next_token_pairs_and_epochs_reshuffle():
    batches = text_lib.TrainBatches(_stream(), batch_size=4, seq_len=16, seed=0)
    batch = next(batches)
    np.testing.assert_array_equal(batch["inputs"][:, 1:], batch["targets"][:, :-1])
    per_epoch = (5000 - 1) // 16 // 4 - 1
    epoch0 = [next(batches)["inputs"][0, 0] for _ in range(per_epoch)]
    epoch1 = [next(batches)["inputs"][0, 0] for _ in range(per_epoch)]
    assert epoch0 != epoch1


def test_hosts_get_disjoint_slices_whose_union_is_the_global_batch():
    whole = next(text_lib.TrainBatches(_stream(), batch_size=8, seq_len=16, seed=1))
    parts = [next(text_lib.TrainBatches(_stream(), 8, 16, 1, rows=rows)) for rows in [(0, 4), (4, 8)]]
    np.testing.assert_array_equal(np.concatenate([p["inputs"] for p in parts]), whole["inputs"])


def test_eval_batches_score_every_token_once_with_padding_masked():
    stream = _stream(1001)
    batches = list(text_lib.eval_batches(stream, batch_size=8, seq_len=16))
    weights = np.concatenate([b["weights"] for b in batches])
    targets = np.concatenate([b["targets"] for b in batches])
    assert weights.sum() == len(stream) - 1
    np.testing.assert_array_equal(targets[weights > 0], stream[1:])
    assert all(b["inputs"].shape == (8, 16) for b in batches)


def test_window_sampling_resumes_exactly_and_splits_across_hosts():
    a = text_lib.TrainBatches(_stream(), batch_size=8, seq_len=16, seed=2, sampling="windows")
    expected = [next(a) for _ in range(10)]
    b = text_lib.TrainBatches(_stream(), batch_size=8, seq_len=16, seed=2, sampling="windows")
    b.set_state({"epoch": 0, "batch_in_epoch": 6})
    np.testing.assert_array_equal(next(b)["inputs"], expected[6]["inputs"])
    halves = [text_lib.TrainBatches(_stream(), 8, 16, 2, rows=r, sampling="windows") for r in [(0, 4), (4, 8)]]
    np.testing.assert_array_equal(np.concatenate([next(h)["inputs"] for h in halves]), expected[0]["inputs"])
    assert not np.array_equal(expected[0]["inputs"], expected[1]["inputs"])
