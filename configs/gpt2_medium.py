"""GPT-2 medium (350M with GPT-2's vocabulary): 24 layers, d_model 1024, 16 heads, context 1024; the
recipe of configs/gpt2_small.py with GPT-2 medium's learning rate.

At batch 32 x 1024 in bf16 the activations of 24 layers want --config.model.remat=dots (or block) on
a 40 GB GPU; --config.model.scan_layers=True keeps the compile time of 24 layers that of one.
"""

from configs import gpt2_small, sizes


def get_config():
    c = gpt2_small.get_config()
    c.name = "gpt2_medium"
    sizes.apply_size(c, "gpt2-medium")
    c.opt.learning_rate = 3e-4
    # 20 tokens per parameter: 6.9B tokens at 32k tokens per step.
    c.num_train_steps = 210_000
    return c
