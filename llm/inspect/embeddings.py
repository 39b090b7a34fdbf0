"""Word vectors: nearest neighbours by cosine similarity and analogies a - b + c (Mikolov et al. 2013),
on the input embedding and, when untied, the output head's rows. Ids from the tokenizer's vocabulary
size up are padding rows that were never trained, so they are never returned."""

import numpy as np

from llm.model import ModelConfig


def tables(cfg: ModelConfig, params) -> dict[str, np.ndarray]:
    """{"embed": [V, D]} and, untied, {"unembed": [V, D]} (the head transposed)."""
    out = {"embed": np.asarray(params["embed"], np.float32)}
    if not cfg.tie_embeddings:
        out["unembed"] = np.asarray(params["head"], np.float32).T
    return out


def _nearest(table_VxD: np.ndarray, query_D: np.ndarray, k: int, vocab_size: int, exclude=()) -> list[tuple[int, float]]:
    # float64: a row's cosine with itself is 1 to within 1e-15, so only a parallel row can tie with it.
    table_VxD, query_D = np.asarray(table_VxD[:vocab_size], np.float64), np.asarray(query_D, np.float64)
    unit_VxD = table_VxD / np.maximum(np.linalg.norm(table_VxD, axis=-1, keepdims=True), 1e-12)
    cos_V = unit_VxD @ (query_D / max(float(np.linalg.norm(query_D)), 1e-12))
    cos_V[list(exclude)] = -np.inf
    top = np.argsort(-cos_V, kind="stable")[:k]
    return [(int(i), float(cos_V[i])) for i in top]


def neighbours(table_VxD: np.ndarray, token: int, k: int, vocab_size: int) -> list[tuple[int, float]]:
    """The k ids most similar to `token` by cosine, every id ranked, `token` among them: it comes first
    unless another row points the same way (a tie, broken by the lower id)."""
    return _nearest(table_VxD, table_VxD[token], k, vocab_size)


def analogy(table_VxD: np.ndarray, a: int, b: int, c: int, k: int, vocab_size: int) -> list[tuple[int, float]]:
    """Ids nearest to a - b + c (big - biggest + smallest ~ small), leaving out a, b and c themselves."""
    return _nearest(table_VxD, table_VxD[a] - table_VxD[b] + table_VxD[c], k, vocab_size, exclude=(a, b, c))
