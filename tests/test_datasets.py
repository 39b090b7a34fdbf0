import hashlib
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import SHARED, tiny_config, train_run, write_corpus

import llm
from llm import data, model
from llm.data import corpus as corpus_lib, text as text_lib, tokenizer
from llm.model import ModelConfig

TINY_SHAKESPEARE = SHARED / "data" / "tiny_shakespeare"


@pytest.mark.skipif(not (TINY_SHAKESPEARE / "input.txt").exists(), reason="../shared/data/tiny_shakespeare/input.txt is not here")
def test_real_tfds_tiny_shakespeare_builds_offline_from_manual_dir(tmp_path):
    dc = data.DataConfig(dataset="tfds:tiny_shakespeare", data_dir=str(tmp_path), manual_dir=str(TINY_SHAKESPEARE))
    text = (TINY_SHAKESPEARE / "input.txt").read_text(encoding="utf-8")
    train_docs, validation_docs, test_docs = (corpus_lib.load_documents(dc, s) for s in ("train", "validation", "test"))
    # TFDS splits the file 90/5/5 by characters.
    assert "".join(train_docs + validation_docs + test_docs) == text
    assert len(train_docs[0]) == int(len(text) * 0.9)
    tok = tokenizer.train("char", train_docs)
    stream = text_lib.token_stream(dc, "validation", tok)
    assert tok.decode(np.asarray(stream)) == validation_docs[0]


def test_text_files_become_a_tfds_dataset_with_three_splits(tmp_path):
    for i in range(3):
        write_corpus(tmp_path / f"doc{i}.txt", num_chars=2000, seed=i)
    dc = data.DataConfig(dataset=f"text:{tmp_path}/doc*.txt", data_dir=str(tmp_path / "tfds"), validation_fraction=0.2, test_fraction=0.1)
    splits = {s: corpus_lib.load_documents(dc, s) for s in ("train", "validation", "test")}
    assert [len(v) for v in splits.values()] == [3, 3, 3]
    for i in range(3):
        original = (tmp_path / f"doc{i}.txt").read_text()
        assert splits["train"][i] + splits["validation"][i] + splits["test"][i] == original
    assert os.path.isdir(tmp_path / "tfds" / "llm_text_files")


def test_bad_dataset_inputs_name_what_was_asked_and_what_exists(tmp_path):
    write_corpus(tmp_path / "a.txt", num_chars=500)
    dd = str(tmp_path / "tfds")
    with pytest.raises(data.DataError, match="TFDS has no dataset 'tiny_shakespear'; did you mean tiny_shakespeare"):
        corpus_lib.load_documents(data.DataConfig(dataset="tfds:tiny_shakespear", data_dir=dd), "train")
    with pytest.raises(data.DataError, match="has no split 'test'; it has train, validation"):
        corpus_lib.load_documents(data.DataConfig(dataset=f"text:{tmp_path}/a.txt", data_dir=dd), "test")
    with pytest.raises(data.DataError, match="has no feature 'content' .* its features are text, path"):
        corpus_lib.load_documents(data.DataConfig(dataset=f"text:{tmp_path}/a.txt", data_dir=dd, text_key="content"), "train")


def test_sentencepiece_round_trips_unicode_text():
    corpus = [write_corpus.__globals__["WORDS"].__str__() * 20, "The quick brown fox.\nJumps over the lazy dog!\n" * 50]
    tok = tokenizer.train("sentencepiece", corpus, vocab_size=300, spm_model_type="bpe")
    for text in ["To be, or not to be:\n  that is the question.", "中文文本，没有在训练中出现。", "naïve café ☃ 🙂\t\n\nend"]:
        assert tok.decode(tok.encode(text)) == text
    unigram = tokenizer.train("sentencepiece", corpus, vocab_size=300, spm_model_type="unigram")
    assert unigram.decode(unigram.encode("中文 and English")) == "中文 and English"


@pytest.fixture(scope="module")
def spm_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("spm")
    corpus = write_corpus(root / "corpus.txt", num_chars=30_000)
    cfg = tiny_config(corpus, num_train_steps=6, checkpoint_every_steps=3, data__tokenizer="sentencepiece",
                      data__vocab_size=300, data__packing="documents")
    train_run(cfg, str(root / "run"), quiet=True)
    return cfg, root


def test_sentencepiece_is_trained_once_and_reused_on_resume(spm_run):
    cfg, root = spm_run
    model_file = root / "run" / "tokenizer.model"
    digest = hashlib.sha1(model_file.read_bytes()).hexdigest()
    mtime = model_file.stat().st_mtime_ns
    cfg.num_train_steps = 9
    train_run(cfg, str(root / "run"), quiet=True)
    assert model_file.stat().st_mtime_ns == mtime and hashlib.sha1(model_file.read_bytes()).hexdigest() == digest
    # data.tokenizer_path uses an existing model instead of training one.
    cfg2 = tiny_config(root / "corpus.txt", num_train_steps=2, data__tokenizer="sentencepiece", data__tokenizer_path=str(model_file))
    train_run(cfg2, str(root / "reuse"), quiet=True)
    assert (root / "reuse" / "tokenizer.model").read_bytes() == model_file.read_bytes()


def test_vocab_is_padded_to_128_and_padding_ids_are_never_sampled(spm_run):
    _, root = spm_run
    run = llm.load(str(root / "run"))
    assert run.tokenizer.vocab_size == 300 and run.model_config.V == 384
    params = jax.tree.map(lambda x: x, run.params)
    # Make the padding ids overwhelmingly likely: a sampler that let them through would pick them.
    params["embed"] = params["embed"].at[300:].set(params["embed"][300:] * 0 + 5.0)
    run.params = params
    texts = run.generate(["The king"] * 8, max_new_tokens=10, temperature=1.0, seed=0)
    assert all(isinstance(t, str) for t in texts)
    from llm.model import sample

    tokens = sample.generate(run.model_config, params, [[5, 6, 7]] * 4, max_new_tokens=10, eos_id=-1, pad_id=0,
                             vocab_limit=300, temperature=1.0, seed=1)
    assert max(max(row) for row in tokens) < 300


def test_document_packing_masks_attention_and_loss_across_documents():
    eos = 2
    stream = np.array([5, 6, 7, eos, 8, 9, eos, 10, 11, 12, 13, 14, eos, 15, eos], np.int32)
    tokens, segments = text_lib.pack_documents(stream, eos, seq_len=7)
    # Rows of 8: [5 6 7 eos 8 9 eos pad], [10 11 12 13 14 eos 15 eos]
    np.testing.assert_array_equal(tokens[0], [5, 6, 7, eos, 8, 9, eos, 0])
    np.testing.assert_array_equal(segments[0], [1, 1, 1, 1, 2, 2, 2, 0])
    batch = next(iter(text_lib.eval_batches(stream, 2, 7, "documents", eos)))
    np.testing.assert_array_equal(batch["weights"][0], [1, 1, 1, 0, 1, 1, 0])  # no target across a boundary or into padding
    np.testing.assert_array_equal(batch["positions"][0], [0, 1, 2, 3, 0, 1, 2])

    cfg = ModelConfig(V=20, D=32, F=64, N=2, H=4, G=2, L=7)
    params = nn.unbox(model.init(cfg, jax.random.key(0)))
    logits, _ = model.apply(cfg, params, jnp.asarray(batch["inputs"]), jnp.asarray(batch["segment_ids"]), jnp.asarray(batch["positions"]))
    changed = batch["inputs"].copy()
    changed[0, :3] = [11, 12, 13]  # rewrite document A
    logits2, _ = model.apply(cfg, params, jnp.asarray(changed), jnp.asarray(batch["segment_ids"]), jnp.asarray(batch["positions"]))
    np.testing.assert_array_equal(np.asarray(logits[0, 4:6]), np.asarray(logits2[0, 4:6]))  # document B unchanged
    assert not np.allclose(logits[0, :3], logits2[0, :3])
    # Document B alone, from position 0, gives the same logits as packed behind A.
    alone, _ = model.apply(cfg, params, jnp.asarray([[8, 9]]))
    np.testing.assert_allclose(np.asarray(alone[0]), np.asarray(logits[0, 4:6]), atol=1e-5)


def test_document_batches_resume_exactly():
    rng = np.random.default_rng(0)
    docs = [np.append(rng.integers(3, 50, rng.integers(5, 40)), 2) for _ in range(100)]
    stream = np.concatenate(docs).astype(np.int32)
    a = text_lib.TrainBatches(stream, 4, 16, seed=1, packing="documents")
    expected = [next(a) for _ in range(60)]
    b = text_lib.TrainBatches(stream, 4, 16, seed=1, packing="documents")
    for _ in range(25):
        next(b)
    c = text_lib.TrainBatches(stream, 4, 16, seed=1, packing="documents")
    c.set_state(b.get_state())
    for want in expected[25:]:
        got = next(c)
        for key in want:
            np.testing.assert_array_equal(got[key], want[key])
    assert a.epoch >= 1  # crossed an epoch boundary
