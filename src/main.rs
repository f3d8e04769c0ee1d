//! `ssrl`: the command-line shell over the spatial_ssrl library.

/// `println!` that returns an error naming standard output instead of panicking when the
/// write fails (`> /dev/full`, a full disk); a closed pipe still ends the process quietly
/// (SIGPIPE).
macro_rules! outln {
    ($($t:tt)*) => {{
        use std::io::Write as _;
        writeln!(std::io::stdout(), $($t)*).map_err(crate::cli::stdout_error)?
    }};
}

/// `print!`, as [`outln!`].
macro_rules! out {
    ($($t:tt)*) => {{
        use std::io::Write as _;
        write!(std::io::stdout(), $($t)*).map_err(crate::cli::stdout_error)?
    }};
}

mod cli;

use clap::{Parser, Subcommand};
use cli::*;

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
ssrl sft --config configs/demo-sft.toml\n  \
ssrl export --model models/tiny --adapter demo-out/sft/checkpoints/global_step_80 --out demo-out/tiny-sft\n  \
ssrl train --config configs/demo.toml\n  \
ssrl export --model demo-out/tiny-sft --adapter demo-out/run/checkpoints/global_step_24 --out tiny-grpo\n  \
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
        long_about = "GRPO fine-tuning on pretext tasks, all through ONNX Runtime (no torch).\n\nEach step samples data.rollout_batch_size prompts, rolls out rollout.n responses each with the current LoRA, scores them with the verifiable reward, computes group advantages, gets old and reference log-probs (logprobs.onnx), and takes one AdamW step per mini-batch of actor.global_batch_size prompts through train.onnx (EasyR1's clipped loss with k3 KL, global token-mean). Defaults are the paper's.\n\nThe run folder gets train.toml, metrics.jsonl (one line per step), curves.png and checkpoints/global_step_N/ (PEFT adapter + optimizer state, the last trainer.save_limit kept). Ctrl-C finishes the step and saves a checkpoint; --resume continues exactly.\n\nData parallel (an ssrl built with --features mpi): under mpirun or srun each rank takes its share of every step's prompts and GPU rollout.device_id + its local rank; the gradients are summed over the ranks (NCCL through the GPUs, or MPI) and rank 0 writes the run folder. SIGUSR1 to mpirun stops every rank after the step with a checkpoint.\n\nExamples:\n  ssrl train --print-config > train.toml   # every key with its default\n  ssrl train --config train.toml\n  ssrl train --config train.toml --resume\n  mpirun -np 8 ssrl train --config train.toml   # one process per GPU"
    )]
    Train(RunArgs),
    /// The SFT cold start: LoRA supervised fine-tuning that teaches the answer format (sft.onnx → AdamW).
    #[command(
        long_about = "The first stage of Spatial-SSRL's recipe: LoRA SFT on responses in the reasoning format, as the official cold start runs it with LLaMA-Factory, all through ONNX Runtime (no torch).\n\nData, each as it ships: LLaMA-Factory alpaca JSON (the released SFT-coldstart.json: instruction, input, output, images), ShareGPT messages / conversations JSON, or `ssrl tasks` output, whose response is made from each answer by data.response_template (<think> … </think> \\boxed{answer}). The labels are the response's tokens (prompt and image tokens masked); the loss is their token mean over each optimizer step (micro-batches add up exactly). AdamW with a cosine schedule and warm-up; the keys and defaults are LLaMA-Factory's and the official run's (lora_rank 128, lora_alpha 256, lora_target all, learning_rate 1e-5, num_train_epochs 5, 4 × 8 per step, save_steps 15). The package's LoRA must match: export it with --lora-rank/--lora-alpha/--lora-targets.\n\nThe run folder gets sft.toml, metrics.jsonl (loss, token accuracy, lr, grad norm, tokens/s), curves.png and checkpoints/global_step_N/ (PEFT adapter + optimizer state). Ctrl-C finishes the step and saves; --resume continues exactly. Merge the adapter with `ssrl export --adapter` and start GRPO from that package, which is then also its reference.\n\nUnder mpirun / srun (--features mpi) a step is per_device_train_batch_size × gradient_accumulation_steps × ranks examples, dealt over the ranks.\n\nExamples:\n  ssrl sft --print-config > sft.toml\n  ssrl sft --config sft.toml\n  mpirun -np 8 ssrl sft --config sft.toml\n  ssrl export --model PKG --adapter runs/sft/checkpoints/global_step_75 --out PKG-sft"
    )]
    Sft(RunArgs),
    /// Draw a run's training curves (metrics.jsonl) to a PNG.
    Plot(PlotArgs),
    /// Write a deployment package: an adapter merged into the weights, fp16 storage, offline ORT optimisations.
    #[command(
        long_about = "Write a deployment copy of a model package.\n\n--adapter merges a LoRA (a training checkpoint or a PEFT adapter folder) into the base weights of every graph (W += scale·AᵀBᵀ; the graphs' LoRA inputs default to zero afterwards, so the package still takes a fresh adapter). --fp16 stores weights in half precision (a package already stored so stays so, --optimize included); --optimize applies ONNX Runtime's extended graph optimisations offline to the vision, embedding and decoder graphs. Weights in external data files (models over 2 GB, such as Qwen2.5-VL-3B in fp32) are read in and written back beside each graph as {graph}.data; one graph's weights are in memory at a time. onnxruntime-genai and `ssrl rollout` run the result.\n\nExample:\n  ssrl export --model models/tiny --adapter runs/grpo/checkpoints/global_step_10 --out tiny-merged --optimize"
    )]
    Export(ExportArgs),
    /// Accuracy of a package (with or without an adapter) on held-out pretext tasks or a spatial
    /// benchmark, scored as the paper scores it; compare two runs.
    #[command(
        long_about = "Evaluate a package, or the package with an adapter, on a held-out set written by `ssrl tasks` or on a spatial benchmark (--bench viewspatial | whatsup | vsi | mcq). Greedy decoding and the reasoning prompt by default (--no-format-prompt gives each benchmark's answer-directly prompt); the prompt, image sizes, token budget and scoring follow that benchmark's official evaluation, quirks included.\n\nThe run folder gets items.jsonl (prompt, response, extracted answer, score, correct), summary.json (overall, per category, per category/variant; strict and grouped accuracies where the benchmark has them) and run.json (the settings). An interrupted run continues where it stopped; a bad data file is refused, naming the file and line, before the model is loaded.\n\nExamples:\n  ssrl eval --model models/tiny --data heldout/data/part-00000.parquet --out eval/base\n  ssrl eval --model models/tiny --adapter runs/grpo/checkpoints/global_step_360 --data … --out eval/ssrl\n  ssrl eval --model PKG --bench whatsup --data whatsup_vlms/data/controlled_images_dataset.json --out eval/wu\n  ssrl eval --model PKG --bench vsi --data vsi_bench.json --images VSI-Bench/frames --frames 32 --out eval/vsi\n  ssrl eval --model PKG --bench mcq --data 3DSRBench.tsv --out eval/3dsr\n  ssrl eval --compare eval/base eval/ssrl"
    )]
    Eval(EvalArgs),
    /// Benchmarks (printed, and written as JSON).
    #[command(subcommand)]
    Bench(BenchCommand),
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
    Rollout(BenchRolloutArgs),
    /// Speed and memory of a GRPO step's graphs: positions/s of the log-prob and training
    /// graphs on synthetic rows of a chosen shape, resident memory once the sessions are open
    /// and the peak while each graph runs.
    Train(BenchTrainArgs),
    /// The gradient sum of a data-parallel step alone, under `mpirun -np N`: time and
    /// bandwidth of summing a LoRA's gradients over the ranks with MPI on the host (and with
    /// NCCL through the GPUs, --gpu).
    Allreduce(BenchAllreduceArgs),
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
    // Only the commands that share their work over ranks may run under a launcher: N copies
    // of any other would each do all of it, into the same files.
    let ranked = match &cli.command {
        Command::Train(_) | Command::Sft(_) | Command::Rollout(_) => true,
        Command::Bench(BenchCommand::Allreduce(_)) => true,
        // (an evaluation is shared; a comparison of two is one process's)
        Command::Eval(a) => a.compare.is_empty(),
        _ => false,
    };
    if !ranked {
        if let Ok(Some(l)) = spatial_ssrl::dist::launch_from(|k| std::env::var(k).ok()) {
            if l.size > 1 {
                // (rank 0 alone says why; every rank stops)
                if l.rank == 0 {
                    eprintln!(
                        "error: launched by {} as {} ranks, but this command runs as one process \
                         (it uses the machine's cores itself): run it without the launcher; \
                         train, sft, rollout, eval and bench allreduce share their work over ranks",
                        l.launcher, l.size
                    );
                }
                std::process::exit(2);
            }
        }
    }
    let r = match cli.command {
        Command::Tasks(a) => run_tasks(a),
        Command::Reward(a) => run_reward(a),
        Command::Bench(BenchCommand::Kernels(a)) => run_bench_kernels(a),
        Command::Bench(BenchCommand::Rollout(a)) => run_bench_rollout(a),
        Command::Bench(BenchCommand::Train(a)) => run_bench_train(a),
        Command::Bench(BenchCommand::Allreduce(a)) => run_bench_allreduce(a),
        Command::Inspect(a) => run_inspect(a),
        Command::Rollout(a) => run_rollout(a),
        Command::Train(a) => run_train(a),
        Command::Sft(a) => run_sft(a),
        Command::Plot(a) => run_plot(a),
        Command::Export(a) => run_export(a),
        Command::Eval(a) => run_eval(a),
    };
    let world = spatial_ssrl::dist::world();
    if let Err(e) = r {
        if world.size > 1 {
            // A data-parallel run: the others may be waiting for this rank in a collective,
            // so it ends them all (the checkpoints written so far are whole).
            eprintln!("error ({}): {e:#}", world.who());
            world.abort(1);
        }
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
    spatial_ssrl::dist::finish();
}
