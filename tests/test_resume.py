"""A run killed (SIGKILL) or stopped (SIGINT, then SIGTERM during its save) resumes to the params and
losses of the run that was never interrupted: for every objective (lm on SFT data, reward, dpo, grpo),
every arch (encoder, encoder-decoder) and a streamed mixture of two domains read by a data worker.

One fixture serves them all. A fresh process trains the uninterrupted twins (tests/resume_twins.py:
no state an earlier test left in this pytest worker can change their programs) while the streamed
run's twin, a CLI run, runs beside it; they leave their compiled programs in the suite's compilation
cache. Then every interrupted run is a real CLI process; they start at once, each is SIGKILLed as soon
as its checkpoint of step 3 exists, and all resume at once: the processes' start-up overlaps instead of
queueing.
"""

import glob
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time

import jax
import numpy as np
import pytest
from conftest import (
    REPO,
    cli_overrides,
    documents,
    kill_at_checkpoint_and_resume,
    objective_overrides,
    posttrain_sets,
    streamed,
    tiny_config,
    write_corpus,
    write_domain_shards,
)

import llm
from llm import model, spec
from llm.model import heads, sample
from llm.training import checkpoint, guard

STEPS = 12  # checkpoints every 3 steps; a run is killed once its step-3 checkpoint exists
STREAMED_STEPS = 150  # the streamed run: long enough for a signal to land after step 20 and well before the end
OBJECTIVES = ("lm", "reward", "dpo", "grpo")
ARCHS = ("encoder", "encoder_decoder")


def _logged(workdir) -> dict[int, dict]:
    return {r["step"]: r for r in map(json.loads, open(os.path.join(workdir, "metrics.jsonl"))) if "loss" in r}


def _command(workdir, overrides: list[str]) -> list[str]:
    return [sys.executable, "-m", "llm.cli", "train", f"--workdir={workdir}", *overrides]


def _variants(sets, corpus) -> dict[str, tuple[dict, list[str]]]:
    """name -> (the uninterrupted run's tiny_config overrides, the interrupted CLI run's flags), both on
    JAX's one CPU device (mesh.cpu_devices=0)."""
    out = {}
    for objective in OBJECTIVES:
        overrides = objective_overrides(sets, objective, STEPS)
        out[objective] = ({"corpus": str(sets["corpus"]), **overrides}, cli_overrides(sets["corpus"], mesh__cpu_devices=0, **overrides))
    for arch in ARCHS:  # seq2seq batches resume exactly too: tests/test_seq2seq.py
        overrides = dict(num_train_steps=STEPS, checkpoint_every_steps=3, log_every_steps=1, opt__schedule="constant", model__arch=arch)
        out[arch] = ({"corpus": str(corpus), **overrides}, cli_overrides(corpus, mesh__cpu_devices=0, **overrides))
    return out


def _streamed_command(root):
    """The streamed CLI run: a sharded JSONL corpus of two domains mixed 0.7 / 0.3 (data.mixture) through a
    data worker, document packing, per-domain evals; its uninterrupted twin is a CLI run too, so that both
    see the same devices (the CLI splits the cores)."""
    shards = write_domain_shards(root / "shards", {"verse": documents(150), "prose": documents(150, seed=1)})
    overrides = dict(num_train_steps=STREAMED_STEPS, checkpoint_every_steps=10, keep_checkpoints=2, log_every_steps=10,
                     eval_every_steps=50, **streamed(shards, data__num_workers=1, data__packing="documents",
                                                     data__mixture="verse=0.7,prose=0.3"))
    corpus = root / "corpus.txt"  # only places data.data_dir (the shards' index) beside it
    return lambda workdir: _command(workdir, cli_overrides(corpus, **overrides))


class _Killer(threading.Thread):
    """SIGKILLs each process once its checkpoint `step` exists."""

    def __init__(self, procs: dict, workdirs: dict, steps: dict):
        super().__init__(daemon=True)
        self.procs, self.workdirs, self.steps = procs, workdirs, steps

    def run(self):
        waiting = set(self.procs)
        deadline = time.time() + 600
        while waiting and time.time() < deadline:
            for name in sorted(waiting):
                proc = self.procs[name]
                if proc.poll() is not None or (self.workdirs[name] / "checkpoints" / str(self.steps[name])).exists():
                    proc.send_signal(signal.SIGKILL)
                    proc.wait()
                    waiting.discard(name)
            time.sleep(0.01)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """name -> {"straight", "killed": workdirs, "summary": the uninterrupted run's, "killed_at", "resumed":
    the resumed CLI run}; "streamed" also has "command" and "reference" (its uninterrupted CLI run)."""
    root = tmp_path_factory.mktemp("resume")
    (root / "sets").mkdir()
    sets = posttrain_sets(root / "sets")
    corpus = write_corpus(root / "corpus.txt")
    variants = _variants(sets, corpus)
    streamed_command = _streamed_command(root)
    out = {name: {"straight": root / name / "straight", "killed": root / name / "killed"} for name in [*variants, "streamed"]}
    out["streamed"].update(command=streamed_command, reference=root / "streamed" / "reference")
    commands = {name: _command(out[name]["killed"], flags) for name, (_, flags) in variants.items()}
    commands["streamed"] = streamed_command(out["streamed"]["killed"])
    reference = subprocess.Popen(streamed_command(out["streamed"]["reference"]), cwd=REPO, stdout=subprocess.DEVNULL,
                                 stderr=subprocess.PIPE, text=True)
    twins = {name: {"corpus": overrides.pop("corpus"), "workdir": str(out[name]["straight"]),
                    "overrides": {**overrides, "eval_every_steps": STEPS}}  # an eval at the end changes no params
             for name, (overrides, _) in variants.items()}
    (root / "twins.json").write_text(json.dumps(twins))
    trained = subprocess.run([sys.executable, "tests/resume_twins.py", str(root / "twins.json")], cwd=REPO, capture_output=True,
                             text=True, timeout=600)
    assert trained.returncode == 0, trained.stderr[-3000:]
    for name, summary in json.loads(trained.stdout.strip().splitlines()[-1]).items():
        out[name]["summary"] = summary
    assert reference.wait(timeout=600) == 0, reference.stderr.read()[-2000:]
    procs = {name: subprocess.Popen(c, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL) for name, c in commands.items()}
    killer = _Killer(procs, {name: out[name]["killed"] for name in procs}, {name: 20 if name == "streamed" else 3 for name in procs})
    killer.start()
    killer.join()
    final = {name: STREAMED_STEPS if name == "streamed" else STEPS for name in commands}
    for name in commands:
        out[name]["killed_at"] = checkpoint.latest_step(str(out[name]["killed"]))
        if out[name]["killed_at"] is None or out[name]["killed_at"] >= final[name]:
            # It finished before its kill landed (a loaded machine is slow to poll): interrupt it again, alone.
            subprocess.run(["rm", "-rf", str(out[name]["killed"])], check=True)
            step = 20 if name == "streamed" else 3
            out[name]["killed_at"], out[name]["resumed"] = kill_at_checkpoint_and_resume(commands[name], out[name]["killed"], step)
    resumes = {name: subprocess.Popen(c, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
               for name, c in commands.items() if "resumed" not in out[name]}
    for name, proc in resumes.items():
        _, stderr = proc.communicate(timeout=600)
        out[name]["resumed"] = subprocess.CompletedProcess(proc.args, proc.returncode, "", stderr)
    return out


def _check_span_corruption_run(run, cfg, summary):
    """Sentinels take the ids after the tokenizer's; the decoder's length is derived from seq_len."""
    raw, target_len, sentinels = spec.span_lengths(cfg.seq_len, cfg.data.noise_density, cfg.data.mean_noise_span_length)
    assert run.model_config.T == target_len and run.model_config.E == cfg.model.num_layers
    assert run.model_config.V >= run.tokenizer.vocab_size + sentinels
    assert np.isfinite(summary["eval_loss"]) and summary["flops_per_token"] == model.flops_per_token(run.model_config)
    assert run.evaluate()["loss"] == pytest.approx(summary["eval_loss"], rel=1e-6)
    with pytest.raises(sample.SampleError, match="does not continue prompts"):
        run.generate("The king")


def _resumed_like_the_uninterrupted_run(r) -> tuple:
    killed_at, result, killed = r["killed_at"], r["resumed"], r["killed"]
    assert 3 <= killed_at < STEPS
    assert result.returncode == 0 and f"resuming {killed} from step {killed_at}" in result.stderr, result.stderr[-2000:]
    a, b = llm.load(str(r["straight"])), llm.load(str(killed))
    jax.tree.map(np.testing.assert_array_equal, a.params, b.params)
    return a, b


@pytest.mark.parametrize("objective", OBJECTIVES)
def test_a_sigkilled_run_of_each_objective_resumes_to_the_params_and_losses_of_an_uninterrupted_one(runs, objective):
    r = runs[objective]
    a, b = _resumed_like_the_uninterrupted_run(r)
    assert a.step == b.step == STEPS
    # Each step after the resume saw the uninterrupted run's batch (for GRPO: sampled the same answers).
    before, after = _logged(r["straight"]), {s: x for s, x in _logged(r["killed"]).items() if s > r["killed_at"]}
    keys = ("loss", "reward", "answer_length", "kl") if objective == "grpo" else ("loss",)
    assert after and all(before[s][k] == x[k] for s, x in after.items() for k in keys)
    logged = {"lm": {"eval_loss", "eval_perplexity"}, "reward": {"eval_loss", "eval_accuracy", "eval_margin"},
              "dpo": {"eval_loss", "eval_accuracy", "eval_margin", "eval_chosen_reward", "eval_rejected_reward"},
              "grpo": {"kl", "entropy", "answer_length", "reward", "reward_std", "eval_reward", "eval_answer_length"}}[objective]
    assert logged <= set(r["summary"])
    if objective == "reward":
        assert heads.REWARD_HEAD in a.params
        assert set(a.evaluate()) >= {"accuracy", "pairs", "loss"}


@pytest.mark.parametrize("arch", ARCHS)
def test_a_sigkilled_run_of_each_arch_resumes_to_the_params_and_losses_of_an_uninterrupted_one(runs, arch, tmp_path):
    r = runs[arch]
    a, _ = _resumed_like_the_uninterrupted_run(r)
    before, after = _logged(r["straight"]), {s: x for s, x in _logged(r["killed"]).items() if s > r["killed_at"]}
    assert after and all(before[s]["loss"] == x["loss"] for s, x in after.items())
    if arch == "encoder_decoder":
        cfg = tiny_config(tmp_path / "unread.txt", num_train_steps=STEPS, model__arch=arch)
        _check_span_corruption_run(a, cfg, r["summary"])


def test_killed_streamed_mixture_run_resumes_to_bit_identical_params_and_per_domain_evals(runs):
    r = runs["streamed"]
    assert 20 <= r["killed_at"] < STREAMED_STEPS
    assert r["resumed"].returncode == 0, r["resumed"].stderr[-2000:]
    assert f"resuming {r['killed']} from step {r['killed_at']}" in r["resumed"].stderr
    jax.tree.map(np.testing.assert_array_equal, llm.load(str(r["killed"])).params, llm.load(str(r["reference"])).params)
    evals = lambda w: [x for x in map(json.loads, open(os.path.join(w, "metrics.jsonl"))) if "eval_loss_verse" in x]
    assert [e["eval_loss_prose"] for e in evals(r["killed"])][-1] == [e["eval_loss_prose"] for e in evals(r["reference"])][-1]


def _wait_for_line(path, pattern: str, proc: subprocess.Popen, timeout: float = 60) -> re.Match:
    deadline = time.time() + timeout
    while not (found := re.search(pattern, path.read_text())):
        assert proc.poll() is None and time.time() < deadline, path.read_text()[-2000:]
        time.sleep(0.001)
    return found


def test_sigint_commits_a_checkpoint_of_the_current_step_a_sigterm_during_that_save_changes_nothing_and_the_rerun_is_bit_identical(tmp_path, runs):
    """Ctrl-C (SIGINT) stops the streamed run, and a preemption notice (SIGTERM) lands while the stop's own
    checkpoint is being written. One handler serves both signals; a SIGTERM that stops a run (and its
    bit-identical rerun) is tested on two processes in test_sharding.py."""
    command, reference = runs["streamed"]["command"], runs["streamed"]["reference"]
    preempted = tmp_path / "preempted"
    stderr = tmp_path / "stderr.txt"
    with open(stderr, "w") as err:
        proc = subprocess.Popen(command(preempted), cwd=REPO, stdout=subprocess.DEVNULL, stderr=err)
        deadline = time.time() + 240
        while not (preempted / "checkpoints" / "20").exists():
            assert proc.poll() is None and time.time() < deadline, "the run ended before it could be interrupted"
            time.sleep(0.02)
        proc.send_signal(signal.SIGINT)
        # The second signal lands during the stop's own save: the step it names is being written (its
        # temporary directory exists), not an earlier periodic save that may still be in flight.
        stop_step = int(_wait_for_line(stderr, r"SIGINT: writing the checkpoint of step (\d+)", proc).group(1))
        deadline = time.time() + 60
        while not glob.glob(str(preempted / "checkpoints" / f"{stop_step}.orbax-checkpoint-tmp*")):
            assert proc.poll() is None and time.time() < deadline, stderr.read_text()[-2000:]
            time.sleep(0.001)
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=120)
    log = stderr.read_text()
    assert proc.returncode == guard.EXIT_INTERRUPTED, log[-2000:]
    assert "SIGTERM: already stopping; the checkpoint is being written" in log
    stopped_at = int(re.search(r"interrupted: SIGINT: stopped at step (\d+) after writing its checkpoint", log).group(1))
    assert stopped_at == stop_step and 20 < stopped_at < STREAMED_STEPS and checkpoint.latest_step(str(preempted)) == stopped_at

    result = subprocess.run(command(preempted), cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert f"resuming {preempted} from step {stopped_at}" in result.stderr
    jax.tree.map(np.testing.assert_array_equal, llm.load(str(preempted)).params, llm.load(str(reference)).params)
