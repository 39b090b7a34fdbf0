"""The cooldown-fork IsoFLOP sweep redesigned to pin down the exponent (experiments/scaling/cooldowns/README.md):
6 budgets over 1.5 decades (6.3e11 to 2e13 FLOPs, a factor 2 apart) instead of 5 over 0.8, each with 5 sizes
around its expected optimum (a window that slides with the budget) instead of one list for all, and one
model family that changes only in width: 2 layers, heads of 8 dims, so neighbouring sizes differ in nothing
but d_model (isoflop_cpu_cooldowns.py's mix of 2- and 3-layer shapes scattered the profiles). mup at one
learning rate, 5e-3 (base width 48): the optimum of a rate scan at d24 and at d80, which agree
(experiments/scaling/cooldowns/lr_scan.py); warmup fixed at 100 steps, a linear decay to 0 over the last 20%.

Sizes (total params with the byte vocabulary): d16 14k, d24 28k, d32 45k, d40 67k, d48 92k, d64 156k, d80 236k,
d96 332k, d112 445k. Each size's stable run goes as far as its largest budget's cooldown start.

python experiments/scaling/cooldowns/run.py --workdir=runs/isoflop_cooldowns_wide --corpus=runs/corpus
"""

import ml_collections

from configs.sweeps import isoflop_cpu_cooldowns


def _non_embedding(d_model: int) -> float:
    return 32.0 * d_model * d_model  # 2 layers of 4 d^2 attention + 12 d^2 SwiGLU MLP: the shape rule picks d_model


def get_config() -> ml_collections.ConfigDict:
    c = isoflop_cpu_cooldowns.get_config()
    c.name = "isoflop_cpu_cooldowns_wide"
    c.budgets = [6.3e11, 1.26e12, 2.5e12, 5e12, 1e13, 2e13]
    # A window of 5 widths per budget, moved up one width per doubling of compute (optimum about x1.5 in
    # params per doubling if a is near 0.6, as the first design's interior minima suggested); the two
    # smallest budgets share the lowest window because no narrower model is worth training.
    windows = [(16, 24, 32, 40, 48), (16, 24, 32, 40, 48), (24, 32, 40, 48, 64), (32, 40, 48, 64, 80),
               (40, 48, 64, 80, 96), (48, 64, 80, 96, 112)]
    c.targets = [[_non_embedding(d) for d in window] for window in windows]
    c.shape = ml_collections.ConfigDict(dict(d_model_step=8, d_model_per_layer=(8, 96), head_dim=8, ff_ratio=4,
                                             min_layers=2, max_layers=2))
    c.warmup_fraction = -1.0  # the base's 100 steps for every size: a fork then equals an independent run
    c.base.opt.warmup_steps = 100
    c.base.model.base_width = 48
    c.base.opt.learning_rate = 5e-3
    # Calibrated on the 2-core machine for these widths (experiments/scaling/cooldowns/README.md).
    c.throughput = dict(flops_per_second=9e10, seconds_per_token=7e-6, seconds_per_point=8.0)
    return c
