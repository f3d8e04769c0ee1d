//! `ssrl bench train`: speed and memory of the two graphs a GRPO step runs — `logprobs.onnx`
//! (old and reference log-probs) and `train.onnx` (loss and LoRA gradients) — on synthetic rows
//! of a chosen shape, through the trainer's own calls ([`Trainer::completion_logprobs`],
//! [`Trainer::loss_and_grads`]). Memory is the process's: resident after the sessions open, the
//! peak over the log-prob calls and the peak over the training calls that follow them.

use super::batch::Row;
use super::{TrainError, Trainer};
use crate::rng::Rng;
use crate::rollout::bench::{reset_peak_rss, rss_mb};
use serde::Serialize;
use std::time::Instant;

/// The rows each call gets.
#[derive(Debug, Clone, Copy)]
pub struct Shape {
    /// Sequences per call (one micro-batch).
    pub rows: usize,
    pub prompt_len: usize,
    pub response_len: usize,
}

/// One benchmark's figures (also the `--json` file).
#[derive(Debug, Clone, Serialize)]
pub struct TrainBench {
    pub model: String,
    pub provider: String,
    pub rows: usize,
    pub prompt_len: usize,
    pub response_len: usize,
    /// Columns each graph sees per call: rows × (prompt + response − 1).
    pub positions: usize,
    /// Seconds to open every session (the engine's, the log-prob and training graphs).
    pub open_s: f64,
    /// Resident memory once the sessions are open, MB.
    pub rss_open_mb: f64,
    /// The one copy of the weights every session reads, MB (`None`: each session has its
    /// own).
    pub shared_weights_mb: Option<f64>,
    /// Seconds of each timed call, in order (the embedding lookup included).
    pub logprobs_s: Vec<f64>,
    pub train_s: Vec<f64>,
    /// Positions per second of the median call.
    pub logprobs_positions_per_s: f64,
    pub train_positions_per_s: f64,
    /// Peak resident memory over the log-prob calls, and over the whole run (the training
    /// calls come last: ONNX Runtime's arena keeps what a call took), MB; `None` where the
    /// peak cannot be reset after the sessions open.
    pub logprobs_peak_mb: Option<f64>,
    pub train_peak_mb: Option<f64>,
}

fn median(v: &[f64]) -> f64 {
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    match s.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => s[n / 2],
        n => (s[n / 2 - 1] + s[n / 2]) / 2.0,
    }
}

/// Ordinary token ids (below the special tokens, which the package's vocabulary ends with).
fn synthetic_ids(n: usize, limit: u32, key: u64) -> Vec<u32> {
    let mut r = Rng::keyed(0x7261_696e, &[key]);
    (0..n)
        .map(|_| (r.f64() * f64::from(limit)) as u32 % limit)
        .collect()
}

/// Runs `warmup` untimed and `rounds` timed log-prob calls on `shape`, then as many training
/// calls; `on_round(i, logprobs_s, train_s)` for each timed pair at the end. `opened` is what
/// opening `t` took: seconds, and resident MB after it.
pub fn run(
    t: &mut Trainer,
    opened: (f64, f64),
    shape: Shape,
    warmup: usize,
    rounds: usize,
    mut on_round: impl FnMut(usize, f64, f64),
) -> Result<TrainBench, TrainError> {
    let m = t.engine.package.manifest.clone();
    let limit = m.tokens.vision_start.min(m.text.vocab_size as u32).max(1);
    let prompts: Vec<Vec<u32>> = (0..shape.rows)
        .map(|i| synthetic_ids(shape.prompt_len, limit, 2 * i as u64))
        .collect();
    let completions: Vec<Vec<u32>> = (0..shape.rows)
        .map(|i| synthetic_ids(shape.response_len, limit, 2 * i as u64 + 1))
        .collect();
    let rows: Vec<Row<'_>> = prompts
        .iter()
        .zip(&completions)
        .map(|(p, c)| Row {
            prompt: p,
            completion: c,
            grids: &[],
            features: &[],
            deepstack: &[],
        })
        .collect();
    // One micro-batch per call, whatever the configuration says.
    t.cfg.actor.micro_batch_size_per_device_for_experience = shape.rows;
    t.cfg.actor.max_token_len_per_micro_batch = usize::MAX;
    let advantages: Vec<f32> = (0..shape.rows)
        .map(|i| if i % 2 == 0 { 1.0 } else { -1.0 })
        .collect();
    let tokens = shape.rows * shape.response_len;
    // The log-prob calls first, then the training calls: ONNX Runtime's arena keeps what a
    // call took, so the second phase's peak includes the first's memory, not the reverse.
    let can_reset = reset_peak_rss();
    let mut lp_s = Vec::new();
    let mut old = Vec::new();
    for i in 0..warmup + rounds.max(1) {
        let t0 = Instant::now();
        old = t.completion_logprobs(&rows, true)?;
        if i >= warmup {
            lp_s.push(t0.elapsed().as_secs_f64());
        }
    }
    let lp_peak = rss_mb().1;
    let mut tr_s = Vec::new();
    for i in 0..warmup + rounds.max(1) {
        let t0 = Instant::now();
        t.loss_and_grads(&rows, &old, &old, &advantages, 0.01, tokens, None)?;
        if i >= warmup {
            tr_s.push(t0.elapsed().as_secs_f64());
        }
    }
    let tr_peak = rss_mb().1;
    for (i, (a, b)) in lp_s.iter().zip(&tr_s).enumerate() {
        on_round(i, *a, *b);
    }
    let positions = shape.rows * (shape.prompt_len + shape.response_len - 1);
    Ok(TrainBench {
        model: t.cfg.model.display().to_string(),
        provider: t.provider().to_string(),
        rows: shape.rows,
        prompt_len: shape.prompt_len,
        response_len: shape.response_len,
        positions,
        open_s: opened.0,
        rss_open_mb: opened.1,
        shared_weights_mb: t.shared_weights().map(|(_, b)| b as f64 / 1e6),
        logprobs_positions_per_s: positions as f64 / median(&lp_s),
        train_positions_per_s: positions as f64 / median(&tr_s),
        logprobs_s: lp_s,
        train_s: tr_s,
        logprobs_peak_mb: can_reset.then_some(lp_peak),
        train_peak_mb: can_reset.then_some(tr_peak),
    })
}
