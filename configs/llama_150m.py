"""A Llama-shaped model of about 150M parameters (d_model 768, 16 layers, 12 heads, 4 key/value
heads, SwiGLU width 2048, context 2048) with the recipe of configs/llama.py.

Fits on: v5p-8 (30.5 GiB per chip of 95; `./run.sh compile --config=configs/llama_150m.py --topology=v5p-8`) and v5e-16 (7.8 GiB of 16), FSDP over the slice
"""

from configs import llama


def get_config():
    return llama.config("llama_150m", d_model=768, num_layers=16, num_heads=12, num_kv_heads=4, d_ff=2048, params=150e6,
                        seq_len=2048, batch_size=256, learning_rate=6e-4)
