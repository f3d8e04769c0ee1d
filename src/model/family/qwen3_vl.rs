//! Qwen3-VL (2B, 4B, 8B dense): 16-pixel patches, learned vision position embeddings, DeepStack
//! features into the first language layers (the manifest's `vision.deepstack_layers`, which the
//! engine and trainer feed), interleaved M-RoPE inside the graphs — the host's position ids are
//! Qwen2.5-VL's for images. Every graph Qwen2.5-VL has; LoRA on the language model and, where
//! exported with vision targets, on the vision tower and its mergers (the DeepStack ones too),
//! whose backward takes the loss's gradient at both the features and the DeepStack features.

use super::FamilySpec;

pub const SPEC: FamilySpec = FamilySpec {
    id: "qwen3_vl",
    name: "Qwen3-VL",
    image_pad: "<|image_pad|>",
    rope: super::qwen_mrope,
};
