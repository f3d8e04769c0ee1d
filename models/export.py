#!/usr/bin/env python3
"""spatial-ssrl model exporter: a Hugging Face Qwen2.5-VL or Qwen3-VL checkpoint → an ONNX model
package.

    python models/export.py HF_DIR --out PACKAGE [--verify]
    python models/export.py --tiny [--family qwen3_vl] --out models/tiny [--verify]
    python models/export.py --random-init qwen2.5-vl-3b|qwen2.5-vl-7b|qwen3-vl-4b [--text-layers N]
        [--vision-depth N] --out PACKAGE

The exporter is the package models/ssrl_export/ (`--help` describes the graphs):
  settings.py    the command line's settings (opset, dtype, chunking) and dtype helpers
  onnx_io.py     torch → ONNX export, the shared weights file, joint forward + backward graphs
  ops.py         autograd building blocks: LoRA branch, RMSNorm, recomputation, chunked head / attention
  lora.py        LoRA targets (language model, vision tower), names, shapes, PEFT-style hooks
  contracts.py   the training graphs' batch inputs and statistics
  qwen2_5_vl.py  the Qwen2.5-VL family: vision tower, embedding, decoder, package files, M-RoPE
  training.py    log-prob, GRPO, SFT and vision-tower gradient graphs
  builders.py    the tiny and random-weight models and their tokenizer; loading a checkpoint
  verify.py      --verify: every graph against transformers and autograd
  goldens.py     --goldens: reference values for the Rust tests
  cli.py         this command line
A family's exporter is a module beside qwen2_5_vl.py with the same functions.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from ssrl_export.cli import main  # noqa: E402

if __name__ == "__main__":
    main()
