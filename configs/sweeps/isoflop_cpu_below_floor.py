"""A supplement to isoflop_cpu: models under its 100k-parameter floor at the two budgets whose best size
was the floor, so their IsoFLOP minima are bracketed. Same runs otherwise; fit the two results.csv together.

./run.sh sweep --config=configs/sweeps/isoflop_cpu_below_floor.py --workdir=runs/isoflop_cpu_below_floor
"""

import ml_collections

from configs.sweeps import isoflop_cpu


def get_config() -> ml_collections.ConfigDict:
    c = isoflop_cpu.get_config()
    c.name = "isoflop_cpu_below_floor"
    c.budgets = [2e12, 4.5e12]
    c.targets = [[5.1e4, 7.4e4], [7.4e4]]
    c.shape.d_model_step = 8  # multiples of 16 jump from 33k to 74k non-embedding params
    return c
