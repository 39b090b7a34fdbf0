"""Streamed corpora (llm/data/sources.py, llm/data/stream.py): formats, determinism, hosts, resume, eval, bad data."""

import gzip
import json

import numpy as np
import pytest
from conftest import assert_same_batches, cli_overrides, documents, run_cli, streamed, tiny_config, train_run, write_shards

from llm import data
from llm.data import corpus as corpus_lib, stream as stream_lib, text as text_lib, tokenizer

TOK = tokenizer.ByteTokenizer()


def _config(dataset, tmp_path, **kw) -> data.DataConfig:
    return data.DataConfig(dataset=dataset, data_dir=str(tmp_path / "index"), **kw)


def _all_texts(split) -> list[str]:
    return [split[k][0] for k in range(len(split))]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("stream")
    docs = documents(300)
    return write_shards(root / "plain", docs), docs, root


@pytest.mark.parametrize("fmt,key", [("gz", "text"), ("zst", "text"), ("parquet", "text"), ("jsonl", "content"), ("parquet", "content")])
def test_every_shard_format_reads_the_same_documents_in_the_same_order(tmp_path, fmt, key):
    docs = documents(50)
    expected = _all_texts(stream_lib.open_split(_config(write_shards(tmp_path / "plain", docs), tmp_path), "all"))
    assert expected == docs
    dataset = write_shards(tmp_path / fmt, docs, fmt=fmt, key=key)
    assert _all_texts(stream_lib.open_split(_config(dataset, tmp_path, text_key=key), "all")) == docs


def test_a_corpus_of_more_shards_than_open_files_reads_every_document(corpus, tmp_path, monkeypatch):
    from llm.data import sources

    monkeypatch.setattr(sources, "_MAX_OPEN", 1)  # every read of another shard closes the last one
    docs = documents(40)
    split = stream_lib.open_split(_config(write_shards(tmp_path / "many", docs, num_shards=8), tmp_path), "all")
    assert [split[k][0] for k in reversed(range(len(split)))] == docs[::-1]


def test_fsspec_urls_read_like_local_paths(corpus, tmp_path):
    dataset, docs, _ = corpus
    url = dataset.replace("jsonl:", "jsonl:file://")
    assert _all_texts(stream_lib.open_split(_config(url, tmp_path), "all")) == docs


def test_the_hold_out_splits_whole_documents_deterministically(corpus, tmp_path):
    dataset, docs, _ = corpus
    dc = _config(dataset, tmp_path, validation_fraction=0.1, test_fraction=0.05)
    parts = {name: _all_texts(stream_lib.open_split(dc, name)) for name in ("train", "validation", "test")}
    assert [len(p) for p in parts.values()] == [255, 30, 15]
    assert sorted(sum(parts.values(), [])) == sorted(docs)  # disjoint and complete
    assert parts["validation"] == docs[270:]  # the last tenth of every period (here the whole corpus: 300 < 1000)


def test_a_separate_validation_glob_replaces_the_hold_out(corpus, tmp_path):
    dataset, docs, _ = corpus
    other = documents(20, seed=1)
    dc = _config(dataset, tmp_path, validation_dataset=write_shards(tmp_path / "val", other, num_shards=2))
    assert _all_texts(stream_lib.open_split(dc, "validation")) == other
    assert len(stream_lib.open_split(dc, "train")) == len(docs)


def test_every_epoch_is_a_fresh_permutation_of_thedocuments(corpus, tmp_path):
    dataset, docs, _ = corpus
    split = stream_lib.open_split(_config(dataset, tmp_path, validation_fraction=0.0), "train")
    ds = stream_lib.documents(split, TOK, False, seed=0)
    n = len(split)
    epochs = [[TOK.decode(ds[e * n + j][0]) for j in range(n)] for e in range(2)]
    assert sorted(epochs[0]) == sorted(epochs[1]) == sorted(docs)
    assert epochs[0] != epochs[1]
    assert [TOK.decode(stream_lib.documents(split, TOK, False, seed=1)[j][0]) for j in range(n)] != epochs[0]


def _take(split, n, packing="concat", **kw):
    batches = stream_lib.StreamBatches(split, TOK, 8, 32, seed=0, packing=packing, **kw)
    try:
        return [next(batches) for _ in range(n)], batches.get_state()
    finally:
        batches.close()


_same = assert_same_batches


@pytest.mark.parametrize("packing,worker_counts", [("documents", (1, 2)), ("concat", (2,))], ids=["documents", "concat"])
def test_batches_are_identical_for_any_number_of_workers(corpus, tmp_path, packing, worker_counts):
    dataset, _, _ = corpus
    split = stream_lib.open_split(_config(dataset, tmp_path), "train")
    reference, _ = _take(split, 12, packing)
    for workers in worker_counts:
        _same(_take(split, 12, packing, num_workers=workers)[0], reference)


@pytest.mark.parametrize("packing", ["concat", "documents"])
def test_a_restored_position_continues_exactly_across_epochs(corpus, tmp_path, packing):
    dataset, _, _ = corpus
    split = stream_lib.open_split(_config(dataset, tmp_path), "train")
    reference, _ = _take(split, 240, packing)  # 270 documents over 8 lanes: about two epochs
    _, state = _take(split, 100, packing)
    batches = stream_lib.StreamBatches(split, TOK, 8, 32, seed=0, packing=packing)
    batches.set_state(json.loads(json.dumps(state)))  # as the checkpoint stores it
    _same([next(batches) for _ in range(140)], reference[100:])
    assert min(lane[0] for lane in batches.get_state()["lanes"]) >= 1
    batches.close()


def test_each_host_reads_only_its_rows_documents_and_together_they_give_the_global_batch(corpus, tmp_path):
    dataset, docs, _ = corpus
    split = stream_lib.open_split(_config(dataset, tmp_path), "train")
    whole, _ = _take(split, 6)
    halves = [_take(split, 6, rows=rows) for rows in ((0, 4), (4, 8))]
    for b, (low, high) in zip(whole, zip(halves[0][0], halves[1][0])):
        for k in b:
            np.testing.assert_array_equal(np.concatenate([low[k], high[k]]), b[k])
    merged = stream_lib.StreamBatches.merge_states([halves[1][1], halves[0][1]])
    assert merged == _take(split, 6)[1]

    # A host that reads only its own documents never meets a bad record that belongs to another's rows:
    # break lane 5's first document (element 5 of epoch 0's order) and only the host holding row 5 sees it.
    lane_5_first = TOK.decode(stream_lib.documents(split, TOK, False, seed=0)[5][0])
    root = tmp_path / "broken"
    root.mkdir()
    for s in range(3):
        lines = "".join(("{not json" if t == lane_5_first else json.dumps({"text": t})) + "\n" for t in docs[s * 100 : (s + 1) * 100])
        (root / f"shard-{s}.jsonl").write_text(lines)
    bad_split = stream_lib.open_split(_config(f"jsonl:{root}/*.jsonl", tmp_path), "train")
    _take(bad_split, 2, rows=(0, 4))
    with pytest.raises(data.DataError, match=r"shard-\d\.jsonl line \d+: not valid JSON"):
        _take(bad_split, 2, rows=(4, 8))


@pytest.mark.parametrize("packing", ["concat", "documents"])
def test_streamed_eval_scores_exactly_what_the_in_memory_eval_scores(corpus, tmp_path, packing):
    dataset, _, _ = corpus
    dc = _config(dataset, tmp_path, packing=packing)
    split = stream_lib.open_split(dc, "validation")
    stream = text_lib.tokenize(TOK, _all_texts(split))
    streamed = list(corpus_lib.split_eval_batches(dc, "validation", TOK, 4, 32))
    _same(streamed, list(text_lib.eval_batches(stream, 4, 32, packing, TOK.eos_id)))
    if packing == "concat":
        assert sum(b["weights"].sum() for b in streamed) == len(stream) - 1  # every token after the first, once


def test_document_rows_never_attend_or_predict_acrossdocuments(corpus, tmp_path):
    dataset, _, _ = corpus
    batches, _ = _take(stream_lib.open_split(_config(dataset, tmp_path), "train"), 10, "documents")
    for b in batches:
        seg, pos, w, x = b["segment_ids"], b["positions"], b["weights"], b["inputs"]
        starts = np.concatenate([np.ones((len(seg), 1), bool), seg[:, 1:] != seg[:, :-1]], axis=1)
        assert (pos[starts] == 0).all() and (pos[~starts] == pos[:, :-1][~starts[:, 1:]] + 1).all()
        # A weighted target is the next token of the same document: never an eos-to-next-document jump.
        assert ((w == 1) <= (x != TOK.eos_id)).all()
        assert (w[seg == 0] == 0).all()


def _corrupt_parquet(path, docs: list[str], row_group: int) -> None:
    """A Parquet file whose footer reads but one row group's text pages do not: that column chunk's
    first page header is overwritten (a corrupt byte inside a page body often decodes silently)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"id": list(range(len(docs))), "text": docs}), path, row_group_size=7)
    chunk = pq.ParquetFile(path).metadata.row_group(row_group).column(1)
    start = chunk.dictionary_page_offset or chunk.data_page_offset
    raw = bytearray(path.read_bytes())
    raw[start : start + 16] = b"\xff" * 16
    path.write_bytes(bytes(raw))


def _bad_corpus(root, case: str) -> str:
    root.mkdir()
    if case == "corrupt_parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.table({"text": documents(40)}), root / "a.parquet")
        _corrupt_parquet(root / "b.parquet", documents(40, seed=1), row_group=1)
        return f"parquet:{root}/*.parquet"
    good = "".join(json.dumps({"text": t}) + "\n" for t in documents(40))
    (root / "a.jsonl").write_text(good)
    if case == "malformed":
        (root / "b.jsonl").write_text(good + '{"text": "unterminated\n' + good)
    elif case == "missing_key":
        (root / "b.jsonl").write_text(good + json.dumps({"body": "x"}) + "\n")
    elif case == "non_utf8":
        (root / "b.jsonl").write_bytes(good.encode() + b'{"text": "caf\xe9"}\n')
    elif case == "empty_shard":
        (root / "b.jsonl").write_text("")
    elif case == "truncated_gz":
        (root / "b.jsonl.gz").write_bytes(gzip.compress((good * 3).encode())[:-300])
    return f"jsonl:{root}/*.jsonl*"


BAD = {
    "malformed": r"b\.jsonl line 41: not valid JSON",
    "missing_key": r"b\.jsonl line 41: no field 'text' \(data\.text_key\); its fields: body",
    "non_utf8": r"b\.jsonl line 41: not UTF-8",
    "empty_shard": r"b\.jsonl is an empty shard",
    "truncated_gz": r"b\.jsonl\.gz is truncated or corrupt after line \d+",
    "corrupt_parquet": r"b\.parquet row group 1 \(rows 7-13\) is unreadable \(.+\); data\.skip_bad_records=True skips its rows",
}


@pytest.mark.parametrize("case", list(BAD))
def test_a_bad_record_stops_with_its_file_and_record_or_is_skipped_and_counted(tmp_path, case):
    dataset = _bad_corpus(tmp_path / "bad", case)

    def read_all(skip):
        dc = _config(dataset, tmp_path / ("skip" if skip else "strict"), validation_fraction=0.0, skip_bad_records=skip)
        split = stream_lib.open_split(dc, "train")
        batches = stream_lib.StreamBatches(split, TOK, 4, 32, seed=0, num_workers=0, skip_bad=skip)
        try:
            for _ in range(200):  # several epochs: every record is read
                next(batches)
            return batches.skipped
        finally:
            batches.close()

    with pytest.raises(data.DataError, match=BAD[case]):
        read_all(False)
    assert read_all(True) >= (7 if case == "corrupt_parquet" else 1)  # an unreadable row group counts each of its rows


def test_a_split_of_nothing_but_bad_records_stops_with_one_error_instead_of_reading_forever(tmp_path):
    root = tmp_path / "bad"
    root.mkdir()
    (root / "a.jsonl").write_text("".join(json.dumps({"body": f"x{i}"}) + "\n" for i in range(8)))
    split = stream_lib.open_split(_config(f"jsonl:{root}/*.jsonl", tmp_path, validation_fraction=0.0, skip_bad_records=True), "train")
    batches = stream_lib.StreamBatches(split, TOK, 4, 32, seed=0, skip_bad=True)
    try:
        with pytest.raises(data.DataError, match=r"row 0 of the batch read 64 documents in a row without one token"):
            next(batches)
    finally:
        batches.close()


RECORD_LEVEL = ["malformed", "missing_key", "non_utf8"]  # the others stop (or are dropped) while indexing, before any worker


def test_worker_processes_report_every_kind_of_bad_record_as_the_training_process_does(tmp_path):
    from llm.data import sources

    def indexed(case):  # in this process: an indexing pool per corpus would cost more than the test
        corpus = sources.index(_bad_corpus(tmp_path / case, case), str(tmp_path / "index"), "text", workers=1)
        return sources.split(corpus, "all", 0.0, 0.0)

    splits = {case: indexed(case) for case in RECORD_LEVEL}
    datasets = {case: stream_lib.documents(split, TOK, False, seed=None) for case, split in splits.items()}
    reader = stream_lib.Reader(datasets, num_workers=2)  # one pool for every case: a pool costs about a second
    try:
        pending = {case: reader.submit(case, list(range(len(splits[case])))) for case in RECORD_LEVEL}
        for case in RECORD_LEVEL:
            results = stream_lib.Reader.get(pending[case])
            assert [p for _, p in results] == [datasets[case][i][1] for i in range(len(results))]  # as read in-process
            bad = [r for r in results if r[1]]
            assert len(bad) == 1
            with pytest.raises(data.DataError, match=BAD[case]):
                stream_lib._check(bad[0], skip_bad=False)
            assert len(stream_lib._check(bad[0], skip_bad=True)) == 0
    finally:
        reader.close()


def test_a_bad_record_under_the_cli_is_one_error_line_even_from_a_worker_process(tmp_path):
    dataset = _bad_corpus(tmp_path / "bad", "malformed")
    result = run_cli("train", f"--workdir={tmp_path / 'run'}",
                     *cli_overrides(tmp_path / "bad" / "a.jsonl", data__dataset=dataset, data__tokenizer="byte", data__num_workers=2,
                                    data__validation_fraction=0.0, num_train_steps=400, checkpoint_every_steps=1000),
                     timeout=300)
    assert result.returncode == 2, result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "b.jsonl line 41: not valid JSON" in errors[0], result.stderr[-2000:]


def test_a_char_tokenizer_or_random_windows_on_a_streamed_corpus_are_refused_before_anything_runs(corpus, tmp_path):
    dataset, _, _ = corpus
    result = run_cli("train", f"--workdir={tmp_path / 'run'}",
                     *cli_overrides(tmp_path / "x.txt", data__dataset=dataset, data__tokenizer="char", data__sampling="windows"))
    assert result.returncode == 2
    assert "data.tokenizer='char' needs every character" in result.stderr and "data.sampling='windows'" in result.stderr


def test_eval_of_an_out_of_domain_jsonl_glob_scores_every_document(corpus, tmp_path):

    dataset, _, root = corpus
    train_run(tiny_config(root / "x.txt", num_train_steps=2, **streamed(dataset, data__packing="documents")), str(tmp_path / "run"), quiet=True)
    other = documents(30, seed=3)
    result = run_cli("eval", f"--workdir={tmp_path / 'run'}", f"--dataset={write_shards(tmp_path / 'ood', other, num_shards=2)}")
    assert result.returncode == 0, result.stderr[-2000:]
    out = json.loads(result.stdout.strip().splitlines()[-1])
    assert out["split"] == "all"
    expected = text_lib.eval_batches(text_lib.tokenize(TOK, other), 16, 32, "documents", TOK.eos_id)
    assert out["tokens"] == sum(int(b["weights"].sum()) for b in expected)


def _every_bad_kind(root) -> str:
    """A malformed line, a non-UTF-8 record and one without 'text', then 6 good documents of over 65
    tokens (the last held out by a 0.1 hold-out), and an empty shard: the training split is 8 documents."""
    root.mkdir()
    bad = b'{"text": "unterminated\n' + b'{"text": "caf\xe9"}\n' + json.dumps({"body": "x"}).encode() + b"\n"
    good = "".join(json.dumps({"text": (t + " ") * 12}) + "\n" for t in documents(6))
    (root / "a.jsonl").write_bytes(bad + good.encode())
    (root / "b.jsonl").write_text("")
    return f"jsonl:{root}/*.jsonl"


def test_skipped_records_are_counted_in_the_training_metrics(tmp_path):

    dataset = _every_bad_kind(tmp_path / "bad")
    cfg = tiny_config(tmp_path / "x.txt", num_train_steps=2, log_every_steps=1, **streamed(dataset, data__skip_bad_records=True))
    train_run(cfg, str(tmp_path / "run"), quiet=True)
    records = [json.loads(line) for line in open(tmp_path / "run" / "metrics.jsonl")]
    logged = [r["data_skipped_records"] for r in records if "loss" in r]

    # The 8 lanes read the 8 training documents of epoch 0, one each, so every bad one is met; a lane that
    # met one reads its document of the next epoch, and so on, until a good one, which lasts the 2 steps
    # (65 tokens). The empty shard counts once, when indexed.
    split = stream_lib.open_split(data.DataConfig(dataset, data_dir=cfg.data.data_dir, validation_fraction=0.1, skip_bad_records=True), "train")
    assert len(split) == cfg.batch_size == 8
    order = stream_lib.documents(split, TOK, False, cfg.seed)
    expected = 1 + sum(next(e for e in range(100) if not order[e * 8 + r][1]) for r in range(8))
    assert expected >= 4 and logged[-1] == expected and logged == sorted(logged)


def _noise(batch, rng):
    from llm.data import denoise

    return denoise.span_corruption(batch, rng, first_sentinel=200, bos_id=TOK.bos_id, eos_id=TOK.eos_id,
                                   noise_density=0.15, mean_noise_span_length=3.0)


def test_a_denoising_objectives_batches_report_the_skipped_records_of_the_stream_they_wrap(tmp_path):
    from llm.data import denoise

    split = stream_lib.open_split(_config(_every_bad_kind(tmp_path / "bad"), tmp_path, skip_bad_records=True), "train")
    noised = denoise.Noised(stream_lib.StreamBatches(split, TOK, 8, 32, seed=0, skip_bad=True), _noise, seed=0)
    for _ in range(10):
        next(noised)
    assert noised.skipped == noised.batches.skipped > 1 + 3  # the empty shard, and every bad record at least once
    resumed = denoise.Noised(stream_lib.StreamBatches(split, TOK, 8, 32, seed=0, skip_bad=True), _noise, seed=0)
    resumed.set_state(json.loads(json.dumps(noised.merge_states([noised.get_state()]))))
    assert resumed.skipped == noised.skipped
    in_memory = text_lib.TrainBatches(np.arange(1000, dtype=np.int32) % 200, 8, 32, seed=0)
    assert denoise.Noised(in_memory, _noise, seed=0).skipped is None  # so the train loop logs no count for it
    for b in (noised, resumed):
        b.close()


def test_the_skipped_count_is_each_read_once_across_merging_the_hosts_states_and_resuming(tmp_path):
    split = stream_lib.open_split(_config(_every_bad_kind(tmp_path / "bad"), tmp_path, skip_bad_records=True), "train")
    assert split.corpus.skipped == 1  # the empty shard, which every host indexes

    def host(rows, state=None):
        batches = stream_lib.StreamBatches(split, TOK, 8, 32, seed=0, rows=rows, skip_bad=True)
        if state is not None:
            batches.set_state(state)
        return batches

    hosts = [host((0, 4)), host((4, 8))]
    whole = host(None)
    for _ in range(30):  # several epochs: each lane meets bad records again
        for b in (*hosts, whole):
            next(b)
    before = [b.skipped for b in hosts]
    assert sum(before) >= 2 + 3  # the empty shard on each host; the lanes together read all 8 documents of epoch 0
    # A bad record is read by exactly one lane, so the hosts together read what one host reading every lane does.
    assert whole.skipped == sum(before) - split.corpus.skipped
    merged = json.loads(json.dumps(stream_lib.StreamBatches.merge_states([b.get_state() for b in hosts])))  # as the checkpoint stores it
    resumed = [host(rows, merged) for rows in ((0, 4), (4, 8))]
    assert [b.skipped for b in resumed] == before
    one_host = host(None, merged)
    assert one_host.skipped == whole.skipped
    for b in (*hosts, whole, *resumed, one_host):
        b.close()


def test_a_sweep_estimates_a_streamed_splits_tokens_from_its_first_documents(corpus, tmp_path):
    dataset, _, _ = corpus
    dc = _config(dataset, tmp_path)
    exact = len(text_lib.tokenize(TOK, _all_texts(stream_lib.open_split(dc, "validation"))))
    assert 0.7 * exact < corpus_lib.num_tokens(dc, "validation", TOK) < 1.3 * exact


def test_ctrl_c_to_the_whole_process_group_stops_a_run_with_workers_cleanly_at_a_checkpoint(corpus, tmp_path):
    import os
    import signal
    import subprocess
    import sys
    import time

    from conftest import REPO

    from llm.training import checkpoint, guard

    dataset, _, root = corpus
    workdir = tmp_path / "run"
    command = [sys.executable, "-m", "llm.cli", "train", f"--workdir={workdir}",
               *cli_overrides(root / "x.txt", num_train_steps=100000, checkpoint_every_steps=10, **streamed(dataset, data__num_workers=2))]
    # A terminal's Ctrl-C reaches every process of the foreground group: the run's and its workers'.
    proc = subprocess.Popen(command, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, start_new_session=True)
    deadline = time.time() + 240
    while not (workdir / "checkpoints" / "10").exists():
        assert proc.poll() is None and time.time() < deadline
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGINT)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == guard.EXIT_INTERRUPTED, stderr[-2000:]
    assert "Traceback" not in stderr and "worker" not in stderr
    stopped = int(stderr.split("stopped at step ")[1].split()[0])
    assert checkpoint.latest_step(str(workdir)) == stopped >= 10
