"""A Llama-shaped model of about 7B parameters (Llama-2-7B's shape: d_model 4096, 32 layers, 32 heads, 32 key/value
heads, SwiGLU width 11008, context 4096) with the recipe of configs/llama.py.

Fits on: v5p-64 (55.0 GiB per chip of 95, FSDP over the slice; `./run.sh compile --config=configs/llama_7b.py --topology=v5p-64`)
"""

from configs import llama


def get_config():
    return llama.config("llama_7b", d_model=4096, num_layers=32, num_heads=32, num_kv_heads=32, d_ff=11008, params=6.74e9,
                        seq_len=4096, batch_size=256, learning_rate=1.5e-4)
