"""Rollout throughput of ssrl against onnxruntime-genai and transformers `generate`, side by side in
one run on the same tiny Qwen2.5-VL package, the same prompts and images, B prompts × G samples,
N new tokens, sampling at temperature 1. Prints generated tokens/s of each and the ratios.
The prompts: synthetic pictures with a one-image question, or with --data the first B samples of
an `ssrl tasks` JSONL file (`--format jsonl`), whose prompts carry one to five images.

Run through run.sh (it makes the venv). Not part of CI."""
import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

import numpy as np
from PIL import Image

FORMAT = ("You FIRST think about the reasoning process as an internal monologue and then provide the final "
          "answer. The reasoning process MUST BE enclosed within <think> </think> tags. The final answer MUST BE "
          "put in \\boxed{}.")


def images(n):
    """The synthetic 448×336 pictures `ssrl bench rollout` uses by default, saved as PNG."""
    out = []
    for i in range(n):
        x = np.arange(448)[None, :].repeat(336, 0)
        y = np.arange(336)[:, None].repeat(448, 1)
        t = (x * 7 + y * 13 + i * 31) % 97
        r = ((x * 255 // 448) + t) % 256
        g = ((y * 255 // 336) + t * 3) % 256
        b = ((i * 40) % 256 + (x ^ y) // 4) % 256
        out.append(Image.fromarray(np.stack([r, g, b], -1).astype(np.uint8)))
    return out


def problem(i):
    return f"<image>Which of the two marked regions is closer to the camera? Picture {i}."


def run_ssrl(ssrl, model, data, a, out_json):
    cmd = [ssrl, "bench", "rollout", "--model", model, "--data", data, "--batch", str(a.batch), "--group",
           str(a.group), "--max-new-tokens", str(a.tokens), "--rounds", str(a.rounds), "--warmup", str(a.warmup),
           "--json", out_json]
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    r = json.load(open(out_json))
    return r["tokens_per_s"], r["generated_tokens"] / a.rounds


def timed(one_round, a):
    """`a.warmup` untimed rounds, then `a.rounds` timed ones: (generated tokens/s, tokens per round)."""
    rounds = a.rounds
    for _ in range(a.warmup):
        one_round()
    t0, n = time.perf_counter(), 0
    for _ in range(rounds):
        n += one_round()
    return n / (time.perf_counter() - t0), n / rounds


def chat(problem):
    """The rendered chat template of a problem, its `<image>` placeholders where the images go and
    the format sentence after it, as ssrl renders it."""
    text = problem.strip().replace("<image>", "<|vision_start|><|image_pad|><|vision_end|>")
    return ("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
            f"{text} {FORMAT}<|im_end|>\n<|im_start|>assistant\n")


def genai_folder(model, builder, td):
    """onnxruntime-genai's best setting for the package: its own model builder's decoder
    (GroupQueryAttention, `builder`, made from the same weights by `make fixture`) with the
    cache buffer shared between past and present, beside the package's vision and embedding
    graphs. On the tiny package it runs ~30 % faster than the package's standard-op decoder.
    Without a builder decoder: the package as it is."""
    if not (builder and os.path.isfile(f"{builder}/model.onnx")):
        return model
    out = f"{td}/genai"
    shutil.copytree(model, out, ignore=shutil.ignore_patterns("decoder.onnx*", "logprobs.onnx", "train.onnx", "hf", "goldens"))
    for f in os.listdir(builder):
        if f.startswith("model.onnx"):
            shutil.copy(f"{builder}/{f}", f"{out}/{f}")
    with open(f"{out}/genai_config.json") as f:
        cfg = json.load(f)
    cfg["model"]["decoder"]["filename"] = "model.onnx"
    cfg["search"]["past_present_share_buffer"] = True
    with open(f"{out}/genai_config.json", "w") as f:
        json.dump(cfg, f)
    return out


def run_genai(model, samples, a):
    import onnxruntime_genai as og
    m = og.Model(model)
    proc = m.create_multimodal_processor()

    # Its multimodal pipeline takes one sequence per generator (num_return_sequences must be 1):
    # its best setting is the G samples of each prompt one after another.
    def one_round():
        n = 0
        for text, paths in samples:
            inputs = proc(chat(text), images=og.Images.open(*paths))
            for _ in range(a.group):
                params = og.GeneratorParams(m)
                params.set_search_options(do_sample=True, temperature=1.0, top_k=0, top_p=1.0, max_length=4096)
                gen = og.Generator(m, params)
                gen.set_inputs(inputs)
                steps = 0
                while not gen.is_done() and steps < a.tokens:
                    gen.generate_next_token()
                    steps += 1
                n += steps
        return n

    return timed(one_round, a)


def run_transformers(hf, samples, a):
    import torch
    from transformers import AutoTokenizer, Qwen2_5_VLForConditionalGeneration, Qwen2VLImageProcessor
    torch.set_num_threads(os.cpu_count())
    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(hf, dtype=torch.float32).eval()
    # The image processor and tokenizer directly (AutoProcessor would also want torchvision for video).
    ip = Qwen2VLImageProcessor.from_pretrained(hf)
    tok = AutoTokenizer.from_pretrained(hf)
    tok.padding_side = "left"
    pics = [Image.open(p).convert("RGB") for _, paths in samples for p in paths]
    img = ip(images=pics, return_tensors="pt")
    merge = ip.merge_size ** 2
    counts = iter(int(g.prod() // merge) for g in img["image_grid_thw"])
    texts = ["".join(part if j == 0 else "<|image_pad|>" * next(counts) + part
                     for j, part in enumerate(chat(text).split("<|image_pad|>")))
             for text, _ in samples]
    batch = dict(tok(texts, return_tensors="pt", padding=True))
    batch.update(pixel_values=img["pixel_values"], image_grid_thw=img["image_grid_thw"])
    eos = model.generation_config.eos_token_id

    def one_round():
        with torch.no_grad():
            out = model.generate(**batch, do_sample=True, temperature=1.0, top_k=0, top_p=1.0,
                                 num_return_sequences=a.group, max_new_tokens=a.tokens)
        new = out[:, batch["input_ids"].shape[1]:]
        eos_ids = set(eos if isinstance(eos, list) else [eos])
        n = 0
        for row in new.tolist():
            for tok in row:
                n += 1
                if tok in eos_ids:
                    break
        return n

    return timed(one_round, a)


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--ssrl", default="target/release/ssrl")
    ap.add_argument("--model", default="models/tiny")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--group", type=int, default=5)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=1,
                    help="untimed rounds first, for every engine (task data: 3 lets ONNX Runtime's memory settle)")
    ap.add_argument("--data", help="an `ssrl tasks` JSONL file: its first --batch samples as the prompts "
                                   "(images relative to the folder above the file's folder)")
    ap.add_argument("--genai-decoder", default="models/tiny-genai-decoder",
                    help="onnxruntime-genai's model-builder decoder of the same weights (GroupQueryAttention), "
                         "its fastest graph; '' runs onnxruntime-genai on the package's own decoder")
    a = ap.parse_args()
    with tempfile.TemporaryDirectory() as td:
        if a.data:
            data = a.data
            root = os.path.dirname(os.path.dirname(os.path.abspath(data)))
            with open(data) as f:
                rows = [json.loads(line) for line in f if line.strip()][:a.batch]
            if len(rows) < a.batch:
                sys.exit(f"{data}: {len(rows)} samples, fewer than --batch {a.batch}")
            samples = [(r["problem"], [os.path.join(root, p) for p in r["images"]]) for r in rows]
        else:
            os.makedirs(f"{td}/images")
            os.makedirs(f"{td}/data")
            data, samples = f"{td}/data/bench.jsonl", []
            with open(data, "w") as f:
                for i, im in enumerate(images(a.batch)):
                    p = f"images/{i}.png"
                    im.save(f"{td}/{p}")
                    samples.append((problem(i), [f"{td}/{p}"]))
                    f.write(json.dumps({"id": str(i), "task": "bench", "problem": problem(i), "answer": "",
                                        "images": [p], "source": [], "meta": {}}) + "\n")
        rows = [("ssrl (this project)", *run_ssrl(a.ssrl, a.model, data, a, f"{td}/r.json"))]
        try:
            rows.append(("onnxruntime-genai", *run_genai(genai_folder(a.model, a.genai_decoder, td), samples, a)))
        except Exception as e:  # a peer that cannot run is reported, not fatal
            print(f"onnxruntime-genai: not run ({e})", file=sys.stderr)
        try:
            rows.append(("transformers generate", *run_transformers(f"{a.model}/hf", samples, a)))
        except Exception as e:
            print(f"transformers: not run ({e})", file=sys.stderr)
    print(f"{a.batch} prompts x {a.group} samples ({a.data or 'synthetic one-image prompts'}), {a.tokens} new "
          f"tokens, {a.rounds} rounds after {a.warmup} warm-up, {os.cpu_count()} CPU threads")
    ours = rows[0][1]
    for name, tps, per_round in rows:
        print(f"  {name:<24} {tps:9.1f} tokens/s  ({per_round:.0f} tokens per round)  ssrl = {ours / tps:.2f}x")


if __name__ == "__main__":
    main()
