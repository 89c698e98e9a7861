#!/usr/bin/env bash
# Everything that needs a CUDA GPU, in one go, with every log and JSON written to one folder:
#   1. the test suite on the GPU: every test marked gpu (the CUDA and Triton kernel backends,
#      CUDA-graph capture and replay), then the GPU paths of the build, fast-path, sampling and
#      benchmark tests and the Triton kernels compiled for the other architectures,
#   2. compute-sanitizer (memcheck) over the CUDA kernels' tests,
#   3. python -m b2fast.bench kernels --large (a batch of more than 1 GB of traffic),
#   4. python -m b2fast.bench all (kernels, rewards, sample, train, stage; the stage composed from
#      the parts measured just before),
#   5. python -m b2fast.bench lcm --model sd (a B² stage of 128 images on an SD-shaped LCM vs DDIM),
#   6. python -m b2fast.bench objectives (one stage's update per train.objective, SD 1.x shapes),
#   7. python -m b2fast.bench steer (FK steering's cost beyond its particles' UNet calls, SD 1.x
#      shapes, CLIPScore on ViT-H-14: the paper's schedule, then one late potential step).
# Usage, from the repository root after `pip install -e .` with a CUDA torch:
#   benchmarks/gpu_check.sh [OUT_DIR] [STEPS]     # STEPS: any of tests,sanitizer,kernels,all,lcm,objectives,steer
set -uo pipefail
out=${1:-gpu-check}
steps=${2:-tests,sanitizer,kernels,all,lcm,objectives,steer}
mkdir -p "$out"
export PYTHONUNBUFFERED=1
python - <<'EOF' || exit 2
import torch, b2fast._C as C
assert torch.cuda.is_available(), "no CUDA GPU visible to torch"
assert C.has_cuda(), "b2fast._C was built without CUDA: reinstall with nvcc on the PATH and a CUDA torch"
print(torch.cuda.get_device_name(), "| torch", torch.__version__, "| CUDA", torch.version.cuda)
EOF
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm,driver_version --format=csv > "$out/device.csv" 2>&1
status=0
want() { [[ ",$steps," == *",$1,"* ]]; }
if want tests; then
  # every test marked gpu, then the files whose unmarked tests take their GPU paths when CUDA is there
  { python -m pytest -q -rs -m gpu tests; marked=$?
    python -m pytest -q -rs -m "not gpu" tests/test_build.py tests/test_fast_path.py tests/test_sampling.py \
      tests/test_bench.py tests/test_triton_compile.py; unmarked=$?
    [ "$marked" -eq 0 ] && [ "$unmarked" -eq 0 ]; } 2>&1 | tee "$out/tests.log" || status=1
fi
if want sanitizer; then
  if command -v compute-sanitizer >/dev/null; then
    compute-sanitizer --tool memcheck --error-exitcode 3 python -m pytest -q -x tests/test_ddim_step.py \
      -k "cuda-cuda" 2>&1 | tail -n 40 > "$out/memcheck.log" || status=1
  else
    echo "compute-sanitizer not found on PATH" > "$out/memcheck.log"; status=1
  fi
fi
if want kernels; then
  python -m b2fast.bench kernels --large --json "$out/kernels.json" | tee "$out/kernels.md" || status=1
fi
if want all; then
  python -m b2fast.bench all --json "$out/all.json" | tee "$out/all.md" || status=1
fi
if want lcm; then
  python -m b2fast.bench lcm --model sd --sampling.batches_per_stage 4 --sampling.prompts_per_batch 8 \
    --sampling.branches 4 --json "$out/lcm.json" | tee "$out/lcm.md" || status=1
fi
if want objectives; then
  python -m b2fast.bench objectives --json "$out/objectives.json" | tee "$out/objectives.md" || status=1
fi
if want steer; then
  python -m b2fast.bench steer --json "$out/steer.json" | tee "$out/steer.md" || status=1
  python -m b2fast.bench steer --steer.start 75 --steer.end 75 --json "$out/steer_late.json" \
    | tee "$out/steer_late.md" || status=1
fi
echo "gpu_check: results in $out (exit $status)"
exit $status
