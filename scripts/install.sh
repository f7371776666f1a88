#!/usr/bin/env bash
# Installs policyserve with every extra on a fresh Debian machine: the GL libraries for headless
# MuJoCo rendering, the CPU build of torch (see below), robosuite without its GUI/compiler dependencies,
# openpi-client without its numpy<2 pin.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}

gl_pkgs="libegl1 libegl-mesa0 libgl1-mesa-dri libopengl0 libgl1 libosmesa6"
if command -v apt-get >/dev/null 2>&1 && ! dpkg -s $gl_pkgs >/dev/null 2>&1; then
    SUDO=""; [ "$(id -u)" = 0 ] || SUDO="sudo"
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends $gl_pkgs >/dev/null
fi

# torch first, the CPU build: anything that later asks for torch is then satisfied, and no CUDA libraries
# (gigabytes of nvidia-* wheels) are pulled. PyTorch's CPU wheel index first, the default index as a fallback
# (on Linux that is the CUDA build). A torch that is already installed (e.g. a CUDA build) is kept.
TORCH_VERSION=${TORCH_VERSION:-2.13.0}
TORCH_CPU_INDEX=${TORCH_CPU_INDEX:-https://download.pytorch.org/whl/cpu}
if $PY -c "import torch" >/dev/null 2>&1; then
    echo "keeping the installed torch $($PY -c 'import torch; print(torch.__version__)')"
elif $PY -m pip install -q --disable-pip-version-check --retries 1 --timeout 20 \
        --index-url "$TORCH_CPU_INDEX" "torch==$TORCH_VERSION"; then
    echo "installed torch $($PY -c 'import torch; print(torch.__version__)') (asked $TORCH_CPU_INDEX first)"
else
    echo "PyTorch's CPU index $TORCH_CPU_INDEX is not reachable: installing torch $TORCH_VERSION from the default index"
    $PY -m pip install -q --disable-pip-version-check "torch==$TORCH_VERSION"
fi
$PY -m pip install -q --disable-pip-version-check --no-deps "robosuite==1.5.2"
$PY -m pip install -q --disable-pip-version-check -e ".[all,test]"
# openpi's client, for the openpi front door's tests: without its numpy<2 pin (its other needs come with [test]).
$PY -m pip install -q --disable-pip-version-check --no-deps "openpi-client==0.1.2"
# openpi's own websocket server, the baseline of benchmarks/serving.py: --no-deps like openpi-client (its needs,
# openpi-client and websockets, are installed above).
$PY -m pip install -q --disable-pip-version-check --no-deps "openpi-server==0.1.0"
echo "policyserve installed: $($PY -c 'import policyserve; print(policyserve.__file__)')"
