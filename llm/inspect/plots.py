"""PNG pictures of what ./run.sh inspect prints: attention maps per layer and head, the logit lens
over a prompt, the loss change of ablating each head. Each function writes one file and returns its path."""

import numpy as np
from matplotlib import colormaps
# Figure without pyplot renders PNGs with Agg and touches no global backend or figure state.
from matplotlib.figure import Figure

# Beyond this many prompt tokens, per-token tick labels overlap into a smear.
MAX_TICK_LABELS = 48


def _labels(tokens: list[str]) -> list[str]:
    return [repr(t)[1:-1] for t in tokens]  # newlines and spaces stay visible


def _token_ticks(ax, tokens: list[str], axis: str) -> None:
    if len(tokens) > MAX_TICK_LABELS:
        return
    positions, labels = np.arange(len(tokens)), _labels(tokens)
    if axis in ("x", "both"):
        ax.set_xticks(positions, labels, rotation=90, fontsize=6)
    if axis in ("y", "both"):
        ax.set_yticks(positions, labels, fontsize=6)


def attention_maps(probs_NxHxLxS: np.ndarray, tokens: list[str], path: str, layer_labels: list[str]) -> str:
    """One panel per layer (rows) and head (columns): query positions down, key positions across."""
    N, H = probs_NxHxLxS.shape[:2]
    fig = Figure(figsize=(2.4 * H + 1.2, 2.4 * N + 0.6), layout="constrained")
    axes = np.asarray(fig.subplots(N, H, squeeze=False))
    for i in range(N):
        for h in range(H):
            ax = axes[i, h]
            image = ax.imshow(probs_NxHxLxS[i, h], cmap=colormaps["viridis"], vmin=0.0, vmax=1.0, interpolation="nearest")
            ax.set_title(f"{layer_labels[i]} head {h}", fontsize=8)
            ax.set_xticks([]), ax.set_yticks([])
            if h == 0:
                _token_ticks(ax, tokens, "y")
            if i == N - 1:
                _token_ticks(ax, tokens, "x")
    fig.suptitle("attention: query positions down, key positions across", fontsize=9)
    fig.colorbar(image, ax=axes, shrink=0.6, label="attention probability")
    fig.savefig(path, dpi=110)
    return path


def lens_heatmap(losses_NxL: np.ndarray, tokens: list[str], path: str, layer_labels: list[str]) -> str:
    """Layers down, prompt positions across; colour: log-probability each layer's lens gives the actual
    next token (0 is certainty), the column labelled with that next token."""
    N, L = losses_NxL.shape
    fig = Figure(figsize=(min(0.22 * L + 2.5, 24), 0.45 * N + 1.8), layout="constrained")
    ax = fig.subplots()
    image = ax.imshow(-losses_NxL, cmap=colormaps["magma"], aspect="auto", interpolation="nearest")
    ax.set_yticks(np.arange(N), layer_labels, fontsize=8)
    _token_ticks(ax, tokens[1 : L + 1], "x")
    ax.set_xlabel("next token")
    ax.set_title("logit lens", fontsize=9)
    fig.colorbar(image, ax=ax, label="log p(next token)")
    fig.savefig(path, dpi=110)
    return path


def head_ablation_heatmap(change_NxH: np.ndarray, path: str, layer_labels: list[str], ablation: str = "zero") -> str:
    """Layers down, heads across; colour: prompt loss change when that head alone is zero-ablated,
    centred on 0 so heads that help (red) and hurt (blue) read apart."""
    N, H = change_NxH.shape
    fig = Figure(figsize=(0.7 * H + 2.5, 0.5 * N + 1.5), layout="constrained")
    ax = fig.subplots()
    bound = max(float(np.abs(change_NxH).max()), 1e-9)
    image = ax.imshow(change_NxH, cmap=colormaps["RdBu_r"], vmin=-bound, vmax=bound, aspect="auto", interpolation="nearest")
    for i in range(N):
        for h in range(H):
            ax.text(h, i, f"{change_NxH[i, h]:+.3f}", ha="center", va="center", fontsize=6)
    ax.set_xticks(np.arange(H), [str(h) for h in range(H)])
    ax.set_yticks(np.arange(N), layer_labels)
    ax.set_xlabel("head")
    ax.set_title(f"one head {ablation}-ablated", fontsize=9)
    fig.colorbar(image, ax=ax, label="loss change when ablated")
    fig.savefig(path, dpi=110)
    return path


def layer_heatmap(values_NxC: np.ndarray, path: str, layer_labels: list[str], columns: list[str], title: str, label: str) -> str:
    """Layers down, columns (heads, positions, an MLP) across, centred on 0 (red up, blue down); patching
    sweeps and direct logit attributions. Cells are annotated while there are few enough to read."""
    N, C = values_NxC.shape
    fig = Figure(figsize=(min(0.6 * C + 2.5, 24), 0.5 * N + 1.6), layout="constrained")
    ax = fig.subplots()
    finite = values_NxC[np.isfinite(values_NxC)]
    bound = max(float(np.abs(finite).max()) if finite.size else 0.0, 1e-9)
    image = ax.imshow(values_NxC, cmap=colormaps["RdBu_r"], vmin=-bound, vmax=bound, aspect="auto", interpolation="nearest")
    if N * C <= 200:
        for i in range(N):
            for c in range(C):
                ax.text(c, i, f"{values_NxC[i, c]:+.2f}", ha="center", va="center", fontsize=6)
    if C <= MAX_TICK_LABELS:
        ax.set_xticks(np.arange(C), _labels(columns), rotation=90 if max(map(len, columns)) > 3 else 0, fontsize=7)
    ax.set_yticks(np.arange(N), layer_labels)
    ax.set_title(title, fontsize=9)
    fig.colorbar(image, ax=ax, label=label)
    fig.savefig(path, dpi=110)
    return path
