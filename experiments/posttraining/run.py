"""Every post-training stage on the addition task, in order, into one work directory:

    pretrain (a+b;=c; lines) -> SFT on imperfect demonstrations (chat template) -> the SFT baseline on the RL
    prompts' labels, the reward model, DPO, GRPO (exact match), GRPO (reward model); and SFT from today's
    marker rows, for comparison

    nice -n 10 .venv/bin/python -m experiments.posttraining.run --workdir=/tmp/pt_exp

Resumable: a stage whose stage.json exists is skipped (a stage killed midway resumes from its checkpoint).
Writes experiments/posttraining/results.json and the plots beside it.
"""

import argparse
import json
import time
from pathlib import Path

import numpy as np

import llm
from configs import default
from experiments.posttraining import plot, task
from llm import spec
from llm.training import loop, rl

HERE = Path(__file__).resolve().parent
DIGITS = 2
# Operands of 1-2 digits give 10,000 problems in all: the training sets take 8,500, the test set 1,000 more.
SIZES = {"pretrain": 4_500, "sft": 2_000, "preference": 1_000, "rl": 1_000, "test": 1_000}
SFT_ERROR_RATE = 0.5  # of the SFT responses to problems with a carry, this fraction drops one
K = 16  # samples per test problem for pass@1 and pass@k: GRPO's group size
# The role markers start where the raw format had: "\n12+34;=46;" is <|user|> 12+34 <|end|> <|assistant|> 46 <|end|>.
MARKERS = {"user": "\n", "end": task.END, "assistant": task.SEPARATOR[1]}
RL = dict(lr=1e-4, schedule="constant", warmup=0)  # every stage after SFT: one rate, constant
# Each stage: its objective, the data it reads, the run it starts from, and what it changes in the config.
STAGES = {
    "pretrain": dict(objective="lm", data="text:{pretrain}", init_from="", num_train_steps=1100, batch_size=32, seq_len=64),
    "sft": dict(objective="lm", data="sft:{sft}", init_from="pretrain", num_train_steps=300, batch_size=32, lr=1e-3, markers=MARKERS),
    "sft_old_init": dict(objective="lm", data="sft:{sft}", init_from="pretrain", num_train_steps=300, batch_size=32, lr=1e-3),
    "sft_rl_labels": dict(objective="lm", data="sft:{sft_rl}", init_from="sft", num_train_steps=150, batch_size=32, **RL),
    "reward": dict(objective="reward", data="preference:{preference}", init_from="sft", num_train_steps=300, batch_size=32, lr=1e-3),
    "dpo": dict(objective="dpo", data="preference:{preference}", init_from="sft", num_train_steps=150, batch_size=32, **RL),
    # DPO on the SFT model's own mistakes: the right sum over its most frequent wrong sample, on the RL prompts.
    "dpo_own": dict(objective="dpo", data="preference:{own_pairs}", init_from="sft", num_train_steps=150, batch_size=32, **RL),
    # The same two with RPO's NLL term on the chosen answers (dpo.nll_coef=1, Pang et al. 2024).
    "dpo_rpo": dict(objective="dpo", data="preference:{preference}", init_from="sft", num_train_steps=150, batch_size=32, **RL, nll_coef=1.0),
    "dpo_own_rpo": dict(objective="dpo", data="preference:{own_pairs}", init_from="sft", num_train_steps=150, batch_size=32, **RL,
                        nll_coef=1.0),
    "grpo": dict(objective="grpo", data="prompts:{rl}", init_from="sft", num_train_steps=200, batch_size=16, **RL,
                 reward_fn="experiments.posttraining.task:reward"),
    "grpo_long": dict(objective="grpo", data="prompts:{rl}", init_from="sft", num_train_steps=400, batch_size=16, **RL,
                      reward_fn="experiments.posttraining.task:reward"),
    "grpo_rm": dict(objective="grpo", data="prompts:{rl}", init_from="sft", num_train_steps=100, batch_size=16, **RL, reward_run="reward"),
}


def config(stage: dict, root: Path, paths: dict):
    cfg = default.get_config()
    cfg.objective = stage["objective"]
    cfg.data.dataset = stage["data"].format(**paths)
    cfg.data.data_dir = str(root / "tfds")
    cfg.init_from = str(root / stage["init_from"]) if stage["init_from"] else ""
    cfg.model.d_model, cfg.model.num_layers, cfg.model.num_heads, cfg.model.num_kv_heads, cfg.model.d_ff = 128, 3, 4, 4, 512
    cfg.seq_len = stage.get("seq_len", 32)  # a chat-formatted problem is under 20 tokens
    cfg.batch_size = stage["batch_size"]
    cfg.num_train_steps = cfg.checkpoint_every_steps = cfg.eval_every_steps = stage["num_train_steps"]
    cfg.log_every_steps = 5
    cfg.sample_tokens = 0
    cfg.peak_tflops = 1.0  # MFU is meaningless here; skip the start-up matmul benchmark
    cfg.opt.learning_rate = stage.get("lr", 3e-3)
    cfg.opt.schedule = stage.get("schedule", cfg.opt.schedule)
    cfg.opt.warmup_steps = stage.get("warmup", min(100, stage["num_train_steps"] // 10))
    for role, text in stage.get("markers", {}).items():
        cfg.markers[role] = text
    if cfg.objective == "dpo":
        cfg.eval_every_steps = 25
        cfg.dpo.nll_coef = stage.get("nll_coef", 0.0)
    if cfg.objective == "grpo":
        cfg.log_every_steps = 1
        cfg.grpo.group_size, cfg.grpo.max_new_tokens, cfg.grpo.temperature = K, DIGITS + 2, 1.0
        cfg.grpo.kl_coef, cfg.grpo.eval_prompts = 0.01, 100
        cfg.eval_every_steps = 25  # held-out RL prompts: greedy, pass@1 and pass@16, for the curves
        cfg.grpo.reward_fn = stage.get("reward_fn", "")
        cfg.grpo.reward_run = str(root / stage["reward_run"]) if "reward_run" in stage else ""
    return cfg


def run_stage(name: str, root: Path, paths: dict, test: list[dict]) -> dict:
    """Trains one stage (or finds it done) and scores it; the record is kept in its stage.json."""
    workdir = root / name
    done = workdir / "stage.json"
    if done.exists():
        return json.loads(done.read_text())
    if name.startswith("dpo_own") and "own_pairs" not in paths:
        paths["own_pairs"] = str(root / "data" / "own_pairs.jsonl")
        pairs = task.own_mistakes(llm.load(str(root / "sft")), task.read_jsonl(paths["rl"]), K)
        Path(paths["own_pairs"]).write_text("".join(json.dumps(p) + "\n" for p in pairs))
    cfg = config(STAGES[name], root, paths)
    start = time.time()
    summary = loop.train(spec.from_config(cfg), str(workdir), quiet=True, feed=rl.make_feed if cfg.objective == "grpo" else None)
    record = {"wall_s": time.time() - start, "summary": {k: v for k, v in summary.items() if isinstance(v, (int, float))}}
    run = llm.load(str(workdir))
    if cfg.objective == "reward":
        record["pairwise_accuracy"] = run.evaluate()["accuracy"]
    else:
        record["test"] = task.accuracy(run, test, K, raw=name == "pretrain")
    done.write_text(json.dumps(record, indent=1))
    print(name, json.dumps(record), flush=True)
    return record


def paired(root: Path, test: list[dict], names) -> dict:
    """Each stage's greedy exact match less its start's, on the same problems, with the paired standard error."""
    right = {n: task.greedy_right(llm.load(str(root / n)), test, raw=n == "pretrain") for n in names}
    out = {}
    for n in names:
        start = STAGES[n]["init_from"]
        if start in right:
            d = right[n].astype(float) - right[start]
            out[n] = {"start": start, "greedy_gain": float(d.mean()), "se": float(d.std(ddof=1) / np.sqrt(len(d)))}
    return out


def results(records: dict, root: Path, test: list[dict]) -> dict:
    return {
        "greedy_gain_over_start": paired(root, test, [n for n, r in records.items() if "test" in r]),
        "task": f"addition, operands of 1..{DIGITS} digits; test: {SIZES['test']} held-out problems; greedy exact match, "
                f"pass@1 at T=1 and pass@{K} ({K} samples each), each with its standard error over problems",
        "sft_error_rate": SFT_ERROR_RATE,
        "test": {n: r["test"] for n, r in records.items() if "test" in r},
        "reward_model_pairwise_accuracy": records["reward"]["pairwise_accuracy"] if "reward" in records else None,
        "final": {n: {k: v for k, v in r["summary"].items() if k in ("reward", "kl", "clip_fraction", "zero_variance_groups",
                                                                       "unterminated", "answer_length", "accuracy", "margin",
                                                                       "chosen_reward", "rejected_reward", "eval_accuracy",
                                                                       "eval_margin", "eval_chosen_reward", "eval_rejected_reward")}
                  for n, r in records.items()},
        "wall_s": {n: round(r["wall_s"], 1) for n, r in records.items()},
    }


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--workdir", required=True)
    parser.add_argument("--stages", default=",".join(STAGES), help="comma-separated, in order")
    args = parser.parse_args()
    root = Path(args.workdir)
    # Written once: rewriting pretrain.txt would change its mtime, and the text dataset's cache with it.
    manifest = root / "data" / "paths.json"
    if not manifest.exists():
        manifest.parent.mkdir(parents=True, exist_ok=True)
        manifest.write_text(json.dumps(task.write_sets(root / "data", DIGITS, SIZES, sft_error_rate=SFT_ERROR_RATE)))
    paths = json.loads(manifest.read_text())
    if (root / "data" / "own_pairs.jsonl").exists():
        paths["own_pairs"] = str(root / "data" / "own_pairs.jsonl")
    test = task.read_jsonl(paths["test"])
    records = {name: run_stage(name, root, paths, test) for name in args.stages.split(",")}
    out = results(records, root, test)
    (HERE / "results.json").write_text(json.dumps(out, indent=1) + "\n")
    plot.plot(root, out, HERE)
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
