"""Decoder-only vs encoder-decoder at equal parameters and equal training compute, on two tasks:

    shakespeare  the built-in corpus: next-token prediction (decoder) vs T5 span corruption (encoder-decoder)
    reverse      a generated seq2seq task (reverse a string of 4-16 letters): the same pairs for both,
                 the decoder-only model reading input + eos + target (loss on the target only)

    nice -n 19 .venv/bin/python -m experiments.encoder_decoder.run --workdir=/tmp/ed_exp

Each pair of runs gets the same FLOPs: a run's steps are the budget over its own arch's FLOPs per step
(llm.model.flops_per_token x batch x seq_len). Resumable: a finished run's run.json is reused.
Writes experiments/encoder_decoder/results.json and the plots beside it.
"""

import argparse
import json
import time
from pathlib import Path

import llm
from configs import default
from experiments.encoder_decoder import plot, task
from llm import model, spec, spec as config_lib
from llm.training import batches, loop

HERE = Path(__file__).resolve().parent
WIDTH, HEADS, FF = 128, 4, 512
# Four decoder blocks hold about as many params as two encoder blocks plus two decoder blocks with
# cross-attention (the encoder-decoder has 2 x 2 x D^2 more, cross-attention's: 6% here).
SHAPES = {"decoder": dict(num_layers=4), "encoder_decoder": dict(num_layers=2, num_encoder_layers=2)}
BUDGETS = {"shakespeare": 1.5e13, "reverse": 6e12}
CHECKPOINTS = 6  # exact match is measured at each, for the curve


def config(task_name: str, arch: str, root: Path, paths: dict):
    cfg = default.get_config()
    cfg.model.arch = arch
    cfg.model.d_model, cfg.model.num_heads, cfg.model.num_kv_heads, cfg.model.d_ff = WIDTH, HEADS, HEADS, FF
    cfg.model.num_layers = SHAPES[arch]["num_layers"]
    cfg.model.num_encoder_layers = SHAPES[arch].get("num_encoder_layers", 0)
    cfg.data.data_dir = str(root / "tfds")
    cfg.batch_size = 32
    if task_name == "shakespeare":
        cfg.seq_len = 128
    else:
        cfg.data.dataset = f"seq2seq:{paths['reverse']}"
        cfg.data.validation_fraction = 0.05  # 1,000 held-out reversals, answered greedily at every checkpoint
        # A decoder row holds input + eos + target + eos (at most 34 tokens); an encoder-decoder's
        # two rows hold input + eos and bos + target. Both pack two to three examples per row.
        cfg.seq_len = 80 if arch == "decoder" else 40
        cfg.target_len = 40 if arch == "encoder_decoder" else 0
    mc = config_lib.resolve(config_lib.from_config(cfg), _vocab(cfg, root)).model
    steps = round(BUDGETS[task_name] / (model.flops_per_token(mc) * cfg.batch_size * cfg.seq_len))
    cfg.num_train_steps = steps
    cfg.checkpoint_every_steps = -(-steps // CHECKPOINTS)
    cfg.keep_checkpoints = CHECKPOINTS + 1
    cfg.eval_every_steps = cfg.checkpoint_every_steps
    cfg.eval_max_batches = 20
    cfg.log_every_steps = 10
    cfg.sample_tokens = 0
    cfg.peak_tflops = 1.0  # MFU is meaningless here; skip the start-up matmul benchmark
    cfg.opt.learning_rate = 2e-3
    cfg.opt.warmup_steps = steps // 20
    return cfg, mc


def _vocab(cfg, root: Path) -> int:
    """The char vocabulary a run builds (the same one train.py builds), for its FLOPs before it starts."""
    return batches.build_tokenizer(cfg).vocab_size


def run_one(task_name: str, arch: str, root: Path, paths: dict) -> dict:
    workdir = root / f"{task_name}_{arch}"
    done = workdir / "run.json"
    if done.exists():
        return json.loads(done.read_text())
    cfg, mc = config(task_name, arch, root, paths)
    start = time.time()
    summary = loop.train(spec.from_config(cfg), str(workdir), quiet=True)
    record = {"wall_s": time.time() - start, "steps": cfg.num_train_steps, "flops_per_step": model.flops_per_token(mc) * cfg.batch_size * cfg.seq_len,
              "summary": {k: v for k, v in summary.items() if isinstance(v, (int, float))}}
    record["curve"] = [r for r in map(json.loads, open(workdir / "metrics.jsonl")) if "eval_loss" in r]
    if task_name == "reverse":
        record["exact_match"] = []
        for step in sorted(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit()):
            run = llm.load(str(workdir), step)
            record["exact_match"].append({"step": step, **run.exact_match("validation", batch_size=128)})
    done.write_text(json.dumps(record, indent=1))
    print(task_name, arch, json.dumps({k: v for k, v in record.items() if k != "curve"}), flush=True)
    return record


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--workdir", required=True)
    args = parser.parse_args()
    root = Path(args.workdir)
    root.mkdir(parents=True, exist_ok=True)
    paths = {"reverse": task.write(root / "reverse.jsonl", task.make("reverse", 20_000, seed=0))}
    results = {"budgets": BUDGETS, "shapes": SHAPES, "width": WIDTH, "runs": {}}
    for task_name in BUDGETS:
        for arch in SHAPES:
            results["runs"][f"{task_name}_{arch}"] = run_one(task_name, arch, root, paths)
    (HERE / "results.json").write_text(json.dumps(results, indent=1))
    plot.plot(results, HERE)


if __name__ == "__main__":
    main()
