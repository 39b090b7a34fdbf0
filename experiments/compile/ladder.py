"""The compile table of docs/compile.md: each config of the ladder compiled for v5e-8, v5p-8 and v4-8
by `./run.sh compile`, with the largest batch at seq_len 2048, one JSON per (config, slice).

    .venv/bin/python experiments/compile/ladder.py [--configs=gpt2_small,llama_150m,...] [--slices=v5e-8,...]
    .venv/bin/python experiments/compile/ladder.py --table     # the markdown table from the stored JSONs
"""

import argparse
import json
import os
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))
CONFIGS = ("gpt2_small", "llama_150m", "llama_400m", "llama_1b", "llama_3b", "llama_7b")
SLICES = ("v5e-8", "v5p-8", "v4-8")


def command(config: str, slice_name: str, *extra: str) -> list[str]:
    return ["./run.sh", "compile", f"--config=configs/{config}.py", f"--topology={slice_name}", *extra]


def run(config: str, slice_name: str) -> dict:
    """The config as it is (its batch, its mesh: FSDP for the ladder), then the largest batch at 2048."""
    out = {}
    for key, extra in (("as_configured", ()), ("at_2048", ("--find_batch", "--seq_len=2048"))):
        done = subprocess.run(command(config, slice_name, *extra), cwd=REPO, capture_output=True, text=True)
        if done.returncode:
            out[key] = {"error": done.stderr.strip().splitlines()[-1]}
        else:
            out[key] = json.loads(done.stdout.strip().splitlines()[-1])
        out[key]["command"] = " ".join(command(config, slice_name, *extra))
    return out


def table() -> str:
    rows = ["| config | slice | fits (its batch) | HBM per chip GiB | largest batch at seq 2048 (none / dots / block) | "
            "projected MFU | bound | compile s | command |", "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for config in CONFIGS:
        for slice_name in SLICES:
            path = os.path.join(HERE, f"{config}_{slice_name}.json")
            if not os.path.exists(path):
                continue
            r = json.load(open(path))
            a, b = r["as_configured"], r["at_2048"]
            if "error" in a:
                rows.append(f"| {config} | {slice_name} | error: {a['error'][:80]} | | | | | | `{a['command']}` |")
                continue
            batches = " / ".join(str(b.get("largest_batch", {}).get(k, "?")) for k in ("none", "dots", "block"))
            mfu = f"{a['projected_mfu']:.0%}" if "projected_mfu" in a else "-"
            rows.append(f"| {config} | {slice_name} | {'yes' if a['fits'] else 'no'} (batch {a['batch_size']}) | "
                        f"{a['hbm_per_chip_gib']['total']:.2f} | {batches} | {mfu} | {a.get('bound', '-')} | "
                        f"{a['compile_s']:.0f} | `{a['command']}` |")
    return "\n".join(rows)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--configs", default=",".join(CONFIGS))
    ap.add_argument("--slices", default=",".join(SLICES))
    ap.add_argument("--table", action="store_true")
    args = ap.parse_args()
    if args.table:
        print(table())
        return
    for config in args.configs.split(","):
        for slice_name in args.slices.split(","):
            path = os.path.join(HERE, f"{config}_{slice_name}.json")
            if os.path.exists(path):
                continue
            result = run(config, slice_name)
            with open(path, "w") as f:
                json.dump(result, f, indent=2)
            print(config, slice_name, json.dumps({k: v.get("fits", v.get("error")) for k, v in result.items()}), flush=True)


if __name__ == "__main__":
    sys.exit(main())
