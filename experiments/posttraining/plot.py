"""PNGs of a finished experiment: GRPO's curves (reward, KL, held-out accuracy against step), DPO's, and
held-out accuracy per stage with standard errors.

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


def _with_se(ax, workdir: Path, key: str, label: str, fmt: str = "o-") -> None:
    steps, values = _curve(workdir, key)
    _, se = _curve(workdir, key + "_se")
    ax.errorbar(steps, values, yerr=se, fmt=fmt, capsize=2, markersize=3, label=label)


def plot(root: Path, results: dict, out: Path) -> None:
    # The longer exact-match run holds the shorter one's steps bit for bit (same seed, constant rate).
    exact = "grpo_long" if (root / "grpo_long" / "metrics.jsonl").exists() else "grpo"
    runs = [(n, label) for n, label in ((exact, "GRPO, exact match"), ("grpo_rm", "GRPO, reward model")) if (root / n / "metrics.jsonl").exists()]
    if runs:
        fig, axes = plt.subplots(1, 4, figsize=(17, 3.6))
        for name, label in runs:
            axes[0].plot(*_curve(root / name, "reward"), label=f"{label}: train reward (T=1)", lw=0.8)
            axes[0].plot(*_curve(root / name, "zero_variance_groups"), ":", label=f"{label}: zero-variance groups", lw=0.8)
            axes[1].plot(*_curve(root / name, "kl"), label=label)
            axes[1].plot(*_curve(root / name, "clip_fraction"), ":", label=f"{label}: clip fraction")
            axes[2].plot(*_curve(root / name, "answer_length"), label=f"{label}: answer length")
            axes[2].plot(*_curve(root / name, "unterminated"), ":", label=f"{label}: unterminated")
            _with_se(axes[3], root / name, "eval_exact_match", f"{label}: greedy")
            _with_se(axes[3], root / name, "eval_pass_at_1", f"{label}: pass@1 T=1", "s--")
            _with_se(axes[3], root / name, "eval_pass_at_k", f"{label}: pass@16", "^:")
        axes[0].set(xlabel="GRPO step", ylabel="fraction", title="reward and zero-variance groups")
        axes[1].set(xlabel="GRPO step", ylabel="per token", title="KL to the SFT model; clip fraction")
        axes[2].set(xlabel="GRPO step", ylabel="tokens / fraction", title="answers")
        axes[3].set(xlabel="GRPO step", ylabel="held-out RL prompts", title="held-out accuracy (±1 s.e.)", ylim=(0, 1))
        for ax in axes:
            ax.legend(fontsize=6)
        fig.tight_layout()
        fig.savefig(out / "grpo.png", dpi=110)

    variants = [(n, label) for n, label in (("dpo", "DPO"), ("dpo_rpo", "DPO + NLL"), ("dpo_own", "DPO, own mistakes"),
                                            ("dpo_own_rpo", "DPO + NLL, own mistakes")) if (root / n / "metrics.jsonl").exists()]
    if variants:
        fig, (ax_acc, ax_r) = plt.subplots(1, 2, figsize=(11, 3.8))
        for i, (name, label) in enumerate(variants):
            color = f"C{i}"
            ax_acc.plot(*_curve(root / name, "eval_accuracy"), "o-", color=color, label=label)
            ax_r.plot(*_curve(root / name, "eval_chosen_reward"), "o-", color=color, label=f"{label}: chosen")
            ax_r.plot(*_curve(root / name, "eval_rejected_reward"), "x--", color=color, label=f"{label}: rejected")
        ax_acc.set(xlabel="DPO step", ylabel="preference accuracy", title="held-out pairs ranked right", ylim=(0, 1))
        ax_r.axhline(0, color="k", lw=0.5)
        ax_r.set(xlabel="DPO step", ylabel="beta log(pi / pi_ref)", title="held-out implicit rewards")
        ax_acc.legend(fontsize=7)
        ax_r.legend(fontsize=6)
        fig.tight_layout()
        fig.savefig(out / "dpo.png", dpi=110)

    fig, ax = plt.subplots(figsize=(10, 3.8))
    names = list(results["test"])
    width = 0.27
    for j, (key, label) in enumerate((("greedy", "greedy"), ("pass_at_1", "pass@1, T=1"), ("pass_at_k", "pass@16, T=1"))):
        values = [results["test"][n][key] for n in names]
        errors = [results["test"][n][key + "_se"] for n in names]
        bars = ax.bar([i + (j - 1) * width for i in range(len(names))], values, width, yerr=errors, capsize=2, label=label)
        for b, v in zip(bars, values):
            ax.text(b.get_x() + b.get_width() / 2, v + 0.02, f"{v:.0%}", ha="center", fontsize=6)
    ax.set_xticks(range(len(names)), [n.replace("_", "\n") for n in names], fontsize=7)
    ax.set(ylabel="held-out exact match", ylim=(0, 1.08), title=f"Addition, {results['test'][names[0]]['problems']} held-out problems (±1 s.e.)")
    ax.legend(fontsize=7, loc="upper left")
    fig.tight_layout()
    fig.savefig(out / "accuracy.png", dpi=110)


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--workdir", required=True)
    here = Path(__file__).resolve().parent
    plot(Path(parser.parse_args().workdir), json.loads((here / "results.json").read_text()), here)
