"""Weight projections written as one 2-D matmul each.

XLA:CPU compiles the weight gradient of a contraction over several batch axes (dW of
einsum("bld,df->blf") contracts both b and l) into strided transpose fusions that cost several times
the matmul itself. With the batch axes merged first the same products compile to plain GEMMs: the
nanoGPT-sized train step went from 88 to 49 ms (experiments/perf/README.md). On TPU/GPU the
reshapes are free.
"""

import math

import jax
import jax.numpy as jnp


def project(x: jax.Array, w: jax.Array, contract: int = 1, preferred_element_type=None) -> jax.Array:
    """Contracts the last `contract` axes of x with the first `contract` axes of w."""
    lead, w_in, w_out = x.shape[: x.ndim - contract], w.shape[:contract], w.shape[contract:]
    x_MxI = x.reshape(math.prod(lead), math.prod(w_in))
    w_IxO = w.reshape(math.prod(w_in), math.prod(w_out))
    y_MxO = jnp.dot(x_MxI, w_IxO, preferred_element_type=preferred_element_type)
    return y_MxO.reshape(*lead, *w_out)
