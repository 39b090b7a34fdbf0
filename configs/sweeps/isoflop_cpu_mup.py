"""isoflop_cpu.py's budgets and sizes under mup (and completep for the depth its shape rule varies), with
one learning rate for every size instead of the hand-set table: the rate found best for the smallest
model of the smallest budget (experiments/mup/README.md), transferred by the parametrization.

./run.sh sweep --config=configs/sweeps/isoflop_cpu_mup.py --workdir=runs/isoflop_cpu_mup [--dry_run]
"""

from configs.sweeps import isoflop_cpu

LEARNING_RATE = 4e-3  # experiments/mup/README.md: the scan at the smallest point


def get_config():
    c = isoflop_cpu.get_config()
    c.name = "isoflop_cpu_mup"
    c.overrides = []  # one learning rate: the base's
    m = c.base.model
    m.parametrization = "mup"
    m.base_width = 64  # near the sweep's narrowest models; each point's base_head_dim is shape.head_dim
    m.depth_parametrization = "completep"
    m.base_depth = 2
    c.base.opt.learning_rate = LEARNING_RATE
    return c
