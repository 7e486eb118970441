#!/usr/bin/env bash
# GPU smoke test: run it on one GPU node before paying for a long job.
#
#   scripts/gpu_smoke.sh                     # 125m-shared, 300 steps, on 1 GPU and on all local GPUs
#   scripts/gpu_smoke.sh --gpus "1 2 4 8" --steps 200 --model model/125m-unshared --zero 3
#   scripts/gpu_smoke.sh --dry-run           # print the commands, run nothing
#
# It prepares a corpus once (a tokenizer and shards of this Python's standard library, under
# OUTPUT/data), then for each GPU count trains the preset for STEPS optimizer steps with bf16
# (micro-batch 8 x 2048 tokens, 4 micro-batches per GPU per step, so every GPU does the same work),
# converts the final checkpoint, and prints one row per GPU count: tokens/s, tokens/s per GPU, MFU
# (from the GPU's name, see odegpt.accounting.PEAK_TFLOPS) and peak memory per GPU. Any failure —
# no GPU, a rank that dies, a non-finite loss — ends it with a non-zero exit code.
#
# --cpu runs the same thing on CPU ranks (DS_ACCELERATOR=cpu) with model/tiny, 64-token sequences
# and 6 steps unless told otherwise: it checks this script, not a GPU.
set -euo pipefail

usage() { sed -n '2,17p' "$0" | sed 's/^# \{0,1\}//'; }

GPUS=""
STEPS=""
MODEL=""
ZERO=2
OUTPUT=runs/gpu-smoke
DRY_RUN=0
CPU=0
EXTRA=()
while [[ $# -gt 0 ]]; do
  case "$1" in
    --gpus) GPUS="$2"; shift 2 ;;
    --steps) STEPS="$2"; shift 2 ;;
    --model) MODEL="$2"; shift 2 ;;
    --zero) ZERO="$2"; shift 2 ;;
    --output) OUTPUT="$2"; shift 2 ;;
    --set) EXTRA+=("--set=$2"); shift 2 ;;
    --dry-run) DRY_RUN=1; shift ;;
    --cpu) CPU=1; shift ;;
    -h|--help) usage; exit 0 ;;
    *) echo "gpu_smoke: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
done

cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-$( [[ -x .venv/bin/python ]] && echo .venv/bin/python || echo python3 )}
ODEGPT=("$PYTHON" -m odegpt)

if [[ $CPU == 1 ]]; then
  export DS_ACCELERATOR=cpu OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
  AVAILABLE=${GPUS##* }; AVAILABLE=${AVAILABLE:-2}
  PRECISION=fp32 VOCAB=2048 SEQ_LEN=64
  MODEL=${MODEL:-model/tiny} STEPS=${STEPS:-6}
else
  AVAILABLE=$("$PYTHON" -c "import torch; print(torch.cuda.device_count())")
  if [[ "$AVAILABLE" -lt 1 ]]; then
    echo "gpu_smoke: no CUDA GPU visible to $PYTHON (torch.cuda.device_count() == 0); --cpu checks the script on CPU" >&2
    exit 2
  fi
  PRECISION=bf16 VOCAB=32000 SEQ_LEN=2048
  MODEL=${MODEL:-model/125m-shared} STEPS=${STEPS:-300}
fi
if [[ -z "$GPUS" ]]; then
  GPUS=$( [[ "$AVAILABLE" -gt 1 ]] && echo "1 $AVAILABLE" || echo 1 )
fi
for n in $GPUS; do
  if [[ "$n" -gt "$AVAILABLE" ]]; then
    echo "gpu_smoke: --gpus asks for $n, only $AVAILABLE available" >&2
    exit 2
  fi
done

run() {  # print, then run unless --dry-run
  echo "+ $*"
  if [[ $DRY_RUN == 0 ]]; then "$@"; fi
}

DATA=$OUTPUT/data
if [[ ! -f $DATA/corpus/manifest.json || $DRY_RUN == 1 ]]; then
  run "${ODEGPT[@]}" tokenizer --input stdlib --vocab-size "$VOCAB" --max-sentences 200000 --output "$DATA/tokenizer"
  run "${ODEGPT[@]}" prepare --input stdlib --tokenizer "$DATA/tokenizer" --output "$DATA/corpus" \
      --val-fraction 0.01 --workers 4 --no-progress
fi

RUNS=()
for n in $GPUS; do
  RUN=$OUTPUT/gpus-$n
  RUNS+=("$RUN")
  run "${ODEGPT[@]}" launch --num-gpus "$n" --quiet --resume none \
      --config "$MODEL" train/pretrain "deepspeed/zero$ZERO" \
      "--set=run.output_dir=$RUN" "--set=data.corpora=[$DATA/corpus]" "--set=data.tokenizer=$DATA/tokenizer" \
      "--set=train.train_steps=$STEPS" "--set=train.warmup_steps=$(( STEPS / 10 + 1 ))" "--set=train.seq_len=$SEQ_LEN" \
      "--set=train.global_batch_size=$(( 8 * 4 * n ))" "--set=train.precision=$PRECISION" \
      "--set=eval.interval=0" "--set=eval.at_end=false" "--set=checkpoint.interval=0" \
      "--set=logging.interval=10" "--set=logging.progress_bar=false" ${EXTRA[@]+"${EXTRA[@]}"}
  run "${ODEGPT[@]}" convert --checkpoint "$RUN/checkpoints" --output "$RUN/model"
done

echo "== $MODEL, ZeRO-$ZERO, $PRECISION, $STEPS steps, micro-batch 8 x $SEQ_LEN tokens, 4 per GPU per step"
run "$PYTHON" -m launcher.metrics "${RUNS[@]}"
