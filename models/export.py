#!/usr/bin/env python3
"""spatial-ssrl model exporter: a Hugging Face Qwen2.5-VL checkpoint → an ONNX model package.

    python models/export.py HF_DIR --out PACKAGE [--verify]
    python models/export.py --tiny --out models/tiny [--verify]
    python models/export.py --random-init qwen2.5-vl-3b [--text-layers N] [--vision-depth N] --out PACKAGE

The package holds
  vision.onnx     pixel_values [P, 1176], image_grid_thw [N, 3] → image_features [P/4, D]
  embedding.onnx  input_ids [B, S], image_features [M, D] → inputs_embeds [B, S, D]
  decoder.onnx    inputs_embeds, attention_mask [B, T], position_ids [3, B, S],
                  past_key_values.{i}.key/value, lora.{i}.{target}.A/B,
                  optional shared prompt cache: prefix_key_values.{i}.key/value [Bp, kv_heads, P, d],
                  prefix_mask [Bp, P], slot_rows [Bp·Gs], row_slots [B],
                  optional rows' own cache in place: own_key_values.{i}.key/value [B, kv_heads, C, d],
                  own_mask [B, C]
                  → logits [B, 1, V] (the last position: all a generation step needs; a
                    prefill of B × S tokens would otherwise return B·S·V floats), present.{i}.key/value
                  A prompt's G samples read its cache in place (one [G·heads, d] × [d, P] product
                  per prompt and KV head); past/present hold only each sample's own tokens, so a
                  decode step copies no prompt cache. With own_key_values (a buffer of C slots
                  for the row's older tokens, own_mask marking the written ones) present is only
                  past (kept short) and the new keys and values, which the runtime moves into its
                  buffer now and then: no step copies a row's whole own cache either. Without
                  these inputs it is a plain past/present decoder (onnxruntime-genai runs it so).
  logprobs.onnx   inputs_embeds, attention_mask, position_ids, target_ids [B, S], temperature [], lora.*
                  → token_logprobs [B, S], token_entropy [B, S]
  train.onnx      the GRPO step as one joint forward+backward graph (EasyR1's loss, see grpo_loss):
                  batch, completion_mask, old/ref log-probs, advantages [B], loss settings,
                  token_count, lora.* → loss, token_logprobs, grad.lora.*, stats [6]
  genai_config.json (onnxruntime-genai's layout), manifest.json (graphs, I/O, LoRA layout),
  config.json, preprocessor_config.json, tokenizer.json, tokenizer_config.json, chat_template.json.

Window attention in the vision graph gathers each window into a padded [windows, 64, C] batch
(sized at run time from image_grid_thw), so window blocks cost O(P·64) as in the model; only the
full-attention blocks are quadratic, per frame, as in the model.

LoRA matrices are graph inputs (zero B gives the base model): new adapter weights need no
session rebuild. Requirements: models/requirements.txt (torch is needed here only).
"""
import argparse
import json
import math
import os
import shutil
import sys
import time

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

HERE = os.path.dirname(os.path.abspath(__file__))
OPSET = 18

# ----------------------------------------------------------------------------------------------
# Tokenizer of the tiny package: a small byte-level BPE with Qwen's pipeline, added tokens and
# chat template.
# ----------------------------------------------------------------------------------------------

QWEN_PAT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
QWEN25VL_ADDED = [
    ("<|endoftext|>", True), ("<|im_start|>", True), ("<|im_end|>", True),
    ("<|object_ref_start|>", True), ("<|object_ref_end|>", True), ("<|box_start|>", True), ("<|box_end|>", True),
    ("<|quad_start|>", True), ("<|quad_end|>", True), ("<|vision_start|>", True), ("<|vision_end|>", True),
    ("<|vision_pad|>", True), ("<|image_pad|>", True), ("<|video_pad|>", True),
    ("<tool_call>", False), ("</tool_call>", False), ("<|fim_prefix|>", False), ("<|fim_middle|>", False),
    ("<|fim_suffix|>", False), ("<|fim_pad|>", False), ("<|repo_name|>", False), ("<|file_sep|>", False),
]
CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}"
    "{{ message['content'] }}<|im_end|>\n{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}"
    "{% if add_vision_id %}Picture {{ image_count.value }}: {% endif %}"
    "<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}"
    "{% set video_count.value = video_count.value + 1 %}"
    "{% if add_vision_id %}Video {{ video_count.value }}: {% endif %}"
    "<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
# Text the tiny BPE is trained on: committed with the exporter so the vocabulary is reproducible.
TINY_CORPUS = [os.path.join(HERE, "tiny_corpus.txt")]


def build_tiny_tokenizer(out_dir, vocab_size=2000):
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE(unk_token=None, fuse_unk=False, byte_fallback=False))
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN_PAT), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)
    tok.post_processor = processors.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=2, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), special_tokens=[])
    tok.train(TINY_CORPUS, trainer)
    for content, special in QWEN25VL_ADDED:  # appended after the BPE vocabulary, in Qwen's order
        at = AddedToken(content, single_word=False, lstrip=False, rstrip=False, normalized=False, special=special)
        (tok.add_special_tokens if special else tok.add_tokens)([at])
    os.makedirs(out_dir, exist_ok=True)
    tok.save(os.path.join(out_dir, "tokenizer.json"))
    added = {str(tok.token_to_id(c)): {"content": c, "lstrip": False, "normalized": False, "rstrip": False,
                                       "single_word": False, "special": s} for c, s in QWEN25VL_ADDED}
    json.dump({"add_bos_token": False, "add_prefix_space": False, "added_tokens_decoder": added,
               "additional_special_tokens": [c for c, _ in QWEN25VL_ADDED[1:14]], "bos_token": None,
               "clean_up_tokenization_spaces": False, "eos_token": "<|im_end|>", "errors": "replace",
               "model_max_length": 32768, "pad_token": "<|endoftext|>", "split_special_tokens": False,
               "tokenizer_class": "Qwen2Tokenizer", "unk_token": None, "chat_template": CHAT_TEMPLATE},
              open(os.path.join(out_dir, "tokenizer_config.json"), "w"), indent=2)
    json.dump({"chat_template": CHAT_TEMPLATE}, open(os.path.join(out_dir, "chat_template.json"), "w"), indent=2)
    return {c: tok.token_to_id(c) for c, _ in QWEN25VL_ADDED}


def tiny_config(sp):
    from transformers import Qwen2_5_VLConfig

    vocab = ((max(sp.values()) + 1 + 63) // 64) * 64  # padded like the real vocabulary
    text = dict(vocab_size=vocab, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, hidden_act="silu", max_position_embeddings=4096,
                rms_norm_eps=1e-6, use_sliding_window=False,
                rope_parameters={"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": [4, 6, 6]},
                bos_token_id=sp["<|endoftext|>"], eos_token_id=sp["<|im_end|>"], pad_token_id=sp["<|endoftext|>"])
    vision = dict(depth=2, hidden_size=64, intermediate_size=128, num_heads=2, hidden_act="silu", in_channels=3,
                  patch_size=14, temporal_patch_size=2, spatial_merge_size=2, window_size=112,
                  out_hidden_size=128, fullatt_block_indexes=[1], tokens_per_second=2)
    cfg = Qwen2_5_VLConfig(text_config=text, vision_config=vision, image_token_id=sp["<|image_pad|>"],
                           video_token_id=sp["<|video_pad|>"], vision_start_token_id=sp["<|vision_start|>"],
                           vision_end_token_id=sp["<|vision_end|>"], tie_word_embeddings=True)
    cfg.architectures = ["Qwen2_5_VLForConditionalGeneration"]
    return cfg


PREPROCESSOR = {"do_convert_rgb": True, "do_normalize": True, "do_rescale": True, "do_resize": True,
                "image_mean": [0.48145466, 0.4578275, 0.40821073], "image_std": [0.26862954, 0.26130258, 0.27577711],
                "image_processor_type": "Qwen2VLImageProcessor", "max_pixels": 12845056, "merge_size": 2,
                "min_pixels": 3136, "patch_size": 14, "resample": 3, "rescale_factor": 0.00392156862745098,
                "size": {"longest_edge": 12845056, "shortest_edge": 3136}, "temporal_patch_size": 2}


def build_tiny(hf_dir, seed=0):
    """A random-weight Qwen2.5-VL with the real architecture and small sizes (weights std 0.08,
    so logits are far from uniform and greedy comparisons mean something)."""
    from transformers import Qwen2_5_VLForConditionalGeneration

    sp = build_tiny_tokenizer(hf_dir)
    torch.manual_seed(seed)
    model = Qwen2_5_VLForConditionalGeneration(tiny_config(sp)).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.normal_(0.0, 0.08)
    model.save_pretrained(hf_dir)
    json.dump(PREPROCESSOR, open(os.path.join(hf_dir, "preprocessor_config.json"), "w"), indent=2)


# ----------------------------------------------------------------------------------------------
# Real-geometry packages with random weights: the released models' configurations (sizes,
# vocabulary, rope, window layout), optionally cut in depth, for benchmarks and GPU checks where
# no checkpoint can be downloaded.
# ----------------------------------------------------------------------------------------------

QWEN_SPECIAL_BASE = 151643  # Qwen2.5's added tokens, in QWEN25VL_ADDED's order, from this id on
REAL_TEXT = {
    "qwen2.5-vl-3b": dict(vocab_size=151936, hidden_size=2048, intermediate_size=11008, num_hidden_layers=36,
                          num_attention_heads=16, num_key_value_heads=2, tie_word_embeddings=True),
    "qwen2.5-vl-7b": dict(vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                          num_attention_heads=28, num_key_value_heads=4, tie_word_embeddings=False),
}
REAL_VISION = dict(depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16, hidden_act="silu",
                   in_channels=3, patch_size=14, temporal_patch_size=2, spatial_merge_size=2, window_size=112,
                   fullatt_block_indexes=[7, 15, 23, 31], tokens_per_second=2)


def remap_special_tokens(hf_dir):
    """The tiny tokenizer's added tokens moved onto Qwen2.5's ids (151643 …), so that a package
    with the real vocabulary has its special tokens where the real model has them."""
    ids = {c: QWEN_SPECIAL_BASE + i for i, (c, _) in enumerate(QWEN25VL_ADDED)}
    tp = os.path.join(hf_dir, "tokenizer.json")
    tok = json.load(open(tp))
    # An added token keeps its id only where the model's vocabulary has it at that id.
    for t in tok["added_tokens"]:
        t["id"] = ids[t["content"]]
        tok["model"]["vocab"][t["content"]] = t["id"]
    json.dump(tok, open(tp, "w"), ensure_ascii=False)
    cp = os.path.join(hf_dir, "tokenizer_config.json")
    tc = json.load(open(cp))
    tc["added_tokens_decoder"] = {str(ids[v["content"]]): v for v in tc["added_tokens_decoder"].values()}
    json.dump(tc, open(cp, "w"), indent=2)
    return ids


def build_random(name, hf_dir, text_layers=None, vision_depth=None, seed=0):
    """`name`'s real configuration with random weights (transformers' own initialisation) and the
    tiny tokenizer standing in for Qwen's; `text_layers` / `vision_depth` cut the depth only (the
    vision tower keeps a full-attention block every 8, its last block always one)."""
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    build_tiny_tokenizer(hf_dir)
    sp = remap_special_tokens(hf_dir)
    text = dict(REAL_TEXT[name], hidden_act="silu", max_position_embeddings=128000, rms_norm_eps=1e-6,
                use_sliding_window=False, initializer_range=0.02,
                rope_parameters={"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": [16, 24, 24]},
                bos_token_id=sp["<|endoftext|>"], eos_token_id=sp["<|im_end|>"], pad_token_id=sp["<|endoftext|>"])
    tie = text.pop("tie_word_embeddings")
    if text_layers:
        text["num_hidden_layers"] = text_layers
    vision = dict(REAL_VISION, out_hidden_size=text["hidden_size"])
    if vision_depth:
        vision["depth"] = vision_depth
        vision["fullatt_block_indexes"] = sorted({i for i in range(7, vision_depth, 8)} | {vision_depth - 1})
    cfg = Qwen2_5_VLConfig(text_config=text, vision_config=vision, image_token_id=sp["<|image_pad|>"],
                           video_token_id=sp["<|video_pad|>"], vision_start_token_id=sp["<|vision_start|>"],
                           vision_end_token_id=sp["<|vision_end|>"], tie_word_embeddings=tie)
    cfg.architectures = ["Qwen2_5_VLForConditionalGeneration"]
    torch.manual_seed(seed)
    t0 = time.time()
    model = Qwen2_5_VLForConditionalGeneration(cfg).eval()
    n = sum(p.numel() for p in model.parameters())
    print(f"  {name}: {text['num_hidden_layers']} text layers, {vision['depth']} vision blocks, "
          f"{n / 1e6:.1f} M parameters ({n * 4 / 1e9:.2f} GB fp32), built in {time.time() - t0:.1f} s", flush=True)
    model.save_pretrained(hf_dir)
    json.dump(PREPROCESSOR, open(os.path.join(hf_dir, "preprocessor_config.json"), "w"), indent=2)


# ----------------------------------------------------------------------------------------------
# Loading: transformers 5.x config.json (text_config.rope_parameters) and the 4.x flat layout
# (rope_scaling {"type": "mrope", "mrope_section": …}) both load.
# ----------------------------------------------------------------------------------------------

def normalise_config_dict(d):
    d = json.loads(json.dumps(d))
    if "text_config" not in d:  # 4.x: text fields at the top level
        keys = ["vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads", "hidden_act", "max_position_embeddings", "rms_norm_eps", "rope_theta",
                "rope_scaling", "use_sliding_window", "sliding_window", "max_window_layers", "attention_dropout",
                "bos_token_id", "eos_token_id", "pad_token_id", "tie_word_embeddings", "initializer_range"]
        d["text_config"] = {k: d[k] for k in keys if k in d}
    tc = d["text_config"]
    rs = tc.pop("rope_scaling", None) or d.pop("rope_scaling", None)
    if "rope_parameters" not in tc:
        section = (rs or {}).get("mrope_section", [16, 24, 24])
        tc["rope_parameters"] = {"rope_type": "default", "rope_theta": tc.pop("rope_theta", d.get("rope_theta", 1e6)),
                                 "mrope_section": section}
    return d


def load_model(hf_dir):
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    raw = json.load(open(os.path.join(hf_dir, "config.json")))
    cfg = Qwen2_5_VLConfig(**normalise_config_dict(raw))
    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(hf_dir, config=cfg, dtype=torch_dtype(),
                                                               attn_implementation="eager")
    return model.eval()


# ----------------------------------------------------------------------------------------------
# Export wrappers
# ----------------------------------------------------------------------------------------------

from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import (  # noqa: E402
    apply_rotary_pos_emb, apply_rotary_pos_emb_vision)


class Vision(nn.Module):
    """Patches in the processor's order throughout (attention is order-free within a window or a
    frame, and the merger groups the 4 consecutive patches of a merge block), so no window
    permutation is needed: window and frame attention scatter the patches into padded blocks.
    LoRA deltas (`lora.visual.{block}.{qkv|proj|gate_proj|up_proj|down_proj}`,
    `lora.visual.merger.{mlp_0|mlp_2}`) on the targets in `lora_names`, as graph inputs."""

    def __init__(self, model, lora_names=(), scale=1.0):
        super().__init__()
        self.vis = model.model.visual
        c = self.vis.config
        self.m = c.spatial_merge_size
        self.win = c.window_size // c.spatial_merge_size // c.patch_size
        self.full = set(c.fullatt_block_indexes)
        self.heads = c.num_heads
        self.lora_names, self.scale = list(lora_names), scale

    def layout(self, grid, P):
        g = grid.to(torch.int64)
        t, h, w = g[:, 0], g[:, 1], g[:, 2]
        counts = t * h * w
        ends = torch.cumsum(counts, 0)
        p = torch.arange(P, dtype=torch.int64)
        img = (p[:, None] >= ends[None, :]).to(torch.int64).sum(1)
        local = p - (ends - counts)[img]
        hh, ww = h[img], w[img]
        frame, r = local // (hh * ww), local % (hh * ww)
        m, mm, W = self.m, self.m * self.m, self.win
        blk, within = r // mm, r % mm
        wm = ww // m
        bh, bw = blk // wm, blk % wm
        pos_hw = torch.stack([bh * m + within // m, bw * m + within % m], -1)
        # windows of W×W merged units, numbered per image, frame, row, column
        nwh_i, nww_i = (h // m + W - 1) // W, (w // m + W - 1) // W
        wins = t * nwh_i * nww_i
        nww = nww_i[img]
        wcol = bw // W
        wid = (torch.cumsum(wins, 0) - wins)[img] + frame * (nwh_i[img] * nww) + (bh // W) * nww + wcol
        width = torch.clamp(wm - wcol * W, max=W)
        L = W * W * mm
        win_slot = wid * L + ((bh % W) * width + bw % W) * mm + within
        n_win = wins.sum().item()
        torch._check(n_win >= 1)
        torch._check(n_win <= P)
        # frames (full attention): one block per frame of each image
        gframe = (torch.cumsum(t, 0) - t)[img] + frame
        lf = (h * w).max().item()
        n_frames = t.sum().item()
        torch._check(lf >= 1)
        torch._check(lf <= P)
        torch._check(n_frames >= 1)
        torch._check(n_frames <= P)
        return pos_hw, (win_slot, n_win, L), (gframe * lf + r, n_frames, lf)

    def lin(self, lora, key, mod, x):
        y = mod(x)
        ab = lora.get(key)
        return y if ab is None else lora_add(y, x, ab[0], ab[1], self.scale)

    def attend(self, i, blk, x, cos, sin, blocks, lora):
        slot, n, L = blocks
        P, C = x.shape
        a, H = blk.attn, self.heads
        d = C // H
        q, k, v = self.lin(lora, f"lora.visual.{i}.qkv", a.qkv, x).reshape(P, 3, H, d).permute(1, 0, 2, 3).unbind(0)
        q, k = apply_rotary_pos_emb_vision(q, k, cos, sin)

        def pad(z):
            return z.new_zeros(n * L, H, d).index_put((slot,), z).reshape(n, L, H, d).transpose(1, 2)

        valid = torch.zeros(n * L, dtype=torch.bool).index_put((slot,), torch.ones(P, dtype=torch.bool))
        bias = torch.where(valid, 0.0, torch.finfo(torch.float32).min).reshape(n, 1, 1, L)
        att = torch.matmul(pad(q), pad(k).transpose(2, 3)) * a.scaling + bias
        att = torch.softmax(att.float(), dim=-1).to(q.dtype)
        o = torch.matmul(att, pad(v)).transpose(1, 2).reshape(n * L, C)[slot]
        return self.lin(lora, f"lora.visual.{i}.proj", a.proj, o)

    def block(self, i, blk, x, cos, sin, blocks, lora):
        x = x + self.attend(i, blk, rms_norm(blk.norm1, x), cos, sin, blocks, lora)
        m, y = blk.mlp, rms_norm(blk.norm2, x)
        p = f"lora.visual.{i}."
        if not any(k.startswith(p) and not k.endswith(("qkv", ".proj")) for k in lora):
            return x + m(y)
        g = m.act_fn(self.lin(lora, p + "gate_proj", m.gate_proj, y)) * self.lin(lora, p + "up_proj", m.up_proj, y)
        return x + self.lin(lora, p + "down_proj", m.down_proj, g)

    def merge(self, x, lora):
        mg = self.vis.merger
        if not any(k.startswith("lora.visual.merger.") for k in lora):
            return mg(x)
        x = mg.ln_q(x).view(-1, mg.hidden_size)
        x = mg.mlp[1](self.lin(lora, "lora.visual.merger.mlp_0", mg.mlp[0], x))
        return self.lin(lora, "lora.visual.merger.mlp_2", mg.mlp[2], x)

    def features(self, pixel_values, image_grid_thw, lora, recompute=False):
        """The merged image features; `recompute` (the vision gradient graph) runs each block
        through _Recompute, so the backward keeps one block's activations at a time."""
        # The patch embedding is a Conv3d whose kernel equals its stride over exactly one patch
        # per row, i.e. a matrix product: exported as one (ONNX Runtime's 3-D convolution on the
        # CPU took 45 % of the vision graph).
        proj = self.vis.patch_embed.proj
        x = F.linear(pixel_values.to(proj.weight.dtype), proj.weight.reshape(proj.out_channels, -1), proj.bias)
        pos_hw, windows, frames = self.layout(image_grid_thw, x.shape[0])
        cos, sin = self.vis.rotary_pos_emb(x, pos_hw)
        for i, blk in enumerate(self.vis.blocks):
            blocks = frames if i in self.full else windows
            if not recompute:
                x = self.block(i, blk, x, cos, sin, blocks, lora)
                continue
            names = sorted(k for k in lora if k.startswith(f"lora.visual.{i}."))
            flat = [t for k in names for t in lora[k]]

            def step(x, *ab, i=i, blk=blk, blocks=blocks, names=names):
                lo = {k: (ab[2 * j], ab[2 * j + 1]) for j, k in enumerate(names)}
                return self.block(i, blk, x, cos, sin, blocks, lo)

            x = _Recompute.apply(step, x, *flat)
        return self.merge(x, lora)

    def forward(self, pixel_values, image_grid_thw, lora_tensors=()):
        lora = {n: (lora_tensors[2 * j], lora_tensors[2 * j + 1]) for j, n in enumerate(self.lora_names)}
        return self.features(pixel_values, image_grid_thw, lora)


class Embedding(nn.Module):
    """Token lookup, and the vision features scattered into the image / video placeholders
    (image_features may have 0 rows while decoding). A placeholder with no feature behind it (a
    sampled one, say) keeps its token embedding instead of indexing past the features."""

    def __init__(self, model):
        super().__init__()
        self.embed = model.model.language_model.embed_tokens
        self.ids = (model.config.image_token_id, model.config.video_token_id)

    def forward(self, input_ids, image_features):
        emb = self.embed(input_ids)
        B, S, D = emb.shape
        is_img = (input_ids == self.ids[0]) | (input_ids == self.ids[1])
        flat = is_img.reshape(-1).to(torch.int64)
        pos = torch.cumsum(flat, 0) * flat
        has = (pos >= 1) & (pos <= image_features.shape[0])
        idx = torch.where(has, pos, torch.zeros_like(pos))
        feats = torch.cat([torch.zeros(1, D, dtype=emb.dtype), image_features.to(emb.dtype)], 0)
        return torch.where(has.reshape(B, S)[..., None], feats[idx].reshape(B, S, D), emb)


LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
# The vision tower's linear layers (each block's attention qkv and proj, its MLP) and the
# merger's two (`--lora-targets vision`: all of them).
VISION_TARGETS = ("visual.qkv", "visual.proj", "visual.gate_proj", "visual.up_proj", "visual.down_proj",
                  "visual.merger")


def is_visual(name):
    return name.startswith("lora.visual.")


def target_of(name):
    """The `--lora-targets` entry a LoRA tensor name belongs to."""
    parts = name.split(".")
    if not is_visual(name):
        return parts[2]
    return "visual.merger" if parts[2] == "merger" else f"visual.{parts[3]}"


def lora_shapes(model, targets, rank):
    """{name: (A shape, B shape)} in PEFT's layout: A [r, in], B [out, r]: the language model's
    (`lora.{layer}.{target}`), then the vision tower's (`lora.visual.{block}.{target}`,
    `lora.visual.merger.mlp_0|mlp_2`)."""
    out = {}

    def add(name, lin):
        out[name] = ((rank, lin.in_features), (lin.out_features, rank))

    for i, layer in enumerate(model.model.language_model.layers):
        for t in targets:
            if t in LORA_TARGETS:
                add(f"lora.{i}.{t}", getattr(layer.self_attn, t, None) or getattr(layer.mlp, t))
    vis = model.model.visual
    for i, blk in enumerate(vis.blocks):
        for t in targets:
            if t in VISION_TARGETS and t != "visual.merger":
                short = t.split(".")[1]
                add(f"lora.visual.{i}.{short}", getattr(blk.attn, short, None) or getattr(blk.mlp, short))
    if "visual.merger" in targets:
        for j in (0, 2):
            add(f"lora.visual.merger.mlp_{j}", vis.merger.mlp[j])
    return out


def shared_prefix_slots(prefix, rows):
    """Unpacks `prefix` = (keys/values per layer [Bp, kv_heads, P, d], prefix_mask [Bp, P],
    slot_rows [Bp·Gs], row_slots [rows]) for `decoder_core`. Row `r` continues prompt
    `row_slots[r] // Gs`, whose cache every sample of that prompt reads in place; slot `j` of
    prompt `b` is served by row `slot_rows[b·Gs + j]` (free slots name any row). An empty
    `row_slots` (the default, for runtimes that know nothing of the prefix) puts every row on slot 0."""
    kv, pmask, slot_rows, row_slots = prefix
    row_slots = torch.cat([row_slots, torch.zeros(rows, dtype=row_slots.dtype)])[:rows]
    Bp = kv[0].shape[0]
    return kv, pmask, slot_rows, row_slots, Bp, slot_rows.shape[0] // Bp


def lora_add(y, x, A, B, scale):
    """y + scale · (x Aᵀ) Bᵀ as PEFT computes it: the input in the adapter's type (fp32 factors in
    a half-precision model), the sum in the wider type, the result in y's."""
    d = F.linear(F.linear(x.to(A.dtype), A), B) * scale
    if d.dtype == y.dtype:
        return y + d
    return (y.to(d.dtype) + d).to(y.dtype)


def rms_norm(norm, x):
    """Qwen2RMSNorm as x / √(mean x² + ε) · w: with a division (transformers multiplies by rsqrt)
    ONNX Runtime fuses the six nodes into one SimplifiedLayerNormalization."""
    var = x.float().pow(2).mean(-1, keepdim=True)
    return norm.weight * (x.float() / torch.sqrt(var + norm.variance_epsilon)).to(x.dtype)


class _Recompute(torch.autograd.Function):
    """Activation checkpointing that graph optimisers and schedulers cannot undo: the forward
    keeps only the block's inputs; the backward recomputes the block from them plus a zero taken
    from the gradient arriving at the block. That zero makes the recomputation (a) not the
    forward's values to a common-subexpression pass (onnxscript's, ONNX Runtime's), so the
    forward's intermediates die with the forward, and (b) wait for the backward pass to reach the
    block: ONNX Runtime runs a node as soon as its inputs exist, and a recomputation that needed
    only the block's inputs ran during the forward pass, its outputs alive until the backward."""

    @staticmethod
    def forward(ctx, fn, *args):
        ctx.fn = fn
        ctx.save_for_backward(*args)
        with torch.no_grad():
            return fn(*args)

    @staticmethod
    def backward(ctx, grad):
        args = ctx.saved_tensors
        zero = (grad.reshape(-1)[:1] * 0.0).sum()
        inputs = [(a + zero.to(a.dtype)).detach().requires_grad_(True) for a in args]
        with torch.enable_grad():
            out = ctx.fn(*inputs)
        grads = torch.autograd.grad(out, inputs, grad, allow_unused=True)
        return (None, *grads)


def decoder_core(model, embeds, attention_mask, position_ids, past, lora, scale, prefix=None, own=None,
                 recompute=False):
    """The text decoder: M-RoPE, GQA attention with a causal ∧ padding mask, optional KV cache
    (`past` None: no cache), an optional shared prompt cache (`prefix`, see shared_prefix_slots:
    attention runs over the prompt's cache, then the row's own cache), an optional buffer of the
    rows' own earlier tokens read in place (`own` = (keys/values per layer [B, kv_heads, C, d],
    own_mask [B, C]); with the prefix only: prompt, then this buffer, then `past` and the new
    tokens) and LoRA deltas `scale · (x Aᵀ) Bᵀ` on the targets in `lora`. `recompute` (training
    only, no cache) runs each layer through _Recompute: its backward keeps one layer's
    activations at a time instead of every layer's."""
    lm = model.model.language_model
    B, S, _ = embeds.shape
    neg = torch.finfo(torch.float32).min
    if prefix is not None:
        pkv, pmask, slot_rows, row_slots, Bp, Gs = shared_prefix_slots(prefix, B)
        pbias = torch.where(pmask.bool(), 0.0, neg)
    if own is not None:
        assert prefix is not None, "the own-cache buffer comes with the prefix inputs"
        okv, omask = own
        obias = torch.where(omask.bool(), 0.0, neg)
    past_len = past[0].shape[2] if past is not None else 0
    cos, sin = lm.rotary_emb(embeds, position_ids)
    q_pos = torch.arange(S) + past_len
    k_pos = torch.arange(past_len + S)
    allowed = (k_pos[None, :] <= q_pos[:, None])[None, None] & attention_mask[:, None, None, :].bool()
    # The masks stay fp32 in a half-precision graph: the scores become fp32 where they are added
    # (finfo(float32).min is -inf in fp16, and a row with every key masked would be NaN).
    bias = torch.where(allowed, 0.0, torch.finfo(torch.float32).min)

    def proj(lora, i, name, mod, x):
        y = mod(x)
        ab = lora.get(f"lora.{i}.{name}")
        if ab is not None:
            y = lora_add(y, x, ab[0], ab[1], scale)
        return y

    def layer_step(i, layer, h, lora):
        """Layer i on h: the new h, and the layer's keys and values (past ones included)."""
        at = layer.self_attn
        x = rms_norm(layer.input_layernorm, h)
        q = proj(lora, i, "q_proj", at.q_proj, x).view(B, S, -1, at.head_dim).transpose(1, 2)
        k = proj(lora, i, "k_proj", at.k_proj, x).view(B, S, -1, at.head_dim).transpose(1, 2)
        v = proj(lora, i, "v_proj", at.v_proj, x).view(B, S, -1, at.head_dim).transpose(1, 2)
        q, k = apply_rotary_pos_emb(q, k, cos, sin)
        if past is not None:
            k = torch.cat([past[2 * i], k], dim=2)
            v = torch.cat([past[2 * i + 1], v], dim=2)
        # GQA without repeating K and V: the g query heads of each KV head are consecutive, so
        # they are folded into the query length ([B, kv_heads, g·S, d]) and every KV head is
        # read once per step instead of g times (no expanded copies of the cache in the graph).
        kvh, g, T = k.shape[1], at.num_key_value_groups, k.shape[2]
        if past is None and prefix is None and ATTENTION_CHUNKS > 1:
            # No cache (the log-prob and training graphs): the queries in chunks.
            o = _ChunkedAttention.apply(q.reshape(B, kvh, g, S, at.head_dim), k, v, attention_mask, at.scaling)
        else:
            o = attention(q, k, v, i, kvh, g, T)
        o = o.reshape(B, kvh * g, S, at.head_dim).transpose(1, 2).reshape(B, S, -1)
        h = h + proj(lora, i, "o_proj", at.o_proj, o)
        mlp, x = layer.mlp, rms_norm(layer.post_attention_layernorm, h)
        g = mlp.act_fn(proj(lora, i, "gate_proj", mlp.gate_proj, x)) * proj(lora, i, "up_proj", mlp.up_proj, x)
        h = h + proj(lora, i, "down_proj", mlp.down_proj, g)
        return h, k, v

    def attention(q, k, v, i, kvh, g, T):
        """Layer i's attention output, [B, kv_heads, g·S, d], over its whole score matrix (with
        the cache, or every query at once)."""
        at = lm.layers[i].self_attn
        qg = q.reshape(B, kvh, g * S, at.head_dim)
        att = torch.matmul(qg, k.transpose(2, 3)) * at.scaling
        att = (att.view(B, kvh, g, S, T) + bias[:, :, None]).view(B, kvh, g * S, T)
        if prefix is None:
            att = torch.softmax(att.float(), dim=-1).to(q.dtype)
            o = torch.matmul(att, v)
        else:
            # The prompt's cache, shared by its samples and never copied: the queries of the
            # rows on a prompt's slots become one [Gs·g·S, d] block against its [P, d] keys.
            pk, pv = pkv[2 * i], pkv[2 * i + 1]
            P, gS, d = pk.shape[2], g * S, at.head_dim

            def to_slots(x, n):  # [B, kvh, gS, n] → [Bp, kvh, Gs·gS, n]
                return x.index_select(0, slot_rows).view(Bp, Gs, kvh, gS, n).transpose(1, 2).reshape(Bp, kvh, Gs * gS, n)

            def to_rows(x, n):  # the inverse, row by row
                return x.view(Bp, kvh, Gs, gS, n).transpose(1, 2).reshape(Bp * Gs, kvh, gS, n).index_select(0, row_slots)

            ps = torch.matmul(to_slots(qg, d), pk.transpose(2, 3)) * at.scaling + pbias[:, None, None, :]
            if own is None:
                att = torch.softmax(torch.cat([to_rows(ps, P), att], dim=-1).float(), dim=-1).to(q.dtype)
                o = torch.matmul(att[..., P:], v) + to_rows(torch.matmul(to_slots(att[..., :P], P), pv), d)
            else:
                # The rows' own earlier tokens in the runtime's buffer, read where they lie;
                # its unwritten slots are masked. Buffer row j is batch row j; the queries and
                # scores (not the buffer) are gathered, so that the default buffer (one row, no
                # slots) serves every row and the graph never takes the batch size from it.
                ok, ov = okv[2 * i], okv[2 * i + 1]
                C, ob = ok.shape[2], ok.shape[0]
                fwd, back = torch.arange(ob), torch.arange(B).clamp(max=ob - 1)
                cs = torch.matmul(qg.index_select(0, fwd), ok.transpose(2, 3)) * at.scaling + obias[:, None, None, :]
                att = torch.softmax(torch.cat([to_rows(ps, P), cs.index_select(0, back), att], dim=-1).float(),
                                    dim=-1).to(q.dtype)
                o = (torch.matmul(att[..., P + C:], v)
                     + torch.matmul(att[..., P:P + C].index_select(0, fwd), ov).index_select(0, back)
                     + to_rows(torch.matmul(to_slots(att[..., :P], P), pv), d))
        return o

    h, presents = embeds, []
    if recompute:
        assert past is None and prefix is None and own is None, "recompute is for the training graph"
        for i, layer in enumerate(lm.layers):
            names = sorted(k for k in lora if k.startswith(f"lora.{i}."))
            flat = [t for k in names for t in lora[k]]

            def block(h, *ab, i=i, layer=layer, names=names):
                lo = {k: (ab[2 * j], ab[2 * j + 1]) for j, k in enumerate(names)}
                return layer_step(i, layer, h, lo)[0]

            h = _Recompute.apply(block, h, *flat)
        return rms_norm(lm.norm, h), presents
    for i, layer in enumerate(lm.layers):
        h, k, v = layer_step(i, layer, h, lora)
        presents += [k, v]
    return rms_norm(lm.norm, h), presents


class Decoder(nn.Module):
    def __init__(self, model, lora_names, scale):
        super().__init__()
        self.model, self.lora_names, self.scale = model, lora_names, scale

    def forward(self, inputs_embeds, attention_mask, position_ids, past_key_values, prefix_key_values, prefix_mask,
                slot_rows, row_slots, own_key_values, own_mask, lora_tensors):
        lora = {n: (lora_tensors[2 * j], lora_tensors[2 * j + 1]) for j, n in enumerate(self.lora_names)}
        prefix = (prefix_key_values, prefix_mask, slot_rows, row_slots)
        h, presents = decoder_core(self.model, inputs_embeds, attention_mask, position_ids, past_key_values,
                                   lora, self.scale, prefix, (own_key_values, own_mask))
        # The last position only: the engine left-pads prompts, so that is every row's next token.
        return (self.model.lm_head(h[:, -1:]).float(), *presents)


# ----------------------------------------------------------------------------------------------
# Export
# ----------------------------------------------------------------------------------------------

EXTERNAL_DATA = False  # torch writes its own data file when the weights exceed protobuf's 2 GB
DTYPE = "fp32"  # --dtype: the graphs' arithmetic (fp32, or fp16 / bf16 as transformers runs them)
HALF = {"fp16": torch.float16, "bf16": torch.bfloat16}


def torch_dtype():
    return HALF.get(DTYPE, torch.float32)


def np_dtype():
    """The numpy type of the package's activations and cache (bf16 through ml_dtypes)."""
    if DTYPE == "bf16":
        import ml_dtypes
        return ml_dtypes.bfloat16
    return np.float16 if DTYPE == "fp16" else np.float32


def np_of(t):
    """A torch tensor as numpy, bf16 included (as ml_dtypes.bfloat16)."""
    t = t.detach().cpu().contiguous()
    if t.dtype == torch.bfloat16:
        import ml_dtypes
        return t.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
    return t.numpy()


def torch_of(a):
    """numpy → torch, bf16 included."""
    if a.dtype.name == "bfloat16":
        return torch.from_numpy(np.ascontiguousarray(a).view(np.int16)).view(torch.bfloat16)
    return torch.from_numpy(np.ascontiguousarray(a))


FLOAT_TYPES = (1, 10, 16)  # onnx.TensorProto FLOAT, FLOAT16, BFLOAT16
WEIGHTS_FILE = "weights.data"


class SharedWeights:
    """Every graph of a package reads its weights from one file, `weights.data`, and a weight
    used by several graphs is stored there once, in one layout, under its Hugging Face name: the
    runtime maps the file once and hands the same tensors to every session (ONNX Runtime's
    shared initializers), so a process holds one copy of the weights whatever graphs it opens.

    torch's export gives each graph its own names and sometimes its own layout for a weight (a
    pre-transposed constant in one graph, a Transpose node over the parameter in another). Each
    initializer is matched to the model's parameter by content, in either layout, and renamed
    after it; the language model's matrices are stored in the layout the inference graphs use,
    [in, out] (named `….weight.T`), the input embedding (also the tied `lm_head`) and the vision
    tower's as torch holds them. A use of the other layout is rewritten to read the stored one:
    Transpose(W) becomes the stored tensor, MatMul(x, W) a FusedMatMul with transB, Gemm and
    FusedMatMul flip their transpose flag. Tensors that match no parameter (torch's constants)
    are stored once per distinct content."""

    def __init__(self, out, model):
        import hashlib
        self.sha = lambda b: hashlib.sha1(b.view(np.uint8) if isinstance(b, np.ndarray) else b).digest()
        self.path = os.path.join(out, WEIGHTS_FILE)
        if os.path.exists(self.path):
            os.remove(self.path)
        self.at, self.stored = 0, {}
        self.params, self.want = {}, {}
        embed = model.get_input_embeddings().weight
        for name, p in model.named_parameters(remove_duplicate=False):
            a = np_of(p)
            if a.size < 256 or a.dtype != np_dtype() and a.dtype != np.float32:
                continue
            self.params.setdefault((a.shape, self.sha(a)), (name, "N"))
            if a.ndim == 2:
                self.params.setdefault((a.shape[::-1], self.sha(np.ascontiguousarray(a.T))), (name, "T"))
            text = ".visual." not in f".{name}" and p is not embed
            self.want.setdefault(name, "T" if text and a.ndim == 2 else "N")
        self.kept = 0

    @staticmethod
    def _raw(init):
        from onnx import numpy_helper
        return init.raw_data if init.HasField("raw_data") else numpy_helper.to_array(init).tobytes()

    def canonicalise(self, m, text):
        """Renames the initializers that are parameters and, in the text graphs (`text`), stores
        each in its package layout, rewriting the uses of the other one. Returns (renamed,
        rewritten uses)."""
        import onnx
        from onnx import numpy_helper

        inputs = {i.name for i in m.graph.input}
        uses = {}
        for n in m.graph.node:
            for k, i in enumerate(n.input):
                uses.setdefault(i, []).append((n, k))
        present = {i.name for i in m.graph.initializer}
        alias, drop_nodes, replace = {}, set(), {}
        renamed = flipped = 0

        def can_flip(n, k):
            perm = next((a for a in n.attribute if a.name == "perm"), None)
            return ((n.op_type == "Transpose" and (perm is None or list(perm.ints) == [1, 0]))
                    or reads_transposed(n, k))

        def flip(n, k, y):
            if n.op_type == "Transpose":
                alias[n.output[0]] = y
                drop_nodes.add(id(n))
            else:
                replace[id(n)] = read_transposed(n, k, y)

        keep = []
        for init in m.graph.initializer:
            if init.name in inputs or init.data_type not in FLOAT_TYPES:
                keep.append(init)
                continue
            raw, old = self._raw(init), init.name
            hit = self.params.get((tuple(init.dims), self.sha(raw)))
            if hit is None:
                keep.append(init)
                continue
            name, layout = hit
            want = self.want[name]
            mine = uses.get(init.name, [])
            if text and layout != want and mine and all(can_flip(n, k) for n, k in mine):
                arr = np.ascontiguousarray(numpy_helper.to_array(init).T)
                target = name + (".T" if want == "T" else "")
                for n, k in mine:
                    flip(n, k, target)
                flipped += len(mine)
                new = numpy_helper.from_array(arr, target)
            else:
                if text and layout != want:
                    self.kept += 1
                target = name + (".T" if layout == "T" else "")
                for n, k in mine:
                    n.input[k] = target
                new = init
                new.name = target
            renamed += 1
            if target in present and target != old:
                continue  # the same weight twice in one graph: the first one serves
            present.add(target)
            keep.append(new)
        nodes = []
        for n in m.graph.node:
            if id(n) in drop_nodes:
                continue
            n = replace.get(id(n), n)
            n.input[:] = [alias.get(i, i) for i in n.input]
            nodes.append(n)
        for o in m.graph.output:
            if o.name in alias:
                raise SystemExit(f"export: graph output {o.name} is a transposed weight")
        del m.graph.initializer[:]
        m.graph.initializer.extend(keep)
        del m.graph.node[:]
        m.graph.node.extend(nodes)
        if flipped:
            use_ms_domain(m)
        return renamed, flipped

    def save(self, m, path):
        """Writes the graph to `path` with every initializer of at least 1 KiB in the shared
        file (4 KiB-aligned, so ONNX Runtime and the runtime can map it), each distinct tensor
        once."""
        import onnx
        with open(self.path, "ab") as f:
            for init in m.graph.initializer:
                raw = self._raw(init)
                if len(raw) < 1024:
                    continue
                key = (init.data_type, tuple(init.dims), self.sha(raw))
                if key not in self.stored:
                    pad = (4096 - self.at % 4096) % 4096
                    f.write(b"\0" * pad)
                    f.write(raw)
                    self.stored[key] = (self.at + pad, len(raw))
                    self.at += pad + len(raw)
                off, n = self.stored[key]
                for field in ("raw_data", "float_data", "int32_data", "int64_data", "double_data"):
                    init.ClearField(field)
                del init.external_data[:]
                init.data_location = onnx.TensorProto.EXTERNAL
                for k, v in (("location", WEIGHTS_FILE), ("offset", str(off)), ("length", str(n))):
                    e = init.external_data.add()
                    e.key, e.value = k, v
        onnx.save(m, path)


def reads_transposed(n, k):
    """Whether node `n` can read its input `k` as the transpose of another tensor
    (read_transposed)."""
    return ((n.op_type == "MatMul" and k == 1)
            or (n.op_type in ("Gemm", "FusedMatMul") and k in (0, 1) and n.domain in ("", "com.microsoft")))


def read_transposed(n, k, y):
    """`n` reading its input `k` as the transpose of `y`: MatMul(x, ·) becomes
    com.microsoft.FusedMatMul(x, y, transB=1), Gemm and FusedMatMul flip transA / transB. Returns
    the node to keep in `n`'s place."""
    from onnx import helper

    if n.op_type == "MatMul":
        return helper.make_node("FusedMatMul", [n.input[0], y], list(n.output), name=n.name,
                                domain="com.microsoft", alpha=1.0, transA=0, transB=1)
    key = "transB" if k == 1 else "transA"
    a = next((a for a in n.attribute if a.name == key), None)
    if a is None:
        n.attribute.append(helper.make_attribute(key, 1))
    else:
        a.i = 1 - a.i
    n.input[k] = y
    return n


def use_ms_domain(m):
    """Imports ONNX Runtime's com.microsoft domain (FusedMatMul) unless the model does."""
    from onnx import helper

    if not any(o.domain == "com.microsoft" for o in m.opset_import):
        m.opset_import.append(helper.make_opsetid("com.microsoft", 1))


def use_weights_in_place(m):
    """Each 2-D weight used where it is stored: MatMul(x, Transpose(W)) becomes
    com.microsoft.FusedMatMul(x, W, transB=1), Gemm(x, Transpose(W)) flips its transB, and
    Transpose(Transpose(W)) is W. The training graph's forward, recomputation and backward read
    one copy of each weight, where ONNX Runtime would otherwise keep a transposed copy beside it
    (constant folding) or transpose it on every call. Returns the number of uses rewritten."""
    # Weights only: an initializer that is also a graph input (an optional input's default, such
    # as a LoRA factor) is the caller's to replace and keeps its form.
    inputs = {i.name for i in m.graph.input}
    inits = {i.name: i for i in m.graph.initializer if i.name not in inputs}
    trans = {}  # Transpose output → the 2-D initializer it transposes
    for n in m.graph.node:
        perm = next((list(a.ints) for a in n.attribute if a.name == "perm"), None)
        if n.op_type == "Transpose" and n.input[0] in inits and len(inits[n.input[0]].dims) == 2 \
                and perm in (None, [1, 0]):
            trans[n.output[0]] = n.input[0]
    twice = {}  # Transpose(Transpose(W)) output → W
    for n in m.graph.node:
        perm = next((list(a.ints) for a in n.attribute if a.name == "perm"), None)
        if n.op_type == "Transpose" and n.input[0] in trans and perm in (None, [1, 0]):
            twice[n.output[0]] = trans[n.input[0]]
    rewritten, nodes = 0, []
    for n in m.graph.node:
        if n.output[0] in twice:
            continue
        n.input[:] = [twice.get(i, i) for i in n.input]
        if n.op_type in ("MatMul", "Gemm") and n.input[1] in trans:
            n = read_transposed(n, 1, trans[n.input[1]])
            rewritten += 1
        nodes.append(n)
    used = {i for n in nodes for i in n.input}
    nodes = [n for n in nodes if not (n.op_type == "Transpose" and n.output[0] in trans and n.output[0] not in used)]
    del m.graph.node[:]
    m.graph.node.extend(nodes)
    if rewritten:
        use_ms_domain(m)
    return rewritten


def export(mod, args, path, input_names, output_names, dynamic_shapes, dim_names, defaults=None,
           split_slices=True):
    """torch.onnx (dynamo) export, then: readable dimension names, debug metadata stripped, and
    `defaults` {input: array} stored as initializers of the same name, which makes those inputs
    optional (ONNX Runtime uses the stored value unless the caller feeds one).

    `split_slices=False` leaves out onnxscript's SlicesSplit rewrite (two Slices of a tensor
    into one Split): it matches by trying every node of the graph against every Slice, which
    took most of the training graph's export time (quadratic in its nodes: 11 of 14 minutes
    for the 2-layer tiny package's, with attention and head in chunks)."""
    import onnx
    from onnx import numpy_helper
    from onnxscript import rewriter

    t0 = time.time()
    rules = rewriter._DEFAULT_REWRITE_RULES
    if not split_slices:
        rewriter._DEFAULT_REWRITE_RULES = tuple(r for r in rules if r.name != "SlicesSplit")
    try:
        torch.onnx.export(mod, args, path, input_names=input_names, output_names=output_names,
                          dynamic_shapes=dynamic_shapes, opset_version=OPSET, dynamo=True,
                          external_data=EXTERNAL_DATA, optimize=True, verbose=False)
    finally:
        rewriter._DEFAULT_REWRITE_RULES = rules
    m = onnx.load(path, load_external_data=False)
    # Drop the exporter's per-node debug metadata (stack traces with local paths and line
    # numbers): smaller files that depend only on the model.
    for n in m.graph.node:
        del n.metadata_props[:]
    for vi in m.graph.value_info:
        del vi.metadata_props[:]
    for vi in list(m.graph.input) + list(m.graph.output):
        for ax, nm in dim_names.get(vi.name, {}).items():
            dim = vi.type.tensor_type.shape.dim[ax]
            dim.Clear()
            dim.dim_param = nm
    for name, value in (defaults or {}).items():
        m.graph.initializer.append(numpy_helper.from_array(value, name))
    half = {"fp16": onnx.TensorProto.FLOAT16, "bf16": onnx.TensorProto.BFLOAT16}.get(DTYPE)
    if half is not None:
        # (the half types of the graph's inputs and outputs, as the contract expects them)
        for vi in list(m.graph.input) + list(m.graph.output):
            t = vi.type.tensor_type.elem_type
            if t in FLOAT_TYPES and t != onnx.TensorProto.FLOAT and t != half:
                raise SystemExit(f"export: {os.path.basename(path)} {vi.name} is of type {t}, not the package's")
    torch_data = path + ".data"
    if os.path.exists(torch_data):
        # torch's own data file beside the graph: read in, rewritten into the shared file.
        from onnx.external_data_helper import load_external_data_for_model
        load_external_data_for_model(m, os.path.dirname(os.path.abspath(path)))
    # (the vision tower's backward, vision_grad.onnx, reads its weights in place as the
    # training graphs do: one copy each, shared with vision.onnx)
    text = not path.endswith("vision.onnx")
    renamed, flipped = WEIGHTS.canonicalise(m, text)
    in_place = use_weights_in_place(m) if text else 0
    print(f"  {os.path.basename(path)}: {renamed} weights by their model names, {flipped + in_place} uses "
          f"read in the stored layout", flush=True)
    WEIGHTS.save(m, path)
    if os.path.exists(torch_data):
        os.remove(torch_data)
    ops = sorted({n.domain or "ai.onnx" for n in m.graph.node})
    print(f"  {os.path.basename(path)}: {os.path.getsize(path) / 1e6:.2f} MB (weights in {WEIGHTS_FILE}), "
          f"{len(m.graph.node)} nodes, "
          f"domains {ops}, {time.time() - t0:.1f} s", flush=True)


def lora_defaults(names, shapes_):
    """Zero adapters: the LoRA inputs become optional and default to the base model, so runtimes
    that know nothing of them (onnxruntime-genai) run the graph as is."""
    out = {}
    for n in names:
        out[f"{n}.A"] = np.zeros(shapes_[n][0], np.float32)
        out[f"{n}.B"] = np.zeros(shapes_[n][1], np.float32)
    return out


def empty_cache(name, rows, kvh, hd, L):
    """`{name}.{i}.key/value` for every layer: `rows` rows with no tokens, as decoder inputs."""
    return {f"{name}.{i}.{kv}": np.zeros((rows, kvh, 0, hd), np_dtype()) for i in range(L) for kv in ("key", "value")}


def prefix_defaults(L, kvh, hd):
    """No shared prompt cache: one empty prompt, every row on its slot 0. With these the decoder is a
    plain past/present decoder (onnxruntime-genai and the trainer's full-sequence checks feed no prefix)."""
    out = empty_cache("prefix_key_values", 1, kvh, hd, L)
    out.update({"prefix_mask": np.zeros((1, 0), np.int64), "slot_rows": np.zeros(1, np.int64),
                "row_slots": np.zeros(0, np.int64)})
    return out


def own_defaults(L, kvh, hd):
    """No own-cache buffer: the rows' own tokens are all in past (a plain past/present decoder)."""
    out = empty_cache("own_key_values", 1, kvh, hd, L)
    out["own_mask"] = np.zeros((1, 0), np.int64)
    return out


def export_package(model, out, lora_rank, lora_alpha, lora_targets):
    from torch.export import Dim

    os.makedirs(out, exist_ok=True)
    cfg, tc, vc = model.config, model.config.text_config, model.config.vision_config
    L, kvh = tc.num_hidden_layers, tc.num_key_value_heads
    hd = getattr(tc, "head_dim", None) or tc.hidden_size // tc.num_attention_heads
    D = tc.hidden_size
    shapes = lora_shapes(model, lora_targets, lora_rank)
    vis = [n for n in shapes if is_visual(n)]
    torch.manual_seed(1)
    with torch.no_grad():
        # vision: two images of different sizes so nothing specialises to one grid
        px, grid = vision_example(model)
        P = Dim("num_patches", min=4, max=1 << 20)
        ds = {"pixel_values": {0: P}, "image_grid_thw": {0: Dim("num_images", max=1024)}}
        dims = {"pixel_values": {0: "num_patches"}, "image_grid_thw": {0: "num_images"},
                "image_features": {0: "num_logical_patches"}}
        args, in_names = (px, grid), ["pixel_values", "image_grid_thw"]
        if vis:
            vlora = random_lora(vis, shapes, 3)
            args, ds["lora_tensors"] = (px, grid, vlora), [{} for _ in vlora]
            in_names += [f"{n}.{m}" for n in vis for m in ("A", "B")]
        export(Vision(model, vis, lora_alpha / lora_rank).eval(), args, f"{out}/vision.onnx", in_names,
               ["image_features"], ds, dims, lora_defaults(vis, shapes))
        # embedding
        ids = torch.randint(0, 100, (2, 7))
        ids[0, 2:4] = cfg.image_token_id
        feats = torch.randn(2, vc.out_hidden_size).to(torch_dtype())
        b, s = Dim("batch_size", max=4096), Dim("sequence_length", max=1 << 17)
        export(Embedding(model).eval(), (ids, feats), f"{out}/embedding.onnx", ["input_ids", "image_features"],
               ["inputs_embeds"], {"input_ids": {0: b, 1: s}, "image_features": {0: Dim("num_logical_patches", max=1 << 20)}},
               {"input_ids": {0: "batch_size", 1: "sequence_length"}, "image_features": {0: "num_logical_patches"},
                "inputs_embeds": {0: "batch_size", 1: "sequence_length"}})
        # decoder with KV cache and LoRA inputs
        names = [n for n in shapes if not is_visual(n)]
        lora = []
        for n in names:
            lora += [torch.randn(*shapes[n][0]) * 0.1, torch.randn(*shapes[n][1]) * 0.1]
        # Example: 3 rows on 2 prompts of 2 slots each (one free), 4 prompt tokens, 3 own tokens
        # in past and 3 in an own-cache buffer of 4 slots.
        B, S, Pp, Bp, Gs, Pre, C = 3, 5, 3, 2, 2, 4, 4
        dt = torch_dtype()
        x = torch.randn(B, S, D).to(dt)
        am = torch.ones(B, Pp + S, dtype=torch.int64)
        pos = torch.arange(Pp, Pp + S).view(1, 1, S).expand(3, B, S).contiguous()
        past = [torch.randn(B, kvh, Pp, hd).to(dt) for _ in range(2 * L)]
        prefix = [torch.randn(Bp, kvh, Pre, hd).to(dt) for _ in range(2 * L)]
        pmask = torch.ones(Bp, Pre, dtype=torch.int64)
        slot_rows = torch.tensor([2, 0, 1, 1])
        row_slots = torch.tensor([1, 2, 0])
        # (a buffer of fewer rows than the batch only in this trace, so that its row count stays
        # a dimension of its own)
        own = [torch.randn(B - 1, kvh, C, hd).to(dt) for _ in range(2 * L)]
        own_mask = torch.tensor([[1, 1, 1, 0]] * (B - 1))
        p = Dim("past_sequence_length", max=1 << 17)
        bp, pre, slots = Dim("num_prompts", max=4096), Dim("prefix_length", max=1 << 17), Dim("num_slots", max=1 << 20)
        cap, ob = Dim("own_capacity", max=1 << 17), Dim("own_rows", max=4096)
        in_names = ["inputs_embeds", "attention_mask", "position_ids"]
        out_names = ["logits"]
        dims = {"inputs_embeds": {0: "batch_size", 1: "sequence_length"},
                "attention_mask": {0: "batch_size", 1: "total_sequence_length"},
                "position_ids": {1: "batch_size", 2: "sequence_length"},
                "logits": {0: "batch_size"}}
        for i in range(L):
            for kv in ("key", "value"):
                in_names.append(f"past_key_values.{i}.{kv}")
                out_names.append(f"present.{i}.{kv}")
                dims[f"past_key_values.{i}.{kv}"] = {0: "batch_size", 2: "past_sequence_length"}
                dims[f"present.{i}.{kv}"] = {0: "batch_size", 2: "total_sequence_length"}
        for i in range(L):
            for kv in ("key", "value"):
                in_names.append(f"prefix_key_values.{i}.{kv}")
                dims[f"prefix_key_values.{i}.{kv}"] = {0: "num_prompts", 2: "prefix_length"}
        in_names += ["prefix_mask", "slot_rows", "row_slots"]
        dims.update({"prefix_mask": {0: "num_prompts", 1: "prefix_length"}, "slot_rows": {0: "num_slots"},
                     "row_slots": {0: "batch_size_or_0"}})
        for i in range(L):
            for kv in ("key", "value"):
                in_names.append(f"own_key_values.{i}.{kv}")
                dims[f"own_key_values.{i}.{kv}"] = {0: "own_rows", 2: "own_capacity"}
        in_names.append("own_mask")
        dims["own_mask"] = {0: "own_rows", 1: "own_capacity"}
        for n in names:
            in_names += [f"{n}.A", f"{n}.B"]
        ds = {"inputs_embeds": {0: b, 1: s}, "attention_mask": {0: b, 1: Dim.AUTO}, "position_ids": {1: b, 2: s},
              "past_key_values": [{0: b, 2: p} for _ in range(2 * L)],
              "prefix_key_values": [{0: bp, 2: pre} for _ in range(2 * L)], "prefix_mask": {0: bp, 1: pre},
              "slot_rows": {0: slots}, "row_slots": {0: Dim("row_slots", max=4096)},
              "own_key_values": [{0: ob, 2: cap} for _ in range(2 * L)], "own_mask": {0: ob, 1: cap},
              "lora_tensors": [{} for _ in lora]}
        export(Decoder(model, names, lora_alpha / lora_rank).eval(),
               (x, am, pos, past, prefix, pmask, slot_rows, row_slots, own, own_mask, lora), f"{out}/decoder.onnx",
               in_names, out_names, ds, dims,
               {**lora_defaults(names, shapes), **prefix_defaults(L, kvh, hd), **own_defaults(L, kvh, hd)})
    return names + vis, shapes


def vision_example(model):
    """Pixel rows of two images of different sizes (12×16 and 6×10 patches) and their grid."""
    vc = model.config.vision_config
    grid = torch.tensor([[1, 12, 16], [1, 6, 10]])
    px = torch.randn(int((grid.prod(1)).sum()), vc.in_channels * vc.temporal_patch_size * vc.patch_size ** 2)
    return px, grid


def write_package_files(model, hf_dir, out, lora_names, lora_shapes_, rank, alpha, dtype):
    cfg, tc, vc = model.config, model.config.text_config, model.config.vision_config
    hd = getattr(tc, "head_dim", None) or tc.hidden_size // tc.num_attention_heads
    for f in ("tokenizer.json", "tokenizer_config.json", "chat_template.json", "preprocessor_config.json",
              "generation_config.json"):
        if os.path.exists(os.path.join(hf_dir, f)):
            shutil.copy(os.path.join(hf_dir, f), os.path.join(out, f))
    cfg.save_pretrained(out)  # config.json in the 5.x layout
    mrope = tc.rope_parameters.get("mrope_section")
    eos = tc.eos_token_id if isinstance(tc.eos_token_id, list) else [tc.eos_token_id]
    genai = {"model": {
        "type": "qwen2_5_vl", "vocab_size": tc.vocab_size, "context_length": tc.max_position_embeddings,
        "bos_token_id": tc.bos_token_id, "eos_token_id": eos + ([tc.pad_token_id] if tc.pad_token_id not in eos else []),
        "pad_token_id": tc.pad_token_id, "image_token_id": cfg.image_token_id, "video_token_id": cfg.video_token_id,
        "vision_start_token_id": cfg.vision_start_token_id,
        "decoder": {"filename": "decoder.onnx", "head_size": hd, "hidden_size": tc.hidden_size,
                    "num_attention_heads": tc.num_attention_heads, "num_hidden_layers": tc.num_hidden_layers,
                    "num_key_value_heads": tc.num_key_value_heads,
                    "inputs": {"inputs_embeds": "inputs_embeds", "attention_mask": "attention_mask",
                               "position_ids": "position_ids", "past_key_names": "past_key_values.%d.key",
                               "past_value_names": "past_key_values.%d.value"},
                    "outputs": {"logits": "logits", "present_key_names": "present.%d.key",
                                "present_value_names": "present.%d.value"}},
        "embedding": {"filename": "embedding.onnx", "inputs": {"input_ids": "input_ids", "image_features": "image_features"},
                      "outputs": {"inputs_embeds": "inputs_embeds"}},
        "vision": {"filename": "vision.onnx", "spatial_merge_size": vc.spatial_merge_size,
                   "tokens_per_second": float(vc.tokens_per_second), "patch_size": vc.patch_size,
                   "window_size": vc.window_size,
                   "inputs": {"pixel_values": "pixel_values", "image_grid_thw": "image_grid_thw"},
                   "outputs": {"image_features": "image_features"}}},
        "search": {"do_sample": False, "num_beams": 1, "max_length": tc.max_position_embeddings,
                   "past_present_share_buffer": False}}
    json.dump(genai, open(f"{out}/genai_config.json", "w"), indent=2)
    pre = json.load(open(os.path.join(out, "preprocessor_config.json")))
    json.dump({"processor": {"name": "qwen2_5_image_processor", "transforms": [
        {"operation": {"name": "decode_image", "type": "DecodeImage", "attrs": {"color_space": "RGB"}}},
        {"operation": {"name": "convert_to_rgb", "type": "ConvertRGB"}},
        {"operation": {"name": "resize", "type": "Resize", "attrs": {
            "width": 540, "height": 360, "smart_resize": 1, "min_pixels": pre["min_pixels"], "max_pixels": pre["max_pixels"],
            "patch_size": pre["patch_size"], "merge_size": pre["merge_size"]}}},
        {"operation": {"name": "rescale", "type": "Rescale", "attrs": {"rescale_factor": pre["rescale_factor"]}}},
        {"operation": {"name": "normalize", "type": "Normalize",
                       "attrs": {"mean": pre["image_mean"], "std": pre["image_std"], "qwen2_5_vl": 1}}},
        {"operation": {"name": "patch_image", "type": "PatchImage", "attrs": {
            "patch_size": pre["patch_size"], "temporal_patch_size": pre["temporal_patch_size"],
            "merge_size": pre["merge_size"]}}}]}},
        open(f"{out}/processor_config.json", "w"), indent=2)
    manifest = {
        "format": "spatial-ssrl-package", "version": 1, "family": "qwen2_5_vl", "dtype": dtype, "opset": OPSET,
        "graphs": {"vision": "vision.onnx", "embedding": "embedding.onnx", "decoder": "decoder.onnx",
                   "logprobs": "logprobs.onnx", "train": "train.onnx", "sft": "sft.onnx",
                   **({"vision_grad": "vision_grad.onnx"} if any(map(is_visual, lora_names)) else {})},
        # target_ids, completion_mask, old/ref log-probs and the log-prob outputs cover the last
        # C columns of the rows (the completion), not all S.
        "train": {"inputs": TRAIN_BATCH, "stats": STATS, "positions": "completion", "head_chunks": HEAD_CHUNKS,
                  "attention_chunks": ATTENTION_CHUNKS,
                  "loss": "EasyR1 GRPO: clamp ±20, clip low/high in log space, dual clip, k3 KL clamped to ±10, "
                          "sum over completion tokens / token_count"},
        "sft": {"inputs": SFT_BATCH, "stats": SFT_STATS,
                "loss": "cross-entropy of the labelled tokens (loss_mask), summed / token_count"},
        "text": {"hidden_size": tc.hidden_size, "num_hidden_layers": tc.num_hidden_layers,
                 "num_attention_heads": tc.num_attention_heads, "num_key_value_heads": tc.num_key_value_heads,
                 "head_dim": hd, "vocab_size": tc.vocab_size, "mrope_section": mrope},
        "vision": {"out_hidden_size": vc.out_hidden_size, "spatial_merge_size": vc.spatial_merge_size,
                   "patch_size": vc.patch_size, "temporal_patch_size": vc.temporal_patch_size,
                   "tokens_per_second": vc.tokens_per_second, "window_size": vc.window_size},
        "tokens": {"image": cfg.image_token_id, "video": cfg.video_token_id,
                   "vision_start": cfg.vision_start_token_id, "vision_end": cfg.vision_end_token_id,
                   "eos": eos, "pad": tc.pad_token_id},
        "lora": {"rank": rank, "alpha": alpha, "scale": alpha / rank,
                 "targets": [t for t in LORA_TARGETS + VISION_TARGETS if t in set(map(target_of, lora_names))],
                 "tensors": [{"name": n, "A": list(lora_shapes_[n][0]), "B": list(lora_shapes_[n][1])} for n in lora_names]},
        # decoder.onnx reads a prompt's cache in place for all its samples (prefix_key_values,
        # prefix_mask, slot_rows, row_slots; see decoder_core); only each row's own tokens are
        # past/present.
        "kv_layout": "shared",
        # ...and the rows' older own tokens from a buffer the runtime keeps (own_key_values,
        # own_mask): present is then only the short past and the step's new keys and values.
        "own_cache": "in_place",
    }
    json.dump(manifest, open(f"{out}/manifest.json", "w"), indent=2)


# ----------------------------------------------------------------------------------------------
# Log-prob and training graphs
# ----------------------------------------------------------------------------------------------

STATS = ["tokens", "pg_clipfrac_higher", "pg_clipfrac_lower", "ppo_kl", "kl", "entropy"]
TRAIN_BATCH = ["inputs_embeds", "attention_mask", "position_ids", "target_ids", "completion_mask", "old_logprobs",
               "ref_logprobs", "advantages", "temperature", "clip_ratio_low", "clip_ratio_high", "clip_ratio_dual",
               "kl_coef", "token_count", "rollout_is_weights", "loss_scale"]


class _TargetLogProbs(torch.autograd.Function):
    """log softmax(logits / T) at the targets and the distributions' entropies, for [N, V]
    logits, keeping only the logits (and the N log-normalisers) for the backward pass, which
    rebuilds the softmax from them: grad logits = (onehot(target) − softmax) · g / T. Autograd of
    the plain expression keeps about six full-vocabulary tensors per position alive until the
    backward pass; this keeps one and makes two at a time."""

    @staticmethod
    def forward(ctx, logits, targets, temperature):
        m = logits.amax(-1, keepdim=True)
        e = torch.exp((logits - m) / temperature)
        total = e.sum(-1)
        lse = m.squeeze(-1) / temperature + torch.log(total)
        picked = torch.gather(logits, -1, targets.unsqueeze(-1)).squeeze(-1) / temperature
        # H = lse − Σ p·z with p = e / Σe, z = logits / T.
        entropy = lse - (e * logits).sum(-1) / (total * temperature)
        hit = (logits.argmax(-1) == targets).to(logits.dtype)
        ctx.save_for_backward(logits, targets, temperature, lse)
        ctx.mark_non_differentiable(entropy, hit)
        return picked - lse, entropy, hit

    @staticmethod
    def backward(ctx, g, _g_entropy, _g_hit):
        logits, targets, temperature, lse = ctx.saved_tensors
        p = torch.exp(logits / temperature - lse.unsqueeze(-1))
        grad = (-p * g.unsqueeze(-1)).scatter_add(-1, targets.unsqueeze(-1), g.unsqueeze(-1))
        return grad / temperature, None, None


HEAD_CHUNKS = 8  # --head-chunks: the vocabulary head runs over the positions in this many chunks, one after another


def pad_chunks(x, k):
    """x [N, …] as [k, ⌈N/k⌉, …]: dimension 0 padded with zeros to a multiple of k, in k chunks."""
    n = (x.shape[0] + k - 1) // k
    pad = [0, 0] * (x.dim() - 1) + [0, n * k - x.shape[0]]
    return F.pad(x, pad).reshape(k, n, *x.shape[1:])


class _ChunkedHead(torch.autograd.Function):
    """log softmax(h·Wᵀ / T) at the targets and each distribution's entropy, for [N, D] hidden
    states and the [V, D] head, with no full [N, V] tensor: the positions go through the head in
    HEAD_CHUNKS chunks, each chunk's logits reduced to its log-normalisers and entropies before
    the next chunk starts (each chunk's input carries a zero taken from the previous chunk's
    result, so ONNX Runtime cannot run the chunks' products side by side), and the backward pass
    rebuilds each chunk's softmax from h and the log-normalisers the same way:
    grad h = (g/T)·W[target] − (softmax · g/T) W. Only h and the N log-normalisers are kept."""

    @staticmethod
    def forward(ctx, h, weight, targets, temperature):
        K, N = HEAD_CHUNKS, h.shape[0]
        hp, tp = pad_chunks(h, K), pad_chunks(targets, K)
        lse, ent, hits, link = [], [], [], None
        for k in range(K):
            hk = hp[k] if link is None else hp[k] + link
            z = (hk @ weight.t()).float() / temperature
            # (whether the target is the most likely token: the SFT graph's token accuracy)
            hits.append((z.argmax(-1) == tp[k]).to(z.dtype))
            m = z.amax(-1, keepdim=True)
            e = torch.exp(z - m)
            total = e.sum(-1)
            lk = m.squeeze(-1) + torch.log(total)
            # H = lse − Σ p·z with p = e / Σe.
            ent.append(lk - (e * z).sum(-1) / total)
            lse.append(lk)
            # From the entropy as well: ONNX Runtime runs a node whose result is wanted only
            # at the end (the entropies feed the statistics) as late as it can, keeping this
            # chunk's logits alive until then.
            link = ((lk[:1] + ent[-1][:1]) * 0.0).sum().to(h.dtype)
        lse = torch.cat(lse)[:N]
        entropy = torch.cat(ent)[:N]
        hit = torch.cat(hits)[:N]
        # (the target's logit rounded to h's type, as the products' logits are)
        picked = (h.float() * weight[targets].float()).sum(-1).to(h.dtype).float() / temperature
        ctx.save_for_backward(h, weight, targets, temperature, lse)
        ctx.mark_non_differentiable(entropy, hit)
        return picked - lse, entropy, hit

    @staticmethod
    def backward(ctx, g, _g_entropy, _g_hit):
        h, weight, targets, temperature, lse = ctx.saved_tensors
        K, N = HEAD_CHUNKS, h.shape[0]
        gs = g / temperature
        hp, lp, gp = (pad_chunks(x, K) for x in (h, lse, gs))
        grads, link = [], (gs[:1] * 0.0).sum().to(h.dtype)
        for k in range(K):
            p = torch.exp(((hp[k] + link) @ weight.t()).float() / temperature - lp[k].unsqueeze(-1))
            dk = -(p * gp[k].unsqueeze(-1)).to(h.dtype) @ weight
            grads.append(dk)
            link = (dk.reshape(-1)[:1] * 0.0).sum()
        grad = torch.cat(grads)[:N] + gs.unsqueeze(-1).to(h.dtype) * weight[targets]
        return grad, None, None, None


ATTENTION_CHUNKS = 8  # --attention-chunks: the log-prob and training graphs' attention runs over the queries in this many chunks


class _ChunkedAttention(torch.autograd.Function):
    """Causal GQA attention softmax(q·kᵀ·scaling + mask) · v for the graphs without a cache (the
    log-prob and training graphs), with no [heads, S, S] tensor larger than a chunk of queries:
    the queries go through in ATTENTION_CHUNKS chunks, one after another (each chunk's queries
    carry a zero from the previous chunk's output, so ONNX Runtime cannot run them side by side),
    each chunk's mask built from the positions and the padding mask. Only the output and the
    per-row log-normalisers are kept; the backward pass rebuilds each chunk's probabilities
    from them, as flash attention does: with D = rowsum(dO ⊙ O), dS = P ⊙ (dO·vᵀ − D),
    dq = dS·k·scaling, dk = dSᵀ·q·scaling, dv = Pᵀ·dO.

    q is [B, kv_heads, g, S, d] (the g query heads of a KV head together), k and v
    [B, kv_heads, T, d] with T = S, mask [B, T] (1: a token). Scores, softmax and the
    log-normalisers are fp32 whatever the inputs' type."""

    @staticmethod
    def _chunk_scores(qc, k, c, n, keep, scaling):
        """fp32 scores of the n queries of chunk c ([B, h, g, n, d]) against every key, masked."""
        B, h, g, _, d = qc.shape
        T = k.shape[2]
        s = torch.matmul(qc.reshape(B, h, g * n, d), k.transpose(2, 3)).float().view(B, h, g, n, T) * scaling
        q_pos = torch.arange(n) + c * n
        allowed = (torch.arange(T)[None, :] <= q_pos[:, None])[None] & keep  # [B, n, T]
        return s + torch.where(allowed, 0.0, torch.finfo(torch.float32).min)[:, None, None]

    @staticmethod
    def forward(ctx, q, k, v, mask, scaling):
        K, (B, h, g, S, d) = ATTENTION_CHUNKS, q.shape
        qp = pad_chunks(q.transpose(0, 3), K)  # [K, n, h, g, B, d]
        n = qp.shape[1]
        keep = mask.bool()[:, None, :]
        outs, lses, link = [], [], None
        for c in range(K):
            qc = qp[c].transpose(0, 3)
            if link is not None:
                qc = qc + link
            s = _ChunkedAttention._chunk_scores(qc, k, c, n, keep, scaling)
            m = s.amax(-1, keepdim=True)
            e = torch.exp(s - m)
            total = e.sum(-1, keepdim=True)
            p = (e / total).to(v.dtype).reshape(B, h, g * n, -1)
            o = torch.matmul(p, v).view(B, h, g, n, d)
            outs.append(o)
            lses.append((m + torch.log(total)).squeeze(-1))
            link = (o.reshape(-1)[:1] * 0.0).sum()
        o = torch.cat(outs, 3)[:, :, :, :S]
        lse = torch.cat(lses, 3)[:, :, :, :S]
        ctx.save_for_backward(q, k, v, mask, o, lse)
        ctx.scaling = scaling
        return o

    @staticmethod
    def backward(ctx, do):
        q, k, v, mask, o, lse = ctx.saved_tensors
        scaling, K, (B, h, g, S, d) = ctx.scaling, ATTENTION_CHUNKS, q.shape
        D = (do.float() * o.float()).sum(-1)  # [B, h, g, S]
        qp, dop = (pad_chunks(x.transpose(0, 3), K) for x in (q, do))
        lp, Dp = (pad_chunks(x.transpose(0, 3), K) for x in (lse, D))  # [K, n, h, g, B]
        n = qp.shape[1]
        keep = mask.bool()[:, None, :]
        dqs, dk, dv = [], None, None
        link = (do.reshape(-1)[:1] * 0.0).sum()
        for c in range(K):
            qc, doc = (x[c].transpose(0, 3) + link for x in (qp, dop))
            lc, Dc = (x[c].transpose(0, 3) for x in (lp, Dp))
            p = torch.exp(_ChunkedAttention._chunk_scores(qc, k, c, n, keep, scaling) - lc.unsqueeze(-1))
            dp = torch.matmul(doc.reshape(B, h, g * n, d), v.transpose(2, 3)).float().view(B, h, g, n, -1)
            ds = (p * (dp - Dc.unsqueeze(-1)) * scaling).to(q.dtype).reshape(B, h, g * n, -1)
            dqs.append(torch.matmul(ds, k).view(B, h, g, n, d))
            dkc = torch.matmul(ds.transpose(2, 3), qc.reshape(B, h, g * n, d))
            dvc = torch.matmul(p.to(v.dtype).reshape(B, h, g * n, -1).transpose(2, 3), doc.reshape(B, h, g * n, d))
            dk = dkc if dk is None else dk + dkc
            dv = dvc if dv is None else dv + dvc
            # From all three products: one that the chain did not wait for would run when its
            # sum is wanted, after the last chunk, keeping every chunk's probabilities alive.
            link = ((dqs[-1].reshape(-1)[:1] + dk.reshape(-1)[:1] + dv.reshape(-1)[:1]) * 0.0).sum()
        return torch.cat(dqs, 3)[:, :, :, :S], dk, dv, None, None


def token_logprobs(model, embeds, mask, pos, targets, temperature, lora, scale, recompute=False, hits=False):
    """log_softmax(logits / T) at the targets, and the entropy of each position's distribution
    (and with `hits`, whether the target is each position's most likely token),
    for the last C columns only (`targets` [B, C]: the completion's, which the runtime lays out
    at the end of every row): the prompt never reaches lm_head, and _ChunkedHead takes the
    completion through it a chunk of positions at a time, so no [B, C, V] tensor exists
    (--head-chunks 1: _TargetLogProbs, the logits of every position at once)."""
    h, _ = decoder_core(model, embeds, mask, pos, None, lora, scale, recompute=recompute)
    B, C = targets.shape
    # As a [B·C, hidden] matrix: on the 3-D slice torch's decomposition expands lm_head's weight
    # to a batch of copies for a batched product (1.24 GB each call at Qwen's vocabulary).
    hc = h.narrow(1, h.shape[1] - C, C).reshape(B * C, h.shape[2])
    if HEAD_CHUNKS == 1:
        logp, entropy, hit = _TargetLogProbs.apply(model.lm_head(hc).float(), targets.reshape(B * C),
                                                   temperature.to(torch.float32))
    else:
        logp, entropy, hit = _ChunkedHead.apply(hc, model.lm_head.weight, targets.reshape(B * C),
                                                temperature.to(torch.float32))
    if hits:
        return logp.view(B, C), entropy.view(B, C), hit.view(B, C)
    return logp.view(B, C), entropy.view(B, C)


def grpo_loss(logp, entropy, mask, old, ref, adv, low, high, dual, kl_coef, token_count, is_weights):
    """EasyR1's policy loss (verl/trainer/core_algos.py) with the low-variance KL in the loss:
    log-ratio clamped to ±20, asymmetric clip in log space, dual clip for negative advantages,
    k3 KL with its clamps, and the token sum divided by `token_count` (the response tokens of
    the whole mini-batch) so micro-batches add up to the global token mean. `is_weights` [B, C]
    multiplies each token's policy loss, not its KL (verl's rollout correction: truncated
    importance sampling by min(π_old / π_rollout, C); ones for none)."""
    m = mask.to(logp.dtype)
    a = adv[:, None]
    nkl = logp - old
    ratio = torch.exp(torch.clamp(nkl, -20.0, 20.0))
    clipped = torch.exp(torch.clamp(nkl, torch.log(1.0 - low), torch.log(1.0 + high)))
    pg1, pg2, pg3 = -a * ratio, -a * clipped, -a * dual
    higher = torch.maximum(pg1, pg2)
    lower = torch.minimum(higher, pg3)
    pg = torch.where(a < 0, lower, higher) * is_weights
    k = torch.clamp(ref - logp, -20.0, 20.0)
    kl = torch.clamp(torch.exp(k) - k - 1.0, -10.0, 10.0)
    loss = ((pg + kl_coef * kl) * m).sum() / token_count
    with torch.no_grad():
        stats = torch.stack([m.sum(), ((pg1 < pg2).to(m.dtype) * m).sum(),
                             (((higher > pg3) & (a < 0)).to(m.dtype) * m).sum(), (-nkl * m).sum(), (kl * m).sum(),
                             (entropy * m).sum()])
    return loss, stats


class LogProbs(nn.Module):
    def __init__(self, model, lora_names, scale):
        super().__init__()
        self.model, self.lora_names, self.scale = model, lora_names, scale

    def forward(self, inputs_embeds, attention_mask, position_ids, target_ids, temperature, lora_tensors):
        lora = {n: (lora_tensors[2 * j], lora_tensors[2 * j + 1]) for j, n in enumerate(self.lora_names)}
        return token_logprobs(self.model, inputs_embeds, attention_mask, position_ids, target_ids, temperature, lora,
                              self.scale)


def scaled_grads(loss, loss_scale, ws, embeds):
    """The LoRA gradients of `loss` by backward on loss · loss_scale, divided back (loss scaling:
    an fp16 graph's half-precision gradients stay above its underflow; the scale is 1 for fp32
    and bf16, dynamic for fp16), and with `embeds` (a package with vision-tower LoRA) the
    gradient of loss · loss_scale at the input embeddings, fp32 and still scaled: the trainer
    gathers its image rows and takes them through the vision tower (vision_grad.onnx), which
    divides the scale back."""
    gs = torch.autograd.grad(loss * loss_scale, ws + ([embeds] if embeds is not None else []))
    grads = [g / loss_scale for g in gs[:len(ws)]]
    return grads + ([gs[-1].float()] if embeds is not None else [])


def train_step_fn(model, lora_names, scale, embeds_grad=False):
    """(batch…, lora…) → (loss, token_logprobs, grads…, stats[, grad.inputs_embeds]): the
    function traced into train.onnx."""
    nb = len(TRAIN_BATCH)

    def step(*args):
        b, ws = args[:nb], list(args[nb:])
        with torch.enable_grad():
            ws = [w.detach().requires_grad_(True) for w in ws]
            x = b[0].detach().requires_grad_(True) if embeds_grad else b[0]
            lora = {n: (ws[2 * j], ws[2 * j + 1]) for j, n in enumerate(lora_names)}
            logp, ent = token_logprobs(model, x, b[1], b[2], b[3], b[8], lora, scale, recompute=True)
            loss, stats = grpo_loss(logp, ent.detach(), b[4], b[5], b[6], b[7], b[9], b[10], b[11], b[12], b[13],
                                    b[14])
            grads = scaled_grads(loss, b[15], ws, x if embeds_grad else None)
        return (loss.detach(), logp.detach(), *grads[:len(ws)], stats, *grads[len(ws):])

    return step


SFT_BATCH = ["inputs_embeds", "attention_mask", "position_ids", "target_ids", "loss_mask", "token_count", "loss_scale"]
SFT_STATS = ["tokens", "correct"]


def sft_step_fn(model, lora_names, scale, embeds_grad=False):
    """(batch…, lora…) → (loss, grads…, stats): the SFT cold start's step traced into sft.onnx.
    Cross-entropy of the response tokens (`loss_mask` [B, C]: 1 at a label, 0 at prompt, image
    and padding positions, as LLaMA-Factory masks them with -100), summed and divided by
    `token_count` (the optimizer step's label tokens, so micro-batches add up to the global
    token mean); stats: label tokens and those the model ranks first (token accuracy)."""
    nb = len(SFT_BATCH)

    def step(*args):
        b, ws = args[:nb], list(args[nb:])
        with torch.enable_grad():
            ws = [w.detach().requires_grad_(True) for w in ws]
            x = b[0].detach().requires_grad_(True) if embeds_grad else b[0]
            lora = {n: (ws[2 * j], ws[2 * j + 1]) for j, n in enumerate(lora_names)}
            one = torch.ones((), dtype=torch.float32)
            logp, _, hit = token_logprobs(model, x, b[1], b[2], b[3], one, lora, scale, recompute=True, hits=True)
            m = b[4].to(logp.dtype)
            loss = -(logp * m).sum() / b[5]
            grads = scaled_grads(loss, b[6], ws, x if embeds_grad else None)
        with torch.no_grad():
            stats = torch.stack([m.sum(), (hit * m).sum()])
        return (loss.detach(), *grads[:len(ws)], stats, *grads[len(ws):])

    return step


def vision_grad_fn(model, vis_names, scale):
    """(pixel_values, image_grid_thw, grad_features, loss_scale, vision lora…) → the vision
    LoRA gradients: the vision tower's backward from `grad_features` (the gradient of the scaled
    loss at the image features, fp32), each block recomputed in the backward, divided by
    `loss_scale`. Traced into vision_grad.onnx."""
    V = Vision(model, vis_names, scale)

    def step(px, grid, grad_features, loss_scale, *ws):
        with torch.enable_grad():
            ws = [w.detach().requires_grad_(True) for w in ws]
            lora = {n: (ws[2 * j], ws[2 * j + 1]) for j, n in enumerate(vis_names)}
            f = V.features(px, grid, lora, recompute=True)
            gs = torch.autograd.grad(f, ws, grad_features.reshape(f.shape).to(f.dtype))
        return tuple(g / loss_scale for g in gs)

    return step


def batch_rows(model, B, S, g):
    """B rows of S random tokens from generator `g` (row 1 left-padded by 3): their
    embeddings, attention mask, positions, and the next-token targets of the last
    C = S − S//2 columns."""
    ids = torch.randint(0, 1900, (B, S), generator=g)
    am = torch.ones(B, S, dtype=torch.int64)
    am[1 % B, :3] = 0
    pos = (am.cumsum(-1) - 1).clamp(min=0)[None].expand(3, B, S).contiguous()
    with torch.no_grad():
        x = model.model.language_model.embed_tokens(ids)
    return x, am, pos, torch.cat([ids[:, 1:], ids[:, :1]], 1)[:, S // 2:]


def sft_batch(model, B=2, S=24, seed=4):
    """An SFT micro-batch: left padding on row 1, the response in the last C columns, its last
    column padding on row 0."""
    x, am, pos, tgt = batch_rows(model, B, S, torch.Generator().manual_seed(seed))
    lm = torch.ones(B, S - S // 2)
    lm[0, -1] = 0.0
    return [x, am, pos, tgt, lm, lm.sum() * 2, torch.tensor(1.0)]


def train_batch(model, B=2, S=24, seed=0, settings=(1.0, 0.2, 0.3, 3.0, 0.01)):
    """A GRPO micro-batch: a prompt with left padding on row 1, completion tokens at the end,
    positive and negative advantages, old/ref log-probs near the policy's, rollout-correction
    weights in [0.5, 1.5)."""
    g = torch.Generator().manual_seed(seed)
    x, am, pos, tgt = batch_rows(model, B, S, g)
    # The completion is the last C = S − S//2 columns; its last column is padding.
    cm = torch.ones(B, S - S // 2)
    cm[:, -1] = 0.0
    return grpo_batch(model, x, am, pos, tgt, cm, g, settings)


def grpo_batch(model, x, am, pos, tgt, cm, g, settings=(1.0, 0.2, 0.3, 3.0, 0.01)):
    """TRAIN_BATCH of rows (embeddings, mask, positions, targets, completion mask): old/ref
    log-probs near the base model's, advantages from 1 to −1, rollout-correction weights in
    [0.5, 1.5), the settings, the token count (twice the rows': a mini-batch of two such)."""
    B = x.shape[0]
    with torch.no_grad():
        lp, _ = token_logprobs(model, x, am, pos, tgt, torch.tensor(settings[0]), {}, 1.0)
    old = lp + 0.3 * torch.randn(*lp.shape, generator=g)
    ref = lp + 0.3 * torch.randn(*lp.shape, generator=g)
    adv = torch.linspace(1.0, -1.0, B)
    t, low, high, dual, kl = (torch.tensor(v) for v in settings)
    isw = 0.5 + torch.rand(*lp.shape, generator=g)
    return [x, am, pos, tgt, cm, old, ref, adv, t, low, high, dual, kl, cm.sum() * 2, isw, torch.tensor(1.0)]


def export_training(model, out, names, shapes_, scale):
    from torch.export import Dim

    lora_names, vis = [n for n in names if not is_visual(n)], [n for n in names if is_visual(n)]
    for p in model.parameters():
        p.requires_grad_(False)
    lora = random_lora(lora_names, shapes_, 2)
    lora_in = [f"{n}.{m}" for n in lora_names for m in ("A", "B")]
    b, s = Dim("batch_size", min=1, max=4096), Dim("sequence_length", min=2, max=1 << 17)
    c = Dim("completion_length", min=1, max=1 << 17)
    batch = train_batch(model)
    dims = {"inputs_embeds": {0: "batch_size", 1: "sequence_length"},
            "attention_mask": {0: "batch_size", 1: "sequence_length"},
            "position_ids": {1: "batch_size", 2: "sequence_length"},
            "target_ids": {0: "batch_size", 1: "completion_length"},
            "token_logprobs": {0: "batch_size", 1: "completion_length"},
            "token_entropy": {0: "batch_size", 1: "completion_length"}}
    with torch.no_grad():
        export(LogProbs(model, lora_names, scale).eval(), (batch[0], batch[1], batch[2], batch[3], batch[8], lora),
               f"{out}/logprobs.onnx", ["inputs_embeds", "attention_mask", "position_ids", "target_ids", "temperature"]
               + lora_in, ["token_logprobs", "token_entropy"],
               {"inputs_embeds": {0: b, 1: s}, "attention_mask": {0: b, 1: s}, "position_ids": {1: b, 2: s},
                "target_ids": {0: b, 1: c}, "temperature": {}, "lora_tensors": [{} for _ in lora]}, dims,
               lora_defaults(lora_names, shapes_))
    step = train_step_fn(model, lora_names, scale, embeds_grad=bool(vis))
    bs, bc = {0: b, 1: s}, {0: b, 1: c}
    ds = [bs, bs, {1: b, 2: s}, bc, bc, bc, bc, {0: b}] + [None] * 6 + [bc, None] + [None] * len(lora)
    # (a package with vision-tower LoRA: the scaled loss's gradient at the input embeddings too)
    extra = ["grad.inputs_embeds"] if vis else []
    dims["grad.inputs_embeds"] = {0: "batch_size", 1: "sequence_length"}
    out_names = ["loss", "token_logprobs"] + [f"grad.{n}" for n in lora_in] + ["stats"] + extra
    for k in ("completion_mask", "old_logprobs", "ref_logprobs", "rollout_is_weights", "loss_mask"):
        dims[k] = {0: "batch_size", 1: "completion_length"}
    dims["advantages"] = {0: "batch_size"}
    export_joint(step, batch + lora, f"{out}/train.onnx", TRAIN_BATCH + lora_in, out_names, ds, dims)
    # The SFT cold start's step: the same forward, recomputation and head, a cross-entropy loss.
    sft = sft_step_fn(model, lora_names, scale, embeds_grad=bool(vis))
    ds = [bs, bs, {1: b, 2: s}, bc, bc, None, None] + [None] * len(lora)
    export_joint(sft, sft_batch(model) + lora, f"{out}/sft.onnx", SFT_BATCH + lora_in,
                 ["loss"] + [f"grad.{n}" for n in lora_in] + ["stats"] + extra, ds, dims)
    vgrad = None
    if vis:
        # The vision tower's backward, run by the trainer once per image and optimizer step on
        # the image rows of grad.inputs_embeds summed over the micro-batches.
        vgrad = vision_grad_fn(model, vis, scale)
        px, grid = vision_example(model)
        with torch.no_grad():
            nf = Vision(model).features(px, grid, {}).shape[0]
        gf = torch.randn(nf, model.config.vision_config.out_hidden_size)
        vlora = random_lora(vis, shapes_, 6)
        vin = [f"{n}.{m}" for n in vis for m in ("A", "B")]
        P, n = Dim("num_patches", min=4, max=1 << 20), Dim("num_logical_patches", min=1, max=1 << 18)
        ds = [{0: P}, {0: Dim("num_images", max=1024)}, {0: n}, None] + [None] * len(vlora)
        export_joint(vgrad, [px, grid, gf, torch.tensor(1.0)] + vlora, f"{out}/vision_grad.onnx",
                     ["pixel_values", "image_grid_thw", "grad_features", "loss_scale"] + vin,
                     [f"grad.{k}" for k in vin], ds,
                     {"pixel_values": {0: "num_patches"}, "image_grid_thw": {0: "num_images"},
                      "grad_features": {0: "num_logical_patches"}})
    return step, sft, vgrad


def export_joint(fn, example, path, in_names, out_names, ds, dims):
    """A forward + backward step function traced with make_fx into core ATen ops (its autograd
    calls become plain operations) and exported as one graph."""
    from torch._decomp import core_aten_decompositions
    from torch.fx.experimental.proxy_tensor import make_fx

    t0 = time.time()
    gm = make_fx(fn, decomposition_table=core_aten_decompositions(), tracing_mode="symbolic",
                 _allow_non_fake_inputs=True)(*example)
    print(f"  {os.path.basename(path)} step traced: {len(gm.graph.nodes)} nodes in {time.time() - t0:.1f} s",
          flush=True)

    class Joint(nn.Module):
        def __init__(self, gm):
            super().__init__()
            self.gm = gm

        def forward(self, *args):
            return self.gm(*args)

    export(Joint(gm).eval(), tuple(example), path, in_names, out_names, (tuple(ds),), dims, split_slices=False)


# ----------------------------------------------------------------------------------------------
# Verification against transformers
# ----------------------------------------------------------------------------------------------

def synthetic_image(w, h, seed):
    from PIL import Image

    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w]
    img = np.stack([(x * 255 // w), (y * 255 // h), ((x + y) * 3) % 256], -1)
    return Image.fromarray((img * 0.8 + rng.integers(0, 50, img.shape)).clip(0, 255).astype(np.uint8), "RGB")


def rope_index(ids, mask, grids, image_id, merge):
    B, S = ids.shape
    pos = np.zeros((3, B, S), dtype=np.int64)
    deltas = np.zeros(B, dtype=np.int64)
    it = iter(grids)
    for b in range(B):
        keep = mask[b].astype(bool)
        seq = ids[b][keep]
        cols, cur, i = [], 0, 0
        while i < len(seq):
            if seq[i] == image_id:
                t, h, w = next(it)
                lh, lw = h // merge, w // merge
                T, H, W = np.meshgrid(np.arange(t), np.arange(lh), np.arange(lw), indexing="ij")
                cols.append(np.stack([T.reshape(-1), H.reshape(-1), W.reshape(-1)]) + cur)
                cur += max(h, w) // merge
                i += t * lh * lw
            else:
                cols.append(np.full((3, 1), cur))
                cur += 1
                i += 1
        llm = np.concatenate(cols, 1)
        pos[:, b, keep] = llm
        deltas[b] = llm.max() + 1 - len(seq)
    return pos, deltas


def check_config_layouts(hf_dir):
    """A transformers 4.x flat config.json and the 5.x nested one load to the same model config."""
    from transformers import Qwen2_5_VLConfig

    new = json.load(open(os.path.join(hf_dir, "config.json")))
    tc = new["text_config"]
    old = {k: v for k, v in new.items() if k != "text_config"}
    old.update({k: v for k, v in tc.items() if k not in ("rope_parameters", "model_type")})
    old["rope_theta"] = tc["rope_parameters"]["rope_theta"]
    old["rope_scaling"] = {"type": "mrope", "mrope_section": tc["rope_parameters"]["mrope_section"]}
    a = Qwen2_5_VLConfig(**normalise_config_dict(new)).text_config
    b = Qwen2_5_VLConfig(**normalise_config_dict(old)).text_config
    for k in ("hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "vocab_size"):
        if getattr(a, k) != getattr(b, k):
            raise SystemExit(f"verify: 4.x config layout gives {k}={getattr(b, k)}, 5.x gives {getattr(a, k)}")
    if a.rope_parameters["mrope_section"] != b.rope_parameters["mrope_section"]:
        raise SystemExit("verify: the 4.x rope_scaling mrope_section is lost")
    print("  config.json: transformers 4.x and 5.x layouts load the same model config")


def past0_of(rows, kvh, hd, L):
    """An empty cache (no tokens yet) for `rows` rows, as decoder inputs."""
    return empty_cache("past_key_values", rows, kvh, hd, L)


# Tolerances of --verify by the graphs' dtype: |onnx − transformers in the same dtype| of the
# logits and log-probs, and the training graph's against torch autograd (relative gradients;
# `fp32 grads`: a half graph's gradients against fp32 autograd of the same weights).
TOL = {"fp32": {"logits": 1e-4, "logprobs": 1e-4, "grads": 1e-5, "loss": 1e-5, "sum": 1e-6, "fd": 1e-3},
       "fp16": {"logits": 3e-2, "logprobs": 3e-2, "grads": 2e-2, "loss": 1e-3, "sum": 1e-4, "fd": 5e-2,
                "fp32 grads": 5e-2},
       "bf16": {"logits": 2.5e-1, "logprobs": 2.5e-1, "grads": 1e-1, "loss": 1e-2, "sum": 1e-3, "fd": 2e-1,
                "fp32 grads": 2e-1}}


def providers():
    """CUDA where onnxruntime has it (bf16 graphs need it), else the CPU."""
    import onnxruntime as ort
    if DTYPE == "bf16":
        if "CUDAExecutionProvider" not in ort.get_available_providers():
            raise SystemExit("verify: bf16 graphs need onnxruntime-gpu (ONNX Runtime's CPU provider has no bf16 "
                             "kernels); export without --verify here and verify on a GPU")
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    return ["CPUExecutionProvider"]


class Typed:
    """An ONNX Runtime session fed and read as fp32 numpy whatever its floating-point types: a
    half-precision package's activations and cache are converted at the graph's edges, as the
    runtime does (half → fp32 → half is exact)."""

    def __init__(self, path, so):
        import onnxruntime as ort
        self.s = ort.InferenceSession(path, so, providers=providers())
        self.types = {i.name: i.type for i in list(self.s.get_inputs()) + list(self.s.get_overridable_initializers())}

    def run(self, names, feeds):
        conv = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(bfloat16)": np_dtype()}
        f = {k: (v.astype(conv[self.types[k]]) if self.types.get(k) in conv and v.dtype != conv[self.types[k]]
                 else v) for k, v in feeds.items()}
        return [o.astype(np.float32) if o.dtype in (np.float16, np_dtype()) else o for o in self.s.run(names, f)]


def f32(t):
    """A torch result as fp32 numpy."""
    return t.detach().float().numpy()


def verify(model, hf_dir, out, lora_names, lora_shapes_, tol=1e-4):
    check_config_layouts(hf_dir)
    from tokenizers import Tokenizer
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    import onnxruntime as ort
    so = ort.SessionOptions()
    so.intra_op_num_threads = 2
    sess = {g: Typed(f"{out}/{g}.onnx", so) for g in ("vision", "embedding", "decoder")}
    proc = Qwen2VLImageProcessorPil()
    cfg, tc = model.config, model.config.text_config
    worst = {}

    def note(k, v):
        worst[k] = max(worst.get(k, 0.0), float(v))

    # 1. vision on unseen sizes and several images per call
    for sizes in ([(224, 168)], [(140, 308)], [(84, 252), (224, 168)], [(448, 336)]):
        imgs = [synthetic_image(w, h, i) for i, (w, h) in enumerate(sizes)]
        pi = proc(images=imgs, return_tensors="np")
        pv, grid = pi["pixel_values"].astype(np.float32), pi["image_grid_thw"].astype(np.int64)
        got = sess["vision"].run(None, {"pixel_values": pv, "image_grid_thw": grid})[0]
        with torch.no_grad():
            ref = f32(model.model.visual(torch.from_numpy(pv), grid_thw=torch.from_numpy(grid)).pooler_output)
        note("vision", np.abs(got - ref).max())

    # 2. prefill + 5 greedy decode steps, a left-padded batch of two prompts with images
    tok = Tokenizer.from_file(os.path.join(hf_dir, "tokenizer.json"))
    image_id = cfg.image_token_id
    prompts = [("Which patch is flipped?", [(224, 168)]), ("Sort the regions by depth.", [(84, 252), (140, 112)])]
    seqs, grids, pvs = [], [], []
    for text, sizes in prompts:
        imgs = [synthetic_image(w, h, 7 + i) for i, (w, h) in enumerate(sizes)]
        pi = proc(images=imgs, return_tensors="np")
        g = pi["image_grid_thw"].tolist()
        body = "".join("<|vision_start|>" + "<|image_pad|>" * (t * h * w // 4) + "<|vision_end|>" for t, h, w in g)
        prompt = f"<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n{body}{text}<|im_end|>\n<|im_start|>assistant\n"
        seqs.append(tok.encode(prompt, add_special_tokens=False).ids)
        grids += g
        pvs.append(pi["pixel_values"].astype(np.float32))
    S = max(len(s) for s in seqs)
    pad = tc.pad_token_id
    ids = np.array([[pad] * (S - len(s)) + s for s in seqs], dtype=np.int64)
    mask = np.array([[0] * (S - len(s)) + [1] * len(s) for s in seqs], dtype=np.int64)
    pv, grid = np.concatenate(pvs), np.array(grids, dtype=np.int64)
    feats = sess["vision"].run(None, {"pixel_values": pv, "image_grid_thw": grid})[0]
    pos, deltas = rope_index(ids, mask, grids, image_id, cfg.vision_config.spatial_merge_size)
    L, kvh = tc.num_hidden_layers, tc.num_key_value_heads
    hd = getattr(tc, "head_dim", None) or tc.hidden_size // tc.num_attention_heads
    zeros = {}
    for n in lora_names:
        a, b = lora_shapes_[n]
        zeros[f"{n}.A"] = np.zeros(a, np.float32)
        zeros[f"{n}.B"] = np.zeros(b, np.float32)
    past = past0_of(2, kvh, hd, L)
    cur_ids, cur_mask, cur_pos, cur_feats = ids, mask, pos, feats
    greedy0, step_ids, step_logits = [], [], []
    all_ids, all_mask = ids.copy(), mask.copy()
    for step in range(6):
        emb = sess["embedding"].run(None, {"input_ids": cur_ids, "image_features": cur_feats})[0]
        outs = sess["decoder"].run(None, {"inputs_embeds": emb, "attention_mask": all_mask, "position_ids": cur_pos,
                                          **past, **zeros})
        logits = outs[0][:, -1]
        with torch.no_grad():
            mm = (torch.from_numpy(all_ids) == image_id).to(torch.int64)
            ref = f32(model(input_ids=torch.from_numpy(all_ids), attention_mask=torch.from_numpy(all_mask),
                            pixel_values=torch.from_numpy(pv), image_grid_thw=torch.from_numpy(grid),
                            mm_token_type_ids=mm).logits[:, -1])
        note("logits" if step == 0 else "decode logits", np.abs(logits - ref).max())
        nxt = logits.argmax(-1)
        greedy0.append(int(nxt[0]))
        if step > 0:
            step_logits.append(logits)
        step_ids.append(nxt.astype(np.int64))
        if not (nxt == ref.argmax(-1)).all():
            raise SystemExit(f"verify: greedy token differs at step {step}")
        past = {k.replace("present", "past_key_values"): v for k, v in zip(
            [f"present.{i}.{kv}" for i in range(L) for kv in ("key", "value")], outs[1:])}
        cur_ids = nxt[:, None].astype(np.int64)
        cur_feats = np.zeros((0, feats.shape[1]), np.float32)
        n_seen = all_mask.sum(1)
        cur_pos = np.broadcast_to((n_seen + deltas)[None, :, None], (3, 2, 1)).astype(np.int64).copy()
        all_ids = np.concatenate([all_ids, cur_ids], 1)
        all_mask = np.concatenate([all_mask, np.ones((2, 1), np.int64)], 1)

    # 2a. the shared prompt cache: the prefill's cache read in place by 3 samples per prompt, rows
    # shuffled and one sample dropped after the first step, gives the same logits as step 2; so
    # does each row's own cache read in place from a buffer of 8 slots the new keys are written to
    prefill = [f"present.{i}.{kv}" for i in range(L) for kv in ("key", "value")]
    outs = sess["decoder"].run(None, {"inputs_embeds": sess["embedding"].run(None, {"input_ids": ids, "image_features": feats})[0],
                                      "attention_mask": mask, "position_ids": pos, **past0_of(2, kvh, hd, L), **zeros})
    prefix = {f"prefix_key_values.{k[len('present.'):]}": v for k, v in zip(prefill, outs[1:])}
    rows = np.array([1, 0, 1, 0, 0, 1])  # prompt of each row
    own = past0_of(len(rows), kvh, hd, L)
    buf = {f"own_key_values.{i}.{kv}": np.zeros((len(rows), kvh, 8, hd), np.float32) for i in range(L) for kv in ("key", "value")}
    buf_mask = np.zeros((len(rows), 8), np.int64)
    deltas_np = np.asarray(deltas)
    for step in range(len(step_logits)):
        if step == 1:
            rows = rows[[0, 1, 2, 4, 5]]
            own = {k: v[[0, 1, 2, 4, 5]] for k, v in own.items()}
            buf = {k: v[[0, 1, 2, 4, 5]] for k, v in buf.items()}
            buf_mask = buf_mask[[0, 1, 2, 4, 5]]
        gs = max(int((rows == p).sum()) for p in (0, 1))
        slot_rows, row_slots = np.zeros(2 * gs, np.int64), np.zeros(len(rows), np.int64)
        for p in (0, 1):
            for j, r in enumerate(np.flatnonzero(rows == p)):
                slot_rows[p * gs + j], row_slots[r] = r, p * gs + j
        n_seen = mask.sum(1)[rows] + step
        feed = {
            "inputs_embeds": sess["embedding"].run(None, {"input_ids": step_ids[step][rows][:, None],
                                                          "image_features": feats[:0]})[0],
            "position_ids": np.broadcast_to((n_seen + deltas_np[rows])[None, :, None], (3, len(rows), 1)).astype(np.int64).copy(),
            **prefix, "prefix_mask": mask, "slot_rows": slot_rows, "row_slots": row_slots, **zeros}
        o = sess["decoder"].run(None, {**feed, **own, "attention_mask": np.ones((len(rows), step + 1), np.int64)})
        note("shared-prefix logits", np.abs(o[0][:, -1] - step_logits[step][rows]).max())
        own = {k.replace("present", "past_key_values"): v for k, v in zip(prefill, o[1:])}
        o = sess["decoder"].run(None, {**feed, **past0_of(len(rows), kvh, hd, L), **buf, "own_mask": buf_mask,
                                       "attention_mask": np.ones((len(rows), 1), np.int64)})
        note("own cache in place logits", np.abs(o[0][:, -1] - step_logits[step][rows]).max())
        for k, v in zip(prefill, o[1:]):
            assert v.shape == (len(rows), kvh, 1, hd), (k, v.shape)
            buf[k.replace("present", "own_key_values")][:, :, step] = v[:, :, 0]
        buf_mask[:, step] = 1

    # 2b. onnxruntime-genai runs the package with its own preprocessing, template and positions
    try:
        import onnxruntime_genai as og
    except ImportError:
        og = None
        print("  onnxruntime-genai not installed: interop check skipped")
    if og is not None:
        import tempfile

        with tempfile.TemporaryDirectory() as td:
            path = os.path.join(td, "image.png")
            synthetic_image(224, 168, 7).save(path)
            gm = og.Model(out)
            gp = gm.create_multimodal_processor()
            text = prompts[0][0]
            rendered = ("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
                        f"<|vision_start|><|image_pad|><|vision_end|>{text}<|im_end|>\n<|im_start|>assistant\n")
            inputs = gp(rendered, images=og.Images.open(path))
            params = og.GeneratorParams(gm)
            params.set_search_options(max_length=len(seqs[0]) + len(greedy0), do_sample=False)
            gen = og.Generator(gm, params)
            gen.set_inputs(inputs)
            toks = []
            while not gen.is_done() and len(toks) < len(greedy0):
                gen.generate_next_token()
                toks.append(int(gen.get_next_tokens()[0]))
        print(f"  onnxruntime-genai greedy {toks}, transformers {greedy0}")
        if toks != greedy0:
            raise SystemExit("verify: onnxruntime-genai does not reproduce the greedy tokens")

    # 3. LoRA inputs: a random adapter through ONNX equals the torch LoRA forward
    rng = np.random.default_rng(3)
    adapter = {}
    for n in lora_names:
        a, b = lora_shapes_[n]
        adapter[f"{n}.A"] = (rng.standard_normal(a) * 0.1).astype(np.float32)
        adapter[f"{n}.B"] = (rng.standard_normal(b) * 0.1).astype(np.float32)
    emb = sess["embedding"].run(None, {"input_ids": ids, "image_features": feats})[0]
    past0 = past0_of(2, kvh, hd, L)
    got = sess["decoder"].run(["logits"], {"inputs_embeds": emb, "attention_mask": mask, "position_ids": pos,
                                           **past0, **adapter})[0]
    scale = json.load(open(f"{out}/manifest.json"))["lora"]["scale"]
    with torch.no_grad():
        lora = {n: (torch.from_numpy(adapter[f"{n}.A"]), torch.from_numpy(adapter[f"{n}.B"])) for n in lora_names}
        h, _ = decoder_core(model, torch.from_numpy(emb).to(torch_dtype()), torch.from_numpy(mask),
                            torch.from_numpy(pos), None, lora, scale)
        ref = f32(model.lm_head(h[:, -1:]))
    note("lora logits", np.abs(got - ref).max())
    base = sess["decoder"].run(["logits"], {"inputs_embeds": emb, "attention_mask": mask, "position_ids": pos,
                                            **past0, **zeros})[0]
    if np.abs(base - got).max() < 1e-3:
        raise SystemExit("verify: the LoRA inputs do not change the logits")
    # 4. vision speed at 896×672 (3,072 patches) against transformers eager on the same CPU
    torch.set_num_threads(2)
    pi = proc(images=[synthetic_image(896, 672, 0)], return_tensors="np")
    pv, grid = pi["pixel_values"].astype(np.float32), pi["image_grid_thw"].astype(np.int64)

    def median_time(f, n=5):
        f()
        ts = []
        for _ in range(n):
            t0 = time.perf_counter()
            f()
            ts.append(time.perf_counter() - t0)
        return sorted(ts)[n // 2]

    t_onnx = median_time(lambda: sess["vision"].run(None, {"pixel_values": pv, "image_grid_thw": grid}))
    # (a half graph on the CPU is not a speed the runtime promises: fp16 is for GPUs)
    limit = 2 if DTYPE == "fp32" else 20
    with torch.no_grad():
        t_hf = median_time(lambda: model.model.visual(torch.from_numpy(pv), grid_thw=torch.from_numpy(grid)))
    print(f"  vision 896×672: onnxruntime {t_onnx * 1e3:.1f} ms, transformers eager {t_hf * 1e3:.1f} ms "
          f"(ratio {t_onnx / t_hf:.2f}, limit {limit})")
    if t_onnx > limit * t_hf:
        raise SystemExit("verify: vision graph more than 2× slower than transformers")
    for k, v in worst.items():
        print(f"  max |onnx − transformers| {k}: {v:.2e}")
    bad = {k: v for k, v in worst.items() if v > tol}
    if bad:
        raise SystemExit(f"verify failed (tolerance {tol}): {bad}")
    print("  verify: ok (greedy tokens identical over 6 steps, left-padded batch of 2, 5 images)")


def check_recompute_order(out, feeds):
    """ONNX Runtime's own execution order, from its profile: no node of the backward pass's
    recomputations (a node downstream of a zero taken from a gradient, see _Recompute,
    _ChunkedHead and _ChunkedAttention) may run before the loss is computed, or every layer's
    recomputed activations would be alive at once. The forward pass's own chaining zeros (the
    head's and attention's chunks) are told apart as the ones the loss depends on. Returns
    (recomputed nodes run, gradient zeros)."""
    import collections
    import onnx
    import onnxruntime as ort
    from onnx import numpy_helper

    m = onnx.load(f"{out}/train.onnx", load_external_data=False)
    inits = {i.name: i for i in m.graph.initializer}
    zero = {n for i in inits.values() if not list(i.dims) and i.data_type in FLOAT_TYPES
            and numpy_helper.to_array(i).item() == 0.0 for n in [i.name]}
    prod = {o: n for n in m.graph.node for o in n.output}
    loss = prod["loss"]
    # Everything the loss is computed from: the forward pass.
    forward, stack = set(), list(loss.input)
    while stack:
        n = prod.get(stack.pop())
        if n is not None and n.name not in forward:
            forward.add(n.name)
            stack.extend(n.input)
    # The zeros of the recomputations: Mul(x, 0.0) outside the forward pass.
    salts = [n for n in m.graph.node if n.op_type == "Mul" and zero & set(n.input) and n.name not in forward]
    cons = collections.defaultdict(list)
    for n in m.graph.node:
        for i in n.input:
            cons[i].append(n)
    down, stack = set(), [o for n in salts for o in n.output]
    while stack:
        for n in cons[stack.pop()]:
            if n.name not in down:
                down.add(n.name)
                stack.extend(n.output)
    so = ort.SessionOptions()
    so.enable_profiling = True
    so.intra_op_num_threads = 1
    so.log_severity_level = 3
    so.profile_file_prefix = os.path.join(out, "order-profile")
    sess = Typed(f"{out}/train.onnx", so)
    sess.run(None, feeds)
    prof = sess.s.end_profiling()
    ev = sorted((e for e in json.load(open(prof)) if e.get("cat") == "Node" and e["name"].endswith("_kernel_time")),
                key=lambda e: e["ts"])
    os.remove(prof)
    order = {e["name"][:-len("_kernel_time")]: k for k, e in enumerate(ev)}
    # The forward pass ends with the last of the head's chunks: the products with the
    # vocabulary-sized weight that the loss depends on.
    vocab = max(int(d) for i in inits.values() for d in i.dims) if inits else 0
    head = [n.name for n in m.graph.node if n.name in forward and n.op_type in ("MatMul", "FusedMatMul", "Gemm")
            and any(i in inits and vocab in list(inits[i].dims) for i in n.input)]
    if len(salts) == 0 or len(head) != HEAD_CHUNKS or not all(h in order for h in head):
        raise SystemExit(f"verify: train.onnx has {len(salts)} recomputations and {len(head)} vocabulary "
                         f"products in the forward pass (want {HEAD_CHUNKS})")
    end = max(order[h] for h in head)
    early = [n for n in down if n in order and order[n] < end]
    if early:
        raise SystemExit(f"verify: {len(early)} recomputation nodes run during the forward pass")
    return sum(1 for n in down if n in order), len(salts)


def verify_training(model, hf_dir, out, names, shapes_, step):
    import onnxruntime as ort

    tols = TOL[DTYPE]
    tol, lp_tol = tols["grads"], tols["logprobs"]
    so = ort.SessionOptions()
    so.intra_op_num_threads = 2
    train = Typed(f"{out}/train.onnx", so)
    lp_sess = Typed(f"{out}/logprobs.onnx", so)
    scale = json.load(open(f"{out}/manifest.json"))["lora"]["scale"]
    lora_in = [f"{n}.{m}" for n in names for m in ("A", "B")]
    lora = random_lora(names, shapes_, 5)
    # (a package with vision-tower LoRA: the training graph's last output, grad.inputs_embeds, is
    # checked by verify_vision)
    trim = (lambda o: list(o)[:-1]) if "vision_grad" in json.load(open(f"{out}/manifest.json"))["graphs"] else list

    def feeds(batch):
        return {k: f32(v) if v.is_floating_point() else v.numpy() for k, v in zip(TRAIN_BATCH + lora_in, list(batch) + lora)}

    # 1. ORT against torch autograd, at the export shape and a new one
    for tag, batch in (("B=2 S=24", train_batch(model)), ("B=3 S=40", train_batch(model, B=3, S=40, seed=1))):
        got = trim(train.run(None, feeds(batch)))
        ref = [f32(t) for t in trim(step(*batch, *lora))]
        dl, dlp = abs(float(got[0]) - float(ref[0])), np.abs(got[1] - ref[1]).max()
        rel = max(np.abs(g - r).max() / (np.abs(r).max() + 1e-12) for g, r in zip(got[2:-1], ref[2:-1]))
        dst = np.abs(got[-1] - ref[-1]).max()
        print(f"  train.onnx vs torch autograd [{tag}]: loss {dl:.1e}, log-probs {dlp:.1e}, grads rel {rel:.1e}, "
              f"stats {dst:.1e}", flush=True)
        if rel > tol or dl > tols["loss"] or dlp > lp_tol or dst > 1e-3 * max(1.0, float(np.abs(ref[-1]).max())):
            raise SystemExit("verify: train.onnx differs from torch autograd")
    # 1b. ONNX Runtime recomputes each layer in the backward pass, not during the forward
    ran, layers = check_recompute_order(out, feeds(train_batch(model)))
    print(f"  recomputation ({layers} gradient zeros: the layers, the head's and attention's chunks): {ran} nodes, "
          f"none before the forward pass ends", flush=True)
    # 2. the wrapper against an independent path: the HF forward with LoRA added by hooks
    batch = train_batch(model)
    ws, o = hooked_forward(model, names, lora, scale, batch)
    C = batch[3].shape[1]
    logp_all = torch.log_softmax(o.logits[:, -C:].float() / batch[8], -1)
    logp = torch.gather(logp_all, -1, batch[3][..., None]).squeeze(-1)
    loss, _ = grpo_loss(logp, logp, *batch[4:8], *batch[9:15])
    loss.backward()
    ref = trim(step(*batch, *lora))
    with torch.no_grad():
        plain = model(inputs_embeds=batch[0], attention_mask=batch[1], position_ids=batch[2], use_cache=False).logits
        base_lp = torch.gather(torch.log_softmax(plain[:, -C:].float() / batch[8], -1), -1,
                               batch[3][..., None]).squeeze(-1)
    if (base_lp - logp.detach()).abs().max() < 1e-3:
        raise SystemExit("verify: the LoRA hooks do not change the transformers forward")
    rel = max(((w.grad - g).abs().max() / (g.abs().max() + 1e-12)).item() for w, g in zip(ws, ref[2:-1]))
    print(f"  train step vs transformers forward + hooks: loss {abs(loss.item() - ref[0].item()):.1e}, grads rel {rel:.1e}")
    if rel > (1e-4 if DTYPE == "fp32" else tol):
        raise SystemExit("verify: the training wrapper differs from the transformers forward")
    if DTYPE != "fp32":
        # 2b. the half graph's gradients against fp32 autograd of the same weights (the package's
        # weights widened, not the checkpoint's: the rounding to half is the export's, not the error)
        half = globals()["DTYPE"]
        globals()["DTYPE"] = "fp32"
        try:
            import copy
            wide = copy.deepcopy(model).float()
            step32 = train_step_fn(wide, names, scale)
            b32 = [t.float() if t.is_floating_point() else t for t in batch]
            ref32 = step32(*b32, *lora)
        finally:
            globals()["DTYPE"] = half
        got = trim(train.run(None, feeds(batch)))
        rel32 = max(np.abs(g - f32(r)).max() / (float(r.abs().max()) + 1e-12) for g, r in zip(got[2:-1], ref32[2:-1]))
        dlp32 = np.abs(got[1] - f32(ref32[1]))[f32(batch[4]) > 0].max()
        print(f"  train.onnx ({half}) vs fp32 autograd: grads rel {rel32:.1e}, log-probs {dlp32:.1e} "
              f"(limits {tols['fp32 grads']:.0e}, {lp_tol:.0e})")
        if rel32 > tols["fp32 grads"] or dlp32 > lp_tol:
            raise SystemExit(f"verify: the {half} training graph is too far from fp32 autograd")
    # 3. central finite difference through ORT
    f = feeds(batch)
    key = f"{names[0]}.B"
    grad = train.run([f"grad.{key}"], f)[0][0, 0]
    # (a half graph's loss moves by its rounding too: a wider step keeps that below the slope's)
    h = 1e-2 if DTYPE == "fp32" else 1e-1
    f[key] = f[key].copy()
    f[key][0, 0] += h
    up = float(train.run(["loss"], f)[0])
    f[key][0, 0] -= 2 * h
    down = float(train.run(["loss"], f)[0])
    fd = (up - down) / (2 * h)
    print(f"  finite difference d loss / d {key}[0,0]: {fd:.6f} vs analytic {grad:.6f}")
    if abs(fd - grad) > tols["fd"] * abs(grad) + 2e-4:
        raise SystemExit("verify: finite difference disagrees with the gradient")
    # 4. micro-batches add up to the mini-batch: token_count = the mini-batch's completion tokens
    big = train_batch(model, B=4, S=20, seed=3)
    total = big[4].sum()
    big[13] = total
    whole = trim(train.run(None, feeds(big)))
    parts = []
    for sl in (slice(0, 1), slice(1, 4)):
        mb = [t[sl] if k in (0, 1, 3, 4, 5, 6, 7, 14) else (t[:, sl] if k == 2 else t) for k, t in enumerate(big)]
        parts.append(trim(train.run(None, feeds(mb))))
    dl = abs(float(whole[0]) - sum(float(p[0]) for p in parts))
    dg = max(np.abs(w - (a + b)).max() for w, a, b in zip(whole[2:-1], parts[0][2:-1], parts[1][2:-1]))
    print(f"  micro-batches 1 + 3 rows vs one batch of 4: loss {dl:.1e}, grads {dg:.1e}")
    if dl > tols["sum"] or dg > tols["sum"]:
        raise SystemExit("verify: micro-batch losses do not add up to the mini-batch loss")
    # 5. logprobs.onnx against the eager forward, at two temperatures
    for t in (1.0, 0.7):
        x, am, pos, tgt = batch[0], batch[1], batch[2], batch[3]
        got = lp_sess.run(None, {"inputs_embeds": f32(x), "attention_mask": am.numpy(), "position_ids": pos.numpy(),
                                 "target_ids": tgt.numpy(), "temperature": np.array(t, np.float32),
                                 **{k: v.detach().numpy() for k, v in zip(lora_in, lora)}})
        with torch.no_grad():
            lr = {n: (lora[2 * j], lora[2 * j + 1]) for j, n in enumerate(names)}
            rl, re = token_logprobs(model, x, am, pos, tgt, torch.tensor(t), lr, scale)
        m = am[:, am.shape[1] - tgt.shape[1]:].bool().numpy()
        d = max(np.abs(got[0] - f32(rl))[m].max(), np.abs(got[1] - f32(re))[m].max())
        print(f"  logprobs.onnx vs torch at T={t}: {d:.1e}")
        if d > lp_tol:
            raise SystemExit("verify: logprobs.onnx differs from torch")


def random_lora(names, shapes_, seed):
    """A random adapter (A and B per name, N(0, 0.1²)) from torch's generator seeded `seed`."""
    torch.manual_seed(seed)
    lora = []
    for n in names:
        lora += [torch.randn(*shapes_[n][0]) * 0.1, torch.randn(*shapes_[n][1]) * 0.1]
    return lora


def module_of(model, name):
    """The transformers module a LoRA tensor name adapts."""
    p = name.split(".")
    if not is_visual(name):
        layer = model.model.language_model.layers[int(p[1])]
        return getattr(layer.self_attn, p[2], None) or getattr(layer.mlp, p[2])
    vis = model.model.visual
    if p[2] == "merger":
        return vis.merger.mlp[int(p[3].split("_")[1])]
    blk = vis.blocks[int(p[2])]
    return getattr(blk.attn, p[3], None) or getattr(blk.mlp, p[3])


def lora_hooks(model, names, ws, scale):
    """The LoRA tensors `ws` (A, B per name) added to the transformers model's projections by
    forward hooks, as PEFT adds them: an independent path to check the graphs' LoRA against.
    Returns the hooks, to remove."""
    hooks = []
    for j, n in enumerate(names):
        lin = module_of(model, n)
        A, B = ws[2 * j], ws[2 * j + 1]
        hooks.append(lin.register_forward_hook(
            (lambda A, B: lambda m, inp, o: lora_add(o, inp[0], A, B, scale))(A, B)))
    return hooks


def hooked_forward(model, names, lora, scale, batch):
    """The transformers forward of `batch` (embeddings, mask, positions) with fresh leaf copies
    of `lora` added by hooks: (the copies, whose .grad a backward fills; the output)."""
    ws = [w.clone().requires_grad_(True) for w in lora]
    hooks = lora_hooks(model, names, ws, scale)
    try:
        o = model(inputs_embeds=batch[0], attention_mask=batch[1], position_ids=batch[2], use_cache=False)
    finally:
        for h in hooks:
            h.remove()
    return ws, o


def verify_sft(model, out, names, shapes_, sft):
    """sft.onnx against torch autograd of the same step, against the transformers forward with
    LoRA hooks (an independent cross-entropy), and micro-batches adding up."""
    import onnxruntime as ort

    tols = TOL[DTYPE]
    so = ort.SessionOptions()
    so.intra_op_num_threads = 2
    sess = Typed(f"{out}/sft.onnx", so)
    scale = json.load(open(f"{out}/manifest.json"))["lora"]["scale"]
    lora_in = [f"{n}.{m}" for n in names for m in ("A", "B")]
    lora = random_lora(names, shapes_, 6)
    trim = (lambda o: list(o)[:-1]) if "vision_grad" in json.load(open(f"{out}/manifest.json"))["graphs"] else list

    def feeds(batch):
        return {k: f32(v) if v.is_floating_point() else v.numpy() for k, v in zip(SFT_BATCH + lora_in, list(batch) + lora)}

    def rel(got, ref):
        return max(np.abs(g - f32(r)).max() / (float(r.abs().max()) + 1e-12) for g, r in zip(got, ref))

    for tag, batch in (("B=2 S=24", sft_batch(model)), ("B=3 S=40", sft_batch(model, B=3, S=40, seed=7))):
        got = trim(sess.run(None, feeds(batch)))
        ref = trim(sft(*batch, *lora))
        dl, dg, ds = abs(float(got[0]) - float(ref[0])), rel(got[1:-1], ref[1:-1]), np.abs(got[-1] - f32(ref[-1])).max()
        print(f"  sft.onnx vs torch autograd [{tag}]: loss {dl:.1e}, grads rel {dg:.1e}, stats {ds:.1e}", flush=True)
        if dl > tols["loss"] * max(1.0, abs(float(ref[0]))) or dg > tols["grads"] or ds > 1.0:
            raise SystemExit("verify: sft.onnx differs from torch autograd")
    # the transformers forward with LoRA hooks: an independent cross-entropy and its gradients
    batch = sft_batch(model)
    ws, o = hooked_forward(model, names, lora, scale, batch)
    C = batch[3].shape[1]
    logits = o.logits[:, -C:].float()
    ce = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch[3].reshape(-1), reduction="none")
    loss = (ce * batch[4].reshape(-1)).sum() / batch[5]
    loss.backward()
    got = trim(sess.run(None, feeds(batch)))
    dg = max(float((w.grad - torch.from_numpy(g)).abs().max() / (w.grad.abs().max() + 1e-12)) for w, g in zip(ws, got[1:-1]))
    acc = float(((logits.argmax(-1) == batch[3]).float() * batch[4]).sum())
    print(f"  sft.onnx vs transformers cross-entropy + hooks: loss {abs(float(got[0]) - loss.item()):.1e}, "
          f"grads rel {dg:.1e}, correct tokens {got[-1][1]:.0f} vs {acc:.0f}")
    if abs(float(got[0]) - loss.item()) > tols["logprobs"] or dg > max(1e-4, tols["grads"]) or abs(got[-1][1] - acc) > 1:
        raise SystemExit("verify: sft.onnx differs from the transformers cross-entropy")
    # micro-batches of 1 + 2 rows add up to the batch of 3
    big = sft_batch(model, B=3, S=20, seed=8)
    big[5] = big[4].sum()
    whole = trim(sess.run(None, feeds(big)))
    parts = []
    for sl in (slice(0, 1), slice(1, 3)):
        mb = [t[sl] if k in (0, 1, 3, 4) else (t[:, sl] if k == 2 else t) for k, t in enumerate(big)]
        parts.append(trim(sess.run(None, feeds(mb))))
    dl = abs(float(whole[0]) - sum(float(p[0]) for p in parts))
    dg = max(np.abs(w - (a + b)).max() for w, a, b in zip(whole[1:-1], parts[0][1:-1], parts[1][1:-1]))
    print(f"  sft micro-batches 1 + 2 rows vs one batch of 3: loss {dl:.1e}, grads {dg:.1e}")
    if dl > tols["sum"] or dg > tols["sum"]:
        raise SystemExit("verify: SFT micro-batches do not add up")


def vision_batch(model, seed=9):
    """A GRPO micro-batch of two rows with an image each (224×168 and 84×112), laid out as the
    trainer lays rows out: [left pad | prompt | completion], positions by transformers'
    get_rope_index, the graphs seeing all but the last token (S = P + C − 1). Returns a dict:
    pixel rows `pv` and `grid` (torch), the prompts and completions (lists), the full `ids`,
    `mask` and `pos` [.., P + C], `P`, `C`, and `batch` (TRAIN_BATCH on the base model's
    embeddings, as train_batch makes it)."""
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil
    cfg, tc = model.config, model.config.text_config
    proc = Qwen2VLImageProcessorPil()
    pvs, grids = [], []
    for k, (w, h) in enumerate(((224, 168), (84, 112))):
        pi = proc(images=[synthetic_image(w, h, 21 + k)], return_tensors="np")
        pvs.append(pi["pixel_values"].astype(np.float32))
        grids += pi["image_grid_thw"].tolist()
    g = torch.Generator().manual_seed(seed)
    C, prompts, comps = 6, [], []
    for (t, h, w), k in zip(grids, (5, 2)):
        text = torch.randint(0, 1900, (k + 3,), generator=g).tolist()
        prompts.append(text[:k] + [cfg.vision_start_token_id] + [cfg.image_token_id] * (t * h * w // 4)
                       + [cfg.vision_end_token_id] + text[k:])
        comps.append(torch.randint(0, 1900, (C,), generator=g).tolist())
    P = max(map(len, prompts))
    ids = torch.tensor([[tc.pad_token_id] * (P - len(p)) + p + c for p, c in zip(prompts, comps)])
    mask = torch.tensor([[0] * (P - len(p)) + [1] * (len(p) + C) for p in prompts])
    pv, grid = torch.from_numpy(np.concatenate(pvs)), torch.tensor(grids)
    with torch.no_grad():
        mm = (ids == cfg.image_token_id).to(torch.int32)
        pos, _ = model.model.get_rope_index(ids, mm, image_grid_thw=grid, attention_mask=mask)
        pos = torch.where(mask.bool()[None], pos, 0)
        S = P + C - 1
        x = Embedding(model)(ids[:, :S], Vision(model).features(pv, grid, {}))
    batch = grpo_batch(model, x, mask[:, :S], pos[:, :, :S].contiguous(), ids[:, P:], torch.ones(2, C), g)
    return {"pv": pv, "grid": grid, "prompts": prompts, "completions": comps, "ids": ids, "mask": mask, "pos": pos,
            "P": P, "C": C, "batch": batch}


def vision_chain_reference(model, vb, names, lora, scale):
    """The GRPO loss of `vb` through the whole transformers model from the pixels, every LoRA
    tensor (language and vision) added by hooks, and its gradients: (loss, grads in `names`
    order)."""
    ws = [w.clone().requires_grad_(True) for w in lora]
    hooks = lora_hooks(model, names, ws, scale)
    ids, b, P, C = vb["ids"], vb["batch"], vb["P"], vb["C"]
    try:
        mm = (ids == model.config.image_token_id).to(torch.int64)
        o = model(input_ids=ids, attention_mask=vb["mask"], pixel_values=vb["pv"], image_grid_thw=vb["grid"],
                  mm_token_type_ids=mm, use_cache=False)
    finally:
        for h in hooks:
            h.remove()
    logp = torch.gather(torch.log_softmax(o.logits[:, P - 1:P - 1 + C].float() / b[8], -1), -1,
                        b[3][..., None]).squeeze(-1)
    loss, _ = grpo_loss(logp, logp, *b[4:8], *b[9:15])
    loss.backward()
    return loss.detach(), [w.grad for w in ws]


def verify_vision(model, out, lang, vis, shapes_):
    """Vision-tower LoRA: vision.onnx against transformers' vision tower with the adapter added
    by hooks, and the trainer's chain (vision.onnx → embedding.onnx → train.onnx's
    grad.inputs_embeds at the image rows → vision_grad.onnx) against autograd through the whole
    transformers model from the pixels; the loss scale divided back; a finite difference."""
    import onnxruntime as ort
    tols = TOL[DTYPE]
    so = ort.SessionOptions()
    so.intra_op_num_threads = 2
    sess = {k: Typed(f"{out}/{k}.onnx", so) for k in ("vision", "embedding", "train", "vision_grad")}
    scale = json.load(open(f"{out}/manifest.json"))["lora"]["scale"]
    ll, vl = random_lora(lang, shapes_, 5), random_lora(vis, shapes_, 7)
    lin = [f"{n}.{m}" for n in lang for m in ("A", "B")]
    vin = [f"{n}.{m}" for n in vis for m in ("A", "B")]
    vb = vision_batch(model)
    pv, grid = f32(vb["pv"]), vb["grid"].numpy()
    vfeeds = {k: f32(v) for k, v in zip(vin, vl)}
    # 1. the vision tower with LoRA
    feats = sess["vision"].run(None, {"pixel_values": pv, "image_grid_thw": grid, **vfeeds})[0]
    hooks = lora_hooks(model, vis, vl, scale)
    try:
        with torch.no_grad():
            ref = f32(model.model.visual(vb["pv"], grid_thw=vb["grid"]).pooler_output)
    finally:
        for h in hooks:
            h.remove()
    with torch.no_grad():
        base = f32(model.model.visual(vb["pv"], grid_thw=vb["grid"]).pooler_output)
    d, moved = np.abs(feats - ref).max(), np.abs(ref - base).max()
    print(f"  vision.onnx with vision LoRA vs transformers + hooks: {d:.1e} (the adapter moves the features by "
          f"{moved:.2f})", flush=True)
    if d > tols["logits"] or moved < 1e-3:
        raise SystemExit("verify: vision.onnx with LoRA differs from transformers")
    # 2. the chain against autograd through the whole model
    loss_ref, grads_ref = vision_chain_reference(model, vb, lang + vis, ll + vl, scale)
    P, C = vb["P"], vb["C"]
    ids = vb["ids"][:, :P + C - 1].numpy()
    image = ids == model.config.image_token_id

    def chain(vfeeds, loss_scale=1.0):
        f = sess["vision"].run(None, {"pixel_values": pv, "image_grid_thw": grid, **vfeeds})[0]
        emb = sess["embedding"].run(None, {"input_ids": ids, "image_features": f})[0]
        feeds = {k: f32(v) if v.is_floating_point() else v.numpy() for k, v in zip(TRAIN_BATCH, vb["batch"])}
        feeds.update({"inputs_embeds": emb, "loss_scale": np.array(loss_scale, np.float32)})
        feeds.update({k: f32(v) for k, v in zip(lin, ll)})
        names = ["loss", "grad.inputs_embeds"] + [f"grad.{k}" for k in lin]
        res = dict(zip(names, sess["train"].run(names, feeds)))
        gf = res["grad.inputs_embeds"][image]
        vg = sess["vision_grad"].run(None, {"pixel_values": pv, "image_grid_thw": grid, "grad_features": gf,
                                            "loss_scale": np.array(loss_scale, np.float32), **vfeeds})
        return float(res["loss"]), [res[f"grad.{k}"] for k in lin] + vg

    def rel(got, ref):
        ref = [f32(r) if torch.is_tensor(r) else r for r in ref]
        return max(np.abs(g - r).max() / (np.abs(r).max() + 1e-12) for g, r in zip(got, ref))

    loss, grads = chain(vfeeds)
    n = len(lin)
    dl, rl, rv = abs(loss - float(loss_ref)), rel(grads[:n], grads_ref[:n]), rel(grads[n:], grads_ref[n:])
    print(f"  vision chain vs autograd from the pixels: loss {dl:.1e}, language grads rel {rl:.1e}, "
          f"vision grads rel {rv:.1e}", flush=True)
    lim = max(1e-4, tols["grads"])
    if dl > max(1e-4, tols["loss"]) or rl > lim or rv > lim:
        raise SystemExit("verify: the vision-LoRA gradient chain differs from autograd")
    _, scaled = chain(vfeeds, 1024.0)
    ds = rel(scaled[n:], grads[n:])
    print(f"  at loss scale 1024: vision grads rel {ds:.1e}")
    if ds > lim:
        raise SystemExit("verify: vision_grad.onnx does not divide the loss scale back")
    # 3. a finite difference through ONNX Runtime, on the merger's last B (every image row reads it)
    key = f"{vis[-1]}.B"
    k = vin.index(key)
    h = 1e-2 if DTYPE == "fp32" else 1e-1
    f = dict(vfeeds)
    f[key] = f[key].copy()
    f[key][0, 0] += h
    up, _ = chain(f)
    f[key][0, 0] -= 2 * h
    down, _ = chain(f)
    fd, an = (up - down) / (2 * h), float(grads[n + k][0, 0])
    print(f"  finite difference d loss / d {key}[0,0]: {fd:.6f} vs analytic {an:.6f}")
    if abs(fd - an) > tols["fd"] * abs(an) + 2e-4:
        raise SystemExit("verify: finite difference disagrees with the vision gradient")


def write_vision_goldens(model, out, lang, vis, shapes_):
    """goldens/vision: vision_batch's rows (prompt and completion ids, pixel rows, grids), an
    adapter on every target (language and vision), the GRPO settings and the old / reference
    log-probs and advantages; and torch autograd's loss and every LoRA gradient through the whole
    transformers model from the pixels."""
    gd = os.path.join(out, "goldens", "vision")
    os.makedirs(gd, exist_ok=True)
    scale = json.load(open(f"{out}/manifest.json"))["lora"]["scale"]
    names = lang + vis
    lora = random_lora(lang, shapes_, 5) + random_lora(vis, shapes_, 7)
    vb = vision_batch(model)
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


def write_goldens(model, hf_dir, out, names, shapes_, step):
    """Reference values from transformers for the Rust tests: chat-template prompt ids, M-RoPE
    positions for a left-padded batch with several images, logits of prefill + 5 greedy steps,
    teacher-forced log-probs, and one train.onnx step (inputs and torch autograd outputs)."""
    from transformers import PreTrainedTokenizerFast
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    gd = os.path.join(out, "goldens")
    os.makedirs(os.path.join(gd, "train"), exist_ok=True)
    tok = PreTrainedTokenizerFast(tokenizer_file=os.path.join(hf_dir, "tokenizer.json"))
    tok.chat_template = CHAT_TEMPLATE
    proc = Qwen2VLImageProcessorPil()
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
    # one training step
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


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("hf_dir", nargs="?", help="Hugging Face Qwen2.5-VL checkpoint folder")
    ap.add_argument("--tiny", action="store_true", help="build and export the tiny random-weight test model")
    ap.add_argument("--random-init", choices=sorted(REAL_TEXT), metavar="MODEL",
                    help=f"build and export MODEL ({', '.join(sorted(REAL_TEXT))}) at its real geometry with random "
                         "weights and the tiny tokenizer (special tokens on Qwen's ids): for benchmarks and GPU checks "
                         "without a download")
    ap.add_argument("--text-layers", type=int, help="with --random-init: text layers (default: the model's)")
    ap.add_argument("--vision-depth", type=int, help="with --random-init: vision blocks (default: the model's)")
    ap.add_argument("--out", required=True, help="package folder to write")
    ap.add_argument("--dtype", choices=["fp32", "fp16", "bf16"], default="fp32",
                    help="the graphs' arithmetic. fp32 (the CPU's default), or fp16 / bf16 as transformers runs the "
                         "model in that dtype: weights, matrix products, attention and the KV cache in half; norms, "
                         "softmax, rotary angles and the log-softmax in fp32; LoRA factors and their gradients fp32 "
                         "(as PEFT keeps them). bf16 needs a GPU: ONNX Runtime's CPU provider has no bf16 kernels")
    # EasyR1's LoRA recipe by default: rank 64, its default alpha 16, every linear layer of the
    # language model (the vision tower is not a LoRA target here, as EasyR1 excludes it for vLLM).
    ap.add_argument("--lora-rank", type=int, default=64)
    ap.add_argument("--lora-alpha", type=float, default=16.0)
    ap.add_argument("--lora-targets", default="all",
                    help=f"a comma list of LoRA targets: `all` ({','.join(LORA_TARGETS)}: the language model's linear "
                         f"layers) or some of them, and `vision` ({','.join(VISION_TARGETS)}: every linear layer "
                         "of the vision tower and its merger) or some of those, e.g. `all,vision`")
    ap.add_argument("--verify", action="store_true", help="check every graph against transformers (fails above 1e-4)")
    ap.add_argument("--goldens", action="store_true", help="write transformers goldens for the Rust tests to OUT/goldens")
    ap.add_argument("--opset", type=int, default=OPSET, help="ONNX opset (18 or newer)")
    ap.add_argument("--head-chunks", type=int, default=HEAD_CHUNKS,
                    help="the log-prob and training graphs take the response through the vocabulary head in this many "
                         "chunks of positions, none holding every position's logits (1: all at once, keeping the logits "
                         "for the backward pass: faster on CPUs, 3 full-vocabulary tensors per position at the peak)")
    ap.add_argument("--attention-chunks", type=int, default=ATTENTION_CHUNKS,
                    help="the log-prob and training graphs run each layer's attention over the queries in this many "
                         "chunks, none holding every query's scores, and the backward pass rebuilds each chunk's "
                         "probabilities (1: all queries at once, the scores kept for the backward pass)")
    a = ap.parse_args(argv)
    globals()["OPSET"] = a.opset
    for flag, v in (("--head-chunks", a.head_chunks), ("--attention-chunks", a.attention_chunks)):
        if v < 1:
            ap.error(f"{flag} must be at least 1")
    globals()["HEAD_CHUNKS"] = a.head_chunks
    globals()["ATTENTION_CHUNKS"] = a.attention_chunks
    globals()["DTYPE"] = a.dtype
    targets = []
    for t in (t.strip() for t in a.lora_targets.split(",")):
        group = {"all": LORA_TARGETS, "vision": VISION_TARGETS}.get(t, (t,) if t else ())
        for g in group:
            if g not in LORA_TARGETS + VISION_TARGETS:
                ap.error(f"unknown LoRA target {g!r} (the language model's: {', '.join(LORA_TARGETS)}; "
                         f"the vision tower's: {', '.join(VISION_TARGETS)})")
            if g not in targets:
                targets.append(g)
    if sum([a.tiny, bool(a.hf_dir), bool(a.random_init)]) != 1:
        ap.error("give one of HF_DIR, --tiny and --random-init MODEL")
    if (a.text_layers or a.vision_depth) and not a.random_init:
        ap.error("--text-layers and --vision-depth go with --random-init")
    for flag, v in (("--text-layers", a.text_layers), ("--vision-depth", a.vision_depth)):
        if v is not None and v < 1:
            ap.error(f"{flag} must be at least 1")
    hf_dir = a.hf_dir
    if a.tiny:
        hf_dir = os.path.join(a.out, "hf")
        print(f"building the tiny model in {hf_dir}", flush=True)
        build_tiny(hf_dir)
    if a.random_init:
        hf_dir = os.path.join(a.out, "hf")
        print(f"building {a.random_init} with random weights in {hf_dir}", flush=True)
        build_random(a.random_init, hf_dir, a.text_layers, a.vision_depth)
    model = load_model(hf_dir)
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    globals()["EXTERNAL_DATA"] = weight_bytes > 1_800_000_000
    print(f"exporting {hf_dir} → {a.out} ({weight_bytes / 1e9:.2f} GB of weights"
          f"{', external data' if EXTERNAL_DATA else ''})", flush=True)
    os.makedirs(a.out, exist_ok=True)
    globals()["WEIGHTS"] = SharedWeights(a.out, model)
    names, shapes = export_package(model, a.out, a.lora_rank, a.lora_alpha, targets)
    step, sft, vgrad = export_training(model, a.out, names, shapes, a.lora_alpha / a.lora_rank)
    if WEIGHTS.kept:
        print(f"  {WEIGHTS.kept} weights kept a second layout (a use that cannot read the stored one)", flush=True)
    print(f"  {WEIGHTS_FILE}: {WEIGHTS.at / 1e9:.3f} GB, {len(WEIGHTS.stored)} tensors, shared by every graph",
          flush=True)
    write_package_files(model, hf_dir, a.out, names, shapes, a.lora_rank, a.lora_alpha, a.dtype)
    lang, vis = [n for n in names if not is_visual(n)], [n for n in names if is_visual(n)]
    if a.verify:
        verify(model, hf_dir, a.out, lang, shapes, tol=TOL[a.dtype]["logits"])
        verify_training(model, hf_dir, a.out, lang, shapes, step)
        verify_sft(model, a.out, lang, shapes, sft)
        if vis:
            verify_vision(model, a.out, lang, vis, shapes)
    if a.goldens:
        write_goldens(model, hf_dir, a.out, lang, shapes, step)
        if vis:
            write_vision_goldens(model, a.out, lang, vis, shapes)


if __name__ == "__main__":
    main()
