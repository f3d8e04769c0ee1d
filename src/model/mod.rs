//! One exported package (a Qwen2.5-VL or Qwen3-VL model: `family/`) and the host-side work
//! around its graphs: loading and validation, ONNX Runtime, image preprocessing and M-RoPE
//! position ids.

pub mod export;
pub mod family;
pub mod onnx_edit;
pub mod package;
pub mod processor;
pub mod prompt;
pub mod rope;
pub mod session;
pub mod weights;
