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
from llm.model.heads import lm_params, rewards
from llm.training.loss import cross_entropy_sums


def token_logprobs(cfg: ModelConfig, params, inputs_BxL, targets_BxL, segment_ids_BxL=None, positions_BxL=None):
    """(log p(target) [B, L], entropy of the next-token distribution [B, L]), float32."""
    logits_BxLxV, _ = model.apply(cfg, lm_params(params), inputs_BxL, segment_ids_BxL, positions_BxL)
    logp_BxLxV = jax.nn.log_softmax(logits_BxLxV.astype(jnp.float32), axis=-1)
    target_BxL = jnp.take_along_axis(logp_BxLxV, targets_BxL[..., None], axis=-1)[..., 0]
    entropy_BxL = -jnp.sum(jnp.exp(logp_BxLxV) * logp_BxLxV, axis=-1)
    return target_BxL, entropy_BxL


def bradley_terry_loss(reward_chosen, reward_rejected):
    """-log P(chosen beats rejected), with P = sigmoid(r_c - r_r) (Bradley and Terry 1952)."""
    return -jax.nn.log_sigmoid(reward_chosen - reward_rejected)


def dpo_loss(logp_chosen, logp_rejected, ref_chosen, ref_rejected, beta: float):
    """(loss, implicit reward of chosen, of rejected): the implicit reward beta * log(pi / pi_ref) of
    each answer in a Bradley-Terry loss (Rafailov et al. 2023)."""
    reward_c, reward_r = beta * (logp_chosen - ref_chosen), beta * (logp_rejected - ref_rejected)
    return bradley_terry_loss(reward_c, reward_r), reward_c, reward_r


def grpo_token_terms(logp_BxL, old_logp_BxL, ref_logp_BxL, advantages_B, clip_eps: float):
    """(clipped surrogate [B, L], KL(pi || pi_ref) per token [B, L], ratio [B, L])."""
    adv_Bx1 = advantages_B[:, None]
    ratio_BxL = jnp.exp(logp_BxL - old_logp_BxL)
    surrogate_BxL = jnp.minimum(ratio_BxL * adv_Bx1, jnp.clip(ratio_BxL, 1 - clip_eps, 1 + clip_eps) * adv_Bx1)
    # Schulman's k3 estimator of KL(pi || pi_ref): unbiased, never negative, zero where they agree.
    log_ref_ratio_BxL = ref_logp_BxL - logp_BxL
    return surrogate_BxL, jnp.exp(log_ref_ratio_BxL) - log_ref_ratio_BxL - 1, ratio_BxL


def make(objective: str, cfg: ModelConfig, z_loss: float = 0.0, dpo_beta: float = 0.1, clip_eps: float = 0.2,
         kl_coef: float = 0.04) -> Callable:
    """(params, batch) -> (objective sum, (metric sums, units))."""

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
            logp_BxL, _ = token_logprobs(cfg, params, batch[f"{side}_inputs"], batch[f"{side}_targets"])
            return jnp.sum(logp_BxL * batch[f"{side}_weights"], axis=-1)

        valid = batch.get("valid", jnp.ones(batch["chosen_inputs"].shape[0], jnp.float32))
        loss_B, reward_c, reward_r = dpo_loss(answer_logp("chosen"), answer_logp("rejected"), batch["chosen_ref_logp"],
                                              batch["rejected_ref_logp"], dpo_beta)
        loss_B = loss_B * valid
        metrics = {"loss": loss_B.sum(), "accuracy": jnp.sum((reward_c > reward_r) * valid),
                   "margin": jnp.sum((reward_c - reward_r) * valid), "chosen_reward": jnp.sum(reward_c * valid),
                   "rejected_reward": jnp.sum(reward_r * valid)}
        return loss_B.sum(), (metrics, valid.sum())

    def grpo(params, batch):
        logp_BxL, entropy_BxL = token_logprobs(cfg, params, batch["inputs"], batch["targets"])
        w_BxL = batch["weights"]
        # One update per sampled batch: the sampling policy is these very params, so its log-probs are
        # these, held constant (the ratio is 1; a second forward pass for them would be wasted).
        surrogate_BxL, kl_BxL, ratio_BxL = grpo_token_terms(logp_BxL, jax.lax.stop_gradient(logp_BxL), batch["ref_logp"], batch["advantages"], clip_eps)
        objective = jnp.sum((-surrogate_BxL + kl_coef * kl_BxL) * w_BxL)
        clipped = jnp.sum((jnp.abs(ratio_BxL - 1) > clip_eps) * w_BxL)
        metrics = {"loss": objective, "kl": jnp.sum(kl_BxL * w_BxL), "entropy": jnp.sum(entropy_BxL * w_BxL), "clip_fraction": clipped}
        return objective, (metrics, jnp.sum(w_BxL))

    return {"lm": lm, "reward": reward, "dpo": dpo, "grpo": grpo}[objective]


def answer_logprobs(cfg: ModelConfig, params, batch: dict, sides=("chosen", "rejected")) -> dict:
    """The reference's summed answer log-probs for DPO: {side}_ref_logp [B]."""
    out = {}
    for side in sides:
        logp_BxL, _ = token_logprobs(cfg, params, batch[f"{side}_inputs"], batch[f"{side}_targets"])
        out[f"{side}_ref_logp"] = jnp.sum(logp_BxL * batch[f"{side}_weights"], axis=-1)
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
