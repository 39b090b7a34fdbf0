"""Downstream evaluation through lm_eval: the adapter's log-likelihoods are the model's, and the tasks'
metrics are those a direct scoring of their documents gives."""

import json
import os

import jax
import numpy as np
import pytest
from conftest import run_cli, tiny_config, train_run, write_corpus

import llm
from llm import model
from llm.interop import harness
from llm.training import evaluate

pytest.importorskip("lm_eval", reason="the harness extra (pip install -e '.[harness]') is not installed")

NEXT_LINE = os.path.join(harness.TASKS_DIR, "shakespeare_next_line", "next_line.jsonl")


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A byte-tokenizer run with a 32-token context, so that most documents must be cut to fit."""
    root = tmp_path_factory.mktemp("harness")
    workdir = root / "run"
    train_run(tiny_config(write_corpus(root / "corpus.txt", 20_000), num_train_steps=30, data__tokenizer="byte",
                            opt__learning_rate=1e-2), str(workdir), quiet=True)
    return llm.load(str(workdir))


def _logprobs(run, inputs: list[int]) -> np.ndarray:
    """log p(next | prefix) at every position of one unpadded row: the reference."""
    logits_1xLxV = model.apply(run.model_config, run.params, np.asarray([inputs], np.int32))[0]
    return np.asarray(jax.nn.log_softmax(logits_1xLxV.astype(np.float32), axis=-1))[0]


def _reference(run, context: list[int], continuation: list[int]) -> tuple[float, bool]:
    full = ((context or [run.tokenizer.eos_id]) + continuation)[-(run.context + 1):]
    logprobs_LxV = _logprobs(run, full[:-1])
    scored = range(max(0, len(full) - 1 - len(continuation)), len(full) - 1)  # a continuation too long to fit loses its start
    greedy = all(np.argmax(logprobs_LxV[i, :run.tokenizer.vocab_size]) == full[i + 1] for i in scored)
    return float(sum(logprobs_LxV[i, full[i + 1]] for i in scored)), greedy


def test_loglikelihoods_are_the_models_in_any_batch_and_with_contexts_cut_to_fit(run):
    encode = lambda s: run.tokenizer.encode(s).tolist()
    pairs = [(encode("Good night, sweet"), encode(" lady.")), ([], encode("The king")),
             (encode("The queen hath a crown and a sword, my lord; the king hath thee"), encode(" and my heart.")),
             (encode("Love"), encode(" death")), (encode("x" * 100), encode("y" * 40))]  # the last is longer than the context
    lm = harness.adapter(run, batch_size=2)  # batches of 2, 2 and a padded 1
    got = lm.score(pairs)
    for (context, continuation), (logp, greedy) in zip(pairs, got):
        want_logp, want_greedy = _reference(run, context, continuation)
        np.testing.assert_allclose(logp, want_logp, rtol=1e-4, atol=1e-4)
        assert greedy == want_greedy
    assert len({round(lp, 3) for lp, _ in got}) == len(pairs)  # the rows are not mixed up


def test_rolling_loglikelihood_scores_every_token_once_with_the_longest_context_that_fits(run):
    tokens = run.tokenizer.encode("The queen hath a crown and a sword, my lord; the king hath thee and my heart. " * 2).tolist()
    L, n = run.context, len(tokens)
    assert n > 2 * L
    stream = [run.tokenizer.eos_id] + tokens  # stream[j] predicts tokens[j]
    want = 0.0
    for start in range(0, n, L):  # the tokens [start, end) are predicted from the L tokens before end
        end = min(start + L, n)
        first = max(0, end - L)
        logprobs_LxV = _logprobs(run, stream[first:end])
        want += sum(logprobs_LxV[j - first, tokens[j]] for j in range(start, end))

    class Request:
        args = (run.tokenizer.decode(tokens),)

    [got] = harness.adapter(run, batch_size=4).loglikelihood_rolling([Request()])
    np.testing.assert_allclose(got, want, rtol=1e-4)


def test_rolling_loglikelihood_is_minus_our_evals_summed_loss_on_the_same_tokens(run):
    L, eos = run.context, run.tokenizer.eos_id
    text = run.tokenizer.decode(run.tokenizer.encode("The queen hath a crown and a sword, my lord; the king hath thee. " * 2)[:2 * L])
    tokens = run.tokenizer.encode(text).tolist()
    assert len(tokens) == 2 * L
    # Two full windows: the eval's rows of L inputs and the L tokens after them, each token a target
    # once, are exactly the harness's disjoint windows after its eos prefix.
    stream = np.asarray([eos] + tokens, np.int32)
    batch = {"inputs": stream[:-1].reshape(2, L), "targets": stream[1:].reshape(2, L), "weights": np.ones((2, L), np.float32)}
    loss_sum, num_tokens = jax.jit(evaluate.make_eval_step(run.model_config))(run.params, batch)
    assert int(num_tokens) == 2 * L

    class Request:
        args = (text,)

    [got] = harness.adapter(run, batch_size=4).loglikelihood_rolling([Request()])
    np.testing.assert_allclose(got, -float(loss_sum), rtol=1e-4)


def test_eval_tasks_reports_the_accuracy_a_direct_scoring_of_the_choices_gives(run):
    limit = 12
    done = run_cli("eval", f"--workdir={run.workdir}", "--tasks=shakespeare_next_line", f"--limit={limit}", timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    metrics = json.loads(done.stdout.strip().splitlines()[-1])
    assert metrics["step"] == 30
    got = metrics["tasks"]["shakespeare_next_line"]

    encode = lambda s: run.tokenizer.encode(s).tolist()
    acc = acc_norm = 0
    for line in open(NEXT_LINE).readlines()[:limit]:
        item = json.loads(line)
        logps = [_reference(run, encode(item["passage"] + "\n"), encode(choice))[0] for choice in item["choices"]]
        acc += int(np.argmax(logps)) == item["label"]
        # lm_eval's acc_norm divides by the choice's length in characters.
        acc_norm += int(np.argmax([lp / len(c) for lp, c in zip(logps, item["choices"])])) == item["label"]
    assert got["acc,none"] == pytest.approx(acc / limit)
    assert got["acc_norm,none"] == pytest.approx(acc_norm / limit)


def test_hellaswag_and_lambada_run_from_local_files(run, tmp_path, monkeypatch):
    rows = [{"activity_label": "Baking", "ctx_a": "A man puts flour in a bowl.", "ctx_b": "he", "label": i % 4,
             "endings": ["adds eggs.", "sings [title] a song.", "pours water in.", "leaves the kitchen."]} for i in range(3)]
    texts = ["the king hath a crown and a sword", "good night sweet lady", "my heart is thine"]
    (tmp_path / "hellaswag_val.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "lambada_test.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    monkeypatch.setenv("LLM_HELLASWAG", str(tmp_path / "hellaswag_val.jsonl"))
    monkeypatch.setenv("LLM_LAMBADA", str(tmp_path / "lambada_test.jsonl"))

    got = harness.evaluate(run, ["hellaswag_local", "lambada_local"])["tasks"]

    encode = lambda s: run.tokenizer.encode(s).tolist()
    # The cleaning drops WikiHow's bracketed markup, as lm_eval's hellaswag does.
    choices = ["adds eggs.", "sings. a song.", "pours water in.", "leaves the kitchen."]
    logps = [_reference(run, encode("Baking: A man puts flour in a bowl. He"), encode(" " + c))[0] for c in choices]
    assert got["hellaswag_local"]["acc,none"] == pytest.approx(np.mean([int(np.argmax(logps)) == r["label"] for r in rows]))
    scored = [_reference(run, encode(t.rsplit(" ", 1)[0]), encode(" " + t.rsplit(" ", 1)[1])) for t in texts]
    assert got["lambada_local"]["perplexity,none"] == pytest.approx(np.exp(-np.mean([lp for lp, _ in scored])), rel=1e-4)
    assert got["lambada_local"]["acc,none"] == pytest.approx(np.mean([g for _, g in scored]))


def test_an_unknown_task_or_a_missing_file_is_one_clear_error(run):
    done = run_cli("eval", f"--workdir={run.workdir}", "--tasks=shakespeare_next_line,no_such_task")
    assert done.returncode == 2 and "error: unknown task(s) no_such_task" in done.stderr, done.stderr[-2000:]
    done = run_cli("eval", f"--workdir={run.workdir}", "--tasks=lambada_local", env={"LLM_LAMBADA": ""})
    assert done.returncode == 2 and "error: LLM_LAMBADA must name LAMBADA's test JSONL" in done.stderr, done.stderr[-2000:]
    assert "Traceback" not in done.stderr


def test_eval_tasks_in_training_log_the_accuracy_eval_tasks_gives_on_the_same_params(tmp_path):
    cfg = tiny_config(write_corpus(tmp_path / "corpus.txt", 6000), num_train_steps=2, eval_every_steps=2, checkpoint_every_steps=2,
                      data__tokenizer="byte", eval_tasks="shakespeare_next_line", eval_tasks_limit=4)
    summary = train_run(cfg, tmp_path / "run", quiet=True)
    logged = [json.loads(line) for line in open(tmp_path / "run" / "metrics.jsonl") if "eval_loss" in line]
    assert logged[-1]["eval_acc_shakespeare_next_line"] == summary["eval_acc_shakespeare_next_line"]
    got = harness.evaluate(llm.load(str(tmp_path / "run")), ["shakespeare_next_line"], limit=4)["tasks"]["shakespeare_next_line"]
    assert summary["eval_acc_shakespeare_next_line"] == pytest.approx(got["acc,none"])
    assert summary["eval_acc_norm_shakespeare_next_line"] == pytest.approx(got["acc_norm,none"])
