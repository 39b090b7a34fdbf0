"""Decoder-only vs encoder-decoder at equal compute: the same IsoFLOP budgets and parameter targets for
each arch on the built-in Shakespeare corpus (next-token prediction vs T5's span corruption), 2 archs x
2 budgets x 3 sizes: 9.3 minutes on 2 CPU cores (results: docs/model.md, "Three architectures").

./run.sh sweep --config=configs/sweeps/arch_isoflop_cpu.py --workdir=runs/arch_isoflop [--dry_run]
./run.sh fit --workdir=runs/arch_isoflop --arch=decoder          # and --arch=encoder_decoder

Each point's FLOPs are its own arch's (llm.model.flops_per_token: an encoder-decoder counts both
stacks and cross-attention per encoder-input token), so a budget buys each arch the steps it can
afford. The shape rule counts an encoder-decoder's params over both stacks (num_encoder_layers = 0:
as many encoder layers as decoder layers). The two losses are not the same task's (span targets vs
every next token): compare how each falls with compute, not their values.
"""

import ml_collections

from configs.sweeps import isoflop_cpu


def get_config() -> ml_collections.ConfigDict:
    c = isoflop_cpu.get_config()  # its shape rule, learning rates and base run
    c.name = "arch_isoflop_cpu"
    c.archs = ["decoder", "encoder_decoder"]
    c.budgets = [1e12, 2.5e12]
    c.targets = [1e5, 2e5, 4e5]
    c.base.eval_max_batches = 20  # the first 20 x 64 validation rows, the same for every point
    return c
