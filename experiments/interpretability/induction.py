"""Do induction heads form in a small 2-layer model on the built-in Shakespeare corpus, and when?
Trains one (char tokenizer, or --tokenizer=bpe; checkpoints kept along the way), then at every checkpoint measures with
llm/inspect/induction.py (Olsson et al. 2022):

  - the loss on a random token sequence and on its exact repeat (an induction head makes the second low),
  - each layer's best per-head prefix-matching score on that sequence,
  - the in-context-learning score on held-out text: loss at a late position minus at an early one.

usage: python experiments/interpretability/induction.py [--steps=3000] [--every=100] [--workdir=runs/induction] [--measure_only]
       [--attention_only [--d_model=128 --num_heads=8 --batch_size=16 --learning_rate=3e-3]] [--tokenizer=char|bpe]
Writes induction.json (the curves) and induction.png (them against the step) beside this file;
--attention_only (model.d_ff=0: no MLP sublayers, the models Olsson et al. study first) and
--tokenizer=bpe add _attention_only and _bpe to those names.
"""

import argparse
import json
import os
import time

import flax.linen as nn
import jax
import ml_collections
import numpy as np
from matplotlib.figure import Figure

import llm
from configs import default
from llm import model, spec
from llm.data import text as text_lib, tokenizer
from llm.inspect import induction, lens
from llm.inspect.trace import trace
from llm.run import api
from llm.training import checkpoint, loop

HERE = os.path.dirname(os.path.abspath(__file__))
HALF = 50  # random tokens per copy, all distinct: so at most the char alphabet's size
EARLY, LATE = 10, 200  # in-context score positions (Olsson et al. use 50 and 500 on longer contexts)


# The attention-only variant's defaults: wider, with more and smaller heads than the MLP model, so that
# a previous-token head and an induction head have room beside the heads that read local context.
ATTENTION_ONLY = {"d_model": 128, "num_heads": 8, "batch_size": 16, "learning_rate": 3e-3}


def get_config(steps: int, every: int, attention_only: bool = False, d_model: int = 0, num_heads: int = 0,
               batch_size: int = 0, learning_rate: float = 0.0, tokenizer: str = "char") -> ml_collections.ConfigDict:
    """The run's config; 0 for d_model, num_heads, batch_size or learning_rate: the variant's default."""
    c = default.get_config()
    c.name = "induction" + ("_attention_only" if attention_only else "") + ("_bpe" if tokenizer == "bpe" else "")
    if tokenizer == "bpe":  # configs/shakespeare_bpe.py's vocabulary: a token is a word or a piece of one
        c.data.tokenizer, c.data.spm_model_type, c.data.vocab_size = "sentencepiece", "bpe", 4096
    c.seq_len = 256
    c.batch_size = 16
    c.num_train_steps = steps
    c.checkpoint_every_steps = every
    c.keep_checkpoints = steps // every + 1  # every checkpoint is a point on the curves
    c.eval_every_steps = 0
    c.log_every_steps = 100
    c.sample_tokens = 0
    c.model.num_layers = 2
    c.model.d_model = 64
    c.model.num_heads = 4
    c.model.num_kv_heads = 4
    c.model.d_ff = 256
    c.opt.warmup_steps = 100
    if attention_only:
        c.model.d_ff = 0
        c.model.d_model = d_model or ATTENTION_ONLY["d_model"]
        c.model.num_heads = c.model.num_kv_heads = num_heads or ATTENTION_ONLY["num_heads"]
        c.batch_size = batch_size or ATTENTION_ONLY["batch_size"]
        c.opt.learning_rate = learning_rate or ATTENTION_ONLY["learning_rate"]
    return c


def held_out_rows(run: api.Run, num_rows: int, seed: int = 0) -> np.ndarray:
    """[num_rows, seq_len] windows of the validation split at random offsets: real text for the ICL score."""
    stream = text_lib.token_stream(run.spec.data, "validation", run.tokenizer)
    starts = np.random.default_rng(seed).integers(0, len(stream) - run.context, num_rows)
    return np.stack([np.asarray(stream[s : s + run.context]) for s in starts]).astype(np.int32)


def validation_loss(run: api.Run, params, max_batches: int = 8) -> float:
    """The model's own loss (the lens's last layer) on the first batches of the validation split."""
    dc = run.spec.data
    stream = text_lib.token_stream(dc, "validation", run.tokenizer)
    batches = text_lib.eval_batches(stream, run.config.eval_batch_size, run.config.seq_len, dc.packing, run.tokenizer.eos_id)
    return lens.layer_losses(run.model_config, params, batches, max_batches)[f"block_{run.model_config.N - 1}"]


def measure(cfg: model.ModelConfig, params, repeated_Bx2T: np.ndarray, text_BxL: np.ndarray) -> dict:
    losses = induction.repeated_tokens_loss(cfg, params, repeated_Bx2T)
    scores_NxH = induction.prefix_matching_scores(cfg, params, repeated_Bx2T)
    # induction.in_context_score is this difference; computed here once to report both ends too
    loss_BxL1 = induction.token_losses(trace(cfg, params, text_BxL, names=[])[0], text_BxL)
    early, late = float(loss_BxL1[:, EARLY].mean()), float(loss_BxL1[:, LATE].mean())
    return {**{f"repeated_{k}_loss": v for k, v in losses.items()},
            "prefix_matching_max": scores_NxH.max(axis=1).tolist(), "prefix_matching": scores_NxH.tolist(),
            "text_loss_early": early, "text_loss_late": late, "in_context_score": late - early}


def plot(points: list[dict], path: str) -> None:
    steps = [p["step"] for p in points]
    fig = Figure(figsize=(13, 3.8), layout="constrained")
    ax_loss, ax_prefix, ax_icl = fig.subplots(1, 3)
    ax_loss.plot(steps, [p["repeated_first_copy_loss"] for p in points], "o-", ms=3, label="first copy")
    ax_loss.plot(steps, [p["repeated_second_copy_loss"] for p in points], "o-", ms=3, label="second copy")
    ax_loss.plot(steps, [p["validation_loss"] for p in points], "k--", lw=1, label="held-out text")
    ax_loss.set_title("loss: repeated random tokens, text")
    ax_loss.legend()
    for i in range(len(points[0]["prefix_matching_max"])):
        ax_prefix.plot(steps, [p["prefix_matching_max"][i] for p in points], "o-", ms=3, label=f"block_{i}")
    ax_prefix.set_title("best head's prefix-matching score")
    ax_prefix.set_ylim(0, 1)
    ax_prefix.legend()
    ax_icl.plot(steps, [p["in_context_score"] for p in points], "o-", ms=3, color="C3")
    ax_icl.axhline(0, color="k", lw=0.5)
    ax_icl.set_title(f"in-context score: loss at token {LATE} - token {EARLY}")
    for ax in (ax_loss, ax_prefix, ax_icl):
        ax.set_xlabel("step")
    fig.savefig(path, dpi=110)


def first_text_id(tok) -> int:
    """The random sequences' lowest id: past the special tokens (and SentencePiece's unk and 256 byte
    pieces, which text rarely uses), so that they are made of the tokens text is made of."""
    if isinstance(tok, tokenizer.CharTokenizer):
        return tok.vocab_size - len(tok.chars)
    return tokenizer.NUM_SPECIAL + 1 + 256  # llm/data/tokenizer.py's models: unk at 3, then the byte fallback


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=3000)
    ap.add_argument("--every", type=int, default=100)
    ap.add_argument("--workdir", default="runs/induction")
    ap.add_argument("--out", default=HERE)
    ap.add_argument("--measure_only", action="store_true", help="measure the checkpoints already in --workdir")
    ap.add_argument("--attention_only", action="store_true", help="model.d_ff=0: blocks without MLPs")
    for name, kind in (("d_model", int), ("num_heads", int), ("batch_size", int), ("learning_rate", float)):
        ap.add_argument(f"--{name}", type=kind, default=0, help=f"--attention_only: default {ATTENTION_ONLY[name]}")
    ap.add_argument("--tokenizer", choices=["char", "bpe"], default="char")
    args = ap.parse_args()

    cfg = get_config(args.steps, args.every, args.attention_only, args.d_model, args.num_heads, args.batch_size, args.learning_rate,
                     args.tokenizer)
    name = cfg.name  # induction[_attention_only][_bpe]: the json and png are named after it
    started = time.time()
    if not args.measure_only:
        loop.train(spec.from_config(cfg), args.workdir)  # resumes if the workdir holds a run already
    train_seconds = None if args.measure_only else time.time() - started

    run = llm.load(args.workdir)
    mc = run.model_config
    repeated_Bx2T = induction.repeated_tokens(seed=0, batch=64, half=HALF, low=first_text_id(run.tokenizer), high=run.tokenizer.vocab_size)
    text_BxL = held_out_rows(run, 256)
    reader = checkpoint.reader(args.workdir)
    steps = sorted(reader.all_steps())
    reader.close()
    points = []
    for step in [0] + steps:  # 0: the initial params, as training drew them
        params = nn.unbox(model.init(mc, jax.random.key(cfg.seed))) if step == 0 else llm.load(args.workdir, step).params
        points.append({"step": int(step), **measure(mc, params, repeated_Bx2T, text_BxL), "validation_loss": validation_loss(run, params)})
        print(json.dumps({k: points[-1][k] for k in ("step", "repeated_first_copy_loss", "repeated_second_copy_loss",
                                                     "prefix_matching_max", "in_context_score")}), flush=True)
    result = {"config": {"steps": args.steps, "every": args.every, "seq_len": cfg.seq_len, "batch_size": cfg.batch_size,
                         "d_model": cfg.model.d_model, "num_layers": cfg.model.num_layers, "num_heads": cfg.model.num_heads,
                         "d_ff": cfg.model.d_ff, "tokenizer": args.tokenizer, "learning_rate": cfg.opt.learning_rate, "half": HALF, "early": EARLY, "late": LATE},
              "train_seconds": train_seconds, "measure_seconds": time.time() - started - (train_seconds or 0), "points": points}
    with open(os.path.join(args.out, f"{name}.json"), "w") as f:
        json.dump(result, f, indent=1)
    plot(points, os.path.join(args.out, f"{name}.png"))


if __name__ == "__main__":
    main()
