"""After pretraining: the chat template, SFT's response-only loss, the reward model, DPO and GRPO
(their losses against hand-computed values, exact resume), chat over a pseudo-terminal, bad input."""

import json
import math
import os
import random
import select
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import (
    REPO,
    addition_problem,
    cli_overrides,
    objective_overrides,
    posttrain_sets,
    run_cli,
    tiny_config,
    train_run,
    write_corpus,
    write_jsonl,
)

import llm
from llm import model
from llm.data import DataError, examples, template, tokenizer as tokenizer_lib
from llm.model import sample
from llm.training import checkpoint, evaluate, objectives, rl


@pytest.fixture(scope="module")
def sets(tmp_path_factory) -> dict:
    return posttrain_sets(tmp_path_factory.mktemp("posttrain"))


@pytest.fixture(scope="module")
def sft64(sets) -> str:
    """A tiny SFT'd chat model with a 64-token context: the start of the RL tests and the chat CLI's model."""
    workdir = str(sets["root"] / "sft64")
    train_run(_cfg(sets, data__dataset=f"sft:{sets['sft']}", seq_len=64, num_train_steps=30, checkpoint_every_steps=30), workdir, quiet=True)
    return workdir


def _cfg(sets, **overrides):
    return tiny_config(sets["corpus"], **{"init_from": sets["pre"], "opt__schedule": "constant", **overrides})


# The template.


def test_the_template_round_trips_and_marks_only_the_assistant_tokens_for_every_tokenizer(tmp_path):
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "12+3"},
                {"role": "assistant", "content": "15"}, {"role": "user", "content": "1+1"}, {"role": "assistant", "content": "2"}]
    text = "be brief 12+3 15 1+1 2 " * 40
    spm = tokenizer_lib.train("sentencepiece", [text], vocab_size=280)
    for tok in (tokenizer_lib.CharTokenizer(text), tokenizer_lib.ByteTokenizer(), spm):
        ids = template.role_ids(tok, 512)
        tokens, response = template.render(tok, ids, messages)
        assert template.parse(tok, ids, tokens) == messages
        assert tok.decode(tokens[response & (tokens != ids.end)]) == "152"
        assert list(tokens[response]).count(ids.end) == 2  # each answer's <|end|> is learnt, so the model stops
        markers = {ids.system, ids.user, ids.assistant, ids.end}
        assert not markers & set(tok.encode(text).tolist())  # text never produces a marker id
    assert template.role_ids(spm, 512).system == spm.vocab_size  # the first ids after the vocabulary
    with pytest.raises(template.TemplateError, match=r"needs 4 role ids after the tokenizer's 259.*model.vocab_size >= 263"):
        template.role_ids(tokenizer_lib.ByteTokenizer(), 260)


# SFT.


def test_only_response_tokens_carry_loss_and_examples_do_not_attend_across_each_other(sets):
    tok = tokenizer_lib.load(sets["pre"])
    run = llm.load(sets["pre"])
    ids = run.roles
    found, _ = examples.load_sft(f"sft:{sets['sft']}", "train", tok, ids, 32, 0.1, 0.0)
    batch = examples.pack(found[:6], 33, "response")
    assert batch["segment_ids"].max() >= 2  # several examples share a row
    loss = objectives.make("lm", run.model_config)

    def total(b):
        return float(loss(run.params, {k: jnp.asarray(v) for k, v in b.items()})[0])

    base = total(batch)
    response_t = np.argwhere(batch["weights"] > 0)
    prompt_t = np.argwhere((batch["weights"] == 0) & (batch["segment_ids"] > 0))
    for (r, t), changes in ((prompt_t[0], False), (response_t[0], True)):
        changed = {k: v.copy() for k, v in batch.items()}
        changed["targets"][r, t] = (changed["targets"][r, t] + 1) % tok.vocab_size
        assert (total(changed) != base) == changes
    # loss_on='all' weighs every target inside an example, never one across two.
    everything = examples.pack(found[:6], 33, "all")
    same = (everything["segment_ids"] == np.roll(everything["segment_ids"], -1, axis=1))[:, :-1]
    assert (everything["weights"][:, :-1] <= same).all() and everything["weights"].sum() > batch["weights"].sum()
    # Changing one example's tokens changes nothing another example in the same row computes.
    logits = lambda b: np.asarray(model.apply(run.model_config, run.params, jnp.asarray(b["inputs"]), jnp.asarray(b["segment_ids"]),
                                              jnp.asarray(b["positions"]))[0])
    row = int(np.argmax(batch["segment_ids"].max(axis=1)))
    second = batch["segment_ids"][row] == 2
    changed = {k: v.copy() for k, v in batch.items()}
    changed["inputs"][row, batch["segment_ids"][row] == 1] = tok.encode("7")[0]
    np.testing.assert_allclose(logits(changed)[row, second], logits(batch)[row, second], atol=1e-5)


def test_sft_from_a_pretrained_run_lowers_the_held_out_response_loss_and_eval_reports_it(sets):
    workdir = str(sets["root"] / "sft_run")
    cfg = _cfg(sets, data__dataset=f"sft:{sets['sft']}", num_train_steps=30, eval_every_steps=30, checkpoint_every_steps=30)
    summary = train_run(cfg, workdir, quiet=True)
    before = llm.load(sets["pre"])
    run = llm.load(workdir)
    assert run.evaluate()["loss"] == pytest.approx(summary["eval_loss"], rel=1e-5)
    # The pretrained model, scored on the same held-out responses, does worse.
    tok, roles = before.tokenizer, before.roles
    found, _ = examples.load_sft(cfg.data.dataset, "validation", tok, roles, cfg.seq_len, 0.1, 0.0)
    step = jax.jit(evaluate.make_eval_step(before.model_config))
    loss_sum, n = 0.0, 0.0
    for b in examples.sft_eval_batches(found, 16, cfg.seq_len):
        s, t = step(before.params, {k: jnp.asarray(v) for k, v in b.items()})
        loss_sum, n = loss_sum + float(s), n + float(t)
    assert n == sum(int(e.response.sum()) for e in found)  # every response token is scored once
    assert summary["eval_loss"] < loss_sum / n
    answer = run.chat([{"role": "user", "content": "12+3"}], max_new_tokens=4)
    assert isinstance(answer, str) and len(answer) <= 4


def test_sft_on_a_sentencepiece_run_with_no_spare_rows_grows_the_vocabulary_for_the_template(sets, tmp_path):
    pre = str(tmp_path / "spm")
    train_run(tiny_config(sets["corpus"], num_train_steps=2, data__tokenizer="sentencepiece", data__vocab_size=273,
                                  model__vocab_multiple=1), pre, quiet=True)
    assert llm.load(pre).model_config.V == 273  # exactly the tokenizer's: no row for a role marker
    with pytest.raises(template.TemplateError, match="fine-tune it on 'sft:' data first"):
        llm.load(pre).roles
    sft = str(tmp_path / "sft")
    train_run(_cfg(sets, init_from=pre, data__dataset=f"sft:{sets['sft']}", num_train_steps=2, model__vocab_multiple=1), sft, quiet=True)
    run, before = llm.load(sft), llm.load(pre)
    assert run.model_config.V == 277 and run.roles.end == 276
    assert run.config.model.vocab_size == 277  # recorded, so every later stage and load sees the same shape
    assert isinstance(run.chat([{"role": "user", "content": "1+1"}], max_new_tokens=3), str)
    assert before.params["embed"].shape == (273, run.model_config.D)


def test_sft_from_a_text_run_starts_each_named_role_marker_at_the_mean_embedding_of_its_text(sets, sft64):
    from llm import spec
    from llm.training import params as params_lib, sharding, state

    tok = tokenizer_lib.load(sets["pre"])
    cfg = _cfg(sets, data__dataset=f"sft:{sets['sft']}", markers__end="=", markers__assistant="+1")
    run = spec.resolve(spec.from_config(cfg), tok)
    built = state.setup_run(run, sharding.make_mesh(run.mesh.data, run.mesh.fsdp, run.mesh.tensor))
    got = np.asarray(params_lib.restore_lm_params(sets["pre"], run.model, built, params_lib.marker_rows(run, tok))[0]["embed"])
    pre, roles = np.asarray(llm.load(sets["pre"]).params["embed"]), run.vocab.require_roles()
    np.testing.assert_array_equal(got[roles.end], pre[tok.encode("=")[0]])
    np.testing.assert_allclose(got[roles.assistant], pre[tok.encode("+1")].mean(axis=0), rtol=1e-6)
    np.testing.assert_array_equal(got[roles.user], pre[roles.user])  # not named: as pretraining left it
    # A run from a chat model keeps the markers that model trained.
    assert params_lib.marker_rows(spec.resolve(spec.from_config(_cfg(sets, init_from=sft64, seq_len=64, markers__end="=",
                                                                     data__dataset=f"sft:{sets['sft']}")), tok), tok) == {}


# Losses against hand-computed values.


def test_bradley_terry_and_dpo_losses_match_hand_computed_values():
    assert float(objectives.bradley_terry_loss(1.0, 0.0)) == pytest.approx(math.log(1 + math.exp(-1)), rel=1e-6)
    assert float(objectives.bradley_terry_loss(0.0, 2.0)) == pytest.approx(math.log(1 + math.exp(2)), rel=1e-6)
    loss, r_c, r_r = objectives.dpo_loss(-3.0, -5.0, -4.0, -4.5, beta=0.5)
    # implicit rewards 0.5 * (-3 + 4) = 0.5 and 0.5 * (-5 + 4.5) = -0.25; loss = log(1 + e^-(0.75))
    assert (float(r_c), float(r_r)) == pytest.approx((0.5, -0.25))
    assert float(loss) == pytest.approx(math.log(1 + math.exp(-0.75)), rel=1e-6)
    # Policy equal to the reference: loss log 2 whatever the answers.
    assert float(objectives.dpo_loss(-7.0, -1.0, -7.0, -1.0, 0.1)[0]) == pytest.approx(math.log(2))


def test_grpo_advantages_are_zero_mean_per_group_and_the_kl_to_an_identical_reference_is_zero():
    rewards = jnp.array([[1.0, 0.0, 0.0, 1.0], [0.0, 0.0, 0.0, 0.0], [3.0, 1.0, 2.0, 2.0]])
    adv = objectives.group_advantages(rewards)
    np.testing.assert_allclose(adv.mean(axis=1), 0.0, atol=1e-6)
    np.testing.assert_allclose(adv[0], [1, -1, -1, 1], atol=1e-5)
    assert (adv[1] == 0).all()  # a group whose answers all score alike teaches nothing
    logp = jnp.log(jnp.array([[0.5, 0.25], [0.9, 0.1]]))
    ones = jnp.ones((2, 2))
    surrogate, kl, clipped = objectives.grpo_token_terms(logp, logp, logp, jnp.array([1.0, -2.0]), ones, 0.2)
    assert float(jnp.abs(kl).max()) == 0.0 and not clipped.any()
    np.testing.assert_allclose(surrogate, [[1, 1], [-2, -2]])
    # A ratio past the clip earns no more than the clipped value for a positive advantage.
    surrogate, kl, clipped = objectives.grpo_token_terms(jnp.log(jnp.array([[0.9]])), jnp.log(jnp.array([[0.5]])),
                                                         jnp.log(jnp.array([[0.5]])), jnp.array([1.0]), jnp.ones((1, 1)), 0.2)
    assert float(surrogate[0, 0]) == pytest.approx(1.2) and float(kl[0, 0]) > 0 and bool(clipped[0, 0])


def test_grpo_and_dpo_log_probs_are_those_of_the_distribution_the_sampler_draws_from():
    logits_1xV = jnp.array([[2.0, 0.5, -1.0, 3.0, 9.0]])  # ids 3 and 4 lie past the chat vocabulary
    temperature, limit = 0.5, 3
    keys = jax.random.split(jax.random.key(0), 20_000)
    masked_1xV = jnp.where(jnp.arange(5) < limit, logits_1xV, -1e30)
    drawn = jax.vmap(lambda k: sample.choose(masked_1xV, k, temperature, 0, 1.0)[0])(keys)
    frequency = np.bincount(np.asarray(drawn), minlength=5) / len(keys)
    logp_V, entropy = objectives.sampled_logprobs(logits_1xV[:, None].repeat(5, 1), jnp.arange(5)[None], temperature, limit)
    np.testing.assert_allclose(np.exp(logp_V[0, :limit]), frequency[:limit], atol=0.01)
    assert frequency[limit:].sum() == 0 and np.all(np.asarray(logp_V[0, limit:]) < -1e20)
    p = np.exp(np.asarray(logp_V[0, :limit]))
    assert float(entropy[0, 0]) == pytest.approx(-(p * np.log(p)).sum(), rel=1e-5)


def test_grpo_terms_ignore_overflowing_log_probs_at_padding_and_the_clip_counts_only_where_it_stops_the_gradient():
    logp = jnp.array([[-1.0, 500.0], [-0.1, 0.0]])  # position (0, 1) is padding with a value whose exp overflows
    old = jnp.array([[-1.0, -500.0], [-1.0, 0.0]])
    weights = jnp.array([[1.0, 0.0], [1.0, 0.0]])

    def total(logp):
        surrogate, kl, _ = objectives.grpo_token_terms(logp, old, old, jnp.array([1.0, -1.0]), weights, 0.2)
        return jnp.sum(-surrogate + 0.04 * kl)

    value, grad = jax.value_and_grad(total)(logp)
    assert np.isfinite(float(value)) and np.isfinite(np.asarray(grad)).all()
    # Row 1's ratio e^0.9 is past 1 + eps with a negative advantage: the min picks the unclipped term,
    # which still has a gradient, so it is not counted as clipped; with a positive one it would be.
    _, _, clipped = objectives.grpo_token_terms(logp, old, old, jnp.array([1.0, -1.0]), weights, 0.2)
    assert not np.asarray(clipped).any()
    _, _, clipped = objectives.grpo_token_terms(logp, old, old, jnp.array([1.0, 1.0]), weights, 0.2)
    assert np.asarray(clipped).tolist() == [[False, False], [True, False]]


def test_unterminated_answers_score_below_every_terminated_one_and_the_eval_rates_carry_standard_errors():
    rewards = np.array([0.5, 4.5, 2.0, 1.0])  # the reward model's scores; the 4.5 never emitted <|end|>
    terminated = np.array([True, False, True, True])
    assert rl.scored(rewards, terminated, 1.0).tolist() == [0.5, -0.5, 2.0, 1.0]
    assert rl.scored(np.array([3.0, 1.0]), np.array([False, False]), 0.5).tolist() == [0.5, 0.5]
    assert rl.zero_variance_fraction(np.array([[1.0, 1.0], [0.0, 1.0], [0.0, 0.0]])) == pytest.approx(2 / 3)
    rates = rl.pass_rates(np.array([[1, 0, 0, 0], [0, 0, 0, 0], [1, 1, 1, 1], [0, 1, 0, 0]], bool))
    assert rates["pass_at_1"] == pytest.approx(6 / 16) and rates["pass_at_k"] == pytest.approx(3 / 4)
    assert rates["pass_at_1_se"] == pytest.approx(np.std([0.25, 0, 1, 0.25], ddof=1) / 2)
    assert rates["pass_at_k_se"] == pytest.approx(np.std([1, 0, 1, 1], ddof=1) / 2)


def test_grpo_refuses_top_k_and_takes_its_log_probs_at_the_sampling_temperature_over_the_chat_ids(sets):
    from llm import spec
    from llm.training import state

    cfg = _objective_cfg(sets, "grpo", 2)
    cfg.grpo.top_k = 5
    with pytest.raises(spec.ConfigError, match="grpo.top_k must be 0"):
        spec.from_config(cfg)
    cfg.grpo.top_k, cfg.grpo.temperature = 0, 0.7
    run = spec.resolve(spec.from_config(cfg), tokenizer_lib.load(sets["pre"]))
    assert state.sampled_distribution(run) == {"temperature": 0.7, "vocab_limit": run.vocab.require_roles().limit}
    cfg.objective, cfg.data.dataset = "dpo", f"preference:{sets['pref']}"
    run = spec.resolve(spec.from_config(cfg), tokenizer_lib.load(sets["pre"]))
    assert state.sampled_distribution(run) == {"temperature": 1.0, "vocab_limit": run.vocab.require_roles().limit}


def says_one(record: dict, answer: str) -> float:
    return float(answer == "1")


def test_grpo_learns_a_checkable_reward_and_reuses_each_sampled_batch_with_the_clip_acting(sets, sft64, tmp_path):
    # From a barely trained SFT model that answers digit strings and seldom stops within 4 tokens, the
    # reward is 1 for the answer "1" and an unterminated answer scores below any other.
    cfg = _cfg(sets, init_from=sft64, seq_len=64, objective="grpo", data__dataset=f"prompts:{sets['prompts']}", batch_size=4,
               grpo__group_size=8, grpo__max_new_tokens=4, grpo__reward_fn="test_posttrain:says_one", grpo__num_iterations=2,
               num_train_steps=40, checkpoint_every_steps=40, log_every_steps=1, opt__learning_rate=1e-2, opt__warmup_steps=0)
    train_run(cfg, str(tmp_path / "grpo"), quiet=True, feed=rl.make_feed)
    logged = _logged(str(tmp_path / "grpo"))
    reward = [logged[s]["reward"] for s in range(1, 41)]
    assert reward[0] < 0.2 and np.mean(reward[-6:]) > 0.9, reward
    assert all(logged[s]["unterminated"] >= 0 for s in logged) and logged[1]["unterminated"] > 0
    # num_iterations=2: the second update of each batch trains on the first's answers, against their
    # stored log-probs, so its ratio moves and the clip acts; the first's ratio is exactly 1.
    assert all(logged[s]["reward"] == logged[s + 1]["reward"] for s in range(1, 41, 2))
    assert all(logged[s]["clip_fraction"] == 0 for s in range(1, 41, 2))
    assert max(logged[s]["clip_fraction"] for s in range(2, 41, 2)) > 0


def test_dpo_separates_the_pairs_it_trains_on(sets, sft64, tmp_path):
    rng = random.Random(1)
    pairs = [{"prompt": p, "chosen": a, "rejected": f"{a}+{a}"} for p, a in (addition_problem(rng) for _ in range(120))]
    cfg = _cfg(sets, init_from=sft64, seq_len=64, objective="dpo", data__dataset=f"preference:{write_jsonl(tmp_path / 'pairs.jsonl', pairs)}",
               num_train_steps=30, checkpoint_every_steps=30, log_every_steps=1, opt__warmup_steps=0)
    train_run(cfg, str(tmp_path / "dpo"), quiet=True)
    logged = _logged(str(tmp_path / "dpo"))
    assert logged[1]["accuracy"] == 0 and logged[1]["loss"] == pytest.approx(math.log(2), abs=1e-3)  # the policy starts at its reference
    assert np.mean([logged[s]["accuracy"] for s in range(21, 31)]) > 0.9
    assert np.mean([logged[s]["loss"] for s in range(21, 31)]) < 0.5 * math.log(2)
    # dpo.nll_coef adds that multiple of each chosen answer's mean token NLL (RPO) to its pair's loss.
    run = llm.load(sft64)
    mc, limit = run.model_config, run.roles.limit
    pairs = examples.load_pairs(cfg.data.dataset, "all", run.tokenizer, run.roles, 64, 0.0, 0.0)
    batch = {k: jnp.asarray(v[:4]) for k, v in pairs.items()}
    batch.update(objectives.answer_logprobs(mc, run.params, batch, limit))
    plain, rpo = (float(objectives.make("dpo", mc, dpo_nll_coef=c, vocab_limit=limit)(run.params, batch)[0]) for c in (0.0, 0.5))
    logp, _ = objectives.token_logprobs(mc, run.params, batch["chosen_inputs"], batch["chosen_targets"], vocab_limit=limit)
    w = batch["chosen_weights"]
    assert plain == pytest.approx(4 * math.log(2), rel=1e-5)  # the policy is its reference
    assert rpo - plain == pytest.approx(0.5 * float(jnp.sum(-(logp * w).sum(1) / w.sum(1))), rel=1e-4)


def test_chat_on_a_64_token_model_answers_with_no_flags_cutting_the_answer_to_the_context(sft64):
    result = subprocess.run(["./run.sh", "chat", f"--workdir={sft64}"], cwd=REPO, input="12+34\n/exit\n", capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "error" not in result.stdout and "model> " in result.stdout
    assert "does not fit after a" in result.stderr  # the default 200 new tokens, cut with a warning
    run = llm.load(sft64)
    long_history = [{"role": r, "content": "12+34"} for r in ("user", "assistant") * 6] + [{"role": "user", "content": "5+6"}]
    with pytest.warns(UserWarning, match=r"max_new_tokens=200 does not fit after a \d+-token conversation"):
        assert isinstance(run.chat(long_history), str)
    from llm.run import chat

    kept, tokens = chat.fit(run, long_history, 200)
    assert kept[-1] == long_history[-1] and len(tokens) <= run.context // 2 < len(
        template.render(run.tokenizer, run.roles, long_history[-len(kept) - 1:], add_generation_prompt=True)[0])


# Each objective trains, evaluates and resumes exactly.


def _objective_overrides(sets, objective: str, steps: int) -> dict:
    return objective_overrides(sets, objective, steps)


def _objective_cfg(sets, objective: str, steps: int, eval_every_steps: int = 0):
    return tiny_config(sets["corpus"], eval_every_steps=eval_every_steps, **_objective_overrides(sets, objective, steps))


def _train(cfg, workdir):
    return train_run(cfg, workdir, quiet=True, feed=rl.make_feed if cfg.objective == "grpo" else None)


def _logged(workdir) -> dict[int, dict]:
    return {r["step"]: r for r in map(json.loads, open(os.path.join(workdir, "metrics.jsonl"))) if "loss" in r}


def test_grpo_across_two_processes_samples_the_one_process_answers_and_trains_to_its_params(sets, tmp_path):
    steps = 2
    one, two = tmp_path / "one", tmp_path / "two"
    _train(_objective_cfg(sets, "grpo", steps), str(one))
    # Two real jax.distributed processes of one CPU device each: every host samples every group with
    # the whole params, then feeds its own half of the rows to the sharded update.
    overrides = cli_overrides(sets["corpus"], **_objective_overrides(sets, "grpo", steps))
    result = subprocess.run(["./run.sh", "launch-local", "2", "train", f"--workdir={two}", *overrides], cwd=REPO,
                            capture_output=True, text=True, timeout=600, env={**os.environ, "LLM_LOCAL_DEVICES": "2"})
    assert result.returncode == 0, result.stderr[-3000:]
    a, b = _logged(one), _logged(two)
    assert a[1]["reward"] == b[1]["reward"] and a[1]["answer_length"] == b[1]["answer_length"]  # the same answers
    jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-4, atol=1e-5), llm.load(str(one)).params, llm.load(str(two)).params)


def test_the_reward_model_reports_held_out_pairwise_accuracy_scores_from_the_cli_and_rewards_grpo(sets, tmp_path):
    # Pairs a 30-step reward model can learn (telling a sum from its wrong answers is beyond it: its
    # held-out accuracy stays at chance): the rejected answer repeats itself as "a+a".
    rng = random.Random(1)
    pairs = [{"prompt": p, "chosen": a, "rejected": f"{a}+{a}"} for p, a in (addition_problem(rng) for _ in range(120))]
    easy = write_jsonl(tmp_path / "easy.jsonl", pairs)
    cfg = _cfg(sets, data__dataset=f"preference:{easy}", objective="reward", num_train_steps=30, eval_every_steps=30,
               checkpoint_every_steps=30, opt__learning_rate=1e-2)
    summary = train_run(cfg, str(tmp_path / "rm"), quiet=True)
    assert summary["eval_accuracy"] >= 0.9 and summary["eval_loss"] < 0.3 < math.log(2)
    result = run_cli("score", f"--workdir={tmp_path / 'rm'}", "--prompt=1+1", "--response=2")
    assert result.returncode == 0, result.stderr[-2000:]
    rm = llm.load(str(tmp_path / "rm"))
    assert json.loads(result.stdout.strip().splitlines()[-1])["scores"] == pytest.approx(rm.score(["1+1"], ["2"]), abs=1e-6)
    # The reward model as GRPO's reward: its scores of the answers are what is logged. The held-out eval
    # answers greedily with the params of the last step, which a reload reproduces through chat.
    cfg = _objective_cfg(sets, "grpo", 2)
    cfg.grpo.reward_fn, cfg.grpo.reward_run = "", str(tmp_path / "rm")
    cfg.eval_every_steps, cfg.grpo.eval_prompts = 2, 4
    summary = train_run(cfg, str(tmp_path / "grpo_rm"), quiet=True, feed=rl.make_feed)
    policy = llm.load(str(tmp_path / "grpo_rm"))
    held = examples.held_out(examples.read(f"prompts:{sets['prompts']}"), "validation", cfg.data.validation_fraction,
                             cfg.data.test_fraction)[: cfg.grpo.eval_prompts]
    prompts = [r.value["prompt"] for r in held]
    answers = [policy.chat([{"role": "user", "content": p}], max_new_tokens=cfg.grpo.max_new_tokens) for p in prompts]
    # A char answer of max_new_tokens characters never emitted <|end|>: it scores below every finished one.
    terminated = np.array([len(a) < cfg.grpo.max_new_tokens for a in answers])
    expected = rl.scored(np.asarray(rm.score(prompts, answers)), terminated, cfg.grpo.unterminated_penalty)
    assert summary["eval_reward"] == pytest.approx(np.mean(expected), abs=1e-5)
    assert np.isfinite(summary["reward"])


# Bad input: one clear message naming the file and line, or the step.


def test_bad_post_training_input_is_one_message_naming_the_line_or_the_step(sets, tmp_path):
    tok = tokenizer_lib.load(sets["pre"])
    roles = llm.load(sets["pre"]).roles
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "1+1", "response": "2"}, {"prompt": "2+2"}])
    with pytest.raises(DataError, match=rf"{bad}:2: missing the string field 'response'"):
        examples.load_sft(f"sft:{bad}", "all", tok, roles, 32, 0.0, 0.0)
    long = write_jsonl(tmp_path / "long.jsonl", [{"prompt": "1+" * 30, "response": "2"}])
    with pytest.raises(DataError, match=rf"{long}:1: the conversation before the first response is \d+ tokens"):
        examples.load_sft(f"sft:{long}", "all", tok, roles, 32, 0.0, 0.0)
    same = write_jsonl(tmp_path / "same.jsonl", [{"prompt": "1+1", "chosen": "2", "rejected": "2"}])
    with pytest.raises(DataError, match=rf"{same}:1: 'chosen' equals 'rejected'"):
        examples.load_pairs(f"preference:{same}", "all", tok, roles, 32, 0.0, 0.0)
    # Through the CLI: one error line, before anything compiles.
    result = run_cli("train", f"--workdir={tmp_path / 'run'}", *cli_overrides(sets["corpus"], init_from=sets["pre"],
                                                                                 data__dataset=f"sft:{bad}"))
    assert result.returncode == 2 and f"error: {bad}:2: missing the string field 'response'" in result.stderr
    assert "model:" not in result.stderr and "Traceback" not in result.stderr
    result = run_cli("train", f"--workdir={tmp_path / 'run2'}", *cli_overrides(sets["corpus"], objective="dpo"))
    assert result.returncode == 2 and "objective='dpo' trains on 'preference:GLOB'" in result.stderr and "set init_from" in result.stderr


def nan_reward(record: dict, answer: str) -> float:
    return float("nan") if record["prompt"].startswith(("1", "2", "3", "4")) else 1.0


def test_a_reward_function_returning_nan_stops_grpo_naming_the_step_and_nothing_trains_on_it(sets, tmp_path):
    cfg = _objective_cfg(sets, "grpo", 6)
    cfg.grpo.reward_fn = "test_posttrain:nan_reward"
    workdir = str(tmp_path / "nan")
    with pytest.raises(rl.RewardError, match=r"step 1: the reward of \d+ answer\(s\) is not finite .*last checkpoint is intact"):
        train_run(cfg, workdir, quiet=True, feed=rl.make_feed)
    assert checkpoint.latest_step(workdir) is None


# Chat, driven through a pseudo-terminal.


def test_chat_keeps_the_system_message_and_drops_the_oldest_turns_to_fit_the_context(sets):
    from llm.run import chat

    run = llm.load(sets["pre"])  # a 32-token context
    turns = [{"role": r, "content": "12+34"} for r in ("user", "assistant") * 4] + [{"role": "user", "content": "5+6"}]
    history = [{"role": "system", "content": "1+1=2"}] + turns
    kept, tokens = chat.fit(run, history, max_new_tokens=4)
    assert kept[0] == history[0] and kept[1:] == turns[len(turns) - len(kept) + 1:]  # the system message and the newest turns
    assert 1 < len(kept) < len(history) and len(tokens) <= run.context - 4
    one_more = [history[0]] + turns[len(turns) - len(kept):]
    assert len(template.render(run.tokenizer, run.roles, one_more, add_generation_prompt=True)[0]) > run.context - 4
    with pytest.raises(sample.SampleError, match="the last message alone"):
        chat.fit(run, [{"role": "user", "content": "1+1" * 20}], max_new_tokens=4)


class _Terminal:
    """A command on a pseudo-terminal, driven through pipes by pty.spawn in a fresh interpreter (forking
    this JAX process directly could deadlock): bytes written reach the terminal as typed keys, so
    \x03 is a real Ctrl-C, delivered by the line discipline as SIGINT."""

    def __init__(self, command: list[str]):
        spawn = "import pty, sys; sys.exit(pty.spawn(sys.argv[1:]) >> 8)"
        self.proc = subprocess.Popen([sys.executable, "-c", spawn, *command], cwd=REPO, stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        self.out = ""

    def type(self, keys: bytes) -> None:
        self.proc.stdin.write(keys)
        self.proc.stdin.flush()

    def wait_for(self, needle: str, after: int = 0, timeout: float = 120) -> int:
        deadline = time.time() + timeout
        while needle not in self.out[after:]:
            assert time.time() < deadline, f"{needle!r} did not appear; got {self.out[-2000:]!r}"
            ready, _, _ = select.select([self.proc.stdout], [], [], 0.5)
            if ready:
                chunk = os.read(self.proc.stdout.fileno(), 4096)
                assert chunk or needle in self.out[after:], f"the program ended before {needle!r}: {self.out[-2000:]!r}"
                self.out += chunk.decode("utf-8", "replace")
        return self.out.index(needle, after) + len(needle)


def test_chat_streams_an_answer_and_ctrl_c_stops_that_answer_not_the_program(tmp_path):
    corpus = write_corpus(tmp_path / "corpus.txt")
    workdir = tmp_path / "run"
    # A pretrained model never saw <|end|>: a few steps push its logit below the corpus's characters, and
    # top-k keeps it out, so the answer runs to max_new_tokens, long enough to interrupt (at init every
    # id has ~1/V, and an answer could end after a handful of tokens).
    train_run(tiny_config(corpus, num_train_steps=20, seq_len=1024, batch_size=2), str(workdir), quiet=True)
    term = _Terminal([sys.executable, "-m", "llm.cli", "chat", f"--workdir={workdir}", "--max_new_tokens=1000", "--temperature=1.0",
                      "--top_k=10"])
    try:
        at = term.wait_for("you> ")
        term.type(b"the king\n")
        at = term.wait_for("model> ", at)
        deadline = time.time() + 60
        while len(term.out) - at < 20:  # the answer streams out, token by token
            assert time.time() < deadline, term.out[-2000:]
            term.wait_for("", at, timeout=1)
            ready, _, _ = select.select([term.proc.stdout], [], [], 0.2)
            if ready:
                term.out += os.read(term.proc.stdout.fileno(), 4096).decode("utf-8", "replace")
        term.type(b"\x03")
        stopped = term.wait_for("[stopped]", at)
        assert len(term.out[at:stopped].strip()) > 20
        term.wait_for("you> ", stopped)  # the program goes on to the next turn
        term.type(b"/exit\n")
        assert term.proc.wait(timeout=60) == 0, term.out[-2000:]
    finally:
        term.proc.kill()
