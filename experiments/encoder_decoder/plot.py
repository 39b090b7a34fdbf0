"""The experiment's plots from results.json: held-out loss against training FLOPs for each task, and
exact match on held-out reversals against FLOPs."""

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

LABELS = {"decoder": "decoder-only", "encoder_decoder": "encoder-decoder"}


def _flops(run: dict, step: int) -> float:
    return run["flops_per_step"] * step


def plot(results: dict, out: Path) -> list[str]:
    written = []
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, task_name in zip(axes, ("shakespeare", "reverse")):
        for arch, label in LABELS.items():
            run = results["runs"][f"{task_name}_{arch}"]
            ax.plot([_flops(run, r["step"]) for r in run["curve"]], [r["eval_loss"] for r in run["curve"]], "o-", label=label)
        ax.set_xlabel("training FLOPs")
        ax.set_ylabel("held-out loss (nats / target token)")
        ax.set_title({"shakespeare": "Shakespeare: next token vs span corruption", "reverse": "reverse a string (target tokens)"}[task_name])
        ax.legend()
    fig.tight_layout()
    written.append(str(out / "loss.png"))
    fig.savefig(written[-1], dpi=120)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(5, 4))
    for arch, label in LABELS.items():
        run = results["runs"][f"reverse_{arch}"]
        ax.plot([_flops(run, r["step"]) for r in run["exact_match"]], [100 * r["exact_match"] for r in run["exact_match"]], "o-", label=label)
    ax.set_xlabel("training FLOPs")
    ax.set_ylabel("held-out exact match (%)")
    ax.set_title("reverse a string: greedy answers")
    ax.legend()
    fig.tight_layout()
    written.append(str(out / "exact_match.png"))
    fig.savefig(written[-1], dpi=120)
    plt.close(fig)
    return written


if __name__ == "__main__":
    import json

    here = Path(__file__).resolve().parent
    print(plot(json.loads((here / "results.json").read_text()), here))
