"""Profiles one fwd+bwd of the nanoGPT CPU config and prints the XLA ops that take the most time.

usage: python experiments/perf/profile_backward.py   (writes a trace to /tmp/trace)
"""
import jax, jax.numpy as jnp, flax.linen as nn, gzip, json, glob, collections
from llm import model, loss as loss_lib
from llm.model import ModelConfig
cfg = ModelConfig(V=68, D=128, F=512, N=4, H=4, G=4, L=64, pos_encoding="learned", norm="layernorm", mlp="gelu")
params = nn.unbox(model.init(cfg, jax.random.key(0)))
tok = jax.random.randint(jax.random.key(1), (12, 65), 3, 68)
x, y, w = tok[:, :-1], tok[:, 1:], jnp.ones((12, 64))
f = jax.jit(jax.value_and_grad(lambda p: loss_lib.cross_entropy_sums(model.apply(cfg, p, x)[0], y, w)[0]))
jax.block_until_ready(f(params))
with jax.profiler.trace("/tmp/trace", create_perfetto_trace=True):
    for _ in range(5): jax.block_until_ready(f(params))
path = sorted(glob.glob("/tmp/trace/**/perfetto_trace.json.gz", recursive=True))[-1]
events = json.load(gzip.open(path))
events = events["traceEvents"] if isinstance(events, dict) else events
dur = collections.Counter(); cnt = collections.Counter()
for e in events:
    if e.get("ph") == "X" and "dur" in e:
        dur[e["name"]] += e["dur"]; cnt[e["name"]] += 1
total = sum(v for k, v in dur.items())
for name, d in dur.most_common(25):
    print(f"{d/5/1000:8.2f} ms/step  x{cnt[name]//5:4d}  {name[:110]}")
