#!/usr/bin/env python3
"""One GRPO training step, ssrl against transformers on the same weights, side by side.

    .venv-export/bin/python benches/peers/train_peer.py PKG [--prompt-len 512] [--response-len 512]
                                                         [--rounds 2] [--ssrl target/release/ssrl]

PKG is a package with its Hugging Face folder in PKG/hf (`make real-3b`, `--random-init`). One row
of prompt + response tokens, LoRA on the package's targets. transformers: fp32, eager attention,
2 threads, logits for the response only (`logits_to_keep`), EasyR1's loss (the exporter's
grpo_loss), autograd to the LoRA tensors, with and without gradient checkpointing. ssrl: `ssrl
bench train` on the package (the trainer's own train.onnx call). Prints positions/s and the peak
RSS of the step above the RSS before it, for each.
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "models"))
import export  # noqa: E402


def status_mb(field):
    return int(open("/proc/self/status").read().split(field + ":")[1].split()[0]) / 1024


def hf_step(model, man, P, R, rounds, checkpointing):
    torch.manual_seed(0)
    D, V = man["text"]["hidden_size"], man["text"]["vocab_size"]
    S, C = P + R - 1, R
    x = torch.randn(1, S, D) * 0.02
    am = torch.ones(1, S, dtype=torch.int64)
    pos = torch.arange(S)[None, None].expand(3, 1, S).contiguous()
    tgt = torch.randint(0, V, (1, C))
    cm = torch.ones(1, C)
    old = torch.full((1, C), -12.0)
    settings = [torch.tensor(v) for v in (1.0, 0.2, 0.3, 3.0, 0.01)]
    scale = man["lora"]["scale"]
    ws, hooks = [], []
    for t in man["lora"]["tensors"]:
        _, i, target = t["name"].split(".")
        layer = model.model.language_model.layers[int(i)]
        lin = getattr(layer.self_attn, target, None) or getattr(layer.mlp, target)
        A = (torch.randn(*t["A"]) * 0.01).requires_grad_(True)
        B = (torch.randn(*t["B"]) * 0.01).requires_grad_(True)
        ws += [A, B]
        hooks.append(lin.register_forward_hook(
            (lambda A, B: lambda m, inp, o: o + F.linear(F.linear(inp[0], A), B) * scale)(A, B)))
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.train()
    times, peaks = [], []
    try:
        for _ in range(rounds + 1):
            before = status_mb("VmRSS")
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            t0 = time.time()
            o = model(inputs_embeds=x, attention_mask=am, position_ids=pos, use_cache=False, logits_to_keep=C)
            logp = torch.gather(torch.log_softmax(o.logits.float() / settings[0], -1), -1, tgt[..., None]).squeeze(-1)
            loss, _ = export.grpo_loss(logp, logp.detach(), cm, old, old, torch.ones(1), *settings[1:], cm.sum())
            torch.autograd.grad(loss, ws)
            times.append(time.time() - t0)
            peaks.append(status_mb("VmHWM") - before)
    finally:
        for h in hooks:
            h.remove()
        if checkpointing:
            model.gradient_checkpointing_disable()
            model.eval()
    return sorted(times[1:])[len(times[1:]) // 2], max(peaks[1:])


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("pkg")
    ap.add_argument("--prompt-len", type=int, default=512)
    ap.add_argument("--response-len", type=int, default=512)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--ssrl", default="target/release/ssrl")
    a = ap.parse_args()
    torch.set_num_threads(2)
    man = json.load(open(os.path.join(a.pkg, "manifest.json")))
    S = a.prompt_len + a.response_len - 1
    with tempfile.TemporaryDirectory() as d:
        out = os.path.join(d, "b.json")
        subprocess.run([a.ssrl, "bench", "train", "--model", a.pkg, "--rows", "1", "--prompt-len", str(a.prompt_len),
                        "--response-len", str(a.response_len), "--rounds", str(a.rounds), "--json", out],
                       check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        b = json.load(open(out))
    ssrl_s = sorted(b["train_s"])[len(b["train_s"]) // 2]
    rows = [("ssrl train.onnx", ssrl_s, b["train_peak_mb"] - b["logprobs_peak_mb"])]
    model = export.load_model(os.path.join(a.pkg, "hf"))
    for p in model.parameters():
        p.requires_grad_(False)
    for ck in (False, True):
        t, peak = hf_step(model, man, a.prompt_len, a.response_len, a.rounds, ck)
        rows.append((f"transformers{' + checkpointing' if ck else ''}", t, peak))
    print(f"one GRPO step, 1 × {S} positions ({a.response_len} scored), {man['text']['num_hidden_layers']} layers, fp32, 2 threads")
    for name, t, peak in rows:
        print(f"  {name:32} {S / t:7.1f} positions/s ({t:.2f} s), step's peak above the RSS before it {peak:6.0f} MB"
              f"  (ssrl ×{(S / ssrl_s) / (S / t):.2f} faster)" if name != rows[0][0] else
              f"  {name:32} {S / t:7.1f} positions/s ({t:.2f} s), step's peak above the log-prob phase {peak:6.0f} MB")


if __name__ == "__main__":
    main()
