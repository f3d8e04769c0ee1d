"""`--goldens`: reference values from transformers for the Rust tests."""
import json
import os

import numpy as np
import torch

from .settings import f32
from .builders import CHAT_TEMPLATE
from .lora import random_lora
from .contracts import SFT_BATCH, TRAIN_BATCH
from .qwen2_5_vl import rope_index
from .training import sft_batch, sft_step_fn, token_logprobs, train_batch
from .verify import synthetic_image, vision_batch, vision_chain_reference


def write_vision_goldens(model, out, lang, vis, shapes_, proc=None, vision=None):
    """goldens/vision: vision_batch's rows (prompt and completion ids, pixel rows, grids), an
    adapter on every target (language and vision), the GRPO settings and the old / reference
    log-probs and advantages; and torch autograd's loss and every LoRA gradient through the whole
    transformers model from the pixels. `proc` and `vision` (the vision module's class) are the
    family's; Qwen2.5-VL's by default."""
    gd = os.path.join(out, "goldens", "vision")
    os.makedirs(gd, exist_ok=True)
    scale = json.load(open(f"{out}/manifest.json"))["lora"]["scale"]
    names = lang + vis
    lora = random_lora(lang, shapes_, 5) + random_lora(vis, shapes_, 7)
    vb = vision_batch(model, proc=proc, vision=vision)
    loss, grads = vision_chain_reference(model, vb, names, lora, scale)
    b = vb["batch"]
    for k, v in zip([f"{n}.{m}" for n in names for m in ("A", "B")], lora):
        np.save(os.path.join(gd, f"in.{k}.npy"), f32(v))
        np.save(os.path.join(gd, f"out.grad.{k}.npy"), f32(grads.pop(0)))
    np.save(os.path.join(gd, "pixel_values.npy"), f32(vb["pv"]))
    for k in ("old_logprobs", "ref_logprobs", "rollout_is_weights"):
        np.save(os.path.join(gd, f"in.{k}.npy"), f32(b[TRAIN_BATCH.index(k)]))
    json.dump({"prompts": vb["prompts"], "completions": vb["completions"], "image_grid_thw": vb["grid"].tolist(),
               "advantages": f32(b[7]).tolist(),
               "settings": {k: float(b[TRAIN_BATCH.index(k)]) for k in
                            ("temperature", "clip_ratio_low", "clip_ratio_high", "clip_ratio_dual", "kl_coef",
                             "token_count")},
               "loss": float(loss)}, open(os.path.join(gd, "batch.json"), "w"), indent=1)
    print(f"  vision goldens: {gd} (loss {float(loss):.6f})")


def write_goldens(model, hf_dir, out, names, shapes_, step, template=CHAT_TEMPLATE, proc=None):
    """Reference values from transformers for the Rust tests: chat-template prompt ids, M-RoPE
    positions for a left-padded batch with several images, logits of prefill + 5 greedy steps,
    teacher-forced log-probs, and (with `step`) one train.onnx and one sft.onnx step (inputs
    and torch autograd outputs). `template` and `proc` (the image processor) are the family's."""
    from transformers import PreTrainedTokenizerFast
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    gd = os.path.join(out, "goldens")
    os.makedirs(gd, exist_ok=True)
    tok = PreTrainedTokenizerFast(tokenizer_file=os.path.join(hf_dir, "tokenizer.json"))
    tok.chat_template = template
    proc = proc or Qwen2VLImageProcessorPil()
    cfg, tc = model.config, model.config.text_config
    prompts = [("Which patch is flipped?", [(224, 168)]), ("Sort the three regions by depth.", [(84, 252), (140, 112)])]
    rows, grids, pvs, images = [], [], [], []
    for p_i, (text, sizes) in enumerate(prompts):
        files = []
        for k, (w, h) in enumerate(sizes):
            img = synthetic_image(w, h, 10 * p_i + k)
            name = f"image_{p_i}_{k}.png"
            img.save(os.path.join(gd, name))
            files.append(name)
            pi = proc(images=[img], return_tensors="np")
            grids += pi["image_grid_thw"].tolist()
            pvs.append(pi["pixel_values"].astype(np.float32))
        messages = [{"role": "user", "content": [{"type": "image"} for _ in sizes] + [{"type": "text", "text": text}]}]
        rendered = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        images.append(files)
        rows.append(rendered)
    expanded, g_iter = [], iter(grids)
    for r in rows:
        parts = r.split("<|image_pad|>")
        e = parts[0]
        for rest in parts[1:]:
            t, h, w = next(g_iter)
            e += "<|image_pad|>" * (t * h * w // 4) + rest
        expanded.append(e)
    seqs = [tok(e, add_special_tokens=False)["input_ids"] for e in expanded]
    S = max(map(len, seqs))
    ids = np.array([[tc.pad_token_id] * (S - len(q)) + q for q in seqs], dtype=np.int64)
    mask = np.array([[0] * (S - len(q)) + [1] * len(q) for q in seqs], dtype=np.int64)
    pv, grid = np.concatenate(pvs), np.array(grids, dtype=np.int64)
    pos, deltas = rope_index(ids, mask, grids, cfg.image_token_id, cfg.vision_config.spatial_merge_size)
    # The goldens are transformers' own get_rope_index; the host algorithm must agree with it.
    with torch.no_grad():
        mm = (torch.from_numpy(ids) == cfg.image_token_id).to(torch.int32)
        hf_pos, hf_deltas = model.model.get_rope_index(torch.from_numpy(ids), mm, image_grid_thw=torch.from_numpy(
            np.array(grids, dtype=np.int64)), attention_mask=torch.from_numpy(mask))
    hf_pos, hf_deltas = hf_pos.numpy(), hf_deltas.reshape(-1).numpy()
    valid = mask.astype(bool)
    if not ((hf_pos[:, valid] == pos[:, valid]).all() and (hf_deltas == deltas).all()):
        raise SystemExit("goldens: transformers' get_rope_index disagrees with the host algorithm")
    pos = np.where(valid[None], hf_pos, 0)
    logits, greedy = [], []
    all_ids, all_mask = ids.copy(), mask.copy()
    with torch.no_grad():
        for _ in range(6):
            mm = (torch.from_numpy(all_ids) == cfg.image_token_id).to(torch.int64)
            lg = model(input_ids=torch.from_numpy(all_ids), attention_mask=torch.from_numpy(all_mask),
                       pixel_values=torch.from_numpy(pv), image_grid_thw=torch.from_numpy(grid),
                       mm_token_type_ids=mm).logits
            last = f32(lg[:, -1])
            logits.append(last)
            nxt = last.argmax(-1)
            greedy.append(nxt.tolist())
            all_ids = np.concatenate([all_ids, nxt[:, None]], 1)
            all_mask = np.concatenate([all_mask, np.ones((2, 1), np.int64)], 1)
        # teacher-forced log-probs of the whole sequences (prompt + 6 greedy tokens), T = 1
        mm = (torch.from_numpy(all_ids) == cfg.image_token_id).to(torch.int64)
        lg = model(input_ids=torch.from_numpy(all_ids), attention_mask=torch.from_numpy(all_mask),
                   pixel_values=torch.from_numpy(pv), image_grid_thw=torch.from_numpy(grid), mm_token_type_ids=mm).logits
        lp = torch.log_softmax(lg.float(), -1)
        nxt_ids = torch.from_numpy(all_ids[:, 1:])
        tf = torch.gather(lp[:, :-1], -1, nxt_ids[..., None]).squeeze(-1).numpy()
    np.save(os.path.join(gd, "step_logits.npy"), np.stack(logits).astype(np.float32))
    np.save(os.path.join(gd, "teacher_forced_logprobs.npy"), tf.astype(np.float32))
    json.dump({"prompts": [p[0] for p in prompts], "images": images, "rendered": rows, "input_ids": ids.tolist(),
               "attention_mask": mask.tolist(), "image_grid_thw": grids, "position_ids": pos.tolist(),
               "rope_deltas": deltas.tolist(), "greedy_tokens": np.array(greedy).T.tolist(),
               "sequences": all_ids.tolist(), "step_logits": "step_logits.npy [6, B, V]: last position, prefill then 5 steps",
               "teacher_forced_logprobs": "teacher_forced_logprobs.npy [B, S-1]: log p(token t+1 | ≤ t), T = 1"},
              open(os.path.join(gd, "rollout.json"), "w"), indent=1)
    if step is None:
        print(f"  goldens: {gd} (greedy {np.array(greedy).T.tolist()}, rope deltas {deltas.tolist()})")
        return
    # one training step
    os.makedirs(os.path.join(gd, "train"), exist_ok=True)
    batch = train_batch(model)
    lora = random_lora(names, shapes_, 5)
    lora_in = [f"{n}.{m}" for n in names for m in ("A", "B")]
    res = step(*batch, *lora)
    for k, v in zip(TRAIN_BATCH + lora_in, list(batch) + lora):
        # (floating-point values as fp32: a half package's embeddings are exact in fp32)
        np.save(os.path.join(gd, "train", f"in.{k}.npy"), f32(v) if v.is_floating_point() else v.numpy())
    outs = ["loss", "token_logprobs"] + [f"grad.{n}" for n in lora_in] + ["stats"]
    for k, v in zip(outs, res):
        np.save(os.path.join(gd, "train", f"out.{k}.npy"), f32(v))
    # one SFT step, the same way
    os.makedirs(os.path.join(gd, "sft"), exist_ok=True)
    batch = sft_batch(model)
    res = sft_step_fn(model, names, json.load(open(f"{out}/manifest.json"))["lora"]["scale"])(*batch, *lora)
    for k, v in zip(SFT_BATCH + lora_in, list(batch) + lora):
        np.save(os.path.join(gd, "sft", f"in.{k}.npy"), f32(v) if v.is_floating_point() else v.numpy())
    for k, v in zip(["loss"] + [f"grad.{n}" for n in lora_in] + ["stats"], res):
        np.save(os.path.join(gd, "sft", f"out.{k}.npy"), f32(v))
    print(f"  goldens: {gd} (greedy {np.array(greedy).T.tolist()}, rope deltas {deltas.tolist()})")
