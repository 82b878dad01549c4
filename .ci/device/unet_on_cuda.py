"""A polyp_best U-Net (.device/unet.pth) on CUDA: val Dice with bf16 autocast, and its speed (.ci/device/gpu_check.sh)."""
import json, os, sys, time
import numpy as np, torch
from wsseg.config_schema import DatasetConfig
from wsseg.data import create_dataset
from wsseg.device import autocast
from wsseg.metrics import confusion, scores
from wsseg.models.segmenter import probability_model
from wsseg.stages.segment import load_segmenter, predict_masks

out = {}
dev = torch.device("cuda")
ds = create_dataset(DatasetConfig("kvasir_seg", "kvasir-seg", "val"), ".device/data")
model, meta = load_segmenter(".device/unet.pth")
print(meta, flush=True)
model = model.to(dev).eval()
t = time.perf_counter()
masks = predict_masks(model, meta, ds, None, dev, batch_size=8, keep=True)
out["predict_masks_s"] = time.perf_counter() - t
rows = [scores(confusion(m, ds.load_mask(i))) for i, m in enumerate(masks)]
out["val"] = {k: float(np.mean([r[k] for r in rows])) for k in ("dice", "iou", "precision", "recall")}
out["cpu_reference"] = {"dice": 0.7414, "iou": 0.6272}
print(out, flush=True)
net = probability_model(model, meta).to(dev).eval()
size = meta.input_size
speed = {}
for amp in (False, True):
    for batch in (1, 8, 32):
        x = torch.randn(batch, 3, size, size, device=dev)
        with torch.no_grad(), autocast(dev, amp):
            for _ in range(5):
                net(x)
            torch.cuda.synchronize()
            t = time.perf_counter()
            for _ in range(20):
                net(x)
            torch.cuda.synchronize()
        speed[f"{'amp' if amp else 'fp32'}_batch{batch}_images_per_s"] = 20 * batch / (time.perf_counter() - t)
out["speed_four_flips_352px"] = speed
out["gpu"] = torch.cuda.get_device_name(0)
out["torch"] = torch.__version__
print(json.dumps(out, indent=1), flush=True)
json.dump(out, open(os.path.join(os.environ.get("OUT", "/tmp"), "unet_cuda.json"), "w"), indent=1)
