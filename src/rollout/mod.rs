//! The generation engine: group sampling of Qwen2.5-VL through ONNX Runtime.

pub mod engine;

pub use engine::{
    Completion, Engine, EngineError, Finish, GenerationConfig, Prepared, Request, Trace,
};
