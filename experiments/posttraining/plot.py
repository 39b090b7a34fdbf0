"""PNGs of a finished experiment: GRPO's reward and KL over steps, and held-out accuracy per stage.

    .venv/bin/python -m experiments.posttraining.plot --workdir=/tmp/pt_exp
"""

import argparse
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def _curve(workdir: Path, key: str) -> tuple[list, list]:
    rows = [json.loads(line) for line in open(workdir / "metrics.jsonl")]
    rows = [r for r in rows if key in r]
    return [r["step"] for r in rows], [r[key] for r in rows]


def plot(root: Path, results: dict, out: Path) -> None:
    fig, (ax_reward, ax_kl) = plt.subplots(1, 2, figsize=(10, 3.5))
    for name, label in (("grpo", "exact-match reward"), ("grpo_rm", "reward model")):
        if (root / name / "metrics.jsonl").exists():
            ax_reward.plot(*_curve(root / name, "reward"), label=f"{label}: train reward")
            ax_kl.plot(*_curve(root / name, "kl"), label=label)
    ax_reward.plot(*_curve(root / "grpo", "eval_reward"), "o", label="exact-match: held-out greedy reward")
    ax_reward.set(xlabel="GRPO step", ylabel="mean reward", title="GRPO reward")
    ax_kl.set(xlabel="GRPO step", ylabel="KL to the SFT model (per token)", title="GRPO KL")
    ax_reward.legend(fontsize=7)
    ax_kl.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "grpo.png", dpi=120)

    fig, ax = plt.subplots(figsize=(7, 3.5))
    names, values = zip(*results["test_accuracy"].items())
    ax.bar(range(len(names)), values)
    ax.set_xticks(range(len(names)), [n.replace(" (", "\n(") for n in names], fontsize=7)
    for i, v in enumerate(values):
        ax.text(i, v + 0.01, f"{v:.1%}", ha="center", fontsize=8)
    ax.set(ylabel="held-out exact match", ylim=(0, 1), title="Addition: greedy accuracy after each stage")
    fig.tight_layout()
    fig.savefig(out / "accuracy.png", dpi=120)


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--workdir", required=True)
    here = Path(__file__).resolve().parent
    plot(Path(parser.parse_args().workdir), json.loads((here / "results.json").read_text()), here)
