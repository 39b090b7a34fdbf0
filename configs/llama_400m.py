"""A Llama-shaped model of about 400M parameters (d_model 1024, 28 layers, 16 heads, 8 key/value
heads, SwiGLU width 2816, context 2048) with the recipe of configs/llama.py.

Fits on: v5p-8 (44.8 GiB per chip of 95, FSDP over the slice; `./run.sh compile --config=configs/llama_400m.py --topology=v5p-8`)
"""

from configs import llama


def get_config():
    return llama.config("llama_400m", d_model=1024, num_layers=28, num_heads=16, num_kv_heads=8, d_ff=2816, params=400e6,
                        seq_len=2048, batch_size=256, learning_rate=4e-4)
