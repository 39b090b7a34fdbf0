"""How init, forward multipliers and per-parameter learning rates change with width and depth
(model.parametrization, model.depth_parametrization).

    sp         the standard parametrization: GPT-2's init (std 0.02, output projections 0.02 / sqrt(2 N)),
               attention logits / sqrt(d_head), one learning rate for every parameter.
    mup        the maximal update parametrization in the form of Tensor Programs V's Table 8 (Yang et al.
               2022, the formulation that allows a tied embedding and unembedding), written relative to a
               base width so that mup equals sp at model.base_width. With m = d_model / base_width:
               hidden matrices (q, k, v, attention out, MLP in/gate/out) init std / sqrt(m) and Adam
               learning rate / m; embeddings, norms, biases and the head keep sp's init and learning rate;
               the logits are multiplied by model.output_multiplier / m; attention logits are scaled
               1/d_head (sqrt(model.base_head_dim) / d_head; its default, base_width / num_heads, holds
               the heads fixed as width grows); Adam's epsilon / m.
    completep  (depth) Dey et al. 2025's alpha = 1: every residual branch is multiplied by base_depth / L,
               the output projections' init uses the base depth in GPT-2's 1/sqrt(2 L), hidden Adam
               epsilon is further divided by L / base_depth. Their learning-rate correction,
               (L / base_depth)^(alpha - 1), is 1 at alpha = 1.

Weight decay stays coupled to each parameter's learning rate (optax's decoupled AdamW multiplies it
by the scaled rate), as the mup package's MuAdamW does.
"""

import dataclasses

import jax

HIDDEN = ("wq", "wk", "wv", "wo", "wi", "wg")  # the matrices whose fan-in and fan-out both grow with width
DEPTH_ALPHA = 1.0  # completep


@dataclasses.dataclass(frozen=True)
class Parametrization:
    width: str = "sp"  # 'sp' | 'mup'
    depth: str = "none"  # 'none' | 'completep'
    width_mult: float = 1.0  # d_model / model.base_width
    head_dim_mult: float = 1.0  # d_head / model.base_head_dim
    depth_mult: float = 1.0  # layers / model.base_depth
    output_multiplier: float = 1.0  # mup's tunable alpha_out on the logits

    @property
    def mup(self) -> bool:
        return self.width == "mup"

    @property
    def completep(self) -> bool:
        return self.depth == "completep"


def init_std_scale(p: Parametrization) -> float:
    return p.width_mult**-0.5 if p.mup else 1.0


def init_depth(p: Parametrization, layers: int) -> float:
    """The depth in GPT-2's output-projection init: under completep the base depth's, whatever the depth."""
    return layers / p.depth_mult if p.completep else layers


def qk_scale(p: Parametrization) -> float:
    """Multiplies the queries: 1/sqrt(d_head) becomes sqrt(base d_head) / d_head."""
    return p.head_dim_mult**-0.5 if p.mup else 1.0


def residual_scale(p: Parametrization) -> float:
    return p.depth_mult**-DEPTH_ALPHA if p.completep else 1.0


def logit_scale(p: Parametrization) -> float:
    return p.output_multiplier / p.width_mult if p.mup else p.output_multiplier


def _is_hidden(path) -> bool:
    return getattr(path[-1], "key", None) in HIDDEN


def lr_scales(p: Parametrization, params):
    """Per-parameter multipliers of the learning rate (a tree like params)."""
    hidden = 1.0 / p.width_mult if p.mup else 1.0
    hidden *= p.depth_mult ** (DEPTH_ALPHA - 1.0) if p.completep else 1.0
    return jax.tree_util.tree_map_with_path(lambda path, _: hidden if _is_hidden(path) else 1.0, params)


def eps_scales(p: Parametrization, params):
    """Per-parameter multipliers of Adam's epsilon."""
    everywhere = 1.0 / p.width_mult if p.mup else 1.0
    hidden = everywhere * (p.depth_mult**-DEPTH_ALPHA if p.completep else 1.0)
    return jax.tree_util.tree_map_with_path(lambda path, _: hidden if _is_hidden(path) else everywhere, params)
