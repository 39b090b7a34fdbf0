"""Trains this repo's shakespeare_char_nanogpt model and the PyTorch re-implementation from the same init on the
same batches, and compares the loss curves step by step.

usage: python experiments/nanogpt_parity/parity.py --torch_python=/path/to/venv-with-torch/bin/python [--steps=2000]
"""

import argparse
import json
import os
import subprocess
import tempfile

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from configs import shakespeare_char_nanogpt
from llm import model, spec as config_lib
from llm.data import text as text_lib
from llm.training import batches, evaluate, optimizer as optim, state as state_lib

HERE = os.path.dirname(os.path.abspath(__file__))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--torch_python", required=True)
    ap.add_argument("--steps", type=int, default=2000)
    ap.add_argument("--out", default=os.path.join(HERE, "parity.json"))
    args = ap.parse_args()

    cfg = shakespeare_char_nanogpt.get_config()
    run = config_lib.from_config(cfg)
    dc = run.data
    tok = batches.build_tokenizer(run)
    train_stream, val_stream = text_lib.token_stream(dc, "train", tok), text_lib.token_stream(dc, "validation", tok)
    train_batches = text_lib.TrainBatches(train_stream, cfg.batch_size, cfg.seq_len, cfg.seed, sampling=cfg.data.sampling, eos_id=tok.eos_id)
    rows_Sx12x65 = []
    for _ in range(args.steps):
        b = next(train_batches)
        rows_Sx12x65.append(np.concatenate([b["inputs"], b["targets"][:, -1:]], axis=1))
    rows_Sx12x65 = np.stack(rows_Sx12x65).astype(np.int32)

    run = config_lib.resolve(run, tok)
    mc, oc = run.model, run.opt
    optimizer = optim.make(oc)
    params = nn.unbox(model.init(mc, jax.random.key(cfg.seed)))
    exported = {"param:" + ".".join(k.key for k in path): np.asarray(x) for path, x in jax.tree_util.tree_leaves_with_path(params)}

    step_fn = jax.jit(state_lib.make_train_step(mc, optimizer, oc), donate_argnums=0)
    state = state_lib.TrainState(jnp.int32(0), params, optimizer.init(params))
    ours = []
    ones = np.ones((cfg.batch_size, cfg.seq_len), np.float32)
    for rows in rows_Sx12x65:
        state, metrics = step_fn(state, {"inputs": rows[:, :-1], "targets": rows[:, 1:], "weights": ones})
        ours.append(float(metrics["loss"]))
    eval_step = jax.jit(evaluate.make_eval_step(mc))
    ours_val = evaluate.evaluate(eval_step, state.params, text_lib.eval_batches(val_stream, cfg.eval_batch_size, cfg.seq_len),
                                 tok.token_bytes(), lambda b: b)["loss"]

    with tempfile.TemporaryDirectory() as tmp:
        replay = os.path.join(tmp, "replay.npz")
        np.savez(replay, batches=rows_Sx12x65, val=np.asarray(val_stream), vocab=mc.V, **exported)
        out = os.path.join(tmp, "torch.json")
        subprocess.run([args.torch_python, os.path.join(HERE, "torch_nanogpt.py"), f"--replay={replay}",
                        f"--steps={args.steps}", f"--out={out}"], check=True)
        theirs = json.load(open(out))

    diff = np.abs(np.array(ours) - np.array(theirs["train_losses"]))
    checkpoints = [s for s in (1, 10, 100, 500, 1000, 2000) if s <= args.steps]
    result = {
        "steps": args.steps,
        "train_loss_ours": {s: ours[s - 1] for s in checkpoints},
        "train_loss_torch": {s: theirs["train_losses"][s - 1] for s in checkpoints},
        "max_abs_diff_first_100": float(diff[:100].max()),
        "mean_abs_diff_last_100": float(diff[-100:].mean()),
        "val_loss_full_split_ours": ours_val,
        "val_loss_full_split_torch": theirs["val_loss_full_split"],
    }
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
