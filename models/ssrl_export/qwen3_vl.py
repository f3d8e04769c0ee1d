"""Qwen3-VL (transformers' Qwen3VLForConditionalGeneration): what differs from Qwen2.5-VL, each
matched to transformers — patch 16, the vision tower's learned position embeddings resampled
bilinearly to each image's grid, LayerNorm blocks without window attention, DeepStack (the
merged features of some vision blocks added to the first language layers' hidden states at the
image positions), Qwen3 text layers (per-head RMSNorm of queries and keys), interleaved M-RoPE
(inside the text model's rotary embedding) and the chat template without a default system turn.

The inference graphs (vision.onnx with a `deepstack_features` output, embedding.onnx,
decoder.onnx with `deepstack_features` / `visual_mask` inputs) share Qwen2.5-VL's wrappers; the
log-prob and training graphs take the DeepStack inputs too, and with vision-tower LoRA give the
loss's gradient at them for vision_grad.onnx (the tower's backward from both its outputs)."""
import json
import os
import shutil

import numpy as np
import torch
import torch.nn.functional as F
from transformers.vision_utils import _interpolation_axis_taps_weights

from . import settings
from .builders import (PREPROCESSOR, build_tiny_tokenizer, remap_special_tokens, save_random, save_tiny,
                       vision_token_ids)
from .lora import LORA_TARGETS, VISION_TARGETS_QWEN3, is_visual, lora_shapes, target_of
from .ops import _Recompute, layer_norm
from .onnx_io import Typed
from .qwen2_5_vl import Vision as Vision25
from .qwen2_5_vl import export_package, rope_index, training_contracts
from .settings import f32

# Qwen3-VL's chat template, reduced to what the runtime renders: no default system turn; images
# as <|vision_start|><|image_pad|><|vision_end|> in the user turn.
CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}"
    "{{ message['content'] }}<|im_end|>\n{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
PREPROCESSOR3 = dict(PREPROCESSOR, image_mean=[0.5, 0.5, 0.5], image_std=[0.5, 0.5, 0.5], patch_size=16,
                     min_pixels=65536, max_pixels=16777216, size={"shortest_edge": 65536, "longest_edge": 16777216})


def tiny_config(sp):
    from transformers import Qwen3VLConfig

    vocab = ((max(sp.values()) + 1 + 63) // 64) * 64
    text = dict(vocab_size=vocab, hidden_size=128, intermediate_size=256, num_hidden_layers=3, num_attention_heads=4,
                num_key_value_heads=2, head_dim=32, hidden_act="silu", max_position_embeddings=4096, rms_norm_eps=1e-6,
                rope_parameters={"rope_type": "default", "rope_theta": 5000000.0, "mrope_section": [6, 5, 5],
                                 "mrope_interleaved": True},
                bos_token_id=sp["<|endoftext|>"], eos_token_id=sp["<|im_end|>"], pad_token_id=sp["<|endoftext|>"])
    vision = dict(depth=3, hidden_size=64, intermediate_size=128, num_heads=2, hidden_act="gelu_pytorch_tanh",
                  in_channels=3, patch_size=16, temporal_patch_size=2, spatial_merge_size=2, out_hidden_size=128,
                  num_position_embeddings=64, deepstack_visual_indexes=[0, 1])
    cfg = Qwen3VLConfig(text_config=text, vision_config=vision, tie_word_embeddings=True, **vision_token_ids(sp))
    cfg.architectures = ["Qwen3VLForConditionalGeneration"]
    return cfg


def build_tiny(hf_dir, seed=0):
    """A random-weight Qwen3-VL with the real architecture and small sizes (weights std 0.08, so
    that logits are far from uniform and greedy comparisons mean something)."""
    from transformers import Qwen3VLForConditionalGeneration

    sp = build_tiny_tokenizer(hf_dir, chat_template=CHAT_TEMPLATE)
    torch.manual_seed(seed)
    save_tiny(Qwen3VLForConditionalGeneration(tiny_config(sp)).eval(), hf_dir, PREPROCESSOR3)


# The real geometries (Qwen/Qwen3-VL-4B-Instruct's config.json), for --random-init.
REAL = {
    "qwen3-vl-4b": (
        dict(vocab_size=151936, hidden_size=2560, intermediate_size=9728, num_hidden_layers=36, num_attention_heads=32,
             num_key_value_heads=8, head_dim=128),
        dict(depth=24, hidden_size=1024, intermediate_size=4096, num_heads=16, out_hidden_size=2560,
             num_position_embeddings=2304, deepstack_visual_indexes=[5, 11, 17]),
    ),
}


def build_random(name, hf_dir, text_layers=None, vision_depth=None, seed=0):
    """`name`'s real configuration with random weights (transformers' initialisation) and the
    tiny tokenizer standing in for Qwen's, its special tokens on Qwen's ids; `text_layers` /
    `vision_depth` cut the depth only (the DeepStack blocks those below the cut, or the last
    block; as many language layers as they feed at least)."""
    from transformers import Qwen3VLConfig, Qwen3VLForConditionalGeneration

    build_tiny_tokenizer(hf_dir, chat_template=CHAT_TEMPLATE)
    sp = remap_special_tokens(hf_dir)
    t, v = (dict(d) for d in REAL[name])
    t.update(hidden_act="silu", max_position_embeddings=262144, rms_norm_eps=1e-6, initializer_range=0.02,
             rope_parameters={"rope_type": "default", "rope_theta": 5000000.0, "mrope_section": [24, 20, 20],
                              "mrope_interleaved": True},
             bos_token_id=sp["<|endoftext|>"], eos_token_id=sp["<|im_end|>"], pad_token_id=sp["<|endoftext|>"])
    v.update(hidden_act="gelu_pytorch_tanh", in_channels=3, patch_size=16, temporal_patch_size=2, spatial_merge_size=2)
    if vision_depth:
        v["depth"] = vision_depth
        v["deepstack_visual_indexes"] = [i for i in v["deepstack_visual_indexes"] if i < vision_depth] or [vision_depth - 1]
    if text_layers:
        t["num_hidden_layers"] = max(text_layers, len(v["deepstack_visual_indexes"]))
    cfg = Qwen3VLConfig(text_config=t, vision_config=v, tie_word_embeddings=True, **vision_token_ids(sp))
    cfg.architectures = ["Qwen3VLForConditionalGeneration"]
    save_random(Qwen3VLForConditionalGeneration, cfg, hf_dir, seed, PREPROCESSOR3,
                f"{name}: {t['num_hidden_layers']} text layers, {v['depth']} vision blocks "
                f"(DeepStack {v['deepstack_visual_indexes']})")


class Vision(Vision25):
    """Qwen3-VL's vision tower on the processor's patch order: the patch embedding as a matrix
    product, the learned position table resampled to each image's grid (bilinear, corners
    aligned, as transformers' gather of 4 taps), full attention per frame, and the DeepStack
    mergers' outputs stacked as `deepstack_features` [K, N, D]. LoRA deltas
    (`lora.visual.{block}.{qkv|proj|linear_fc1|linear_fc2}`, the merger's
    `lora.visual.merger.{linear_fc1|linear_fc2}` and the DeepStack mergers'
    `lora.visual.deepstack_merger_list.{k}.{linear_fc1|linear_fc2}`) on the targets in
    `lora_names`, as graph inputs."""

    def __init__(self, model, lora_names=(), scale=1.0):
        torch.nn.Module.__init__(self)
        self.vis = model.model.visual
        c = self.vis.config
        self.m, self.heads = c.spatial_merge_size, c.num_heads
        self.win = 1  # (no window attention: layout's windows go unused)
        self.side = self.vis.num_grid_per_side
        self.ds = list(c.deepstack_visual_indexes)
        self.lora_names, self.scale = list(lora_names), scale

    def block(self, i, blk, x, cos, sin, frames, lora):
        x = x + self.attend(i, blk, layer_norm(blk.norm1, x), cos, sin, frames, lora)
        m, y, p = blk.mlp, layer_norm(blk.norm2, x), f"lora.visual.{i}."
        return x + self.lin(lora, p + "linear_fc2", m.linear_fc2,
                            m.act_fn(self.lin(lora, p + "linear_fc1", m.linear_fc1, y)))

    def merge_with(self, mg, key, x, lora):
        """A patch merger (the final one, or a DeepStack one) with the LoRA under `key`."""
        if not any(k.startswith(key) for k in lora) and x.dtype == torch.float32:
            return mg(x)
        x = layer_norm(mg.norm, x.view(-1, mg.hidden_size) if mg.use_postshuffle_norm else x).view(-1, mg.hidden_size)
        x = mg.act_fn(self.lin(lora, key + "linear_fc1", mg.linear_fc1, x))
        return self.lin(lora, key + "linear_fc2", mg.linear_fc2, x)

    def features(self, pixel_values, image_grid_thw, lora, recompute=False):
        """(merged image features, DeepStack features [K, N, D]); `recompute` (the vision
        gradient graph) runs each block through _Recompute, so the backward keeps one block's
        activations at a time."""
        proj = self.vis.patch_embed.proj
        x = F.linear(pixel_values.to(proj.weight.dtype), proj.weight.reshape(proj.out_channels, -1), proj.bias)
        P = x.shape[0]
        pos_hw, _, frames = self.layout(image_grid_thw, P)
        g = image_grid_thw.to(torch.int64)
        ends = torch.cumsum(g[:, 0] * g[:, 1] * g[:, 2], 0)
        img = (torch.arange(P)[:, None] >= ends[None, :]).to(torch.int64).sum(1)
        ht, hw = _interpolation_axis_taps_weights(pos_hw[:, 0], g[img, 1], self.side, "bilinear", True)
        wt, ww = _interpolation_axis_taps_weights(pos_hw[:, 1], g[img, 2], self.side, "bilinear", True)
        idx = (ht[:, :, None] * self.side + wt[:, None, :]).reshape(P, 4)
        wts = (hw[:, :, None] * ww[:, None, :]).reshape(P, 4)
        x = x + (self.vis.pos_embed(idx) * wts[:, :, None]).sum(1).to(x.dtype)
        cos, sin = self.vis.rotary_pos_emb(x, pos_hw)
        deep = []
        for i, blk in enumerate(self.vis.blocks):
            if not recompute:
                x = self.block(i, blk, x, cos, sin, frames, lora)
            else:
                names = sorted(k for k in lora if k.startswith(f"lora.visual.{i}."))
                flat = [t for k in names for t in lora[k]]

                def step(x, *ab, i=i, blk=blk, names=names):
                    lo = {k: (ab[2 * j], ab[2 * j + 1]) for j, k in enumerate(names)}
                    return self.block(i, blk, x, cos, sin, frames, lo)

                x = _Recompute.apply(step, x, *flat)
            if i in self.ds:
                k = self.ds.index(i)
                deep.append(self.merge_with(self.vis.deepstack_merger_list[k],
                                            f"lora.visual.deepstack_merger_list.{k}.", x, lora))
        return self.merge_with(self.vis.merger, "lora.visual.merger.", x, lora), torch.stack(deep)

    def forward(self, pixel_values, image_grid_thw, lora_tensors=()):
        lora = {n: (lora_tensors[2 * j], lora_tensors[2 * j + 1]) for j, n in enumerate(self.lora_names)}
        return self.features(pixel_values, image_grid_thw, lora)


def export(model, out, lora_rank, lora_alpha, lora_targets):
    """The inference graphs of a Qwen3-VL package; with vision targets, vision.onnx takes the
    tower's LoRA tensors as inputs."""
    bad = [t for t in lora_targets if t not in LORA_TARGETS + VISION_TARGETS_QWEN3]
    if bad:
        raise SystemExit(f"LoRA targets {bad}: not a Qwen3-VL linear layer (the vision tower's are "
                         f"{', '.join(VISION_TARGETS_QWEN3)})")
    vis = [n for n in lora_shapes(model, lora_targets, lora_rank) if is_visual(n)]
    extra = {"deepstack_features": {1: "num_logical_patches"}}
    return export_package(model, out, lora_rank, lora_alpha, lora_targets,
                          vision=(Vision(model, vis, lora_alpha / lora_rank), extra))


def write_package_files(model, hf_dir, out, lora_names, lora_shapes_, rank, alpha, dtype):
    cfg, tc, vc = model.config, model.config.text_config, model.config.vision_config
    for f in ("tokenizer.json", "tokenizer_config.json", "chat_template.json", "preprocessor_config.json",
              "generation_config.json"):
        if os.path.exists(os.path.join(hf_dir, f)):
            shutil.copy(os.path.join(hf_dir, f), os.path.join(out, f))
    cfg.save_pretrained(out)
    eos = tc.eos_token_id if isinstance(tc.eos_token_id, list) else [tc.eos_token_id]
    manifest = {
        "format": "spatial-ssrl-package", "version": 1, "family": "qwen3_vl", "dtype": dtype, "opset": settings.OPSET,
        "graphs": {"vision": "vision.onnx", "embedding": "embedding.onnx", "decoder": "decoder.onnx",
                   "logprobs": "logprobs.onnx", "train": "train.onnx", "sft": "sft.onnx",
                   **({"vision_grad": "vision_grad.onnx"} if any(map(is_visual, lora_names)) else {})},
        **training_contracts(),
        "text": {"hidden_size": tc.hidden_size, "num_hidden_layers": tc.num_hidden_layers,
                 "num_attention_heads": tc.num_attention_heads, "num_key_value_heads": tc.num_key_value_heads,
                 "head_dim": tc.head_dim, "vocab_size": tc.vocab_size,
                 "mrope_section": tc.rope_parameters["mrope_section"], "mrope_interleaved": True},
        "vision": {"out_hidden_size": vc.out_hidden_size, "spatial_merge_size": vc.spatial_merge_size,
                   "patch_size": vc.patch_size, "temporal_patch_size": vc.temporal_patch_size,
                   "tokens_per_second": 2, "window_size": 0,
                   "deepstack_layers": len(vc.deepstack_visual_indexes)},
        "tokens": {"image": cfg.image_token_id, "video": cfg.video_token_id,
                   "vision_start": cfg.vision_start_token_id, "vision_end": cfg.vision_end_token_id,
                   "eos": eos, "pad": tc.pad_token_id},
        "lora": {"rank": rank, "alpha": alpha, "scale": alpha / rank,
                 "targets": [t for t in LORA_TARGETS + VISION_TARGETS_QWEN3 if t in set(map(target_of, lora_names))],
                 "tensors": [{"name": n, "A": list(lora_shapes_[n][0]), "B": list(lora_shapes_[n][1])}
                             for n in lora_names]},
        "kv_layout": "shared",
        "own_cache": "in_place",
    }
    json.dump(manifest, open(f"{out}/manifest.json", "w"), indent=2)


def processor(hf_dir):
    """transformers' image processor with the checkpoint's settings (patch 16, mean and std 0.5)."""
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    pre = json.load(open(os.path.join(hf_dir, "preprocessor_config.json")))
    return Qwen2VLImageProcessorPil(patch_size=pre["patch_size"], merge_size=pre["merge_size"],
                                    image_mean=pre["image_mean"], image_std=pre["image_std"], size=pre["size"])


def verify(model, hf_dir, out, lora_names, lora_shapes_, tol=1e-4):
    """vision.onnx (features and DeepStack features) against transformers' vision tower on
    several image sizes; then prefill and 5 greedy decode steps of a left-padded batch of two
    prompts with images against transformers' whole model, token for token."""
    from tokenizers import Tokenizer

    from .verify import follow_greedy, past0_of, synthetic_image

    import onnxruntime as ort
    so = ort.SessionOptions()
    so.intra_op_num_threads = 2
    sess = {g: Typed(f"{out}/{g}.onnx", so) for g in ("vision", "embedding", "decoder")}
    proc = processor(hf_dir)
    cfg, tc = model.config, model.config.text_config
    worst = {}

    def note(k, v):
        worst[k] = max(worst.get(k, 0.0), float(v))

    for sizes in ([(256, 192)], [(160, 352)], [(96, 288), (256, 192)]):
        pi = proc(images=[synthetic_image(w, h, i) for i, (w, h) in enumerate(sizes)], return_tensors="np")
        pv, grid = pi["pixel_values"].astype(np.float32), pi["image_grid_thw"].astype(np.int64)
        got, deep = sess["vision"].run(None, {"pixel_values": pv, "image_grid_thw": grid})
        with torch.no_grad():
            o = model.model.visual(torch.from_numpy(pv), grid_thw=torch.from_numpy(grid))
        note("vision", np.abs(got - f32(o.pooler_output)).max())
        note("deepstack", max(np.abs(deep[k] - f32(f)).max() for k, f in enumerate(o.deepstack_features)))
    tok = Tokenizer.from_file(os.path.join(hf_dir, "tokenizer.json"))
    image_id, merge = cfg.image_token_id, cfg.vision_config.spatial_merge_size
    seqs, grids, pvs = [], [], []
    for k, (text, sizes) in enumerate([("Which patch is flipped?", [(256, 192)]),
                                       ("Sort the regions by depth.", [(96, 288), (160, 128)])]):
        pi = proc(images=[synthetic_image(w, h, 7 + k + i) for i, (w, h) in enumerate(sizes)], return_tensors="np")
        g = pi["image_grid_thw"].tolist()
        body = "".join("<|vision_start|>" + "<|image_pad|>" * (t * h * w // 4) + "<|vision_end|>" for t, h, w in g)
        seqs.append(tok.encode(f"<|im_start|>user\n{body}{text}<|im_end|>\n<|im_start|>assistant\n",
                               add_special_tokens=False).ids)
        grids += g
        pvs.append(pi["pixel_values"].astype(np.float32))
    S = max(map(len, seqs))
    ids = np.array([[tc.pad_token_id] * (S - len(s)) + s for s in seqs], dtype=np.int64)
    mask = np.array([[0] * (S - len(s)) + [1] * len(s) for s in seqs], dtype=np.int64)
    pv, grid = np.concatenate(pvs), np.array(grids, dtype=np.int64)
    pos, deltas = rope_index(ids, mask, grids, image_id, merge)
    with torch.no_grad():
        mm = torch.from_numpy((ids == image_id).astype(np.int32))
        hf_pos, hf_deltas = model.model.get_rope_index(torch.from_numpy(ids), mm, image_grid_thw=torch.from_numpy(grid),
                                                       attention_mask=torch.from_numpy(mask))
    if not (hf_pos.numpy()[:, mask.astype(bool)] == pos[:, mask.astype(bool)]).all():
        raise SystemExit("verify: transformers' Qwen3-VL get_rope_index differs from the host algorithm")
    feats, deep = sess["vision"].run(None, {"pixel_values": pv, "image_grid_thw": grid})
    L, kvh, hd = tc.num_hidden_layers, tc.num_key_value_heads, tc.head_dim
    zeros = {}
    for n in lora_names:
        a, b = lora_shapes_[n]
        zeros[f"{n}.A"], zeros[f"{n}.B"] = np.zeros(a, np.float32), np.zeros(b, np.float32)
    past = past0_of(2, kvh, hd, L)
    cur_ids, cur_pos, cur_feats, cur_deep = ids, pos, feats, deep
    all_ids, all_mask = ids.copy(), mask.copy()
    greedy = []
    for step in range(6):
        emb = sess["embedding"].run(None, {"input_ids": cur_ids, "image_features": cur_feats})[0]
        outs = sess["decoder"].run(None, {"inputs_embeds": emb, "attention_mask": all_mask, "position_ids": cur_pos,
                                          "deepstack_features": cur_deep,
                                          "visual_mask": (cur_ids == image_id).astype(np.int64), **past, **zeros})
        logits = outs[0][:, -1]
        if step == 0:
            # (DeepStack matters: without its features the prefill's logits move)
            plain = sess["decoder"].run(None, {"inputs_embeds": emb, "attention_mask": all_mask,
                                               "position_ids": cur_pos, "deepstack_features": 0 * cur_deep,
                                               "visual_mask": (cur_ids == image_id).astype(np.int64),
                                               **past, **zeros})[0][:, -1]
            moved = np.abs(plain - logits).max()
        with torch.no_grad():
            mm = torch.from_numpy((all_ids == image_id).astype(np.int64))
            ref = f32(model(input_ids=torch.from_numpy(all_ids), attention_mask=torch.from_numpy(all_mask),
                            pixel_values=torch.from_numpy(pv), image_grid_thw=torch.from_numpy(grid),
                            mm_token_type_ids=mm).logits[:, -1])
        note("logits" if step == 0 else "decode logits", np.abs(logits - ref).max())
        nxt = follow_greedy(logits, ref, step)
        greedy.append(nxt.tolist())
        past = {f"past_key_values.{i}.{kv}": v for (i, kv), v in
                zip([(i, kv) for i in range(L) for kv in ("key", "value")], outs[1:])}
        cur_ids = nxt[:, None].astype(np.int64)
        cur_feats = np.zeros((0, feats.shape[1]), np.float32)
        cur_deep = np.zeros((deep.shape[0], 0, deep.shape[2]), np.float32)
        cur_pos = np.broadcast_to((all_mask.sum(1) + deltas)[None, :, None], (3, 2, 1)).astype(np.int64).copy()
        all_ids = np.concatenate([all_ids, cur_ids], 1)
        all_mask = np.concatenate([all_mask, np.ones((2, 1), np.int64)], 1)
    print("  Qwen3-VL against transformers: " + ", ".join(f"{k} {v:.1e}" for k, v in worst.items())
          + f"; greedy tokens identical {np.array(greedy).T.tolist()}; DeepStack moves the prefill's logits by "
          f"{moved:.2f}", flush=True)
    if moved < 1e-2:
        raise SystemExit("verify: the decoder's DeepStack inputs change nothing")
    if max(worst.values()) > tol:
        raise SystemExit("verify: a Qwen3-VL graph differs from transformers")


def verify_training(model, hf_dir, out, names, shapes_):
    """The training graphs with DeepStack: a GRPO micro-batch of two rows with an image each
    through vision.onnx → embedding.onnx → train.onnx (with the vision graph's DeepStack
    features at the image positions) against autograd through transformers' whole model from the
    pixels, with a random adapter on every target; logprobs.onnx against that forward's
    log-probs; sft.onnx's gradients against train.onnx's where the two losses agree (one
    row-token, advantage −1, no clipping or KL: the policy loss is the log-prob's negative)."""
    import onnxruntime as ort

    from .contracts import TRAIN_BATCH
    from .lora import random_lora
    from .verify import vision_batch, vision_chain_reference

    so = ort.SessionOptions()
    so.intra_op_num_threads = 2
    sess = {g: Typed(f"{out}/{g}.onnx", so) for g in ("vision", "embedding", "train", "logprobs")}
    scale = json.load(open(f"{out}/manifest.json"))["lora"]["scale"]
    lora = random_lora(names, shapes_, 5)
    lin = [f"{n}.{m}" for n in names for m in ("A", "B")]
    vb = vision_batch(model, proc=processor(hf_dir), vision=Vision)
    loss_ref, grads_ref = vision_chain_reference(model, vb, names, lora, scale)
    P, C = vb["P"], vb["C"]
    ids = vb["ids"][:, :P + C - 1].numpy()
    feats, deep = sess["vision"].run(None, {"pixel_values": f32(vb["pv"]), "image_grid_thw": vb["grid"].numpy()})
    emb = sess["embedding"].run(None, {"input_ids": ids, "image_features": feats})[0]
    feeds = {k: f32(v) if v.is_floating_point() else v.numpy() for k, v in zip(TRAIN_BATCH, vb["batch"])}
    feeds.update({"inputs_embeds": emb, "deepstack_features": deep,
                  "visual_mask": (ids == model.config.image_token_id).astype(np.int64)})
    feeds.update({k: f32(v) for k, v in zip(lin, lora)})
    outs = ["loss"] + [f"grad.{k}" for k in lin]
    got = sess["train"].run(outs, feeds)
    dl = abs(float(got[0]) - float(loss_ref))
    rel = max(np.abs(g - f32(r)).max() / (float(r.abs().max()) + 1e-12) for g, r in zip(got[1:], grads_ref))
    # logprobs.onnx against the same forward's log-probs of the completion
    lp_feeds = {k: feeds[k] for k in ("inputs_embeds", "attention_mask", "position_ids", "target_ids", "temperature",
                                      "deepstack_features", "visual_mask")}
    lp_feeds.update({k: f32(v) for k, v in zip(lin, lora)})
    lp = sess["logprobs"].run(["token_logprobs"], lp_feeds)[0]
    from .lora import lora_hooks
    hooks = lora_hooks(model, names, lora, scale)
    try:
        with torch.no_grad():
            mm = (vb["ids"] == model.config.image_token_id).to(torch.int64)
            o = model(input_ids=vb["ids"], attention_mask=vb["mask"], pixel_values=vb["pv"],
                      image_grid_thw=vb["grid"], mm_token_type_ids=mm, use_cache=False)
    finally:
        for h in hooks:
            h.remove()
    ref_lp = torch.gather(torch.log_softmax(o.logits[:, P - 1:P - 1 + C].float(), -1), -1,
                          vb["batch"][3][..., None]).squeeze(-1)
    dlp = np.abs(lp - f32(ref_lp)).max()
    print(f"  Qwen3-VL train.onnx with DeepStack vs autograd from the pixels: loss {dl:.1e}, grads rel {rel:.1e}; "
          f"logprobs.onnx {dlp:.1e}", flush=True)
    # (half-precision graphs against transformers in the same precision: the dtype's tolerances)
    t = settings.TOL[settings.DTYPE]
    lim = (1e-4, 1e-4, 1e-4) if settings.DTYPE == "fp32" else (t["loss"], t["grads"], t["logprobs"])
    if dl > lim[0] or rel > lim[1] or dlp > lim[2]:
        raise SystemExit(f"verify: a Qwen3-VL training graph differs from transformers (limits {lim})")