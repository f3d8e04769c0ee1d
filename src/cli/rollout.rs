//! `ssrl rollout`: G responses per prompt of a dataset, as JSON lines.

use super::*;

#[derive(clap::Args)]
pub(crate) struct RolloutArgs {
    /// Package folder (models/export.py, `ssrl export`), or an onnxruntime-genai Qwen2.5-VL
    /// folder (genai_config.json; fp32, int4, fp16 or bf16 builder decoders).
    #[arg(long, value_name = "DIR")]
    pub(crate) model: PathBuf,
    /// Samples from `ssrl tasks`, or any in EasyR1's columns (problem, images, answer; rows
    /// without images are text-only, rows without an answer are not scored): a .parquet or
    /// .jsonl file, or a folder (an `ssrl tasks` output folder or its data/): all its shards in
    /// name order. Image paths are relative to --images-root.
    #[arg(long, value_name = "PATH")]
    pub(crate) data: PathBuf,
    /// Folder the samples' image paths are relative to (default: each data file's own folder
    /// or one of the two above it, whichever holds its first image: `ssrl tasks` output, the
    /// released Spatial-SSRL-81k).
    #[arg(long, value_name = "DIR")]
    pub(crate) images_root: Option<PathBuf>,
    /// Responses per prompt.
    #[arg(long, default_value_t = 5, value_parser = at_least_one)]
    pub(crate) group: usize,
    /// Prompts per engine call.
    #[arg(long, default_value_t = 8, value_parser = at_least_one)]
    pub(crate) batch: usize,
    #[arg(long, default_value_t = 256, value_parser = at_least_one)]
    pub(crate) max_new_tokens: usize,
    /// 0 is greedy.
    #[arg(long, default_value_t = 1.0, value_parser = temperature,
          allow_negative_numbers = true)]
    pub(crate) temperature: f32,
    /// Sample from the most likely tokens whose mass reaches P (1 = all). The written log-probs
    /// are then over those tokens (the distribution drawn from).
    #[arg(long, default_value_t = 1.0, value_parser = top_p,
          allow_negative_numbers = true)]
    pub(crate) top_p: f32,
    /// Sample from the K most likely tokens (0 = all); log-probs as with --top-p.
    #[arg(long, default_value_t = 0)]
    pub(crate) top_k: usize,
    #[arg(long, default_value_t = 0)]
    pub(crate) seed: u64,
    /// Only the first N prompts.
    #[arg(long, value_parser = at_least_one)]
    pub(crate) limit: Option<usize>,
    /// Do not append EasyR1's format sentence to the problems.
    #[arg(long)]
    pub(crate) no_format_prompt: bool,
    /// Output JSONL (must not exist). Responses are written to FILE.partial a batch at a time,
    /// with the settings in FILE.run.json; an interrupted run (Ctrl-C finishes the batch in
    /// hand) continues where it stopped when the same command runs again. A sample whose images
    /// cannot be read is skipped with a warning.
    #[arg(long, value_name = "FILE")]
    pub(crate) out: PathBuf,
    /// libonnxruntime.so to load (default: ORT_DYLIB_PATH, then vendor/ort/).
    #[arg(long, value_name = "PATH")]
    pub(crate) ort_lib: Option<PathBuf>,
    #[command(flatten)]
    pub(crate) device: DeviceArgs,
}

pub(crate) fn run_rollout(a: RolloutArgs) -> Result<()> {
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
                .then(|| spatial_ssrl::data::FORMAT_SENTENCE.to_string()),
        },
        out: a.out.clone(),
    };
    // Under mpirun / srun the prompts are dealt over the ranks; rank 0 writes the output.
    let world = spatial_ssrl::dist::init()?;
    let root = world.is_root();
    // The data and the output checked, then the model loaded, before anything is written: a
    // wrong --model or library leaves no trace.
    let plan = job.plan()?;
    world.barrier();
    world.announce("the prompts are dealt over them, rank 0 writes the output");
    let mut engine = a.device.open(
        &a.model,
        a.ort_lib.as_deref(),
        a.batch * a.group,
        a.max_new_tokens,
        None,
    )?;
    let (total, done) = plan.prompts();
    if done > 0 {
        note(format!(
            "continuing {}: {done} of {total} prompts done",
            job.partial_path().display()
        ));
    }
    let stop = stop_on_ctrl_c(
        "finishing this batch of prompts, then stopping (their responses are kept)",
        "exiting (the batches finished so far are kept)",
    )?;
    stop_on_usr1();
    let pb = styled(
        rank_bar(total as u64),
        "{bar:30} {pos}/{len} prompts · {msg} · ETA {eta}",
    );
    pb.set_position(done as u64);
    pb.reset_eta();
    let t0 = std::time::Instant::now();
    let s = plan.run(&mut engine, stop, |p| match p {
        Progress::Skipped { id, index, why } => {
            say(&pb, format!("skipping sample {id} ({index}): {why}"));
        }
        Progress::Batch { done, tokens, .. } => {
            pb.set_position(done as u64);
            let rate = tokens as f64 / t0.elapsed().as_secs_f64();
            pb.set_message(format!("{rate:.1} tokens/s"));
        }
    })?;
    pb.finish_and_clear();
    if !root {
        if s.stopped {
            spatial_ssrl::dist::finish();
            std::process::exit(130);
        }
        return Ok(());
    }
    if s.stopped {
        spatial_ssrl::dist::finish();
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
