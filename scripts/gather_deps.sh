#!/usr/bin/env bash
# Fills .deps/ (ignored by git) with the headers a machine without registry access needs to build
# moekit with CUDA: CUTLASS 4.2 (from the PyPI wheel nvidia-cutlass==4.2.0.0), CLI11 and
# nlohmann/json (copied from this machine's Debian packages). Carry .deps with the working tree;
# cmake/cuda.cmake finds .deps/cutlass/include by itself; configure with
# -DCMAKE_PREFIX_PATH=$PWD/.deps for the CLI's packages. Safe to run again.
set -euo pipefail
cd "$(dirname "$0")/.."

readonly kCutlassVersion=4.2.0.0
deps=.deps
mkdir -p "$deps"

if [[ ! -f $deps/cutlass/VERSION || $(cat "$deps/cutlass/VERSION") != "$kCutlassVersion" ]]; then
  tmp=$(mktemp -d)
  trap 'rm -rf "$tmp"' EXIT
  python3 -m pip download -q --no-deps --only-binary=:all: -d "$tmp" \
    "nvidia-cutlass==$kCutlassVersion"
  # The wheel is a zip; its C++ headers live under cutlass_library/source/include.
  python3 - "$tmp"/nvidia_cutlass-*.whl "$tmp/x" <<'PY'
import sys, zipfile
with zipfile.ZipFile(sys.argv[1]) as z:
    z.extractall(sys.argv[2], [n for n in z.namelist()
                               if n.startswith("cutlass_library/source/include/")])
PY
  rm -rf "$deps/cutlass"
  mkdir -p "$deps/cutlass"
  mv "$tmp/x/cutlass_library/source/include" "$deps/cutlass/include"
  echo "$kCutlassVersion" >"$deps/cutlass/VERSION"
fi

# Header-only libraries the CLI uses (Debian: libcli11-dev, nlohmann-json3-dev), with their CMake
# package files, so that -DCMAKE_PREFIX_PATH=$PWD/.deps finds them (prefix = three levels up).
mkdir -p "$deps/include" "$deps/share/cmake"
for pkg in CLI:CLI11 nlohmann:nlohmann_json; do
  inc=/usr/include/${pkg%%:*} cfg=/usr/share/cmake/${pkg##*:}
  [[ -d $inc && -d $cfg ]] || {
    echo "gather_deps: $inc or $cfg missing (apt-get install libcli11-dev nlohmann-json3-dev)" >&2
    exit 1
  }
  rm -rf "$deps/include/${pkg%%:*}" "$deps/share/cmake/${pkg##*:}"
  cp -r "$inc" "$deps/include/"
  cp -r "$cfg" "$deps/share/cmake/"
done
du -sh "$deps"
