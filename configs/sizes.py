"""Named model sizes, the one place sweeps and run configs look them up."""

# name -> (d_model, num_layers, num_heads, d_ff)
SIZES = {
    "nano": (64, 2, 2, 256),
    "micro": (96, 3, 3, 384),
    "tiny": (128, 4, 4, 512),
    "mini": (192, 4, 6, 768),
    "small": (256, 6, 8, 1024),
    "medium": (384, 8, 8, 1536),
    "base": (512, 8, 8, 2048),
    "gpt2-small": (768, 12, 12, 3072),
    "gpt2-medium": (1024, 24, 16, 4096),
}


def apply_size(config, name: str):
    """Sets model.{d_model,num_layers,num_heads,num_kv_heads,d_ff} from a named size."""
    if name not in SIZES:
        raise ValueError(f"unknown model size {name!r}; known sizes: {', '.join(SIZES)}")
    d_model, num_layers, num_heads, d_ff = SIZES[name]
    config.model.d_model = d_model
    config.model.num_layers = num_layers
    config.model.num_heads = num_heads
    config.model.num_kv_heads = num_heads
    config.model.d_ff = d_ff
    return config
