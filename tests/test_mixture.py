"""Mixtures of domains (data.mixture, llm/data/mixture.py): rows drawn at the weights, the same for any worker
or host count, resumable; per-domain eval; bad weights; the sweep's per-domain and task columns; and the
offline corpus builder (experiments/scaling/build_corpus.py). The SIGKILL resume of a mixture run is
tests/test_resume.py's streamed run."""

import dataclasses
import importlib.util
import json
import random

import numpy as np
import pytest
from conftest import REPO, assert_same_batches, cli_overrides, documents, run_cli, streamed, tiny_config, train_run, write_domain_shards

import llm
from llm import spec
from llm.data import DataConfig, corpus as corpus_lib, mixture, sources, tokenizer
from llm.scaling import points as points_lib, sweep

TOK = tokenizer.ByteTokenizer()
DIGITS = set(TOK.encode("0123456789").tolist())


def _numbers(n: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(str(rng.randint(0, 999)) for _ in range(rng.randint(2, 30))) for _ in range(n)]


@pytest.fixture(scope="module")
def two_domains(tmp_path_factory):
    """'words' (letters only) and 'numbers' (digits only): a row's tokens say which domain it came from."""
    root = tmp_path_factory.mktemp("mixture")
    dataset = write_domain_shards(root / "shards", {"words": documents(200), "numbers": _numbers(120, seed=1)}, num_shards=1)
    return DataConfig(dataset=dataset, data_dir=str(root / "index"), mixture="words=0.7,numbers=0.3"), root


def _take(dc: DataConfig, n: int, rows=None, state=None):
    batches = mixture.MixtureBatches(dc, TOK, 8, 32, seed=0, rows=rows)
    try:
        if state is not None:
            batches.set_state(json.loads(json.dumps(state)))  # as a checkpoint stores it
        return [next(batches) for _ in range(n)], batches.get_state()
    finally:
        batches.close()


_same = assert_same_batches


def test_mixture_rows_follow_the_weights_and_are_the_same_for_any_number_of_workers(two_domains):
    dc, _ = two_domains
    batches, _ = _take(dc, 150)
    # 1200 rows at weight 0.3: the standard error of the fraction is 0.013.
    assert abs(np.mean([bool(DIGITS & set(row.tolist())) for b in batches for row in b["inputs"]]) - 0.3) < 0.045
    _same(_take(dataclasses.replace(dc, num_workers=1), 30)[0], batches[:30])  # one reader serves both domains
    other, _ = _take(dataclasses.replace(dc, mixture="words=0.2,numbers=0.8"), 100)
    assert abs(np.mean([bool(DIGITS & set(row.tolist())) for b in other for row in b["inputs"]]) - 0.8) < 0.05


def test_a_restored_mixture_position_continues_exactly_and_hosts_rows_make_the_global_batch(two_domains):
    dc, _ = two_domains
    reference, _ = _take(dc, 60)  # the numbers domain's 108 training documents over 8 lanes: past an epoch
    _, state = _take(dc, 25)
    _same(_take(dc, 35, state=state)[0], reference[25:])
    halves = [_take(dc, 6, rows=rows) for rows in ((0, 4), (4, 8))]
    for whole, low, high in zip(reference, halves[0][0], halves[1][0]):
        for k in whole:
            np.testing.assert_array_equal(np.concatenate([low[k], high[k]]), whole[k])
    assert mixture.MixtureBatches.merge_states([halves[1][1], halves[0][1]]) == _take(dc, 6)[1]


def test_domains_by_glob_draw_the_same_rows_as_the_same_domains_by_field(two_domains, tmp_path):
    dc, _ = two_domains
    for name in ("words", "numbers"):  # each domain's records, in corpus order, as a file of its own
        records = [line for line in open(dc.dataset.removeprefix("jsonl:").replace("*", "shard-000")) if json.loads(line)["domain"] == name]
        (tmp_path / f"{name}.jsonl").write_text("".join(records))
    by_glob = f"words=0.7@jsonl:{tmp_path}/words.jsonl,numbers=0.3@jsonl:{tmp_path}/numbers.jsonl"
    _same(_take(dataclasses.replace(dc, mixture=by_glob), 20)[0], _take(dc, 20)[0])


def test_a_mixture_splits_each_domain_and_counts_the_tokens_before_any_domain_repeats(two_domains):
    dc, _ = two_domains
    words, numbers = (mixture.Domain(n, 1.0) for n in ("words", "numbers"))
    assert len(mixture.domain_split(dc, words, "train")) == 180 and len(mixture.domain_split(dc, words, "validation")) == 20
    assert len(mixture.domain_split(dc, numbers, "all")) == 120
    # numbers, at a share of 0.3, runs out first: 10 / 3 of its training tokens.
    alone = corpus_lib.num_tokens(dataclasses.replace(dc, mixture="numbers=1"), "train", TOK)
    assert corpus_lib.num_tokens(dc, "train", TOK) == pytest.approx(alone / 0.3, rel=0.01)


def test_per_domain_eval_equals_eval_of_each_domain_alone(tmp_path):
    val = tmp_path / "val"
    val.mkdir()
    for name, docs in {"words": documents(20, seed=5), "numbers": _numbers(15, seed=6)}.items():
        (val / f"{name}.jsonl").write_text("".join(json.dumps({"text": t, "domain": name}) + "\n" for t in docs))
    dataset = write_domain_shards(tmp_path / "train", {"words": documents(60), "numbers": _numbers(60, seed=1)}, num_shards=1)
    for name in ("words", "numbers"):  # indexed one by one, so that the glob's index starts no process pool
        sources.index(f"jsonl:{val}/{name}.jsonl", str(tmp_path / "tfds"), "text")
    cfg = tiny_config(tmp_path / "x.txt", num_train_steps=4, eval_every_steps=4, checkpoint_every_steps=4,
                      **streamed(dataset, data__mixture="words=0.5,numbers=0.5", data__validation_dataset=f"jsonl:{val}/*.jsonl"))
    summary = train_run(cfg, tmp_path / "run", quiet=True)
    run = llm.load(str(tmp_path / "run"))
    result = run.evaluate()  # what `./run.sh eval` prints
    for name in ("words", "numbers"):
        alone = run.evaluate(dataset=f"jsonl:{val}/{name}.jsonl")  # what `eval --dataset=` prints
        assert result["domains"][name] == {k: alone[k] for k in ("tokens", "bytes", "loss", "perplexity", "bits_per_byte")}
        assert summary[f"eval_loss_{name}"] == pytest.approx(alone["loss"], rel=1e-5)
        assert summary[f"eval_bits_per_byte_{name}"] == pytest.approx(alone["bits_per_byte"], rel=1e-5)
    domains = result["domains"].values()
    assert result["tokens"] == sum(d["tokens"] for d in domains)
    assert result["loss"] == pytest.approx(sum(d["loss"] * d["tokens"] for d in domains) / result["tokens"], rel=1e-12)


@pytest.mark.parametrize("weights,message", [
    ("words=0.5,numbers=-0.5", "domain 'numbers' has weight -0.5; weights must be finite and >= 0"),
    ("words=0,numbers=0", "every weight is 0"),
    ("words=0.5,numbers", "'numbers' is not NAME=WEIGHT"),
    ("words=1,words=2", "domain 'words' is named twice"),
])
def test_bad_mixture_weights_are_a_config_error(two_domains, weights, message):
    dc, root = two_domains
    cfg = tiny_config(root / "x.txt", **streamed(dc.dataset, data__mixture=weights))
    with pytest.raises(spec.ConfigError, match=message):
        spec.from_config(cfg)


def test_an_unknown_domain_is_one_error_line_before_anything_compiles(two_domains, tmp_path):
    """(A bad weight is a ConfigError, above: the CLI prints every ConfigError as one error, tests/test_cli.py.)"""
    dc, root = two_domains
    done = run_cli("train", f"--workdir={tmp_path / 'run'}", *cli_overrides(root / "x.txt", **streamed(dc.dataset, data__mixture="words=1,poetry=1")))
    assert done.returncode == 2, done.stderr[-2000:]
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert lines[-1].startswith("error: data.mixture: no record of") and "has 'domain' (data.domain_key) = 'poetry'" in lines[-1]
    assert "its domains: numbers, words" in lines[-1]
    assert sum(line.startswith("error") for line in lines) == 1 and "Traceback" not in done.stderr
    assert "model:" not in done.stderr  # printed once the run is built, before its first compile


def test_sweep_rows_carry_per_domain_and_task_columns_after_the_issue_columns(tmp_path):
    cfg = tiny_config(tmp_path / "x.txt")
    point = points_lib.Point("p0", cfg, budget=1e9, params=1000, non_embedding_params=900, flops_per_token=6000, tokens=1000, tokens_6n=1000)
    summary = {"loss": 2.0, "eval_loss": 1.5, "eval_bits_per_byte": 2.2, "eval_loss_words": 1.4, "eval_bits_per_byte_words": 2.0,
               "eval_loss_numbers": 1.7, "eval_bits_per_byte_numbers": 2.5, "eval_acc_next_line": 0.25, "eval_acc_norm_next_line": 0.5}
    row = sweep._row(point, summary, str(tmp_path), 1.0)
    sweep._append_row(str(tmp_path), row)
    sweep._append_row(str(tmp_path), {**row, "name": "p1"})
    header, *rows = [line.split(",") for line in (tmp_path / sweep.RESULTS).read_text().splitlines()]
    assert tuple(header[:len(sweep.COLUMNS)]) == sweep.COLUMNS
    assert header[len(sweep.COLUMNS):] == ["eval_loss_words", "bits_per_byte_words", "eval_loss_numbers", "bits_per_byte_numbers",
                                           "acc_next_line", "acc_norm_next_line"]
    assert [r[header.index("eval_loss_numbers")] for r in rows] == ["1.700000", "1.700000"]
    assert sweep.finished_names(str(tmp_path)) == {"p0", "p1"}
    (tmp_path / sweep.RESULTS).write_text(",".join([*sweep.COLUMNS, "colour"]) + "\n")
    with pytest.raises(spec.ConfigError, match="columns"):
        sweep.finished_names(str(tmp_path))


def _builder():
    spec_ = importlib.util.spec_from_file_location("build_corpus", REPO / "experiments" / "scaling" / "build_corpus.py")
    module = importlib.util.module_from_spec(spec_)
    spec_.loader.exec_module(module)
    return module


def test_the_deduplicator_drops_exact_and_near_duplicates_and_repeated_long_lines():
    build = _builder()
    rng = random.Random(0)
    words = lambda n: " ".join(rng.choice(["alpha", "beta", "gamma", "delta", "omega", "sigma", "tau", "rho"]) + str(rng.randint(0, 99))
                               for _ in range(n))
    boiler = "This file is distributed under the same licence as the package itself, see COPYING."
    first, other = words(400), words(400)
    near = first.split()
    near[200] = "changed"
    d = build.Deduplicator()
    assert d.keep(boiler + "\n" + first) is not None
    assert d.keep("  ".join((boiler + "\n" + first).split(" "))) is None  # the same words, other whitespace
    assert d.keep(" ".join(near)) is None
    kept = d.keep(boiler + "\n" + other)
    assert kept == other  # the licence line an earlier document had is gone
    assert d.dropped == {"exact": 1, "near": 1, "short": 0, "lines": 1}


def test_the_corpus_builder_writes_domain_shards_and_a_manifest_a_mixture_reads(tmp_path):
    manifest = _builder().build(str(tmp_path / "corpus"), max_docs_per_source=3, log=lambda *_: None)
    assert set(manifest["domains"]) == {"shakespeare", "code", "docs"}
    assert all(s["licence"] for s in manifest["sources"])
    records = [json.loads(line) for path in sorted((tmp_path / "corpus").glob("*.jsonl")) for line in path.read_text().splitlines()]
    assert {r["domain"] for r in records} == set(manifest["domains"])
    for name, d in manifest["domains"].items():
        texts = [r["text"] for r in records if r["domain"] == name]
        assert len(texts) == d["documents"] and d["byte_tokens"] == sum(len(t.encode()) + 1 for t in texts)
    assert len({r["text"] for r in records}) == len(records)
    dc = DataConfig(dataset=f"jsonl:{tmp_path / 'corpus'}/*.jsonl", data_dir=str(tmp_path / "index"), mixture="code=1,docs=1")
    assert len(mixture.domain_split(dc, mixture.Domain("code", 1.0), "all")) == manifest["domains"]["code"]["documents"]
