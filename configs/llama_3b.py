"""A Llama-shaped model of about 3B parameters (d_model 3072, 28 layers, 24 heads, 8 key/value
heads, SwiGLU width 8192, context 2048) with the recipe of configs/llama.py.

Fits on: v5p-32 (60.7 GiB per chip of 95, FSDP over the slice; `./run.sh compile --config=configs/llama_3b.py --topology=v5p-32`)
"""

from configs import llama


def get_config():
    return llama.config("llama_3b", d_model=3072, num_layers=28, num_heads=24, num_kv_heads=8, d_ff=8192, params=3.0e9,
                        seq_len=2048, batch_size=512, learning_rate=2e-4)
