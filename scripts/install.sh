#!/usr/bin/env bash
# Installs policyserve with every extra on a fresh Debian machine: the GL libraries for headless
# MuJoCo rendering, the CPU build of torch, robosuite without its GUI/compiler dependencies, openpi-client
# without its numpy<2 pin.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}

gl_pkgs="libegl1 libegl-mesa0 libgl1-mesa-dri libopengl0 libgl1 libosmesa6"
if command -v apt-get >/dev/null 2>&1 && ! dpkg -s $gl_pkgs >/dev/null 2>&1; then
    SUDO=""; [ "$(id -u)" = 0 ] || SUDO="sudo"
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends $gl_pkgs >/dev/null
fi

# torch first, pinned to the CPU build: anything that later asks for torch is then satisfied.
$PY -m pip install -q --disable-pip-version-check "torch==2.13.0"
$PY -m pip install -q --disable-pip-version-check --no-deps "robosuite==1.5.2"
$PY -m pip install -q --disable-pip-version-check -e ".[all,test]"
# openpi's client, for the openpi front door's tests: without its numpy<2 pin (its other needs come with [test]).
$PY -m pip install -q --disable-pip-version-check --no-deps "openpi-client==0.1.2"
echo "policyserve installed: $($PY -c 'import policyserve; print(policyserve.__file__)')"
