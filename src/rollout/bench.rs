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

/// One graph's operator time in ONNX Runtime profiles ([`op_profile`]).
#[derive(Debug, Clone, Serialize)]
pub struct GraphProfile {
    /// The profile files' stem: the graph file's, without `.onnx` and a CPU slice's suffix.
    pub graph: String,
    /// Kernel time of every operator run, in µs, and how many runs.
    pub total_us: u64,
    pub runs: usize,
    /// Per operator type, largest first.
    pub ops: Vec<(String, u64)>,
}

/// Kernel time per operator type in ONNX Runtime profile files (`{graph}[-sliceN]_{time}.json`,
/// as [`Engine::end_profiling`] writes them), summed over files of the same graph; graphs in
/// order of their total time.
pub fn op_profile(files: &[std::path::PathBuf]) -> Result<Vec<GraphProfile>, EngineError> {
    let mut graphs: Vec<GraphProfile> = Vec::new();
    for f in files {
        let bad = |m: String| EngineError::Config(format!("{}: {m}", f.display()));
        let text = std::fs::read_to_string(f).map_err(|e| bad(e.to_string()))?;
        let events: Vec<serde_json::Value> =
            serde_json::from_str(&text).map_err(|e| bad(e.to_string()))?;
        let name = f
            .file_name()
            .map_or_else(String::new, |n| n.to_string_lossy().into());
        let stem = name.split('_').next().unwrap_or_default();
        let graph = stem.split("-slice").next().unwrap_or_default().to_string();
        let at = match graphs.iter().position(|g| g.graph == graph) {
            Some(i) => i,
            None => {
                graphs.push(GraphProfile {
                    graph,
                    total_us: 0,
                    runs: 0,
                    ops: vec![],
                });
                graphs.len() - 1
            }
        };
        let g = &mut graphs[at];
        for e in &events {
            let kernel = e["cat"] == "Node"
                && e["name"]
                    .as_str()
                    .is_some_and(|n| n.ends_with("_kernel_time"));
            let (Some(op), Some(us)) = (e["args"]["op_name"].as_str(), e["dur"].as_u64()) else {
                continue;
            };
            if !kernel {
                continue;
            }
            g.total_us += us;
            g.runs += 1;
            match g.ops.iter_mut().find(|(o, _)| o == op) {
                Some((_, t)) => *t += us,
                None => g.ops.push((op.to_string(), us)),
            }
        }
    }
    for g in &mut graphs {
        g.ops.sort_by_key(|(_, us)| std::cmp::Reverse(*us));
    }
    graphs.sort_by_key(|g| std::cmp::Reverse(g.total_us));
    Ok(graphs)
}

/// Resets this process's peak resident memory (Linux's `clear_refs`), so that [`rss_mb`]'s peak
/// is from here on; false where it cannot.
pub fn reset_peak_rss() -> bool {
    std::fs::write("/proc/self/clear_refs", "5").is_ok()
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

#[cfg(test)]
mod tests {
    use super::*;

    /// Kernel events are summed per operator type over the files of one graph (a CPU slice's
    /// with the engine's own), other events left out; graphs and operators largest first.
    #[test]
    fn op_profile_sums_kernel_time_per_graph_and_operator() {
        let dir = std::env::temp_dir().join(format!("ssrl-op-profile-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let ev = |op: &str, us: u64| {
            serde_json::json!({"cat": "Node", "name": format!("n_{op}_kernel_time"), "dur": us,
                               "args": {"op_name": op}})
        };
        let session = serde_json::json!({"cat": "Session", "name": "model_run", "dur": 999});
        let files = [
            (
                "decoder_2026-01-01_00-00-00_1.json",
                vec![ev("MatMul", 30), ev("Add", 5), session.clone()],
            ),
            (
                "decoder-slice1_2026-01-01_00-00-00_2.json",
                vec![ev("Add", 40), ev("MatMul", 1)],
            ),
            ("vision_2026-01-01_00-00-00_3.json", vec![ev("Gemm", 7)]),
        ];
        let mut paths = Vec::new();
        for (name, events) in files {
            let p = dir.join(name);
            std::fs::write(&p, serde_json::to_vec(&events).unwrap()).unwrap();
            paths.push(p);
        }
        let g = op_profile(&paths).unwrap();
        assert_eq!(g.len(), 2);
        assert_eq!(
            (g[0].graph.as_str(), g[0].total_us, g[0].runs),
            ("decoder", 76, 4)
        );
        assert_eq!(
            g[0].ops,
            [("Add".to_string(), 45), ("MatMul".to_string(), 31)]
        );
        assert_eq!((g[1].graph.as_str(), g[1].total_us), ("vision", 7));
        std::fs::write(&paths[2], "not json").unwrap();
        let e = op_profile(&paths).unwrap_err().to_string();
        assert!(e.contains("vision_2026"), "{e}");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
