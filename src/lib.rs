//! spatial-ssrl: self-supervised spatial reinforcement learning for vision-language models.
//!
//! - [`tasks`]: the five Spatial-SSRL pretext tasks from photos and RGB-D frames.
//! - [`reward`]: EasyR1's verifiable format + accuracy reward.
//! - [`kernels`]: log-probs, sampling, advantages and the optimizer step (CPU and CUDA).

#[macro_use]
mod simd;

pub mod data;
pub mod dist;
pub mod eval;
pub mod kernels;
pub mod model;
pub mod reward;
pub mod rng;
pub mod rollout;
pub mod tasks;
pub mod train;

/// An error and every cause in its source chain, each after a ": " (what `anyhow`'s `{:#}`
/// prints): for messages that leave the error type — a rank's failure sent to the others, a
/// left-out sample's cause, a test's assertion.
pub fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut out = e.to_string();
    let mut at = e.source();
    while let Some(cause) = at {
        out.push_str(": ");
        out.push_str(&cause.to_string());
        at = cause.source();
    }
    out
}

/// Whether two paths name the same file or folder: equal as written, or resolving (links,
/// `..`, relative forms) to one existing place.
pub fn same_path(a: &std::path::Path, b: &std::path::Path) -> bool {
    a == b || matches!((a.canonicalize(), b.canonicalize()), (Ok(p), Ok(q)) if p == q)
}
