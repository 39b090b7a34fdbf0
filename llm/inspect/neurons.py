"""The held-out contexts that activate an MLP neuron most: the feed-forward layer read as a key-value
memory whose keys are input patterns (Geva et al. 2021, "Transformer feed-forward layers are
key-value memories"). A split is streamed batch by batch and only a running top-k is kept, so memory
stays bounded whatever the split's length."""

import functools
from typing import Iterable

import jax
import jax.numpy as jnp
import numpy as np

from llm.inspect import InspectError
from llm.inspect.trace import trace
from llm.model import ModelConfig


def check_neuron(cfg: ModelConfig, layer: int, neuron: int) -> None:
    if not 0 <= layer < cfg.N:
        raise InspectError(f"layer must lie in 0..{cfg.N - 1}, not {layer}")
    if not cfg.F:
        raise InspectError("this model is attention-only (model.d_ff=0): it has no MLP neurons")
    if not 0 <= neuron < cfg.F:
        raise InspectError(f"neuron must lie in 0..{cfg.F - 1} (the MLP's hidden width), not {neuron}")


@functools.partial(jax.jit, static_argnums=(0, 1, 2))  # the neuron is an argument: one compile serves a layer's every unit
def _batch_top(cfg: ModelConfig, layer: int, k: int, params, neuron, batch: dict):
    """The batch's k largest activations of the neuron over positions that predict a real target, and
    their flat row * L + position indices; padding (weight 0) never competes."""
    name = f"block_{layer}/mlp_hidden_BxLxF"
    _, cache = trace(cfg, params, batch["inputs"], batch.get("segment_ids"), names=[name], positions_BxL=batch.get("positions"))
    act_BxL = jnp.where(batch["weights"] > 0, cache[name][..., neuron].astype(jnp.float32), -jnp.inf)
    return jax.lax.top_k(act_BxL.reshape(-1), min(k, act_BxL.size))


def _window(batch: dict, row: int, position: int, before: int, after: int) -> tuple[list[int], int, list[int]]:
    """(tokens the model saw before `position`, the token, the targets after it), cut at the row's edges
    and, in packed documents, at the document's."""
    inputs_L, targets_L, weights_L = batch["inputs"][row], batch["targets"][row], batch["weights"][row]
    start = max(0, position - before)
    if "segment_ids" in batch:
        same_L = batch["segment_ids"][row] == batch["segment_ids"][row][position]
        start += int(np.argmax(same_L[start : position + 1]))
    real = weights_L[position : position + after] > 0  # a document's end or the padding stops the window
    following = targets_L[position : position + (len(real) if real.all() else int(np.argmin(real)))]
    return [int(t) for t in inputs_L[start:position]], int(inputs_L[position]), [int(t) for t in following]


def top_activations(cfg: ModelConfig, params, batches: Iterable[dict], layer: int, neuron: int, k: int = 10,
                    max_batches: int = 0, before: int = 40, after: int = 10) -> list[dict]:
    """The k largest activations of neuron `neuron` of block `layer`'s MLP hidden units over the batches
    (the eval batches of llm/training/batches.held_out; 0 max_batches: all), largest first, ties in reading order. Each is
    {"activation", "row" (over all batches), "position", "before", "token", "after"} with token ids."""
    check_neuron(cfg, layer, neuron)
    if k < 1:
        raise InspectError(f"k must be at least 1, not {k}")
    best: list[dict] = []
    row_offset = 0
    for i, batch in enumerate(batches):
        if max_batches and i >= max_batches:
            break
        values, flat = jax.device_get(_batch_top(cfg, layer, k, params, neuron, {key: jnp.asarray(v) for key, v in batch.items()}))
        L = batch["inputs"].shape[1]
        for value, index in zip(values.tolist(), flat.tolist()):
            if value == -np.inf:
                break
            row, position = divmod(int(index), L)
            before_ids, token, after_ids = _window(batch, row, position, before, after)
            best.append({"activation": float(value), "row": row_offset + row, "position": position,
                         "before": before_ids, "token": token, "after": after_ids})
        best = sorted(best, key=lambda c: (-c["activation"], c["row"], c["position"]))[:k]
        row_offset += batch["inputs"].shape[0]
    if not best:
        raise ValueError("the batches have no tokens to score")
    return best
