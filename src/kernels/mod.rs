//! Numeric hot spots of the RL loop behind one API: temperature-scaled token log-probs and
//! entropy, sampling (temperature, top-k, top-p, counter-based RNG), GRPO group advantages,
//! AdamW and global gradient-norm clipping.
//!
//! [`cpu`] is the reference; [`cuda`] runs the same algorithms from `kernels/*.cu`, compiled
//! at first use by NVRTC and loaded through cudarc's dynamic loading, so the crate builds and
//! runs with no CUDA installed.

pub mod bench;
pub mod cpu;
pub mod cuda;
pub mod philox;

use serde::{Deserialize, Serialize};

/// Logits in any of the dtypes a model package may emit, row-major `[rows, vocab]`.
#[derive(Debug, Clone, Copy)]
pub enum Logits<'a> {
    F32(&'a [f32]),
    F16(&'a [half::f16]),
    Bf16(&'a [half::bf16]),
}

impl Logits<'_> {
    pub fn len(&self) -> usize {
        match self {
            Logits::F32(v) => v.len(),
            Logits::F16(v) => v.len(),
            Logits::Bf16(v) => v.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    #[inline]
    pub fn get(&self, i: usize) -> f32 {
        match self {
            Logits::F32(v) => v[i],
            Logits::F16(v) => v[i].to_f32(),
            Logits::Bf16(v) => v[i].to_f32(),
        }
    }

    pub fn bytes_per_value(&self) -> usize {
        match self {
            Logits::F32(_) => 4,
            _ => 2,
        }
    }
}

/// Per-row log-prob of the target token and the entropy of the row's distribution, both under
/// `softmax(logits / temperature)`. Rows whose target is `None` (padding) give 0 and 0.
#[derive(Debug, Clone, PartialEq)]
pub struct TokenLogprobs {
    pub logprobs: Vec<f32>,
    pub entropy: Vec<f32>,
}

/// Sampling settings. `temperature == 0` is greedy; `top_k == 0` and `top_p == 1` disable the
/// filters ([`SamplingParams::check`] says which settings sample).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct SamplingParams {
    pub temperature: f32,
    pub top_k: usize,
    pub top_p: f32,
    pub seed: u64,
}

impl Default for SamplingParams {
    fn default() -> Self {
        SamplingParams {
            temperature: 1.0,
            top_k: 0,
            top_p: 1.0,
            seed: 0,
        }
    }
}

impl SamplingParams {
    /// Whether these settings sample: a finite temperature ≥ 0 and top-p in (0, 1]; the error
    /// names the setting and the range.
    pub fn check(&self) -> Result<(), String> {
        check_temperature(self.temperature)?;
        check_top_p(self.top_p)?;
        Ok(())
    }
}

/// A sampling temperature: finite and ≥ 0 (0 is greedy).
pub fn check_temperature(t: f32) -> Result<f32, String> {
    match t.is_finite() && t >= 0.0 {
        true => Ok(t),
        false => Err(format!(
            "temperature {t}: must be a finite number ≥ 0 (0 is greedy)"
        )),
    }
}

/// A nucleus (top-p) mass: in (0, 1] (1 keeps every token). At 0 no token would be kept.
pub fn check_top_p(p: f32) -> Result<f32, String> {
    match p > 0.0 && p <= 1.0 {
        true => Ok(p),
        false => Err(format!(
            "top-p {p}: must be in (0, 1] (1 keeps every token)"
        )),
    }
}

/// Where a row's random numbers come from: the sequence (prompt × sample) and the decoding step.
/// The same key always draws the same numbers, whatever the batch it is in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RowKey {
    pub sequence: u32,
    pub step: u32,
}

/// A drawn token and its log-prob under the distribution it was drawn from: the
/// temperature-scaled softmax, renormalised over the tokens top-k / top-p keep when they cut the
/// row (so with truncated sampling it is the sampler's probability, as an importance ratio
/// needs; without, it is what the trainer's log-prob graph recomputes). Greedy reports the
/// softmax at temperature 1.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Sampled {
    pub token: u32,
    pub logprob: f32,
}

/// How group advantages are normalised.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct AdvantageConfig {
    /// Divide by the group's unbiased standard deviation (GRPO); off is Dr. GRPO.
    pub scale_by_std: bool,
    /// Added to the standard deviation: EasyR1 1e-6, TRL 1e-4.
    pub eps: f32,
}

impl AdvantageConfig {
    /// EasyR1's `compute_grpo_outcome_advantage`.
    pub const EASYR1: AdvantageConfig = AdvantageConfig {
        scale_by_std: true,
        eps: 1e-6,
    };
    /// TRL's GRPOTrainer.
    pub const TRL: AdvantageConfig = AdvantageConfig {
        scale_by_std: true,
        eps: 1e-4,
    };
    /// Dr. GRPO: mean-centred only.
    pub const DR_GRPO: AdvantageConfig = AdvantageConfig {
        scale_by_std: false,
        eps: 0.0,
    };
}

impl Default for AdvantageConfig {
    fn default() -> Self {
        AdvantageConfig::EASYR1
    }
}

/// AdamW hyper-parameters (`torch.optim.AdamW` semantics: decoupled decay `p -= lr·wd·p`).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct AdamW {
    pub lr: f32,
    pub beta1: f32,
    pub beta2: f32,
    pub eps: f32,
    pub weight_decay: f32,
}

impl Default for AdamW {
    fn default() -> Self {
        AdamW {
            lr: 1e-6,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 1e-2,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum KernelError {
    #[error("shape: {0}")]
    Shape(String),
    #[error("CUDA unavailable: {0}")]
    Unavailable(String),
    #[error("CUDA: {0}")]
    Cuda(String),
}

/// Every target id must index the vocabulary (the device kernel reads `logits[row, target]`).
pub(crate) fn check_targets(targets: &[Option<u32>], vocab: usize) -> Result<(), KernelError> {
    match targets.iter().flatten().find(|t| **t as usize >= vocab) {
        Some(t) => Err(KernelError::Shape(format!(
            "target {t} outside a vocabulary of {vocab}"
        ))),
        None => Ok(()),
    }
}

pub(crate) fn check_groups(n: usize, group: usize) -> Result<(), KernelError> {
    if group < 2 || n % group != 0 {
        return Err(KernelError::Shape(format!(
            "{n} scores do not split into groups of {group} (GRPO needs groups of 2 or more)"
        )));
    }
    Ok(())
}

pub(crate) fn check_rows(n: usize, vocab: usize, rows: usize) -> Result<(), KernelError> {
    if vocab == 0 || n != rows * vocab {
        return Err(KernelError::Shape(format!(
            "{n} logits are not {rows} rows × {vocab} vocabulary"
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The ranges' edges: greedy and every-token are settings; zero mass, negative or
    /// non-finite temperatures and masses above one are not.
    #[test]
    fn sampling_checks_take_the_ranges_edges() {
        for t in [0.0, 1e-6, 1.0, 100.0] {
            assert_eq!(check_temperature(t), Ok(t));
        }
        for t in [-1e-6, -1.0, f32::NAN, f32::INFINITY] {
            assert!(check_temperature(t).unwrap_err().contains("≥ 0"), "{t}");
        }
        for p in [1e-6, 0.5, 1.0] {
            assert_eq!(check_top_p(p), Ok(p));
        }
        for p in [0.0, -0.5, 1.0 + 1e-6, f32::NAN] {
            assert!(check_top_p(p).unwrap_err().contains("(0, 1]"), "{p}");
        }
        let p = SamplingParams {
            top_p: 0.0,
            ..Default::default()
        };
        assert!(p.check().unwrap_err().starts_with("top-p 0"));
        assert_eq!(SamplingParams::default().check(), Ok(()));
    }
}
