"""isoflop_cpu.py's budgets and sizes under mup, with one learning rate for every size instead of the
hand-set table: its smallest model's rate, 3e-3, with mup's base at that model's width (48), where mup is
sp. Every other size takes its learning rates, init and output multiplier from mup's rules, not a table.
Results beside the hand-tuned sweep's: docs/scaling.md.

./run.sh sweep --config=configs/sweeps/isoflop_cpu_mup.py --workdir=runs/isoflop_cpu_mup [--dry_run]
"""

from configs.sweeps import isoflop_cpu


def get_config():
    c = isoflop_cpu.get_config()
    c.name = "isoflop_cpu_mup"
    c.overrides = []  # one learning rate: the base's
    m = c.base.model
    m.parametrization = "mup"
    m.base_width = 48  # the narrowest point; each point's base_head_dim is shape.head_dim (heads grow at fixed width)
    c.base.opt.learning_rate = 3e-3
    return c
