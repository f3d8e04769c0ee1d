//! `ssrl bench rollout`: where rollout time goes — prompts/s, generated tokens/s, vision /
//! prefill / decode time, the share of wall time inside ONNX Runtime calls, and resident memory
//! round by round (growth over many decode steps would show a leak).

use super::{Engine, EngineError, EngineStats, GenerationConfig, Request};
use image::{Rgb, RgbImage};
use serde::Serialize;
use std::time::Instant;

#[derive(Debug, Clone, Serialize)]
pub struct RolloutBench {
    /// The package or onnxruntime-genai folder, and the precision of its graphs' floats.
    pub model: String,
    pub dtype: String,
    pub provider: String,
    /// Concurrent CPU slices (0: one set of sessions).
    pub cpu_slices: usize,
    pub temperature: f32,
    /// Nucleus mass (1: off) and top-k (0: off).
    pub top_p: f32,
    pub top_k: usize,
    /// Decoder cache, logits and sampling on the GPU (CUDA / TensorRT).
    pub cache_on_gpu: bool,
    /// The rows' own tokens stay where the decoder reads them instead of being copied every
    /// step (decoders that allow it, on the CPU or CUDA; `--append-cache` turns it off).
    pub own_cache_in_place: bool,
    pub prompts: usize,
    pub group: usize,
    pub max_new_tokens: usize,
    pub rounds: usize,
    pub wall_s: f64,
    pub prompts_per_s: f64,
    pub tokens_per_s: f64,
    pub generated_tokens: usize,
    pub decode_steps: usize,
    /// Time split summed over the timed rounds.
    pub stats: EngineStats,
    /// `stats.ort_s / wall_s`.
    pub ort_share: f64,
    /// `stats.ort_s / (wall_s − stats.slice_wait_s)`: the share of the time the CPU slices
    /// were working (with one worker, the same as `ort_share`). Slices given equal work finish
    /// apart when their cores run at different speeds, as on a shared machine.
    pub ort_share_busy: f64,
    pub peak_rss_mb: f64,
    /// Untimed rounds before the timed ones.
    pub warmup_rounds: usize,
    /// Resident set after each round (the warm-up rounds first).
    pub rss_mb: Vec<f64>,
    /// Last round's RSS minus the first timed round's.
    pub rss_growth_mb: f64,
}

/// Resident and peak resident memory of this process in MB (Linux; 0 elsewhere).
pub fn rss_mb() -> (f64, f64) {
    let text = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let field = |k: &str| {
        text.lines()
            .find(|l| l.starts_with(k))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse::<f64>().ok())
            .map_or(0.0, |kb| kb / 1024.0)
    };
    (field("VmRSS:"), field("VmHWM:"))
}

/// `n` prompts with one synthetic photo-like image each (smooth gradients and texture, sized
/// like a phone photo scaled to 448 × 336), deterministic.
pub fn synthetic_requests(n: usize) -> Vec<Request> {
    (0..n)
        .map(|i| {
            let img = RgbImage::from_fn(448, 336, |x, y| {
                let t = (x * 7 + y * 13 + i as u32 * 31) % 97;
                Rgb([
                    ((x * 255 / 448) as u8).wrapping_add(t as u8),
                    ((y * 255 / 336) as u8).wrapping_add((t * 3) as u8),
                    ((i * 40) as u8).wrapping_add((x ^ y) as u8 / 4),
                ])
            });
            Request {
                id: i as u64,
                problem: format!(
                    "<image>Which of the two marked regions is closer to the camera? Picture {i}."
                ),
                images: vec![img],
            }
        })
        .collect()
}

/// `warmup` untimed rounds, then `rounds` (at least one) timed rounds of `requests` ×
/// `cfg.group`.
pub fn run(
    engine: &mut Engine,
    requests: &[Request],
    cfg: &GenerationConfig,
    warmup: usize,
    rounds: usize,
    mut on_round: impl FnMut(usize, f64),
) -> Result<RolloutBench, EngineError> {
    let mut rss = Vec::with_capacity(warmup + rounds.max(1));
    for _ in 0..warmup {
        engine.generate(requests, cfg, None)?;
        rss.push(rss_mb().0);
    }
    let _ = engine.take_stats();
    let t0 = Instant::now();
    for r in 0..rounds.max(1) {
        let t = Instant::now();
        engine.generate(requests, cfg, None)?;
        rss.push(rss_mb().0);
        on_round(r, t.elapsed().as_secs_f64());
    }
    let wall = t0.elapsed().as_secs_f64();
    let stats = engine.take_stats();
    let rounds = rounds.max(1);
    Ok(RolloutBench {
        model: engine.package.dir.display().to_string(),
        dtype: engine.package.manifest.dtype.clone(),
        provider: engine.provider().to_string(),
        cpu_slices: engine.cpu_slices(),
        temperature: cfg.sampling.temperature,
        top_p: cfg.sampling.top_p,
        top_k: cfg.sampling.top_k,
        cache_on_gpu: engine.cache_on_gpu(),
        own_cache_in_place: engine.own_cache_in_place(),
        prompts: requests.len(),
        group: cfg.group,
        max_new_tokens: cfg.max_new_tokens,
        rounds,
        wall_s: wall,
        prompts_per_s: (requests.len() * rounds) as f64 / wall,
        tokens_per_s: stats.generated_tokens as f64 / wall,
        generated_tokens: stats.generated_tokens,
        decode_steps: stats.decode_steps,
        ort_share: stats.ort_s / wall,
        ort_share_busy: stats.ort_s / (wall - stats.slice_wait_s),
        stats,
        peak_rss_mb: rss_mb().1,
        warmup_rounds: warmup,
        rss_growth_mb: rss.last().copied().unwrap_or(0.0) - rss[warmup],
        rss_mb: rss,
    })
}
