//! `ssrl bench kernels`: achieved bandwidth of the log-prob kernel over `[rows, vocab]` logits
//! against the machine's own measured bandwidth — one core's read bandwidth for the CPU twin,
//! device-to-device copy bandwidth for CUDA.

use super::{cpu, cuda, KernelError, Logits};
use serde::Serialize;
use std::time::Instant;

#[derive(Debug, Clone, Serialize)]
pub struct BandwidthReport {
    pub backend: String,
    pub rows: usize,
    pub vocab: usize,
    pub bytes: usize,
    /// Seconds per call (median of the repetitions).
    pub seconds: f64,
    pub kernel_gb_s: f64,
    /// The reference bandwidth measured on the same machine.
    pub reference_gb_s: f64,
    pub reference: String,
    pub fraction: f64,
    /// How the work was laid out (CUDA: grid and resident blocks).
    pub launch: String,
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// Single-core streaming read bandwidth: a vectorisable sum over a buffer far larger than cache.
pub fn one_core_read_gb_s(bytes: usize, reps: usize) -> f64 {
    let v: Vec<f32> = (0..bytes / 4).map(|i| (i % 7) as f32).collect();
    let times: Vec<f64> = (0..reps.max(1))
        .map(|_| {
            let t = Instant::now();
            let mut acc = [0f32; 16];
            for c in v.chunks_exact(16) {
                for k in 0..16 {
                    acc[k] += c[k];
                }
            }
            std::hint::black_box(acc);
            t.elapsed().as_secs_f64()
        })
        .collect();
    v.len() as f64 * 4.0 / median(times) / 1e9
}

/// The CPU twin on one thread.
pub fn cpu_logprobs(rows: usize, vocab: usize, reps: usize) -> BandwidthReport {
    let logits: Vec<f32> = (0..rows * vocab)
        .map(|i| ((i * 2_654_435_761usize) % 1000) as f32 / 100.0 - 5.0)
        .collect();
    let targets: Vec<Option<u32>> = (0..rows).map(|r| Some((r * 7919 % vocab) as u32)).collect();
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(1)
        .build()
        .expect("one-thread pool");
    let times: Vec<f64> = (0..reps.max(1))
        .map(|_| {
            let t = Instant::now();
            pool.install(|| {
                std::hint::black_box(
                    cpu::token_logprobs(Logits::F32(&logits), vocab, &targets, 1.0)
                        .expect("shapes agree"),
                )
            });
            t.elapsed().as_secs_f64()
        })
        .collect();
    let bytes = rows * vocab * 4;
    let seconds = median(times);
    let kernel = bytes as f64 / seconds / 1e9;
    let reference = one_core_read_gb_s(bytes.max(256 << 20), 3);
    BandwidthReport {
        backend: "cpu (1 thread)".into(),
        rows,
        vocab,
        bytes,
        seconds,
        kernel_gb_s: kernel,
        reference_gb_s: reference,
        reference: "one core's streaming read".into(),
        fraction: kernel / reference,
        launch: "one thread (rayon pool of 1)".into(),
    }
}

/// The CUDA kernel on device-resident logits.
pub fn cuda_logprobs(
    device: usize,
    rows: usize,
    vocab: usize,
    reps: usize,
) -> Result<BandwidthReport, KernelError> {
    let gpu = cuda::Cuda::new(device)?;
    let (seconds, copy_gb_s) = gpu.bench_logprobs(rows, vocab, reps)?;
    let bytes = rows * vocab * 4;
    let kernel = bytes as f64 / seconds / 1e9;
    Ok(BandwidthReport {
        backend: format!("cuda ({})", gpu.device_name()),
        rows,
        vocab,
        bytes,
        seconds,
        kernel_gb_s: kernel,
        reference_gb_s: copy_gb_s,
        reference: "device-to-device copy (read + write counted)".into(),
        fraction: kernel / copy_gb_s,
        launch: format!(
            "grid {rows} rows × {} slices of 256 threads; {} blocks resident at once",
            gpu.logprob_splits(rows, vocab),
            gpu.block_slots()
        ),
    })
}
