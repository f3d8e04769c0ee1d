//! `ssrl tasks`: the pretext tasks from photos and RGB-D frames, with a progress bar.

use super::*;

#[derive(clap::Args)]
pub(crate) struct TasksArgs {
    /// Photos for shuffle, flip and crop: folders (searched recursively) or files; several
    /// after one flag (`--images shots/*.jpg`) or the flag repeated.
    #[arg(long, value_name = "DIR|FILE", num_args = 1..)]
    pub(crate) images: Vec<PathBuf>,
    /// Folders of RGB-D frames (any supported layout, searched recursively) for depth and
    /// position; several after one flag, or the flag repeated.
    #[arg(long, value_name = "DIR", num_args = 1..)]
    pub(crate) rgbd: Vec<PathBuf>,
    /// Output folder (created; must not hold another run unless --resume).
    #[arg(long, value_name = "DIR")]
    pub(crate) out: PathBuf,
    /// Tasks to generate, comma separated.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "shuffle,flip,crop,depth,position"
    )]
    pub(crate) tasks: Vec<TaskKind>,
    /// Samples per source and task.
    #[arg(long, default_value_t = 1, value_name = "N", value_parser = at_least_one)]
    pub(crate) per_image: usize,
    /// Random seed; the output depends only on the seed, inputs and settings.
    #[arg(long, default_value_t = 0, value_name = "S")]
    pub(crate) seed: u64,
    /// Worker threads (0 = all cores; at most 1024, and no more are started than a shard has
    /// sources).
    #[arg(long, default_value_t = 0, value_name = "N", value_parser = thread_count)]
    pub(crate) threads: usize,
    /// Sample file format.
    #[arg(long, value_enum, default_value_t = Format::Parquet)]
    pub(crate) format: Format,
    /// Continue an interrupted run in the same output folder.
    #[arg(long)]
    pub(crate) resume: bool,
    /// Downscale sources whose longer side exceeds PX (0 = keep native size).
    #[arg(long, default_value_t = 1600, value_name = "PX")]
    pub(crate) max_side: u32,
    /// Relative-position answers: `sign` (the official code: signs of Δcolumn and Δdepth) or
    /// `metric` (the paper's Eq. 7–9 in the camera frame; needs intrinsics and metric depth).
    #[arg(long, value_enum, default_value_t = GeometryArg::Sign)]
    pub(crate) position_geometry: GeometryArg,
    /// Use one shuffle variant instead of the paper's mix: 2x2, 2x2_mask, 1x3, 1x4, 3x1, 4x1.
    #[arg(long, value_name = "V", value_parser = parse_variant)]
    pub(crate) shuffle_variant: Option<Variant>,
    /// JPEG quality of the written images.
    #[arg(long, default_value_t = 95, value_parser = clap::value_parser!(u8).range(1..=100))]
    pub(crate) jpeg_quality: u8,
    /// Sources per output shard (the unit of atomic commit and resume).
    #[arg(long, default_value_t = 64, value_name = "N", value_parser = at_least_one)]
    pub(crate) shard_sources: usize,
    /// No progress bar or warnings, only the summary.
    #[arg(long, short)]
    pub(crate) quiet: bool,
}

#[derive(Clone, Copy, clap::ValueEnum)]
pub(crate) enum GeometryArg {
    Sign,
    Metric,
}

pub(crate) fn parse_variant(s: &str) -> Result<Variant, String> {
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

pub(crate) struct Bar {
    pub(crate) pb: ProgressBar,
    pub(crate) quiet: bool,
    pub(crate) warned: std::sync::atomic::AtomicUsize,
    pub(crate) samples: std::sync::atomic::AtomicU64,
    pub(crate) started: std::time::Instant,
}

pub(crate) const MAX_WARNINGS: usize = 50;

impl spatial_ssrl::tasks::Progress for Bar {
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

pub(crate) fn run_tasks(a: TasksArgs) -> Result<()> {
    let cfg = spatial_ssrl::tasks::TasksConfig {
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
    let pb = styled(
        if a.quiet {
            ProgressBar::hidden()
        } else {
            ProgressBar::new(0)
        },
        "{bar:30} {pos}/{len} sources · {msg} · ETA {eta}",
    );
    pb.set_message("0 samples");
    let bar = Bar {
        pb,
        quiet: a.quiet,
        warned: Default::default(),
        samples: Default::default(),
        started: std::time::Instant::now(),
    };
    let stop = stop_on_ctrl_c(
        "finishing the shard in progress, then stopping",
        "the shard in progress is lost; the shards written are kept (continue with --resume)",
    )?;
    let result = spatial_ssrl::tasks::run_until(&cfg, &bar, stop);
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
