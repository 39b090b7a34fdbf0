#!/bin/bash
# Reruns the section-3 table of README.md: each variant of nanoGPT's recipe at seeds 0-4, one run at a
# time (each uses both cores). Prints "variant seed validation-loss"; about 100 s per run on 2 cores.
# usage: [EXTRA="--config.KEY=VALUE ..."] experiments/nanogpt_parity/ablation.sh [OUTDIR]   (from the repo root)
# Finished runs in OUTDIR are not retrained: rerunning the same command resumes and only re-evaluates.
set -euo pipefail
out=${1:-runs/nanogpt_ablation}
declare -A variants=(
  [nanogpt]=""
  [untied]="--config.model.tie_embeddings=False"
  [untied_noclip]="--config.model.tie_embeddings=False --config.opt.clip_norm=0"
  [untied_noclip_nowd]="--config.model.tie_embeddings=False --config.opt.clip_norm=0 --config.opt.weight_decay=0"
)
for name in nanogpt untied untied_noclip untied_noclip_nowd; do
  for seed in 0 1 2 3 4; do
    wd=$out/$name/seed$seed
    mkdir -p "$out/$name"
    # shellcheck disable=SC2086
    ./run.sh train --config=configs/shakespeare_char_nanogpt.py --workdir="$wd" --config.seed=$seed \
      --config.sample_tokens=0 ${variants[$name]} ${EXTRA:-} > "$wd.log" 2>&1 || { echo "failed: see $wd.log"; exit 1; }
    loss=$(grep eval_loss "$wd/metrics.jsonl" | tail -1 | python3 -c "import json, sys; print(round(json.load(sys.stdin)['eval_loss'], 4))")
    echo "$name $seed $loss"
  done
done
