"""Goldens for the Rust image preprocessing: Pillow bicubic resizes of a fixture photo.

Run from the repository root: python3 models/make_pil_goldens.py
Needs only Pillow. Writes tests/goldens/pil_bicubic_*.png (lossless) and pil_bicubic.json.
"""
import json
import os

from PIL import Image

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUT = os.path.join(ROOT, "tests", "goldens")
os.makedirs(OUT, exist_ok=True)

src = Image.open(os.path.join(ROOT, "fixtures", "photos", "chelsea.png")).convert("RGB")
cases = [
    ("down", src, (224, 140)),            # 451×300 → 224×140: anti-aliased downscale
    ("up", src.crop((200, 100, 260, 140)), (150, 100)),  # 60×40 → 150×100: upscale
    ("mixed", src, (476, 196)),           # wider and shorter: Pillow runs the vertical pass first
    ("mixed2", src, (300, 400)),          # narrower and taller
]
meta = []
for name, img, size in cases:
    out = img.resize(size, resample=Image.BICUBIC)
    path = f"pil_bicubic_{name}.png"
    out.save(os.path.join(OUT, path))
    meta.append({"name": name, "size": list(size), "crop": None if img is src else [200, 100, 260, 140]})
json.dump({"pillow": Image.__version__, "cases": meta}, open(os.path.join(OUT, "pil_bicubic.json"), "w"), indent=1)
print("wrote", [m["name"] for m in meta])
