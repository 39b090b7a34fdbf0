"""Input-pipeline throughput on one CPU core vs what training consumes.

usage: python experiments/data/throughput.py [--config=configs/default.py] [--batches=2000]
Prints one JSON line: pipeline tokens/s (one core), the train step's tokens/s, and their ratio.
"""

import json
import os
import sys
import time

from absl import app, flags
from ml_collections import config_flags

from llm.data import corpus as corpus_lib, text as text_lib

_CONFIG = config_flags.DEFINE_config_file("config", "configs/default.py")
flags.DEFINE_integer("batches", 2000, "batches to draw from the pipeline")
flags.DEFINE_integer("train_steps", 10, "train steps to time for the consumption side")


def main(_):
    from llm import bench, spec
    from llm.data import tokenizer

    cfg = _CONFIG.value
    dc = spec.from_config(cfg).data
    texts = corpus_lib.load_documents(dc, "train") + corpus_lib.load_documents(dc, "validation")
    tok = tokenizer.train(cfg.data.tokenizer, texts, cfg.data.vocab_size, cfg.data.spm_model_type)
    stream = text_lib.token_stream(dc, "train", tok)  # tokenized once, cached; what a run reads afterwards

    os.sched_setaffinity(0, {0})  # the pipeline's share: one core
    batches = text_lib.TrainBatches(stream, cfg.batch_size, cfg.seq_len, cfg.seed, sampling=cfg.data.sampling, packing=cfg.data.packing, eos_id=tok.eos_id)
    next(batches)
    start = time.perf_counter()
    for _ in range(flags.FLAGS.batches):
        next(batches)
    pipeline = flags.FLAGS.batches * cfg.batch_size * cfg.seq_len / (time.perf_counter() - start)

    os.sched_setaffinity(0, set(range(os.cpu_count())))  # training gets the whole machine
    consumed = bench.bench_train(cfg, steps=flags.FLAGS.train_steps, peak_tflops=1.0)["tokens_per_s"]
    print(json.dumps({"config": cfg.name, "pipeline_tokens_per_s_one_core": round(pipeline),
                      "train_tokens_per_s": round(consumed), "ratio": round(pipeline / consumed, 1)}))


if __name__ == "__main__":
    sys.path.insert(0, os.getcwd())
    app.run(main)
