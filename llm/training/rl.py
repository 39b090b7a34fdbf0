"""GRPO (Shao et al. 2024): for each prompt, sample a group of answers with the jitted KV-cache
sampler, score them (a reward function named in the config, or a reward model's run), normalise the
rewards within each group into advantages, and take the train step on the 'grpo' objective
(llm/training/objectives.py: the clipped ratio and the KL penalty to the frozen init_from model).

Answers are sampled from (seed, step), so a resumed run samples exactly what the uninterrupted run
would have. Every host samples and scores every prompt's group with the whole params gathered onto
it (identical on every host: the same params and seed), then feeds its own rows of the batch to the
sharded update. The gathered copy costs one model per host each step: right for the model sizes RL
is run on here, not for a model that only fits sharded.
"""

import importlib
from typing import Callable, Sequence

import jax
import numpy as np
from jax.experimental import multihost_utils

from llm.data import examples
from llm.model import sample
from llm.spec import GrpoConfig, RunSpec
from llm.training import checkpoint, loop, objectives, params as params_lib, sharding
from llm.training.feeds import Feed, Job


class RewardError(ValueError):
    pass


def reward_function(spec: str) -> Callable[[dict, str], float]:
    """'module:function' -> the function (record: the prompt's JSONL line, answer: str) -> float."""
    module_name, _, name = spec.partition(":")
    # Runs made before llm/ became a package per stage name the built-in reward by its old module.
    module_name = {"llm.rl": "llm.training.rl"}.get(module_name, module_name)
    try:
        fn = getattr(importlib.import_module(module_name), name)
    except (ImportError, AttributeError) as e:
        raise RewardError(f"grpo.reward_fn={spec!r}: {type(e).__name__}: {e}") from None
    if not callable(fn):
        raise RewardError(f"grpo.reward_fn={spec!r} is not a function")
    return fn


def scorer(g: GrpoConfig) -> Callable[[Sequence[dict], Sequence[str]], np.ndarray]:
    """(records, answers) -> rewards [n] float64."""
    if g.reward_fn:
        fn = reward_function(g.reward_fn)
        return lambda records, answers: np.array([float(fn(r, a)) for r, a in zip(records, answers)], np.float64)
    judge = params_lib.load(g.reward_run)
    if judge.run.objective.name != "reward":
        raise checkpoint.CheckpointError(f"{g.reward_run} is not a reward model (its objective is {judge.run.objective.name!r})")
    roles = judge.run.vocab.require_roles()
    return lambda records, answers: np.asarray(objectives.reward_scores(
        judge.run.model, judge.params, judge.tokenizer, roles, [r["prompt"] for r in records], answers), np.float64)


def answer_rows(prompts: Sequence[np.ndarray], answers: Sequence[Sequence[int]], width: int, pad_id: int) -> dict[str, np.ndarray]:
    """Prompt + answer rows, weighted on the answer's tokens only (its <|end|> included)."""
    tokens, weights = np.full((len(prompts), width), pad_id, np.int32), np.zeros((len(prompts), width), np.float32)
    for i, (p, a) in enumerate(zip(prompts, answers)):
        row = np.concatenate([p, np.asarray(a, np.int32)])[:width]
        tokens[i, : len(row)] = row
        weights[i, len(p) : len(row)] = 1.0
    return {"inputs": tokens[:, :-1], "targets": tokens[:, 1:], "weights": weights[:, 1:]}


def _whole(params):
    """Params a host can sample with on its own devices: on a multi-host mesh, gathered whole."""
    if jax.process_count() == 1:
        return params
    return jax.tree.map(lambda x: multihost_utils.process_allgather(x, tiled=True), params)


def _answers(job: Job, params, prompts: Sequence[examples.Prompt], group: int, temperature: float, seed: int):
    """(answer ids, each up to and including <|end|>; their decoded text)."""
    g, roles, tok = job.run.objective.grpo, job.run.vocab.require_roles(), job.tok
    rows = [p.tokens for p in prompts for _ in range(group)]
    answers = sample.generate(job.run.model, _whole(params), rows, max_new_tokens=g.max_new_tokens, eos_id=roles.end, pad_id=tok.pad_id,
                              vocab_limit=roles.limit, temperature=temperature, top_k=g.top_k, seed=seed)
    texts = [tok.decode([t for t in a if t < tok.vocab_size]) for a in answers]
    return rows, answers, texts


def _checked(rewards: np.ndarray, records: Sequence[dict], texts: Sequence[str], step: int) -> np.ndarray:
    bad = np.flatnonzero(~np.isfinite(rewards))
    if len(bad):
        i = int(bad[0])
        raise RewardError(f"step {step}: the reward of {len(bad)} answer(s) is not finite (first: {rewards[i]} for the prompt "
                          f"{records[i].get('prompt', records[i])!r:.80} and the answer {texts[i]!r:.80}); stopping before "
                          f"training on it. The last checkpoint is intact")
    return rewards


def make_feed(job: Job) -> Feed:
    run = job.run
    g, dc = run.objective.grpo, run.data
    if jax.process_count() > 1 and g.reward_run:
        raise RewardError("grpo.reward_run scores on one host; a multi-host GRPO run takes grpo.reward_fn")
    load = lambda split: examples.load_prompts(dc.dataset, split, job.tok, run.vocab.require_roles(), run.seq_len, g.max_new_tokens,
                                               dc.validation_fraction, dc.test_fraction)
    batches = examples.PromptBatches(load("train"), run.batch_size, run.seed)
    score = scorer(g)
    logprobs = jax.jit(lambda params, batch: objectives.token_logprobs(run.model, params, batch["inputs"], batch["targets"])[0])
    width = run.seq_len + 1

    def prepare(state, host_batch, step):
        prompts = host_batch["prompts"]
        rows, answers, texts = _answers(job, state.params, prompts, g.group_size, g.temperature, seed=run.seed * 1_000_003 + step)
        records = [p.record for p in prompts for _ in range(g.group_size)]
        rewards = _checked(score(records, texts), records, texts, step)
        batch = answer_rows(rows, answers, width, job.tok.pad_id)
        rewards_BxG = rewards.reshape(len(prompts), g.group_size)
        batch["advantages"] = np.asarray(objectives.group_advantages(rewards_BxG), np.float32).reshape(-1)
        rows_total = len(rows)
        lo, hi = sharding.host_rows(job.mesh, rows_total)
        device = job.put({k: v[lo:hi] for k, v in batch.items()}, rows_total)
        device["ref_logp"] = logprobs(job.reference(), device)
        lengths = [len(a) for a in answers]
        host = {"reward": float(rewards.mean()), "reward_std": float(rewards_BxG.std(axis=1).mean()),
                "answer_length": float(np.mean(lengths))}
        return device, host

    def evaluate(params):
        held = load("validation")[: g.eval_prompts or None]
        rewards, lengths = [], []
        for first in range(0, len(held), run.loop.eval_batch_size):
            chunk = held[first : first + run.loop.eval_batch_size]
            _, answers, texts = _answers(job, params, chunk, 1, 0.0, seed=0)
            records = [p.record for p in chunk]
            rewards += list(_checked(score(records, texts), records, texts, -1))
            lengths += [len(a) for a in answers]
        return {"eval_reward": float(np.mean(rewards)), "eval_answer_length": float(np.mean(lengths))}

    return Feed(batches, prepare, evaluate if run.loop.eval_every_steps else None, check=lambda: load("validation"))


def train_grpo(run: RunSpec, workdir: str, quiet: bool = False) -> dict:
    return loop.train(run, workdir, quiet, feed=make_feed)


def exact_match_reward(record: dict, answer: str) -> float:
    """1 when the answer, stripped, equals the line's "answer" field, else 0."""
    return float(answer.strip() == str(record["answer"]).strip())

