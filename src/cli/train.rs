//! `ssrl train`, and what the two training commands (`train`, `sft`) share: the run's
//! settings, its folder (resume or start), Ctrl-C and SIGUSR1, the progress table, the ranks of a
//! data-parallel launch, and the curves at the end.

use super::*;

#[derive(clap::Args)]
pub struct RunArgs {
    /// Run settings (TOML); see --print-config for every key and its default.
    #[arg(long, value_name = "FILE", required_unless_present = "print_config")]
    pub(crate) config: Option<PathBuf>,
    /// Continue from the newest checkpoint in the run folder, exactly where it stopped.
    #[arg(long)]
    pub(crate) resume: bool,
    /// Print the effective configuration (the defaults without --config) as TOML and exit.
    #[arg(long)]
    pub(crate) print_config: bool,
    /// Override the run's optimizer steps (train.toml's trainer.max_steps, sft.toml's max_steps).
    #[arg(long)]
    pub(crate) max_steps: Option<usize>,
    /// libonnxruntime.so to load (default: $ORT_DYLIB_PATH, then vendor/ort).
    #[arg(long, value_name = "FILE")]
    pub(crate) ort_lib: Option<PathBuf>,
}

pub(crate) const COLUMNS: [(&str, &str); 8] = [
    ("reward/overall", "reward"),
    ("reward/accuracy", "acc"),
    ("reward/format", "format"),
    ("actor/kl_loss", "kl"),
    ("actor/entropy", "entropy"),
    ("actor/grad_norm", "grad"),
    ("response_length/mean", "len"),
    ("timing_s/step", "s/step"),
];

pub(crate) fn row(m: &spatial_ssrl::train::Metrics, step: usize) -> String {
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
pub(crate) fn resume_or_start(out: &Path, resume: bool) -> Result<bool> {
    let log = out.join("metrics.jsonl");
    let saved = !spatial_ssrl::train::checkpoint::list(&out.join("checkpoints")).is_empty();
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

/// A training run's Ctrl-C flag (finish the step, save, exit; SIGUSR1 too, which launchers
/// forward to every rank) and its step bar, at `step` of `total` (drawn by rank 0 alone).
pub(crate) fn run_bar(total: usize, step: usize) -> Result<(&'static AtomicBool, ProgressBar)> {
    let stop = stop_on_ctrl_c(
        "finishing this step, then saving a checkpoint",
        "exiting without a checkpoint",
    )?;
    stop_on_usr1();
    let pb = styled(
        rank_bar(total as u64),
        "{bar:30} step {pos}/{len} · {msg} · ETA {eta}",
    );
    pb.set_position(step as u64);
    Ok((stop, pb))
}

/// Draws the run folder's metrics.jsonl to its curves.png, and says where.
pub(crate) fn draw_curves(out: &Path) -> Result<()> {
    let plot_path = out.join("curves.png");
    let rows = spatial_ssrl::train::read_metrics(&out.join("metrics.jsonl"))?;
    if write_plot(out, &rows, &plot_path, &[])? {
        eprintln!("curves: {}", plot_path.display());
    }
    Ok(())
}

/// Ends a run that Ctrl-C stopped (exit status 130), saying how to continue it.
pub(crate) fn interrupted(command: &str, a: &RunArgs, checkpoint: &Path) -> ! {
    let default = format!("{command}.toml");
    let world = spatial_ssrl::dist::world();
    spatial_ssrl::dist::finish();
    if !world.is_root() {
        std::process::exit(130);
    }
    eprintln!(
        "interrupted: checkpoint {} — continue with `ssrl {command} --config {} --resume`",
        checkpoint.display(),
        a.config.as_deref().unwrap_or(Path::new(&default)).display()
    );
    std::process::exit(130);
}

/// With `resume`, the run continues from its newest checkpoint (rank 0's choice, for every
/// rank): `restore` loads it and returns the step it reached, which is said; without one the
/// error says there is none.
pub(crate) fn resume_from(
    world: &World,
    resume: bool,
    latest: Option<PathBuf>,
    out: &Path,
    restore: impl FnOnce(&Path) -> Result<usize>,
) -> Result<()> {
    if !resume {
        return Ok(());
    }
    let dir = root_decides(world, || {
        latest.with_context(|| {
            format!(
                "{}: no checkpoint to resume from (none was saved yet)",
                out.join("checkpoints").display()
            )
        })
    })?;
    let step = restore(&dir)?;
    note(format!("resumed from {} (step {step})", dir.display()));
    Ok(())
}

/// A training run's end: its bar cleared, its curves drawn, and `done(checkpoint)` said (rank 0
/// alone); a run Ctrl-C or SIGUSR1 stopped exits as [`interrupted`].
pub(crate) fn end_run(
    command: &str,
    a: &RunArgs,
    out: &Path,
    pb: ProgressBar,
    end: RunEnd,
    done: impl FnOnce(&Path) -> String,
) -> Result<()> {
    pb.finish_and_clear();
    if spatial_ssrl::dist::world().is_root() {
        draw_curves(out)?;
    }
    match end {
        RunEnd::Finished { checkpoint } => {
            if let Some(c) = checkpoint {
                note(done(&c));
            }
            Ok(())
        }
        RunEnd::Interrupted { checkpoint } => interrupted(command, a, &checkpoint),
    }
}

/// What rank 0 computes with `f`, on every rank (its error too).
fn root_decides<T: serde::Serialize + serde::de::DeserializeOwned>(
    world: &World,
    f: impl FnOnce() -> Result<T>,
) -> Result<T> {
    if world.size == 1 {
        return f();
    }
    let r: std::result::Result<T, String> = match world.is_root() {
        true => {
            let r = f().map_err(|e| format!("{e:#}"));
            world.send_from_root(&r);
            r
        }
        false => world.recv_from_root(),
    };
    r.map_err(anyhow::Error::msg)
}

/// Joins the launcher's ranks (a world of one without a launcher) and decides on rank 0
/// whether the run in `out` resumes ([`resume_or_start`]), before any rank writes there.
pub(crate) fn start_run(out: &Path, resume: bool) -> Result<(&'static World, bool)> {
    let world = spatial_ssrl::dist::init()?;
    let resume = root_decides(world, || resume_or_start(out, resume))?;
    world.barrier();
    world.announce("each step's prompts are dealt over them, rank 0 writes the run folder");
    Ok((world, resume))
}

/// The run's settings: `--config`'s file, or the defaults, with `--max-steps` applied; `None`
/// when `--print-config` printed them instead.
pub(crate) fn run_config<C: RunConfig>(a: &RunArgs) -> Result<Option<C>> {
    let mut cfg = match &a.config {
        Some(p) => C::load(p)?,
        None => C::default(),
    };
    if let Some(n) = a.max_steps {
        cfg.set_max_steps(n);
    }
    if a.print_config {
        out!("{}", cfg.to_toml());
        return Ok(None);
    }
    Ok(Some(cfg))
}

pub fn run_train(a: RunArgs) -> Result<()> {
    let Some(cfg) = run_config::<TrainConfig>(&a)? else {
        return Ok(());
    };
    let (world, resume) = start_run(&cfg.out, a.resume)?;
    let mut t = Trainer::new(cfg.clone(), a.ort_lib.as_deref())?;
    [t.precision_note(), t.weights_note(), t.vision_note()]
        .into_iter()
        .flatten()
        .for_each(note);
    if t.overlong != (0, 0) {
        note(format!(
            "left out as too long (data.max_prompt_length {}, or no room for \
             data.max_response_length {} in the model's context): {} training and {} validation \
             prompts",
            cfg.data.max_prompt_length, cfg.data.max_response_length, t.overlong.0, t.overlong.1
        ));
    }
    if !t.unusable.is_empty() {
        let n = t.unusable.len();
        let shown: Vec<&str> = t.unusable.iter().take(3).map(String::as_str).collect();
        note(format!(
            "left out as unusable: {n} prompt{} ({}{})",
            if n == 1 { "" } else { "s" },
            shown.join("; "),
            if n > 3 { "; …" } else { "" }
        ));
    }
    resume_from(world, resume, t.latest_checkpoint(), &cfg.out, |dir| {
        t.restore(dir)?;
        Ok(t.step())
    })?;
    let total = t.total_steps();
    note(format!(
        "GRPO: {} prompts × {} samples per step, {} steps; ONNX Runtime on {}, kernels on {}",
        cfg.data.rollout_batch_size,
        cfg.rollout.n,
        total,
        t.provider(),
        t.backend()
    ));
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
    end_run("train", &a, &cfg.out, pb, end, |c| {
        format!("done: adapter in {}", c.display())
    })
}
