"""A grid sweep: three named sizes (configs/sizes.py) x three token counts, about 10 minutes on 2 CPU cores.

./run.sh sweep --config=configs/sweeps/grid_example.py --workdir=runs/grid_example [--dry_run]
"""

import ml_collections

from configs import default


def get_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.name = "grid_example"
    c.kind = "grid"
    c.sizes = ["nano", "micro", "tiny"]
    c.tokens = [2.5e5, 5e5, 1e6]  # rounded to whole steps of batch_size x seq_len
    c.overrides = [
        {"max_params": 3e5, "opt.learning_rate": 3e-3},
        {"max_params": float("inf"), "opt.learning_rate": 2e-3},
    ]
    c.warmup_fraction = 0.05
    c.checkpoints_per_point = 2

    base = default.get_config()
    base.batch_size = 16
    base.seq_len = 128
    base.eval_max_batches = 20  # the first 20 x 64 rows of the validation split, the same for every point
    base.peak_tflops = 0.13
    c.base = base
    return c
