#!/usr/bin/env bash
# Makes NVRTC available without a CUDA toolkit or GPU, for `cargo test --features cuda --test
# nvrtc` (compiles src/inner/cuda/kernels/*.cu to PTX + SASS): installs NVIDIA's PyPI wheels into DIR
# (default .ci-cache/nvrtc, git-ignored) once, then prints the environment to use:
#
#   eval "$(bash scripts/nvrtc-env.sh [DIR])"
#
# Only the `export` lines go to stdout; progress goes to stderr. On failure it prints `false`,
# so that `eval` fails too (and `set -e` stops the caller).
# NVRTC 13 matches the driver of the GPU machines (580, CUDA 13.0); NVRTC must not be newer
# than the driver that loads its PTX.
set -euo pipefail

NVRTC_SPEC=${NVRTC_SPEC:-"nvidia-cuda-nvrtc==13.0.*"}
RUNTIME_SPEC=${RUNTIME_SPEC:-"nvidia-cuda-runtime==13.0.*"}

root=$(cd "$(dirname "$0")/.." && pwd)
dir=${1:-"$root/.ci-cache/nvrtc"}
mkdir -p "$dir"
dir=$(cd "$dir" && pwd)
stamp="$dir/.installed"
want="$NVRTC_SPEC $RUNTIME_SPEC"

fail() {
  echo "nvrtc-env.sh: $*" >&2
  echo false
  exit 1
}

find_lib_dir() {
  local lib
  lib=$(find "$dir/nvidia" -name 'libnvrtc.so.*' -not -name '*builtins*' -not -name '*.alt.*' 2>/dev/null | sort | head -n 1)
  [ -n "$lib" ] && dirname "$lib"
}

if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ] || [ -z "$(find_lib_dir || true)" ]; then
  echo "nvrtc-env.sh: installing $want into $dir" >&2
  command -v python3 >/dev/null || fail "python3 not found"
  rm -rf "$dir/nvidia" "$dir"/nvidia_cuda_*
  python3 -m pip install --quiet --disable-pip-version-check --no-deps --upgrade \
    --target "$dir" "$NVRTC_SPEC" "$RUNTIME_SPEC" >&2 || fail "pip install failed"
  echo "$want" > "$stamp"
else
  echo "nvrtc-env.sh: using $dir ($want)" >&2
fi

lib_dir=$(find_lib_dir) || fail "no libnvrtc.so.* under $dir/nvidia"
[ -n "$(find "$lib_dir" -maxdepth 1 -name 'libnvrtc-builtins.so.*' -not -name '*.alt.*')" ] \
  || fail "libnvrtc-builtins missing in $lib_dir"
cuda_path=$(dirname "$lib_dir")

# cudarc dlopens libnvrtc.so.<major> (and older sonames); NVRTC dlopens its builtins library by
# name, so the directory must be on LD_LIBRARY_PATH. CUDA_PATH/include is what cubecl-cuda
# passes as include path.
printf 'export LD_LIBRARY_PATH=%q${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}\n' "$lib_dir"
printf 'export CUDA_PATH=%q\n' "$cuda_path"
