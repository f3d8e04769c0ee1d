"""The log-prob and training graphs: log-probs, EasyR1's GRPO loss, the GRPO / SFT / vision-tower
step functions traced into train.onnx, sft.onnx and vision_grad.onnx, and their example batches."""
import torch
import torch.nn as nn

from . import settings
from .settings import torch_dtype
from .ops import _ChunkedHead, _TargetLogProbs
from .lora import is_visual, lora_defaults, random_lora
from .contracts import SFT_BATCH, TRAIN_BATCH
from .qwen2_5_vl import Vision, decoder_core, vision_example
from .onnx_io import export, export_joint


def token_logprobs(model, embeds, mask, pos, targets, temperature, lora, scale, recompute=False, hits=False,
                   deepstack=None):
    """log_softmax(logits / T) at the targets, and the entropy of each position's distribution
    (and with `hits`, whether the target is each position's most likely token),
    for the last C columns only (`targets` [B, C]: the completion's, which the runtime lays out
    at the end of every row): the prompt never reaches lm_head, and _ChunkedHead takes the
    completion through it a chunk of positions at a time, so no [B, C, V] tensor exists
    (--head-chunks 1: _TargetLogProbs, the logits of every position at once)."""
    h, _ = decoder_core(model, embeds, mask, pos, None, lora, scale, recompute=recompute, deepstack=deepstack)
    B, C = targets.shape
    # As a [B·C, hidden] matrix: on the 3-D slice torch's decomposition expands lm_head's weight
    # to a batch of copies for a batched product (1.24 GB each call at Qwen's vocabulary).
    hc = h.narrow(1, h.shape[1] - C, C).reshape(B * C, h.shape[2])
    if settings.HEAD_CHUNKS == 1:
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

    def forward(self, inputs_embeds, attention_mask, position_ids, target_ids, temperature, lora_tensors,
                deepstack_features=None, visual_mask=None):
        lora = {n: (lora_tensors[2 * j], lora_tensors[2 * j + 1]) for j, n in enumerate(self.lora_names)}
        deepstack = None if deepstack_features is None else (deepstack_features, visual_mask)
        return token_logprobs(self.model, inputs_embeds, attention_mask, position_ids, target_ids, temperature, lora,
                              self.scale, deepstack=deepstack)


def scaled_grads(loss, loss_scale, ws, extra):
    """The LoRA gradients of `loss` by backward on loss · loss_scale, divided back (loss scaling:
    an fp16 graph's half-precision gradients stay above its underflow; the scale is 1 for fp32
    and bf16, dynamic for fp16), and the gradients of loss · loss_scale at the `extra` leaves
    (a package with vision-tower LoRA: the input embeddings, and with DeepStack its features),
    fp32 and still scaled: the trainer gathers their image rows and takes them through the
    vision tower (vision_grad.onnx), which divides the scale back."""
    gs = torch.autograd.grad(loss * loss_scale, ws + extra)
    grads = [g / loss_scale for g in gs[:len(ws)]]
    return grads + [g.float() for g in gs[len(ws):]]


def step_leaves(args, nb, lora_names, embeds_grad):
    """A step function's arguments split into the batch `b`, fresh leaves that need gradients
    — the LoRA tensors (a list, and by name as (A, B)) — the input embeddings `x`, the DeepStack
    inputs (features, visual mask) that follow the LoRA tensors in a DeepStack package's graphs
    (or None), and the leaves whose gradients the step also returns: with `embeds_grad` the
    embeddings and the DeepStack features (fresh leaves then), else none."""
    b, k = args[:nb], nb + 2 * len(lora_names)
    ws = [w.detach().requires_grad_(True) for w in args[nb:k]]
    deep = tuple(args[k:k + 2]) or None
    if not embeds_grad:
        return b, ws, b[0], {n: (ws[2 * j], ws[2 * j + 1]) for j, n in enumerate(lora_names)}, deep, []
    x = b[0].detach().requires_grad_(True)
    extra = [x]
    if deep is not None:
        deep = (deep[0].detach().requires_grad_(True), deep[1])
        extra.append(deep[0])
    return b, ws, x, {n: (ws[2 * j], ws[2 * j + 1]) for j, n in enumerate(lora_names)}, deep, extra


def train_step_fn(model, lora_names, scale, embeds_grad=False):
    """(batch…, lora…[, deepstack_features, visual_mask]) → (loss, token_logprobs, grads…,
    stats[, grad.inputs_embeds[, grad.deepstack_features]]): the function traced into
    train.onnx."""
    nb = len(TRAIN_BATCH)

    def step(*args):
        with torch.enable_grad():
            b, ws, x, lora, deep, extra = step_leaves(args, nb, lora_names, embeds_grad)
            logp, ent = token_logprobs(model, x, b[1], b[2], b[3], b[8], lora, scale, recompute=True, deepstack=deep)
            loss, stats = grpo_loss(logp, ent.detach(), b[4], b[5], b[6], b[7], b[9], b[10], b[11], b[12], b[13],
                                    b[14])
            grads = scaled_grads(loss, b[15], ws, extra)
        return (loss.detach(), logp.detach(), *grads[:len(ws)], stats, *grads[len(ws):])

    return step


def sft_step_fn(model, lora_names, scale, embeds_grad=False):
    """(batch…, lora…) → (loss, grads…, stats): the SFT cold start's step traced into sft.onnx.
    Cross-entropy of the response tokens (`loss_mask` [B, C]: 1 at a label, 0 at prompt, image
    and padding positions, as LLaMA-Factory masks them with -100), summed and divided by
    `token_count` (the optimizer step's label tokens, so micro-batches add up to the global
    token mean); stats: label tokens and those the model ranks first (token accuracy)."""
    nb = len(SFT_BATCH)

    def step(*args):
        with torch.enable_grad():
            b, ws, x, lora, deep, extra = step_leaves(args, nb, lora_names, embeds_grad)
            one = torch.ones((), dtype=torch.float32)
            logp, _, hit = token_logprobs(model, x, b[1], b[2], b[3], one, lora, scale, recompute=True, hits=True,
                                          deepstack=deep)
            m = b[4].to(logp.dtype)
            loss = -(logp * m).sum() / b[5]
            grads = scaled_grads(loss, b[6], ws, extra)
        with torch.no_grad():
            stats = torch.stack([m.sum(), (hit * m).sum()])
        return (loss.detach(), *grads[:len(ws)], stats, *grads[len(ws):])

    return step


def vision_grad_fn(V, vis_names, deepstack=False):
    """(pixel_values, image_grid_thw, grad_features[, grad_deepstack], loss_scale, vision lora…)
    → the vision LoRA gradients: the backward of the vision tower `V` (the family's, with
    `features(…, recompute=True)`) from `grad_features` (the gradient of the scaled loss at the
    image features, fp32) and, with `deepstack`, `grad_deepstack` (at its DeepStack features
    [K, N, D]), each block recomputed in the backward, divided by `loss_scale`. Traced into
    vision_grad.onnx."""

    def step(px, grid, grad_features, *rest):
        gd, loss_scale, ws = (rest[0], rest[1], rest[2:]) if deepstack else (None, rest[0], rest[1:])
        with torch.enable_grad():
            ws = [w.detach().requires_grad_(True) for w in ws]
            lora = {n: (ws[2 * j], ws[2 * j + 1]) for j, n in enumerate(vis_names)}
            out = V.features(px, grid, lora, recompute=True)
            outs = list(out) if deepstack else [out]
            seeds = [grad_features] + ([gd] if deepstack else [])
            gs = torch.autograd.grad(outs, ws, [g.reshape(o.shape).to(o.dtype) for g, o in zip(seeds, outs)])
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


def deepstack_example(model, B, S, K):
    """DeepStack inputs for rows [B, S]: a visual mask on 7 prompt positions (rows 0 and 1)
    and K layers of random features for them."""
    vmask = torch.zeros(B, S, dtype=torch.int64)
    vmask[0, 4:7] = 1
    vmask[1 % B, 5:9] = 1
    n = int(vmask.sum())
    return [torch.randn(K, n, model.config.text_config.hidden_size).to(torch_dtype()), vmask]


def export_training(model, out, names, shapes_, scale, deepstack=0, vision=None):
    """logprobs.onnx, train.onnx and sft.onnx (and vision_grad.onnx with vision-tower LoRA,
    through `vision`: the family's vision module with the LoRA names and scale, Qwen2.5-VL's by
    default); with `deepstack` K > 0 (Qwen3-VL) each takes `deepstack_features` [K, N, D] and
    `visual_mask` [B, S] after its LoRA inputs, as the decoder does, and with vision-tower LoRA
    the training graphs give the scaled loss's gradient at those features too
    (`grad.deepstack_features`), which vision_grad.onnx takes as `grad_deepstack`."""
    from torch.export import Dim

    lora_names, vis = [n for n in names if not is_visual(n)], [n for n in names if is_visual(n)]
    for p in model.parameters():
        p.requires_grad_(False)
    lora = random_lora(lora_names, shapes_, 2)
    lora_in = [f"{n}.{m}" for n in lora_names for m in ("A", "B")]
    b, s = Dim("batch_size", min=1, max=4096), Dim("sequence_length", min=2, max=1 << 17)
    c = Dim("completion_length", min=1, max=1 << 17)
    # (with DeepStack, 5 rows of 45 columns: the tracer gives equal sizes one symbol, and the
    # DeepStack features' K layers or the positions' 3 axes would make the batch size a
    # constant, a length that fills the attention's chunks the chunks' padding)
    rows, cols = (5, 45) if deepstack else (2, 24)
    batch = train_batch(model, B=rows, S=cols)
    dims = {"inputs_embeds": {0: "batch_size", 1: "sequence_length"},
            "attention_mask": {0: "batch_size", 1: "sequence_length"},
            "position_ids": {1: "batch_size", 2: "sequence_length"},
            "target_ids": {0: "batch_size", 1: "completion_length"},
            "token_logprobs": {0: "batch_size", 1: "completion_length"},
            "token_entropy": {0: "batch_size", 1: "completion_length"}}
    deep, deep_in, deep_ds = [], [], {}
    if deepstack:
        deep = deepstack_example(model, batch[0].shape[0], batch[0].shape[1], deepstack)
        deep_in = ["deepstack_features", "visual_mask"]
        deep_ds = {"deepstack_features": {1: Dim("num_visual_tokens", min=1, max=1 << 20)}, "visual_mask": {0: b, 1: s}}
        dims.update({"deepstack_features": {1: "num_visual_tokens"},
                     "visual_mask": {0: "batch_size", 1: "sequence_length"}})
    with torch.no_grad():
        export(LogProbs(model, lora_names, scale).eval(),
               (batch[0], batch[1], batch[2], batch[3], batch[8], lora, *deep),
               f"{out}/logprobs.onnx", ["inputs_embeds", "attention_mask", "position_ids", "target_ids", "temperature"]
               + lora_in + deep_in, ["token_logprobs", "token_entropy"],
               {"inputs_embeds": {0: b, 1: s}, "attention_mask": {0: b, 1: s}, "position_ids": {1: b, 2: s},
                "target_ids": {0: b, 1: c}, "temperature": {}, "lora_tensors": [{} for _ in lora], **deep_ds}, dims,
               lora_defaults(lora_names, shapes_))
    step = train_step_fn(model, lora_names, scale, embeds_grad=bool(vis))
    bs, bc = {0: b, 1: s}, {0: b, 1: c}
    ds = [bs, bs, {1: b, 2: s}, bc, bc, bc, bc, {0: b}] + [None] * 6 + [bc, None] + [None] * len(lora)
    # (a package with vision-tower LoRA: the scaled loss's gradient at the input embeddings too,
    # and at the DeepStack features)
    extra = (["grad.inputs_embeds"] + (["grad.deepstack_features"] if deepstack else [])) if vis else []
    dims["grad.inputs_embeds"] = {0: "batch_size", 1: "sequence_length"}
    dims["grad.deepstack_features"] = {1: "num_visual_tokens"}
    out_names = ["loss", "token_logprobs"] + [f"grad.{n}" for n in lora_in] + ["stats"] + extra
    for k in ("completion_mask", "old_logprobs", "ref_logprobs", "rollout_is_weights", "loss_mask"):
        dims[k] = {0: "batch_size", 1: "completion_length"}
    dims["advantages"] = {0: "batch_size"}
    deep_list = [deep_ds[k] for k in deep_in]
    export_joint(step, batch + lora + deep, f"{out}/train.onnx", TRAIN_BATCH + lora_in + deep_in, out_names,
                 ds + deep_list, dims)
    # The SFT cold start's step: the same forward, recomputation and head, a cross-entropy loss.
    sft = sft_step_fn(model, lora_names, scale, embeds_grad=bool(vis))
    ds = [bs, bs, {1: b, 2: s}, bc, bc, None, None] + [None] * len(lora)
    sb = sft_batch(model, B=rows, S=cols)
    deep = deepstack_example(model, sb[0].shape[0], sb[0].shape[1], deepstack) if deepstack else []
    export_joint(sft, sb + lora + deep, f"{out}/sft.onnx", SFT_BATCH + lora_in + deep_in,
                 ["loss"] + [f"grad.{n}" for n in lora_in] + ["stats"] + extra, ds + deep_list, dims)
    vgrad = None
    if vis:
        # The vision tower's backward, run by the trainer once per image and optimizer step on
        # the image rows of grad.inputs_embeds (and grad.deepstack_features) summed over the
        # micro-batches.
        V = vision if vision is not None else Vision(model, vis, scale)
        vgrad = vision_grad_fn(V, vis, deepstack=bool(deepstack))
        px, grid = vision_example(model)
        with torch.no_grad():
            f = V.features(px, grid, {})
        nf = (f[0] if deepstack else f).shape[0]
        D = model.config.vision_config.out_hidden_size
        gf = [torch.randn(nf, D)] + ([torch.randn(deepstack, nf, D)] if deepstack else [])
        vlora = random_lora(vis, shapes_, 6)
        vin = [f"{n}.{m}" for n in vis for m in ("A", "B")]
        P, n = Dim("num_patches", min=4, max=1 << 20), Dim("num_logical_patches", min=1, max=1 << 18)
        gds = [{0: n}] + ([{1: n}] if deepstack else [])
        ds = [{0: P}, {0: Dim("num_images", max=1024)}] + gds + [None] + [None] * len(vlora)
        gnames = ["grad_features"] + (["grad_deepstack"] if deepstack else [])
        export_joint(vgrad, [px, grid, *gf, torch.tensor(1.0)] + vlora, f"{out}/vision_grad.onnx",
                     ["pixel_values", "image_grid_thw"] + gnames + ["loss_scale"] + vin,
                     [f"grad.{k}" for k in vin], ds,
                     {"pixel_values": {0: "num_patches"}, "image_grid_thw": {0: "num_images"},
                      "grad_features": {0: "num_logical_patches"}, "grad_deepstack": {1: "num_logical_patches"}})
    return step, sft, vgrad
