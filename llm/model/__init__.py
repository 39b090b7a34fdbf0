"""The Transformer (llm/model/transformer.py) in its three arrangements, its attention, its exact
parameter and FLOP counts, a reward model's head, and the KV-cache sampler that decodes it.

The package's names are the model's interface: `model.init`, `model.apply`, `model.forward`,
`model.param_counts`, `model.flops_per_token`, `ModelConfig`."""

from llm.model.counts import flops_per_token, param_counts
from llm.model.transformer import ModelConfig, apply, forward, init, unembed

__all__ = ["ModelConfig", "apply", "flops_per_token", "forward", "init", "param_counts", "unembed"]
