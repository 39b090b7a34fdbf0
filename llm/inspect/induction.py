"""Induction-head measures (Olsson et al. 2022, "In-context learning and induction heads").

A random sequence of T tokens followed by the same T again: a model with induction heads predicts
the second copy from the first, so its loss there falls far below the first copy's; an induction
head attends from a token in the second copy to the token after that token's earlier occurrence
(prefix matching). The in-context-learning score is the loss at a late position minus the loss at
an early one: negative when the context helps.
"""

import jax
import jax.numpy as jnp
import numpy as np

from llm.inspect.trace import trace
from llm.model import ModelConfig


def repeated_tokens(seed: int, batch: int, half: int, low: int, high: int) -> np.ndarray:
    """[batch, 2 * half]: `half` distinct random ids in [low, high), then the same ones again."""
    rng = np.random.default_rng(seed)
    first_BxT = np.stack([rng.choice(np.arange(low, high), half, replace=False) for _ in range(batch)]).astype(np.int32)
    return np.concatenate([first_BxT, first_BxT], axis=1)


def token_losses(logits_BxLxV, tokens_BxL) -> np.ndarray:
    """[B, L - 1]: the loss of predicting token t + 1 at position t."""
    logp_BxLxV = jax.nn.log_softmax(jnp.asarray(logits_BxLxV)[:, :-1].astype(jnp.float32), axis=-1)
    return np.asarray(-jnp.take_along_axis(logp_BxLxV, jnp.asarray(tokens_BxL)[:, 1:, None], axis=-1)[..., 0])


def repeated_tokens_loss(cfg: ModelConfig, params, tokens_Bx2T) -> dict[str, float]:
    """Mean loss on the first copy's tokens (after its first) and on the second copy's."""
    T = tokens_Bx2T.shape[1] // 2
    logits_BxLxV, _ = trace(cfg, params, tokens_Bx2T, names=[])
    loss_BxL1 = token_losses(logits_BxLxV, tokens_Bx2T)  # position t predicts t + 1
    return {"first_copy": float(loss_BxL1[:, : T - 1].mean()), "second_copy": float(loss_BxL1[:, T:].mean())}


def prefix_matching(probs_BxHxLxS, half: int) -> np.ndarray:
    """[H]: the mean attention from position i of the second copy to i - half + 1, the token after
    the current token's occurrence in the first copy."""
    probs_BxHxLxS = np.asarray(probs_BxHxLxS)
    queries = np.arange(half, 2 * half)
    return probs_BxHxLxS[:, :, queries, queries - half + 1].mean(axis=(0, 2))


def prefix_matching_scores(cfg: ModelConfig, params, tokens_Bx2T) -> np.ndarray:
    """[N, H]: every head's prefix-matching score on a repeated random sequence."""
    half = tokens_Bx2T.shape[1] // 2
    _, cache = trace(cfg, params, tokens_Bx2T, names="block_*/attn_probs_BxHxLxS")
    return np.stack([prefix_matching(cache[f"block_{i}/attn_probs_BxHxLxS"], half) for i in range(cfg.N)])


def in_context_score(cfg: ModelConfig, params, tokens_BxL, early: int, late: int, segment_ids_BxL=None) -> float:
    """Mean loss predicting the token after position `late` minus after position `early` (Olsson et al.
    use the 500th and 50th tokens); rows should be real text from one document."""
    logits_BxLxV, _ = trace(cfg, params, tokens_BxL, segment_ids_BxL, names=[])
    loss_BxL1 = token_losses(logits_BxLxV, tokens_BxL)
    return float(loss_BxL1[:, late].mean() - loss_BxL1[:, early].mean())


def in_context_bands(cfg: ModelConfig, params, tokens_BxL, bands: tuple[tuple[int, int], ...], chunk: int = 256) -> dict:
    """The in-context score with error bars: each window's mean loss in each band of positions [lo, hi)
    (a position predicts the token after it), and the last band's minus the first's per window; means and
    standard errors over the windows. Rows should be real text from one document each."""
    tokens_BxL = np.asarray(tokens_BxL, np.int32)
    per_window = []
    for first in range(0, len(tokens_BxL), chunk):
        rows = tokens_BxL[first : first + chunk]
        loss_BxL1 = token_losses(trace(cfg, params, rows, names=[])[0], rows)
        per_window.append(np.stack([loss_BxL1[:, lo:hi].mean(axis=1) for lo, hi in bands], axis=1))
    loss_WxN = np.concatenate(per_window).astype(np.float64)
    score_W = loss_WxN[:, -1] - loss_WxN[:, 0]
    se = lambda x: x.std(axis=0, ddof=1) / np.sqrt(len(x))
    return {"bands": [list(b) for b in bands], "windows": len(loss_WxN), "loss": loss_WxN.mean(axis=0).tolist(),
            "loss_se": se(loss_WxN).tolist(), "score": float(score_W.mean()), "score_se": float(se(score_W))}
