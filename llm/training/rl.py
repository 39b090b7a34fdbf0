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


def scored(rewards: np.ndarray, terminated: np.ndarray, penalty: float) -> np.ndarray:
    """Rewards with each answer cut off before <|end|> set to the lowest reward of the batch's terminated
    answers (of all, when none terminated) less `penalty`: an unfinished answer never scores as a finished one,
    whatever the reward function or model makes of its text."""
    floor = rewards[terminated].min() if terminated.any() else rewards.min()
    return np.where(terminated, rewards, floor - penalty)


def zero_variance_fraction(rewards_BxG: np.ndarray) -> float:
    """The fraction of groups whose answers all scored alike: their advantages are 0 and they teach nothing."""
    return float(np.mean(np.ptp(rewards_BxG, axis=1) == 0))


def pass_rates(correct_PxK: np.ndarray) -> dict[str, float]:
    """pass@1 (the mean of each prompt's fraction right) and pass@k (some answer right) over P prompts with k
    samples each, with their standard errors over prompts."""
    P, k = correct_PxK.shape
    per_prompt_P = correct_PxK.mean(axis=1)
    any_P = correct_PxK.any(axis=1).astype(np.float64)
    se = lambda x_P: float(x_P.std(ddof=1) / np.sqrt(P)) if P > 1 else float("nan")
    return {"pass_at_1": float(per_prompt_P.mean()), "pass_at_1_se": se(per_prompt_P),
            "pass_at_k": float(any_P.mean()), "pass_at_k_se": se(any_P)}


def _exact(record: dict, text: str, terminated: bool) -> bool:
    return terminated and text.strip() == str(record["answer"]).strip()


def make_feed(job: Job) -> Feed:
    run = job.run
    g, dc = run.objective.grpo, run.data
    if jax.process_count() > 1 and g.reward_run:
        raise RewardError("grpo.reward_run scores on one host; a multi-host GRPO run takes grpo.reward_fn")
    roles = run.vocab.require_roles()
    load = lambda split: examples.load_prompts(dc.dataset, split, job.tok, roles, run.seq_len, g.max_new_tokens,
                                               dc.validation_fraction, dc.test_fraction)
    batches = examples.PromptBatches(load("train"), run.batch_size, run.seed)
    score = scorer(g)
    # The sampler's distribution (temperature, the chat ids), as the train step's log-probs take it.
    logprobs = jax.jit(lambda params, batch: objectives.token_logprobs(run.model, params, batch["inputs"], batch["targets"],
                                                                       temperature=g.temperature, vocab_limit=roles.limit)[0])
    width = run.seq_len + 1
    cycle: dict = {}  # the sampled batch that grpo.num_iterations updates share, and its host metrics

    def rewards_of(records, answers, texts, step):
        terminated = np.array([bool(a) and a[-1] == roles.end for a in answers])
        return scored(_checked(score(records, texts), records, texts, step), terminated, g.unterminated_penalty), terminated

    def prepare(state, host_batch, step):
        # Later updates of a cycle train on the answers its first step sampled (the prompts drawn for
        # them go unused). A run resumed mid-cycle samples afresh at its first step.
        if cycle and (step - 1) % g.num_iterations:
            return cycle["device"], cycle["host"]
        prompts = host_batch["prompts"]
        rows, answers, texts = _answers(job, state.params, prompts, g.group_size, g.temperature, seed=run.seed * 1_000_003 + step)
        records = [p.record for p in prompts for _ in range(g.group_size)]
        rewards, terminated = rewards_of(records, answers, texts, step)
        batch = answer_rows(rows, answers, width, job.tok.pad_id)
        rewards_BxG = rewards.reshape(len(prompts), g.group_size)
        batch["advantages"] = np.asarray(objectives.group_advantages(rewards_BxG), np.float32).reshape(-1)
        rows_total = len(rows)
        lo, hi = sharding.host_rows(job.mesh, rows_total)
        device = job.put({k: v[lo:hi] for k, v in batch.items()}, rows_total)
        device["ref_logp"] = logprobs(job.reference(), device)
        if g.num_iterations > 1:
            device["old_logp"] = logprobs(state.params, device)
        host = {"reward": float(rewards.mean()), "reward_std": float(rewards_BxG.std(axis=1).mean()),
                "zero_variance_groups": zero_variance_fraction(rewards_BxG), "unterminated": float(1 - terminated.mean()),
                "answer_length": float(np.mean([len(a) for a in answers]))}
        cycle.update(device=device, host=host)
        return device, host

    def evaluate(params):
        held = load("validation")[: g.eval_prompts or None]
        exact = all("answer" in p.record for p in held)
        greedy, lengths, right, sampled, right_PxK = [], [], [], [], []
        for first in range(0, len(held), run.loop.eval_batch_size):
            chunk = held[first : first + run.loop.eval_batch_size]
            records = [p.record for p in chunk]
            _, answers, texts = _answers(job, params, chunk, 1, 0.0, seed=0)
            rewards, terminated = rewards_of(records, answers, texts, -1)
            greedy += list(rewards)
            lengths += [len(a) for a in answers]
            right += [_exact(r, t, e) for r, t, e in zip(records, texts, terminated)] if exact else []
            # group_size answers per prompt at the training temperature, from a seed fixed across evals.
            _, answers, texts = _answers(job, params, chunk, g.group_size, g.temperature, seed=run.seed + first)
            records = [r for r in records for _ in range(g.group_size)]
            rewards, terminated = rewards_of(records, answers, texts, -1)
            sampled += list(rewards)
            if exact:
                right_PxK.append(np.reshape([_exact(r, t, e) for r, t, e in zip(records, texts, terminated)], (len(chunk), g.group_size)))
        se = lambda x: float(np.std(x, ddof=1) / np.sqrt(len(x))) if len(x) > 1 else float("nan")
        out = {"eval_reward": float(np.mean(greedy)), "eval_reward_se": se(greedy), "eval_sampled_reward": float(np.mean(sampled)),
               "eval_sampled_reward_se": se(sampled), "eval_answer_length": float(np.mean(lengths)), "eval_prompts": len(held)}
        if exact:
            out.update(eval_exact_match=float(np.mean(right)), eval_exact_match_se=se(np.asarray(right, np.float64)),
                       **{f"eval_{k}": v for k, v in pass_rates(np.concatenate(right_PxK)).items()})
        return out

    return Feed(batches, prepare, evaluate if run.loop.eval_every_steps else None, check=lambda: load("validation"))


def train_grpo(run: RunSpec, workdir: str, quiet: bool = False) -> dict:
    return loop.train(run, workdir, quiet, feed=make_feed)


def exact_match_reward(record: dict, answer: str) -> float:
    """1 when the answer, stripped, equals the line's "answer" field, else 0."""
    return float(answer.strip() == str(record["answer"]).strip())

