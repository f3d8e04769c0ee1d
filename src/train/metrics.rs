//! A run's metrics: the flat EasyR1-style map of a step, the run folder's `metrics.jsonl`
//! (appended per step, cut back to a checkpoint on resume) and its settings file.

use super::*;

/// Metrics of one step (or one validation), flat keys as EasyR1 logs them.
pub type Metrics = BTreeMap<String, f64>;

pub(super) fn mean(v: impl IntoIterator<Item = f64>) -> f64 {
    let (mut s, mut n) = (0.0, 0usize);
    for x in v {
        s += x;
        n += 1;
    }
    if n == 0 {
        0.0
    } else {
        s / n as f64
    }
}

/// `rows` laid out for the graphs, the per-token tensors narrowed to the completion's columns
/// where the package's graphs take only those.
/// Opens the run folder `out` at `step`: writes its settings (`toml`) as `name` and drops the
/// metric lines of steps after `step`, which the run redoes (from step 0 every line, the
/// validation before training too). Returns the metrics file.
pub(super) fn open_run(
    out: &Path,
    name: &str,
    toml: &str,
    step: usize,
) -> Result<PathBuf, TrainError> {
    std::fs::create_dir_all(out).map_err(io_err(out))?;
    let cfg_path = out.join(name);
    std::fs::write(&cfg_path, toml).map_err(io_err(&cfg_path))?;
    let log = out.join("metrics.jsonl");
    truncate_metrics(&log, (step > 0).then_some(step))?;
    Ok(log)
}

pub(super) fn append_metrics(path: &Path, m: &Metrics) -> Result<(), TrainError> {
    use std::io::Write;
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .map_err(io_err(path))?;
    let line = serde_json::to_string(m).expect("finite metrics serialise");
    writeln!(f, "{line}").map_err(io_err(path))
}

/// Drops metric lines of steps after `step` (work a resume will redo); `None` drops them all.
pub(super) fn truncate_metrics(path: &Path, step: Option<usize>) -> Result<(), TrainError> {
    let Ok(text) = std::fs::read_to_string(path) else {
        return Ok(());
    };
    let kept: Vec<&str> = text
        .lines()
        .filter(|l| {
            serde_json::from_str::<Metrics>(l)
                .ok()
                .and_then(|m| m.get("step").copied())
                .zip(step)
                .is_some_and(|(s, step)| s as usize <= step)
        })
        .collect();
    let tmp = path.with_extension("jsonl.partial");
    let mut body = kept.join("\n");
    if !body.is_empty() {
        body.push('\n');
    }
    std::fs::write(&tmp, body).map_err(io_err(&tmp))?;
    std::fs::rename(&tmp, path).map_err(io_err(path))
}

/// Reads a run's metrics.jsonl.
pub fn read_metrics(path: &Path) -> Result<Vec<Metrics>, TrainError> {
    let text = std::fs::read_to_string(path).map_err(io_err(path))?;
    text.lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
        .map(|(i, l)| {
            serde_json::from_str(l).map_err(|source| TrainError::Metrics {
                path: path.to_path_buf(),
                line: i + 1,
                source,
            })
        })
        .collect()
}

/// One sample of a step as the metrics need it, gathered from every rank: its prompt's place
/// in the step, its task, its scores and advantage, its length and whether it hit the limit.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub(super) struct Sampled {
    pub(super) order: usize,
    pub(super) task: String,
    pub(super) overall: f64,
    pub(super) format: f64,
    pub(super) accuracy: f64,
    pub(super) advantage: f32,
    pub(super) tokens: usize,
    pub(super) clipped: bool,
}

/// The step's rewards (overall and per task), advantages, response lengths and rollout
/// throughput, into `metrics`.
pub(super) fn step_metrics(sampled: &[Sampled], metrics: &mut Metrics) {
    metrics.insert(
        "reward/overall".into(),
        mean(sampled.iter().map(|s| s.overall)),
    );
    metrics.insert(
        "reward/format".into(),
        mean(sampled.iter().map(|s| s.format)),
    );
    metrics.insert(
        "reward/accuracy".into(),
        mean(sampled.iter().map(|s| s.accuracy)),
    );
    let adv64: Vec<f64> = sampled.iter().map(|s| f64::from(s.advantage)).collect();
    metrics.insert("advantage/mean".into(), mean(adv64.iter().copied()));
    metrics.insert(
        "advantage/abs_mean".into(),
        mean(adv64.iter().map(|a| a.abs())),
    );
    metrics.insert(
        "advantage/max".into(),
        adv64.iter().copied().fold(f64::MIN, f64::max),
    );
    metrics.insert(
        "advantage/min".into(),
        adv64.iter().copied().fold(f64::MAX, f64::min),
    );
    let lens: Vec<f64> = sampled.iter().map(|s| s.tokens as f64).collect();
    metrics.insert("response_length/mean".into(), mean(lens.iter().copied()));
    metrics.insert(
        "response_length/max".into(),
        lens.iter().copied().fold(0.0, f64::max),
    );
    metrics.insert(
        "response_length/clip_ratio".into(),
        mean(sampled.iter().map(|s| f64::from(u8::from(s.clipped)))),
    );
    let by_task: std::collections::BTreeSet<&str> =
        sampled.iter().map(|s| s.task.as_str()).collect();
    for task in by_task {
        let sel: Vec<&Sampled> = sampled.iter().filter(|s| s.task == task).collect();
        metrics.insert(
            format!("reward/overall/{task}"),
            mean(sel.iter().map(|s| s.overall)),
        );
        metrics.insert(
            format!("reward/accuracy/{task}"),
            mean(sel.iter().map(|s| s.accuracy)),
        );
    }
    metrics.insert(
        "throughput/tokens_per_s".into(),
        lens.iter().sum::<f64>() / metrics["timing_s/rollout"].max(1e-9),
    );
}
