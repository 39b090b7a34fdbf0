"""nanoGPT's CPU Shakespeare run re-implemented in PyTorch, for side-by-side checks with this repo.

Written for this repo (not nanoGPT's code): the same model (pre-LN GPT, LayerNorm and Linear without
bias, tied head, GPT-2 init), AdamW with nanoGPT's decay groups and LR formula, nanoGPT's random-window
batches. It needs torch, which this repo does not depend on: run it from a separate venv.

  python torch_nanogpt.py --seed=0 --out=run.json            # an independent run, nanoGPT-style
  python torch_nanogpt.py --replay=replay.npz --out=run.json  # our init and batches (see parity.py)

Reports the full-validation-split loss (every target once, as `./run.sh eval` scores it), nanoGPT's
20-batch estimate, and the median ms per train step (forward, backward, clip, AdamW).
"""

import argparse
import json
import math
import os
import time

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

DATA = os.path.join(os.path.dirname(__file__), "..", "..", "..", "shared", "data", "tiny_shakespeare", "input.txt")
D, N, H, L, BATCH, STEPS = 128, 4, 4, 64, 12, 2000
PEAK_LR, MIN_LR, WARMUP = 1e-3, 1e-4, 100


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(D, bias=False), nn.LayerNorm(D, bias=False)
        self.qkv, self.attn_out = nn.Linear(D, 3 * D, bias=False), nn.Linear(D, D, bias=False)
        self.fc, self.mlp_out = nn.Linear(D, 4 * D, bias=False), nn.Linear(4 * D, D, bias=False)

    def forward(self, x_BxLxD):
        B, T, _ = x_BxLxD.shape
        q, k, v = self.qkv(self.ln1(x_BxLxD)).split(D, dim=2)
        q, k, v = (t.view(B, T, H, D // H).transpose(1, 2) for t in (q, k, v))
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(B, T, D)
        x_BxLxD = x_BxLxD + self.attn_out(a)
        return x_BxLxD + self.mlp_out(F.gelu(self.fc(self.ln2(x_BxLxD))))


class GPT(nn.Module):
    def __init__(self, vocab: int):
        super().__init__()
        self.wte, self.wpe = nn.Embedding(vocab, D), nn.Embedding(L, D)
        self.blocks = nn.ModuleList(Block() for _ in range(N))
        self.ln_f = nn.LayerNorm(D, bias=False)
        for name, p in self.named_parameters():
            if p.dim() == 2:
                std = 0.02 / math.sqrt(2 * N) if name.endswith(("attn_out.weight", "mlp_out.weight")) else 0.02
                nn.init.normal_(p, 0.0, std)

    def forward(self, idx_BxL):
        x = self.wte(idx_BxL) + self.wpe(torch.arange(idx_BxL.shape[1]))
        for block in self.blocks:
            x = block(x)
        return self.ln_f(x) @ self.wte.weight.T  # the head is tied to the token embedding

    def load_jax(self, params: dict):
        """Params exported by parity.py from this repo's model (its layouts, transposed to torch's)."""
        t = lambda a: torch.from_numpy(np.ascontiguousarray(a)).float()
        with torch.no_grad():
            self.wte.weight.copy_(t(params["embed"]))
            self.wpe.weight.copy_(t(params["pos_embed"]))
            self.ln_f.weight.copy_(t(params["final_norm.scale"]))
            for i, b in enumerate(self.blocks):
                p = lambda k: params[f"block_{i}.{k}"]
                b.ln1.weight.copy_(t(p("attn_norm.scale")))
                b.ln2.weight.copy_(t(p("mlp_norm.scale")))
                wqkv = np.concatenate([p(f"attn.{w}").reshape(D, D) for w in ("wq", "wk", "wv")], axis=1)
                b.qkv.weight.copy_(t(wqkv.T))
                b.attn_out.weight.copy_(t(p("attn.wo").reshape(D, D).T))
                b.fc.weight.copy_(t(p("mlp.wi").T))
                b.mlp_out.weight.copy_(t(p("mlp.wo").T))


def nanogpt_lr(step: int) -> float:
    if step < WARMUP:
        return PEAK_LR * (step + 1) / (WARMUP + 1)
    ratio = (step - WARMUP) / (STEPS - WARMUP)
    return MIN_LR + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (PEAK_LR - MIN_LR)


def ours_lr(step: int) -> float:
    """This repo's schedule (optax): warmup from 0 at step 0, then the same cosine."""
    if step < WARMUP:
        return PEAK_LR * step / WARMUP
    return nanogpt_lr(step)


def full_split_loss(model: GPT, stream: np.ndarray) -> float:
    """Every token after the first is a target once, in rows of L, as this repo's eval does."""
    targets = len(stream) - 1
    rows = -(-targets // L)
    padded = np.zeros(rows * L + 1, np.int64)
    padded[: len(stream)] = stream
    x, y = padded[:-1].reshape(rows, L), padded[1:].reshape(rows, L)
    weight = torch.from_numpy((np.arange(rows * L) < targets).reshape(rows, L).astype(np.float32))
    total = 0.0
    with torch.no_grad():
        for first in range(0, rows, 64):
            logits = model(torch.from_numpy(x[first : first + 64]))
            losses = F.cross_entropy(logits.transpose(1, 2), torch.from_numpy(y[first : first + 64]), reduction="none")
            total += float((losses * weight[first : first + 64]).sum())
    return total / targets


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--replay", default="", help="npz from parity.py: params, batches, val stream, vocab")
    ap.add_argument("--steps", type=int, default=STEPS)
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    torch.manual_seed(args.seed)

    if args.replay:
        replay = np.load(args.replay)
        vocab, val = int(replay["vocab"]), replay["val"]
        batches = replay["batches"]
        model = GPT(vocab)
        model.load_jax({k[len("param:"):]: replay[k] for k in replay.files if k.startswith("param:")})
        lr_at = ours_lr
    else:
        text = open(DATA, encoding="utf-8").read()
        chars = sorted(set(text))
        ids = np.array([chars.index(c) for c in text], dtype=np.int64)
        split = int(len(ids) * 0.9)
        train, val = ids[:split], ids[split:]
        vocab, batches, model, lr_at = len(chars), None, GPT(len(chars)), nanogpt_lr

    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=PEAK_LR, betas=(0.9, 0.99), eps=1e-8)
    losses, step_s, start = [], [], time.perf_counter()
    for step in range(args.steps):
        if batches is not None:
            xy = torch.from_numpy(batches[step].astype(np.int64))
        else:
            starts = torch.randint(len(train) - L, (BATCH,))
            xy = torch.stack([torch.from_numpy(train[i : i + L + 1]) for i in starts.tolist()])
        t0 = time.perf_counter()
        for group in opt.param_groups:
            group["lr"] = lr_at(step)
        logits = model(xy[:, :-1])
        loss = F.cross_entropy(logits.reshape(-1, vocab), xy[:, 1:].reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        step_s.append(time.perf_counter() - t0)
        losses.append(loss.item())
    train_s = time.perf_counter() - start

    estimate = []
    rng = torch.Generator().manual_seed(1234 + args.seed)
    with torch.no_grad():
        for _ in range(20):
            starts = torch.randint(len(val) - L, (BATCH,), generator=rng)
            xy = torch.stack([torch.from_numpy(val[i : i + L + 1].astype(np.int64)) for i in starts.tolist()])
            estimate.append(float(F.cross_entropy(model(xy[:, :-1]).reshape(-1, vocab), xy[:, 1:].reshape(-1))))
    result = {
        "seed": args.seed, "replay": bool(args.replay), "steps": args.steps, "threads": torch.get_num_threads(),
        "torch": torch.__version__, "train_losses": losses, "val_loss_full_split": full_split_loss(model, val),
        "val_loss_20_batch_estimate": float(np.mean(estimate)), "step_ms_median": 1e3 * float(np.median(step_s[10:])),
        "train_seconds": train_s,
    }
    with open(args.out, "w") as f:
        json.dump(result, f)
    print(json.dumps({k: v for k, v in result.items() if k != "train_losses"}))


if __name__ == "__main__":
    main()
