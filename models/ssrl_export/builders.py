"""The tiny and random-weight Qwen2.5-VL models (their tokenizer, configs and weights), and loading a
Hugging Face checkpoint in either transformers layout."""
import json
import os
import time

import torch

from .settings import torch_dtype


HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # models/


QWEN_PAT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)


QWEN25VL_ADDED = [
    ("<|endoftext|>", True), ("<|im_start|>", True), ("<|im_end|>", True),
    ("<|object_ref_start|>", True), ("<|object_ref_end|>", True), ("<|box_start|>", True), ("<|box_end|>", True),
    ("<|quad_start|>", True), ("<|quad_end|>", True), ("<|vision_start|>", True), ("<|vision_end|>", True),
    ("<|vision_pad|>", True), ("<|image_pad|>", True), ("<|video_pad|>", True),
    ("<tool_call>", False), ("</tool_call>", False), ("<|fim_prefix|>", False), ("<|fim_middle|>", False),
    ("<|fim_suffix|>", False), ("<|fim_pad|>", False), ("<|repo_name|>", False), ("<|file_sep|>", False),
]


CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}"
    "{{ message['content'] }}<|im_end|>\n{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}"
    "{% if add_vision_id %}Picture {{ image_count.value }}: {% endif %}"
    "<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}"
    "{% set video_count.value = video_count.value + 1 %}"
    "{% if add_vision_id %}Video {{ video_count.value }}: {% endif %}"
    "<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


# Text the tiny BPE is trained on: committed with the exporter so the vocabulary is reproducible.
TINY_CORPUS = [os.path.join(HERE, "tiny_corpus.txt")]


def build_tiny_tokenizer(out_dir, vocab_size=2000, chat_template=CHAT_TEMPLATE):
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE(unk_token=None, fuse_unk=False, byte_fallback=False))
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN_PAT), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)
    tok.post_processor = processors.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=2, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), special_tokens=[])
    tok.train(TINY_CORPUS, trainer)
    for content, special in QWEN25VL_ADDED:  # appended after the BPE vocabulary, in Qwen's order
        at = AddedToken(content, single_word=False, lstrip=False, rstrip=False, normalized=False, special=special)
        (tok.add_special_tokens if special else tok.add_tokens)([at])
    os.makedirs(out_dir, exist_ok=True)
    tok.save(os.path.join(out_dir, "tokenizer.json"))
    added = {str(tok.token_to_id(c)): {"content": c, "lstrip": False, "normalized": False, "rstrip": False,
                                       "single_word": False, "special": s} for c, s in QWEN25VL_ADDED}
    json.dump({"add_bos_token": False, "add_prefix_space": False, "added_tokens_decoder": added,
               "additional_special_tokens": [c for c, _ in QWEN25VL_ADDED[1:14]], "bos_token": None,
               "clean_up_tokenization_spaces": False, "eos_token": "<|im_end|>", "errors": "replace",
               "model_max_length": 32768, "pad_token": "<|endoftext|>", "split_special_tokens": False,
               "tokenizer_class": "Qwen2Tokenizer", "unk_token": None, "chat_template": chat_template},
              open(os.path.join(out_dir, "tokenizer_config.json"), "w"), indent=2)
    json.dump({"chat_template": chat_template}, open(os.path.join(out_dir, "chat_template.json"), "w"), indent=2)
    return {c: tok.token_to_id(c) for c, _ in QWEN25VL_ADDED}


def vision_token_ids(sp):
    """The config's vision token ids from the tokenizer's special tokens `sp`."""
    return dict(image_token_id=sp["<|image_pad|>"], video_token_id=sp["<|video_pad|>"],
                vision_start_token_id=sp["<|vision_start|>"], vision_end_token_id=sp["<|vision_end|>"])


def tiny_config(sp):
    from transformers import Qwen2_5_VLConfig

    vocab = ((max(sp.values()) + 1 + 63) // 64) * 64  # padded like the real vocabulary
    text = dict(vocab_size=vocab, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, hidden_act="silu", max_position_embeddings=4096,
                rms_norm_eps=1e-6, use_sliding_window=False,
                rope_parameters={"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": [4, 6, 6]},
                bos_token_id=sp["<|endoftext|>"], eos_token_id=sp["<|im_end|>"], pad_token_id=sp["<|endoftext|>"])
    vision = dict(depth=2, hidden_size=64, intermediate_size=128, num_heads=2, hidden_act="silu", in_channels=3,
                  patch_size=14, temporal_patch_size=2, spatial_merge_size=2, window_size=112,
                  out_hidden_size=128, fullatt_block_indexes=[1], tokens_per_second=2)
    cfg = Qwen2_5_VLConfig(text_config=text, vision_config=vision, tie_word_embeddings=True, **vision_token_ids(sp))
    cfg.architectures = ["Qwen2_5_VLForConditionalGeneration"]
    return cfg


PREPROCESSOR = {"do_convert_rgb": True, "do_normalize": True, "do_rescale": True, "do_resize": True,
                "image_mean": [0.48145466, 0.4578275, 0.40821073], "image_std": [0.26862954, 0.26130258, 0.27577711],
                "image_processor_type": "Qwen2VLImageProcessor", "max_pixels": 12845056, "merge_size": 2,
                "min_pixels": 3136, "patch_size": 14, "resample": 3, "rescale_factor": 0.00392156862745098,
                "size": {"longest_edge": 12845056, "shortest_edge": 3136}, "temporal_patch_size": 2}


def build_tiny(hf_dir, seed=0):
    """A random-weight Qwen2.5-VL with the real architecture and small sizes (weights std 0.08,
    so logits are far from uniform and greedy comparisons mean something)."""
    from transformers import Qwen2_5_VLForConditionalGeneration

    sp = build_tiny_tokenizer(hf_dir)
    torch.manual_seed(seed)
    save_tiny(Qwen2_5_VLForConditionalGeneration(tiny_config(sp)).eval(), hf_dir, PREPROCESSOR)


def save_tiny(model, hf_dir, preprocessor):
    """A tiny model's matrices drawn with std 0.08 (so that logits are far from uniform and
    greedy comparisons mean something), saved with its preprocessor config in `hf_dir`."""
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.normal_(0.0, 0.08)
    model.save_pretrained(hf_dir)
    json.dump(preprocessor, open(os.path.join(hf_dir, "preprocessor_config.json"), "w"), indent=2)


QWEN_SPECIAL_BASE = 151643  # Qwen2.5's added tokens, in QWEN25VL_ADDED's order, from this id on


REAL_TEXT = {
    "qwen2.5-vl-3b": dict(vocab_size=151936, hidden_size=2048, intermediate_size=11008, num_hidden_layers=36,
                          num_attention_heads=16, num_key_value_heads=2, tie_word_embeddings=True),
    "qwen2.5-vl-7b": dict(vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                          num_attention_heads=28, num_key_value_heads=4, tie_word_embeddings=False),
}


REAL_VISION = dict(depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16, hidden_act="silu",
                   in_channels=3, patch_size=14, temporal_patch_size=2, spatial_merge_size=2, window_size=112,
                   fullatt_block_indexes=[7, 15, 23, 31], tokens_per_second=2)


def remap_special_tokens(hf_dir):
    """The tiny tokenizer's added tokens moved onto Qwen2.5's ids (151643 …), so that a package
    with the real vocabulary has its special tokens where the real model has them."""
    ids = {c: QWEN_SPECIAL_BASE + i for i, (c, _) in enumerate(QWEN25VL_ADDED)}
    tp = os.path.join(hf_dir, "tokenizer.json")
    tok = json.load(open(tp))
    # An added token keeps its id only where the model's vocabulary has it at that id.
    for t in tok["added_tokens"]:
        t["id"] = ids[t["content"]]
        tok["model"]["vocab"][t["content"]] = t["id"]
    json.dump(tok, open(tp, "w"), ensure_ascii=False)
    cp = os.path.join(hf_dir, "tokenizer_config.json")
    tc = json.load(open(cp))
    tc["added_tokens_decoder"] = {str(ids[v["content"]]): v for v in tc["added_tokens_decoder"].values()}
    json.dump(tc, open(cp, "w"), indent=2)
    return ids


def build_random(name, hf_dir, text_layers=None, vision_depth=None, seed=0):
    """`name`'s real configuration with random weights (transformers' own initialisation) and the
    tiny tokenizer standing in for Qwen's; `text_layers` / `vision_depth` cut the depth only (the
    vision tower keeps a full-attention block every 8, its last block always one)."""
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    build_tiny_tokenizer(hf_dir)
    sp = remap_special_tokens(hf_dir)
    text = dict(REAL_TEXT[name], hidden_act="silu", max_position_embeddings=128000, rms_norm_eps=1e-6,
                use_sliding_window=False, initializer_range=0.02,
                rope_parameters={"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": [16, 24, 24]},
                bos_token_id=sp["<|endoftext|>"], eos_token_id=sp["<|im_end|>"], pad_token_id=sp["<|endoftext|>"])
    tie = text.pop("tie_word_embeddings")
    if text_layers:
        text["num_hidden_layers"] = text_layers
    vision = dict(REAL_VISION, out_hidden_size=text["hidden_size"])
    if vision_depth:
        vision["depth"] = vision_depth
        vision["fullatt_block_indexes"] = sorted({i for i in range(7, vision_depth, 8)} | {vision_depth - 1})
    cfg = Qwen2_5_VLConfig(text_config=text, vision_config=vision, tie_word_embeddings=tie, **vision_token_ids(sp))
    cfg.architectures = ["Qwen2_5_VLForConditionalGeneration"]
    save_random(Qwen2_5_VLForConditionalGeneration, cfg, hf_dir, seed, PREPROCESSOR,
                f"{name}: {text['num_hidden_layers']} text layers, {vision['depth']} vision blocks")


def save_random(model_class, cfg, hf_dir, seed, preprocessor, about):
    """`model_class(cfg)` with transformers' initialisation under `seed`, its size printed after
    `about`, saved with its preprocessor config in `hf_dir`."""
    torch.manual_seed(seed)
    t0 = time.time()
    model = model_class(cfg).eval()
    n = sum(p.numel() for p in model.parameters())
    print(f"  {about}, {n / 1e6:.1f} M parameters ({n * 4 / 1e9:.2f} GB fp32), built in {time.time() - t0:.1f} s",
          flush=True)
    model.save_pretrained(hf_dir)
    json.dump(preprocessor, open(os.path.join(hf_dir, "preprocessor_config.json"), "w"), indent=2)


def normalise_config_dict(d):
    d = json.loads(json.dumps(d))
    if "text_config" not in d:  # 4.x: text fields at the top level
        keys = ["vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads", "hidden_act", "max_position_embeddings", "rms_norm_eps", "rope_theta",
                "rope_scaling", "use_sliding_window", "sliding_window", "max_window_layers", "attention_dropout",
                "bos_token_id", "eos_token_id", "pad_token_id", "tie_word_embeddings", "initializer_range"]
        d["text_config"] = {k: d[k] for k in keys if k in d}
    tc = d["text_config"]
    rs = tc.pop("rope_scaling", None) or d.pop("rope_scaling", None)
    if "rope_parameters" not in tc:
        section = (rs or {}).get("mrope_section", [16, 24, 24])
        tc["rope_parameters"] = {"rope_type": "default", "rope_theta": tc.pop("rope_theta", d.get("rope_theta", 1e6)),
                                 "mrope_section": section}
    return d


def family_of(hf_dir):
    """The model family of a Hugging Face folder, from its config.json's model_type."""
    t = json.load(open(os.path.join(hf_dir, "config.json"))).get("model_type", "qwen2_5_vl")
    if t not in ("qwen2_5_vl", "qwen3_vl"):
        raise SystemExit(f"{hf_dir}: model_type {t!r}; the exporter knows qwen2_5_vl and qwen3_vl")
    return t


def load_model(hf_dir):
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    if family_of(hf_dir) == "qwen3_vl":
        from transformers import Qwen3VLForConditionalGeneration
        model = Qwen3VLForConditionalGeneration.from_pretrained(hf_dir, dtype=torch_dtype(), attn_implementation="eager")
        return model.eval()
    raw = json.load(open(os.path.join(hf_dir, "config.json")))
    cfg = Qwen2_5_VLConfig(**normalise_config_dict(raw))
    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(hf_dir, config=cfg, dtype=torch_dtype(),
                                                               attn_implementation="eager")
    return model.eval()
