#!/usr/bin/env bash
# A device check on a lent GPU machine (not CI): wsseg's CUDA paths, run from the repo root as
#   run(command="bash .ci/device/gpu_check.sh", carry=[".device"])
# The machine has no package index: prepare .device/ here first (ignored by git, about 38 MB):
#   pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp --abi cp312 --abi none \
#     --platform manylinux2014_x86_64 -d .device/wheels segmentation_models_pytorch ttach albumentations albucore \
#     stringzilla simsimd pydantic pydantic_core annotated-types typing-inspection
#   pip download --no-deps --no-binary=:all: -d .device/wheels grad-cam
#   .device/data/kvasir-seg/{images,masks,splits/val.txt}: the 120 Kvasir-SEG val images (../shared/data)
#   .device/unet.pth: a polyp_best run's checkpoints/unet.pth
cd "$(dirname "$0")/../.."
export PYTHONUNBUFFERED=1
start=$(date +%s)
python3 -m pip install -q --no-index --no-deps --no-build-isolation .device/wheels/* . ./export 2>&1 | grep -v -i warning | tail -5
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
python3 -c "import torch, timm, onnxruntime, wsseg; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(), 'timm', timm.__version__, 'ort', onnxruntime.__version__, onnxruntime.get_available_providers())" 2>&1 | tee $OUT/versions.txt
echo "== demo recipe (device auto) $(( $(date +%s) - start )) s"
( time wsseg recipe run demo --out /tmp/demo ) > $OUT/demo.log 2>&1; echo "demo rc=$?"
tail -40 $OUT/demo.log; cp /tmp/demo/metrics.json $OUT/demo_metrics.json 2>/dev/null
echo "== polyp U-Net on CUDA $(( $(date +%s) - start )) s"
timeout 120 python3 .ci/device/unet_on_cuda.py 2>&1 | tail -30
echo "== test suite on the GPU machine $(( $(date +%s) - start )) s"
# -v: each result is in the log as it happens, so a run cut short still names its failures.
timeout 300 python3 -m pytest -p no:cacheprovider -p no:benchmark -n 16 -v --tb=short -W ignore tests > $OUT/pytest.log 2>&1
echo "pytest rc=$?"; grep -E 'FAILED|ERROR' $OUT/pytest.log | head -20; tail -3 $OUT/pytest.log
echo "== done $(( $(date +%s) - start )) s"
