"""Activations pinned to their logical axes: the batch over the data-parallel mesh axes, heads and MLP
units over the tensor axis, everything else whole on each device.

Params carry logical axes (llm/training/sharding.py maps them to the mesh); activations need them too,
or XLA's sharding propagation is free to reshard them: under FSDP the weights and the batch share the
fsdp axis on different dimensions, and for some matmuls it chose to all-gather the [B, L, F] activation
or all-to-all the heads instead of all-gathering the weight (what ./run.sh compile's collectives showed).
A no-op unless the caller traces the model under a mesh and axis rules (llm/training/state.py does):
sampling and llm/inspect run as before.
"""

import flax.linen as nn
import jax

RESIDUAL = ("batch", "length", "act_embed")  # act_embed and length map to no mesh axis: whole per device
HEADS = ("batch", "length", "heads", "kv")
KV_HEADS = ("batch", "length", "kv_heads", "kv")
HIDDEN = ("batch", "length", "mlp")
LOGITS = ("batch", "length", "vocab")


def constrain(x: jax.Array, names: tuple[str, ...]) -> jax.Array:
    return nn.with_logical_constraint(x, names)
