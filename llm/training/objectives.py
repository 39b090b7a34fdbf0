"""One loss per objective over a batch: next-token (pretraining and SFT: the loss mask is the batch's
weights), Bradley-Terry reward modelling, DPO and GRPO.

Each returns (objective summed over its units, (metric sums, number of units)); the train step
divides gradients and metrics by the units once, so gradient accumulation equals a larger batch.
Frozen inputs (the reference model's log-probs, advantages) arrive on the batch.
"""

import functools
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from llm import model
from llm.data import examples, template
from llm.data.tokenizer import Tokenizer
from llm.model import ModelConfig
from llm.model.attention import NEG_INF
from llm.model.heads import lm_params, rewards
from llm.training.loss import cross_entropy_sums


def sampled_logprobs(logits_BxLxV, targets_BxL, temperature: float = 1.0, vocab_limit: int | None = None):
    """(log p(target) [B, L], entropy [B, L]) of the distribution the sampler draws from: the logits over
    temperature, ids from vocab_limit on excluded (float32)."""
    logits_BxLxV = logits_BxLxV.astype(jnp.float32) / temperature
    if vocab_limit is not None:
        logits_BxLxV = jnp.where(jnp.arange(logits_BxLxV.shape[-1]) < vocab_limit, logits_BxLxV, NEG_INF)
    logp_BxLxV = jax.nn.log_softmax(logits_BxLxV, axis=-1)
    target_BxL = jnp.take_along_axis(logp_BxLxV, targets_BxL[..., None], axis=-1)[..., 0]
    # exp(NEG_INF - lse) is exactly 0, so the masked ids add 0 * (finite) = 0.
    entropy_BxL = -jnp.sum(jnp.exp(logp_BxLxV) * logp_BxLxV, axis=-1)
    return target_BxL, entropy_BxL


def token_logprobs(cfg: ModelConfig, params, inputs_BxL, targets_BxL, segment_ids_BxL=None, positions_BxL=None,
                   temperature: float = 1.0, vocab_limit: int | None = None):
    """sampled_logprobs of the model's logits over these inputs."""
    logits_BxLxV, _ = model.apply(cfg, lm_params(params), inputs_BxL, segment_ids_BxL, positions_BxL)
    return sampled_logprobs(logits_BxLxV, targets_BxL, temperature, vocab_limit)


def bradley_terry_loss(reward_chosen, reward_rejected):
    """-log P(chosen beats rejected), with P = sigmoid(r_c - r_r) (Bradley and Terry 1952)."""
    return -jax.nn.log_sigmoid(reward_chosen - reward_rejected)


def dpo_loss(logp_chosen, logp_rejected, ref_chosen, ref_rejected, beta: float):
    """(loss, implicit reward of chosen, of rejected): the implicit reward beta * log(pi / pi_ref) of
    each answer in a Bradley-Terry loss (Rafailov et al. 2023)."""
    reward_c, reward_r = beta * (logp_chosen - ref_chosen), beta * (logp_rejected - ref_rejected)
    return bradley_terry_loss(reward_c, reward_r), reward_c, reward_r


def grpo_token_terms(logp_BxL, old_logp_BxL, ref_logp_BxL, advantages_B, weights_BxL, clip_eps: float):
    """(clipped surrogate [B, L], KL(pi || pi_ref) per token [B, L], clipped [B, L]: where the clip
    holds the ratio, so the token adds no gradient), each zero where weights_BxL is."""
    adv_Bx1 = advantages_B[:, None]
    on_BxL = weights_BxL > 0
    # Padding positions hold arbitrary log-probs: zero their differences before any exp, since
    # exp(overflow) * 0 would be inf * 0 = NaN in the sum and its gradient.
    log_ratio_BxL = jnp.where(on_BxL, logp_BxL - old_logp_BxL, 0.0)
    ratio_BxL = jnp.exp(log_ratio_BxL)
    surrogate_BxL = jnp.minimum(ratio_BxL * adv_Bx1, jnp.clip(ratio_BxL, 1 - clip_eps, 1 + clip_eps) * adv_Bx1)
    clipped_BxL = on_BxL & (((ratio_BxL > 1 + clip_eps) & (adv_Bx1 > 0)) | ((ratio_BxL < 1 - clip_eps) & (adv_Bx1 < 0)))
    # Schulman's k3 estimator of KL(pi || pi_ref): unbiased, never negative, zero where they agree.
    log_ref_ratio_BxL = jnp.where(on_BxL, ref_logp_BxL - logp_BxL, 0.0)
    kl_BxL = jnp.exp(log_ref_ratio_BxL) - log_ref_ratio_BxL - 1
    return surrogate_BxL * weights_BxL, kl_BxL * weights_BxL, clipped_BxL


def make(objective: str, cfg: ModelConfig, z_loss: float = 0.0, dpo_beta: float = 0.1, dpo_nll_coef: float = 0.0, clip_eps: float = 0.2,
         kl_coef: float = 0.04, temperature: float = 1.0, vocab_limit: int | None = None) -> Callable:
    """(params, batch) -> (objective sum, (metric sums, units)). temperature and vocab_limit: the
    distribution DPO's and GRPO's log-probs are taken under, the sampler's (GRPO's temperature, the
    chat template's ids)."""
    logprobs = functools.partial(token_logprobs, temperature=temperature, vocab_limit=vocab_limit)

    def lm(params, batch):
        logits_BxLxV = model.forward(cfg, params, batch)
        loss_sum, z_sum, num_tokens = cross_entropy_sums(logits_BxLxV, batch["targets"], batch["weights"], z_loss)
        return loss_sum + z_sum, ({"loss": loss_sum}, num_tokens)

    def reward(params, batch):
        r_c = rewards(cfg, params, batch["chosen_inputs"], batch["chosen_last"])
        r_r = rewards(cfg, params, batch["rejected_inputs"], batch["rejected_last"])
        valid = batch.get("valid", jnp.ones_like(r_c))
        loss_B = bradley_terry_loss(r_c, r_r) * valid
        metrics = {"loss": loss_B.sum(), "accuracy": jnp.sum((r_c > r_r) * valid), "margin": jnp.sum((r_c - r_r) * valid)}
        return loss_B.sum(), (metrics, valid.sum())

    def dpo(params, batch):
        def answer_logp(side):
            logp_BxL, _ = logprobs(cfg, params, batch[f"{side}_inputs"], batch[f"{side}_targets"])
            return jnp.sum(jnp.where(batch[f"{side}_weights"] > 0, logp_BxL, 0.0), axis=-1)

        valid = batch.get("valid", jnp.ones(batch["chosen_inputs"].shape[0], jnp.float32))
        logp_chosen_B = answer_logp("chosen")
        loss_B, reward_c, reward_r = dpo_loss(logp_chosen_B, answer_logp("rejected"), batch["chosen_ref_logp"],
                                              batch["rejected_ref_logp"], dpo_beta)
        if dpo_nll_coef:
            # RPO (Pang et al. 2024): the chosen answer's mean token NLL keeps its likelihood from falling with the rejected's.
            loss_B = loss_B - dpo_nll_coef * logp_chosen_B / jnp.maximum(batch["chosen_weights"].sum(axis=-1), 1.0)
        loss_B = loss_B * valid
        metrics = {"loss": loss_B.sum(), "accuracy": jnp.sum((reward_c > reward_r) * valid),
                   "margin": jnp.sum((reward_c - reward_r) * valid), "chosen_reward": jnp.sum(reward_c * valid),
                   "rejected_reward": jnp.sum(reward_r * valid)}
        return loss_B.sum(), (metrics, valid.sum())

    def grpo(params, batch):
        logp_BxL, entropy_BxL = logprobs(cfg, params, batch["inputs"], batch["targets"])
        w_BxL = batch["weights"]
        # grpo.num_iterations=1: the sampling policy is these very params, so its log-probs are these,
        # held constant (the ratio is 1 and a forward pass for them would be wasted). Later updates on
        # the same answers bring the sampling policy's log-probs on the batch.
        old_logp_BxL = batch["old_logp"] if "old_logp" in batch else jax.lax.stop_gradient(logp_BxL)
        surrogate_BxL, kl_BxL, clipped_BxL = grpo_token_terms(logp_BxL, old_logp_BxL, batch["ref_logp"], batch["advantages"], w_BxL, clip_eps)
        objective = jnp.sum(-surrogate_BxL + kl_coef * kl_BxL)
        metrics = {"loss": objective, "kl": jnp.sum(kl_BxL), "entropy": jnp.sum(jnp.where(w_BxL > 0, entropy_BxL, 0.0) * w_BxL),
                   "clip_fraction": jnp.sum(clipped_BxL * w_BxL)}
        return objective, (metrics, jnp.sum(w_BxL))

    return {"lm": lm, "reward": reward, "dpo": dpo, "grpo": grpo}[objective]


def answer_logprobs(cfg: ModelConfig, params, batch: dict, vocab_limit: int | None = None, sides=("chosen", "rejected")) -> dict:
    """The reference's summed answer log-probs for DPO, under the chat template's ids as the policy's
    are: {side}_ref_logp [B]."""
    out = {}
    for side in sides:
        logp_BxL, _ = token_logprobs(cfg, params, batch[f"{side}_inputs"], batch[f"{side}_targets"], vocab_limit=vocab_limit)
        out[f"{side}_ref_logp"] = jnp.sum(jnp.where(batch[f"{side}_weights"] > 0, logp_BxL, 0.0), axis=-1)
    return out


def group_advantages(rewards_BxG: jax.Array, eps: float = 1e-6) -> jax.Array:
    """GRPO's advantages: each answer's reward less its group's mean, over the group's std (a group
    whose answers all score the same teaches nothing: zeros)."""
    mean_Bx1 = rewards_BxG.mean(axis=1, keepdims=True)
    std_Bx1 = rewards_BxG.std(axis=1, keepdims=True)
    return (rewards_BxG - mean_Bx1) / (std_Bx1 + eps)


def reward_scores(cfg: ModelConfig, params, tok: Tokenizer, roles: template.RoleIds, prompts: Sequence[str],
                  responses: Sequence[str], batch_size: int = 16) -> list[float]:
    """A reward model's scalar score of each (prompt, response), rendered as its training pairs were."""
    width = cfg.L + 1
    rows = [examples.pair_row(tok, roles, p, r, width) for p, r in zip(prompts, responses)]
    reward = _jitted_rewards(cfg)
    scores = []
    for first in range(0, len(rows), batch_size):
        chunk = rows[first : first + batch_size]
        tokens_BxW = np.zeros((batch_size, width), np.int32)
        last_B = np.zeros(batch_size, np.int32)
        for i, (tokens, _, last) in enumerate(chunk):
            tokens_BxW[i], last_B[i] = tokens, last
        scores += np.asarray(reward(params, jnp.asarray(tokens_BxW[:, :-1]), jnp.asarray(last_B)))[: len(chunk)].tolist()
    return scores


@functools.lru_cache(maxsize=4)
def _jitted_rewards(cfg: ModelConfig) -> Callable:
    return jax.jit(lambda params, tokens_BxL, last_B: rewards(cfg, params, tokens_BxL, last_B))
