"""Profiles the real jitted train step of configs/shakespeare_char.py on one device and ranks XLA ops by time.

usage: python experiments/perf/profile_step.py [--hlo=/tmp/step.hlo]   (--hlo also writes the optimised HLO)
"""
import collections
import glob
import gzip
import json
import re
import shutil
import sys
import tempfile

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from configs import shakespeare_char
from llm import model, spec as config_lib
from llm.data.tokenizer import CHAR_VOCAB
from llm.training import optimizer as optim, state as state_lib

cfg = shakespeare_char.get_config()
run = config_lib.resolve(config_lib.from_config(cfg), CHAR_VOCAB)
mc, oc = run.model, run.opt
optimizer = optim.make(oc)
params = nn.unbox(model.init(mc, jax.random.key(0)))
state = state_lib.TrainState(jnp.int32(0), params, optimizer.init(params))
tokens = np.random.default_rng(0).integers(3, CHAR_VOCAB, (cfg.batch_size, cfg.seq_len + 1), dtype=np.int32)
batch = {"inputs": tokens[:, :-1], "targets": tokens[:, 1:], "weights": np.ones((cfg.batch_size, cfg.seq_len), np.float32)}
step = jax.jit(state_lib.make_train_step(mc, optimizer, oc)).lower(state, batch).compile()
for arg in sys.argv[1:]:
    if arg.startswith("--hlo="):
        open(arg[len("--hlo="):], "w").write(step.as_text())
for _ in range(3):
    state, metrics = step(state, batch)
jax.block_until_ready(metrics)

calls = 10
trace_dir = tempfile.mkdtemp()
with jax.profiler.trace(trace_dir, create_perfetto_trace=True):
    for _ in range(calls):
        state, metrics = step(state, batch)
        jax.block_until_ready(metrics)
events = json.load(gzip.open(glob.glob(f"{trace_dir}/**/perfetto_trace.json.gz", recursive=True)[0]))
events = events["traceEvents"] if isinstance(events, dict) else events
shutil.rmtree(trace_dir)

op_names = {}
for line in step.as_text().split("\n"):
    m = re.match(r"\s+%(\S+) = (\S+) \S+\(.*op_name=\"([^\"]*)\"", line)
    if m:
        op_names[m.group(1)] = f"{m.group(2)} {m.group(3)[-50:]}"
per_op = collections.Counter()
for e in events:
    if e.get("ph") == "X" and e.get("name") in op_names:
        per_op[e["name"]] += e["dur"] / calls / 1e3
kinds = collections.Counter()
for name, ms in per_op.items():
    kinds[re.sub(r"\.\d+$", "", name)] += ms
print(f"ops run per step: {len(per_op)}   sum of op times: {sum(per_op.values()):.1f} ms")
print("by kind (ms/step):", ", ".join(f"{k} {v:.1f}" for k, v in kinds.most_common(12)))
for name, ms in per_op.most_common(25):
    print(f"{ms:7.2f} ms  {name:32s} {op_names[name]}")
