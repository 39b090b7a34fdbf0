"""mup's output multiplier at the base width (32): alpha_out in 1, 2, 4, 8, 16 at two learning rates
(results/alpha_out_scan.jsonl; experiments/mup/README.md says why it is tuned).

    .venv/bin/python experiments/mup/alpha_out_scan.py > experiments/mup/results/alpha_out_scan.jsonl
"""

import json
import os
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(os.path.dirname(HERE)))
sys.path.insert(0, HERE)

import transfer  # noqa: E402

from llm import spec  # noqa: E402
from llm.training import loop, sharding  # noqa: E402


def main() -> None:
    sharding.leave_out_absent_tpu()
    for alpha in (1.0, 2.0, 4.0, 8.0, 16.0):
        for lr in (2**-7, 2**-5):
            with tempfile.TemporaryDirectory() as workdir:
                summary = loop.train(spec.from_config(transfer.config(transfer.BASE_WIDTH, 2, lr, 0, "mup", "none", alpha)), workdir, quiet=True)
            print(json.dumps({"alpha_out": alpha, "lr": lr, "eval_loss": summary["eval_loss"]}), flush=True)


if __name__ == "__main__":
    main()
