"""Compiling a run for a TPU slice that is not attached (`./run.sh compile`): the slice's devices from
libtpu's compile-only topologies (topology.py), the run's own train step and sampler compiled for them
(plan.py), and what the compiled program costs a chip (cost.py)."""
