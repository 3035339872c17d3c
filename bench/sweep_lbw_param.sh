#!/usr/bin/env bash
# The free parameter `c` of the lbw rule (alpha = c * max|W|), chosen as LBW-Net chooses it: by
# retraining with each candidate and scoring detections. One command runs the whole sweep:
#
#   bench/sweep_lbw_param.sh                       # 4-bit, per channel, c = 0.75 .. 1.05 (~15 min)
#   BITS=6 PARAMS="0.8 0.9 0.96 1.0" STEPS=600 bench/sweep_lbw_param.sh
#
# Each candidate: `lbw finetune --param c` (same seed, data and schedule for all), then
# `lbw eval` of the written .lbw on coco128's VOC classes (mAP@0.5, on the shift-add engine).
# The retraining keeps the rule in the loop (`--alphas rule`, ALPHAS to change it): with learned
# alphas, the finetune default, c only sets their starting values.
# Prints a markdown table and writes every file under $OUT_DIR (default target/sweep).
set -euo pipefail

MODEL=${MODEL:-yolo-fastest-voc}
BITS=${BITS:-4}
PARAMS=${PARAMS:-"0.75 0.85 0.95 1.05"}
STEPS=${STEPS:-300}
GROUPING=${GROUPING:---per-channel}
ALPHAS=${ALPHAS:-rule}
SHARED=${SHARED:-$(cd "$(dirname "$0")/../.." && pwd)/shared}
DATA=${LBW_DATA_DIR:-$SHARED/data}
OUT_DIR=${OUT_DIR:-target/sweep}
if [ -z "${LBW:-}" ]; then
    cargo build --release --quiet
    LBW=target/release/lbw
fi
mkdir -p "$OUT_DIR"
rows=()
for c in $PARAMS; do
    out="$OUT_DIR/${MODEL}-b${BITS}-c${c}.lbw"
    "$LBW" finetune --model "$MODEL" --bits "$BITS" $GROUPING --param "$c" --steps "$STEPS" \
        --alphas "$ALPHAS" \
        --images "$DATA/unlabeled" --images "$DATA/voc2007-sample" -o "$out" \
        > "$out.summary.json"
    map=$("$LBW" eval --model "$out" --data "$DATA/coco128" --format coco \
        --score-threshold 0.005 --json |
        python3 -c "import json,sys; print('%.2f' % (100 * json.load(sys.stdin)['voc_style']['map']))")
    loss=$(python3 -c "import json,sys; print('%.3f' % json.load(open(sys.argv[1]))['final_loss'])" \
        "$out.summary.json")
    echo "c=$c: final loss $loss, coco128 VOC-class mAP@0.5 $map" >&2
    rows+=("| $c | $loss | $map |")
done
echo "$MODEL, $BITS bits, ${GROUPING:---per-tensor}, --alphas $ALPHAS, $STEPS steps of lbw finetune defaults, $(date -u +%F)"
echo
echo "| c | final distillation loss | coco128 mAP@0.5 |"
echo "|---|---|---|"
printf '%s\n' "${rows[@]}"
