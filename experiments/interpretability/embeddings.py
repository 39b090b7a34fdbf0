"""Word vectors and MLP neurons of the BPE Shakespeare model (configs/shakespeare_bpe.py).

Trains the run first if --workdir has no checkpoint, then reports, on the input embedding (the model
ties it to the output head):

  - the cosine nearest neighbours of common words that are one piece of the 4096-piece vocabulary,
  - analogies a - b + c (Mikolov et al. 2013) over such words, with the expected answer's rank, next to
    baselines without the offset (c alone, a alone, a + c) that show when an analogy only "works"
    because the answer already sits next to one of the words,
  - the held-out contexts that fire the last block's most variable MLP neurons hardest.

usage: python experiments/interpretability/embeddings.py [--workdir=/tmp/interp_bpe/run] [--out=.../embeddings.json]
"""

import json
import os
import subprocess
import time

import numpy as np
from absl import app, flags

import llm
from llm.data import corpus as corpus_lib, text as text_lib
from llm.inspect import embeddings
from llm.run import api
from llm.training import checkpoint

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))

FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", "/tmp/interp_bpe/run", "the BPE run; trained with configs/shakespeare_bpe.py when it has no checkpoint")
flags.DEFINE_string("out", os.path.join(HERE, "embeddings.json"), "where the results go")
flags.DEFINE_integer("k", 5, "neighbours and analogy answers listed per query")
flags.DEFINE_integer("num_neurons", 3, "last-block MLP neurons shown (the most variable ones)")
flags.DEFINE_integer("variance_batches", 4, "validation batches the neurons' activation variance is measured on")
flags.DEFINE_integer("neuron_batches", 0, "validation batches searched for each neuron's top contexts (0: all, 14 here)")

WORDS = ["king", "queen", "lord", "lady", "love", "death", "night", "day", "good", "sweet", "heart",
         "father", "son", "mother", "he", "she", "thou", "thee", "blood", "war", "fair", "god"]

# (a, b, c, expected): a - b + c should land on expected, i.e. a : b :: expected : c.
ANALOGIES = [
    ("king", "man", "woman", "queen"),
    ("he", "him", "her", "she"),
    ("father", "son", "daughter", "mother"),
    ("brother", "sister", "daughter", "son"),
    ("king", "queen", "lady", "lord"),
    ("man", "men", "women", "woman"),
    ("lord", "lords", "ladies", "lady"),
    ("thou", "thee", "him", "he"),
    ("thy", "thee", "me", "my"),
    ("my", "me", "him", "his"),
    ("good", "better", "worse", "bad"),
    ("day", "night", "dark", "light"),
    ("is", "was", "had", "have"),
    ("love", "loved", "hated", "hate"),
]


def ensure_trained(workdir: str) -> float | None:
    """Trains the run when the workdir has no checkpoint; the training's wall time, or None if it had one."""
    if os.path.isdir(workdir) and checkpoint.latest_step(workdir) is not None:
        return None
    start = time.time()
    subprocess.run(["./run.sh", "train", "--config=configs/shakespeare_bpe.py", f"--workdir={workdir}"], cwd=ROOT, check=True)
    return time.time() - start


def single_piece(run: api.Run, word: str) -> tuple[str, int] | None:
    """The word's one-piece form, preferring " word" (how it reads mid-line, so its common form), else None."""
    for form in (" " + word, word):
        ids = run.tokenizer.encode(form)
        if len(ids) == 1:
            return form, int(ids[0])
    return None


def piece_counts(run: api.Run) -> np.ndarray:
    """How often each id occurs in the training split: a rarely seen piece has a barely trained vector."""
    stream = text_lib.token_stream(run.spec.data, "train", run.tokenizer)
    return np.bincount(np.asarray(stream), minlength=run.tokenizer.vocab_size)


def show(run: api.Run, token: int) -> str:
    return run.tokenizer.decode([token])


def neighbour_rows(run: api.Run, counts_V: np.ndarray, k: int) -> tuple[list[dict], list[str]]:
    rows, skipped = [], []
    for word in WORDS:
        found = single_piece(run, word)
        if found is None:
            skipped.append(word)
            continue
        form, token = found
        near = [n for n in run.neighbours(token, k + 1) if n[0] != token][:k]  # the word itself left out
        rows.append({"word": word, "form": form, "id": token, "train_count": int(counts_V[token]),
                     "neighbours": [{"token": show(run, i), "id": i, "cosine": c} for i, c in near]})
    return rows, skipped


def rank_of(answers: list[tuple[int, float]], token: int) -> int | None:
    ids = [i for i, _ in answers]
    return ids.index(token) + 1 if token in ids else None


def nearest(table_VxD: np.ndarray, query_D: np.ndarray, k: int, exclude: tuple[int, ...]) -> list[tuple[int, float]]:
    """The k rows nearest the query in cosine, leaving out `exclude` as embeddings.analogy does."""
    cos_V = table_VxD @ query_D / np.maximum(np.linalg.norm(table_VxD, axis=-1) * np.linalg.norm(query_D), 1e-12)
    cos_V[list(exclude)] = -np.inf
    return [(int(i), float(cos_V[i])) for i in np.argsort(-cos_V, kind="stable")[:k]]


METHODS = ("raw", "unit", "only_c", "only_a", "ignore_b")  # the analogy, then the baselines


def analogy_rows(run: api.Run, counts_V: np.ndarray, k: int) -> tuple[list[dict], list[dict]]:
    """Each analogy on the raw vectors (what embeddings.analogy does) and on unit vectors (3CosAdd as
    Mikolov et al. and gensim score it), next to baselines that use no offset (Linzen 2016): c alone,
    a alone, and a + c without b. a, b and c are left out of every list, so the columns compare."""
    V = run.tokenizer.vocab_size
    embed_VxD = embeddings.tables(run.model_config, run.params)["embed"][:V]
    unit_VxD = embed_VxD / np.maximum(np.linalg.norm(embed_VxD, axis=-1, keepdims=True), 1e-12)
    rows, skipped = [], []
    for words in ANALOGIES:
        found = [single_piece(run, w) for w in words]
        if any(f is None for f in found):
            skipped.append({"query": list(words), "not_one_piece": [w for w, f in zip(words, found) if f is None]})
            continue
        a, b, c, expected = (token for _, token in found)
        answers = {
            "raw": embeddings.analogy(embed_VxD, a, b, c, k, V),
            "unit": embeddings.analogy(unit_VxD, a, b, c, k, V),
            "only_c": nearest(embed_VxD, embed_VxD[c], k, (a, b, c)),
            "only_a": nearest(embed_VxD, embed_VxD[a], k, (a, b, c)),
            "ignore_b": nearest(embed_VxD, embed_VxD[a] + embed_VxD[c], k, (a, b, c)),
        }
        row = {"query": list(words), "forms": [form for form, _ in found], "train_counts": [int(counts_V[t]) for _, t in found]}
        for method, top in answers.items():
            row[method] = [{"token": show(run, i), "cosine": cos} for i, cos in top]
            row[f"{method}_rank"] = rank_of(top, expected)
        rows.append(row)
    return rows, skipped


def hits(rows: list[dict], key: str, k: int) -> dict:
    ranks = [r[key] for r in rows]
    return {"top1": sum(r == 1 for r in ranks), "topk": sum(r is not None and r <= k for r in ranks), "of": len(rows)}


def most_variable_neurons(run: api.Run, layer: int, num: int, max_batches: int) -> tuple[list[int], np.ndarray]:
    """The `num` neurons of block `layer`'s MLP whose activation varies most over real validation positions,
    and those positions' activations [P, F]. SwiGLU units are signed, so the variance can come from the
    negative side, which top_contexts (largest values first) does not show."""
    name = f"block_{layer}/mlp_hidden_BxLxF"
    dc = run.spec.data
    batches = corpus_lib.split_eval_batches(dc, "validation", run.tokenizer, run.config.eval_batch_size, run.config.seq_len)
    acts = []
    for i, batch in enumerate(batches):
        if i >= max_batches:
            break
        _, cache = run.trace(batch["inputs"], names=[name], segment_ids=batch.get("segment_ids"))
        acts.append(cache[name][batch["weights"] > 0])  # [real positions, F]
    acts_PxF = np.concatenate(acts).astype(np.float64)
    return [int(n) for n in np.argsort(-acts_PxF.var(axis=0))[:num]], acts_PxF


def main(argv: list[str]) -> None:
    del argv
    k = FLAGS.k
    train_s = ensure_trained(FLAGS.workdir)
    start = time.time()
    run = llm.load(FLAGS.workdir)
    counts_V = piece_counts(run)
    result = {"workdir": FLAGS.workdir, "step": int(run.step), "train_wall_s": train_s,
              "model": {"d_model": run.model_config.D, "layers": run.model_config.N, "d_ff": run.model_config.F,
                        "vocab": run.tokenizer.vocab_size, "tied": run.model_config.tie_embeddings},
              "train_tokens_in_split": int(counts_V.sum()), "validation": run.evaluate("validation")}
    print(f"step {run.step}, validation loss {result['validation']['loss']:.3f}, "
          f"{result['validation']['bits_per_byte']:.3f} bits/byte")

    result["neighbours"], result["neighbours_skipped"] = neighbour_rows(run, counts_V, k)
    for r in result["neighbours"]:
        print(f"{r['form']!r:>10} ({r['train_count']:>5}x): " + "  ".join(f"{n['token']!r} {n['cosine']:.2f}" for n in r["neighbours"]))

    result["analogies"], result["analogies_skipped"] = analogy_rows(run, counts_V, k)
    result["analogy_hits"] = {method: hits(result["analogies"], f"{method}_rank", k) for method in METHODS}
    for r in result["analogies"]:
        a, b, c, want = r["query"]
        ranks = ", ".join(f"{method} {r[f'{method}_rank']}" for method in METHODS)
        print(f"{a} - {b} + {c} -> {want}? ({ranks}): " + "  ".join(repr(x["token"]) for x in r["raw"]))
    print("hits (top-1, top-k, of):", result["analogy_hits"])

    layer = run.model_config.N - 1
    chosen, acts_PxF = most_variable_neurons(run, layer, FLAGS.num_neurons, FLAGS.variance_batches)
    result["neurons"] = []
    for neuron in chosen:
        contexts = run.top_contexts(layer, neuron, "validation", k=k, max_batches=FLAGS.neuron_batches)
        act_P = acts_PxF[:, neuron]
        stats = {"variance": float(act_P.var()), "mean": float(act_P.mean()), "min": float(act_P.min()), "max": float(act_P.max()),
                 "positions": len(act_P)}
        result["neurons"].append({"layer": layer, "neuron": neuron, **stats,
                                  "contexts": [{key: c[key] for key in ("activation", "token", "text")} for c in contexts]})
        print(f"block_{layer} neuron {neuron}: variance {act_P.var():.3f}, mean {act_P.mean():.3f}, "
              f"range {act_P.min():.2f} to {act_P.max():.2f} over {len(act_P)} validation positions")
        for c in contexts:
            print(f"  {c['activation']:7.3f}  {c['text'][-70:]!r}")
    result["measure_wall_s"] = time.time() - start

    with open(FLAGS.out, "w") as f:
        json.dump(result, f, indent=1, ensure_ascii=False)
    print(f"wrote {FLAGS.out}")


if __name__ == "__main__":
    app.run(main)
