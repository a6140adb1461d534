#!/usr/bin/env bash
# Every GPU check of mixnet-cli in one run, for a GPU machine with a CUDA build of PyTorch and no network:
# fidelity of `mixnet classify --device gpu` for S, M and L against PaddleClas's dygraph pipeline, `auto` picking
# the GPU, and `mixnet benchmark --device gpu` at batch 1/4/8 in fp32, tf32, bf16, fp16 and compiled.
#
# Before, here (needs the [paddle] extra; writes .gpu-check/, about 35 MB, git-ignored):
#   python benchmarks/gpu_prepare.py --out .gpu-check
# There, from the checkout's root, with .gpu-check beside it (results go to $OUT, else ./gpu-results):
#   bash benchmarks/gpu.sh
# At most 120 + 400 s: inside one 10-minute device command.
# Without a GPU, GPU_CHECK_DEVICE=cpu GPU_CHECK_REPEATS=3 runs every step on the CPU (how it is tested).
set -uo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-$PWD/gpu-results}"
mkdir -p "$out"
python="${PYTHON:-python3}"
# The pure-Python packages the machine lacks, carried as wheels: installed beside, never into, its Python.
if compgen -G ".gpu-check/wheels/*.whl" >/dev/null; then
    "$python" -m pip install -q --no-index --no-deps --no-compile --target /tmp/mixnet-gpu-site .gpu-check/wheels/*.whl \
        && export PYTHONPATH="/tmp/mixnet-gpu-site${PYTHONPATH:+:$PYTHONPATH}"
fi
# mixnet itself from this checkout, not installed: nothing is installed into the machine's Python.
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
nvidia-smi >"$out/nvidia-smi.txt" 2>&1 || true
# The GPU tests of the suite (fp32 on the GPU against ONNX Runtime on the CPU, S/M/L, batch 1/3/8; auto).
timeout 120 "$python" -m pytest tests/test_torch.py -q -p no:cacheprovider -m gpu 2>&1 | tail -20 >"$out/pytest.txt"
timeout 400 "$python" benchmarks/gpu_check.py --carry .gpu-check --out "$out" \
    --device "${GPU_CHECK_DEVICE:-gpu}" --repeats "${GPU_CHECK_REPEATS:-200}" --compile-limit "${GPU_CHECK_COMPILE_LIMIT:-150}"
