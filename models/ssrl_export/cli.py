"""spatial-ssrl model exporter: a Hugging Face Qwen2.5-VL or Qwen3-VL checkpoint → an ONNX model
package (the family is read from the checkpoint's config.json).

    python models/export.py HF_DIR --out PACKAGE [--verify]
    python models/export.py --tiny [--family qwen3_vl] --out models/tiny [--verify]
    python models/export.py --random-init qwen2.5-vl-3b|qwen2.5-vl-7b|qwen3-vl-4b [--text-layers N]
        [--vision-depth N] --out PACKAGE

The package holds
  vision.onnx     pixel_values [P, 1176] (Qwen3-VL: [P, 1536], patches of 16), image_grid_thw [N, 3]
                  → image_features [P/4, D] (Qwen3-VL also deepstack_features [K, P/4, D], added
                  to the first K language layers' hidden states at the image positions)
  embedding.onnx  input_ids [B, S], image_features [M, D] → inputs_embeds [B, S, D]
  decoder.onnx    inputs_embeds, attention_mask [B, T], position_ids [3, B, S],
                  past_key_values.{i}.key/value, lora.{i}.{target}.A/B,
                  optional shared prompt cache: prefix_key_values.{i}.key/value [Bp, kv_heads, P, d],
                  prefix_mask [Bp, P], slot_rows [Bp·Gs], row_slots [B],
                  optional rows' own cache in place: own_key_values.{i}.key/value [B, kv_heads, C, d],
                  own_mask [B, C]; Qwen3-VL's every language-model graph also deepstack_features
                  [K, N, D] and visual_mask [B, S] (where the image tokens are)
                  → logits [B, 1, V] (the last position: all a generation step needs; a
                    prefill of B × S tokens would otherwise return B·S·V floats), present.{i}.key/value
                  A prompt's G samples read its cache in place (one [G·heads, d] × [d, P] product
                  per prompt and KV head); past/present hold only each sample's own tokens, so a
                  decode step copies no prompt cache. With own_key_values (a buffer of C slots
                  for the row's older tokens, own_mask marking the written ones) present is only
                  past (kept short) and the new keys and values, which the runtime moves into its
                  buffer now and then: no step copies a row's whole own cache either. Without
                  these inputs it is a plain past/present decoder (onnxruntime-genai runs it so).
  logprobs.onnx   inputs_embeds, attention_mask, position_ids, target_ids [B, C], temperature [], lora.*
                  → token_logprobs [B, C], token_entropy [B, C] (the last C positions: the completion)
  train.onnx      the GRPO step as one joint forward+backward graph (EasyR1's loss, see grpo_loss):
                  batch, completion_mask, old/ref log-probs, advantages [B], loss settings,
                  token_count, lora.* → loss, token_logprobs, grad.lora.*, stats [6]; with
                  vision-tower LoRA also the gradient at the image features (and DeepStack features)
  sft.onnx        the SFT cold start's step: token-mean cross-entropy over the response → loss,
                  grad.lora.* (and the image features' gradient with vision-tower LoRA)
  vision_grad.onnx  with vision-tower LoRA (--lora-targets …,vision): the tower's backward from the
                  features' gradient → grad.lora.visual.*
  genai_config.json (onnxruntime-genai's layout), manifest.json (graphs, I/O, LoRA layout),
  config.json, preprocessor_config.json, tokenizer.json, tokenizer_config.json, chat_template.json.

Window attention in the vision graph gathers each window into a padded [windows, 64, C] batch
(sized at run time from image_grid_thw), so window blocks cost O(P·64) as in the model; only the
full-attention blocks are quadratic, per frame, as in the model.

LoRA matrices are graph inputs (zero B gives the base model): new adapter weights need no
session rebuild. Requirements: models/requirements.txt (torch is needed here only).
"""
import argparse
import os

from . import settings
from .settings import TOL, WEIGHTS_FILE
from .builders import REAL_TEXT, build_random, build_tiny, family_of, load_model
from .lora import LORA_TARGETS, VISION_TARGETS, VISION_TARGETS_QWEN3, is_visual, vision_targets
from . import qwen3_vl
from .qwen2_5_vl import export_package, write_package_files
from .onnx_io import SharedWeights
from .training import export_training
from .verify import verify, verify_sft, verify_training, verify_vision
from .goldens import write_goldens, write_vision_goldens


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("hf_dir", nargs="?", help="Hugging Face Qwen2.5-VL or Qwen3-VL checkpoint folder")
    ap.add_argument("--tiny", action="store_true", help="build and export the tiny random-weight test model")
    ap.add_argument("--family", choices=["qwen2_5_vl", "qwen3_vl"], default="qwen2_5_vl",
                    help="with --tiny: the model family to build (a checkpoint's own config.json names its family)")
    real = sorted(REAL_TEXT) + sorted(qwen3_vl.REAL)
    ap.add_argument("--random-init", choices=real, metavar="MODEL",
                    help=f"build and export MODEL ({', '.join(real)}) at its real geometry with random "
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
                         f"layers) or some of them, and `vision` (every linear layer of the vision tower and its "
                         f"mergers: Qwen2.5-VL's {','.join(VISION_TARGETS)}; Qwen3-VL's "
                         f"{','.join(VISION_TARGETS_QWEN3)}, its merger target taking the DeepStack mergers too) "
                         "or some of those, e.g. `all,vision`")
    ap.add_argument("--verify", action="store_true", help="check every graph against transformers (fails above 1e-4)")
    ap.add_argument("--goldens", action="store_true", help="write transformers goldens for the Rust tests to OUT/goldens")
    ap.add_argument("--opset", type=int, default=settings.OPSET, help="ONNX opset (18 or newer)")
    ap.add_argument("--head-chunks", type=int, default=settings.HEAD_CHUNKS,
                    help="the log-prob and training graphs take the response through the vocabulary head in this many "
                         "chunks of positions, none holding every position's logits (1: all at once, keeping the logits "
                         "for the backward pass: faster on CPUs, 3 full-vocabulary tensors per position at the peak)")
    ap.add_argument("--attention-chunks", type=int, default=settings.ATTENTION_CHUNKS,
                    help="the log-prob and training graphs run each layer's attention over the queries in this many "
                         "chunks, none holding every query's scores, and the backward pass rebuilds each chunk's "
                         "probabilities (1: all queries at once, the scores kept for the backward pass)")
    a = ap.parse_args(argv)
    settings.OPSET = a.opset
    for flag, v in (("--head-chunks", a.head_chunks), ("--attention-chunks", a.attention_chunks)):
        if v < 1:
            ap.error(f"{flag} must be at least 1")
    settings.HEAD_CHUNKS = a.head_chunks
    settings.ATTENTION_CHUNKS = a.attention_chunks
    settings.DTYPE = a.dtype
    if sum([a.tiny, bool(a.hf_dir), bool(a.random_init)]) != 1:
        ap.error("give one of HF_DIR, --tiny and --random-init MODEL")
    if (a.text_layers or a.vision_depth) and not a.random_init:
        ap.error("--text-layers and --vision-depth go with --random-init")
    for flag, v in (("--text-layers", a.text_layers), ("--vision-depth", a.vision_depth)):
        if v is not None and v < 1:
            ap.error(f"{flag} must be at least 1")
    if a.tiny:
        family = a.family
    elif a.random_init:
        family = "qwen3_vl" if a.random_init in qwen3_vl.REAL else "qwen2_5_vl"
    else:
        family = family_of(a.hf_dir)
    known = vision_targets(family)
    targets = []
    for t in (t.strip() for t in a.lora_targets.split(",")):
        group = {"all": LORA_TARGETS, "vision": known}.get(t, (t,) if t else ())
        for g in group:
            if g not in LORA_TARGETS + known:
                ap.error(f"unknown LoRA target {g!r} for {family} (the language model's: {', '.join(LORA_TARGETS)}; "
                         f"the vision tower's: {', '.join(known)})")
            if g not in targets:
                targets.append(g)
    hf_dir = a.hf_dir
    if a.tiny:
        hf_dir = os.path.join(a.out, "hf")
        print(f"building the tiny {a.family} model in {hf_dir}", flush=True)
        (qwen3_vl.build_tiny if a.family == "qwen3_vl" else build_tiny)(hf_dir)
    if a.random_init:
        hf_dir = os.path.join(a.out, "hf")
        print(f"building {a.random_init} with random weights in {hf_dir}", flush=True)
        build = qwen3_vl.build_random if a.random_init in qwen3_vl.REAL else build_random
        build(a.random_init, hf_dir, a.text_layers, a.vision_depth)
    model = load_model(hf_dir)
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    settings.EXTERNAL_DATA = weight_bytes > 1_800_000_000
    print(f"exporting {hf_dir} → {a.out} ({weight_bytes / 1e9:.2f} GB of weights"
          f"{', external data' if settings.EXTERNAL_DATA else ''})", flush=True)
    os.makedirs(a.out, exist_ok=True)
    settings.WEIGHTS = SharedWeights(a.out, model)
    if family == "qwen3_vl":
        names, shapes = qwen3_vl.export(model, a.out, a.lora_rank, a.lora_alpha, targets)
        lang, vis = [n for n in names if not is_visual(n)], [n for n in names if is_visual(n)]
        scale = a.lora_alpha / a.lora_rank
        export_training(model, a.out, names, shapes, scale,
                        deepstack=len(model.config.vision_config.deepstack_visual_indexes),
                        vision=qwen3_vl.Vision(model, vis, scale))
        qwen3_vl.write_package_files(model, hf_dir, a.out, names, shapes, a.lora_rank, a.lora_alpha, a.dtype)
        print(f"  {WEIGHTS_FILE}: {settings.WEIGHTS.at / 1e9:.3f} GB, shared by every graph", flush=True)
        family_vision = dict(proc=qwen3_vl.processor(hf_dir), vision=qwen3_vl.Vision)
        if a.verify:
            qwen3_vl.verify(model, hf_dir, a.out, lang, shapes, tol=TOL[a.dtype]["logits"])
            qwen3_vl.verify_training(model, hf_dir, a.out, lang, shapes)
            if vis:
                verify_vision(model, a.out, lang, vis, shapes, **family_vision)
        if a.goldens:
            write_goldens(model, hf_dir, a.out, lang, shapes, None, qwen3_vl.CHAT_TEMPLATE,
                          qwen3_vl.processor(hf_dir))
            if vis:
                write_vision_goldens(model, a.out, lang, vis, shapes, **family_vision)
        return
    names, shapes = export_package(model, a.out, a.lora_rank, a.lora_alpha, targets)
    step, sft, vgrad = export_training(model, a.out, names, shapes, a.lora_alpha / a.lora_rank)
    if settings.WEIGHTS.kept:
        print(f"  {settings.WEIGHTS.kept} weights kept a second layout (a use that cannot read the stored one)", flush=True)
    print(f"  {WEIGHTS_FILE}: {settings.WEIGHTS.at / 1e9:.3f} GB, {len(settings.WEIGHTS.stored)} tensors, shared by every graph",
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
