//! The generation engine: group sampling of Qwen2.5-VL through ONNX Runtime.

pub mod bench;
pub mod engine;
pub(crate) mod float;
mod gpu;
pub mod job;
mod kv;
pub mod request;
mod runner;
mod share;
mod types;

pub use engine::{Completion, Engine, EngineError, EngineStats, Finish, Trace};
pub use request::{GenerationConfig, ImageGrids, NoRoom, Prepared, Request};
