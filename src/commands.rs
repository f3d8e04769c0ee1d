//! `ssrl train`, `ssrl plot`, `ssrl export` and `ssrl bench rollout`.

use anyhow::{bail, Context, Result};
use indicatif::{ProgressBar, ProgressStyle};
use spatial_ssrl::eval;
use spatial_ssrl::train::{self, config::TrainConfig, plot, RunEnd, Trainer};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};

/// `ssrl train` and `ssrl sft`: a run's settings file and how to start it.
#[derive(clap::Args)]
pub struct RunArgs {
    /// Run settings (TOML); see --print-config for every key and its default.
    #[arg(long, value_name = "FILE", required_unless_present = "print_config")]
    config: Option<PathBuf>,
    /// Continue from the newest checkpoint in the run folder, exactly where it stopped.
    #[arg(long)]
    resume: bool,
    /// Print the effective configuration (the defaults without --config) as TOML and exit.
    #[arg(long)]
    print_config: bool,
    /// Override the run's optimizer steps (train.toml's trainer.max_steps, sft.toml's max_steps).
    #[arg(long)]
    max_steps: Option<usize>,
    /// libonnxruntime.so to load (default: $ORT_DYLIB_PATH, then vendor/ort).
    #[arg(long, value_name = "FILE")]
    ort_lib: Option<PathBuf>,
}

#[derive(clap::Args)]
pub struct PlotArgs {
    /// Run folder (holds metrics.jsonl).
    #[arg(value_name = "RUN")]
    run: PathBuf,
    /// Output PNG (default: RUN/curves.png).
    #[arg(long, value_name = "FILE")]
    out: Option<PathBuf>,
    /// Metrics to draw, comma-separated (default: those of the run among SFT loss, token
    /// accuracy, lr and grad norm, GRPO rewards, KL, entropy, grad norm, lengths).
    #[arg(long, value_delimiter = ',')]
    keys: Vec<String>,
}

static STOP: AtomicBool = AtomicBool::new(false);

/// Installs the Ctrl-C handler of a long command: the first Ctrl-C sets the returned flag (the
/// command finishes its unit of work, saves and exits; `first` says so), a second exits at once
/// (`second` says what is lost).
pub fn stop_on_ctrl_c(first: &'static str, second: &'static str) -> Result<&'static AtomicBool> {
    ctrlc::set_handler(move || {
        if STOP.swap(true, Ordering::SeqCst) {
            eprintln!("\nsecond Ctrl-C: {second}");
            let _ = std::io::Write::flush(&mut std::io::stdout());
            // `_exit`, not `exit`: the C++ runtime's exit handlers would tear ONNX Runtime
            // down under the threads still running a graph (which then print errors). What
            // is kept is on disk already; nothing else needs a clean-up.
            // SAFETY: ends the process; no Rust state is observed afterwards.
            unsafe { libc::_exit(130) };
        }
        eprintln!("\nCtrl-C: {first} (Ctrl-C again to abort)");
    })
    .context("cannot install the Ctrl-C handler")?;
    Ok(&STOP)
}

/// A line above the progress bar, or plain stderr when the bar is hidden (not a terminal).
pub fn say(pb: &ProgressBar, line: String) {
    if pb.is_hidden() {
        eprintln!("{line}");
    } else {
        pb.println(line);
    }
}

/// Draws `rows` (the run's metrics) to `out`; false when none of `keys` has a value.
fn write_plot(run: &Path, rows: &[train::Metrics], out: &Path, keys: &[String]) -> Result<bool> {
    let keys: Vec<&str> = if keys.is_empty() {
        plot::DEFAULT_KEYS.to_vec()
    } else {
        keys.iter().map(String::as_str).collect()
    };
    let title = format!(
        "{} — {} steps",
        run.display(),
        rows.iter()
            .filter_map(|m| m.get("step"))
            .fold(0.0f64, |a, b| a.max(*b))
    );
    let Some(img) = plot::plot(rows, &keys, &title) else {
        return Ok(false);
    };
    img.save(out)
        .with_context(|| format!("{}: cannot write", out.display()))?;
    Ok(true)
}

pub fn run_plot(a: PlotArgs) -> Result<()> {
    let out = a.out.unwrap_or_else(|| a.run.join("curves.png"));
    // Metrics asked for by name must be in the run: a typo is named, with what there is.
    let rows = train::read_metrics(&a.run.join("metrics.jsonl"))?;
    let have: std::collections::BTreeSet<&str> = rows
        .iter()
        .flat_map(|m| m.keys().map(String::as_str))
        .filter(|k| *k != "step")
        .collect();
    let missing: Vec<&str> = (a.keys.iter().map(String::as_str))
        .filter(|k| !have.contains(k))
        .collect();
    let listed = || have.iter().copied().collect::<Vec<_>>().join(", ");
    if !missing.is_empty() && missing.len() == a.keys.len() {
        bail!(
            "{}: no metric {} in metrics.jsonl; it has {}",
            a.run.display(),
            missing.join(", "),
            listed()
        );
    }
    if !missing.is_empty() {
        eprintln!(
            "warning: not in {}/metrics.jsonl, left out: {} (it has {})",
            a.run.display(),
            missing.join(", "),
            listed()
        );
    }
    if !write_plot(&a.run, &rows, &out, &a.keys)? {
        bail!("{}: no metric to draw in metrics.jsonl", a.run.display());
    }
    outln!("wrote {}", out.display());
    Ok(())
}

const COLUMNS: [(&str, &str); 8] = [
    ("reward/overall", "reward"),
    ("reward/accuracy", "acc"),
    ("reward/format", "format"),
    ("actor/kl_loss", "kl"),
    ("actor/entropy", "entropy"),
    ("actor/grad_norm", "grad"),
    ("response_length/mean", "len"),
    ("timing_s/step", "s/step"),
];

fn row(m: &train::Metrics, step: usize) -> String {
    let mut s = format!("{step:>6}");
    for (k, _) in COLUMNS {
        match m.get(k) {
            Some(v) if v.abs() >= 1e-3 || *v == 0.0 => s += &format!(" {v:>9.4}"),
            Some(v) => s += &format!(" {v:>9.2e}"),
            None => s += &format!(" {:>9}", "-"),
        }
    }
    if let Some(v) = m.get("val/reward") {
        s += &format!("   val reward {v:.4}");
    }
    s
}

/// Whether a run in `out` resumes: a run folder with a checkpoint resumes with `--resume` and
/// is refused without it; one stopped before its first checkpoint saved nothing to continue
/// from and starts over (its metrics are rewritten), with or without `--resume`.
fn resume_or_start(out: &Path, resume: bool) -> Result<bool> {
    let log = out.join("metrics.jsonl");
    let saved = !train::checkpoint::list(&out.join("checkpoints")).is_empty();
    if log.exists() && !saved {
        eprintln!(
            "{}: the run there stopped before its first checkpoint, so nothing was saved: \
             starting it over",
            out.display()
        );
        return Ok(false);
    }
    if !resume && log.exists() {
        bail!(
            "{}: a run is already there; pass --resume to continue it, or set `out` to a new folder",
            out.display()
        );
    }
    Ok(resume)
}

/// A training run's Ctrl-C flag (finish the step, save, exit) and its step bar, at `step` of
/// `total`.
fn run_bar(total: usize, step: usize) -> Result<(&'static AtomicBool, ProgressBar)> {
    let stop = stop_on_ctrl_c(
        "finishing this step, then saving a checkpoint",
        "exiting without a checkpoint",
    )?;
    let pb = ProgressBar::new(total as u64);
    pb.set_style(
        ProgressStyle::with_template("{bar:30} step {pos}/{len} · {msg} · ETA {eta}")
            .expect("valid template"),
    );
    pb.set_position(step as u64);
    Ok((stop, pb))
}

/// Draws the run folder's metrics.jsonl to its curves.png, and says where.
fn draw_curves(out: &Path) -> Result<()> {
    let plot_path = out.join("curves.png");
    let rows = train::read_metrics(&out.join("metrics.jsonl"))?;
    if write_plot(out, &rows, &plot_path, &[])? {
        eprintln!("curves: {}", plot_path.display());
    }
    Ok(())
}

/// Ends a run that Ctrl-C stopped (exit status 130), saying how to continue it.
fn interrupted(command: &str, a: &RunArgs, checkpoint: &Path) -> ! {
    let default = format!("{command}.toml");
    eprintln!(
        "interrupted: checkpoint {} — continue with `ssrl {command} --config {} --resume`",
        checkpoint.display(),
        a.config.as_deref().unwrap_or(Path::new(&default)).display()
    );
    std::process::exit(130);
}

/// The checkpoint a `--resume` continues from, or why there is none.
fn newest_checkpoint(latest: Option<PathBuf>, out: &Path) -> Result<PathBuf> {
    latest.with_context(|| {
        format!(
            "{}: no checkpoint to resume from (none was saved yet)",
            out.join("checkpoints").display()
        )
    })
}

pub fn run_train(a: RunArgs) -> Result<()> {
    let mut cfg = match &a.config {
        Some(p) => TrainConfig::load(p)?,
        None => TrainConfig::default(),
    };
    if let Some(n) = a.max_steps {
        cfg.trainer.max_steps = n;
    }
    if a.print_config {
        out!("{}", cfg.to_toml());
        return Ok(());
    }
    let resume = resume_or_start(&cfg.out, a.resume)?;
    let mut t = Trainer::new(cfg.clone(), a.ort_lib.as_deref())?;
    if let Some(note) = t.precision_note() {
        eprintln!("{note}");
    }
    if t.overlong != (0, 0) {
        eprintln!(
            "left out as too long (data.max_prompt_length {}, or no room for \
             data.max_response_length {} in the model's context): {} training and {} validation \
             prompts",
            cfg.data.max_prompt_length, cfg.data.max_response_length, t.overlong.0, t.overlong.1
        );
    }
    if !t.unusable.is_empty() {
        let n = t.unusable.len();
        let shown: Vec<&str> = t.unusable.iter().take(3).map(String::as_str).collect();
        eprintln!(
            "left out as unusable: {n} prompt{} ({}{})",
            if n == 1 { "" } else { "s" },
            shown.join("; "),
            if n > 3 { "; …" } else { "" }
        );
    }
    if resume {
        let dir = newest_checkpoint(t.latest_checkpoint(), &cfg.out)?;
        t.restore(&dir)?;
        eprintln!("resumed from {} (step {})", dir.display(), t.step());
    }
    let total = t.total_steps();
    eprintln!(
        "GRPO: {} prompts × {} samples per step, {} steps; ONNX Runtime on {}, kernels on {}",
        cfg.data.rollout_batch_size,
        cfg.rollout.n,
        total,
        t.provider(),
        t.backend()
    );
    let (stop, pb) = run_bar(total, t.step())?;
    let mut header = format!("{:>6}", "step");
    for (_, h) in COLUMNS {
        header += &format!(" {h:>9}");
    }
    say(&pb, header);
    let end = t.run(stop, |m, step, left_out| {
        for e in left_out {
            say(
                &pb,
                format!("step {step}: prompt left out, its image cannot be read: {e}"),
            );
        }
        if step == 0 {
            if let Some(v) = m.get("val/reward") {
                say(
                    &pb,
                    format!("{:>6}   val reward {v:.4} (before training)", 0),
                );
            }
            return;
        }
        say(&pb, row(m, step));
        pb.set_position(step as u64);
        pb.set_message(format!(
            "reward {:.3}",
            m.get("reward/overall").copied().unwrap_or(0.0)
        ));
    })?;
    pb.finish_and_clear();
    draw_curves(&cfg.out)?;
    match end {
        RunEnd::Finished { checkpoint } => {
            if let Some(c) = checkpoint {
                eprintln!("done: adapter in {}", c.display());
            }
        }
        RunEnd::Interrupted { checkpoint } => interrupted("train", &a, &checkpoint),
    }
    Ok(())
}

pub fn run_sft(a: RunArgs) -> Result<()> {
    use spatial_ssrl::train::sft::{Sft, SftConfig};
    let mut cfg = match &a.config {
        Some(p) => SftConfig::load(p)?,
        None => SftConfig::default(),
    };
    if let Some(n) = a.max_steps {
        cfg.max_steps = n;
    }
    if a.print_config {
        out!("{}", cfg.to_toml());
        return Ok(());
    }
    let resume = resume_or_start(&cfg.out, a.resume)?;
    let mut t = Sft::new(cfg.clone(), a.ort_lib.as_deref())?;
    if let Some(note) = t.precision_note() {
        eprintln!("{note}");
    }
    if resume {
        let dir = newest_checkpoint(t.latest_checkpoint(), &cfg.out)?;
        t.restore(&dir)?;
        eprintln!("resumed from {} (step {})", dir.display(), t.step());
    }
    let total = t.total_steps();
    eprintln!(
        "SFT: {} examples, {} × {} per step, {} steps ({} per epoch), lr {} {}",
        t.examples(),
        cfg.per_device_train_batch_size,
        cfg.gradient_accumulation_steps,
        total,
        t.steps_per_epoch(),
        cfg.learning_rate,
        cfg.lr_scheduler_type
    );
    let (stop, pb) = run_bar(total, t.step())?;
    say(
        &pb,
        format!(
            "{:>6} {:>9} {:>9} {:>9} {:>9} {:>9}",
            "step", "loss", "tok acc", "lr", "grad", "tok/s"
        ),
    );
    let end = t.run(stop, |m, step, left_out| {
        for e in left_out {
            say(&pb, format!("step {step}: example left out: {e}"));
        }
        let g = |k: &str| m.get(k).copied().unwrap_or(f64::NAN);
        say(
            &pb,
            format!(
                "{step:>6} {:>9.4} {:>9.4} {:>9.2e} {:>9.3} {:>9.1}",
                g("sft/loss"),
                g("sft/token_accuracy"),
                g("sft/lr"),
                g("sft/grad_norm"),
                g("sft/tokens_per_s")
            ),
        );
        pb.set_position(step as u64);
        pb.set_message(format!("loss {:.3}", g("sft/loss")));
    })?;
    pb.finish_and_clear();
    draw_curves(&cfg.out)?;
    match end {
        RunEnd::Finished { checkpoint } => {
            if let Some(c) = checkpoint {
                eprintln!(
                    "done: adapter in {} — merge it with `ssrl export --model {} --adapter {} --out DIR` \
                     and start GRPO from that package",
                    c.display(),
                    cfg.model.display(),
                    c.display()
                );
            }
        }
        RunEnd::Interrupted { checkpoint } => interrupted("sft", &a, &checkpoint),
    }
    Ok(())
}

#[derive(clap::Args)]
pub struct ExportArgs {
    /// Package folder to start from.
    #[arg(long, value_name = "DIR")]
    model: PathBuf,
    /// LoRA to merge into the weights: a checkpoint folder (checkpoints/global_step_N) or a
    /// PEFT adapter folder (adapter_model.safetensors).
    #[arg(long, value_name = "DIR")]
    adapter: Option<PathBuf>,
    /// Output package folder. Over an existing package (the source itself too) only the
    /// files the export writes are replaced, once all are written; other files and folders
    /// there (notes, runs, hf/, goldens/) stay. Any other existing folder is refused.
    #[arg(long, value_name = "DIR")]
    out: PathBuf,
    /// Store weights as fp16 (half the size; arithmetic stays fp32).
    #[arg(long)]
    fp16: bool,
    /// Apply ONNX Runtime's extended graph optimisations offline to the inference graphs
    /// (do it on the kind of machine you deploy to).
    #[arg(long)]
    optimize: bool,
    /// libonnxruntime.so to load (default: $ORT_DYLIB_PATH, then vendor/ort).
    #[arg(long, value_name = "FILE")]
    ort_lib: Option<PathBuf>,
}

/// An adapter's tensors as `(package input name, values)`, from a checkpoint or PEFT folder,
/// checked against `model`'s LoRA inputs and at the scale its `adapter_config.json` gives.
fn adapter_tensors(dir: &Path, model: &Path) -> Result<Vec<(String, Vec<f32>)>> {
    let spec = spatial_ssrl::model::package::Package::open(model)?
        .manifest
        .lora;
    Ok(train::checkpoint::load_adapter_for(dir, &spec)?
        .into_iter()
        .map(|t| (t.name, t.data))
        .collect())
}

pub fn run_export(a: ExportArgs) -> Result<()> {
    use spatial_ssrl::model::export::{export_with, ExportOptions};
    let adapter = (a.adapter.as_deref())
        .map(|d| adapter_tensors(d, &a.model))
        .transpose()?;
    // A large model's graphs take minutes each: a bar over the stages, each stage's time.
    let pb = ProgressBar::new(0);
    pb.set_style(
        ProgressStyle::with_template("{bar:30} {pos}/{len} · {msg} · {elapsed}")
            .expect("valid template"),
    );
    let t = std::time::Instant::now();
    let mut last = 0.0;
    let r = export_with(
        &a.model,
        &a.out,
        &ExportOptions {
            adapter,
            fp16: a.fp16,
            optimize: a.optimize,
        },
        a.ort_lib.as_deref(),
        |s| {
            let now = t.elapsed().as_secs_f64();
            pb.set_length(s.total as u64);
            pb.set_position(s.done as u64);
            pb.set_message(format!("{} {}", s.graph, s.what));
            if now - last >= 1.0 {
                say(
                    &pb,
                    format!("  {}: {} ({:.1} s)", s.graph, s.what, now - last),
                );
            }
            last = now;
        },
    );
    pb.finish_and_clear();
    let r = r?;
    for (file, targets) in &r.merged {
        if !targets.is_empty() {
            outln!("{file}: merged {}", targets.join(", "));
        }
    }
    if r.fp16_weights > 0 {
        let kept = if a.fp16 {
            ""
        } else {
            " again (the package was stored in fp16; the optimiser had widened them)"
        };
        outln!("{} weight tensors stored as fp16{kept}", r.fp16_weights);
    }
    if !r.optimized.is_empty() {
        outln!("optimised offline: {}", r.optimized.join(", "));
    }
    outln!(
        "wrote {} (graphs {:.1} MB → {:.1} MB)",
        a.out.display(),
        r.bytes_in as f64 / 1e6,
        r.bytes_out as f64 / 1e6
    );
    Ok(())
}

#[derive(clap::Args)]
pub struct BenchRolloutArgs {
    /// Package folder, or an onnxruntime-genai Qwen2.5-VL folder (genai_config.json).
    #[arg(long, value_name = "DIR", default_value = "models/tiny")]
    model: PathBuf,
    /// Prompts from a task dataset (a .parquet / .jsonl file, or an `ssrl tasks` folder: its
    /// shards in order; images found as `ssrl rollout --images-root` says); default:
    /// synthetic 448×336 photos with a depth-style question.
    #[arg(long, value_name = "PATH")]
    data: Option<PathBuf>,
    /// Prompts per batch (B).
    #[arg(long, default_value_t = 8, value_parser = at_least_one)]
    batch: usize,
    /// Samples per prompt (G).
    #[arg(long, default_value_t = 5, value_parser = at_least_one)]
    group: usize,
    #[arg(long, default_value_t = 64, value_parser = at_least_one)]
    max_new_tokens: usize,
    /// Timed rounds after the warm-up (16 rounds of 64 tokens ≈ 1,000 decode steps, for the
    /// memory-growth check).
    #[arg(long, default_value_t = 3, value_parser = at_least_one)]
    rounds: usize,
    /// Untimed rounds first. ONNX Runtime's memory settles in one round for prompts alike; task
    /// data with prompts of several images can take three.
    #[arg(long, default_value_t = 1)]
    warmup: usize,
    /// 0 is greedy.
    #[arg(long, default_value_t = 1.0, value_parser = temperature, allow_negative_numbers = true)]
    temperature: f32,
    /// Sample from the most likely tokens whose mass reaches P (1 = all), as a rollout would.
    #[arg(long, default_value_t = 1.0, value_parser = top_p, allow_negative_numbers = true)]
    top_p: f32,
    /// Sample from the K most likely tokens (0 = all).
    #[arg(long, default_value_t = 0)]
    top_k: usize,
    #[command(flatten)]
    device: DeviceArgs,
    /// Also write the results here.
    #[arg(long, default_value = "bench-rollout.json")]
    json: PathBuf,
    /// Write ONNX Runtime's per-operator profile of every session into DIR and print the time
    /// per operator type of each graph (profiling slows the run: its tokens/s are not the
    /// engine's).
    #[arg(long, value_name = "DIR")]
    profile: Option<PathBuf>,
    /// libonnxruntime.so to load (default: $ORT_DYLIB_PATH, then vendor/ort).
    #[arg(long, value_name = "FILE")]
    ort_lib: Option<PathBuf>,
}

/// clap parser for counts that must be at least one (samples, prompts per call, tokens, rounds).
pub fn at_least_one(s: &str) -> Result<usize, String> {
    match s.parse::<usize>().map_err(|e| format!("{s:?}: {e}"))? {
        0 => Err("must be at least 1".into()),
        n => Ok(n),
    }
}

/// The error of a failed write to standard output (`> /dev/full`), for `outln!`.
pub fn stdout_error(e: std::io::Error) -> anyhow::Error {
    anyhow::anyhow!("cannot write to standard output: {e}")
}

/// clap parser for a worker thread count: 0 (every core) to 1,024.
pub fn thread_count(s: &str) -> Result<usize, String> {
    match s.parse::<usize>().map_err(|e| format!("{s:?}: {e}"))? {
        n if n > 1024 => Err(format!("{n} threads: at most 1024 (0 uses every core)")),
        n => Ok(n),
    }
}

/// clap parser for a sampling temperature ([`spatial_ssrl::kernels::check_temperature`]).
pub fn temperature(s: &str) -> Result<f32, String> {
    let t = s.parse::<f32>().map_err(|e| format!("{s:?}: {e}"))?;
    spatial_ssrl::kernels::check_temperature(t)
}

/// clap parser for a nucleus mass ([`spatial_ssrl::kernels::check_top_p`]).
pub fn top_p(s: &str) -> Result<f32, String> {
    let p = s.parse::<f32>().map_err(|e| format!("{s:?}: {e}"))?;
    spatial_ssrl::kernels::check_top_p(p)
}

/// Where the graphs run: the execution provider and its options (rollout, bench rollout, eval).
#[derive(clap::Args)]
pub struct DeviceArgs {
    /// Execution provider. cuda and tensorrt need onnxruntime-gpu's library (see the README).
    #[arg(long, value_enum, default_value_t = DeviceArg::Cpu)]
    device: DeviceArg,
    /// CUDA device ordinal.
    #[arg(long, default_value_t = 0)]
    device_id: i32,
    /// Run on the CPU when the chosen provider is unavailable, instead of failing.
    #[arg(long)]
    allow_fallback: bool,
    /// On cuda / tensorrt: keep the decoder's cache and logits on the host between steps
    /// (slower; to measure what keeping them on the GPU saves).
    #[arg(long)]
    host_cache: bool,
    /// Feed all of each row's generated tokens back to the decoder as past, so every
    /// step's present copies them, instead of keeping them where the decoder reads them (this
    /// project's packages: all but the newest 64 in a buffer; onnxruntime-genai builder
    /// decoders: one past/present buffer). Slower on long generations; to measure the gain.
    #[arg(long)]
    append_cache: bool,
    /// CPU: generate N slices of the prompts concurrently, each on single-threaded sessions of
    /// its own (a copy of the weights each) — for small models on few cores, whose operators
    /// are too small to spread over threads. 1: one set of sessions on every core [default:
    /// one slice per core up to 8 when decoder.onnx is under 64 MB with its weights, else 1]
    #[arg(long, value_name = "N", value_parser = at_least_one)]
    cpu_slices: Option<usize>,
    /// TensorRT: build fp16 engines.
    #[arg(long)]
    trt_fp16: bool,
    /// TensorRT: engine and timing cache folder (reused across runs).
    #[arg(long, value_name = "DIR")]
    trt_cache: Option<PathBuf>,
    /// TensorRT: builder workspace (bytes, or with a unit: 4GiB, 512MB).
    #[arg(long, value_name = "SIZE", value_parser = spatial_ssrl::model::session::parse_size)]
    trt_workspace: Option<usize>,
    /// TensorRT: the longest prompt (tokens, images included) the engines are built for; with
    /// the batch, the new-token budget and the package's max_pixels it sets each graph's
    /// optimisation profile, so one engine serves every shape of the run [default: one image at
    /// max_pixels plus 1,024 text tokens]
    #[arg(long, value_name = "TOKENS")]
    trt_max_prompt: Option<usize>,
    /// CUDA: cap on what ONNX Runtime's GPU memory arena may hold (bytes, or with a unit:
    /// 40GiB, 512MB).
    #[arg(long, value_name = "SIZE", value_parser = spatial_ssrl::model::session::parse_size)]
    cuda_mem_limit: Option<usize>,
    /// CUDA: grow the arena by what is asked instead of doubling (tighter on a shared GPU).
    #[arg(long)]
    cuda_arena_exact: bool,
    /// Every session (and CPU slice) reads one copy of the weights, as `ssrl train` runs: on
    /// the CPU one memory mapping with no pre-packed copies (less memory, slower small-batch
    /// decoding), under cuda one device copy.
    #[arg(long)]
    shared_weights: bool,
}

#[derive(Clone, Copy, PartialEq, clap::ValueEnum)]
enum DeviceArg {
    Cpu,
    Cuda,
    Tensorrt,
}

impl DeviceArgs {
    /// Opens `model` on the chosen provider for runs of up to `rows` sequences and
    /// `max_new_tokens` new tokens (TensorRT's profiles); prints the provider when not the CPU.
    pub fn open(
        &self,
        model: &Path,
        ort_lib: Option<&Path>,
        rows: usize,
        max_new_tokens: usize,
        profile: Option<&Path>,
    ) -> Result<spatial_ssrl::rollout::Engine> {
        use spatial_ssrl::model::session::{CudaArena, Device, DeviceChoice, TrtLimits};
        let device = match self.device {
            DeviceArg::Cpu => Device::Cpu,
            DeviceArg::Cuda => Device::Cuda {
                device_id: self.device_id,
            },
            DeviceArg::Tensorrt => Device::TensorRt {
                device_id: self.device_id,
                fp16: self.trt_fp16,
                cache_dir: self.trt_cache.clone(),
                workspace_bytes: self.trt_workspace,
                limits: Some(TrtLimits::rollout(
                    rows,
                    self.trt_max_prompt,
                    max_new_tokens,
                    None,
                )),
            },
        };
        let choice = DeviceChoice {
            device,
            allow_fallback: self.allow_fallback,
            arena: CudaArena {
                mem_limit: self.cuda_mem_limit,
                grow_as_requested: self.cuda_arena_exact,
            },
            profile: profile.map(Path::to_path_buf),
            shared_weights: self.shared_weights,
        };
        let mut engine = spatial_ssrl::rollout::Engine::open_on(model, ort_lib, &choice)?;
        engine.set_host_cache(self.host_cache);
        engine.set_own_cache(!self.append_cache);
        engine.set_cpu_slices(self.cpu_slices)?;
        if let Some(note) = engine.precision_note() {
            eprintln!("{note}");
        }
        if engine.provider() != "cpu" || self.device != DeviceArg::Cpu {
            eprintln!(
                "execution provider: {}{}",
                engine.provider(),
                if engine.cache_on_gpu() {
                    " (cache, logits and sampling on the GPU)"
                } else {
                    ""
                }
            );
        }
        Ok(engine)
    }
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
        Some(path) => spatial_ssrl::tasks::write::read_dataset(path, None, a.batch)
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
        format_sentence: Some(spatial_ssrl::tasks::templates::FORMAT_SENTENCE.into()),
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
    model: PathBuf,
    /// Sequences per call (one micro-batch).
    #[arg(long, default_value_t = 1, value_parser = at_least_one)]
    rows: usize,
    /// Prompt tokens per sequence.
    #[arg(long, default_value_t = 256, value_parser = at_least_one)]
    prompt_len: usize,
    /// Response tokens per sequence.
    #[arg(long, default_value_t = 512, value_parser = at_least_one)]
    response_len: usize,
    /// Timed rounds (one log-prob call and one training call each).
    #[arg(long, default_value_t = 3, value_parser = at_least_one)]
    rounds: usize,
    /// Untimed rounds first.
    #[arg(long, default_value_t = 1)]
    warmup: usize,
    /// Where the graphs run: cpu, cuda or tensorrt (as train.toml's rollout.device).
    #[arg(long, default_value = "cpu")]
    device: String,
    #[arg(long, default_value_t = 0)]
    device_id: i32,
    /// Also write the results here.
    #[arg(long, default_value = "bench-train.json")]
    json: PathBuf,
    /// Each session loads its own copy of the weights (packed, on the CPU), as with
    /// `rollout.shared_weights = false`, instead of all reading one copy.
    #[arg(long)]
    own_weights: bool,
    /// libonnxruntime.so to load (default: $ORT_DYLIB_PATH, then vendor/ort).
    #[arg(long, value_name = "FILE")]
    ort_lib: Option<PathBuf>,
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

/// A benchmark's results as JSON at `path`, its folder made first.
pub fn write_json(path: &Path, value: &impl serde::Serialize) -> Result<()> {
    let bytes = serde_json::to_vec_pretty(value)?;
    spatial_ssrl::tasks::write::write_atomic(path, &bytes, false)?;
    Ok(())
}

#[derive(clap::Args)]
pub struct EvalArgs {
    /// Package folder, or an onnxruntime-genai Qwen2.5-VL folder (genai_config.json; no
    /// adapter then).
    #[arg(long, value_name = "DIR", required_unless_present = "compare")]
    model: Option<PathBuf>,
    /// LoRA to apply: a checkpoint folder or a PEFT adapter folder.
    #[arg(long, value_name = "DIR")]
    adapter: Option<PathBuf>,
    /// What the data file holds; sets the prompts, image sizes, token budget and scoring of
    /// that benchmark's official evaluation.
    #[arg(long, value_enum, default_value = "pretext")]
    bench: eval::Bench,
    /// The items: `ssrl tasks` output (.parquet / .jsonl, or its folder: every shard),
    /// ViewSpatial-Bench / What'sUp / VSI-Bench JSON, or a VLMEvalKit multiple-choice TSV.
    #[arg(long, value_name = "FILE", required_unless_present = "compare")]
    data: Option<PathBuf>,
    /// Image paths and VSI-Bench video folders resolve against this (default: the folder above
    /// the data file's folder; for a task dataset, its own folder or one of the two above it,
    /// whichever holds its first image).
    #[arg(long, value_name = "DIR")]
    images: Option<PathBuf>,
    /// Run folder: items.jsonl, summary.json, run.json. An interrupted run continues where it
    /// stopped.
    #[arg(long, value_name = "DIR", required_unless_present = "compare")]
    out: Option<PathBuf>,
    /// Prompts per generation call.
    #[arg(long, default_value_t = 8, value_parser = at_least_one)]
    batch: usize,
    /// Default: the benchmark's official budget (4096 for ViewSpatial, What'sUp and VSI-Bench,
    /// 2048 otherwise).
    #[arg(long, value_parser = at_least_one)]
    max_new_tokens: Option<usize>,
    /// 0 = greedy (the default, as the paper evaluates).
    #[arg(long, default_value_t = 0.0, value_parser = temperature, allow_negative_numbers = true)]
    temperature: f32,
    /// Sample from the k most likely tokens only (0 = all).
    #[arg(long, default_value_t = 0)]
    top_k: usize,
    /// Sample from the most likely tokens whose mass reaches P (1 = all).
    #[arg(long, default_value_t = 1.0, value_parser = top_p, allow_negative_numbers = true)]
    top_p: f32,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Ask for the answer directly (each benchmark's non-reasoning prompt) instead of the
    /// reasoning prompt with the training format sentence.
    #[arg(long, alias = "direct")]
    no_format_prompt: bool,
    /// VSI-Bench: frames sampled uniformly from each video folder.
    #[arg(long, default_value_t = 128, value_parser = at_least_one)]
    frames: usize,
    /// TSV: accept these extra columns (comma-separated) instead of refusing the file.
    #[arg(long, value_delimiter = ',', value_name = "COL")]
    allow_columns: Vec<String>,
    /// Evaluate the first N items only.
    #[arg(long, value_parser = at_least_one)]
    limit: Option<usize>,
    /// Print two finished runs side by side with deltas instead of evaluating.
    #[arg(long, num_args = 2, value_names = ["RUN_A", "RUN_B"])]
    compare: Vec<PathBuf>,
    /// libonnxruntime.so to load (default: $ORT_DYLIB_PATH, then vendor/ort).
    #[arg(long, value_name = "FILE")]
    ort_lib: Option<PathBuf>,
    #[command(flatten)]
    device: DeviceArgs,
}

fn pct(v: Option<f64>) -> String {
    v.map_or("-".into(), |v| format!("{:.1}", 100.0 * v))
}

pub fn run_eval(a: EvalArgs) -> Result<()> {
    if let [ra, rb] = a.compare.as_slice() {
        let (sa, sb) = (eval::read_summary(ra)?, eval::read_summary(rb)?);
        let rows = eval::compare(&sa, &sb);
        // Runs that measured different things get no deltas: their accuracies are side by
        // side, and why they are not comparable is said first.
        let differ = eval::differences(&sa, &sb);
        if !differ.is_empty() {
            eprintln!(
                "warning: the runs are not comparable ({}): no deltas",
                differ.join("; ")
            );
        }
        let w = rows
            .iter()
            .map(|(k, ..)| k.chars().count())
            .max()
            .unwrap_or(8);
        outln!("{:<w$} {:>8} {:>8} {:>8}", "", "A %", "B %", "B − A");
        for (k, x, y) in rows {
            let d = match (x, y) {
                (Some(x), Some(y)) if differ.is_empty() => format!("{:+.1}", 100.0 * (y - x)),
                _ => "-".into(),
            };
            outln!("{k:<w$} {:>8} {:>8} {d:>8}", pct(x), pct(y));
        }
        outln!("A = {}\nB = {}", ra.display(), rb.display());
        if !differ.is_empty() {
            outln!("not comparable: {}", differ.join("; "));
        }
        return Ok(());
    }
    let (model, data, out) = (
        a.model.expect("clap requires it"),
        a.data.expect("clap requires it"),
        a.out.expect("clap requires it"),
    );
    let mut cfg = eval::EvalConfig::new(a.bench, data, out.clone(), model.display().to_string());
    cfg.images_root = a.images;
    cfg.batch = a.batch;
    cfg.max_new_tokens = a.max_new_tokens;
    cfg.sampling = spatial_ssrl::kernels::SamplingParams {
        temperature: a.temperature,
        top_k: a.top_k,
        top_p: a.top_p,
        seed: a.seed,
    };
    cfg.reasoning = !a.no_format_prompt;
    cfg.frames = a.frames;
    cfg.allow_columns = a.allow_columns;
    cfg.limit = a.limit;
    cfg.adapter = a.adapter.as_ref().map(|p| p.display().to_string());
    // The data and the adapter are checked before the model is loaded.
    let items = eval::load(&cfg)?;
    let lora = (a.adapter.as_deref())
        .map(|d| adapter_tensors(d, &model))
        .transpose()?;
    let mut engine = a.device.open(
        &model,
        a.ort_lib.as_deref(),
        cfg.batch,
        cfg.max_new_tokens.unwrap_or(4096),
        None,
    )?;
    if let Some(t) = &lora {
        engine.set_lora(t)?;
    }
    let pb = ProgressBar::new(0);
    pb.set_style(
        ProgressStyle::with_template("{bar:30} {pos}/{len} items · ETA {eta}")
            .expect("valid template"),
    );
    let s = eval::run_items(&mut engine, &cfg, &items, |done, total| {
        pb.set_length(total as u64);
        pb.set_position(done as u64);
    })?;
    pb.finish_and_clear();
    let rows: Vec<(&str, &eval::Score)> = std::iter::once(("overall", &s.overall))
        .chain(s.by_category.iter().map(|(k, v)| (k.as_str(), v)))
        .chain(s.by_variant.iter().map(|(k, v)| (k.as_str(), v)))
        .collect();
    let title = format!(
        "{} ({})",
        s.bench,
        if s.reasoning { "reasoning" } else { "direct" }
    );
    let w = rows
        .iter()
        .map(|(k, _)| k.chars().count())
        .chain([title.chars().count()])
        .max()
        .unwrap_or(8);
    let strict = s.overall.strict_accuracy.is_some();
    // The share of responses in the reasoning format, where the prompt asks for it.
    let format = s.reasoning && s.overall.format_rate.is_some();
    outln!(
        "{:<w$} {:>6} {:>8}{}{}",
        title,
        "items",
        "acc %",
        if strict { "  strict %" } else { "" },
        if format { "  format %" } else { "" }
    );
    for (k, v) in rows {
        let st = v
            .strict_accuracy
            .map_or(String::new(), |x| format!("  {:>8.1}", 100.0 * x));
        let fr = match (format, v.format_rate) {
            (true, Some(x)) => format!("  {:>8.1}", 100.0 * x),
            _ => String::new(),
        };
        outln!("{k:<w$} {:>6} {:>8.1}{st}{fr}", v.items, 100.0 * v.accuracy);
    }
    for (k, v) in &s.grouped {
        outln!(
            "{k:<w$} {:>6} {:>8.1}  (groups)",
            v.items,
            100.0 * v.accuracy
        );
    }
    outln!(
        "items: {}, summary: {}",
        out.join("items.jsonl").display(),
        out.join("summary.json").display()
    );
    Ok(())
}
