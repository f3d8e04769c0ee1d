"""`--verify`: every graph against transformers and torch autograd."""
import json
import os
import time

import numpy as np
import torch
import torch.nn.functional as F

from . import settings
from .settings import FLOAT_TYPES, TOL, f32, torch_dtype
from .lora import hooked_forward, lora_hooks, random_lora
from .contracts import SFT_BATCH, TRAIN_BATCH
from .qwen2_5_vl import Embedding, Vision, check_config_layouts, decoder_core, rope_index
from .onnx_io import Typed, empty_cache
from .training import grpo_batch, grpo_loss, sft_batch, token_logprobs, train_batch, train_step_fn



def follow_greedy(logits, ref, step):
    """The package's greedy tokens at a decoding step, checked against transformers' logits `ref`:
    equal, or — in half precision only — a near tie, where transformers' own top token leads the
    package's choice by no more than the dtype's logits tolerance; the check then goes on with
    transformers' token, so that both keep decoding the same sequence."""
    nxt, want = logits.argmax(-1), ref.argmax(-1)
    if (nxt == want).all():
        return nxt
    gap = float(max(ref[i, want[i]] - ref[i, nxt[i]] for i in range(len(nxt))))
    tol = TOL[settings.DTYPE]["logits"]
    if settings.DTYPE == "fp32" or gap > tol:
        raise SystemExit(f"verify: greedy token differs at step {step} (transformers' choice leads by {gap:.2e})")
    print(f"  decode step {step}: a near tie in {settings.DTYPE} (transformers' top two {gap:.1e} apart, "
          f"within {tol}): following transformers' token")
    return want

def synthetic_image(w, h, seed):
    from PIL import Image

    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w]
    img = np.stack([(x * 255 // w), (y * 255 // h), ((x + y) * 3) % 256], -1)
    return Image.fromarray((img * 0.8 + rng.integers(0, 50, img.shape)).clip(0, 255).astype(np.uint8), "RGB")


def past0_of(rows, kvh, hd, L):
    """An empty cache (no tokens yet) for `rows` rows, as decoder inputs."""
    return empty_cache("past_key_values", rows, kvh, hd, L)


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
        nxt = follow_greedy(logits, ref, step)
        greedy0.append(int(nxt[0]))
        if step > 0:
            step_logits.append(logits)
        step_ids.append(nxt.astype(np.int64))
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
    limit = 2 if settings.DTYPE == "fp32" else 20
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
    if len(salts) == 0 or len(head) != settings.HEAD_CHUNKS or not all(h in order for h in head):
        raise SystemExit(f"verify: train.onnx has {len(salts)} recomputations and {len(head)} vocabulary "
                         f"products in the forward pass (want {settings.HEAD_CHUNKS})")
    end = max(order[h] for h in head)
    early = [n for n in down if n in order and order[n] < end]
    if early:
        raise SystemExit(f"verify: {len(early)} recomputation nodes run during the forward pass")
    return sum(1 for n in down if n in order), len(salts)


def verify_training(model, hf_dir, out, names, shapes_, step):
    import onnxruntime as ort

    tols = TOL[settings.DTYPE]
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
    if rel > (1e-4 if settings.DTYPE == "fp32" else tol):
        raise SystemExit("verify: the training wrapper differs from the transformers forward")
    if settings.DTYPE != "fp32":
        # 2b. the half graph's gradients against fp32 autograd of the same weights (the package's
        # weights widened, not the checkpoint's: the rounding to half is the export's, not the error)
        half = settings.DTYPE
        settings.DTYPE = "fp32"
        try:
            import copy
            wide = copy.deepcopy(model).float()
            step32 = train_step_fn(wide, names, scale)
            b32 = [t.float() if t.is_floating_point() else t for t in batch]
            ref32 = step32(*b32, *lora)
        finally:
            settings.DTYPE = half
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
    h = 1e-2 if settings.DTYPE == "fp32" else 1e-1
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


def verify_sft(model, out, names, shapes_, sft):
    """sft.onnx against torch autograd of the same step, against the transformers forward with
    LoRA hooks (an independent cross-entropy), and micro-batches adding up."""
    import onnxruntime as ort

    tols = TOL[settings.DTYPE]
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


def vision_batch(model, seed=9, proc=None, vision=None):
    """A GRPO micro-batch of two rows with an image each (224×168 and 84×112), laid out as the
    trainer lays rows out: [left pad | prompt | completion], positions by transformers'
    get_rope_index, the graphs seeing all but the last token (S = P + C − 1). Returns a dict:
    pixel rows `pv` and `grid` (torch), the prompts and completions (lists), the full `ids`,
    `mask` and `pos` [.., P + C], `P`, `C`, and `batch` (TRAIN_BATCH on the base model's
    embeddings, as train_batch makes it). `proc` and `vision` (the vision module's class; a
    DeepStack tower's first output is the features) are the family's; Qwen2.5-VL's by default."""
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil
    cfg, tc = model.config, model.config.text_config
    proc = proc or Qwen2VLImageProcessorPil()
    tower = (vision or Vision)(model)

    def features(pv, grid):
        f = tower.features(pv, grid, {})
        return f[0] if isinstance(f, tuple) else f

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
        x = Embedding(model)(ids[:, :S], features(pv, grid))
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


def verify_vision(model, out, lang, vis, shapes_, proc=None, vision=None):
    """Vision-tower LoRA: vision.onnx against transformers' vision tower with the adapter added
    by hooks, and the trainer's chain (vision.onnx → embedding.onnx → train.onnx's
    grad.inputs_embeds at the image rows, and with DeepStack grad.deepstack_features →
    vision_grad.onnx) against autograd through the whole transformers model from the pixels; the
    loss scale divided back; a finite difference. `proc` and `vision` (the vision module's
    class) are the family's; Qwen2.5-VL's by default."""
    import onnxruntime as ort
    tols = TOL[settings.DTYPE]
    so = ort.SessionOptions()
    so.intra_op_num_threads = 2
    sess = {k: Typed(f"{out}/{k}.onnx", so) for k in ("vision", "embedding", "train", "vision_grad")}
    scale = json.load(open(f"{out}/manifest.json"))["lora"]["scale"]
    ll, vl = random_lora(lang, shapes_, 5), random_lora(vis, shapes_, 7)
    lin = [f"{n}.{m}" for n in lang for m in ("A", "B")]
    vin = [f"{n}.{m}" for n in vis for m in ("A", "B")]
    deepstack = hasattr(model.model.visual, "deepstack_merger_list")
    vb = vision_batch(model, proc=proc, vision=vision)
    pv, grid = f32(vb["pv"]), vb["grid"].numpy()
    vfeeds = {k: f32(v) for k, v in zip(vin, vl)}

    def tower():
        o = model.model.visual(vb["pv"], grid_thw=vb["grid"])
        return [f32(o.pooler_output)] + [f32(d) for d in (o.deepstack_features if deepstack else [])]

    # 1. the vision tower with LoRA (and its DeepStack features)
    got = sess["vision"].run(None, {"pixel_values": pv, "image_grid_thw": grid, **vfeeds})
    got = [got[0]] + (list(got[1]) if deepstack else [])
    hooks = lora_hooks(model, vis, vl, scale)
    try:
        with torch.no_grad():
            ref = tower()
    finally:
        for h in hooks:
            h.remove()
    with torch.no_grad():
        base = tower()
    d = max(np.abs(g - r).max() for g, r in zip(got, ref))
    moved = min(np.abs(r - b).max() for r, b in zip(ref, base))
    print(f"  vision.onnx with vision LoRA vs transformers + hooks: {d:.1e} (the adapter moves the features"
          f"{' and each DeepStack layer' if deepstack else ''} by ≥ {moved:.2f})", flush=True)
    if d > tols["logits"] or moved < 1e-3:
        raise SystemExit("verify: vision.onnx with LoRA differs from transformers")
    # 2. the chain against autograd through the whole model
    loss_ref, grads_ref = vision_chain_reference(model, vb, lang + vis, ll + vl, scale)
    P, C = vb["P"], vb["C"]
    ids = vb["ids"][:, :P + C - 1].numpy()
    image = ids == model.config.image_token_id

    def chain(vfeeds, loss_scale=1.0):
        vo = sess["vision"].run(None, {"pixel_values": pv, "image_grid_thw": grid, **vfeeds})
        emb = sess["embedding"].run(None, {"input_ids": ids, "image_features": vo[0]})[0]
        feeds = {k: f32(v) if v.is_floating_point() else v.numpy() for k, v in zip(TRAIN_BATCH, vb["batch"])}
        feeds.update({"inputs_embeds": emb, "loss_scale": np.array(loss_scale, np.float32)})
        if deepstack:
            feeds.update({"deepstack_features": vo[1], "visual_mask": image.astype(np.int64)})
        feeds.update({k: f32(v) for k, v in zip(lin, ll)})
        names = ["loss", "grad.inputs_embeds"] + (["grad.deepstack_features"] if deepstack else []) \
            + [f"grad.{k}" for k in lin]
        res = dict(zip(names, sess["train"].run(names, feeds)))
        gf = res["grad.inputs_embeds"][image]
        gd = {"grad_deepstack": res["grad.deepstack_features"]} if deepstack else {}
        vg = sess["vision_grad"].run(None, {"pixel_values": pv, "image_grid_thw": grid, "grad_features": gf, **gd,
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
    # 3. a finite difference through ONNX Runtime, on the last merger's B (every image row reads
    # it), at its element of largest gradient (the most signal above a half-precision loss's
    # rounding)
    key = f"{vis[-1]}.B"
    k = vin.index(key)
    at = np.unravel_index(int(np.abs(grads[n + k]).argmax()), grads[n + k].shape)
    h = 1e-2 if settings.DTYPE == "fp32" else 1e-1
    f = dict(vfeeds)
    f[key] = f[key].copy()
    f[key][at] += h
    up, _ = chain(f)
    f[key][at] -= 2 * h
    down, _ = chain(f)
    fd, an = (up - down) / (2 * h), float(grads[n + k][at])
    print(f"  finite difference d loss / d {key}{list(map(int, at))}: {fd:.6f} vs analytic {an:.6f}")
    if abs(fd - an) > tols["fd"] * abs(an) + 2e-4:
        raise SystemExit("verify: finite difference disagrees with the vision gradient")
