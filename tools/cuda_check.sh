#!/usr/bin/env bash
# Compile-check the CUDA sources without a GPU or a CUDA build of torch:
#   * every csrc/**/*.cu with `nvcc -c` for sm_80 and sm_90, printing ptxas's
#     register/spill summary per kernel;
#   * the torch glue (csrc/cuda/*.cpp) with `g++ -fsyntax-only` against torch's headers.
# Fails on the first error.
set -euo pipefail
cd "$(dirname "$0")/.."
NVCC=${NVCC:-nvcc}
PY=${PY:-python3}
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT
status=0
for cu in $(find csrc -name '*.cu' | sort); do
  for arch in 80 90; do
    echo "== nvcc -c $cu (sm_$arch)"
    if ! "$NVCC" -c -O3 --use_fast_math -std=c++17 -lineinfo -arch=sm_$arch -Xptxas -v -Icsrc "$cu" -o "$out/$(basename "$cu").sm$arch.o" \
        2> "$out/log"; then
      cat "$out/log"; status=1; continue
    fi
    # one line per kernel: name, registers, spills
    awk '/Compiling entry function/ { match($0, /\x27[^\x27]+\x27/); name = substr($0, RSTART + 1, RLENGTH - 2) }
         /spill stores/ { spill = $0; sub(/^ +/, "", spill) }
         /Used [0-9]+ registers/ { sub(/ptxas info *: Used /, ""); print name "\t" $1 " regs\t" spill }' "$out/log" |
      c++filt | awk -F'\t' '{ n = $1; sub(/\(.*/, "", n); printf "   %-60s %s, %s\n", substr(n, 1, 60), $2, $3 }'
    grep -i "warning" "$out/log" || true
  done
done
TORCH_INC=$("$PY" -c "import torch.utils.cpp_extension as c; print(' '.join('-I' + p for p in c.include_paths()))")
PY_INC=$("$PY" -c "import sysconfig; print(sysconfig.get_paths()['include'])")
CUDA_INC=$(dirname "$(dirname "$(command -v "$NVCC")")")/include
for cpp in $(find csrc/cuda -name '*.cpp' | sort); do
  echo "== g++ -fsyntax-only $cpp"
  g++ -std=c++20 -fsyntax-only -Wall -Icsrc $TORCH_INC -I"$PY_INC" -I"$CUDA_INC" -I/usr/local/cuda/include \
      -idirafter tools/cuda_stub "$cpp" || status=1
done
[ $status -eq 0 ] && echo "cuda-check: OK" || echo "cuda-check: FAILED"
exit $status
