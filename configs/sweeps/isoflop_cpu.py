"""IsoFLOP sweep sized for a 2-core CPU: 3 compute budgets x 5 model sizes on the built-in Shakespeare corpus.

./run.sh sweep --config=configs/sweeps/isoflop_cpu.py --workdir=runs/isoflop_cpu [--dry_run]
Results and fits: experiments/scaling/README.md.
"""

import ml_collections

from configs import default


def get_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.name = "isoflop_cpu"
    c.kind = "isoflop"
    # Training FLOPs (the model's exact per-token count x tokens). Three budgets x five sizes is what a 2-core
    # machine trains in about 40 minutes; the budgets are 6-9 orders of magnitude below Chinchilla's.
    c.budgets = [2e12, 4.5e12, 1e13]
    # Non-embedding params, 1.5-1.8x apart, around where each budget's optimum is expected (a 1e12 pilot
    # put it below 131k); the 100k floor on model size keeps the smallest budget's window from going lower.
    c.targets = [
        [1.1e5, 2e5, 3e5, 4.4e5, 8e5],
        [1.1e5, 2e5, 3e5, 4.4e5, 8e5],
        [1.3e5, 2e5, 3e5, 4.4e5, 8e5],
    ]
    c.shape = ml_collections.ConfigDict(dict(d_model_step=16, d_model_per_layer=(16, 64), head_dim=32, ff_ratio=4, min_layers=2, max_layers=12))
    # Smaller models tolerate (and need) larger learning rates.
    c.overrides = [
        {"max_params": 3e5, "opt.learning_rate": 3e-3},
        {"max_params": 1.1e6, "opt.learning_rate": 2e-3},
        {"max_params": float("inf"), "opt.learning_rate": 1.5e-3},
    ]
    c.warmup_fraction = 0.05
    c.checkpoints_per_point = 2

    base = default.get_config()
    base.batch_size = 16
    base.seq_len = 128
    base.log_every_steps = 25
    base.eval_batch_size = 64
    base.eval_max_batches = 0  # the whole validation split (327k tokens): a few seconds per point
    base.keep_checkpoints = 2
    base.peak_tflops = 0.13  # a 2048^2 float32 matmul on the 2-core machine; only the logged MFU uses it
    base.opt.schedule = "cosine"
    base.opt.final_lr_ratio = 0.1
    c.base = base
    # The --dry_run estimate; calibrated on the 2-core machine (experiments/scaling/README.md).
    c.throughput = dict(flops_per_second=7e10, seconds_per_token=2.5e-5, seconds_per_point=12.0)
    return c
