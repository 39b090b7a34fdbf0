"""The uninterrupted twins of tests/test_resume.py, trained one after another in a fresh process: no
state an earlier test left in a pytest worker can change their programs, and one process starts
instead of one per run.

usage: python tests/resume_twins.py RUNS.json  (name -> {corpus, overrides, workdir}) -> prints one JSON
object, name -> the run's summary
"""

import json
import sys

sys.path[:0] = [".", "tests"]

from conftest import tiny_config, train_run  # noqa: E402

from llm.training import rl  # noqa: E402


def main(path: str) -> None:
    summaries = {}
    for name, r in json.load(open(path)).items():
        cfg = tiny_config(r["corpus"], **r["overrides"])
        summaries[name] = train_run(cfg, r["workdir"], quiet=True, feed=rl.make_feed if cfg.objective == "grpo" else None)
    print(json.dumps(summaries))


if __name__ == "__main__":
    main(sys.argv[1])
