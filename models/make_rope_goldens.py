"""Goldens for the Rust M-RoPE position ids: the numpy reference of transformers'
get_rope_index (reference/onnx-export.md §7) on a left-padded batch with images of different
sizes, a text-only row and a video. Run: python3 models/make_rope_goldens.py (numpy only)."""
import json
import os

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
IMG, VID, PAD = 12, 13, 0


def rope_index(input_ids, attention_mask, image_grid_thw, video_grid_thw=None, second_per_grid_ts=None,
               spatial_merge_size=2, tokens_per_second=2):
    B, S = input_ids.shape
    pos = np.zeros((3, B, S), dtype=np.int64)
    deltas = np.zeros(B, dtype=np.int64)
    img_iter = iter(image_grid_thw if image_grid_thw is not None else [])
    vid_iter = iter(video_grid_thw if video_grid_thw is not None else [])
    sec_iter = iter(second_per_grid_ts if second_per_grid_ts is not None else [])
    for b in range(B):
        keep = attention_mask[b].astype(bool)
        ids = input_ids[b][keep]
        cols, cur, i = [], 0, 0
        while i < len(ids):
            tok = ids[i]
            if tok == IMG or tok == VID:
                is_vid = tok == VID
                t, h, w = next(vid_iter) if is_vid else next(img_iter)
                lh, lw = h // spatial_merge_size, w // spatial_merge_size
                interval = tokens_per_second * (next(sec_iter, 1.0)) if is_vid else 1
                tt = (np.arange(t) * interval).astype(np.int64)
                T, H, W = np.meshgrid(tt, np.arange(lh), np.arange(lw), indexing="ij")
                cols.append(np.stack([T.reshape(-1), H.reshape(-1), W.reshape(-1)]) + cur)
                cur += max(h, w) // spatial_merge_size
                i += t * lh * lw
            else:
                j = i
                while j < len(ids) and ids[j] != IMG and ids[j] != VID:
                    j += 1
                cols.append(np.broadcast_to(np.arange(cur, cur + j - i), (3, j - i)))
                cur += j - i
                i = j
        llm = np.concatenate(cols, axis=1)
        pos[:, b, keep] = llm
        deltas[b] = llm.max() + 1 - len(ids)
    return pos, deltas


def row(parts, length):
    ids = []
    for p in parts:
        ids += p if isinstance(p, list) else [p]
    return [PAD] * (length - len(ids)) + ids, [0] * (length - len(ids)) + [1] * len(ids)


# Row 0: text, a 12x16-patch image (48 tokens), text. Row 1: two images (8x8 -> 16, 6x10 -> 15).
# Row 2: text only. Row 3: a video of 4 temporal patches of 4x6 (24 tokens) at 0.5 s per patch.
rows = [
    [[5, 6, 7, 8], [9], [IMG] * 48, [10], [20, 21, 22]],
    [[5], [9], [IMG] * 16, [10], [30, 31], [9], [IMG] * 15, [10], [40]],
    [[50, 51, 52, 53, 54, 55, 56]],
    [[5, 6], [9], [VID] * 24, [10], [60]],
]
S = max(sum(len(p) if isinstance(p, list) else 1 for p in r) for r in rows) + 2
ids, mask = zip(*(row(r, S) for r in rows))
ids, mask = np.array(ids), np.array(mask)
images = [[1, 12, 16], [1, 8, 8], [1, 6, 10]]
videos, secs = [[4, 4, 6]], [0.5]
pos, deltas = rope_index(ids, mask, images, videos, secs)
out = {"batch": len(rows), "seq": S, "input_ids": ids.reshape(-1).tolist(), "attention_mask": mask.reshape(-1).tolist(),
       "image_grids": images, "video_grids": videos, "second_per_grid": secs, "spatial_merge_size": 2,
       "tokens_per_second": 2, "image_token_id": IMG, "video_token_id": VID,
       "position_ids": pos.reshape(-1).tolist(), "rope_deltas": deltas.tolist()}
os.makedirs(os.path.join(ROOT, "tests", "goldens"), exist_ok=True)
json.dump(out, open(os.path.join(ROOT, "tests", "goldens", "rope_index.json"), "w"))
print("rope_deltas", deltas.tolist())
