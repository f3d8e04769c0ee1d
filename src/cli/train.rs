//! `ssrl train`, `ssrl sft` and `ssrl plot`: the runs' settings files, their progress tables,
//! Ctrl-C and resume, and their curves.

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

#[derive(clap::Args)]
pub struct PlotArgs {
    /// Run folder (holds metrics.jsonl).
    #[arg(value_name = "RUN")]
    pub(crate) run: PathBuf,
    /// Output PNG (default: RUN/curves.png).
    #[arg(long, value_name = "FILE")]
    pub(crate) out: Option<PathBuf>,
    /// Metrics to draw, comma-separated (default: those of the run among SFT loss, token
    /// accuracy, lr and grad norm, GRPO rewards, KL, entropy, grad norm, lengths).
    #[arg(long, value_delimiter = ',')]
    pub(crate) keys: Vec<String>,
}

/// Draws `rows` (the run's metrics) to `out`; false when none of `keys` has a value.
pub(crate) fn write_plot(
    run: &Path,
    rows: &[spatial_ssrl::train::Metrics],
    out: &Path,
    keys: &[String],
) -> Result<bool> {
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
    let rows = spatial_ssrl::train::read_metrics(&a.run.join("metrics.jsonl"))?;
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
pub(crate) fn run_bar(
    world: &World,
    total: usize,
    step: usize,
) -> Result<(&'static AtomicBool, ProgressBar)> {
    let stop = stop_on_ctrl_c(
        "finishing this step, then saving a checkpoint",
        "exiting without a checkpoint",
    )?;
    stop_on_usr1();
    let pb = match world.is_root() {
        true => ProgressBar::new(total as u64),
        false => ProgressBar::hidden(),
    };
    let pb = styled(pb, "{bar:30} step {pos}/{len} · {msg} · ETA {eta}");
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

/// The checkpoint a `--resume` continues from (rank 0's choice, for every rank), or why there
/// is none.
pub(crate) fn newest_checkpoint(
    world: &World,
    latest: Option<PathBuf>,
    out: &Path,
) -> Result<PathBuf> {
    let latest = root_decides(world, || {
        latest.with_context(|| {
            format!(
                "{}: no checkpoint to resume from (none was saved yet)",
                out.join("checkpoints").display()
            )
        })
    })?;
    Ok(latest)
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
    let (world, resume) = start_run(&cfg.out, a.resume)?;
    let mut t = Trainer::new(cfg.clone(), a.ort_lib.as_deref())?;
    let root = world.is_root();
    for note in [t.precision_note(), t.vision_note()].into_iter().flatten() {
        if root {
            eprintln!("{note}");
        }
    }
    if t.overlong != (0, 0) && root {
        eprintln!(
            "left out as too long (data.max_prompt_length {}, or no room for \
             data.max_response_length {} in the model's context): {} training and {} validation \
             prompts",
            cfg.data.max_prompt_length, cfg.data.max_response_length, t.overlong.0, t.overlong.1
        );
    }
    if !t.unusable.is_empty() && root {
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
        let dir = newest_checkpoint(world, t.latest_checkpoint(), &cfg.out)?;
        t.restore(&dir)?;
        if root {
            eprintln!("resumed from {} (step {})", dir.display(), t.step());
        }
    }
    let total = t.total_steps();
    if root {
        eprintln!(
            "GRPO: {} prompts × {} samples per step, {} steps; ONNX Runtime on {}, kernels on {}",
            cfg.data.rollout_batch_size,
            cfg.rollout.n,
            total,
            t.provider(),
            t.backend()
        );
    }
    let (stop, pb) = run_bar(world, total, t.step())?;
    let mut header = format!("{:>6}", "step");
    for (_, h) in COLUMNS {
        header += &format!(" {h:>9}");
    }
    if root {
        say(&pb, header);
    }
    let end = t.run(stop, |m, step, left_out| {
        if !root {
            return;
        }
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
    if root {
        draw_curves(&cfg.out)?;
    }
    match end {
        RunEnd::Finished { checkpoint } => {
            if let (Some(c), true) = (checkpoint, root) {
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
    let (world, resume) = start_run(&cfg.out, a.resume)?;
    let mut t = Sft::new(cfg.clone(), a.ort_lib.as_deref())?;
    let root = world.is_root();
    for note in [t.precision_note(), t.vision_note()].into_iter().flatten() {
        if root {
            eprintln!("{note}");
        }
    }
    if resume {
        let dir = newest_checkpoint(world, t.latest_checkpoint(), &cfg.out)?;
        t.restore(&dir)?;
        if root {
            eprintln!("resumed from {} (step {})", dir.display(), t.step());
        }
    }
    let total = t.total_steps();
    if root {
        eprintln!(
            "SFT: {} examples, {} × {} per step{}, {} steps ({} per epoch), lr {} {}",
            t.examples(),
            cfg.per_device_train_batch_size,
            cfg.gradient_accumulation_steps,
            match world.size {
                1 => String::new(),
                n => format!(" × {n} ranks"),
            },
            total,
            t.steps_per_epoch(),
            cfg.learning_rate,
            cfg.lr_scheduler_type.name()
        );
    }
    let (stop, pb) = run_bar(world, total, t.step())?;
    if root {
        say(
            &pb,
            format!(
                "{:>6} {:>9} {:>9} {:>9} {:>9} {:>9}",
                "step", "loss", "tok acc", "lr", "grad", "tok/s"
            ),
        );
    }
    let end = t.run(stop, |m, step, left_out| {
        if !root {
            return;
        }
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
    if root {
        draw_curves(&cfg.out)?;
    }
    match end {
        RunEnd::Finished { checkpoint } => {
            if let (Some(c), true) = (checkpoint, root) {
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
