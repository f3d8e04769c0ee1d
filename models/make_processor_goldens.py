"""Goldens for the Rust image preprocessing from transformers' Qwen2-VL image processor
(PIL backend): pixel_values and image_grid_thw for three images that exercise plain rounding,
the min_pixels upscale and the max_pixels downscale.

Run with the exporter's environment (models/requirements.txt): python models/make_processor_goldens.py
Writes tests/goldens/processor_<name>.npy (float32 [rows, 1176]) and processor.json."""
import json
import os

import numpy as np
from PIL import Image
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUT = os.path.join(ROOT, "tests", "goldens")
src = Image.open(os.path.join(ROOT, "fixtures", "photos", "chelsea.png")).convert("RGB")
cases = [
    ("crop", (150, 90, 250, 165), {}),                                  # 100×75 → 112×84
    ("tiny", (200, 100, 230, 118), {}),                                 # 30×18 → up to ≥ min_pixels
    ("capped", None, {"min_pixels": 3136, "max_pixels": 12544}),        # 451×300 → capped
]
meta = []
for name, box, kw in cases:
    img = src.crop(box) if box else src
    proc = Qwen2VLImageProcessorPil(**kw)
    out = proc(images=[img], return_tensors="np")
    pv = np.asarray(out["pixel_values"], dtype=np.float32)
    grid = np.asarray(out["image_grid_thw"]).tolist()[0]
    np.save(os.path.join(OUT, f"processor_{name}.npy"), pv)
    meta.append({"name": name, "size": list(img.size), "grid_thw": grid, "rows": pv.shape[0],
                 "min_pixels": kw.get("min_pixels", 3136), "max_pixels": kw.get("max_pixels", 12845056),
                 "crop": list(box) if box else None})
    print(name, img.size, grid, pv.shape)
import transformers
json.dump({"transformers": transformers.__version__, "cases": meta}, open(os.path.join(OUT, "processor.json"), "w"), indent=1)
