"""A positive control for llm/inspect: a 2-layer attention-only model with learned positions, trained at a
constant learning rate on lines that repeat a random string three times ("s s s"), the setting in which
the literature sees induction heads form abruptly (Olsson et al. 2022; Bietti et al. 2023; Singh et al.
2024). Checkpoints every 50 steps; `positive_control_measure.py` reads them.

usage: python experiments/interpretability/positive_control.py [--workdir=/tmp/induction_exp/control] [--steps=3000] [--seed=0]
"""

import argparse
import os
import time

import ml_collections
import numpy as np

from configs import default
from llm import spec
from llm.training import loop

ALPHABET = "abcdefghijklmnop"  # 16 symbols: with 62 the first try stayed at the uniform loss for 1500 steps
MIN_LEN, MAX_LEN = 6, 24  # the random string's length
NUM_LINES = 100_000  # 4.8M characters: 2.8 passes over the training 90% in 3000 steps of 32 x 128; too many to memorise


def write_corpus(path: str, num_lines: int = NUM_LINES, seed: int = 0) -> str:
    rng = np.random.default_rng(seed)
    letters = np.array(list(ALPHABET))
    with open(path, "w") as f:
        for _ in range(num_lines):
            s = "".join(rng.choice(letters, rng.integers(MIN_LEN, MAX_LEN + 1)))
            f.write(f"{s} {s} {s}\n")
    return path


def get_config(corpus: str, steps: int, every: int = 50, learning_rate: float = 3e-3, seed: int = 0) -> ml_collections.ConfigDict:
    c = default.get_config()
    c.name = "induction_control"
    c.seed = seed  # init and data order; the corpus is the same for every seed
    c.data.dataset = f"text:{corpus}"
    c.data.data_dir = os.path.join(os.path.dirname(corpus), "tfds")
    c.seq_len = 128
    c.batch_size = 32
    c.num_train_steps = steps
    c.checkpoint_every_steps = every
    c.keep_checkpoints = steps // every + 1
    c.eval_every_steps = 0
    c.log_every_steps = every
    c.sample_tokens = 0
    c.model.num_layers = 2
    c.model.d_model = 128
    c.model.num_heads = c.model.num_kv_heads = 4
    c.model.d_ff = 0  # attention only
    c.model.pos_encoding = "learned"
    c.opt.learning_rate = learning_rate
    c.opt.schedule = "constant"
    c.opt.warmup_steps = 50
    return c


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--workdir", default="/tmp/induction_exp/control")
    ap.add_argument("--steps", type=int, default=3000)
    ap.add_argument("--learning_rate", type=float, default=3e-3)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    os.makedirs(args.workdir, exist_ok=True)
    corpus = os.path.join(os.path.dirname(os.path.abspath(args.workdir)), "control_corpus.txt")
    if not os.path.exists(corpus):
        write_corpus(corpus)
    started = time.time()
    loop.train(spec.from_config(get_config(corpus, args.steps, learning_rate=args.learning_rate, seed=args.seed)), args.workdir)
    print(f"trained in {time.time() - started:.0f} s", flush=True)


if __name__ == "__main__":
    main()
