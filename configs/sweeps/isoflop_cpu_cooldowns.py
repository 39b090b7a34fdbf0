"""An IsoFLOP sweep with cooldown forks: 5 budgets x 5 sizes under mup with one learning rate
(isoflop_cpu_mup.py's), each size's stable phase trained once and every budget forked from it with a linear
decay over its last 20% of steps (llm/scaling/cooldowns.py). Results: experiments/scaling/cooldowns/README.md.

./run.sh sweep --config=configs/sweeps/isoflop_cpu_cooldowns.py --workdir=runs/isoflop_cpu_cooldowns [--dry_run]
"""

from configs.sweeps import isoflop_cpu_mup


def get_config():
    c = isoflop_cpu_mup.get_config()
    c.name = "isoflop_cpu_cooldowns"
    c.cooldowns = True
    c.decay_fraction = 0.2
    # A factor 1.6 apart: 5 budgets over 6.3x in compute. Forks make the extra budgets cheap: each size trains
    # its largest budget's stable phase once, then 20% of each budget's steps.
    c.budgets = [1e12, 1.6e12, 2.5e12, 4e12, 6.3e12]
    # One list for every budget (each size is one stable run), 1.5-2.2x apart around the expected optima.
    c.targets = [3.3e4, 7.3e4, 1.3e5, 2e5, 3.1e5]
    c.warmup_fraction = 0.05  # of each size's shortest point
    c.base.opt.schedule = "wsd"
    c.base.opt.final_lr_ratio = 0.0  # decay to zero (Hägele et al. 2024)
    c.base.eval_max_batches = 40  # 40 x 64 rows of 128 tokens: the same 328k held-out tokens for every point
    return c
