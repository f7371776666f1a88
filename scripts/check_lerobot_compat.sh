#!/usr/bin/env bash
# Does LeRobot itself read and train on policyserve's converted datasets? Installs LeRobot into a throwaway venv
# (not the project's environment), converts a small HDF5 file with a demo gap (demo_0, demo_5, demo_6) to
# LeRobot v2.1 and v3.0 and checks with LeRobot's own reader: frame count, actions equal to the HDF5 file's,
# video frames decoded with PyAV, stats for every policy feature; then runs 2 steps of `lerobot-train`
# (diffusion policy, CPU). LeRobot 0.3.3 reads v2.1 only, LeRobot >= 0.4 reads v3.0 only, so both are installed
# in turn (LEROBOT_OLD / LEROBOT_NEW).
#
#   scripts/check_lerobot_compat.sh            # work folder: a new /tmp/lerobot-compat.XXXXXX
#   LEROBOT_COMPAT_DIR=/tmp/lr scripts/check_lerobot_compat.sh   # reuse a folder (and its venv)
#
# torch comes from PyTorch's CPU wheel index when reachable; otherwise from the default index, which is the
# CUDA build (several GB of nvidia-* wheels).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
LEROBOT_OLD=${LEROBOT_OLD:-0.3.3}
LEROBOT_NEW=${LEROBOT_NEW:-0.4.4}
WORK=${LEROBOT_COMPAT_DIR:-$(mktemp -d /tmp/lerobot-compat.XXXXXX)}
mkdir -p "$WORK"
VENV=$WORK/venv
CHECK="$PWD/scripts/lerobot_compat_check.py"
export HF_HUB_OFFLINE=1 WANDB_MODE=disabled
log() { echo "[check_lerobot_compat] $*"; }

log "work folder $WORK"
rm -rf "$WORK/demos.hdf5" "$WORK/v2.1" "$WORK/v3.0" "$WORK"/train-*
PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" "$PY" "$CHECK" make-hdf5 "$WORK/demos.hdf5" "$WORK/expected.npz"
for fmt in v2.1 v3.0; do
    PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" "$PY" -m policyserve convert hdf5-to-lerobot \
        --input "$WORK/demos.hdf5" --output "$WORK/$fmt" --format "$fmt" --no-progress
done

if [ ! -x "$VENV/bin/python" ]; then
    "$PY" -m venv "$VENV"
fi
pip_install() { "$VENV/bin/python" -m pip install -q --disable-pip-version-check "$@"; }
TORCH_SPEC=("torch>=2.2.1,<2.8" "torchvision>=0.21,<0.23")  # what both LeRobot versions accept
if ! "$VENV/bin/python" -c "import torch" 2>/dev/null; then
    start=$(date +%s)
    if pip_install --index-url https://download.pytorch.org/whl/cpu "${TORCH_SPEC[@]}"; then
        log "torch: CPU build from download.pytorch.org"
    else
        log "PyTorch's CPU index is not reachable: installing torch from the default index (CUDA build, large)"
        pip_install "${TORCH_SPEC[@]}"
    fi
    log "torch installed in $(( $(date +%s) - start )) s"
fi

train() {  # $1 dataset root, $2 output name
    "$VENV/bin/lerobot-train" --dataset.repo_id=local/policyserve_compat --dataset.root="$1" \
        --dataset.video_backend=pyav --policy.type=diffusion --policy.device=cpu --policy.push_to_hub=false \
        --policy.down_dims='[64,128,256]' --policy.crop_shape='[84,84]' --batch_size=2 --steps=2 --num_workers=0 \
        --log_freq=1 --save_checkpoint=false --wandb.enable=false --output_dir="$WORK/train-$2" \
        > "$WORK/train-$2.log" 2>&1 || { tail -n 30 "$WORK/train-$2.log"; return 1; }
    log "lerobot-train ($2): 2 diffusion-policy steps on CPU finished (log: $WORK/train-$2.log)"
}

status=0
for pair in "$LEROBOT_OLD:v2.1" "$LEROBOT_NEW:v3.0"; do
    version=${pair%%:*}; fmt=${pair##*:}
    log "installing lerobot==$version"
    pip_install "lerobot==$version" "${TORCH_SPEC[@]}"
    if "$VENV/bin/python" "$CHECK" check "$WORK/$fmt" "$WORK/expected.npz" && train "$WORK/$fmt" "$version-$fmt"; then
        log "PASS lerobot $version reads and trains on policyserve's $fmt output"
    else
        log "FAIL lerobot $version on policyserve's $fmt output"; status=1
    fi
done
exit $status
