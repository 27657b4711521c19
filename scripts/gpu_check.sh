#!/usr/bin/env bash
# The GPU path of nnunetv2-csa, checked by one command (issue 15).
#
# On a machine with one CUDA GPU, no network and nothing installed but torch (and the
# scientific stack: numpy, scipy, scikit-image, pandas, matplotlib, ...), this script
#   1. installs nnU-Net and its needs from wheels in the git-ignored folders gpu_part1/ and
#      gpu_part2/ of the checkout into $GPU_CHECK_SITE (default /tmp/site); the package
#      itself runs from the checkout (PYTHONPATH), so it is tested as committed;
#   2. converts MyoPS 2020 cases from the git-ignored folder gpu_data/myops2020/train if
#      there are any (C0 + LGE, --unpaired, 80-20 split), else writes a phantom dataset, and
#      plans it with nnU-Net's default 2d plan (nnUNetv2_plan_and_preprocess -c 2d);
#   3. trains Joint, MSBN and CSA with nnU-Net's defaults (torch.compile and AMP on, as
#      nnUNetv2_train does on CUDA) for 5 epochs x 50 iterations each;
#   4. reports per trainer: s/iteration (median of the last 50 train_steps), peak
#      torch.cuda.max_memory_allocated, compiled graphs (after epoch 1, after training, after
#      the final validation), the CSA term's share of the step (profiled forward share and
#      the step-time difference to MSBN, the same network without the term);
#   5. predicts the validation cases on the GPU (nnU-Net's final validation), exports each
#      modality of the CSA model as a stock nnU-Net model and checks that the export predicts
#      the held-out cases identically to the CSA model (nnU-Net's predictor, in process);
#   6. writes gpu_check.json and gpu_check.md to --out (default $OUT if set, else
#      ./gpu_check_out).
#
# Carrying it to a GPU machine that one call can send at most 64 MiB to (the device tool):
#   here, once:       bash scripts/gpu_check.sh --prepare-carry ../shared   # fills gpu_part1/ (SimpleITK,
#                     53 MB), gpu_part2/ (nnU-Net and the rest, 20 MB), gpu_data/ (C0, LGE and labels of
#                     12 MyoPS patients, about 25 MB); all three are in .gitignore
#   GPU call 1:       carry gpu_part1:               bash scripts/gpu_check.sh --install-only
#   GPU call 2 (at once, while the machine is warm), carry gpu_part2 and gpu_data:
#                     bash scripts/gpu_check.sh --work /tmp/gpu_check_work --rows Joint MSBN
#   GPU call 3 (at once), nothing to carry:
#                     bash scripts/gpu_check.sh --work /tmp/gpu_check_work --rows CSA
# The whole check needs about 12 min on an H200 (2026-11-28: torch.compile's first epoch is
# ~2.3 min per trainer), more than one 10-minute call: --rows trains some rows, and a later
# call with the same --work trains the rest, reuses the data and writes the report. Each
# row's measurements are in --out as soon as it ends, so a call stopped at its limit keeps them.
# On CPU, `bash scripts/gpu_check.sh --dry-run` runs every step on a phantom with a tiny
# budget and -device cpu (the test suite does, so the script cannot rot).
# Other options: --out DIR, --work DIR (scratch, default a temporary folder removed after),
# --rows (some of Joint MSBN CSA; needs --work), --epochs E and --iterations I (a short-budget
# variant: E in 1 2 5 10 ..., I in 5 10 20 50).
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
SITE="${GPU_CHECK_SITE:-/tmp/site}"
PYTHON="${PYTHON:-python3}"

case "${1:-}" in
  --prepare-carry)
    SHARED="${2:?usage: gpu_check.sh --prepare-carry <path of ../shared>}"
    rm -rf "$ROOT/gpu_part1" "$ROOT/gpu_part2" "$ROOT/gpu_data"
    cp -r "$SHARED/gpu-wheels/part1" "$ROOT/gpu_part1"
    cp -r "$SHARED/gpu-wheels/part2" "$ROOT/gpu_part2"
    chmod -R u+w "$ROOT/gpu_part1" "$ROOT/gpu_part2"
    mkdir -p "$ROOT/gpu_data/myops2020/train"
    for case_dir in $(ls -d "$SHARED"/data/myops2020/train/Case* | sort | head -n 12); do
      name="$(basename "$case_dir")"
      mkdir -p "$ROOT/gpu_data/myops2020/train/$name"
      cp "$case_dir/${name}_C0.nii.gz" "$case_dir/${name}_LGE.nii.gz" "$case_dir/${name}_gd.nii.gz" \
         "$ROOT/gpu_data/myops2020/train/$name/"
    done
    du -sh "$ROOT/gpu_part1" "$ROOT/gpu_part2" "$ROOT/gpu_data"
    exit 0 ;;
esac

install_wheels() {  # folder, marker: installs each carried part once per machine
  local folder="$ROOT/$1" marker="$SITE/.installed_$1"
  if [ -d "$folder" ] && ls "$folder"/*.whl >/dev/null 2>&1 && [ ! -f "$marker" ]; then
    echo "[gpu_check] installing the wheels of $1 into $SITE"
    "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
      --target "$SITE" "$folder"/*.whl
    touch "$marker"
  fi
}
case " $* " in
  *" --dry-run "*)  # runs with what this machine has; the carried wheels are for the GPU machine's Python
    export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}" ;;
  *)
    mkdir -p "$SITE"
    install_wheels gpu_part1
    install_wheels gpu_part2
    export PYTHONPATH="$ROOT:$SITE${PYTHONPATH:+:$PYTHONPATH}" ;;
esac
if [ "${1:-}" = "--install-only" ]; then
  "$PYTHON" -c "import SimpleITK; print('[gpu_check] SimpleITK', SimpleITK.__version__, 'installed')"
  exit 0
fi
exec "$PYTHON" "$ROOT/scripts/gpu_check.py" "$@"
