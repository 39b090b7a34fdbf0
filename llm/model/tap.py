"""The one hook llm/inspect looks through: a named activation inside the model, recorded and swappable.

Modules call `tap` only when ModelConfig.trace is on, so a forward without it compiles to exactly the
program it did before tracing existed (tests/test_inspect.py compares the HLO).
"""

import flax.linen as nn
import jax
import jax.numpy as jnp


def tap(module: nn.Module, name: str, x: jax.Array) -> jax.Array:
    """x, or an intervention's replacement where one is given; sown into `intermediates` either way.

    An intervention is a (where, value) pair in the `interventions` collection at this module's path:
    x becomes value where `where` is true (both broadcast against x), so one mechanism does patching
    (where everywhere), zero-ablation (value 0) and mean-ablation (value a mean) of heads or neurons.
    A `perturbations` entry is added to x: zero, it changes nothing, and the gradient with respect to
    it is the gradient with respect to the activation (attribution patching).
    """
    if module.has_variable("interventions", name):
        where, value = module.get_variable("interventions", name)
        x = jnp.where(where, jnp.asarray(value, x.dtype), x)
    if module.has_variable("perturbations", name):
        x = x + module.get_variable("perturbations", name).astype(x.dtype)
    module.sow("intermediates", name, x)
    return x
