//! Pretext task engine: turns photos and RGB-D frames into verifiable QA samples.
//!
//! Work is split into shards of consecutive sources. Every sample draws from its own random
//! stream keyed by `(seed, source index, task, k)`, shards are assembled in source order, and
//! each shard file is committed with an atomic rename after its images: the output is
//! byte-identical for any thread count, and `--resume` skips committed shards and redoes
//! only the one that was interrupted.

pub mod crop;
pub mod depth_order;
pub mod draw;
pub mod flip;
pub mod imgops;
pub mod npy;
pub mod position;
pub mod shuffle;
pub mod source;
pub mod templates;
pub mod window;
use crate::data::records as write;

use crate::rng::Rng;
use image::RgbImage;
use rayon::prelude::*;
use serde::{Deserialize, Serialize};
use source::{Source, SourceError};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Instant;
pub use write::{Format, SampleRecord};

/// The five pretext tasks.
#[derive(
    Debug,
    Clone,
    Copy,
    PartialEq,
    Eq,
    Hash,
    PartialOrd,
    Ord,
    Serialize,
    Deserialize,
    clap::ValueEnum,
)]
#[serde(rename_all = "snake_case")]
pub enum TaskKind {
    /// Shuffled patch reordering (RGB).
    Shuffle,
    /// Flipped patch recognition (RGB).
    Flip,
    /// Cropped patch inpainting (RGB).
    Crop,
    /// Regional depth ordering (RGB-D).
    Depth,
    /// Relative 3D position (RGB-D).
    Position,
}

impl TaskKind {
    pub const ALL: [TaskKind; 5] = [
        TaskKind::Shuffle,
        TaskKind::Flip,
        TaskKind::Crop,
        TaskKind::Depth,
        TaskKind::Position,
    ];

    pub fn name(self) -> &'static str {
        match self {
            TaskKind::Shuffle => "shuffle",
            TaskKind::Flip => "flip",
            TaskKind::Crop => "crop",
            TaskKind::Depth => "depth",
            TaskKind::Position => "position",
        }
    }

    pub fn needs_depth(self) -> bool {
        matches!(self, TaskKind::Depth | TaskKind::Position)
    }
}

/// Why a sample was not produced.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SkipReason {
    /// The file could not be read.
    Io,
    /// Corrupt, truncated or not an image / depth file.
    Decode,
    /// More pixels than a source may have (`source::MAX_PIXELS`), refused before decoding.
    TooLarge,
    /// Too small for the task's grid or crop.
    TooSmall,
    /// Depth and colour sizes differ.
    DepthSizeMismatch,
    /// No valid depth (all invalid, NaN or inf).
    InvalidDepth,
    /// No region satisfies the depth-ordering rules.
    NoRegion,
    /// No pair of regions satisfies the relative-position rules.
    NoPair,
    /// The options (or the flip) would not be visually distinct.
    IndistinctOptions,
    /// `--position-geometry metric` needs intrinsics and metric depth.
    NoIntrinsics,
}

impl SkipReason {
    /// The name in `summary.json` and the run's table.
    pub fn name(self) -> &'static str {
        match self {
            SkipReason::Io => "io",
            SkipReason::Decode => "decode",
            SkipReason::TooLarge => "too_large",
            SkipReason::TooSmall => "too_small",
            SkipReason::DepthSizeMismatch => "depth_size_mismatch",
            SkipReason::InvalidDepth => "invalid_depth",
            SkipReason::NoRegion => "no_region",
            SkipReason::NoPair => "no_pair",
            SkipReason::IndistinctOptions => "indistinct_options",
            SkipReason::NoIntrinsics => "no_intrinsics",
        }
    }

    /// What it means, in a few words.
    pub fn meaning(self) -> &'static str {
        match self {
            SkipReason::Io => "the file could not be read",
            SkipReason::Decode => "corrupt, truncated or not an image / depth file",
            SkipReason::TooLarge => "over 268 M pixels (16,384²), not decoded",
            SkipReason::TooSmall => "too small for the task's grid or crop; see --max-side",
            SkipReason::DepthSizeMismatch => "depth and colour sizes differ",
            SkipReason::InvalidDepth => "no valid depth",
            SkipReason::NoRegion => "no region satisfies the depth-ordering rules",
            SkipReason::NoPair => "no pair of regions satisfies the relative-position rules",
            SkipReason::IndistinctOptions => "the options would not be visually distinct",
            SkipReason::NoIntrinsics => {
                "--position-geometry metric needs intrinsics and metric depth"
            }
        }
    }
}

/// What a task generator returns: text, answer, images in `<image>` order, and meta.
#[derive(Debug, Clone)]
pub struct Generated {
    pub problem: String,
    pub answer: String,
    pub images: Vec<RgbImage>,
    pub meta: serde_json::Value,
}

/// Everything `ssrl tasks` is asked to do.
#[derive(Debug, Clone)]
pub struct TasksConfig {
    /// Photo folders (searched recursively).
    pub images: Vec<PathBuf>,
    /// RGB-D folders (layout detected per sub-folder).
    pub rgbd: Vec<PathBuf>,
    pub out: PathBuf,
    pub tasks: Vec<TaskKind>,
    pub per_image: usize,
    pub seed: u64,
    /// Worker threads; 0 uses every core.
    pub threads: usize,
    pub format: Format,
    pub resume: bool,
    /// Longer side limit for sources (0 keeps native size).
    pub max_side: u32,
    pub position_geometry: position::Geometry,
    /// Fix the shuffle variant instead of the paper's mix.
    pub shuffle_variant: Option<shuffle::Variant>,
    pub jpeg_quality: u8,
    /// Sources per output shard.
    pub shard_sources: usize,
}

impl Default for TasksConfig {
    fn default() -> Self {
        TasksConfig {
            images: Vec::new(),
            rgbd: Vec::new(),
            out: PathBuf::from("tasks-out"),
            tasks: TaskKind::ALL.to_vec(),
            per_image: 1,
            seed: 0,
            threads: 0,
            format: Format::Parquet,
            resume: false,
            max_side: 1600,
            position_geometry: position::Geometry::Sign,
            shuffle_variant: None,
            jpeg_quality: 95,
            shard_sources: 64,
        }
    }
}

/// Counts for one task.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct TaskStats {
    pub produced: u64,
    pub skipped: BTreeMap<SkipReason, u64>,
}

/// The run's outcome, also written as `summary.json`.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Summary {
    pub tasks: BTreeMap<TaskKind, TaskStats>,
    pub sources: u64,
    pub shards: usize,
    pub resumed_shards: usize,
    pub produced: u64,
    pub elapsed_s: f64,
    /// Samples produced by this invocation per second (resumed shards excluded).
    pub samples_per_s: f64,
    /// The JPEG encoder that wrote the images ([`JPEG_CODEC`]), which the speed depends on.
    #[serde(default)]
    pub jpeg_codec: String,
    pub data_files: Vec<String>,
    /// Stopped (Ctrl-C) before every shard was written; `--resume` continues.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub stopped: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum TasksError {
    #[error("no input: pass --images DIR and/or --rgbd DIR")]
    NoInput,
    /// The cause is in the message, not an error source as well (see `WriteError`).
    #[error("{path}: cannot read input: {err}")]
    Input { path: PathBuf, err: std::io::Error },
    #[error("{0}: holds an earlier run (run.json); pass --resume to continue it, or choose an empty folder")]
    AlreadyExists(PathBuf),
    #[error("{0}: is in the output folder, which holds no run.json: not a run this command can continue or overwrite; choose an empty or new folder")]
    NotARun(PathBuf),
    #[error("{path}: --resume with different settings than the run being resumed ({what}); use the original settings or a new folder")]
    ResumeMismatch { path: PathBuf, what: String },
    #[error(transparent)]
    Write(#[from] write::WriteError),
    #[error("nothing was produced: {0}")]
    NothingProduced(String),
    #[error("thread pool: {0}")]
    ThreadPool(String),
}

/// Progress reporting hooks (the CLI draws a bar; tests stay silent).
pub trait Progress: Sync {
    fn start(&self, _total_sources: u64, _done_sources: u64) {}
    fn source_done(&self, _samples: u64) {}
    fn warn(&self, _message: &str) {}
}

/// A `Progress` that reports nothing.
pub struct Silent;
impl Progress for Silent {}

/// The settings that define a run's output (not the thread count), and its inputs.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct RunFingerprint {
    version: u32,
    tasks: Vec<TaskKind>,
    per_image: usize,
    seed: u64,
    format: Format,
    max_side: u32,
    position_geometry: position::Geometry,
    shuffle_variant: Option<String>,
    jpeg_quality: u8,
    /// Runs written before the codec was recorded used jpeg-encoder.
    #[serde(default = "legacy_codec")]
    jpeg_codec: String,
    shard_sources: usize,
    sources: Vec<Vec<String>>,
}

fn legacy_codec() -> String {
    "jpeg-encoder".into()
}

fn display(p: &Path) -> String {
    p.to_string_lossy().replace('\\', "/")
}

/// Finds every source under the configured folders, images first, each list sorted.
pub fn discover(cfg: &TasksConfig, progress: &dyn Progress) -> Result<Vec<Source>, TasksError> {
    if cfg.images.is_empty() && cfg.rgbd.is_empty() {
        return Err(TasksError::NoInput);
    }
    let mut sources = Vec::new();
    let wants_rgb = cfg.tasks.iter().any(|t| !t.needs_depth());
    let wants_depth = cfg.tasks.iter().any(|t| t.needs_depth());
    // The output folder may sit inside an input (`--images inp --out inp/out`): it is never
    // read as input. Each file counts once however many inputs reach it.
    let skip = [cfg.out.clone()];
    let mut walk = source::Walk::new(&skip);
    for dir in &cfg.images {
        let list = source::discover_images_in(dir, &mut walk).map_err(|e| TasksError::Input {
            path: dir.clone(),
            err: e,
        })?;
        if list.is_empty() {
            progress.warn(&match dir.is_file() {
                true => format!("{}: given twice, counted once", dir.display()),
                false => format!(
                    "{}: no jpg/png/webp images found (none not listed already)",
                    dir.display()
                ),
            });
        }
        if wants_rgb {
            sources.extend(list.into_iter().map(|path| Source::Rgb { path }));
        }
    }
    // RGB-D inputs have a walk of their own: the same photo may be both a photo source and
    // an RGB-D frame's colour.
    let mut rgbd_walk = source::Walk::new(&skip);
    for dir in &cfg.rgbd {
        let found =
            source::discover_rgbd_in(dir, &mut rgbd_walk).map_err(|e| TasksError::Input {
                path: dir.clone(),
                err: e,
            })?;
        for w in &found.warnings {
            progress.warn(w);
        }
        if found.frames.is_empty() {
            progress.warn(&format!(
                "{}: no RGB-D frames found in any supported layout",
                dir.display()
            ));
        }
        if wants_depth {
            sources.extend(found.frames.into_iter().map(Source::Rgbd));
        }
    }
    for note in walk.notes.iter().chain(&rgbd_walk.notes) {
        progress.warn(note);
    }
    Ok(sources)
}

/// The JPEG encoder this build writes with, recorded in run.json: the bytes of a run depend on it
/// (the pixels do not), so a run resumes only under a build with the same one.
pub const JPEG_CODEC: &str = if cfg!(feature = "fast-jpeg") {
    "libjpeg-turbo"
} else {
    "jpeg-encoder"
};

/// Baseline JPEG with 4:2:0 chroma and the standard tables (libjpeg's and OpenCV's `imwrite`
/// defaults). With the `fast-jpeg` feature this is libjpeg-turbo's encoder with its SIMD paths
/// (mozjpeg's build of it, in its fastest, libjpeg-compatible profile), whose integer DCT gives
/// the same bytes with or without SIMD; otherwise the scalar pure-Rust `jpeg-encoder`. Either way
/// the bytes are the same on every CPU.
pub fn encode_jpeg(img: &RgbImage, quality: u8) -> Vec<u8> {
    #[cfg(feature = "fast-jpeg")]
    {
        let mut c = mozjpeg::Compress::new(mozjpeg::ColorSpace::JCS_RGB);
        c.set_fastest_defaults();
        c.set_size(img.width() as usize, img.height() as usize);
        c.set_quality(f32::from(quality));
        c.set_chroma_sampling_pixel_sizes((2, 2), (2, 2));
        let buf = Vec::with_capacity(img.as_raw().len() / 8);
        let mut s = c
            .start_compress(buf)
            .expect("JPEG encoding into memory does not fail");
        s.write_scanlines(img.as_raw())
            .expect("JPEG encoding into memory does not fail");
        s.finish().expect("JPEG encoding into memory does not fail")
    }
    #[cfg(not(feature = "fast-jpeg"))]
    {
        let mut buf = Vec::with_capacity(img.as_raw().len() / 8);
        let mut enc = jpeg_encoder::Encoder::new(&mut buf, quality);
        enc.set_sampling_factor(jpeg_encoder::SamplingFactor::R_4_2_0);
        // Dimensions are bounded by --max-side and the sources' u16-sized JPEG/PNG limits.
        enc.encode(
            img.as_raw(),
            img.width() as u16,
            img.height() as u16,
            jpeg_encoder::ColorType::Rgb,
        )
        .expect("JPEG encoding into memory does not fail");
        buf
    }
}

struct SourceOutput {
    samples: Vec<SampleRecord>,
    stats: BTreeMap<TaskKind, TaskStats>,
    warnings: Vec<String>,
}

enum Input {
    Rgb(RgbImage),
    Rgbd(source::RgbdFrame),
}

/// What the samples of one source and task share (computed once, on the first sample).
#[derive(Default)]
struct Shared {
    depth: depth_order::Shared,
    position: position::Shared,
}

fn generate_one(
    task: TaskKind,
    input: &Input,
    shared: &Shared,
    rng: &mut Rng,
    cfg: &TasksConfig,
) -> Result<Generated, SkipReason> {
    match (task, input) {
        (TaskKind::Shuffle, Input::Rgb(img)) => {
            let v = cfg
                .shuffle_variant
                .unwrap_or_else(|| shuffle::Variant::sample(rng));
            shuffle::generate(img, rng, v)
        }
        (TaskKind::Flip, Input::Rgb(img)) => flip::generate(img, rng),
        (TaskKind::Crop, Input::Rgb(img)) => crop::generate(img, rng),
        (TaskKind::Depth, Input::Rgbd(f)) => depth_order::generate_shared(f, &shared.depth, rng),
        (TaskKind::Position, Input::Rgbd(f)) => {
            position::generate_shared(f, &shared.position, rng, cfg.position_geometry)
        }
        _ => unreachable!("tasks are routed by source kind"),
    }
}

/// Produces all samples of one source and writes their images.
fn process_source(
    gi: usize,
    src: &Source,
    cfg: &TasksConfig,
) -> Result<SourceOutput, write::WriteError> {
    let tasks: Vec<TaskKind> = cfg
        .tasks
        .iter()
        .copied()
        .filter(|t| t.needs_depth() == matches!(src, Source::Rgbd(_)))
        .collect();
    let mut out = SourceOutput {
        samples: Vec::new(),
        stats: BTreeMap::new(),
        warnings: Vec::new(),
    };
    let loaded: Result<Input, SourceError> = match src {
        Source::Rgb { path } => crate::data::images::load_rgb(path)
            .map(|img| Input::Rgb(source::limit_side(img, cfg.max_side).0))
            .map_err(SourceError::from),
        Source::Rgbd(s) => source::load_rgbd(s, cfg.max_side).map(Input::Rgbd),
    };
    let input = match loaded {
        Ok(i) => i,
        Err(e) => {
            for t in &tasks {
                *out.stats
                    .entry(*t)
                    .or_default()
                    .skipped
                    .entry(e.reason)
                    .or_default() += cfg.per_image as u64;
            }
            out.warnings.push(format!("skipped {e}"));
            return Ok(out);
        }
    };
    let source_names: Vec<String> = src.files().iter().map(|p| display(p)).collect();
    for &task in &tasks {
        let stats = out.stats.entry(task).or_default();
        let shared = Shared::default();
        for k in 0..cfg.per_image {
            let mut rng = Rng::keyed(cfg.seed, &[gi as u64, task as u64, k as u64]);
            match generate_one(task, &input, &shared, &mut rng, cfg) {
                Ok(g) => {
                    let id = format!("{}-{gi:06}-{k}", task.name());
                    let mut images = Vec::with_capacity(g.images.len());
                    for (i, img) in g.images.iter().enumerate() {
                        let rel = if g.images.len() == 1 {
                            format!("images/{}/{id}.jpg", task.name())
                        } else {
                            format!("images/{}/{id}_{i}.jpg", task.name())
                        };
                        // (in place: the shard file, renamed into place after its images,
                        // is what commits them)
                        write::write_plain(
                            &cfg.out.join(&rel),
                            &encode_jpeg(img, cfg.jpeg_quality),
                        )?;
                        images.push(write::ImageRef::File(rel));
                    }
                    out.samples.push(SampleRecord {
                        id,
                        task: task.name().into(),
                        problem: g.problem,
                        answer: g.answer,
                        images,
                        source: source_names.clone(),
                        meta: g.meta,
                    });
                    stats.produced += 1;
                }
                Err(reason) => {
                    *stats.skipped.entry(reason).or_default() += 1;
                    if k == 0 {
                        out.warnings.push(format!(
                            "{}: {} sample skipped ({})",
                            source_names[0],
                            task.name(),
                            serde_json::to_value(reason)
                                .ok()
                                .and_then(|v| v.as_str().map(String::from))
                                .unwrap_or_default()
                        ));
                    }
                }
            }
        }
    }
    Ok(out)
}

/// Deletes the `.NAME.tmpPID` files an interrupted run leaves behind (never a committed file).
fn remove_stale_temp_files(out: &Path) {
    let mut stack = vec![out.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&d) else {
            continue;
        };
        for e in entries.flatten() {
            let p = e.path();
            let name = e.file_name().to_string_lossy().to_string();
            if p.is_dir() {
                stack.push(p);
            } else if name.starts_with('.') && name.contains(".tmp") {
                let _ = std::fs::remove_file(p);
            }
        }
    }
}

#[derive(Serialize, Deserialize)]
struct ShardState {
    sources: usize,
    samples: usize,
    stats: BTreeMap<TaskKind, TaskStats>,
}

fn merge(into: &mut BTreeMap<TaskKind, TaskStats>, from: &BTreeMap<TaskKind, TaskStats>) {
    for (t, s) in from {
        let e = into.entry(*t).or_default();
        e.produced += s.produced;
        for (r, n) in &s.skipped {
            *e.skipped.entry(*r).or_default() += n;
        }
    }
}

/// Runs the task engine: discovery, generation on `threads` workers, sharded atomic output,
/// resume, and `summary.json`.
/// Why no source serves the selected tasks: which inputs each kind of task takes, and whether
/// they were given.
fn no_sources(cfg: &TasksConfig) -> String {
    let names = |depth: bool| -> String {
        let n: Vec<&str> = (cfg.tasks.iter())
            .filter(|t| t.needs_depth() == depth)
            .map(|t| t.name())
            .collect();
        n.join(", ")
    };
    let state = |given: bool| if given { "none found" } else { "none given" };
    let mut why = Vec::new();
    let (rgb, depth) = (names(false), names(true));
    if !rgb.is_empty() {
        why.push(format!(
            "{rgb} take photos (--images: {})",
            state(!cfg.images.is_empty())
        ));
    }
    if !depth.is_empty() {
        why.push(format!(
            "{depth} take RGB-D frames (--rgbd: {})",
            state(!cfg.rgbd.is_empty())
        ));
    }
    format!("no usable sources: {}", why.join("; "))
}

/// Keeps the frames' buffers (megabytes each: decoded images, depth maps, window statistics)
/// in the process's heap when they are freed, so the next sample reuses them: by default glibc
/// hands each back to the kernel and maps fresh pages for the next, which the kernel zeroes —
/// about a fifth of a depth sample's time went to that (29.8 against 23.5–26.4 samples/s on the
/// official DIODE frame, one thread). Process-wide; task generation holds little else.
fn keep_freed_buffers() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only sets allocator parameters; 32 MiB is glibc's largest mmap threshold.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 32 << 20);
        libc::mallopt(libc::M_TRIM_THRESHOLD, 256 << 20);
    }
}

pub fn run(cfg: &TasksConfig, progress: &dyn Progress) -> Result<Summary, TasksError> {
    run_until(cfg, progress, &std::sync::atomic::AtomicBool::new(false))
}

/// [`run`], stopping after the shard in progress once `stop` is set (Ctrl-C): the shards
/// written so far are kept, `Summary::stopped` says so, and `--resume` continues.
pub fn run_until(
    cfg: &TasksConfig,
    progress: &dyn Progress,
    stop: &std::sync::atomic::AtomicBool,
) -> Result<Summary, TasksError> {
    let t0 = Instant::now();
    keep_freed_buffers();
    let sources = discover(cfg, progress)?;
    if sources.is_empty() {
        // Nothing is written: a corrected command can use the same folder.
        return Err(TasksError::NothingProduced(no_sources(cfg)));
    }
    let fp = RunFingerprint {
        version: 1,
        tasks: cfg.tasks.clone(),
        per_image: cfg.per_image,
        seed: cfg.seed,
        format: cfg.format,
        max_side: cfg.max_side,
        position_geometry: cfg.position_geometry,
        shuffle_variant: cfg.shuffle_variant.map(|v| v.name()),
        jpeg_quality: cfg.jpeg_quality,
        jpeg_codec: JPEG_CODEC.into(),
        shard_sources: cfg.shard_sources.max(1),
        sources: sources
            .iter()
            .map(|s| s.files().iter().map(|p| display(p)).collect())
            .collect(),
    };
    let run_json = cfg.out.join("run.json");
    let fresh = !run_json.exists();
    let out_existed = cfg.out.exists();
    if fresh {
        // Files of this layout without a run.json (another tool's, or a run whose run.json
        // was removed) would be overwritten where names meet and mixed in where they do not.
        if let Some(d) = ["data", "images", "state"]
            .iter()
            .find(|d| cfg.out.join(d).exists())
        {
            return Err(TasksError::NotARun(cfg.out.join(d)));
        }
    }
    if !fresh {
        if !cfg.resume {
            return Err(TasksError::AlreadyExists(cfg.out.clone()));
        }
        let text = std::fs::read_to_string(&run_json).map_err(write::io(&run_json))?;
        let old: RunFingerprint =
            serde_json::from_str(&text).map_err(|e| TasksError::ResumeMismatch {
                path: run_json.clone(),
                what: format!("unreadable run.json: {e}"),
            })?;
        if old != fp {
            let a = serde_json::to_value(&old).unwrap_or_default();
            let b = serde_json::to_value(&fp).unwrap_or_default();
            let diff: Vec<String> = a
                .as_object()
                .into_iter()
                .flatten()
                .filter(|(k, v)| b.get(k.as_str()) != Some(v))
                .map(|(k, _)| match k.as_str() {
                    "jpeg_codec" => format!(
                        "jpeg_codec: the run was written by {}, this build writes with {JPEG_CODEC}; \
                         resume it with a build {} the fast-jpeg feature",
                        old.jpeg_codec,
                        if JPEG_CODEC == "libjpeg-turbo" { "without" } else { "with" }
                    ),
                    _ => k.clone(),
                })
                .collect();
            return Err(TasksError::ResumeMismatch {
                path: run_json,
                what: diff.join(", "),
            });
        }
    } else {
        write::write_atomic(
            &run_json,
            &serde_json::to_vec_pretty(&fp).expect("serialises"),
            true,
        )?;
    }

    if cfg.resume {
        remove_stale_temp_files(&cfg.out);
    }
    let per_shard = cfg.shard_sources.max(1);
    let shards: Vec<&[Source]> = sources.chunks(per_shard).collect();
    let data_name = |s: usize| format!("data/part-{s:05}.{}", cfg.format.ext());
    let state_path = |s: usize| cfg.out.join(format!("state/part-{s:05}.json"));
    let mut summary = Summary {
        sources: sources.len() as u64,
        shards: shards.len(),
        jpeg_codec: JPEG_CODEC.into(),
        ..Default::default()
    };
    let mut done = vec![false; shards.len()];
    let mut done_sources = 0u64;
    for (s, shard) in shards.iter().enumerate() {
        let data = cfg.out.join(data_name(s));
        let state = std::fs::read(state_path(s))
            .ok()
            .and_then(|b| serde_json::from_slice::<ShardState>(&b).ok());
        if let (true, Some(st)) = (data.is_file(), state) {
            merge(&mut summary.tasks, &st.stats);
            done[s] = true;
            done_sources += shard.len() as u64;
            summary.resumed_shards += 1;
        }
    }
    progress.start(sources.len() as u64, done_sources);

    let mut builder = rayon::ThreadPoolBuilder::new();
    if cfg.threads > 0 {
        // More threads than a shard has sources would only wait (the output does not depend
        // on the count).
        builder = builder.num_threads(cfg.threads.min(per_shard).min(sources.len()));
    }
    let pool = builder
        .build()
        .map_err(|e| TasksError::ThreadPool(e.to_string()))?;
    let mut new_samples = 0u64;
    for (s, shard) in shards.iter().enumerate() {
        summary.data_files.push(data_name(s));
        if done[s] {
            continue;
        }
        if stop.load(std::sync::atomic::Ordering::SeqCst) {
            summary.stopped = true;
            break;
        }
        let base = s * per_shard;
        let results: Vec<Result<SourceOutput, write::WriteError>> = pool.install(|| {
            shard
                .par_iter()
                .enumerate()
                .map(|(i, src)| {
                    let r = process_source(base + i, src, cfg);
                    if let Ok(o) = &r {
                        for w in &o.warnings {
                            progress.warn(w);
                        }
                        progress.source_done(o.samples.len() as u64);
                    }
                    r
                })
                .collect()
        });
        let mut samples = Vec::new();
        let mut stats = BTreeMap::new();
        for r in results {
            let o = r?;
            merge(&mut stats, &o.stats);
            samples.extend(o.samples);
        }
        new_samples += samples.len() as u64;
        let state = ShardState {
            sources: shard.len(),
            samples: samples.len(),
            stats: stats.clone(),
        };
        write::write_atomic(
            &state_path(s),
            &serde_json::to_vec_pretty(&state).expect("serialises"),
            true,
        )?;
        let data = cfg.out.join(data_name(s));
        let bytes = match cfg.format {
            Format::Jsonl => write::jsonl_bytes(&samples),
            Format::Parquet => write::parquet_bytes(&samples, &data)?,
        };
        write::write_atomic(&data, &bytes, true)?;
        merge(&mut summary.tasks, &stats);
    }
    summary.produced = summary.tasks.values().map(|t| t.produced).sum();
    summary.elapsed_s = t0.elapsed().as_secs_f64();
    summary.samples_per_s = new_samples as f64 / summary.elapsed_s.max(1e-9);
    if summary.stopped {
        // No summary.json until the run is complete: the shards and their states are the record.
        return Ok(summary);
    }
    let mut on_disk = summary.clone();
    on_disk.elapsed_s = (on_disk.elapsed_s * 1000.0).round() / 1000.0;
    write::write_atomic(
        &cfg.out.join("summary.json"),
        &serde_json::to_vec_pretty(&on_disk).expect("serialises"),
        true,
    )?;
    if summary.produced == 0 {
        let reasons: Vec<String> = summary
            .tasks
            .iter()
            .flat_map(|(t, s)| {
                s.skipped.iter().map(move |(r, n)| {
                    format!("{}: {n} × {} ({})", t.name(), r.name(), r.meaning())
                })
            })
            .collect();
        if fresh {
            // A run that made nothing leaves no run behind to be resumed or refused.
            for f in ["run.json", "summary.json"] {
                let _ = std::fs::remove_file(cfg.out.join(f));
            }
            for d in ["state", "data"] {
                let _ = std::fs::remove_dir_all(cfg.out.join(d));
            }
            if !out_existed {
                let _ = std::fs::remove_dir(&cfg.out);
            }
        }
        return Err(TasksError::NothingProduced(reasons.join(", ")));
    }
    Ok(summary)
}

#[cfg(test)]
mod tests {
    use super::SkipReason::{self, *};
    use std::path::Path;

    fn root() -> &'static Path {
        Path::new(env!("CARGO_MANIFEST_DIR"))
    }

    /// A frame's samples drawn with what they share kept from the first are the samples drawn
    /// afresh: depth and position (both rules, both geometries where the frame allows) on the
    /// official and the repo's RGB-D frames.
    #[test]
    fn shared_frame_work_gives_the_fresh_samples() {
        use super::{depth_order, position, source};
        use crate::rng::Rng;
        let same = |a: &super::Generated, b: &super::Generated| {
            a.problem == b.problem
                && a.answer == b.answer
                && a.meta == b.meta
                && a.images
                    .iter()
                    .map(|i| i.as_raw())
                    .eq(b.images.iter().map(|i| i.as_raw()))
        };
        type Drawn = Result<super::Generated, SkipReason>;
        let agree = |a: &Drawn, b: &Drawn| match (a, b) {
            (Ok(a), Ok(b)) => same(a, b),
            (Err(x), Err(y)) => x == y,
            _ => false,
        };
        let mut frames = 0;
        for dir in ["fixtures/official", "fixtures/rgbd"] {
            for found in source::discover_rgbd(&root().join(dir)).unwrap().frames {
                let f = source::load_rgbd(&found, 0).unwrap();
                let (depth, pos) = (depth_order::Shared::default(), position::Shared::default());
                for k in 0..6u64 {
                    let rng = || Rng::keyed(k, &[7]);
                    let (a, b) = (
                        depth_order::generate(&f, &mut rng()),
                        depth_order::generate_shared(&f, &depth, &mut rng()),
                    );
                    assert!(agree(&a, &b), "{}", found.color.display());
                    let geometry = match k % 2 {
                        0 => position::Geometry::Sign,
                        _ => position::Geometry::Metric,
                    };
                    let (a, b) = (
                        position::generate(&f, &mut rng(), geometry),
                        position::generate_shared(&f, &pos, &mut rng(), geometry),
                    );
                    assert!(agree(&a, &b), "{}", found.color.display());
                }
                frames += 1;
            }
        }
        assert!(frames >= 6, "{frames}");
    }

    /// Whichever encoder the build has, the JPEG decodes to the picture (quality 95, 4:2:0).
    #[test]
    fn written_jpeg_decodes_to_the_picture() {
        for f in ["chelsea.png", "coffee.png", "astronaut.png"] {
            let img =
                crate::data::images::load_rgb(&root().join("fixtures/photos").join(f)).unwrap();
            let jpeg = super::encode_jpeg(&img, 95);
            assert_eq!(&jpeg[..2], &[0xFF, 0xD8], "{f}: a JPEG");
            let back = image::load_from_memory(&jpeg).unwrap().to_rgb8();
            assert_eq!(back.dimensions(), img.dimensions(), "{f}");
            let mad = super::imgops::mean_abs_diff(&back, &img);
            assert!(
                mad < 3.5,
                "{f}: mean |Δ| {mad} after a quality-95 round trip"
            );
            // Quality is honoured: 50 gives a smaller file.
            assert!(
                super::encode_jpeg(&img, 50).len() < jpeg.len() * 2 / 3,
                "{f}"
            );
        }
    }

    /// With libjpeg-turbo the bytes are OpenCV's `imwrite` bytes for the same pixels, so a run's
    /// images are what the official scripts would write.
    #[cfg(feature = "fast-jpeg")]
    #[test]
    fn libjpeg_turbo_writes_opencvs_bytes() {
        let img =
            crate::data::images::load_rgb(&root().join("fixtures/photos/chelsea.png")).unwrap();
        let golden = std::fs::read(root().join("tests/fixtures/opencv/chelsea-q95.jpg")).unwrap();
        assert_eq!(super::encode_jpeg(&img, 95), golden);
        assert_eq!(super::JPEG_CODEC, "libjpeg-turbo");
    }

    /// The names the table and the errors print are `summary.json`'s.
    #[test]
    fn skip_reason_names_are_the_summary_names() {
        let all: [SkipReason; 10] = [
            Io,
            Decode,
            TooLarge,
            TooSmall,
            DepthSizeMismatch,
            InvalidDepth,
            NoRegion,
            NoPair,
            IndistinctOptions,
            NoIntrinsics,
        ];
        for r in all {
            assert_eq!(serde_json::to_value(r).unwrap(), r.name());
            assert!(!r.meaning().is_empty());
        }
    }
}
