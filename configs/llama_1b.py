"""A Llama-shaped model of about 1B parameters (d_model 2048, 20 layers, 32 heads, 8 key/value
heads, SwiGLU width 5632, context 2048) with the recipe of configs/llama.py.

Fits on: v5p-32 (51.8 GiB per chip of 95, FSDP over the slice; `./run.sh compile --config=configs/llama_1b.py --topology=v5p-32`)
"""

from configs import llama


def get_config():
    return llama.config("llama_1b", d_model=2048, num_layers=20, num_heads=32, num_kv_heads=8, d_ff=5632, params=1.03e9,
                        seq_len=2048, batch_size=512, learning_rate=3e-4)
