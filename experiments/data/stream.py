"""The streamed input pipeline at corpus scale: start-up time and peak memory at 0.2, 1 and 2 GB of JSONL,
and tokens/s per data worker against what the default config trains on.

usage: python experiments/data/stream.py [--root=/tmp/llm_stream_bench] [--sizes_gb=0.2,1,2]
Writes experiments/data/stream.json. The corpus is generated here: runs of 5-60 consecutive lines of the
built-in Shakespeare text as documents, written as 100 MB JSONL shards (a prefix of the shards is each size).
"""

import glob
import json
import os
import random
import subprocess
import sys
import time

from absl import app, flags

from llm.data import stream as stream_lib

flags.DEFINE_string("root", "/tmp/llm_stream_bench", "where the corpus, indexes and runs go")
flags.DEFINE_list("sizes_gb", ["0.2", "1", "2"], "corpus sizes to start a run on")
flags.DEFINE_integer("batches", 1500, "batches drawn per throughput measurement")
flags.DEFINE_string("out", "experiments/data/stream.json", "results")
FLAGS = flags.FLAGS
SHARD_BYTES = 100_000_000
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def write_corpus(root: str, total_bytes: int) -> list[str]:
    from llm.data.datasets.shakespeare import works

    lines = [line for path in works().values() for line in open(path, encoding="utf-8").read().split("\n")]
    os.makedirs(root, exist_ok=True)
    rng, paths = random.Random(0), []
    for s in range(-(-total_bytes // SHARD_BYTES)):
        path = os.path.join(root, f"shard-{s:05d}.jsonl")
        paths.append(path)
        if os.path.exists(path):
            continue
        with open(path + ".tmp", "w", encoding="utf-8") as f:
            size = 0
            while size < SHARD_BYTES:
                start = rng.randrange(len(lines))
                line = json.dumps({"text": "\n".join(lines[start : start + rng.randint(5, 60)])}) + "\n"
                f.write(line)
                size += len(line)
        os.replace(path + ".tmp", path)
    return paths


def tree_rss(pid: int) -> int:
    """Resident bytes of a process and all its descendants (shared pages counted in each)."""
    total, todo = 0, [pid]
    while todo:
        p = todo.pop()
        try:
            with open(f"/proc/{p}/status") as f:
                total += next(int(l.split()[1]) * 1024 for l in f if l.startswith("VmRSS:"))
            with open(f"/proc/{p}/task/{p}/children") as f:
                todo += [int(c) for c in f.read().split()]
        except (FileNotFoundError, StopIteration, ProcessLookupError):
            pass
    return total


def start_run(dataset: str, tokenizer_path: str, workdir: str, data_dir: str) -> dict:
    """One `train` command on the corpus: seconds to its first logged step and the tree's peak RSS."""
    command = [sys.executable, "-m", "llm.cli", "train", "--config=configs/default.py", f"--workdir={workdir}",
               f"--config.data.dataset={dataset}", "--config.data.tokenizer=sentencepiece",
               f"--config.data.tokenizer_path={tokenizer_path}", f"--config.data.data_dir={data_dir}",
               "--config.data.num_workers=1", "--config.num_train_steps=40", "--config.log_every_steps=1",
               "--config.eval_every_steps=0", "--config.sample_tokens=0", "--config.peak_tflops=1"]
    start = time.time()
    proc = subprocess.Popen(command, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    peak, first = 0, None
    metrics = os.path.join(workdir, "metrics.jsonl")
    while proc.poll() is None:
        peak = max(peak, tree_rss(proc.pid))
        if first is None and os.path.exists(metrics) and os.path.getsize(metrics):
            first = time.time() - start
        time.sleep(0.1)
    assert proc.returncode == 0, proc.stderr.read()[-3000:]
    record = json.loads(open(metrics).readline())
    return {"first_step_s": round(first if first is not None else record["time"] - start, 1), "peak_rss_gb": round(peak / 1e9, 3),
            "train_s": round(time.time() - start, 1)}


def pipeline_throughput(dataset: str, tokenizer_path: str, data_dir: str, workers: int, batches: int) -> dict:
    from llm import data
    from llm.data import tokenizer

    with open(tokenizer_path, "rb") as f:
        tok = tokenizer.SentencePieceTokenizer(f.read())
    split = stream_lib.open_split(data.DataConfig(dataset=dataset, data_dir=data_dir), "train")
    stream = stream_lib.StreamBatches(split, tok, 16, 128, seed=0, num_workers=workers)  # the default config's batch
    for _ in range(20):
        next(stream)
    start = time.perf_counter()
    for _ in range(batches):
        next(stream)
    seconds = time.perf_counter() - start
    docs = stream._docs_seen
    stream.close()
    tokens_per_s = batches * 16 * 128 / seconds
    # Text bytes per token, measured on documents of the corpus.
    sample = [split[k][0] for k in range(200)]
    bytes_per_token = sum(len(t.encode()) for t in sample) / sum(len(tok.encode(t)) + 1 for t in sample)
    return {"workers": workers, "tokens_per_s": round(tokens_per_s), "documents_read": docs,
            "text_mb_per_s_per_worker": round(tokens_per_s * bytes_per_token / 1e6 / max(workers, 1), 2)}


def train_tokens_per_s_one_core() -> float:
    result = subprocess.run(["taskset", "-c", "0", sys.executable, "-m", "llm.cli", "bench", "train", "--config=configs/default.py",
                             "--peak_tflops=1"], cwd=REPO, capture_output=True, text=True, check=True)
    return json.loads(result.stdout.strip().splitlines()[-1])["tokens_per_s"]


def main(_):
    from llm.data import tokenizer
    from llm.data.datasets.shakespeare import works

    os.makedirs(FLAGS.root, exist_ok=True)
    sizes = [float(s) for s in FLAGS.sizes_gb]
    t = time.time()
    paths = write_corpus(os.path.join(FLAGS.root, "corpus"), int(max(sizes) * 1e9))
    print(f"corpus: {len(paths)} shards in {time.time() - t:.0f} s", file=sys.stderr)
    spm = os.path.join(FLAGS.root, "bpe4096.model")
    if not os.path.exists(spm):
        texts = [open(p, encoding="utf-8").read() for p in works().values()]
        with open(spm, "wb") as f:
            f.write(tokenizer.SentencePieceTokenizer.train(texts, 4096).model_proto)

    results = {"machine_cores": os.cpu_count(), "runs": []}
    for size in sizes:
        shards = paths[: round(size * 1e9 / SHARD_BYTES)]
        listing = os.path.join(FLAGS.root, f"size_{size}")
        os.makedirs(listing, exist_ok=True)
        for p in shards:  # one glob per size: links to its prefix of the shards
            link = os.path.join(listing, os.path.basename(p))
            if not os.path.exists(link):
                os.symlink(p, link)
        dataset = f"jsonl:{listing}/*.jsonl"
        data_dir = os.path.join(FLAGS.root, f"index_{size}_{time.time_ns()}")  # a cold index: start-up includes indexing
        run = start_run(dataset, spm, os.path.join(FLAGS.root, f"run_{size}_{time.time_ns()}"), data_dir)
        run.update(corpus_gb=round(sum(os.path.getsize(p) for p in shards) / 1e9, 2), shards=len(shards))
        results["runs"].append(run)
        print(json.dumps(run), file=sys.stderr)

    biggest = f"jsonl:{os.path.join(FLAGS.root, f'size_{max(sizes)}')}/*.jsonl"
    data_dir = glob.glob(os.path.join(FLAGS.root, f"index_{max(sizes)}_*"))[-1]
    results["pipeline"] = [pipeline_throughput(biggest, spm, data_dir, w, FLAGS.batches) for w in (1, 2)]
    results["train_tokens_per_s_one_core"] = round(train_tokens_per_s_one_core())
    for p in results["pipeline"]:
        p["ratio_to_training"] = round(p["tokens_per_s"] / results["train_tokens_per_s_one_core"], 1)
    with open(FLAGS.out, "w") as f:
        json.dump(results, f, indent=2)
    print(json.dumps(results))


if __name__ == "__main__":
    sys.path.insert(0, REPO)
    app.run(main)
