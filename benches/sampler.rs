//! The CPU sampler per row and per token, and its parts: the row's log-normaliser (the
//! sampler's two-pass one, and the f64 online pass it replaced) and the Philox draws for every
//! token of a row (eight Philox blocks of four tokens at a time, and one token at a time); and
//! the whole call with top-p 0.9 and with top-k 50 (thresholds and renormalised log-probs).
//! Shapes: the rollout bench's 40 rows × 2,048 (the tiny package) and 8 rows × 151,936
//! (Qwen2.5-VL's vocabulary), logits with the spread of a trained model's (σ = 3).
//!
//! `cargo bench --bench sampler`.

use spatial_ssrl::kernels::cpu::{self, RowStats};
use spatial_ssrl::kernels::{philox, Logits, RowKey, SamplingParams};
use spatial_ssrl::rng::Rng;
use std::hint::black_box;
mod common;
use common::median_s;

fn main() {
    let threads = rayon::current_num_threads();
    println!(
        "CPU sampler, {threads} rayon threads (rows in parallel); per token = per row / vocab"
    );
    for (rows, vocab, reps) in [(40usize, 2048usize, 200usize), (8, 151_936, 20)] {
        let mut rng = Rng::keyed(3, &[]);
        // Box-Muller normals.
        let logits: Vec<f32> = (0..rows * vocab)
            .map(|_| {
                let (u, v) = (1.0 - rng.f64(), rng.f64());
                (3.0 * (-2.0 * u.ln()).sqrt() * (std::f64::consts::TAU * v).cos()) as f32
            })
            .collect();
        let keys: Vec<RowKey> = (0..rows as u32)
            .map(|r| RowKey {
                sequence: r,
                step: 7,
            })
            .collect();
        let p = SamplingParams {
            temperature: 1.0,
            top_k: 0,
            top_p: 1.0,
            seed: 11,
        };
        let all = median_s(reps, || {
            black_box(cpu::sample(Logits::F32(&logits), vocab, &keys, &p).unwrap());
        });
        // Nucleus and top-k filtering: the threshold search and the renormalised log-prob.
        let top_p = median_s(reps, || {
            let p = SamplingParams { top_p: 0.9, ..p };
            black_box(cpu::sample(Logits::F32(&logits), vocab, &keys, &p).unwrap());
        });
        let top_k = median_s(reps, || {
            let p = SamplingParams { top_k: 50, ..p };
            black_box(cpu::sample(Logits::F32(&logits), vocab, &keys, &p).unwrap());
        });
        let row = &logits[..vocab];
        let stats = median_s(reps, || {
            black_box(RowStats::of(row.iter().copied(), 1.0));
        });
        let fast = median_s(reps, || {
            black_box(cpu::log_normaliser(black_box(row)));
        });
        let mut u = vec![0f32; vocab];
        let draws = median_s(reps, || {
            philox::fill_uniforms(11, 0, 7, 0, black_box(&mut u));
        });
        let scalar = median_s(reps, || {
            for t in 0..vocab as u32 {
                black_box(philox::token_uniform(11, 0, 7, t));
            }
        });
        let ns = |s: f64| s * 1e9 / vocab as f64;
        println!(
            "{rows:>3} × {vocab:>7}: {:>8.1} µs per call ({:.2} ns per token on {threads} threads); \
             one row on one thread: log-normaliser {:.2} ns (the f64 online pass {:.2}), \
             Philox {:.2} ns per token (one token at a time {:.2}); \
             with top-p 0.9 {:.1} µs per call, top-k 50 {:.1} µs",
            all * 1e6,
            ns(all) / rows as f64 * threads as f64,
            ns(fast),
            ns(stats),
            ns(draws),
            ns(scalar),
            top_p * 1e6,
            top_k * 1e6,
        );
    }
}
