#!/usr/bin/env bash
# The reference-size vision grid of issues 5 and 6 on one GPU, its runs in parallel (a 2.7M-parameter ViT leaves
# an H100 mostly idle, so ten trainings share it), in two phases:
#   1. train: the clean ViT per attack (its ASR on that attack's rows is the floor; same seed and data, so the same
#      model), clean seeds 1 and 2 (CUL detection), the undefended BadNet / Blended / WaNet models, and ABL with
#      per-example and with batch LGA;
#   2. on the saved models: CUL, random-label and RNP-unlearning exposure (on 1% and 5% clean rows) and model
#      detection, and RNP / NAD / NWC / fine-tuning (with the CUL-exposed variants; clean rows from training and held
#      out) on the BadNet and Blended models.
# Each run writes its own JSON under OUT/json (merge them into benchmarks/results/ with the scripts' keys) and its log
# under OUT/logs; OUT/status lists the runs that ended and their exit codes.
#
#     bash benchmarks/gpu_vision_grid.sh ../shared/data/cifar10_32.npz /tmp/grid
#     EPOCHS=1 MAX_TRAIN=300 MAX_EVAL=200 SANITIZE_EXTRA="--defense_epochs 1 --clean_fraction 0.2" \
#         bash benchmarks/gpu_vision_grid.sh ../shared/data/cifar10_32.npz /tmp/grid_smoke     # the plumbing, on CPU
set -u
DATA=${1:?usage: gpu_vision_grid.sh DATA.npz OUT_DIR}
OUT=${2:?usage: gpu_vision_grid.sh DATA.npz OUT_DIR}
EPOCHS=${EPOCHS:-60}
WORKERS=${WORKERS:-1}
ABL_ISOLATION=${ABL_ISOLATION:-10}  # T_te, the official 10
MODELS=$OUT/models
SETTING=$MODELS/e${EPOCHS}_r0.1_crop4_$(basename "$DATA" .npz)  # vision_defenses.py's folder for this setting
BF16=${BF16---bf16}  # BF16= (empty) on a CPU
# the benchmark scripts' flags, and the same settings in the recipes' (HfArgumentParser) spelling
COMMON=(--data "$DATA" --epochs "$EPOCHS" $BF16 --workers "$WORKERS")
RECIPE_COMMON=(--dataset "$DATA" --num_train_epochs "$EPOCHS" $BF16 --dataloader_num_workers "$WORKERS")
SLICE=()
RECIPE_SLICE=()
if [ -n "${MAX_TRAIN:-}" ]; then
    SLICE+=(--max-train-samples "$MAX_TRAIN")
    RECIPE_SLICE+=(--max_train_samples "$MAX_TRAIN")
    SETTING=${SETTING}_n$MAX_TRAIN
fi
if [ -n "${MAX_EVAL:-}" ]; then
    SLICE+=(--max-eval-samples "$MAX_EVAL")
    RECIPE_SLICE+=(--max_eval_samples "$MAX_EVAL")
fi
COMMON+=("${SLICE[@]}")
RECIPE_COMMON+=("${RECIPE_SLICE[@]}")
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
mkdir -p "$OUT/logs" "$OUT/json"

run() {  # run NAME COMMAND...: log to OUT/logs/NAME.log, record the exit code
    local name=$1
    shift
    echo "$(date +%T) start $name" >>"$OUT/status"
    "$@" >"$OUT/logs/$name.log" 2>&1
    local code=$?
    echo "$(date +%T) end $name exit $code" >>"$OUT/status"
}

VD=(python benchmarks/vision_defenses.py "${COMMON[@]}" --models-dir "$MODELS")
RECIPE=(python recipes/cifar10_vit.py "${RECIPE_COMMON[@]}" --save_models)

# ---- phase 1: training
for attack in badnet blended wanet; do
    run "undefended_$attack" "${VD[@]}" --sections vision_abl --attacks "$attack" --abl-runs undefended \
        --output "$OUT/json/undefended_$attack.json" &
    run "clean_$attack" "${VD[@]}" --sections vision_abl --attacks "$attack" --abl-runs clean \
        --output "$OUT/json/clean_$attack.json" &
done
for seed in 1 2; do
    run "clean_seed$seed" "${RECIPE[@]}" --runs clean --seed "$seed" --output_dir "$SETTING/badnet_seed$seed" \
        --results_json "$OUT/json/clean_seed$seed.recipe.json" &
done
# ABL's models go to their own folders: two ABL runs must not write the same cached model.
run abl_per_example python benchmarks/vision_defenses.py "${COMMON[@]}" --models-dir "$OUT/models_abl_per_example" \
    --sections vision_abl --attacks badnet --abl-runs abl --abl-lga per_example --abl-isolation-epochs "$ABL_ISOLATION" \
    --output "$OUT/json/abl_per_example.json" &
run abl_batch python benchmarks/vision_defenses.py "${COMMON[@]}" --models-dir "$OUT/models_abl_batch" \
    --sections vision_abl --attacks badnet --abl-runs abl --abl-lga batch --abl-isolation-epochs "$ABL_ISOLATION" \
    --abl-unlearning-epochs 20 \
    --abl-unlearning-stop-accuracy 0.0 --output "$OUT/json/abl_batch.json" &
wait
echo "$(date +%T) phase 1 done" >>"$OUT/status"

# ---- phase 2: exposure, detection and removal on the saved models
# every exposure method on EBYD's 1% and on the 5% the removal defenses get (the CPU ViT's table in the README)
for method in cul random_label rnp_unlearning; do
    for fraction in 0.01 0.05; do
        run "expose_${method}_$fraction" "${VD[@]}" --sections vision_cul --cul-attacks badnet,blended,wanet \
            --detection-seeds 3 --backdoored-seeds 1 --cul-method "$method" --cul-clean-fraction "$fraction" \
            --output "$OUT/json/expose_${method}_$fraction.json" &
    done
done
for attack in badnet blended; do
    cells=(--cell "--modality vision --dataset $DATA --attack $attack --defenses rnp,nad,nwc,finetune --exposed \
--score_sweep --load_model $SETTING/${attack}_seed0/undefended")
    # the same on clean rows the model never saw (carved out of the test split)
    cells+=(--cell "--modality vision --dataset $DATA --attack $attack --defenses rnp,nad,nwc,finetune --exposed \
--score_sweep --clean_from held-out --load_model $SETTING/${attack}_seed0/undefended")
    if [ "$attack" = badnet ]; then
        for units in ffn head layernorm; do
            cells+=(--cell "--modality vision --dataset $DATA --attack $attack --defenses rnp --rnp_units $units \
--score_sweep --load_model $SETTING/${attack}_seed0/undefended")
        done
    fi
    run "sanitize_$attack" python benchmarks/sanitize_defenses.py "${cells[@]}" --extra "$BF16 ${RECIPE_SLICE[*]} ${SANITIZE_EXTRA:-}" \
        --output "$OUT/json/sanitize_$attack.json" &
done
wait
echo "$(date +%T) phase 2 done" >>"$OUT/status"
