//! Host-side pieces around an exported Qwen2.5-VL package: image preprocessing and M-RoPE
//! position ids.

pub mod processor;
pub mod rope;
