"""One forward pass that returns every named activation: the residual stream around each sublayer,
each head's attention probabilities and output, the MLP hidden units.

Names carry shapes: "block_{i}/resid_pre_BxLxD", ".../q_BxLxHxK", ".../k_BxLxGxK", ".../v_BxLxGxK" (each
head's query, key and value, after RoPE where there is one), ".../attn_probs_BxHxLxS", ".../head_out_BxLxHxK"
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

BLOCK_LEAVES = ("resid_pre_BxLxD", "q_BxLxHxK", "k_BxLxGxK", "v_BxLxGxK", "attn_probs_BxHxLxS", "head_out_BxLxHxK", "write_attn_BxLxD",
                "resid_mid_BxLxD", "mlp_hidden_BxLxF", "write_mlp_BxLxD", "resid_post_BxLxD")
FINAL = "final_resid_BxLxD"
_SUBMODULE = {"q_BxLxHxK": "attn", "k_BxLxGxK": "attn", "v_BxLxGxK": "attn", "attn_probs_BxHxLxS": "attn", "head_out_BxLxHxK": "attn",
              "mlp_hidden_BxLxF": "mlp"}  # sown below the block

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


def nested(values: dict[str, object]) -> dict:
    """{name: value} -> the nested collection (interventions, perturbations) llm/model/tap.py reads."""
    tree: dict = {}
    for name, value in values.items():
        *parents, leaf = path_of(name)
        node = tree
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    return tree


def interventions_tree(interventions: dict[str, tuple]) -> dict:
    """{name: (where, value)} -> the nested `interventions` collection."""
    return nested({name: tuple(pair) for name, pair in interventions.items()})


def document_positions(segment_ids_BxL: jax.Array) -> jax.Array:
    """Each token's position within its run of equal segment ids: the positions llm/data/packing.py gives
    a packed row's documents, so a traced row sees the positions training and eval gave it."""
    L = segment_ids_BxL.shape[1]
    index_BxL = jnp.broadcast_to(jnp.arange(L), segment_ids_BxL.shape)
    first_BxL = jnp.concatenate([jnp.ones_like(segment_ids_BxL[:, :1], bool), segment_ids_BxL[:, 1:] != segment_ids_BxL[:, :-1]], axis=1)
    return index_BxL - jax.lax.cummax(jnp.where(first_BxL, index_BxL, 0), axis=1)


def positions_for(segment_ids_BxL, positions_BxL):
    """The positions to run with: the given ones, else each document's own when rows carry segment ids
    (document packing), else None (0..L-1, what concat packing and a single prompt use)."""
    if positions_BxL is not None:
        return jnp.asarray(positions_BxL, jnp.int32)
    return None if segment_ids_BxL is None else document_positions(jnp.asarray(segment_ids_BxL, jnp.int32))


def apply(cfg: ModelConfig, params, tokens_BxL, segment_ids_BxL, positions_BxL, interventions, perturbations=None):
    """(logits, the flat {name: activation}) of a traced model; perturbations ({name: delta}, nested as
    interventions are) are added to their activations, so a gradient with respect to them is one with
    respect to the activation."""
    variables = {"params": params, **({"interventions": interventions} if interventions else {}),
                 **({"perturbations": perturbations} if perturbations else {})}
    (logits_BxLxV, _), state = transformer.Transformer(cfg).apply(variables, tokens_BxL, segment_ids_BxL, positions_BxL,
                                                                  mutable=["intermediates"])
    return logits_BxLxV, _flatten(state["intermediates"])


@functools.partial(jax.jit, static_argnums=(0, 1))
def _forward(cfg: ModelConfig, keep: tuple[str, ...], params, tokens_BxL, segment_ids_BxL, positions_BxL, interventions):
    logits_BxLxV, flat = apply(cfg, params, tokens_BxL, segment_ids_BxL, positions_BxL, interventions)
    # Only the kept names leave the jitted function; XLA drops the rest, so long inputs stay bounded.
    return logits_BxLxV, {name: flat[name] for name in keep}


def traced(cfg: ModelConfig) -> ModelConfig:
    # Probabilities come from the einsum path whatever model.attention is.
    return dataclasses.replace(cfg, trace=True, remat="none")


def trace(cfg: ModelConfig, params, tokens_BxL, segment_ids_BxL=None, names: Names = None,
          interventions: dict[str, tuple] | None = None, positions_BxL=None) -> tuple[jax.Array, dict[str, jax.Array]]:
    """(logits [B, L, V] float32, {name: activation}) with `interventions` ({name: (where, value)}) applied.
    Positions: `positions_BxL`, else per document from the segment ids (as training and eval number them)."""
    keep = select(cfg, names)
    if interventions:
        cfg, params = unscanned(cfg, params)
    iv = interventions_tree(interventions) if interventions else None
    segment_ids_BxL = None if segment_ids_BxL is None else jnp.asarray(segment_ids_BxL, jnp.int32)
    return _forward(traced(cfg), keep, params, jnp.asarray(tokens_BxL, jnp.int32), segment_ids_BxL,
                    positions_for(segment_ids_BxL, positions_BxL), iv)
