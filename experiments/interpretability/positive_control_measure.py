"""Reads the positive control's checkpoints (positive_control.py) and measures, at the initial params and
every checkpoint: the best layer-0 previous-token score, the best layer-1 prefix-matching score, the loss
on each copy of held-out "s s s" lines (the in-context loss: copies 2 and 3), the band in-context score
(>= 2,000 held-out windows, with standard errors), the K-/Q-/V-composition of layer 0's heads into layer
1's. At the last checkpoint also: activation patching against attribution patching, path patching, and
whether the heads carry over to natural text (Shakespeare, mapped onto the 16 symbols) with repeated chunks.

usage: python experiments/interpretability/positive_control_measure.py [--workdir=/tmp/induction_exp/control]
Writes positive_control.json and positive_control.png beside this file.
"""

import argparse
import json
import os
import re
import time

import flax.linen as nn
import jax
import numpy as np
from matplotlib.figure import Figure

import llm
from llm import model
from llm.data.datasets import shakespeare
from llm.inspect import attribution, induction, patching
from llm.inspect.trace import trace
from llm.training import checkpoint

HERE = os.path.dirname(os.path.abspath(__file__))
ALPHABET = "abcdefghijklmnop"
STRING = 12  # held-out lines: strings of 12 distinct symbols (every prefix match is one position; 4 symbols spare)
BANDS = ((4, 16), (16, 48), (48, 80), (80, 127))


def lines(rng, num: int, length: int = STRING) -> list[str]:
    return ["".join(rng.permutation(list(ALPHABET))[:length]) for _ in range(num)]


def triple_rows(run, strings: list[str], anchored: bool) -> np.ndarray:
    """"\ns s s\n" as every training line starts (after the line before it), or without the leading
    newline, which leaves only the symbols themselves to find copy 1 by."""
    return np.stack([run.tokenizer.encode(("\n" if anchored else "") + f"{s} {s} {s}\n") for s in strings]).astype(np.int32)


def copy_starts(anchored: bool) -> list[int]:
    return [int(anchored) + c * (STRING + 1) for c in range(3)]


def copy_losses(cfg, params, rows_BxL, anchored: bool) -> list[float]:
    """Mean loss predicting copy c's tokens 2..n (c = 1, 2, 3), from the position before each."""
    loss_BxL1 = induction.token_losses(trace(cfg, params, rows_BxL, names=[])[0], rows_BxL)
    return [float(loss_BxL1[:, a : a + STRING - 1].mean()) for a in copy_starts(anchored)]


def head_scores(cfg, params, rows_BxL, anchored: bool) -> dict:
    """Per head: layer 0's previous-token score (attention from i to i - 1 within copies 2-3), and every
    layer's prefix-matching scores from copy 2 to copy 1 and from copy 3 to copy 2 (attention from a
    token to the token after its occurrence in the copy before)."""
    _, cache = trace(cfg, params, rows_BxL, names="block_*/attn_probs_BxHxLxS")
    probs = [np.asarray(cache[f"block_{i}/attn_probs_BxHxLxS"]) for i in range(cfg.N)]
    c1, c2, c3 = copy_starts(anchored)
    prev = np.arange(c2 + 1, c3 + STRING)
    out = {"previous_token": probs[0][:, :, prev, prev - 1].mean(axis=(0, 2)).tolist()}
    for name, (src, dst) in (("prefix_matching", (c2, c1)), ("prefix_matching_3", (c3, c2))):
        queries = np.arange(src, src + STRING - 1)
        out[name] = np.stack([p[:, :, queries, queries - src + dst + 1].mean(axis=(0, 2)) for p in probs]).tolist()
    return out


def held_out_windows(run, num: int, seed: int) -> np.ndarray:
    """num windows of the run's context from its validation split (the held-out 10% of the corpus file)."""
    from llm.data import text as text_lib

    stream = np.asarray(text_lib.token_stream(run.spec.data, "validation", run.tokenizer))
    starts = np.random.default_rng(seed).integers(0, len(stream) - run.context, num)
    return np.stack([stream[s : s + run.context] for s in starts]).astype(np.int32)


def natural_text() -> str:
    """Shakespeare lower-cased, each letter put onto the 16 symbols (by its alphabet index mod 16), the rest
    one space: English's word lengths and letter statistics in the model's alphabet."""
    raw = " ".join(open(p, encoding="utf-8").read() for p in list(shakespeare.works().values())[:5]).lower()
    mapped = "".join(ALPHABET[(ord(c) - 97) % 16] if "a" <= c <= "z" else " " for c in raw)
    return re.sub(" +", " ", mapped)


def natural_repeats(run, text: str, num: int, chunk: int, gap: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Rows: a chunk of text, `gap` other characters, the chunk again; and control rows with another chunk
    of text in place of the repeat."""
    rng = np.random.default_rng(seed)
    repeated, control = [], []
    for s, g, o in zip(*(rng.integers(0, len(text) - n, num) for n in (chunk, gap, chunk))):
        head = text[s : s + chunk] + text[g : g + gap]
        repeated.append(run.tokenizer.encode(head + text[s : s + chunk]))
        control.append(run.tokenizer.encode(head + text[o : o + chunk]))
    return np.asarray(repeated, np.int32), np.asarray(control, np.int32)


def natural_scores(cfg, params, repeated_BxL, control_BxL, chunk: int, induction_head: tuple[int, int]) -> dict:
    """The loss on the repeated chunk against the same position's loss in the control rows (the difference
    per row: mean and standard error), and the induction head's prefix-matching score on the repeat."""
    offset = repeated_BxL.shape[1] - chunk
    loss = lambda rows: induction.token_losses(trace(cfg, params, rows, names=[])[0], rows)[:, offset + 1 : offset + chunk - 1].mean(axis=1)
    repeat, control = loss(repeated_BxL), loss(control_BxL)
    _, cache = trace(cfg, params, repeated_BxL, names=f"block_{induction_head[0]}/attn_probs_BxHxLxS")
    probs_BxLxS = np.asarray(cache[f"block_{induction_head[0]}/attn_probs_BxHxLxS"])[:, induction_head[1]]
    queries = np.arange(offset + 1, offset + chunk - 1)
    diff = repeat - control
    return {"repeat_loss": float(repeat.mean()), "control_loss": float(control.mean()), "repeat_minus_control": float(diff.mean()),
            "repeat_minus_control_se": float(diff.std(ddof=1) / np.sqrt(len(diff))),
            "prefix_matching": float(probs_BxLxS[:, queries, queries - offset + 1].mean()), "rows": len(diff), "chunk": chunk, "offset": offset}


def patching_against_attribution(run, params, rng, num: int) -> dict:
    """Per prompt (a newline, a held-out string s, then s again up to a random point), corrupted by
    changing, in copy 1, the symbol the prompt ends with (so no earlier token is followed by the answer): heads and positions swept by real patching and
    estimated by attribution patching, pooled."""
    cfg = run.model_config
    real, estimate, path, restored_heads = {"heads": [], "positions": []}, {"heads": [], "positions": []}, [], []
    for s in lines(rng, num):
        cut = int(rng.integers(3, STRING - 1))  # the prompt ends at copy 2's token cut - 1; the answer is s[cut]
        clean = f"\n{s} {s[:cut]}"
        other = next(c for c in ALPHABET if c not in s)
        corrupted = f"\n{s[:cut - 1]}{other}{s[cut:]} {s[:cut]}"  # in copy 1, the symbol before the answer's source
        clean_1xL, corrupted_1xL = run.tokens_BxL(clean)[:1], run.tokens_BxL(corrupted)[:1]
        metric = patching.Metric(run.token_id(s[cut]))
        for what, at in (("heads", "head_out"), ("positions", "resid_pre")):
            site = patching.parse_site(cfg, at)
            result = patching.patch(cfg, params, clean_1xL, corrupted_1xL, metric, site, what)
            real[what].append((np.asarray(result["patched"]) - result["corrupted"]).ravel())
            estimate[what].append(np.asarray(attribution.attribution_patch(cfg, params, clean_1xL, corrupted_1xL, metric, site, what)["estimate"]).ravel())
            if what == "heads":
                restored_heads.append(result["restored"])
        path.append((clean_1xL, corrupted_1xL, metric))
    out = {}
    for what in real:
        r, e = np.concatenate(real[what]), np.concatenate(estimate[what])
        rank = lambda x: np.argsort(np.argsort(x))
        out[what] = {"pearson": float(np.corrcoef(r, e)[0, 1]), "spearman": float(np.corrcoef(rank(r), rank(e))[0, 1]),
                     "points": len(r), "real": r.tolist(), "estimate": e.tolist()}
    out["restored_heads_mean"] = np.nanmean(np.asarray(restored_heads, np.float64), axis=0).tolist()
    return out, path


def path_scores(run, params, prompts, sender_layer: int, receiver: tuple[int, int]) -> dict:
    cfg = run.model_config
    out = {}
    for via in ("q", "k", "v"):
        for h in range(cfg.H):
            values = [patching.path_patch(cfg, params, c, r, m, (sender_layer, h), receiver, via)["restored"] for c, r, m in prompts]
            out[f"block_{sender_layer}:{h}->{receiver[0]}:{receiver[1]}.{via}"] = float(np.nanmean(np.asarray(values, np.float64)))
    return out


def plot(points: list[dict], path: str, sender: int, receiver: int) -> None:
    """The curves against the step; composition of the circuit's pair (sender head of block_0, receiver head
    of block_1, found at the last checkpoint), the best pair dotted."""
    steps = [p["step"] for p in points]
    fig = Figure(figsize=(16, 3.8), layout="constrained")
    ax_loss, ax_heads, ax_icl, ax_comp = fig.subplots(1, 4)
    for c in range(3):
        ax_loss.plot(steps, [p["copy_loss"][c] for p in points], "o-", ms=2, label=f"copy {c + 1}")
    ax_loss.plot(steps, [np.nan if p["train_loss"] is None else p["train_loss"] for p in points], "k--", lw=1, label="train loss")
    ax_loss.plot(steps, [p["bare"]["copy_loss"][1] for p in points], ":", color="C1", label="copy 2, no leading newline")
    ax_loss.set_title('loss on held-out "s s s" lines')
    ax_loss.legend(fontsize=7)
    ax_heads.plot(steps, [max(p["previous_token"]) for p in points], "o-", ms=2, label="block_0 best previous-token")
    ax_heads.plot(steps, [max(p["prefix_matching"][1]) for p in points], "o-", ms=2, label="block_1 best prefix-matching, copy 2")
    ax_heads.plot(steps, [max(p["prefix_matching_3"][1]) for p in points], "o-", ms=2, label="block_1 best prefix-matching, copy 3")
    ax_heads.plot(steps, [max(p["bare"]["prefix_matching"][1]) for p in points], ":", label="copy 2, no leading newline")
    ax_heads.axhline(0.5, color="k", lw=0.5)
    ax_heads.set_ylim(0, 1)
    ax_heads.set_title("head scores")
    ax_heads.legend(fontsize=7)
    icl = [p["in_context"] for p in points]
    ax_icl.errorbar(steps, [i["score"] for i in icl], yerr=[2 * i["score_se"] for i in icl], fmt="o-", ms=2, color="C3")
    ax_icl.axhline(0, color="k", lw=0.5)
    ax_icl.set_title(f"in-context score, band {BANDS[-1]} - {BANDS[0]} (±2 SE)")
    for c, kind in enumerate(("q", "k", "v")):
        ax_comp.plot(steps, [p["composition"][kind][sender][receiver] for p in points], "o-", ms=2, color=f"C{c}",
                     label=f"{kind.upper()}-composition")
        ax_comp.plot(steps, [np.max(p["composition"][kind]) for p in points], ":", lw=1, color=f"C{c}")
    ax_comp.set_title(f"block_0 head {sender} into block_1 head {receiver} (dotted: best pair)", fontsize=9)
    ax_comp.legend(fontsize=7)
    for ax in (ax_loss, ax_heads, ax_icl, ax_comp):
        ax.set_xlabel("step")
    fig.savefig(path, dpi=110)


def plot_attribution(versus: dict, path: str) -> None:
    """Attribution patching's estimate against real patching, one point per prompt and row."""
    fig = Figure(figsize=(8, 3.8), layout="constrained")
    for ax, what in zip(fig.subplots(1, 2), ("heads", "positions")):
        real, estimate = np.asarray(versus[what]["real"]), np.asarray(versus[what]["estimate"])
        ax.scatter(real, estimate, s=6, alpha=0.5)
        bound = float(max(np.abs(real).max(), np.abs(estimate).max()))
        ax.plot([-bound, bound], [-bound, bound], "k", lw=0.5)
        ax.set_title(f"{what}: Pearson {versus[what]['pearson']:.2f}, Spearman {versus[what]['spearman']:.2f}", fontsize=9)
        ax.set_xlabel("patched - corrupted loss (real patching)")
        ax.set_ylabel("attribution patching's estimate")
    fig.savefig(path, dpi=110)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--workdir", default="/tmp/induction_exp/control")
    ap.add_argument("--out", default=HERE)
    ap.add_argument("--windows", type=int, default=2048)
    ap.add_argument("--final_only", action="store_true", help="reuse positive_control.json's curves; redo the final analyses")
    args = ap.parse_args()
    started = time.time()
    run = llm.load(args.workdir)
    cfg = run.model_config
    rng = np.random.default_rng(0)
    strings = lines(rng, 256)
    rows_BxL, bare_BxL = triple_rows(run, strings, True), triple_rows(run, strings, False)
    windows = held_out_windows(run, args.windows, seed=1)
    train_loss = {}
    with open(os.path.join(args.workdir, "metrics.jsonl")) as f:
        for line in f:
            m = json.loads(line)
            if "loss" in m and "step" in m:
                train_loss[int(m["step"])] = m["loss"]
    reader = checkpoint.reader(args.workdir)
    steps = sorted(reader.all_steps())
    reader.close()
    points = []
    saved = os.path.join(args.out, "positive_control.json")
    if args.final_only:  # the checkpoints' curves from the last full run; only the final analyses again
        with open(saved) as f:
            points, steps = json.load(f)["points"], []
    for step in [] if args.final_only else [0] + steps:
        params = nn.unbox(model.init(cfg, jax.random.key(run.config.seed))) if step == 0 else llm.load(args.workdir, step).params
        bare = head_scores(cfg, params, bare_BxL, False)
        points.append({"step": int(step), "train_loss": train_loss.get(step), "copy_loss": copy_losses(cfg, params, rows_BxL, True),
                       **head_scores(cfg, params, rows_BxL, True),
                       "bare": {"copy_loss": copy_losses(cfg, params, bare_BxL, False), "prefix_matching": bare["prefix_matching"]},
                       "in_context": induction.in_context_bands(cfg, params, windows, BANDS),
                       "composition": attribution.composition_scores(cfg, params)})
        p = points[-1]
        print(json.dumps({"step": step, "copy_loss": np.round(p["copy_loss"], 3).tolist(), "bare": np.round(p["bare"]["copy_loss"], 3).tolist(),
                          "prev": round(max(p["previous_token"]), 3), "prefix": round(max(p["prefix_matching"][1]), 3),
                          "prefix3": round(max(p["prefix_matching_3"][1]), 3), "prefix_bare": round(max(p["bare"]["prefix_matching"][1]), 3),
                          "icl": round(p["in_context"]["score"], 3),
                          "kcomp": round(float(np.max(p["composition"]["k"])), 3)}), flush=True)
    final = run.params
    prev_head = int(np.argmax(points[-1]["previous_token"]))
    induction_head = (1, int(np.argmax(points[-1]["prefix_matching"][1])))
    change = next((p["step"] for p in points if max(p["prefix_matching"][1]) > 0.5), None)
    versus, prompts = patching_against_attribution(run, final, np.random.default_rng(2), 24)
    text = natural_text()
    rows = natural_repeats(run, text, 2048, 30, 40, seed=3)
    natural = {"induction_head": list(induction_head), "final": natural_scores(cfg, final, *rows, 30, induction_head),
               "at_init": natural_scores(cfg, nn.unbox(model.init(cfg, jax.random.key(run.config.seed))), *rows, 30, induction_head),
               "in_context_natural": induction.in_context_bands(cfg, final, np.asarray(
                   [run.tokenizer.encode(text[s : s + run.context]) for s in np.random.default_rng(4).integers(0, len(text) - run.context, args.windows)],
                   np.int32), BANDS)}
    half = run.context // 2
    repeated_windows = np.concatenate([windows[:, :half], windows[:, :half]], axis=1)
    result = {"workdir": args.workdir, "bands": BANDS, "windows": args.windows, "previous_token_head": [0, prev_head],
              "induction_head": list(induction_head), "first_step_prefix_matching_above_half": change,
              "points": points, "patching_vs_attribution": versus,
              "path_patching": path_scores(run, final, prompts, 0, induction_head), "natural_text": natural,
              "repeated_held_out": {"final": induction.in_context_bands(cfg, final, repeated_windows, ((4, half - 1), (half + 4, 2 * half - 1))),
                                    "init": induction.in_context_bands(cfg, nn.unbox(model.init(cfg, jax.random.key(run.config.seed))),
                                                                       repeated_windows, ((4, half - 1), (half + 4, 2 * half - 1)))},
              "seconds": time.time() - started}
    with open(os.path.join(args.out, "positive_control.json"), "w") as f:
        json.dump(result, f, indent=1)
    plot(points, os.path.join(args.out, "positive_control.png"), prev_head, induction_head[1])
    plot_attribution(versus, os.path.join(args.out, "positive_control_attribution.png"))
    print(json.dumps({k: result[k] for k in ("previous_token_head", "induction_head", "first_step_prefix_matching_above_half", "path_patching", "seconds")}))
    print(json.dumps({k: {kk: vv for kk, vv in v.items() if kk in ("pearson", "points")} for k, v in versus.items() if k != "restored_heads_mean"}))
    print(json.dumps(natural))


if __name__ == "__main__":
    main()
