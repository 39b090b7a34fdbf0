"""Scaling studies: a sweep config expanded to runs and run one after another (sweep.py), the
scaling-law fits (fit.py) and their plots (plots.py)."""
