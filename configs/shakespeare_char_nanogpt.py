"""nanoGPT's CPU run on tiny Shakespeare exactly: shakespeare_char.py with its tied head, clipping and decay.

experiments/nanogpt_parity/ compares it step for step with a PyTorch version of nanoGPT.
"""

from configs import shakespeare_char


def get_config():
    c = shakespeare_char.get_config()
    c.name = "shakespeare_char_nanogpt"
    c.model.tie_embeddings = True
    c.opt.weight_decay = 0.1
    c.opt.decay_embeddings = True  # nanoGPT decays every 2-D weight, embeddings included
    c.opt.clip_norm = 1.0
    return c
