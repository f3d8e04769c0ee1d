//! `ssrl bench kernels | rollout | train`.

use super::*;

#[derive(clap::Args)]
pub(crate) struct BenchKernelsArgs {
    /// Logit rows (tokens).
    #[arg(long, default_value_t = 64, value_parser = at_least_one)]
    pub(crate) rows: usize,
    /// Vocabulary size (Qwen2.5-VL: 151,936).
    #[arg(long, default_value_t = 151_936, value_parser = at_least_one)]
    pub(crate) vocab: usize,
    /// Backends to measure: cpu, cuda, or both (cuda is skipped with a note when unavailable).
    #[arg(long, value_delimiter = ',', default_value = "cpu,cuda")]
    pub(crate) device: Vec<String>,
    /// CUDA device ordinal.
    #[arg(long, default_value_t = 0)]
    pub(crate) cuda_device: usize,
    /// Repetitions (the median is reported).
    #[arg(long, default_value_t = 5, value_parser = at_least_one)]
    pub(crate) reps: usize,
    /// Also write the results here.
    #[arg(long, default_value = "bench-kernels.json")]
    pub(crate) json: PathBuf,
}

pub(crate) fn run_bench_kernels(a: BenchKernelsArgs) -> Result<()> {
    use spatial_ssrl::kernels::{bench, KernelError};
    let mut reports = Vec::new();
    for d in &a.device {
        match d.as_str() {
            "cpu" => reports.push(bench::cpu_logprobs(a.rows, a.vocab, a.reps)),
            "cuda" => match bench::cuda_logprobs(a.cuda_device, a.rows, a.vocab, a.reps) {
                Ok(r) => reports.push(r),
                Err(KernelError::Unavailable(why)) => outln!("cuda: skipped ({why})"),
                Err(e) => return Err(e.into()),
            },
            other => anyhow::bail!("unknown device {other:?}: use cpu and/or cuda"),
        }
    }
    outln!(
        "token log-probs over [{} × {}] f32 logits ({:.1} MB)",
        a.rows,
        a.vocab,
        (a.rows * a.vocab * 4) as f64 / 1e6
    );
    for r in &reports {
        outln!(
            "{:<28} {:>8.3} ms  {:>7.2} GB/s  = {:>5.1} % of {} ({:.2} GB/s)",
            r.backend,
            r.seconds * 1e3,
            r.kernel_gb_s,
            r.fraction * 100.0,
            r.reference,
            r.reference_gb_s
        );
        outln!("{:<28} {}", "", r.launch);
    }
    write_json(&a.json, &reports)
}

#[derive(clap::Args)]
pub struct BenchRolloutArgs {
    /// Package folder, or an onnxruntime-genai Qwen2.5-VL folder (genai_config.json).
    #[arg(long, value_name = "DIR", default_value = "models/tiny")]
    pub(crate) model: PathBuf,
    /// Prompts from a task dataset (a .parquet / .jsonl file, or an `ssrl tasks` folder: its
    /// shards in order; images found as `ssrl rollout --images-root` says); default:
    /// synthetic 448×336 photos with a depth-style question.
    #[arg(long, value_name = "PATH")]
    pub(crate) data: Option<PathBuf>,
    /// Prompts per batch (B).
    #[arg(long, default_value_t = 8, value_parser = at_least_one)]
    pub(crate) batch: usize,
    /// Samples per prompt (G).
    #[arg(long, default_value_t = 5, value_parser = at_least_one)]
    pub(crate) group: usize,
    #[arg(long, default_value_t = 64, value_parser = at_least_one)]
    pub(crate) max_new_tokens: usize,
    /// Timed rounds after the warm-up (16 rounds of 64 tokens ≈ 1,000 decode steps, for the
    /// memory-growth check).
    #[arg(long, default_value_t = 3, value_parser = at_least_one)]
    pub(crate) rounds: usize,
    /// Untimed rounds first. ONNX Runtime's memory settles in one round for prompts alike; task
    /// data with prompts of several images can take three.
    #[arg(long, default_value_t = 1)]
    pub(crate) warmup: usize,
    /// 0 is greedy.
    #[arg(long, default_value_t = 1.0, value_parser = temperature, allow_negative_numbers = true)]
    pub(crate) temperature: f32,
    /// Sample from the most likely tokens whose mass reaches P (1 = all), as a rollout would.
    #[arg(long, default_value_t = 1.0, value_parser = top_p, allow_negative_numbers = true)]
    pub(crate) top_p: f32,
    /// Sample from the K most likely tokens (0 = all).
    #[arg(long, default_value_t = 0)]
    pub(crate) top_k: usize,
    #[command(flatten)]
    pub(crate) device: DeviceArgs,
    /// Also write the results here.
    #[arg(long, default_value = "bench-rollout.json")]
    pub(crate) json: PathBuf,
    /// Write ONNX Runtime's per-operator profile of every session into DIR and print the time
    /// per operator type of each graph (profiling slows the run: its tokens/s are not the
    /// engine's).
    #[arg(long, value_name = "DIR")]
    pub(crate) profile: Option<PathBuf>,
    /// libonnxruntime.so to load (default: $ORT_DYLIB_PATH, then vendor/ort).
    #[arg(long, value_name = "FILE")]
    pub(crate) ort_lib: Option<PathBuf>,
}

pub fn run_bench_rollout(a: BenchRolloutArgs) -> Result<()> {
    use spatial_ssrl::kernels::SamplingParams;
    use spatial_ssrl::rollout::{bench, GenerationConfig, Request};
    if let Some(dir) = &a.profile {
        std::fs::create_dir_all(dir).with_context(|| format!("cannot make {}", dir.display()))?;
    }
    let mut engine = a.device.open(
        &a.model,
        a.ort_lib.as_deref(),
        a.batch * a.group,
        a.max_new_tokens,
        a.profile.as_deref(),
    )?;
    let requests: Vec<Request> = match &a.data {
        None => bench::synthetic_requests(a.batch),
        Some(path) => spatial_ssrl::data::records::read_dataset(path, None, a.batch)
            .context("cannot read samples")?
            .iter()
            .enumerate()
            .map(|(i, (s, root))| {
                Ok(Request {
                    id: i as u64,
                    problem: s.problem.clone(),
                    images: s.load_images(root)?,
                })
            })
            .collect::<Result<_>>()?,
    };
    let cfg = GenerationConfig {
        group: a.group,
        max_new_tokens: a.max_new_tokens,
        sampling: SamplingParams {
            temperature: a.temperature,
            top_k: a.top_k,
            top_p: a.top_p,
            seed: 0,
        },
        verbatim: false,
        format_sentence: Some(spatial_ssrl::data::FORMAT_SENTENCE.into()),
    };
    let slices = match engine.cpu_slices() {
        0 => String::new(),
        n => format!(" in {n} concurrent slices (--cpu-slices)"),
    };
    eprintln!(
        "{} prompts × {} samples, {} new tokens, {} timed rounds after {} warm-up round{}, on {}{slices}",
        requests.len(),
        a.group,
        a.max_new_tokens,
        a.rounds.max(1),
        a.warmup,
        if a.warmup == 1 { "" } else { "s" },
        engine.provider()
    );
    let r = bench::run(&mut engine, &requests, &cfg, a.warmup, a.rounds, |i, s| {
        eprintln!("  round {}: {s:.2} s", i + 1)
    })?;
    outln!(
        "{:.2} prompts/s, {:.1} generated tokens/s ({} tokens, {} decoder steps in {:.2} s)",
        r.prompts_per_s,
        r.tokens_per_s,
        r.generated_tokens,
        r.decode_steps,
        r.wall_s
    );
    outln!(
        "vision {:.2} s, prefill {:.2} s ({} prompt tokens), decode {:.2} s; inside ONNX Runtime {:.1} % of wall time{}",
        r.stats.vision_s,
        r.stats.prefill_s,
        r.stats.prefill_tokens,
        r.stats.decode_s,
        100.0 * r.ort_share,
        match engine.cpu_slices() {
            0 => String::new(),
            _ => format!(
                " ({:.1} % of the time the slices were working)",
                100.0 * r.ort_share_busy
            ),
        }
    );
    outln!(
        "outside ONNX Runtime: image preprocessing {:.2} s, sampling {:.2} s, cache rows {:.2} s, slices waiting for the slowest {:.2} s, other {:.2} s",
        r.stats.preprocess_s,
        r.stats.sample_s,
        r.stats.cache_s,
        r.stats.slice_wait_s,
        r.wall_s
            - r.stats.ort_s
            - r.stats.preprocess_s
            - r.stats.sample_s
            - r.stats.cache_s
            - r.stats.slice_wait_s
    );
    outln!(
        "RSS {:.0} MB (peak {:.0} MB), growth over the timed rounds {:+.1} MB",
        r.rss_mb.last().copied().unwrap_or(0.0),
        r.peak_rss_mb,
        r.rss_growth_mb
    );
    if let Some(dir) = &a.profile {
        let files = engine.end_profiling()?;
        outln!(
            "ONNX Runtime profile, warm-up included ({} files in {}; chrome://tracing reads them):",
            files.len(),
            dir.display()
        );
        for g in bench::op_profile(&files)? {
            let top: Vec<String> = (g.ops.iter().take(6))
                .map(|(op, us)| format!("{op} {:.1} %", 100.0 * *us as f64 / g.total_us as f64))
                .collect();
            outln!(
                "  {}: {:.1} ms in {} operator runs — {}",
                g.graph,
                g.total_us as f64 / 1e3,
                g.runs,
                top.join(", ")
            );
        }
    }
    write_json(&a.json, &r)
}

#[derive(clap::Args)]
pub struct BenchTrainArgs {
    /// Package folder (from models/export.py: it has the log-prob and training graphs).
    #[arg(long, value_name = "DIR", default_value = "models/tiny")]
    pub(crate) model: PathBuf,
    /// Sequences per call (one micro-batch).
    #[arg(long, default_value_t = 1, value_parser = at_least_one)]
    pub(crate) rows: usize,
    /// Prompt tokens per sequence.
    #[arg(long, default_value_t = 256, value_parser = at_least_one)]
    pub(crate) prompt_len: usize,
    /// Response tokens per sequence.
    #[arg(long, default_value_t = 512, value_parser = at_least_one)]
    pub(crate) response_len: usize,
    /// Timed rounds (one log-prob call and one training call each).
    #[arg(long, default_value_t = 3, value_parser = at_least_one)]
    pub(crate) rounds: usize,
    /// Untimed rounds first.
    #[arg(long, default_value_t = 1)]
    pub(crate) warmup: usize,
    /// Where the graphs run: cpu, cuda or tensorrt (as train.toml's rollout.device).
    #[arg(long, default_value = "cpu")]
    pub(crate) device: String,
    #[arg(long, default_value_t = 0)]
    pub(crate) device_id: i32,
    /// Also write the results here.
    #[arg(long, default_value = "bench-train.json")]
    pub(crate) json: PathBuf,
    /// Each session loads its own copy of the weights (packed, on the CPU), as with
    /// `rollout.shared_weights = false`, instead of all reading one copy.
    #[arg(long)]
    pub(crate) own_weights: bool,
    /// libonnxruntime.so to load (default: $ORT_DYLIB_PATH, then vendor/ort).
    #[arg(long, value_name = "FILE")]
    pub(crate) ort_lib: Option<PathBuf>,
}

pub fn run_bench_train(a: BenchTrainArgs) -> Result<()> {
    use spatial_ssrl::train::bench::{self, Shape};
    let mut cfg = TrainConfig {
        model: a.model.clone(),
        ..Default::default()
    };
    cfg.rollout.device = a.device.clone();
    cfg.rollout.device_id = a.device_id;
    cfg.rollout.shared_weights = !a.own_weights;
    if spatial_ssrl::model::session::Device::from_name(&a.device, a.device_id).is_none() {
        bail!("--device {}: one of cpu, cuda, tensorrt", a.device);
    }
    let t0 = std::time::Instant::now();
    let mut t = Trainer::open(cfg, a.ort_lib.as_deref())?;
    let open_s = t0.elapsed().as_secs_f64();
    let rss_open = spatial_ssrl::rollout::bench::rss_mb().0;
    let shape = Shape {
        rows: a.rows,
        prompt_len: a.prompt_len,
        response_len: a.response_len,
    };
    let weights = match t.shared_weights() {
        Some((n, bytes)) => format!(
            "; {n} weight tensors ({:.0} MB), one copy shared by every session",
            bytes as f64 / 1e6
        ),
        None => "; each session with its own weights".into(),
    };
    eprintln!(
        "{} × ({} prompt + {} response) tokens per call, {} timed rounds after {} warm-up, on {}; sessions opened in {open_s:.1} s, RSS {rss_open:.0} MB{weights}",
        a.rows,
        a.prompt_len,
        a.response_len,
        a.rounds,
        a.warmup,
        t.provider()
    );
    let r = bench::run(
        &mut t,
        (open_s, rss_open),
        shape,
        a.warmup,
        a.rounds,
        |i, lp, tr| eprintln!("  round {}: log-probs {lp:.2} s, training {tr:.2} s", i + 1),
    )?;
    let peak = |p: Option<f64>| p.map_or("-".into(), |p| format!("{p:.0} MB"));
    outln!(
        "log-probs: {:.1} positions/s, peak RSS {}; training step: {:.1} positions/s, peak RSS {} ({} positions per call)",
        r.logprobs_positions_per_s,
        peak(r.logprobs_peak_mb),
        r.train_positions_per_s,
        peak(r.train_peak_mb),
        r.positions
    );
    write_json(&a.json, &r)
}

#[derive(clap::Args)]
pub struct BenchAllreduceArgs {
    /// MiB of f32 gradients summed per round. 457 is Qwen2.5-VL-3B's LoRA at rank 64 on every
    /// linear layer of the language model (119.7 M values), 616 is 7B's (161.5 M).
    #[arg(long, default_value_t = 457, value_parser = at_least_one)]
    pub(crate) mib: usize,
    /// Timed rounds (after one untimed).
    #[arg(long, default_value_t = 5, value_parser = at_least_one)]
    pub(crate) rounds: usize,
    /// Also sum through the GPUs with NCCL (each rank on GPU --device-id + its local rank).
    #[arg(long)]
    pub(crate) gpu: bool,
    #[arg(long, default_value_t = 0)]
    pub(crate) device_id: i32,
}

/// A sum over the ranks, in place (one of the ways `ssrl bench allreduce` times).
type SumFn<'a> = dyn FnMut(&mut [f32]) -> Result<()> + 'a;
/// Times a named [`SumFn`] and reports it on rank 0.
type ReportFn<'a> = dyn FnMut(&str, &mut SumFn<'_>) -> Result<()> + 'a;

/// The gradient sum of a data-parallel step, alone: run it under `mpirun -np N`.
pub fn run_bench_allreduce(a: BenchAllreduceArgs) -> Result<()> {
    let world = spatial_ssrl::dist::init()?;
    if world.size == 1 {
        bail!(
            "one process has nothing to sum with: run it under a launcher, \
             `mpirun -np 2 ssrl bench allreduce` (built with --features mpi)"
        );
    }
    let n = a.mib * (1 << 20) / 4;
    let mut v: Vec<f32> = (0..n).map(|i| (i % 7) as f32).collect();
    let mut report = |name: &str, sum: &mut SumFn<'_>| -> Result<()> {
        sum(&mut v)?;
        let mut secs = Vec::with_capacity(a.rounds);
        for _ in 0..a.rounds {
            world.barrier();
            let t = std::time::Instant::now();
            sum(&mut v)?;
            secs.push(t.elapsed().as_secs_f64());
        }
        let mut worst = secs.clone();
        world.max_f64(&mut worst);
        worst.sort_by(f64::total_cmp);
        let median = worst[worst.len() / 2];
        let bytes = (n * 4) as f64;
        let bus = bytes * 2.0 * (world.size - 1) as f64 / world.size as f64;
        if world.is_root() {
            outln!(
                "{name}: {} ranks, {:.1} MB of f32: {:.1} ms (median of {}, slowest rank), \
                 algorithm bandwidth {:.2} GB/s, bus bandwidth {:.2} GB/s",
                world.size,
                bytes / 1e6,
                median * 1e3,
                a.rounds,
                bytes / median / 1e9,
                bus / median / 1e9
            );
        }
        Ok(())
    };
    report("MPI (host)", &mut |v| {
        world.sum_f32(v);
        Ok(())
    })?;
    if a.gpu {
        gpu_allreduce(world, a.device_id, &mut report)?;
    }
    Ok(())
}

#[cfg(feature = "mpi")]
fn gpu_allreduce(
    world: &spatial_ssrl::dist::World,
    device_id: i32,
    report: &mut ReportFn<'_>,
) -> Result<()> {
    let ordinal = spatial_ssrl::dist::device_of(device_id).max(0) as usize;
    let cuda = spatial_ssrl::kernels::cuda::Cuda::new(ordinal)?;
    let sum = spatial_ssrl::dist::GpuSum::open(world, cuda.stream().clone())
        .map_err(anyhow::Error::msg)?;
    report("NCCL (host → GPU → host)", &mut |v| {
        sum.sum_f32(v).map_err(anyhow::Error::msg)
    })
}

#[cfg(not(feature = "mpi"))]
fn gpu_allreduce(_: &spatial_ssrl::dist::World, _: i32, _: &mut ReportFn<'_>) -> Result<()> {
    unreachable!("several ranks need the mpi build")
}
