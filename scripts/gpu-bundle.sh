#!/usr/bin/env bash
# Builds the release binaries the GPU machine needs (it has no Rust and no internet) and copies
# them into .gpu/ (git-ignored), for the device tool: run(command="bash .gpu/device-check.sh",
# carry=[".gpu"]).
set -euo pipefail
cd "$(dirname "$0")/.."
rm -rf .gpu && mkdir -p .gpu/tests .gpu/benches .gpu/examples
# Test binaries: cargo prints their paths as JSON artifacts.
cargo test --release --features cuda,autotune --no-run --message-format=json 2>/dev/null |
  python3 -c '
import json, sys, shutil, os
for line in sys.stdin:
    m = json.loads(line)
    if m.get("reason") == "compiler-artifact" and m.get("executable") and m["profile"]["test"]:
        name = m["target"]["name"]
        kind = m["target"]["kind"][0]
        # The integration tests (one binary; device-check.sh runs its GPU modules) and the
        # unit tests of the library.
        if kind in ("test", "lib") and name in ("it", "burn_offload"):
            shutil.copy(m["executable"], os.path.join(".gpu/tests", name))
'
cargo build --release --features cuda,autotune --example llama --benches --message-format=json 2>/dev/null |
  python3 -c '
import json, sys, shutil, os
for line in sys.stdin:
    m = json.loads(line)
    if m.get("reason") == "compiler-artifact" and m.get("executable"):
        kind = m["target"]["kind"][0]
        dest = {"example": ".gpu/examples", "bench": ".gpu/benches"}.get(kind)
        # The CPU-only overhead bench does not belong on the GPU machine.
        if dest and m["target"]["name"] != "overhead":
            shutil.copy(m["executable"], os.path.join(dest, m["target"]["name"]))
'
# The carried tree is limited to 64 MiB: strip the binaries and pack them (device-check.sh
# unpacks them on the GPU machine).
strip .gpu/tests/* .gpu/examples/* .gpu/benches/*
tar -C .gpu -cJf .gpu/bin.tar.xz tests examples benches
rm -rf .gpu/tests .gpu/examples .gpu/benches
cp scripts/device-check.sh .gpu/
# CubeCL's autotune and PTX caches from an earlier device run (device-check.sh saves them to
# $OUT/cubecl-cache.tar.gz): with them a run skips most of the ~10 s per matmul shape that
# Burn spends tuning. CUBECL_CACHE=path/to/cubecl-cache.tar.gz bash scripts/gpu-bundle.sh
if [ -n "${CUBECL_CACHE:-}" ]; then cp "$CUBECL_CACHE" .gpu/cubecl-cache.tar.gz; fi
ls -la .gpu
