//! `ssrl eval`: a package (optionally with an adapter) on held-out pretext tasks, greedy by
//! default, scored by the training reward's answer check. Per-item JSONL, a summary per task and
//! per variant, resumable, and side-by-side comparison of two runs.

use crate::kernels::SamplingParams;
use crate::reward::{self, RewardConfig};
use crate::rollout::{Engine, EngineError, GenerationConfig, Request};
use crate::tasks::write::{read_samples, SampleRecord};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashSet};
use std::io::Write;
use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum EvalError {
    #[error(transparent)]
    Engine(#[from] EngineError),
    #[error(transparent)]
    Image(#[from] crate::tasks::source::SourceError),
    #[error("{path}: {msg}")]
    File { path: PathBuf, msg: String },
}

fn ferr(path: &Path, msg: impl std::fmt::Display) -> EvalError {
    EvalError::File {
        path: path.to_path_buf(),
        msg: msg.to_string(),
    }
}

#[derive(Debug, Clone)]
pub struct EvalConfig {
    pub data: PathBuf,
    /// Image paths resolve against this (default: the folder above the data file's folder).
    pub images_root: Option<PathBuf>,
    pub out: PathBuf,
    pub batch: usize,
    pub max_new_tokens: usize,
    /// 0 = greedy.
    pub temperature: f32,
    pub format_sentence: Option<String>,
    pub limit: Option<usize>,
    /// Recorded in the summary.
    pub model: String,
    pub adapter: Option<String>,
}

/// One scored item (a line of `items.jsonl`).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Item {
    pub id: String,
    pub task: String,
    pub variant: String,
    pub problem: String,
    pub response: String,
    pub predicted: String,
    pub answer: String,
    pub correct: bool,
    pub tokens: usize,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct Score {
    pub items: usize,
    pub correct: usize,
    pub accuracy: f64,
}

impl Score {
    fn add(&mut self, ok: bool) {
        self.items += 1;
        self.correct += usize::from(ok);
        self.accuracy = self.correct as f64 / self.items as f64;
    }
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct Summary {
    pub model: String,
    pub adapter: Option<String>,
    pub data: String,
    pub overall: Score,
    pub by_task: BTreeMap<String, Score>,
    /// `task/variant` (shuffle grids, flip grids, crop distractors, position geometry…).
    pub by_variant: BTreeMap<String, Score>,
}

fn variant(s: &SampleRecord) -> String {
    s.meta
        .get("variant")
        .and_then(|v| v.as_str())
        .or_else(|| s.meta.get("geometry").and_then(|v| v.as_str()))
        .unwrap_or("-")
        .to_string()
}

/// Scores every item of `out/items.jsonl`.
pub fn summarize(items: &[Item], cfg: &EvalConfig) -> Summary {
    let mut s = Summary {
        model: cfg.model.clone(),
        adapter: cfg.adapter.clone(),
        data: cfg.data.display().to_string(),
        ..Default::default()
    };
    for it in items {
        s.overall.add(it.correct);
        s.by_task
            .entry(it.task.clone())
            .or_default()
            .add(it.correct);
        s.by_variant
            .entry(format!("{}/{}", it.task, it.variant))
            .or_default()
            .add(it.correct);
    }
    s
}

pub fn read_items(path: &Path) -> Result<Vec<Item>, EvalError> {
    let Ok(text) = std::fs::read_to_string(path) else {
        return Ok(vec![]);
    };
    text.lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
        .map(|(i, l)| {
            serde_json::from_str(l).map_err(|e| ferr(path, format!("line {}: {e}", i + 1)))
        })
        .collect()
}

/// Runs (or continues) an evaluation: items already in `out/items.jsonl` are kept, the rest are
/// generated batch by batch and appended as they finish. Writes `out/summary.json`.
pub fn run(
    engine: &mut Engine,
    cfg: &EvalConfig,
    mut progress: impl FnMut(usize, usize),
) -> Result<Summary, EvalError> {
    let samples = read_samples(&cfg.data).map_err(|e| ferr(&cfg.data, e))?;
    let samples: Vec<SampleRecord> = samples
        .into_iter()
        .take(cfg.limit.unwrap_or(usize::MAX))
        .collect();
    let root = cfg
        .images_root
        .clone()
        .unwrap_or_else(|| crate::tasks::write::default_images_root(&cfg.data));
    std::fs::create_dir_all(&cfg.out).map_err(|e| ferr(&cfg.out, e))?;
    let items_path = cfg.out.join("items.jsonl");
    // A torn last line (interrupted write) is dropped; complete items are kept.
    let existing = std::fs::read_to_string(&items_path).unwrap_or_default();
    let kept: Vec<&str> = existing
        .lines()
        .filter(|l| serde_json::from_str::<Item>(l).is_ok())
        .collect();
    let mut body = kept.join("\n");
    if !body.is_empty() {
        body.push('\n');
    }
    std::fs::write(&items_path, body).map_err(|e| ferr(&items_path, e))?;
    let done: HashSet<String> = read_items(&items_path)?.into_iter().map(|i| i.id).collect();
    let todo: Vec<&SampleRecord> = samples.iter().filter(|s| !done.contains(&s.id)).collect();
    let mut file = std::fs::OpenOptions::new()
        .append(true)
        .open(&items_path)
        .map_err(|e| ferr(&items_path, e))?;
    let gen = GenerationConfig {
        group: 1,
        max_new_tokens: cfg.max_new_tokens,
        sampling: SamplingParams {
            temperature: cfg.temperature,
            top_k: 0,
            top_p: 1.0,
            seed: 0,
        },
        format_sentence: cfg.format_sentence.clone(),
    };
    let total = samples.len();
    let mut finished = total - todo.len();
    progress(finished, total);
    for chunk in todo.chunks(cfg.batch.max(1)) {
        let mut reqs = Vec::with_capacity(chunk.len());
        for s in chunk {
            reqs.push(Request {
                id: crate::rng::hash_str(&s.id),
                problem: s.problem.clone(),
                images: s.load_images(&root)?,
            });
        }
        let out = engine.generate(&reqs, &gen, None)?;
        let mut lines = String::new();
        for c in out {
            let s = chunk[c.prompt_index];
            let response = engine
                .prompts
                .decode(&c.tokens)
                .map_err(EngineError::from)?;
            let r = reward::score(&response, &s.answer, &RewardConfig::default());
            let item = Item {
                id: s.id.clone(),
                task: s.task.clone(),
                variant: variant(s),
                problem: s.problem.clone(),
                response,
                predicted: r.predicted,
                answer: s.answer.clone(),
                correct: r.accuracy > 0.0,
                tokens: c.tokens.len(),
            };
            lines += &serde_json::to_string(&item).expect("json");
            lines.push('\n');
        }
        file.write_all(lines.as_bytes())
            .and_then(|()| file.flush())
            .map_err(|e| ferr(&items_path, e))?;
        finished += chunk.len();
        progress(finished, total);
    }
    let summary = summarize(&read_items(&items_path)?, cfg);
    let sp = cfg.out.join("summary.json");
    std::fs::write(&sp, serde_json::to_vec_pretty(&summary).expect("json"))
        .map_err(|e| ferr(&sp, e))?;
    Ok(summary)
}

/// Reads a run's `summary.json`.
pub fn read_summary(run: &Path) -> Result<Summary, EvalError> {
    let p = run.join("summary.json");
    let text = std::fs::read(&p).map_err(|e| ferr(&p, e))?;
    serde_json::from_slice(&text).map_err(|e| ferr(&p, e))
}

/// Two runs side by side: `(row, accuracy A, accuracy B)` for overall, each task and variant.
pub fn compare(a: &Summary, b: &Summary) -> Vec<(String, Option<f64>, Option<f64>)> {
    let mut rows = vec![(
        "overall".to_string(),
        Some(a.overall.accuracy),
        Some(b.overall.accuracy),
    )];
    for (ma, mb) in [(&a.by_task, &b.by_task), (&a.by_variant, &b.by_variant)] {
        let keys: std::collections::BTreeSet<&String> = ma.keys().chain(mb.keys()).collect();
        for k in keys {
            rows.push((
                k.clone(),
                ma.get(k).map(|s| s.accuracy),
                mb.get(k).map(|s| s.accuracy),
            ));
        }
    }
    rows
}
