//! `ssrl`: the command-line shell over the spatial_ssrl library.

/// `println!` that returns an error naming standard output instead of panicking when the
/// write fails (`> /dev/full`, a full disk); a closed pipe still ends the process quietly
/// (SIGPIPE).
macro_rules! outln {
    ($($t:tt)*) => {{
        use std::io::Write as _;
        writeln!(std::io::stdout(), $($t)*).map_err(crate::commands::stdout_error)?
    }};
}

/// `print!`, as [`outln!`].
macro_rules! out {
    ($($t:tt)*) => {{
        use std::io::Write as _;
        write!(std::io::stdout(), $($t)*).map_err(crate::commands::stdout_error)?
    }};
}

mod commands;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use indicatif::{ProgressBar, ProgressStyle};
use spatial_ssrl::reward::{self, RewardConfig};
use spatial_ssrl::tasks::{self, position::Geometry, shuffle::Variant, Format, TaskKind};
use std::io::{BufRead, Write};
use std::path::PathBuf;

#[derive(Parser)]
#[command(
    name = "ssrl",
    version,
    about = "Self-supervised spatial RL for vision-language models (Spatial-SSRL)",
    long_about = "Self-supervised spatial RL for vision-language models (Spatial-SSRL, arXiv 2510.27606).\n\n\
Turns ordinary photos and RGB-D frames into five pretext tasks whose answers a string compare \
can verify, samples a Qwen2.5-VL model on them through ONNX Runtime (CPU, CUDA or TensorRT), scores \
the responses with EasyR1's reward and fine-tunes the model's LoRA with GRPO — no torch at run \
time.\n\n\
The pipeline on the bundled data and the tiny test package (`make demo` runs it all):\n  \
ssrl tasks --images fixtures/photos --rgbd fixtures/rgbd --out demo-out --per-image 2\n  \
ssrl tasks --images fixtures/official --rgbd fixtures/official --out demo-out/val --seed 1\n  \
ssrl rollout --model models/tiny --data demo-out/data --group 5 --out demo-out/rollouts.jsonl\n  \
ssrl train --config configs/demo.toml\n  \
ssrl export --model models/tiny --adapter demo-out/run/checkpoints/global_step_6 --out tiny-grpo\n  \
ssrl eval --model tiny-grpo --data demo-out/val/data --max-new-tokens 64 --out eval-grpo\n\n\
`ssrl <command> --help` explains each command, its files and its defaults."
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Generate pretext-task samples (Parquet or JSONL + JPEG images) from photos and RGB-D frames.
    #[command(
        long_about = "Generate pretext-task samples from photos and RGB-D frames.\n\n\
Photos (--images: folders searched recursively, or jpg/png/webp files) feed shuffle, flip and \
crop; RGB-D frames \
(--rgbd, layout detected per folder: DIODE, MegaDepth .h5, TUM, ScanNet, generic PNG16/npy + \
intrinsics.json) feed depth and position.\n\n\
Output folder:\n  data/part-NNNNN.parquet   samples in EasyR1's schema (problem, answer, images) + id, task, source, meta\n  \
images/<task>/*.jpg       the images, referenced relative to the output folder\n  summary.json              produced / skipped per task and reason\n  \
run.json, state/          what --resume needs\n\n\
The same --seed gives byte-identical output for any --threads. An interrupted run continues \
with --resume and loses at most the shard in progress.\n\n\
Example:\n  ssrl tasks --images coco/val2017 --rgbd diode/val --out ssrl-data --per-image 2 --seed 1"
    )]
    Tasks(TasksArgs),
    /// Score responses with the verifiable reward (JSONL {response, answer} in, scores out).
    #[command(
        long_about = "Score model responses with EasyR1's img_score reward.\n\n\
Reads JSONL lines {\"response\": ..., \"answer\": ...} (\"ground_truth\" is accepted for \"answer\") \
from FILE or standard input and writes one JSONL line per input: \
{\"overall\", \"format\", \"accuracy\", \"predicted\"}.\n\n\
format = 1 when the response (after removing whitespace around <, >, /) is <think>…</think>…\\boxed{…}…; \
predicted = the last \\boxed{} content; accuracy = exact string match; \
overall = (1 − w)·accuracy + w·format.\n\n\
Example:\n  echo '{\"response\":\"<think>…</think> \\\\boxed{A}\",\"answer\":\"A\"}' | ssrl reward"
    )]
    Reward(RewardArgs),
    /// Sample G responses per prompt of a task dataset with a model package (CPU, CUDA or TensorRT), scored by the reward.
    #[command(
        long_about = "Sample G responses for every prompt of a dataset written by `ssrl tasks` \
(Parquet or JSONL), with EasyR1's format sentence appended, and write one JSONL line per response: prompt \
id, sample index, token ids, text, token log-probs, finish reason and, where the data has an answer, \
the reward.\n\nExample:\n  ssrl rollout --model models/tiny --data demo-out/data/part-00000.parquet --group 5 \
--max-new-tokens 64 --out rollouts.jsonl"
    )]
    Rollout(RolloutArgs),
    /// Check a model package: load every graph in ONNX Runtime and verify its inputs and outputs.
    #[command(
        long_about = "Check a model package written by models/export.py: the manifest, and every \
graph loaded in ONNX Runtime with the input and output names and element types the runtime expects. \
Prints the model's shape and its LoRA layout.\n\nExample:\n  ssrl inspect --model models/tiny"
    )]
    Inspect(InspectArgs),
    /// GRPO fine-tuning of a package's LoRA on pretext tasks (rollout → reward → train.onnx → AdamW).
    #[command(
        long_about = "GRPO fine-tuning on pretext tasks, all through ONNX Runtime (no torch).\n\nEach step samples data.rollout_batch_size prompts, rolls out rollout.n responses each with the current LoRA, scores them with the verifiable reward, computes group advantages, gets old and reference log-probs (logprobs.onnx), and takes one AdamW step per mini-batch of actor.global_batch_size prompts through train.onnx (EasyR1's clipped loss with k3 KL, global token-mean). Defaults are the paper's.\n\nThe run folder gets train.toml, metrics.jsonl (one line per step), curves.png and checkpoints/global_step_N/ (PEFT adapter + optimizer state, the last trainer.save_limit kept). Ctrl-C finishes the step and saves a checkpoint; --resume continues exactly.\n\nExamples:\n  ssrl train --print-config > train.toml   # every key with its default\n  ssrl train --config train.toml\n  ssrl train --config train.toml --resume"
    )]
    Train(commands::RunArgs),
    /// The SFT cold start: LoRA supervised fine-tuning that teaches the answer format (sft.onnx → AdamW).
    #[command(
        long_about = "The first stage of Spatial-SSRL's recipe: LoRA SFT on responses in the reasoning format, as the official cold start runs it with LLaMA-Factory, all through ONNX Runtime (no torch).\n\nData, each as it ships: LLaMA-Factory alpaca JSON (the released SFT-coldstart.json: instruction, input, output, images), ShareGPT messages / conversations JSON, or `ssrl tasks` output, whose response is made from each answer by data.response_template (<think> … </think> \\boxed{answer}). The labels are the response's tokens (prompt and image tokens masked); the loss is their token mean over each optimizer step (micro-batches add up exactly). AdamW with a cosine schedule and warm-up; the keys and defaults are LLaMA-Factory's and the official run's (lora_rank 128, lora_alpha 256, lora_target all, learning_rate 1e-5, num_train_epochs 5, 4 × 8 per step, save_steps 15). The package's LoRA must match: export it with --lora-rank/--lora-alpha/--lora-targets.\n\nThe run folder gets sft.toml, metrics.jsonl (loss, token accuracy, lr, grad norm, tokens/s), curves.png and checkpoints/global_step_N/ (PEFT adapter + optimizer state). Ctrl-C finishes the step and saves; --resume continues exactly. Merge the adapter with `ssrl export --adapter` and start GRPO from that package, which is then also its reference.\n\nExamples:\n  ssrl sft --print-config > sft.toml\n  ssrl sft --config sft.toml\n  ssrl export --model PKG --adapter runs/sft/checkpoints/global_step_75 --out PKG-sft"
    )]
    Sft(commands::RunArgs),
    /// Draw a run's training curves (metrics.jsonl) to a PNG.
    Plot(commands::PlotArgs),
    /// Write a deployment package: an adapter merged into the weights, fp16 storage, offline ORT optimisations.
    #[command(
        long_about = "Write a deployment copy of a model package.\n\n--adapter merges a LoRA (a training checkpoint or a PEFT adapter folder) into the base weights of every graph (W += scale·AᵀBᵀ; the graphs' LoRA inputs default to zero afterwards, so the package still takes a fresh adapter). --fp16 stores weights in half precision (a package already stored so stays so, --optimize included); --optimize applies ONNX Runtime's extended graph optimisations offline to the vision, embedding and decoder graphs. Weights in external data files (models over 2 GB, such as Qwen2.5-VL-3B in fp32) are read in and written back beside each graph as {graph}.data; one graph's weights are in memory at a time. onnxruntime-genai and `ssrl rollout` run the result.\n\nExample:\n  ssrl export --model models/tiny --adapter runs/grpo/checkpoints/global_step_10 --out tiny-merged --optimize"
    )]
    Export(commands::ExportArgs),
    /// Accuracy of a package (with or without an adapter) on held-out pretext tasks or a spatial
    /// benchmark, scored as the paper scores it; compare two runs.
    #[command(
        long_about = "Evaluate a package, or the package with an adapter, on a held-out set written by `ssrl tasks` or on a spatial benchmark (--bench viewspatial | whatsup | vsi | mcq). Greedy decoding and the reasoning prompt by default (--no-format-prompt gives each benchmark's answer-directly prompt); the prompt, image sizes, token budget and scoring follow that benchmark's official evaluation, quirks included.\n\nThe run folder gets items.jsonl (prompt, response, extracted answer, score, correct), summary.json (overall, per category, per category/variant; strict and grouped accuracies where the benchmark has them) and run.json (the settings). An interrupted run continues where it stopped; a bad data file is refused, naming the file and line, before the model is loaded.\n\nExamples:\n  ssrl eval --model models/tiny --data heldout/data/part-00000.parquet --out eval/base\n  ssrl eval --model models/tiny --adapter runs/grpo/checkpoints/global_step_360 --data … --out eval/ssrl\n  ssrl eval --model PKG --bench whatsup --data whatsup_vlms/data/controlled_images_dataset.json --out eval/wu\n  ssrl eval --model PKG --bench vsi --data vsi_bench.json --images VSI-Bench/frames --frames 32 --out eval/vsi\n  ssrl eval --model PKG --bench mcq --data 3DSRBench.tsv --out eval/3dsr\n  ssrl eval --compare eval/base eval/ssrl"
    )]
    Eval(commands::EvalArgs),
    /// Benchmarks (printed, and written as JSON).
    #[command(subcommand)]
    Bench(BenchCommand),
}

#[derive(clap::Args)]
struct RolloutArgs {
    /// Package folder (models/export.py, `ssrl export`), or an onnxruntime-genai Qwen2.5-VL
    /// folder (genai_config.json; fp32, int4, fp16 or bf16 builder decoders).
    #[arg(long, value_name = "DIR")]
    model: PathBuf,
    /// Samples from `ssrl tasks`, or any in EasyR1's columns (problem, images, answer; rows
    /// without images are text-only, rows without an answer are not scored): a .parquet or
    /// .jsonl file, or a folder (an `ssrl tasks` output folder or its data/): all its shards in
    /// name order. Image paths are relative to --images-root.
    #[arg(long, value_name = "PATH")]
    data: PathBuf,
    /// Folder the samples' image paths are relative to (default: each data file's own folder
    /// or one of the two above it, whichever holds its first image: `ssrl tasks` output, the
    /// released Spatial-SSRL-81k).
    #[arg(long, value_name = "DIR")]
    images_root: Option<PathBuf>,
    /// Responses per prompt.
    #[arg(long, default_value_t = 5, value_parser = commands::at_least_one)]
    group: usize,
    /// Prompts per engine call.
    #[arg(long, default_value_t = 8, value_parser = commands::at_least_one)]
    batch: usize,
    #[arg(long, default_value_t = 256, value_parser = commands::at_least_one)]
    max_new_tokens: usize,
    /// 0 is greedy.
    #[arg(long, default_value_t = 1.0, value_parser = commands::temperature,
          allow_negative_numbers = true)]
    temperature: f32,
    /// Sample from the most likely tokens whose mass reaches P (1 = all). The written log-probs
    /// are then over those tokens (the distribution drawn from).
    #[arg(long, default_value_t = 1.0, value_parser = commands::top_p,
          allow_negative_numbers = true)]
    top_p: f32,
    /// Sample from the K most likely tokens (0 = all); log-probs as with --top-p.
    #[arg(long, default_value_t = 0)]
    top_k: usize,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Only the first N prompts.
    #[arg(long, value_parser = commands::at_least_one)]
    limit: Option<usize>,
    /// Do not append EasyR1's format sentence to the problems.
    #[arg(long)]
    no_format_prompt: bool,
    /// Output JSONL (must not exist). Responses are written to FILE.partial a batch at a time,
    /// with the settings in FILE.run.json; an interrupted run (Ctrl-C finishes the batch in
    /// hand) continues where it stopped when the same command runs again. A sample whose images
    /// cannot be read is skipped with a warning.
    #[arg(long, value_name = "FILE")]
    out: PathBuf,
    /// libonnxruntime.so to load (default: ORT_DYLIB_PATH, then vendor/ort/).
    #[arg(long, value_name = "PATH")]
    ort_lib: Option<PathBuf>,
    #[command(flatten)]
    device: commands::DeviceArgs,
}

#[derive(clap::Args)]
struct InspectArgs {
    /// Package folder (manifest.json, *.onnx, tokenizer and configs), or an onnxruntime-genai
    /// Qwen2.5-VL folder (genai_config.json).
    #[arg(long, value_name = "DIR")]
    model: PathBuf,
    /// libonnxruntime.so to load (default: ORT_DYLIB_PATH, then vendor/ort/ from `make ort`).
    #[arg(long, value_name = "PATH")]
    ort_lib: Option<PathBuf>,
}

#[derive(Subcommand)]
enum BenchCommand {
    /// Achieved bandwidth of the log-prob kernel over [rows, vocab] f32 logits, against this
    /// machine's own bandwidth (one core's read bandwidth for the CPU twin, device-to-device copy
    /// bandwidth for CUDA).
    Kernels(BenchKernelsArgs),
    /// Rollout throughput of a package: prompts/s, tokens/s, vision / prefill / decode time, the
    /// share of wall time inside ONNX Runtime (and, with CPU slices, of the time they worked, and
    /// how long they waited for each other), resident memory round by round.
    Rollout(commands::BenchRolloutArgs),
    /// Speed and memory of a GRPO step's graphs: positions/s of the log-prob and training
    /// graphs on synthetic rows of a chosen shape, resident memory once the sessions are open
    /// and the peak while each graph runs.
    Train(commands::BenchTrainArgs),
}

#[derive(clap::Args)]
struct BenchKernelsArgs {
    /// Logit rows (tokens).
    #[arg(long, default_value_t = 64, value_parser = commands::at_least_one)]
    rows: usize,
    /// Vocabulary size (Qwen2.5-VL: 151,936).
    #[arg(long, default_value_t = 151_936, value_parser = commands::at_least_one)]
    vocab: usize,
    /// Backends to measure: cpu, cuda, or both (cuda is skipped with a note when unavailable).
    #[arg(long, value_delimiter = ',', default_value = "cpu,cuda")]
    device: Vec<String>,
    /// CUDA device ordinal.
    #[arg(long, default_value_t = 0)]
    cuda_device: usize,
    /// Repetitions (the median is reported).
    #[arg(long, default_value_t = 5, value_parser = commands::at_least_one)]
    reps: usize,
    /// Also write the results here.
    #[arg(long, default_value = "bench-kernels.json")]
    json: PathBuf,
}

#[derive(clap::Args)]
struct TasksArgs {
    /// Photos for shuffle, flip and crop: folders (searched recursively) or files; several
    /// after one flag (`--images shots/*.jpg`) or the flag repeated.
    #[arg(long, value_name = "DIR|FILE", num_args = 1..)]
    images: Vec<PathBuf>,
    /// Folders of RGB-D frames (any supported layout, searched recursively) for depth and
    /// position; several after one flag, or the flag repeated.
    #[arg(long, value_name = "DIR", num_args = 1..)]
    rgbd: Vec<PathBuf>,
    /// Output folder (created; must not hold another run unless --resume).
    #[arg(long, value_name = "DIR")]
    out: PathBuf,
    /// Tasks to generate, comma separated.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "shuffle,flip,crop,depth,position"
    )]
    tasks: Vec<TaskKind>,
    /// Samples per source and task.
    #[arg(long, default_value_t = 1, value_name = "N", value_parser = commands::at_least_one)]
    per_image: usize,
    /// Random seed; the output depends only on the seed, inputs and settings.
    #[arg(long, default_value_t = 0, value_name = "S")]
    seed: u64,
    /// Worker threads (0 = all cores; at most 1024, and no more are started than a shard has
    /// sources).
    #[arg(long, default_value_t = 0, value_name = "N", value_parser = commands::thread_count)]
    threads: usize,
    /// Sample file format.
    #[arg(long, value_enum, default_value_t = Format::Parquet)]
    format: Format,
    /// Continue an interrupted run in the same output folder.
    #[arg(long)]
    resume: bool,
    /// Downscale sources whose longer side exceeds PX (0 = keep native size).
    #[arg(long, default_value_t = 1600, value_name = "PX")]
    max_side: u32,
    /// Relative-position answers: `sign` (the official code: signs of Δcolumn and Δdepth) or
    /// `metric` (the paper's Eq. 7–9 in the camera frame; needs intrinsics and metric depth).
    #[arg(long, value_enum, default_value_t = GeometryArg::Sign)]
    position_geometry: GeometryArg,
    /// Use one shuffle variant instead of the paper's mix: 2x2, 2x2_mask, 1x3, 1x4, 3x1, 4x1.
    #[arg(long, value_name = "V", value_parser = parse_variant)]
    shuffle_variant: Option<Variant>,
    /// JPEG quality of the written images.
    #[arg(long, default_value_t = 95, value_parser = clap::value_parser!(u8).range(1..=100))]
    jpeg_quality: u8,
    /// Sources per output shard (the unit of atomic commit and resume).
    #[arg(long, default_value_t = 64, value_name = "N", value_parser = commands::at_least_one)]
    shard_sources: usize,
    /// No progress bar or warnings, only the summary.
    #[arg(long, short)]
    quiet: bool,
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum GeometryArg {
    Sign,
    Metric,
}

fn parse_variant(s: &str) -> Result<Variant, String> {
    Ok(match s {
        "2x2" => Variant::Grid,
        "2x2_mask" => Variant::GridMasked,
        "1x3" => Variant::Horizontal(3),
        "1x4" => Variant::Horizontal(4),
        "3x1" => Variant::Vertical(3),
        "4x1" => Variant::Vertical(4),
        _ => {
            return Err(format!(
                "unknown variant {s:?}; one of 2x2, 2x2_mask, 1x3, 1x4, 3x1, 4x1"
            ))
        }
    })
}

#[derive(clap::Args)]
struct RewardArgs {
    /// JSONL file of {response, answer}; standard input when omitted or `-`. Output line N
    /// scores input line N (a blank line stays blank).
    file: Option<PathBuf>,
    /// Weight of the format score in `overall`.
    #[arg(long, default_value_t = 0.1)]
    format_weight: f64,
}

struct Bar {
    pb: ProgressBar,
    quiet: bool,
    warned: std::sync::atomic::AtomicUsize,
    samples: std::sync::atomic::AtomicU64,
    started: std::time::Instant,
}

const MAX_WARNINGS: usize = 50;

impl tasks::Progress for Bar {
    fn start(&self, total: u64, done: u64) {
        self.pb.set_length(total);
        self.pb.set_position(done);
        self.pb.reset_eta();
    }
    fn source_done(&self, samples: u64) {
        self.pb.inc(1);
        let n = self
            .samples
            .fetch_add(samples, std::sync::atomic::Ordering::Relaxed)
            + samples;
        let rate = n as f64 / self.started.elapsed().as_secs_f64().max(1e-6);
        self.pb
            .set_message(format!("{n} samples · {rate:.1} samples/s"));
    }
    fn warn(&self, message: &str) {
        if self.quiet {
            return;
        }
        // On a terminal the first MAX_WARNINGS are shown above the bar; wherever else stderr
        // goes (a log, CI) every one is written, the bar being hidden there.
        if self.pb.is_hidden() {
            eprintln!("warning: {message}");
            return;
        }
        let n = self
            .warned
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        if n < MAX_WARNINGS {
            self.pb.println(format!("warning: {message}"));
        } else if n == MAX_WARNINGS {
            self.pb.println(
                "warning: more warnings not shown here (counts in summary.json; with stderr \
                 redirected, `2>FILE`, every one is written)",
            );
        }
    }
}

fn run_tasks(a: TasksArgs) -> Result<()> {
    let cfg = tasks::TasksConfig {
        images: a.images,
        rgbd: a.rgbd,
        out: a.out,
        tasks: a.tasks,
        per_image: a.per_image,
        seed: a.seed,
        threads: a.threads,
        format: a.format,
        resume: a.resume,
        max_side: a.max_side,
        position_geometry: match a.position_geometry {
            GeometryArg::Sign => Geometry::Sign,
            GeometryArg::Metric => Geometry::Metric,
        },
        shuffle_variant: a.shuffle_variant,
        jpeg_quality: a.jpeg_quality,
        shard_sources: a.shard_sources,
    };
    let pb = if a.quiet {
        ProgressBar::hidden()
    } else {
        ProgressBar::new(0)
    };
    pb.set_style(
        ProgressStyle::with_template("{bar:30} {pos}/{len} sources · {msg} · ETA {eta}")
            .expect("valid template"),
    );
    pb.set_message("0 samples");
    let bar = Bar {
        pb,
        quiet: a.quiet,
        warned: Default::default(),
        samples: Default::default(),
        started: std::time::Instant::now(),
    };
    let stop = commands::stop_on_ctrl_c(
        "finishing the shard in progress, then stopping",
        "the shard in progress is lost; the shards written are kept (continue with --resume)",
    )?;
    let result = tasks::run_until(&cfg, &bar, stop);
    bar.pb.finish_and_clear();
    let summary = result.with_context(|| format!("ssrl tasks → {}", cfg.out.display()))?;
    if summary.stopped {
        let written = summary.data_files.len().saturating_sub(1);
        eprintln!(
            "interrupted: {written} of {} shards in {} — run the same command with --resume to \
             continue",
            summary.shards,
            cfg.out.display()
        );
        std::process::exit(130);
    }
    outln!("{:<10} {:>9}  skipped", "task", "produced");
    for (t, s) in &summary.tasks {
        let skipped: Vec<String> = s
            .skipped
            .iter()
            .map(|(r, n)| format!("{}: {n}", r.name()))
            .collect();
        outln!(
            "{:<10} {:>9}  {}",
            t.name(),
            s.produced,
            if skipped.is_empty() {
                "-".into()
            } else {
                skipped.join(", ")
            }
        );
    }
    outln!(
        "{} samples from {} sources in {:.1} s ({:.1} samples/s){} → {}",
        summary.produced,
        summary.sources,
        summary.elapsed_s,
        summary.samples_per_s,
        if summary.resumed_shards > 0 {
            format!(", {} shard(s) resumed", summary.resumed_shards)
        } else {
            String::new()
        },
        cfg.out.join("summary.json").display()
    );
    Ok(())
}

fn run_rollout(a: RolloutArgs) -> Result<()> {
    use spatial_ssrl::kernels::SamplingParams;
    use spatial_ssrl::rollout::job::{Progress, RolloutJob};
    use spatial_ssrl::rollout::GenerationConfig;
    let job = RolloutJob {
        model: a.model.clone(),
        data: a.data.clone(),
        images_root: a.images_root.clone(),
        limit: a.limit,
        batch: a.batch,
        cfg: GenerationConfig {
            group: a.group,
            max_new_tokens: a.max_new_tokens,
            sampling: SamplingParams {
                temperature: a.temperature,
                top_k: a.top_k,
                top_p: a.top_p,
                seed: a.seed,
            },
            verbatim: false,
            format_sentence: (!a.no_format_prompt)
                .then(|| tasks::templates::FORMAT_SENTENCE.to_string()),
        },
        out: a.out.clone(),
    };
    // The data and the output checked, then the model loaded, before anything is written: a
    // wrong --model or library leaves no trace.
    let plan = job.plan()?;
    let mut engine = a.device.open(
        &a.model,
        a.ort_lib.as_deref(),
        a.batch * a.group,
        a.max_new_tokens,
        None,
    )?;
    let (total, done) = plan.prompts();
    if done > 0 {
        eprintln!(
            "continuing {}: {done} of {total} prompts done",
            job.partial_path().display()
        );
    }
    let stop = commands::stop_on_ctrl_c(
        "finishing this batch of prompts, then stopping (their responses are kept)",
        "exiting (the batches finished so far are kept)",
    )?;
    let pb = ProgressBar::new(total as u64);
    pb.set_style(
        ProgressStyle::with_template("{bar:30} {pos}/{len} prompts · {msg} · ETA {eta}")
            .expect("valid template"),
    );
    pb.set_position(done as u64);
    pb.reset_eta();
    let t0 = std::time::Instant::now();
    let s = plan.run(&mut engine, stop, |p| match p {
        Progress::Skipped { id, index, why } => {
            commands::say(&pb, format!("skipping sample {id} ({index}): {why}"));
        }
        Progress::Batch { done, tokens, .. } => {
            pb.set_position(done as u64);
            let rate = tokens as f64 / t0.elapsed().as_secs_f64();
            pb.set_message(format!("{rate:.1} tokens/s"));
        }
    })?;
    pb.finish_and_clear();
    if s.stopped {
        eprintln!(
            "interrupted: {} of {} prompts in {} — run the same command again to continue",
            s.finished,
            s.total,
            job.partial_path().display()
        );
        std::process::exit(130);
    }
    if s.skipped > 0 {
        eprintln!("{} samples skipped (see the warnings above)", s.skipped);
    }
    outln!(
        "{} responses ({} prompts × {}), {} new tokens in {:.1} s ({:.1} tokens/s), {} → {}",
        s.responses,
        s.finished,
        a.group,
        s.tokens,
        s.secs,
        s.tokens as f64 / s.secs,
        match s.mean_reward {
            Some(r) => format!("mean reward {r:.3}"),
            None => "no answers to score".into(),
        },
        a.out.display()
    );
    Ok(())
}

fn run_inspect(a: InspectArgs) -> Result<()> {
    use spatial_ssrl::model::package::Package;
    let p = Package::open(&a.model)?;
    let m = &p.manifest;
    outln!(
        "{}: Qwen2.5-VL {} ({}), text {} layers × hidden {} ({} / {} heads, head_dim {}), vocab {}, mrope {:?}",
        a.model.display(),
        if p.is_genai() {
            "onnxruntime-genai folder (rollouts only)"
        } else {
            "package"
        },
        m.dtype,
        m.text.num_hidden_layers,
        m.text.hidden_size,
        m.text.num_attention_heads,
        m.text.num_key_value_heads,
        m.text.head_dim,
        m.text.vocab_size,
        m.text.mrope_section
    );
    if let Some(n) = p.context_length() {
        outln!("context: {n} tokens, prompt and generated");
    }
    outln!(
        "vision: patch {}, merge {}, window {} px → features of {}; {}",
        m.vision.patch_size,
        m.vision.spatial_merge_size,
        m.vision.window_size,
        m.vision.out_hidden_size,
        match m.lora.tensors.is_empty() {
            true => "no LoRA inputs".to_string(),
            false => format!(
                "LoRA rank {} alpha {} on {}",
                m.lora.rank,
                m.lora.alpha,
                m.lora.targets.join(", ")
            ),
        }
    );
    {
        use spatial_ssrl::model::package::{KvLayout, OwnCache};
        outln!(
            "cache: {}",
            match (m.kv_layout, m.own_cache) {
                (KvLayout::Shared, OwnCache::InPlace) => {
                    "prompts' cache shared by their samples; rows' own tokens read in place"
                }
                (KvLayout::Shared, OwnCache::Append) => {
                    "prompts' cache shared by their samples; rows' own tokens past + present"
                }
                (KvLayout::Packed, _) => {
                    "GroupQueryAttention, each row's cache packed from position 0"
                }
                (KvLayout::Append, _) => "past + present, the prompt's cache fanned out",
            }
        );
    }
    if !p.is_genai() {
        use spatial_ssrl::model::package::Positions;
        let t = &m.train;
        outln!(
            "log-prob and training graphs: {}; {}; {}",
            match t.positions {
                Positions::Completion => "the completion's columns only",
                Positions::All => "every column of the rows",
            },
            match t.head_chunks {
                Some(n) if n > 1 => format!("the vocabulary head in {n} chunks of positions"),
                _ => "the vocabulary head over every position at once".to_string(),
            },
            match t.attention_chunks {
                Some(n) if n > 1 => format!("attention in {n} chunks of queries"),
                _ => "attention over every query at once".to_string(),
            }
        );
    }
    if let Some(r) = spatial_ssrl::model::export::Record::of(&a.model) {
        let mut done = Vec::new();
        if r.adapter_merged {
            done.push("adapter merged".to_string());
        }
        if r.weights_fp16 {
            done.push("weights stored as fp16".into());
        }
        if !r.optimized.is_empty() {
            done.push(format!("optimised offline: {}", r.optimized.join(", ")));
        }
        if done.is_empty() {
            done.push("copied as it was".into());
        }
        outln!("exported from {}: {}", r.from, done.join("; "));
    }
    p.validate(a.ort_lib.as_deref())?;
    // The data files the graphs read their weights from, and how many graphs read each.
    let mut files: std::collections::BTreeMap<String, usize> = Default::default();
    for (file, _) in p.signatures() {
        let bytes = std::fs::read(p.graph_path(&file)).unwrap_or_default();
        let named = spatial_ssrl::model::onnx_edit::external_initializers(&bytes)
            .unwrap_or_default()
            .into_iter()
            .map(|t| t.location)
            .collect::<std::collections::BTreeSet<_>>();
        for f in named {
            *files.entry(f).or_default() += 1;
        }
    }
    for (f, n) in &files {
        let size = std::fs::metadata(a.model.join(f)).map_or(0, |m| m.len());
        let shared = match n {
            1 => "read by 1 graph".to_string(),
            n => format!("shared by {n} graphs, each tensor stored once"),
        };
        outln!("weights: {f}, {} ({shared})", human_bytes(size));
    }
    for (file, sig) in p.signatures() {
        let path = p.graph_path(&file);
        let (own, all) = (
            std::fs::metadata(&path).map_or(0, |m| m.len()),
            spatial_ssrl::model::onnx_edit::size_with_data(&path),
        );
        let external = match all > own {
            true => " with the weights it reads",
            false => "",
        };
        outln!(
            "  {file}: ok ({} inputs, {} outputs; {}{external})",
            sig.inputs.len(),
            sig.outputs.len(),
            human_bytes(all)
        );
    }
    Ok(())
}

/// `n` bytes as KB / MB / GB (powers of 1,000, one decimal).
fn human_bytes(n: u64) -> String {
    match n {
        0..1_000_000 => format!("{:.1} KB", n as f64 / 1e3),
        1_000_000..1_000_000_000 => format!("{:.1} MB", n as f64 / 1e6),
        _ => format!("{:.1} GB", n as f64 / 1e9),
    }
}

fn run_bench_kernels(a: BenchKernelsArgs) -> Result<()> {
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
    commands::write_json(&a.json, &reports)
}

#[derive(serde::Deserialize)]
struct RewardIn {
    response: String,
    #[serde(alias = "ground_truth")]
    answer: String,
}

fn run_reward(a: RewardArgs) -> Result<()> {
    let cfg = RewardConfig {
        format_weight: a.format_weight,
    };
    // `-` is standard input, as for most filters.
    let file = a.file.filter(|p| p.as_os_str() != "-");
    let name = file
        .as_ref()
        .map(|p| p.display().to_string())
        .unwrap_or_else(|| "<stdin>".into());
    let input: Box<dyn BufRead> = match &file {
        Some(p) => Box::new(std::io::BufReader::new(
            std::fs::File::open(p).with_context(|| format!("{}: cannot open", p.display()))?,
        )),
        None => Box::new(std::io::stdin().lock()),
    };
    let stdout = std::io::stdout();
    let mut out = std::io::BufWriter::new(stdout.lock());
    for (i, line) in input.lines().enumerate() {
        let line = line.with_context(|| format!("{name}: read error at line {}", i + 1))?;
        // Output line N answers input line N: a blank line gives a blank line.
        if line.trim().is_empty() {
            out.write_all(b"\n")?;
            continue;
        }
        let r: RewardIn = serde_json::from_str(&line).with_context(|| {
            format!(
                "{name}:{}: expected {{\"response\": string, \"answer\": string}}",
                i + 1
            )
        })?;
        let s = reward::score(&r.response, &r.answer, &cfg);
        serde_json::to_writer(&mut out, &s)?;
        out.write_all(b"\n")?;
    }
    out.flush()?;
    Ok(())
}

fn main() {
    // Output piped into `head` and the like ends quietly when the reader closes, as other Unix
    // tools do, rather than as a panic on the broken pipe.
    #[cfg(unix)]
    // SAFETY: restores the default action of one signal before any thread starts.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
    let cli = Cli::parse();
    let r = match cli.command {
        Command::Tasks(a) => run_tasks(a),
        Command::Reward(a) => run_reward(a),
        Command::Bench(BenchCommand::Kernels(a)) => run_bench_kernels(a),
        Command::Bench(BenchCommand::Rollout(a)) => commands::run_bench_rollout(a),
        Command::Bench(BenchCommand::Train(a)) => commands::run_bench_train(a),
        Command::Inspect(a) => run_inspect(a),
        Command::Rollout(a) => run_rollout(a),
        Command::Train(a) => commands::run_train(a),
        Command::Sft(a) => commands::run_sft(a),
        Command::Plot(a) => commands::run_plot(a),
        Command::Export(a) => commands::run_export(a),
        Command::Eval(a) => commands::run_eval(a),
    };
    if let Err(e) = r {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}
