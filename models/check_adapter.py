"""Loads a spatial-ssrl checkpoint's adapter with peft onto the transformers model it was trained
on, as a user of peft would, and checks that nothing is lost on the way: every module its
`target_modules` selects has its tensors in the file, none is left over, and every tensor loads
bit-exact.

    python models/check_adapter.py RUN/checkpoints/global_step_N HF_DIR

HF_DIR is the base model's Hugging Face folder (a package exported with --tiny or --random-init
keeps one in hf/). Needs peft (not in requirements.txt: the exporter does not use it).
"""
import argparse
import json
import sys

import torch
from peft import LoraConfig, get_peft_model, set_peft_model_state_dict
from safetensors.torch import load_file
from transformers import Qwen2_5_VLForConditionalGeneration, Qwen3VLForConditionalGeneration


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("checkpoint")
    ap.add_argument("hf_dir")
    a = ap.parse_args(argv)
    c = json.load(open(f"{a.checkpoint}/adapter_config.json"))
    family = json.load(open(f"{a.hf_dir}/config.json")).get("model_type")
    cls = Qwen3VLForConditionalGeneration if family == "qwen3_vl" else Qwen2_5_VLForConditionalGeneration
    model = cls.from_pretrained(a.hf_dir)
    peft = get_peft_model(model, LoraConfig(r=c["r"], lora_alpha=c["lora_alpha"], lora_dropout=0.0, bias="none",
                                            target_modules=c["target_modules"]))
    tensors = load_file(f"{a.checkpoint}/adapter_model.safetensors")
    wrapped = [n for n, _ in peft.named_modules() if n.endswith(".lora_A")]
    res = set_peft_model_state_dict(peft, tensors)
    missing = [k for k in res.missing_keys if "lora_" in k]
    state = peft.state_dict()
    differ = [k for k, v in tensors.items() if not torch.equal(state[k.replace(".weight", ".default.weight")], v)]
    vision = sum(".visual." in k for k in tensors) // 2
    print(f"target_modules {c['target_modules']}\n{len(wrapped)} modules wrapped ({vision} in the vision tower), "
          f"{len(tensors)} tensors; missing {len(missing)}, unexpected {len(res.unexpected_keys)}, "
          f"loaded differently {len(differ)}")
    if missing or res.unexpected_keys or differ or len(wrapped) * 2 != len(tensors):
        print("missing:", missing[:5], "unexpected:", res.unexpected_keys[:5], "differ:", differ[:5])
        sys.exit(1)


if __name__ == "__main__":
    main()
