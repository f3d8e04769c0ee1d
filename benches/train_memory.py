#!/usr/bin/env python3
"""Activation memory and speed of a package's training graph across depth and sequence length,
and the fit  act(L, S) = a·S + b·S² + L·(c·S + d·S²)  MiB  extrapolated to the real depth (a
memory-lean graph has d ≈ 0: no layer keeps its attention scores for the backward pass).

    .venv-export/bin/python benches/train_memory.py PKG_2_LAYERS PKG_4_LAYERS [--lengths 512,1024,2048,3072]

Each point is a fresh process that loads train.onnx alone in ONNX Runtime (2 threads, CPU arena
and memory pattern off, so what a call allocates is returned after it), feeds one row of S
tokens — half prompt, half response — and runs it once: activations = the peak RSS of the call
(reset after loading, whose own transient is no activation) − RSS after it (the weights it paged
in stay resident and are not counted). The packages are
made by `make real-3b` (2 layers) and the same with `--text-layers 4`. Needs onnxruntime and
numpy (the exporter's environment has both); `ssrl bench train` measures the trainer's own calls.
"""
import argparse
import json
import os
import subprocess
import sys
import time


def status_mb(field):
    return int(open("/proc/self/status").read().split(field + ":")[1].split()[0]) / 1024


def one_point(pkg, S):
    import numpy as np
    import onnxruntime as ort

    man = json.load(open(os.path.join(pkg, "manifest.json")))
    D, V = man["text"]["hidden_size"], man["text"]["vocab_size"]
    so = ort.SessionOptions()
    so.intra_op_num_threads = 2
    so.log_severity_level = 3
    so.enable_mem_pattern = False
    so.enable_cpu_mem_arena = False
    t0 = time.time()
    s = ort.InferenceSession(os.path.join(pkg, "train.onnx"), so, providers=["CPUExecutionProvider"])
    load_s, rss_load = time.time() - t0, status_mb("VmRSS")
    # The peak from here on: loading has a transient of its own (a copy of the weights as they
    # are read in), which is no activation.
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    rng = np.random.default_rng(0)
    R = S - S // 2
    C = R if man["train"].get("positions") == "completion" else S
    cm = np.zeros((1, C), np.float32)
    cm[:, C - R:] = 1
    feeds = {"inputs_embeds": (rng.standard_normal((1, S, D)) * 0.02).astype(np.float32),
             "attention_mask": np.ones((1, S), np.int64),
             "position_ids": np.broadcast_to(np.arange(S), (3, 1, S)).astype(np.int64).copy(),
             "target_ids": rng.integers(0, V, (1, C)).astype(np.int64), "temperature": np.array(1.0, np.float32),
             "completion_mask": cm, "old_logprobs": np.full((1, C), -12.0, np.float32),
             "ref_logprobs": np.full((1, C), -12.0, np.float32), "advantages": np.ones(1, np.float32),
             "clip_ratio_low": np.array(0.2, np.float32), "clip_ratio_high": np.array(0.3, np.float32),
             "clip_ratio_dual": np.array(3.0, np.float32), "kl_coef": np.array(0.01, np.float32),
             "token_count": np.array(float(R), np.float32)}
    for t in man["lora"]["tensors"]:
        feeds[t["name"] + ".A"] = (rng.standard_normal(t["A"]) * 0.01).astype(np.float32)
        feeds[t["name"] + ".B"] = (rng.standard_normal(t["B"]) * 0.01).astype(np.float32)
    t0 = time.time()
    s.run(None, feeds)
    run_s = time.time() - t0
    peak, after = status_mb("VmHWM"), status_mb("VmRSS")
    return {"layers": man["text"]["num_hidden_layers"], "S": S, "load_s": round(load_s, 1),
            "rss_load_mb": round(rss_load), "peak_mb": round(peak), "rss_after_mb": round(after),
            "activations_mb": round(peak - after), "run_s": round(run_s, 2), "positions_per_s": round(S / run_s, 1)}


def solve(A, y):
    """Least squares by the normal equations (Gauss-Jordan with pivoting)."""
    n = len(A[0])
    M = [[sum(r[i] * r[j] for r in A) for j in range(n)] + [sum(r[i] * v for r, v in zip(A, y))] for i in range(n)]
    for c in range(n):
        piv = max(range(c, n), key=lambda k: abs(M[k][c]))
        M[c], M[piv] = M[piv], M[c]
        for k in range(n):
            if k != c:
                f = M[k][c] / M[c][c]
                M[k] = [a - f * b for a, b in zip(M[k], M[c])]
    return [M[i][n] / M[i][i] for i in range(n)]


def main():
    if len(sys.argv) == 4 and sys.argv[1] == "--point":
        print(json.dumps(one_point(sys.argv[2], int(sys.argv[3]))))
        return
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("pkgs", nargs="+", help="packages of the same widths at two or more depths")
    ap.add_argument("--lengths", default="512,1024,2048,3072")
    ap.add_argument("--json", default="train-memory.json")
    a = ap.parse_args()
    points = []
    for pkg in a.pkgs:
        for S in map(int, a.lengths.split(",")):
            out = subprocess.run([sys.executable, __file__, "--point", pkg, str(S)], check=True,
                                 capture_output=True, text=True).stdout
            p = json.loads(out.strip().splitlines()[-1])
            points.append(p)
            print(f"L={p['layers']} S={p['S']:5}: weights and sessions {p['rss_after_mb']:6} MB, activations "
                  f"{p['activations_mb']:6} MB, {p['run_s']:6.2f} s ({p['positions_per_s']} positions/s)", flush=True)
    A = [[p["S"], p["S"] ** 2, p["layers"] * p["S"], p["layers"] * p["S"] ** 2] for p in points]
    c = solve(A, [p["activations_mb"] for p in points])
    worst = max(abs(sum(x * y for x, y in zip(r, c)) - p["activations_mb"]) / p["activations_mb"]
                for r, p in zip(A, points))
    print(f"fit: act(L, S) = {c[0]:.4g}·S + {c[1]:.4g}·S² + L·({c[2]:.4g}·S + {c[3]:.3g}·S²) MiB "
          f"(worst point off by {100 * worst:.1f} %)")
    for L, S in ((36, 3072), (28, 3072)):
        print(f"  act({L}, {S}) = {(c[0] * S + c[1] * S * S + L * (c[2] * S + c[3] * S * S)) / 1024:.2f} GiB")
    json.dump({"points": points, "fit": c}, open(a.json, "w"), indent=1)


if __name__ == "__main__":
    main()
