//! The command-line shell: one file per command, each a thin layer over a library call, and
//! what they share here (Ctrl-C, progress lines, argument parsers, the device options).

mod bench;
mod eval;
mod export;
mod inspect;
mod plot;
mod reward;
mod rollout;
mod sft;
mod tasks;
mod train;

pub(crate) use self::eval::*;
pub(crate) use self::plot::*;
pub(crate) use self::reward::*;
pub(crate) use self::sft::*;
pub(crate) use self::tasks::*;
pub(crate) use self::train::*;
pub(crate) use bench::*;
pub(crate) use export::*;
pub(crate) use inspect::*;
pub(crate) use rollout::*;

use anyhow::{bail, Context, Result};
use indicatif::{ProgressBar, ProgressStyle};
use spatial_ssrl::dist::World;
use spatial_ssrl::reward::RewardConfig;
use spatial_ssrl::tasks::{position::Geometry, shuffle::Variant, Format, TaskKind};
use spatial_ssrl::train::{
    config::{RunConfig, TrainConfig},
    RunEnd, Trainer,
};
use std::io::{BufRead, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};

pub(crate) static STOP: AtomicBool = AtomicBool::new(false);

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

/// SIGUSR1 sets the same flag as Ctrl-C: launchers forward it to every rank (`kill -USR1` on
/// `mpirun`, `scancel --signal=USR1`), where a Ctrl-C at `mpirun` ends the ranks at once.
pub fn stop_on_usr1() {
    extern "C" fn on_usr1(_: libc::c_int) {
        STOP.store(true, Ordering::SeqCst);
    }
    // SAFETY: the handler only stores to an atomic, which is async-signal-safe.
    unsafe {
        libc::signal(libc::SIGUSR1, on_usr1 as *const () as libc::sighandler_t);
    }
}

/// A line to stderr from rank 0 alone (every rank of a data-parallel run would say it).
pub fn note(line: impl std::fmt::Display) {
    if spatial_ssrl::dist::world().is_root() {
        eprintln!("{line}");
    }
}

/// A progress bar of `len` steps, drawn by rank 0 alone (hidden on the others).
pub fn rank_bar(len: u64) -> ProgressBar {
    match spatial_ssrl::dist::world().is_root() {
        true => ProgressBar::new(len),
        false => ProgressBar::hidden(),
    }
}

/// A line above the progress bar, or plain stderr when the bar is hidden (not a terminal).
/// `pb` drawn as `template` (indicatif's template syntax): the commands' bars look alike.
pub fn styled(pb: ProgressBar, template: &'static str) -> ProgressBar {
    pb.with_style(ProgressStyle::with_template(template).expect("valid template"))
}

/// Under a launcher only rank 0 speaks: the others' lines would repeat its own.
pub fn say(pb: &ProgressBar, line: String) {
    if !spatial_ssrl::dist::world().is_root() {
        return;
    }
    if pb.is_hidden() {
        eprintln!("{line}");
    } else {
        pb.println(line);
    }
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
    pub(crate) device: DeviceArg,
    /// CUDA device ordinal.
    #[arg(long, default_value_t = 0)]
    pub(crate) device_id: i32,
    /// Run on the CPU when the chosen provider is unavailable, instead of failing.
    #[arg(long)]
    pub(crate) allow_fallback: bool,
    /// On cuda / tensorrt: keep the decoder's cache and logits on the host between steps
    /// (slower; to measure what keeping them on the GPU saves).
    #[arg(long)]
    pub(crate) host_cache: bool,
    /// Feed all of each row's generated tokens back to the decoder as past, so every
    /// step's present copies them, instead of keeping them where the decoder reads them (this
    /// project's packages: all but the newest 64 in a buffer; onnxruntime-genai builder
    /// decoders: one past/present buffer). Slower on long generations; to measure the gain.
    #[arg(long)]
    pub(crate) append_cache: bool,
    /// CPU: generate N slices of the prompts concurrently, each on single-threaded sessions of
    /// its own (a copy of the weights each) — for small models on few cores, whose operators
    /// are too small to spread over threads. 1: one set of sessions on every core [default:
    /// one slice per core up to 8 when decoder.onnx is under 64 MB with its weights, else 1]
    #[arg(long, value_name = "N", value_parser = at_least_one)]
    pub(crate) cpu_slices: Option<usize>,
    /// TensorRT: build fp16 engines.
    #[arg(long)]
    pub(crate) trt_fp16: bool,
    /// TensorRT: engine and timing cache folder (reused across runs).
    #[arg(long, value_name = "DIR")]
    pub(crate) trt_cache: Option<PathBuf>,
    /// TensorRT: builder workspace (bytes, or with a unit: 4GiB, 512MB).
    #[arg(long, value_name = "SIZE", value_parser = spatial_ssrl::model::session::parse_size)]
    pub(crate) trt_workspace: Option<usize>,
    /// TensorRT: the longest prompt (tokens, images included) the engines are built for; with
    /// the batch, the new-token budget and the package's max_pixels it sets each graph's
    /// optimisation profile, so one engine serves every shape of the run [default: one image at
    /// max_pixels plus 1,024 text tokens]
    #[arg(long, value_name = "TOKENS")]
    pub(crate) trt_max_prompt: Option<usize>,
    /// CUDA: cap on what ONNX Runtime's GPU memory arena may hold (bytes, or with a unit:
    /// 40GiB, 512MB).
    #[arg(long, value_name = "SIZE", value_parser = spatial_ssrl::model::session::parse_size)]
    pub(crate) cuda_mem_limit: Option<usize>,
    /// CUDA: grow the arena by what is asked instead of doubling (tighter on a shared GPU).
    #[arg(long)]
    pub(crate) cuda_arena_exact: bool,
    /// Every session (and CPU slice) reads one copy of the weights, as `ssrl train` runs: on
    /// the CPU one memory mapping with no pre-packed copies (less memory, slower small-batch
    /// decoding), under cuda one device copy.
    #[arg(long)]
    pub(crate) shared_weights: bool,
}

#[derive(Clone, Copy, PartialEq, clap::ValueEnum)]
pub(crate) enum DeviceArg {
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
        // (under a launcher, each rank takes the GPU of its local rank past --device-id)
        let device_id = spatial_ssrl::dist::device_of(self.device_id);
        let device = match self.device {
            DeviceArg::Cpu => Device::Cpu,
            DeviceArg::Cuda => Device::Cuda { device_id },
            DeviceArg::Tensorrt => Device::TensorRt {
                device_id,
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
        for note in [engine.precision_note(), engine.weights_note()]
            .into_iter()
            .flatten()
        {
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

/// A benchmark's results as JSON at `path`, its folder made first.
pub fn write_json(path: &Path, value: &impl serde::Serialize) -> Result<()> {
    let bytes = serde_json::to_vec_pretty(value)?;
    spatial_ssrl::data::records::write_atomic(path, &bytes, false)?;
    Ok(())
}
