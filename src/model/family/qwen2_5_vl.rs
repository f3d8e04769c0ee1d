//! Qwen2.5-VL (3B, 7B): 14-pixel patches, window attention in the vision tower, M-RoPE
//! [16, 24, 24]; every graph, LoRA on the language model and the vision tower.

use super::FamilySpec;

pub const SPEC: FamilySpec = FamilySpec {
    id: "qwen2_5_vl",
    name: "Qwen2.5-VL",
    image_pad: "<|image_pad|>",
    rope: super::qwen_mrope,
};
