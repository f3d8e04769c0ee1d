"""LoRA layout: the language model's and the vision tower's targets, tensor names and shapes, random
adapters, and PEFT-style hooks on the transformers model (an independent path for checks)."""
import numpy as np
import torch

from .ops import lora_add


LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


# The vision tower's linear layers (each block's attention qkv and proj, its MLP) and the
# merger's two (`--lora-targets vision`: all of them), per family: Qwen2.5-VL's gated MLP and
# merger `mlp.0` / `mlp.2`; Qwen3-VL's two-layer MLP and mergers `linear_fc1` / `linear_fc2`,
# where `visual.merger` also takes the DeepStack mergers (the same module, one per DeepStack
# layer).
VISION_TARGETS = ("visual.qkv", "visual.proj", "visual.gate_proj", "visual.up_proj", "visual.down_proj",
                  "visual.merger")
VISION_TARGETS_QWEN3 = ("visual.qkv", "visual.proj", "visual.linear_fc1", "visual.linear_fc2", "visual.merger")


def vision_targets(family):
    """The vision tower's LoRA targets of a family (`qwen2_5_vl`, `qwen3_vl`)."""
    return VISION_TARGETS_QWEN3 if family == "qwen3_vl" else VISION_TARGETS


def is_visual(name):
    return name.startswith("lora.visual.")


def target_of(name):
    """The `--lora-targets` entry a LoRA tensor name belongs to."""
    parts = name.split(".")
    if not is_visual(name):
        return parts[2]
    return "visual.merger" if parts[2] in ("merger", "deepstack_merger_list") else f"visual.{parts[3]}"


def merger_layers(merger):
    """A merger's linear layers by their tensor-name suffix: Qwen2.5-VL's `mlp_0` / `mlp_2`
    (`merger.mlp[0|2]`), Qwen3-VL's `linear_fc1` / `linear_fc2`."""
    if hasattr(merger, "mlp"):
        return {f"mlp_{j}": merger.mlp[j] for j in (0, 2)}
    return {"linear_fc1": merger.linear_fc1, "linear_fc2": merger.linear_fc2}


def lora_shapes(model, targets, rank):
    """{name: (A shape, B shape)} in PEFT's layout: A [r, in], B [out, r]: the language model's
    (`lora.{layer}.{target}`), then the vision tower's (`lora.visual.{block}.{target}`, the
    merger's `lora.visual.merger.{mlp_0|mlp_2|linear_fc1|linear_fc2}` and Qwen3-VL's DeepStack
    mergers' `lora.visual.deepstack_merger_list.{k}.{linear_fc1|linear_fc2}`)."""
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
            if t.startswith("visual.") and t != "visual.merger":
                short = t.split(".")[1]
                add(f"lora.visual.{i}.{short}", getattr(blk.attn, short, None) or getattr(blk.mlp, short))
    if "visual.merger" in targets:
        for short, lin in merger_layers(vis.merger).items():
            add(f"lora.visual.merger.{short}", lin)
        for k, mg in enumerate(getattr(vis, "deepstack_merger_list", ())):
            for short, lin in merger_layers(mg).items():
                add(f"lora.visual.deepstack_merger_list.{k}.{short}", lin)
    return out


def lora_defaults(names, shapes_):
    """Zero adapters: the LoRA inputs become optional and default to the base model, so runtimes
    that know nothing of them (onnxruntime-genai) run the graph as is."""
    out = {}
    for n in names:
        out[f"{n}.A"] = np.zeros(shapes_[n][0], np.float32)
        out[f"{n}.B"] = np.zeros(shapes_[n][1], np.float32)
    return out


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
        return merger_layers(vis.merger)[p[3]]
    if p[2] == "deepstack_merger_list":
        return merger_layers(vis.deepstack_merger_list[int(p[3])])[p[4]]
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
