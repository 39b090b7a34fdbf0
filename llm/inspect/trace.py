"""One forward pass that returns every named activation: the residual stream around each sublayer,
each head's attention probabilities and output, the MLP hidden units.

Names carry shapes: "block_{i}/resid_pre_BxLxD", ".../attn_probs_BxHxLxS", ".../head_out_BxLxHxK"
(each head's value mix before wo, so a head's write into the residual stream is head_out @ wo[h]),
".../write_attn_BxLxD" (what the attention sublayer adds to the stream), ".../resid_mid_BxLxD",
".../mlp_hidden_BxLxF", ".../write_mlp_BxLxD", ".../resid_post_BxLxD" and "final_resid_BxLxD"
(before the final norm). A scanned model sows them stacked on a layer axis; they are split here, so
both layouts give the same names.
"""

import dataclasses
import fnmatch
import functools
from collections.abc import Mapping
from typing import Callable, Iterable

import jax
import jax.numpy as jnp

from llm.inspect import InspectError
from llm.model import ModelConfig, transformer

BLOCK_LEAVES = ("resid_pre_BxLxD", "attn_probs_BxHxLxS", "head_out_BxLxHxK", "write_attn_BxLxD", "resid_mid_BxLxD", "mlp_hidden_BxLxF",
                "write_mlp_BxLxD", "resid_post_BxLxD")
FINAL = "final_resid_BxLxD"
_SUBMODULE = {"attn_probs_BxHxLxS": "attn", "head_out_BxLxHxK": "attn", "mlp_hidden_BxLxF": "mlp"}  # sown below the block

Names = None | str | Iterable[str] | Callable[[str], bool]


def all_names(cfg: ModelConfig) -> list[str]:
    """Every activation a trace returns; an attention-only model (F = 0) has no mlp_hidden (its
    resid_post equals resid_mid)."""
    leaves = [leaf for leaf in BLOCK_LEAVES if cfg.F or leaf not in ("mlp_hidden_BxLxF", "write_mlp_BxLxD")]
    return [f"block_{i}/{leaf}" for i in range(cfg.N) for leaf in leaves] + [FINAL]


def select(cfg: ModelConfig, names: Names) -> tuple[str, ...]:
    """None: everything; a glob or a list of globs ("block_*/attn_probs*"); or a predicate on the name."""
    every = all_names(cfg)
    if names is None:
        return tuple(every)
    if callable(names):
        return tuple(n for n in every if names(n))
    patterns = [names] if isinstance(names, str) else list(names)
    for p in patterns:
        if not fnmatch.filter(every, p):
            raise InspectError(f"no activation is named like {p!r}; names look like {every[0]!r}, {every[2]!r}, {FINAL!r}")
    return tuple(n for n in every if any(fnmatch.fnmatchcase(n, p) for p in patterns))


def path_of(name: str) -> tuple[str, ...]:
    """Where in an unscanned model the activation `name` is sown (and an intervention on it is read)."""
    if name == FINAL:
        return (FINAL,)
    block, leaf = name.split("/")
    if leaf not in BLOCK_LEAVES or not block.startswith("block_"):
        raise InspectError(f"{name!r} is not an activation name (see llm/inspect/trace.py)")
    return (block, _SUBMODULE[leaf], leaf) if leaf in _SUBMODULE else (block, leaf)


def _flatten(tree, prefix=()) -> dict[str, jax.Array]:
    out = {}
    for key, value in tree.items():
        if isinstance(value, Mapping):
            out.update(_flatten(value, prefix + (key,)))
            continue
        (x,) = value  # sow keeps a tuple of every call; each tap is called once
        if prefix and prefix[0] == "blocks":  # nn.scan: one array per name, layers on axis 0
            out.update({f"block_{i}/{key}": x[i] for i in range(x.shape[0])})
        elif prefix:
            out[f"{prefix[0]}/{key}"] = x
        else:
            out[key] = x
    return out


def unscanned(cfg: ModelConfig, params) -> tuple[ModelConfig, dict]:
    """The same model with one `block_{i}` per layer: interventions address a layer by its path."""
    if not cfg.scan_layers:
        return cfg, params
    params = dict(params)
    stacked = params.pop("blocks")
    params.update({f"block_{i}": jax.tree.map(lambda a, i=i: a[i], stacked) for i in range(cfg.N)})
    return dataclasses.replace(cfg, scan_layers=False), params


def interventions_tree(interventions: dict[str, tuple]) -> dict:
    """{name: (where, value)} -> the nested `interventions` collection llm/model/tap.py reads."""
    tree: dict = {}
    for name, pair in interventions.items():
        *parents, leaf = path_of(name)
        node = tree
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = tuple(pair)
    return tree


@functools.partial(jax.jit, static_argnums=(0, 1))
def _forward(cfg: ModelConfig, keep: tuple[str, ...], params, tokens_BxL, segment_ids_BxL, interventions):
    variables = {"params": params, **({"interventions": interventions} if interventions else {})}
    (logits_BxLxV, _), state = transformer.Transformer(cfg).apply(variables, tokens_BxL, segment_ids_BxL, mutable=["intermediates"])
    # Only the kept names leave the jitted function; XLA drops the rest, so long inputs stay bounded.
    flat = _flatten(state["intermediates"])
    return logits_BxLxV, {name: flat[name] for name in keep}


def trace(cfg: ModelConfig, params, tokens_BxL, segment_ids_BxL=None, names: Names = None,
          interventions: dict[str, tuple] | None = None) -> tuple[jax.Array, dict[str, jax.Array]]:
    """(logits [B, L, V] float32, {name: activation}) with `interventions` ({name: (where, value)}) applied."""
    keep = select(cfg, names)
    if interventions:
        cfg, params = unscanned(cfg, params)
    # Probabilities come from the einsum path whatever model.attention is; nothing is differentiated.
    traced = dataclasses.replace(cfg, trace=True, remat="none")
    iv = interventions_tree(interventions) if interventions else None
    return _forward(traced, keep, params, jnp.asarray(tokens_BxL, jnp.int32), segment_ids_BxL, iv)
