"""A Llama-shaped model of about 150M parameters (d_model 768, 16 layers, 12 heads, 4 key/value
heads, SwiGLU width 2048, context 2048) with the recipe of configs/llama.py.

Fits on: SLICE_PLACEHOLDER
"""

from configs import llama


def get_config():
    return llama.config("llama_150m", d_model=768, num_layers=16, num_heads=12, num_kv_heads=4, d_ff=2048, params=150e6,
                        seq_len=2048, batch_size=256, learning_rate=6e-4)
