#!/usr/bin/env bash
# Gate new timm backbones on what a binary ViT maintainer cares about, then smoke-test the whole pipeline.
#
#   bash examples/ci/binarize_new_backbones.sh [--quick] MODEL [MODEL ...]
#   bash examples/ci/binarize_new_backbones.sh vit_small_patch16_224 swin_tiny_patch4_window7_224
#   MODEL_ARGS="-m img_size=64" MIN_COMPRESSION=12 bash examples/ci/binarize_new_backbones.sh vit_small
#
# For every backbone, in order (a failed step skips that backbone's later steps; the others still run):
#   0. `didbq compat MODEL --recipe $RECIPE --json`: built at its default input size (MODEL_ARGS do not apply),
#      converted, one training step on a random batch (finite gradients on every binary layer), still binary
#      after it, every binary layer and attention core running. Skipped with COMPAT=0.
#   1. `didbq plan MODEL --recipe $RECIPE --json`: the dry run, at the model's own input size (or MODEL_ARGS).
#   2. Gates on the plan:
#      - block linears: every Linear inside a transformer block (a module path with `blocks.N.`, as in
#        `blocks.3.mlp.fc1`, `layers.0.blocks.1.attn.qkv`, `cls_attn_blocks.0...`) is replaced by a binary linear
#        with 1-bit weights AND 1-bit inputs, and none stays full precision; the small position-bias MLPs and
#        head mixers didbq always keeps in full precision (cpb_mlp, meta_mlp, rel_pos, proj_l, proj_w, pos_proj)
#        are allowed and listed. A backbone with no Linear in blocks fails (nothing was checked).
#      - compression (fp32 bytes / packed bytes, the plan's analytic size) >= MIN_COMPRESSION
#      - OPs reduction (full-precision OPs / OPs, OPs = FLOPs + BOPs/64) >= MIN_OPS_REDUCTION
#   3. A short offline `didbq binarize MODEL --data $DATA` with a tiny budget (recipe overrides), into a
#      temporary folder, from a randomly initialised teacher checkpoint (offline there are no pretrained
#      weights; this checks that the backbone trains, packs and reloads, not its accuracy: expect chance-level
#      top-1 and a warning about the teacher's accuracy).
#   4. `didbq report RUN --json`: the size measured from the packed file must agree with the analytic size, and
#      the full-precision MACs with torch's flop counter (the report's own checks).
#   5. One summary line per backbone; exit code 1 if any gate or step failed, 2 on a usage error.
#
# Environment (all optional):
#   RECIPE             recipe file or built-in name, overrides allowed: didb (default), 'didb[hfsc=separate]'
#   MODEL_ARGS         timm.create_model arguments for every backbone: "-m img_size=64 -m num_classes=10"
#                      (`-m k=v`, `--model-arg k=v` or bare `k=v`; values without commas). The plan uses them as
#                      given; the training smoke test gets them as `model.k=v` overrides (num_classes comes from
#                      the data there).
#   MIN_COMPRESSION    default 8    (vit_small_patch16_224 under didb: 13.0x; swin_tiny_patch4_window7_224: 8.2x,
#                                    its patch merging stays full precision)
#   MIN_OPS_REDUCTION  default 15   (vit_small: 35.6x; swin_tiny: 17.6x, at 224x224 and 1000 classes)
#   DATA               training data of the smoke test, default digits (offline; fashion-mnist works offline too)
#   TRAIN_IMG_SIZE     input size of the smoke test, default 32 (MODEL_ARGS' img_size wins; empty: the model's)
#   SHORT=1 / --quick  the tiniest budget (2 steps on 64 images, 32 test images) instead of 20 steps on 512
#   DEVICE             --device of the smoke test, default auto
#   COMPAT             1 (default) runs step 0; 0 skips it (a backbone too big to train a step at full size)
#   COMPAT_TIMEOUT     seconds for step 0, default 600
#   TEACHER_CHECKPOINT a real teacher (safetensors) for the smoke test instead of a random one (one backbone)
#   REPORT_DIR         where to keep <model>.plan.json, <model>.report.json and summary.txt (for CI artifacts);
#                      default: not kept
#   KEEP_WORK=1        keep the temporary folder (run folders, logs) and print its path
#   FAIL_FAST=1        stop at the first failed backbone
#   DIDBQ              the didbq command, default `didbq` on PATH, else this checkout's .venv/bin/didbq
#   OMP_WAIT_POLICY    default PASSIVE (spinning OpenMP threads are 30-70x slower on a runner shared with
#                      other work)
#   PYTHON             a Python with didbq installed (JSON parsing, the random teacher); default: the one next to
#                      the didbq command, else python3
set -euo pipefail

usage() {
    sed -n '2,6p' "$0" | sed 's/^# \{0,1\}//' >&2
    echo "See the header of $0 for the gates and environment variables." >&2
}

SHORT=${SHORT:-0}
MODELS=()
while (($#)); do
    case $1 in
        --quick|--short) SHORT=1 ;;
        -h|--help) usage; exit 0 ;;
        -*) echo "error: unknown option $1" >&2; usage; exit 2 ;;
        *) MODELS+=("$1") ;;
    esac
    shift
done
if ((${#MODELS[@]} == 0)); then
    echo "error: name at least one timm backbone" >&2
    usage
    exit 2
fi

RECIPE=${RECIPE:-didb}
MODEL_ARGS=${MODEL_ARGS:-}
MIN_COMPRESSION=${MIN_COMPRESSION:-8}
MIN_OPS_REDUCTION=${MIN_OPS_REDUCTION:-15}
DATA=${DATA:-digits}
TRAIN_IMG_SIZE=${TRAIN_IMG_SIZE-32}
DEVICE=${DEVICE:-auto}
REPORT_DIR=${REPORT_DIR:-}
KEEP_WORK=${KEEP_WORK:-0}
FAIL_FAST=${FAIL_FAST:-0}
TEACHER_CHECKPOINT=${TEACHER_CHECKPOINT:-}
COMPAT=${COMPAT:-1}
COMPAT_TIMEOUT=${COMPAT_TIMEOUT:-600}
export HF_HUB_OFFLINE=${HF_HUB_OFFLINE:-1} HF_DATASETS_OFFLINE=${HF_DATASETS_OFFLINE:-1}
# OpenMP threads that spin at barriers make training 30-70x slower when another process shares the cores (a
# busy CI runner: measured 25 s instead of 0.35 s per DeiT-S-sized step on 2 cores); waiting passively costs
# little when the machine is idle.
export OMP_WAIT_POLICY=${OMP_WAIT_POLICY:-PASSIVE}

# ---------------------------------------------------------------------------------------------- tools
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
if [[ -n ${DIDBQ:-} ]]; then
    read -r -a DIDBQ_CMD <<<"$DIDBQ"
elif command -v didbq >/dev/null 2>&1; then
    DIDBQ_CMD=(didbq)
elif [[ -x $HERE/../../.venv/bin/didbq ]]; then
    DIDBQ_CMD=("$HERE/../../.venv/bin/didbq")
else
    echo "error: no didbq command: install didbq (pip install -c constraints/cpu.txt -e .) or set DIDBQ" >&2
    exit 2
fi
if [[ -z ${PYTHON:-} ]]; then
    resolved=$(command -v "${DIDBQ_CMD[0]}" 2>/dev/null || true)
    if [[ -n $resolved && -x $(dirname "$resolved")/python ]]; then
        PYTHON=$(dirname "$resolved")/python
    else
        PYTHON=python3
    fi
fi
if ! "$PYTHON" -c 'import importlib.util, sys; sys.exit(importlib.util.find_spec("didbq") is None)' 2>/dev/null; then
    echo "error: $PYTHON cannot import didbq; set PYTHON to the interpreter didbq is installed in" >&2
    exit 2
fi

for number in "$MIN_COMPRESSION" "$MIN_OPS_REDUCTION" "$COMPAT_TIMEOUT"; do
    if ! [[ $number =~ ^[0-9]+([.][0-9]+)?$ ]]; then
        echo "error: MIN_COMPRESSION, MIN_OPS_REDUCTION and COMPAT_TIMEOUT must be numbers (got '$number')" >&2
        exit 2
    fi
done
if [[ $COMPAT != 0 && $COMPAT != 1 ]]; then
    echo "error: COMPAT must be 0 or 1 (got '$COMPAT')" >&2
    exit 2
fi

# MODEL_ARGS -> plan arguments (-m k=v) and training overrides (model.k=v)
PLAN_ARGS=()
TRAIN_OVERRIDES=()
has_img_size=0
read -r -a words <<<"$MODEL_ARGS"
for ((i = 0; i < ${#words[@]}; i++)); do
    word=${words[i]}
    if [[ $word == -m || $word == --model-arg ]]; then
        i=$((i + 1))
        word=${words[i]:-}
    fi
    if [[ $word != ?*=* || $word == *,* ]]; then
        echo "error: MODEL_ARGS: '$word' is not key=value (values without commas)" >&2
        exit 2
    fi
    PLAN_ARGS+=(-m "$word")
    [[ $word == img_size=* ]] && has_img_size=1
    [[ $word == num_classes=* ]] || TRAIN_OVERRIDES+=("model.$word")
done
if ((!has_img_size)) && [[ -n $TRAIN_IMG_SIZE ]]; then
    TRAIN_OVERRIDES+=("model.img_size=$TRAIN_IMG_SIZE")
fi
if [[ $SHORT == 1 ]]; then
    BUDGET=(data.train_limit=64 data.test_limit=32 data.batch_size=16 data.workers=0 steps=2)
else
    BUDGET=(data.train_limit=512 data.test_limit=128 data.batch_size=32 data.workers=0 steps=20)
fi
TRAIN_OVERRIDES+=("${BUDGET[@]}")
joined=$(IFS=,; echo "${TRAIN_OVERRIDES[*]}")
if [[ $RECIPE == *"]" ]]; then                       # the recipe has overrides already: add ours to them
    TRAIN_RECIPE="${RECIPE%]},$joined]"
else
    TRAIN_RECIPE="$RECIPE[$joined]"
fi

WORK=$(mktemp -d "${TMPDIR:-/tmp}/didbq-ci.XXXXXX")
cleanup() {
    if [[ $KEEP_WORK == 1 ]]; then
        echo "work folder kept: $WORK"
    else
        rm -rf "$WORK"
    fi
}
trap cleanup EXIT
[[ -n $REPORT_DIR ]] && mkdir -p "$REPORT_DIR"

echo "didbq CI gates: recipe '$RECIPE', MIN_COMPRESSION ${MIN_COMPRESSION}x, MIN_OPS_REDUCTION ${MIN_OPS_REDUCTION}x," \
     "smoke test on $DATA with '$TRAIN_RECIPE'"

# ------------------------------------------------------------------------------- python helpers
# Gates on a plan: prints one line per gate and a PLAN line for the summary; exit 1 if any gate fails.
GATES_PY=$(cat <<'PY'
import json, re, sys
plan_file, min_compression, min_ops = sys.argv[1], float(sys.argv[2]), float(sys.argv[3])
plan = json.load(open(plan_file))
block = re.compile(r"(^|\.)[A-Za-z_]*blocks[A-Za-z_]*\.\d+\.")      # blocks.3. layers.0.blocks.1. cls_attn_blocks.0.
allowed = re.compile(r"(^|\.)(cpb_mlp|meta_mlp|rel_pos|shared_rel_pos|proj_l|proj_w|pos_proj)(\.|$)")
linears = {l["name"]: l for l in plan["layers"] if l["kind"] == "linear" and block.search(l["name"])}
kept = {m["name"]: m["reason"] for m in plan["full_precision"] if m["type"] == "Linear" and block.search(m["name"])}
binary = sorted(n for n, l in linears.items() if l["weights"] == "1-bit" and l["inputs"] == "1-bit")
others = sorted((set(linears) | set(kept)) - set(binary))
exempt = [n for n in others if allowed.search(n)]
bad = [n for n in others if not allowed.search(n)]
failed = []


def gate(name, ok, text):
    print(f"  {'PASS' if ok else 'FAIL'}  {name}: {text}")
    if not ok:
        failed.append(name)


def describe(name):
    if name in linears:
        return f"{name} ({linears[name]['weights']} weights, {linears[name]['inputs']} inputs)"
    return f"{name} (full precision: {kept[name]})"


if bad:
    more = f" and {len(bad) - 5} more" if len(bad) > 5 else ""
    gate("block linears", False,
         f"{len(bad)} of {len(bad) + len(binary)} Linear layers inside blocks are not binary (1-bit weights and "
         f"inputs): {', '.join(describe(n) for n in bad[:5])}{more}; check the recipe's rules and ignore list "
         f"(didbq plan MODEL --layers)")
elif not binary:
    gate("block linears", False, "no Linear layer found inside a block (no module path with blocks.N.): nothing "
         "was checked; is this a ViT-style backbone?")
else:
    gate("block linears", True, f"all {len(binary)} Linear layers inside blocks have 1-bit weights and 1-bit inputs"
         + (f" ({len(exempt)} position-bias/head-mixer MLPs stay full precision by design)" if exempt else ""))
totals = plan["totals"]
gate("compression", totals["compression"] >= min_compression,
     f"{totals['compression']:.2f}x smaller than fp32 ({totals['packed_bytes'] / 1e6:.2f} MB packed vs "
     f"{totals['fp32_bytes'] / 1e6:.2f} MB), minimum {min_compression:g}x (MIN_COMPRESSION)")
gate("OPs reduction", totals["ops_reduction"] >= min_ops,
     f"{totals['ops_reduction']:.2f}x fewer OPs ({totals['ops']:.3g} vs {totals['fp_reference_flops']:.3g} "
     f"full precision), minimum {min_ops:g}x (MIN_OPS_REDUCTION)")
for warning in plan.get("warnings") or []:
    print(f"  note  plan warning: {warning}")
print(f"PLAN {len(binary)} W1A1 block linears, {totals['compression']:.1f}x smaller, "
      f"{totals['ops_reduction']:.1f}x fewer OPs")
if failed:
    print(f"  gate failed: {', '.join(failed)}")
    sys.exit(1)
PY
)

# The compat check's verdict: one line, exit 1 unless the model converts, trains and stays binary.
COMPAT_PY=$(cat <<'PY'
import json, sys

result = json.load(open(sys.argv[1]))["models"][0]
if result["ok"]:
    print(f"  PASS  compat: converts ({result['convert_seconds']:.2f} s), trains a step, stays binary "
          f"({result['binary_layers']} binary layers)")
else:
    print(f"  FAIL  compat: stopped at {result['stage']}: {result['reason']}")
    sys.exit(1)
PY
)

# A randomly initialised teacher that fits the run: the recipe's model args, the data's classes.
TEACHER_PY=$(cat <<'PY'
import sys

import didbq
import torch
from safetensors.torch import save_file
from didbq.train.data import load_image_data

name, recipe_spec, source, out = sys.argv[1:5]
torch.manual_seed(0)  # the same random teacher every time
recipe = didbq.load_recipe(recipe_spec)
seed = recipe.data.seed if getattr(recipe.data, "seed", None) is not None else recipe.run.seed
data = load_image_data(source, train_limit=recipe.data.train_limit, test_limit=recipe.data.test_limit, seed=seed)
model = didbq.build_model(name, pretrained=False, **{**recipe.model.args, "num_classes": data.num_classes})
save_file({key: value.contiguous() for key, value in model.state_dict().items()}, out)
print(f"  random teacher: {name} {dict(recipe.model.args)}, {data.num_classes} classes")
PY
)

# The report's own checks on the packed file, and the summary line of a trained run.
REPORT_PY=$(cat <<'PY'
import json, sys

report = json.load(open(sys.argv[1]))
totals, file, flops = report["totals"], report["file"], report["flop_check"]
print(f"  {'PASS' if file['ok'] else 'FAIL'}  packed file: {file['file_bytes'] / 1e6:.3f} MB written, tensors "
      f"{file['payload_bytes']} B against {file['analytic_bytes']} B analytic (gap {file['gap']:.2%})")
print(f"  {'PASS' if flops['ok'] else 'FAIL'}  FLOP count: {flops['report_macs']} full-precision MACs, torch's "
      f"flop counter {flops['torch_macs']}")
students = [(phase, result) for phase, result in (report.get("results") or {}).items() if phase != "teacher"]
top1 = f"student top-1 {students[-1][1]['top1']:.1f}%" if students else "no student result"
size = report["input_size"]
print(f"RUN {file['file_bytes'] / 1e6:.2f} MB file at {size[-2]}x{size[-1]} ({totals['compression']:.1f}x smaller), "
      f"{top1}")
sys.exit(0 if file["ok"] and flops["ok"] else 1)
PY
)

# ---------------------------------------------------------------------------------------------- main
SUMMARY=()
failures=0
# A failed step: its last log lines, and a summary line (the plan's line appended once there is one).
step_failed() {
    echo "  FAIL  $1: $2:"
    sed 's/^/        /' "$log" | tail -5
    SUMMARY+=("FAIL  $model: $1 failed ($(tail -1 "$log"))$3")
}

run_model() {   # run_model MODEL: 0 when every gate and step passed
    local model=$1 safe dir log status
    safe=$(printf '%s' "$model" | tr -c 'A-Za-z0-9_.-' '_')
    dir=$WORK/$safe
    mkdir -p "$dir"
    log=$dir/log.txt

    if [[ $COMPAT == 1 ]]; then
        echo "== $model: didbq compat $model --recipe '$RECIPE'"
        "${DIDBQ_CMD[@]}" compat "$model" --recipe "$RECIPE" --timeout "$COMPAT_TIMEOUT" --json \
            >"$dir/compat.json" 2>"$log" || true   # exit 1 is a verdict: COMPAT_PY reads it
        [[ -n $REPORT_DIR && -s $dir/compat.json ]] && cp "$dir/compat.json" "$REPORT_DIR/$safe.compat.json"
        if ! [[ -s $dir/compat.json ]]; then
            step_failed compat "didbq compat exited with an error" ""
            return 1
        fi
        local verdict
        status=0
        verdict=$("$PYTHON" -c "$COMPAT_PY" "$dir/compat.json") || status=$?
        printf '%s\n' "$verdict"
        if ((status != 0)); then
            SUMMARY+=("FAIL  $model: ${verdict#  FAIL  }")
            return 1
        fi
    fi
    echo "== $model: didbq plan $model --recipe '$RECIPE' ${PLAN_ARGS[*]}"
    if ! "${DIDBQ_CMD[@]}" plan "$model" --recipe "$RECIPE" "${PLAN_ARGS[@]}" --json >"$dir/plan.json" 2>"$log"; then
        step_failed plan "didbq plan exited with an error" ""
        return 1
    fi
    [[ -n $REPORT_DIR ]] && cp "$dir/plan.json" "$REPORT_DIR/$safe.plan.json"
    local gates plan_line
    status=0
    gates=$("$PYTHON" -c "$GATES_PY" "$dir/plan.json" "$MIN_COMPRESSION" "$MIN_OPS_REDUCTION") || status=$?
    printf '%s\n' "$gates" | grep -v '^PLAN ' || true
    plan_line=$(printf '%s\n' "$gates" | sed -n 's/^PLAN //p')
    if ((status != 0)); then
        SUMMARY+=("FAIL  $model: gate failed ($(printf '%s\n' "$gates" | sed -n 's/^  gate failed: //p')); $plan_line")
        return 1
    fi

    local teacher=$TEACHER_CHECKPOINT
    if [[ -z $teacher ]]; then
        teacher=$dir/teacher.safetensors
        if ! "$PYTHON" -c "$TEACHER_PY" "$model" "$TRAIN_RECIPE" "$DATA" "$teacher" 2>"$log"; then
            step_failed teacher "could not build a random teacher" "; $plan_line"
            return 1
        fi
    fi
    echo "  didbq binarize $model --recipe '$TRAIN_RECIPE' --data $DATA"
    if ! "${DIDBQ_CMD[@]}" binarize "$model" --recipe "$TRAIN_RECIPE" --data "$DATA" --out "$dir/run" \
            --teacher-checkpoint "$teacher" --device "$DEVICE" --no-progress >"$dir/binarize.txt" 2>"$log"; then
        step_failed binarize "didbq binarize exited with an error" "; $plan_line"
        return 1
    fi
    grep -E '^[A-Za-z0-9_.-]+: top-1' "$log" | sed 's/^/        /' || true
    [[ -z $TEACHER_CHECKPOINT ]] && echo "        (a random teacher and a few steps: chance-level accuracy is expected)"
    if ! "${DIDBQ_CMD[@]}" report "$dir/run" --json >"$dir/report.json" 2>"$log"; then
        step_failed report "didbq report exited with an error" "; $plan_line"
        return 1
    fi
    [[ -n $REPORT_DIR ]] && cp "$dir/report.json" "$REPORT_DIR/$safe.report.json"
    local checks run_line
    status=0
    checks=$("$PYTHON" -c "$REPORT_PY" "$dir/report.json") || status=$?
    printf '%s\n' "$checks" | grep -v '^RUN ' || true
    run_line=$(printf '%s\n' "$checks" | sed -n 's/^RUN //p')
    if ((status != 0)); then
        SUMMARY+=("FAIL  $model: report checks failed; $plan_line; $run_line")
        return 1
    fi
    SUMMARY+=("PASS  $model: $plan_line; trained: $run_line")
}

for model in "${MODELS[@]}"; do
    if ! run_model "$model"; then
        failures=$((failures + 1))
        if [[ $FAIL_FAST == 1 ]]; then
            echo "FAIL_FAST=1: stopping after $model"
            break
        fi
    fi
done

echo
echo "== summary (recipe $RECIPE; gates: W1A1 block linears, >= ${MIN_COMPRESSION}x smaller, >= ${MIN_OPS_REDUCTION}x fewer OPs)"
printf '%s\n' "${SUMMARY[@]}" | tee ${REPORT_DIR:+"$REPORT_DIR/summary.txt"}
if ((failures > 0)); then
    echo "$failures of ${#MODELS[@]} backbone(s) failed" >&2
    exit 1
fi
echo "all ${#MODELS[@]} backbone(s) passed"
