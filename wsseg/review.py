"""`wsseg review RUN_DIR`: one self-contained HTML page to look at a run's masks, least confident first.

Every image of the run's evaluation set with each producer's mask outlined (green), its map (when the
producer comes from one) and the ground truth (magenta) when there is one, per-image Dice and the
confidence (wsseg.confidence). Filters by producer and confidence; keys: j / k or the arrows move, f
toggles the map. The images are embedded, so the file opens from disk, with no server.
"""

from __future__ import annotations

import base64
import csv
import html
import json
from pathlib import Path
from typing import Dict, List, Optional

import cv2
import numpy as np

from wsseg.confidence import read_confidence
from wsseg.errors import WssegError
from wsseg.pipeline.layout import RunLayout
from wsseg.progress import ProgressFn, no_progress

THUMBNAIL = 256  # longer side of every picture on the page


def _data_uri(rgb: np.ndarray) -> str:
    ok, encoded = cv2.imencode(".jpg", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, 85])
    return "data:image/jpeg;base64," + base64.b64encode(encoded.tobytes()).decode("ascii")


def _thumbnail(array: np.ndarray, interpolation=cv2.INTER_AREA) -> np.ndarray:
    height, width = array.shape[:2]
    scale = THUMBNAIL / max(height, width)
    return cv2.resize(array.astype(np.uint8), (max(1, round(width * scale)), max(1, round(height * scale))),
                      interpolation=interpolation)


def _outline(image: np.ndarray, mask: np.ndarray, colour) -> np.ndarray:
    edges = cv2.morphologyEx(mask.astype(np.uint8), cv2.MORPH_GRADIENT, np.ones((3, 3), np.uint8)).astype(bool)
    out = image.copy()
    out[edges] = colour
    return out


def _map_source(config, producer: str, layout: RunLayout) -> Optional[str]:
    if layout.maps(producer).is_dir():
        return producer
    for variant in config.pseudo_masks.variants:
        if variant.name == producer and layout.maps(variant.source).is_dir():
            return variant.source
    return None


def review_entries(run_dir: Path, producers: Optional[List[str]] = None, data_root=None,
                   progress: ProgressFn = no_progress) -> List[Dict]:
    """One entry per (producer, image), least confident first: what the page shows."""
    from wsseg.config import load_recipe
    from wsseg.data import DatasetCatalog
    from wsseg.data.io import read_binary_mask
    from wsseg.stages.maps import load_map
    from wsseg.stages.pseudo_masks import resize_map

    layout = RunLayout(run_dir)
    if not layout.config.is_file():
        raise WssegError(f"{run_dir}: not a run directory (no config.yaml)")
    config = load_recipe(str(layout.config))
    recorded = {p.name: read_confidence(p) for p in sorted((layout.root / "masks").glob("*")) if p.is_dir()}
    available = [name for name, values in recorded.items() if values]
    producers = producers or available
    unknown = [p for p in producers if p not in available]
    if unknown:
        raise WssegError(f"{run_dir}: no masks with a confidence for {', '.join(unknown)} "
                         f"(producers with one: {', '.join(available) or 'none'})")
    dataset = DatasetCatalog(data_root, "skip").get(config.maps.dataset, "maps.dataset")
    dice: Dict[tuple, float] = {}
    if layout.per_image.is_file():
        with layout.per_image.open() as handle:
            dice = {(r["method"], r["stem"]): float(r["dice"]) for r in csv.DictReader(handle)}
    sources = {producer: _map_source(config, producer, layout) for producer in producers}
    entries = []
    for index in progress(range(len(dataset)), total=len(dataset), description="review page"):
        stem = dataset.records[index].stem
        image = dataset.load_image(index)
        small = _thumbnail(image)
        truth = dataset.load_mask(index) if dataset.has_masks else None
        for producer in producers:
            mask_path = layout.masks(producer) / f"{stem}.png"
            if not mask_path.is_file():
                continue
            size = small.shape[1::-1]
            mask = cv2.resize(read_binary_mask(mask_path).astype(np.uint8), size, interpolation=cv2.INTER_NEAREST) > 0
            picture = _outline(small, mask, (0, 255, 0))
            if truth is not None:
                picture = _outline(picture, cv2.resize(truth.astype(np.uint8), size, interpolation=cv2.INTER_NEAREST) > 0,
                                   (255, 0, 255))
            entry = {"producer": producer, "stem": stem, "image": _data_uri(picture),
                     "confidence": recorded[producer].get(stem),
                     "dice": dice.get((producer, stem))}
            source = sources[producer]
            if source is not None and (layout.maps(source) / f"{stem}.npy").is_file():
                activation = resize_map(load_map(layout.maps(source) / f"{stem}.npy"), *small.shape[:2])
                heat = cv2.applyColorMap((activation * 255).astype(np.uint8), cv2.COLORMAP_JET)[..., ::-1]
                entry["map"] = _data_uri(_outline((0.5 * small + 0.5 * heat).astype(np.uint8), mask, (255, 255, 255)))
            entries.append(entry)
    entries.sort(key=lambda e: (1.0 if e["confidence"] is None else e["confidence"], e["producer"], e["stem"]))
    return entries


def write_review_page(run_dir: Path, out: Optional[Path] = None, producers: Optional[List[str]] = None,
                      data_root=None, progress: ProgressFn = no_progress) -> Path:
    """Write the page (default `RUN_DIR/review.html`); returns its path."""
    layout = RunLayout(run_dir)
    entries = review_entries(run_dir, producers, data_root, progress)
    out = Path(out) if out else layout.root / "review.html"
    page = PAGE.replace("__TITLE__", html.escape(f"wsseg review: {layout.root.name}"))
    page = page.replace("__DATA__", json.dumps(entries).replace("</", "<\\/"))
    tmp = out.with_name(f".{out.name}.tmp")
    tmp.write_text(page, encoding="utf-8")
    tmp.replace(out)
    return out


PAGE = """<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>__TITLE__</title>
<style>
body { font-family: system-ui, sans-serif; margin: 0; background: #f4f4f4; }
header { position: sticky; top: 0; background: #222; color: #eee; padding: 8px 16px; display: flex; gap: 16px;
         align-items: center; flex-wrap: wrap; z-index: 1; }
header label { font-size: 14px; }
#grid { display: flex; flex-wrap: wrap; gap: 10px; padding: 12px; }
.card { background: #fff; border: 3px solid transparent; border-radius: 6px; padding: 6px; width: 262px; font-size: 13px; }
.card.selected { border-color: #2a7ae2; }
.card img { display: block; max-width: 256px; max-height: 256px; }
.meta { display: flex; justify-content: space-between; margin-top: 4px; }
.stem { overflow: hidden; text-overflow: ellipsis; white-space: nowrap; color: #555; }
.low { color: #c0392b; font-weight: bold; }
</style></head>
<body>
<header>
  <strong>__TITLE__</strong>
  <label>producer <select id="producer"><option value="">all</option></select></label>
  <label>confidence at most <input id="confidence" type="range" min="0" max="1" step="0.01" value="1">
    <span id="confidence-value">1.00</span></label>
  <span id="count"></span>
  <span>keys: j/k or arrows move, f shows the map; green: mask, magenta: ground truth</span>
</header>
<div id="grid"></div>
<script>
const ENTRIES = __DATA__;
const grid = document.getElementById("grid");
const producerSelect = document.getElementById("producer");
const slider = document.getElementById("confidence");
let showMap = false, selected = 0;
[...new Set(ENTRIES.map(e => e.producer))].sort().forEach(p => {
  const option = document.createElement("option"); option.value = p; option.textContent = p;
  producerSelect.appendChild(option);
});
function visible() {
  const producer = producerSelect.value, limit = parseFloat(slider.value);
  return ENTRIES.filter(e => (!producer || e.producer === producer) &&
                             (e.confidence === null || e.confidence <= limit + 1e-9));
}
function render() {
  const shown = visible();
  document.getElementById("confidence-value").textContent = parseFloat(slider.value).toFixed(2);
  document.getElementById("count").textContent = shown.length + " of " + ENTRIES.length + " masks";
  grid.innerHTML = "";
  shown.forEach((e, i) => {
    const card = document.createElement("div");
    card.className = "card" + (i === selected ? " selected" : "");
    card.dataset.stem = e.stem; card.dataset.producer = e.producer;
    card.dataset.confidence = e.confidence === null ? "" : e.confidence;
    const img = document.createElement("img");
    img.src = showMap && e.map ? e.map : e.image; img.alt = e.stem;
    const confidence = e.confidence === null ? "-" : e.confidence.toFixed(3);
    const dice = e.dice === null || e.dice === undefined ? "" : " dice " + e.dice.toFixed(3);
    card.appendChild(img);
    card.insertAdjacentHTML("beforeend", '<div class="meta"><span class="stem"></span><span></span></div>');
    card.querySelector(".stem").textContent = e.producer + " / " + e.stem;
    const score = card.querySelectorAll(".meta span")[1];
    score.textContent = "conf " + confidence + dice;
    if (e.confidence !== null && e.confidence < 0.5) score.className = "low";
    card.addEventListener("click", () => { selected = i; render(); });
    grid.appendChild(card);
  });
  const current = grid.children[selected];
  if (current && document.activeElement !== slider) current.scrollIntoView({block: "nearest"});
}
document.addEventListener("keydown", ev => {
  const count = visible().length;
  if (["j", "ArrowRight", "ArrowDown"].includes(ev.key)) selected = Math.min(count - 1, selected + 1);
  else if (["k", "ArrowLeft", "ArrowUp"].includes(ev.key)) selected = Math.max(0, selected - 1);
  else if (ev.key === "f") showMap = !showMap;
  else return;
  ev.preventDefault(); render();
});
producerSelect.addEventListener("change", () => { selected = 0; render(); });
slider.addEventListener("input", () => { selected = 0; render(); });
render();
</script></body></html>
"""
