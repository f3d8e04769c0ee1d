//! spatial-ssrl: self-supervised spatial reinforcement learning for vision-language models.
//!
//! - [`tasks`]: the five Spatial-SSRL pretext tasks from photos and RGB-D frames.
//! - [`reward`]: EasyR1's verifiable format + accuracy reward.
//! - [`kernels`]: log-probs, sampling, advantages and the optimizer step (CPU and CUDA).

pub mod eval;
pub mod kernels;
pub mod model;
pub mod reward;
pub mod rng;
pub mod rollout;
pub mod tasks;
pub mod train;
