#!/bin/bash
# aligncodec GPU check (#13): one prepared run on a device machine, from the repository root.
# Expects the carried wheels in .whl/ (aligncodec built from this checkout, numpy 2.4.6 -- numba-cuda
# 0.30.4 does not work with numpy 2.5 --, constriction, zstandard, isal) and the archives to profile
# as arguments (default: devcarry/*.acz). Writes its logs and JSON under $OUT.
set -u; export PYTHONUNBUFFERED=1
R=$PWD; OUT=${OUT:-/tmp/acz-gpu-out}; mkdir -p "$OUT"
ARCH=(); for a in "$@"; do ARCH+=("$(readlink -f "$a")"); done; [ ${#ARCH[@]} -eq 0 ] && ARCH=($R/devcarry/*.acz)
AARGS=(); for a in "${ARCH[@]}"; do AARGS+=(--archive "$(readlink -f "$a")"); done
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site $R/.whl/*.whl || exit 9
export PYTHONPATH=/tmp/site NUMBA_CACHE_DIR=/tmp/numba-cache
nvidia-smi --query-gpu=name,driver_version --format=csv 2>&1 | tee $OUT/env.txt
cd /tmp
python3 -c "import sys, numba, numpy, torch; print(sys.version.split()[0], 'numba', numba.__version__, 'numpy', numpy.__version__, 'torch', torch.__version__)
from aligncodec.codec.entropy import decode_cuda; decode_cuda.require(); print('probe kernel ok')" 2>&1 | tee -a $OUT/env.txt
echo "=== 1. the device tests on the real GPU $(date +%T)"
ACZ_TEST_REAL_GPU=1 ACZ_SIM_FULL=1 timeout 150 python3 -m pytest -q -p no:cacheprovider -x $R/tests/test_codec_modes_lossy_cuda.py \
  $R/tests/test_codec_entropy_decode_cuda.py $R/tests/test_codec_modes_tcq_cuda.py -k "not under_simulator" 2>&1 | tail -25 | tee $OUT/pytest_gpu.log
echo "=== 2. bench_gpu 4096x4096 + archives $(date +%T)"
timeout 240 python3 -m aligncodec.tools.bench.bench_gpu --vectors $R/spec/vectors/lossy "${AARGS[@]}" \
  --repeat 10 --json $OUT/bench_gpu_4096.json 2>&1 | tee $OUT/bench_gpu_4096.log
echo "=== 3. cProfile of load_state_dict(device=cuda) $(date +%T)"
timeout 120 python3 -W ignore -m aligncodec.tools.bench.gpu_profile "${ARCH[@]}" --top 30 2>&1 | tee $OUT/prof.log | head -150
echo "=== 4. bench_gpu 8192x8192 $(date +%T)"
timeout 120 python3 -m aligncodec.tools.bench.bench_gpu --vectors $R/spec/vectors/lossy --rows 8192 --cols 8192 \
  --repeat 10 --json $OUT/bench_gpu_8192.json 2>&1 | tail -16 | tee $OUT/bench_gpu_8192.log
echo "=== done $(date +%T)"
