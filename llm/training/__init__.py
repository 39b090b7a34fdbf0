"""Training: the state and the jitted train step (state.py, the one builder), objectives and their
loss, the optimizer, the sharding of a mesh, what each objective reads (batches.py, feeds.py, rl.py),
the loop (loop.py), evaluation (evaluate.py; lm-evaluation-harness tasks, tasks.py), checkpoints, the guard rails of a run and its metrics."""
