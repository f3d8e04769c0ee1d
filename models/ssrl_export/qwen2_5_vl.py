"""Qwen2.5-VL: the vision tower, embedding and decoder wrappers exported as graphs, the package's
inference graphs and files, and M-RoPE positions."""
import json
import os
import shutil

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import apply_rotary_pos_emb, apply_rotary_pos_emb_vision

from . import settings
from .settings import torch_dtype
from .builders import normalise_config_dict
from .ops import _ChunkedAttention, _Recompute, lora_add, rms_norm
from .lora import LORA_TARGETS, VISION_TARGETS, is_visual, lora_defaults, lora_shapes, random_lora, target_of
from .contracts import SFT_BATCH, SFT_STATS, STATS, TRAIN_BATCH
from .onnx_io import export, own_defaults, prefix_defaults


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
        o = torch.matmul(att, pad(v)).transpose(1, 2).reshape(n * L, C)
        if o.requires_grad and o.dtype != torch.float32:
            # (the vision gradient graph in half precision: the gather's backward is a
            # scatter-add, which ONNX Runtime's CPU provider has no fp16 kernel for)
            o = o.float()[slot].to(q.dtype)
        else:
            o = o[slot]
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


def decoder_core(model, embeds, attention_mask, position_ids, past, lora, scale, prefix=None, own=None,
                 recompute=False, deepstack=None):
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
        # (Qwen3: a per-head RMSNorm of the queries and keys before the rotary embedding)
        q = proj(lora, i, "q_proj", at.q_proj, x).view(B, S, -1, at.head_dim)
        q = (rms_norm(at.q_norm, q) if hasattr(at, "q_norm") else q).transpose(1, 2)
        k = proj(lora, i, "k_proj", at.k_proj, x).view(B, S, -1, at.head_dim)
        k = (rms_norm(at.k_norm, k) if hasattr(at, "k_norm") else k).transpose(1, 2)
        v = proj(lora, i, "v_proj", at.v_proj, x).view(B, S, -1, at.head_dim).transpose(1, 2)
        q, k = apply_rotary_pos_emb(q, k, cos, sin)
        if past is not None:
            k = torch.cat([past[2 * i], k], dim=2)
            v = torch.cat([past[2 * i + 1], v], dim=2)
        # GQA without repeating K and V: the g query heads of each KV head are consecutive, so
        # they are folded into the query length ([B, kv_heads, g·S, d]) and every KV head is
        # read once per step instead of g times (no expanded copies of the cache in the graph).
        kvh, g, T = k.shape[1], at.num_key_value_groups, k.shape[2]
        if past is None and prefix is None and settings.ATTENTION_CHUNKS > 1:
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
    if deepstack is not None:
        # DeepStack (Qwen3-VL): the vision tower's intermediate features [K, N, D] added to the
        # hidden states of the first K layers at the image positions (`visual_mask` [B, S], in
        # row-major order, as the embedding scatters the image features).
        feats, vmask = deepstack
        flat = vmask.reshape(-1).to(torch.int64)
        at_pos = torch.cumsum(flat, 0) * flat
        at_pos = torch.where(at_pos <= feats.shape[1], at_pos, torch.zeros_like(at_pos))

        # (gathered in fp32 where the features take a gradient: the gather's backward is a
        # scatter-add, which ONNX Runtime's CPU provider has no fp16 kernel for)
        dt = torch.float32 if feats.requires_grad else h.dtype

        def visual_add(h, i):
            f = torch.cat([torch.zeros(1, h.shape[-1], dtype=dt), feats[i].to(dt)], 0)
            return h + f[at_pos].reshape(h.shape).to(h.dtype)
    if recompute:
        assert past is None and prefix is None and own is None, "recompute is for the training graph"
        for i, layer in enumerate(lm.layers):
            names = sorted(k for k in lora if k.startswith(f"lora.{i}."))
            flat = [t for k in names for t in lora[k]]

            def block(h, *ab, i=i, layer=layer, names=names):
                lo = {k: (ab[2 * j], ab[2 * j + 1]) for j, k in enumerate(names)}
                return layer_step(i, layer, h, lo)[0]

            h = _Recompute.apply(block, h, *flat)
            if deepstack is not None and i < deepstack[0].shape[0]:
                h = visual_add(h, i)
        return rms_norm(lm.norm, h), presents
    for i, layer in enumerate(lm.layers):
        h, k, v = layer_step(i, layer, h, lora)
        if deepstack is not None and i < deepstack[0].shape[0]:
            h = visual_add(h, i)
        presents += [k, v]
    return rms_norm(lm.norm, h), presents


class Decoder(nn.Module):
    def __init__(self, model, lora_names, scale):
        super().__init__()
        self.model, self.lora_names, self.scale = model, lora_names, scale

    def forward(self, inputs_embeds, attention_mask, position_ids, past_key_values, prefix_key_values, prefix_mask,
                slot_rows, row_slots, own_key_values, own_mask, lora_tensors, deepstack_features=None,
                visual_mask=None):
        lora = {n: (lora_tensors[2 * j], lora_tensors[2 * j + 1]) for j, n in enumerate(self.lora_names)}
        prefix = (prefix_key_values, prefix_mask, slot_rows, row_slots)
        deepstack = None if deepstack_features is None else (deepstack_features, visual_mask)
        h, presents = decoder_core(self.model, inputs_embeds, attention_mask, position_ids, past_key_values,
                                   lora, self.scale, prefix, (own_key_values, own_mask), deepstack=deepstack)
        # The last position only: the engine left-pads prompts, so that is every row's next token.
        return (self.model.lm_head(h[:, -1:]).float(), *presents)


def export_package(model, out, lora_rank, lora_alpha, lora_targets, vision=None):
    """vision.onnx, embedding.onnx and decoder.onnx. `vision`: another family's vision graph
    module and its extra outputs (name → dimension names); Qwen2.5-VL's by default. A vision
    tower with DeepStack layers gives the decoder `deepstack_features` [K, N, D] and
    `visual_mask` [B, S] (the positions that take them, as image_features' placeholders)."""
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
        module, extra = (Vision(model, vis, lora_alpha / lora_rank), {}) if vision is None else vision
        dims.update(extra)
        export(module.eval(), args, f"{out}/vision.onnx", in_names, ["image_features"] + list(extra), ds, dims,
               lora_defaults(vis, shapes))
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
        args = (x, am, pos, past, prefix, pmask, slot_rows, row_slots, own, own_mask, lora)
        K = len(getattr(vc, "deepstack_visual_indexes", None) or [])
        if K:
            vmask = torch.zeros(B, S, dtype=torch.int64)
            vmask[0, 1:3] = 1
            vmask[2, 2:5] = 1
            args += (torch.randn(K, 5, D).to(dt), vmask)
            in_names += ["deepstack_features", "visual_mask"]
            ds.update({"deepstack_features": {1: Dim("num_visual_tokens", max=1 << 20)}, "visual_mask": {0: b, 1: s}})
            dims.update({"deepstack_features": {1: "num_visual_tokens"},
                         "visual_mask": {0: "batch_size", 1: "sequence_length"}})
        export(Decoder(model, names, lora_alpha / lora_rank).eval(), args, f"{out}/decoder.onnx",
               in_names, out_names, ds, dims,
               {**lora_defaults(names, shapes), **prefix_defaults(L, kvh, hd), **own_defaults(L, kvh, hd)})
    return names + vis, shapes


def vision_example(model):
    """Pixel rows of two images of different sizes (12×16 and 6×10 patches) and their grid."""
    vc = model.config.vision_config
    grid = torch.tensor([[1, 12, 16], [1, 6, 10]])
    px = torch.randn(int((grid.prod(1)).sum()), vc.in_channels * vc.temporal_patch_size * vc.patch_size ** 2)
    return px, grid


def training_contracts():
    """The manifest's `train` and `sft` sections: the training graphs' batch inputs, statistics
    and layout."""
    return {
        "train": {"inputs": TRAIN_BATCH, "stats": STATS, "positions": "completion", "head_chunks": settings.HEAD_CHUNKS,
                  "attention_chunks": settings.ATTENTION_CHUNKS,
                  "loss": "EasyR1 GRPO: clamp ±20, clip low/high in log space, dual clip, k3 KL clamped to ±10, "
                          "sum over completion tokens / token_count"},
        "sft": {"inputs": SFT_BATCH, "stats": SFT_STATS,
                "loss": "cross-entropy of the labelled tokens (loss_mask), summed / token_count"},
    }


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
        "format": "spatial-ssrl-package", "version": 1, "family": "qwen2_5_vl", "dtype": dtype, "opset": settings.OPSET,
        "graphs": {"vision": "vision.onnx", "embedding": "embedding.onnx", "decoder": "decoder.onnx",
                   "logprobs": "logprobs.onnx", "train": "train.onnx", "sft": "sft.onnx",
                   **({"vision_grad": "vision_grad.onnx"} if any(map(is_visual, lora_names)) else {})},
        # target_ids, completion_mask, old/ref log-probs and the log-prob outputs cover the last
        # C columns of the rows (the completion), not all S.
        **training_contracts(),
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
