"""Training next to CPU-burning processes: every run must finish, with the idle run's final loss.

    python experiments/reliability/stress.py train [--runs=5] [--burners=N] [--name=stress_train] [-- --config.KEY=V ...]
    python experiments/reliability/stress.py bench [--runs=3] [--burners=N] [--name=stress_bench] [-- bench flags ...]

`train` runs `./run.sh train` (the default config unless flags say otherwise) once on an idle machine,
then `--runs` times next to N busy-looping processes (default: 2 x the cores), and writes
OUT/NAME.json (stress_train.json): exit code, wall time, median step time and final losses of each run
(`--log_dir=DIR` keeps the runs there, so an interrupted invocation continues where it stopped).
`bench` runs `./run.sh bench train` `--runs` times idle and `--runs` times loaded and writes
OUT/NAME.json (stress_bench.json).
"""

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))


class Burners:
    """N processes that each keep one core busy, as other jobs on a shared host or CI runner do."""

    def __init__(self, count: int):
        self.count, self.procs = count, []

    def __enter__(self):
        self.procs = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(self.count)]
        return self

    def __exit__(self, *exc):
        for p in self.procs:
            p.kill()
            p.wait()


def _final(workdir: str) -> dict:
    records = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]
    train = [r for r in records if "loss" in r]
    evals = [r for r in records if "eval_loss" in r]
    # tokens_per_s is logged per window; the median over windows is the typical step time.
    return {"step": train[-1]["step"], "loss": train[-1]["loss"], "eval_loss": evals[-1]["eval_loss"] if evals else None,
            "tokens_per_s_median": statistics.median(r["tokens_per_s"] for r in train)}


def train_once(flags: list[str], burners: int, log_dir: str, name: str) -> dict:
    workdir = os.path.join(log_dir, name)
    log = os.path.join(log_dir, f"{name}.log")
    done = os.path.join(log_dir, f"{name}.json")
    if os.path.exists(done):  # finished in an earlier invocation with the same --log_dir
        return json.load(open(done))
    shutil.rmtree(workdir, ignore_errors=True)  # a run cut short restarts from scratch, not from its checkpoint
    start = time.time()
    with Burners(burners), open(log, "w") as out:
        code = subprocess.run(["./run.sh", "train", f"--workdir={workdir}", *flags], cwd=REPO, stdout=out, stderr=subprocess.STDOUT).returncode
    result = {"name": name, "burners": burners, "exit_code": code, "wall_s": round(time.time() - start, 1)}
    if code == 0:
        result.update(_final(workdir))
    else:
        with open(log) as f:
            result["log_tail"] = f.read()[-1500:]
    with open(done, "w") as f:
        json.dump(result, f)
    print(json.dumps(result), flush=True)
    return result


def bench_once(flags: list[str], burners: int) -> dict:
    with Burners(burners):
        done = subprocess.run(["./run.sh", "bench", "train", *flags], cwd=REPO, capture_output=True, text=True)
    result = {"burners": burners, "exit_code": done.returncode}
    if done.returncode == 0:
        result.update(json.loads(done.stdout.strip().splitlines()[-1]))
    print(json.dumps(result), flush=True)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("kind", choices=["train", "bench"])
    parser.add_argument("--runs", type=int, help="loaded runs (train: 5, the issue's count) or runs of each kind (bench: 3)")
    parser.add_argument("--burners", type=int, default=2 * len(os.sched_getaffinity(0)))
    parser.add_argument("--out", default=HERE)
    parser.add_argument("--name", help="the results file is OUT/NAME.json (default: stress_train or stress_bench)")
    parser.add_argument("--log_dir", help="train: keep runs here; runs already finished in it are not repeated")
    args, extra = parser.parse_known_args()
    args.flags = [a for a in extra if a != "--"]  # everything else goes to ./run.sh
    if args.runs is None:
        args.runs = {"train": 5, "bench": 3}[args.kind]
    path = os.path.join(args.out, f"{args.name or 'stress_' + args.kind}.json")
    machine = {"cores": len(os.sched_getaffinity(0)), "burners": args.burners, "date": time.strftime("%Y-%m-%d")}

    if args.kind == "bench":
        flags = args.flags or ["--config=configs/shakespeare_char.py", "--steps=100"]
        results = [bench_once(flags, 0) for _ in range(args.runs)] + [bench_once(flags, args.burners) for _ in range(args.runs)]
        summary = {f"{'idle' if b == 0 else 'loaded'}_step_ms_median": statistics.median(
            r["step_ms_median"] for r in results if r["burners"] == b and r["exit_code"] == 0) for b in (0, args.burners)}
        report = {"machine": machine, "flags": flags, "summary": summary, "runs": results}
    else:
        flags = ["--config.sample_tokens=0", *args.flags]
        log_dir = args.log_dir or tempfile.mkdtemp(prefix="stress-")
        os.makedirs(log_dir, exist_ok=True)
        idle = train_once(flags, 0, log_dir, "idle")
        loaded = [train_once(flags, args.burners, log_dir, f"loaded_{i}") for i in range(args.runs)]
        same = [r["exit_code"] == 0 and (r["loss"], r["eval_loss"]) == (idle["loss"], idle["eval_loss"]) for r in loaded]
        summary = {"finished": sum(r["exit_code"] == 0 for r in loaded), "runs": len(loaded),
                   "same_final_loss_as_idle": sum(same), "idle_final": {k: idle.get(k) for k in ("loss", "eval_loss")}}
        report = {"machine": machine, "flags": flags, "summary": summary, "idle": idle, "loaded": loaded}
    with open(path, "w") as f:
        json.dump(report, f, indent=2)
    print(json.dumps(report["summary"]))


if __name__ == "__main__":
    main()
