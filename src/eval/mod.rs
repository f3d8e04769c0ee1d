//! `ssrl eval`: a package (optionally with an adapter) on a benchmark or on held-out pretext
//! tasks, greedy by default, each benchmark prompted and scored the way its official evaluation
//! does it (see [`score`]). Per-item JSONL, a summary overall / per category / per variant,
//! resumable, and side-by-side comparison of two runs.

pub mod bench;
pub mod pyunicode;
pub mod score;

pub use bench::Bench;

use crate::kernels::SamplingParams;
use crate::rollout::{Engine, EngineError, GenerationConfig, Request};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashMap, HashSet};
use std::io::Write;
use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum EvalError {
    #[error(transparent)]
    Engine(#[from] EngineError),
    #[error(transparent)]
    Image(#[from] crate::data::images::ImageError),
    #[error(transparent)]
    Read(#[from] bench::ReadError),
    #[error("{path}: {msg}")]
    File { path: PathBuf, msg: String },
    /// A file of the run cannot be read, parsed or written: the cause as the source.
    #[error("{}", path.display())]
    Cause {
        path: PathBuf,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
}

fn ferr(path: &Path, msg: impl std::fmt::Display) -> EvalError {
    EvalError::File {
        path: path.to_path_buf(),
        msg: msg.to_string(),
    }
}

/// [`EvalError::Cause`] of `path`.
fn cause<E: Into<Box<dyn std::error::Error + Send + Sync>>>(
    path: &Path,
) -> impl Fn(E) -> EvalError + '_ {
    move |e| EvalError::Cause {
        path: path.to_path_buf(),
        source: e.into(),
    }
}
#[derive(Debug, Clone)]
pub struct EvalConfig {
    pub bench: Bench,
    pub data: PathBuf,
    /// Image paths resolve against this (default: the folder above the data file's folder).
    pub images_root: Option<PathBuf>,
    pub out: PathBuf,
    pub batch: usize,
    /// `None`: the benchmark's official budget.
    pub max_new_tokens: Option<usize>,
    /// Temperature 0 = greedy (the default).
    pub sampling: SamplingParams,
    /// The reasoning prompt (training format sentence); `false` asks for the answer directly.
    pub reasoning: bool,
    /// VSI-Bench: frames sampled per video.
    pub frames: usize,
    /// TSV columns to accept besides the known ones.
    pub allow_columns: Vec<String>,
    pub limit: Option<usize>,
    /// Recorded in the summary.
    pub model: String,
    pub adapter: Option<String>,
}

impl EvalConfig {
    /// Paper defaults: greedy, reasoning prompt, 128 frames, eight prompts per batch.
    pub fn new(bench: Bench, data: PathBuf, out: PathBuf, model: String) -> EvalConfig {
        EvalConfig {
            bench,
            data,
            images_root: None,
            out,
            batch: 8,
            max_new_tokens: None,
            sampling: SamplingParams {
                temperature: 0.0,
                top_k: 0,
                top_p: 1.0,
                seed: 0,
            },
            reasoning: true,
            frames: 128,
            allow_columns: vec![],
            limit: None,
            model,
            adapter: None,
        }
    }

    fn images_root(&self) -> PathBuf {
        self.images_root
            .clone()
            .unwrap_or_else(|| crate::data::records::default_images_root(&self.data))
    }
}

/// One scored item (a line of `items.jsonl`).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Item {
    pub id: String,
    /// Task, question type or category, as the benchmark groups its items.
    #[serde(alias = "task")]
    pub category: String,
    pub variant: String,
    /// The user text sent (`<image>` where each image goes).
    pub problem: String,
    pub response: String,
    pub predicted: String,
    pub answer: String,
    /// In [0, 1]: 0 or 1, or VSI-Bench's mean relative accuracy for numeric answers.
    pub score: f64,
    pub correct: bool,
    /// The benchmark's strict variant, where it has one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub strict: Option<bool>,
    pub tokens: usize,
    /// 3DSRBench's question id, where the data has one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub qid: Option<String>,
    /// CV-Bench-2D's image source, whose accuracies the overall one averages.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source: Option<String>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct Score {
    pub items: usize,
    /// Sum of item scores.
    pub points: f64,
    pub accuracy: f64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub strict_correct: Option<usize>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub strict_accuracy: Option<f64>,
    /// Responses in the reasoning format (`<think>…</think>` then `\boxed{…}`, the reward's
    /// format check) and their share; none for groups scored from other groups.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub format_ok: Option<usize>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub format_rate: Option<f64>,
}

impl Score {
    fn add(&mut self, it: &Item) {
        self.push(it.score, it.strict);
        let n = self.format_ok.unwrap_or(0) + usize::from(crate::reward::in_format(&it.response));
        self.format_ok = Some(n);
        self.format_rate = Some(n as f64 / self.items as f64);
    }

    fn push(&mut self, score: f64, strict: Option<bool>) {
        self.items += 1;
        self.points += score;
        self.accuracy = self.points / self.items as f64;
        if let Some(ok) = strict {
            let n = self.strict_correct.unwrap_or(0) + usize::from(ok);
            self.strict_correct = Some(n);
            self.strict_accuracy = Some(n as f64 / self.items as f64);
        }
    }
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct Summary {
    pub model: String,
    pub adapter: Option<String>,
    #[serde(default)]
    pub bench: String,
    pub data: String,
    #[serde(default)]
    pub reasoning: bool,
    pub overall: Score,
    #[serde(alias = "by_task")]
    pub by_category: BTreeMap<String, Score>,
    /// `category/variant` (shuffle grids, position geometry, What'sUp relations, …).
    pub by_variant: BTreeMap<String, Score>,
    /// 3DSRBench's grouped accuracies (`flip_eval`, `circ_eval`, `flip_circ_eval`) when the data
    /// has question ids: a group counts only if every member is right.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub grouped: BTreeMap<String, Score>,
    /// CV-Bench-2D's accuracy per image source; where there are any, `overall.accuracy` is
    /// their mean (VLMEvalKit's rule for it), not the share of all items.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub by_source: BTreeMap<String, Score>,
}

/// VLMEvalKit's 3DSRBench grouping: each item's score multiplies into its group key's; the
/// groups are scored on the items whose id *is* a key.
fn grouped(items: &[Item], key: impl Fn(&str) -> String) -> Score {
    let mut hit: BTreeMap<String, f64> = BTreeMap::new();
    for it in items {
        if let Some(q) = it.qid.as_deref() {
            if key(q) == q {
                hit.entry(q.to_string()).or_insert(1.0);
            }
        }
    }
    for it in items {
        if let Some(q) = it.qid.as_deref() {
            if let Some(h) = hit.get_mut(&key(q)) {
                *h *= it.score;
            }
        }
    }
    let mut s = Score::default();
    for h in hit.values() {
        s.push(*h, None);
    }
    s
}

fn prefix(q: &str, n: usize) -> String {
    q.chars().take(n).collect()
}

/// Scores every item of a run.
pub fn summarize(items: &[Item], cfg: &EvalConfig) -> Summary {
    let mut s = Summary {
        model: cfg.model.clone(),
        adapter: cfg.adapter.clone(),
        bench: cfg.bench.name().to_string(),
        data: cfg.data.display().to_string(),
        reasoning: cfg.reasoning,
        ..Default::default()
    };
    if items.iter().any(|i| i.qid.is_some()) {
        let g = &mut s.grouped;
        g.insert(
            "flip_eval".into(),
            grouped(items, |q| q.replace("-flip", "")),
        );
        g.insert(
            "circ_eval".into(),
            grouped(items, |q| match q.contains("-flip") {
                true => prefix(q, 13),
                false => prefix(q, 8),
            }),
        );
        g.insert("flip_circ_eval".into(), grouped(items, |q| prefix(q, 8)));
    }
    for it in items {
        s.overall.add(it);
        s.by_category
            .entry(it.category.clone())
            .or_default()
            .add(it);
        s.by_variant
            .entry(format!("{}/{}", it.category, it.variant))
            .or_default()
            .add(it);
        if let Some(src) = &it.source {
            s.by_source.entry(src.clone()).or_default().add(it);
        }
    }
    if !s.by_source.is_empty() {
        let n = s.by_source.len() as f64;
        s.overall.accuracy = s.by_source.values().map(|x| x.accuracy).sum::<f64>() / n;
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

/// What a run folder was made with; a continuation must match it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
struct RunKey {
    bench: String,
    data: String,
    model: String,
    adapter: Option<String>,
    reasoning: bool,
    frames: usize,
    max_new_tokens: usize,
    temperature: f32,
    top_k: usize,
    top_p: f32,
}

/// Reads and checks the data (up to `limit` items) the way [`run`] will use it.
pub fn load(cfg: &EvalConfig) -> Result<Vec<bench::BenchItem>, EvalError> {
    let opt = bench::ReadOptions {
        images_root: cfg.images_root(),
        detect_root: cfg.images_root.is_none(),
        reasoning: cfg.reasoning,
        frames: cfg.frames,
        allow_columns: cfg.allow_columns.clone(),
    };
    Ok(bench::read(cfg.bench, &cfg.data, &opt)?
        .into_iter()
        .take(cfg.limit.unwrap_or(usize::MAX))
        .collect())
}

/// Runs (or continues) an evaluation: items already in `out/items.jsonl` are kept, the rest are
/// generated batch by batch and appended as they finish. Writes `out/summary.json`.
pub fn run(
    engine: &mut Engine,
    cfg: &EvalConfig,
    progress: impl FnMut(usize, usize),
) -> Result<Summary, EvalError> {
    let items = load(cfg)?;
    run_items(engine, cfg, &items, progress)
}

/// [`run`] on items already read by [`load`] (a bad file is refused before a model is loaded).
pub fn run_items(
    engine: &mut Engine,
    cfg: &EvalConfig,
    items: &[bench::BenchItem],
    progress: impl FnMut(usize, usize),
) -> Result<Summary, EvalError> {
    let max_new_tokens = cfg.max_new_tokens.unwrap_or(cfg.bench.max_new_tokens());
    let budget = match cfg.max_new_tokens {
        Some(_) => "--max-new-tokens".to_string(),
        None => format!("the {} budget", cfg.bench.name()),
    };
    // A budget the model's context cannot hold is refused before anything is written.
    let context = engine.context_length();
    if let Some(context) = context.filter(|&c| max_new_tokens >= c) {
        return Err(EngineError::Config(format!(
            "{max_new_tokens} new tokens ({budget}) leave no room for a prompt in the model's \
             context length of {context}: pass a smaller --max-new-tokens"
        ))
        .into());
    }
    let gen = GenerationConfig {
        group: 1,
        max_new_tokens,
        sampling: cfg.sampling,
        format_sentence: None,
        verbatim: true,
    };
    let saved = (
        engine.preprocessor.min_pixels,
        engine.preprocessor.max_pixels,
    );
    if let Some((lo, hi)) = cfg.bench.pixels(cfg.frames) {
        (
            engine.preprocessor.min_pixels,
            engine.preprocessor.max_pixels,
        ) = (lo, hi);
    }
    let result = run_at_bench_pixels(engine, cfg, items, &gen, &budget, progress);
    // The engine gets its own image bounds back, whatever happened.
    (
        engine.preprocessor.min_pixels,
        engine.preprocessor.max_pixels,
    ) = saved;
    result
}

/// [`run_items`] once the engine's image bounds are the benchmark's.
fn run_at_bench_pixels(
    engine: &mut Engine,
    cfg: &EvalConfig,
    items: &[bench::BenchItem],
    gen: &GenerationConfig,
    budget: &str,
    mut progress: impl FnMut(usize, usize),
) -> Result<Summary, EvalError> {
    // Every item's prompt is checked against the context before anything is written: a run
    // that stopped at an item without room would be locked to a budget it cannot finish with.
    check_room(engine, &cfg.data, items, gen, budget)?;
    let max_new_tokens = gen.max_new_tokens;
    let world = crate::dist::world();
    let key = RunKey {
        bench: cfg.bench.name().into(),
        data: cfg.data.display().to_string(),
        model: cfg.model.clone(),
        adapter: cfg.adapter.clone(),
        reasoning: cfg.reasoning,
        frames: cfg.frames,
        max_new_tokens,
        temperature: cfg.sampling.temperature,
        top_k: cfg.sampling.top_k,
        top_p: cfg.sampling.top_p,
    };
    let items_path = cfg.out.join("items.jsonl");
    // Data parallel, rank 0 alone reads and writes the folder; the others learn what is done.
    let mut file = None;
    let done: HashSet<String> = if world.is_root() {
        let opened = open_items(cfg, &key, &items_path);
        if world.size > 1 {
            world.send_from_root(
                &opened
                    .as_ref()
                    .map(|o| &o.1)
                    .map_err(|e| crate::error_chain(e)),
            );
        }
        let (f, done) = opened?;
        file = Some(f);
        done
    } else {
        world
            .recv_from_root::<Result<HashSet<String>, String>>()
            .map_err(|e| ferr(&cfg.out, format!("rank 0: {e}")))?
    };
    let todo: Vec<&bench::BenchItem> = items.iter().filter(|s| !done.contains(&s.id)).collect();
    let total = items.len();
    let mut finished = total - todo.len();
    progress(finished, total);
    // Rounds of a batch per rank, each rank's items dealt round robin; rank 0 writes a
    // round's items in the data's order, as one process would.
    for round in todo.chunks(cfg.batch.max(1) * world.size) {
        let chunk: Vec<&bench::BenchItem> =
            world.share(round.len()).iter().map(|&p| round[p]).collect();
        let mut lines: Vec<(usize, String)> = Vec::new();
        if !chunk.is_empty() {
            let mut reqs = Vec::with_capacity(chunk.len());
            for s in &chunk {
                reqs.push(Request {
                    id: crate::rng::hash_str(&s.id),
                    problem: s.prompt.clone(),
                    images: s
                        .images
                        .iter()
                        .map(bench::ImageSource::load)
                        .collect::<Result<_, _>>()?,
                });
            }
            let out = engine.generate(&reqs, gen, None)?;
            for c in out {
                let s = chunk[c.prompt_index];
                let response = engine
                    .prompts
                    .decode(&c.tokens)
                    .map_err(EngineError::from)?;
                let r = s.score(&response, cfg.reasoning);
                let item = Item {
                    id: s.id.clone(),
                    category: s.category.clone(),
                    variant: s.variant.clone(),
                    problem: s.prompt.clone(),
                    response,
                    predicted: r.predicted,
                    answer: s.answer.clone(),
                    correct: r.score >= 1.0,
                    score: r.score,
                    strict: r.strict,
                    tokens: c.tokens.len(),
                    qid: s.qid.clone(),
                    source: s.source.clone(),
                };
                let at = world.share(round.len())[c.prompt_index];
                lines.push((at, serde_json::to_string(&item).expect("json")));
            }
        }
        let mut all: Vec<(usize, String)> = world.gather(&lines).concat();
        all.sort_by_key(|l| l.0);
        if let Some(file) = &mut file {
            let text: String = all.iter().map(|l| format!("{}\n", l.1)).collect();
            file.write_all(text.as_bytes())
                .and_then(|()| file.flush())
                .map_err(cause(&items_path))?;
        }
        finished += round.len();
        progress(finished, total);
    }
    let summary = world.is_root().then(|| {
        // Only this data's items count (a --limit run continued without one keeps its items).
        let wanted: HashSet<&str> = items.iter().map(|i| i.id.as_str()).collect();
        let scored: Vec<Item> = read_items(&items_path)?
            .into_iter()
            .filter(|i| wanted.contains(i.id.as_str()))
            .collect();
        let summary = summarize(&scored, cfg);
        let sp = cfg.out.join("summary.json");
        std::fs::write(&sp, serde_json::to_vec_pretty(&summary).expect("json"))
            .map_err(cause(&sp))?;
        Ok::<Summary, EvalError>(summary)
    });
    match summary {
        Some(s) if world.size == 1 => s,
        Some(s) => {
            world.send_from_root(&s.as_ref().map_err(|e| crate::error_chain(e)));
            s
        }
        None => world
            .recv_from_root::<Result<Summary, String>>()
            .map_err(|e| ferr(&cfg.out, format!("rank 0: {e}"))),
    }
}

/// The run folder readied for `key`: items.jsonl with the complete items of an earlier run of
/// the same settings (a torn last line dropped), opened to append, and those items' ids.
fn open_items(
    cfg: &EvalConfig,
    key: &RunKey,
    items_path: &Path,
) -> Result<(std::fs::File, HashSet<String>), EvalError> {
    std::fs::create_dir_all(&cfg.out).map_err(cause(&cfg.out))?;
    let key_path = cfg.out.join("run.json");
    // A torn last line (interrupted write) is dropped; complete items are kept.
    let existing = std::fs::read_to_string(items_path).unwrap_or_default();
    let any_item = existing
        .lines()
        .any(|l| serde_json::from_str::<Item>(l).is_ok());
    match std::fs::read(&key_path) {
        // A run with items continues only with its own settings; one that stopped before its
        // first item (interrupted in its first batch, say) starts over with the new ones.
        Ok(text) if any_item => {
            let old: RunKey = serde_json::from_slice(&text).map_err(cause(&key_path))?;
            if &old != key {
                return Err(ferr(
                    &key_path,
                    format!(
                        "this folder holds a run with other settings ({}); pick another --out to keep both",
                        serde_json::to_string(&old).expect("json")
                    ),
                ));
            }
        }
        _ => std::fs::write(&key_path, serde_json::to_vec_pretty(key).expect("json"))
            .map_err(cause(&key_path))?,
    }
    let mut body = String::new();
    let mut done: HashSet<String> = HashSet::new();
    for l in existing.lines() {
        if let Ok(it) = serde_json::from_str::<Item>(l) {
            body += l;
            body.push('\n');
            done.insert(it.id);
        }
    }
    std::fs::write(items_path, body).map_err(cause(items_path))?;
    let file = std::fs::OpenOptions::new()
        .append(true)
        .open(items_path)
        .map_err(cause(items_path))?;
    Ok((file, done))
}

/// Refuses, before anything is generated, a budget (`gen.max_new_tokens`, named by `budget`)
/// that leaves some item's prompt no room in the model's context, naming the items and the
/// largest budget that fits them all. Prompt lengths
/// come from each image's size (its header; pixels are not decoded), on all cores; an image that
/// cannot be read is an error naming it, as it would be at generation, and so is a prompt that
/// cannot be built (placeholders that do not match its images), naming the data file and item.
fn check_room(
    engine: &Engine,
    data: &Path,
    items: &[bench::BenchItem],
    gen: &GenerationConfig,
    budget: &str,
) -> Result<(), EvalError> {
    use rayon::prelude::*;
    let Some(context) = engine.context_length() else {
        return Ok(());
    };
    // The headers on all cores, each file once (VSI-Bench's items share their videos' frames);
    // the tokenizer on this thread (the engine is not shared).
    let files: HashSet<&Path> = (items.iter().flat_map(|it| &it.images))
        .filter_map(|i| match i {
            bench::ImageSource::File(p) => Some(p.as_path()),
            _ => None,
        })
        .collect();
    let file_sizes: HashMap<&Path, (u32, u32)> = (files.into_par_iter())
        .map(|p| Ok((p, crate::data::images::image_size(p)?)))
        .collect::<Result<_, EvalError>>()?;
    let sizes = items
        .par_iter()
        .map(|it| {
            (it.images.iter())
                .map(|i| match i {
                    bench::ImageSource::File(p) => Ok(file_sizes[p.as_path()]),
                    other => other.size(),
                })
                .collect()
        })
        .collect::<Result<Vec<Vec<(u32, u32)>>, _>>()?;
    let lens = (items.iter().zip(&sizes))
        .map(|(it, sizes)| {
            (engine.prompt_length(&it.prompt, sizes, gen))
                .map_err(|e| ferr(data, format!("item {}: {e}", it.id)))
        })
        .collect::<Result<Vec<usize>, _>>()?;
    let over: Vec<usize> = (0..items.len())
        .filter(|&i| lens[i] + gen.max_new_tokens > context)
        .collect();
    let Some(&longest) = over
        .iter()
        .max_by_key(|&&i| (lens[i], std::cmp::Reverse(i)))
    else {
        return Ok(());
    };
    let mut names: Vec<&str> = over.iter().take(3).map(|&i| items[i].id.as_str()).collect();
    let more = over.len() - names.len();
    if more > 0 {
        names.push("…");
    }
    let room = context.saturating_sub(lens[longest]);
    Err(EngineError::Config(format!(
        "{} item{} ({}{}) leave{} no room for {} new tokens ({}) in the model's context length of \
         {context}; the longest prompt, item {}, has {} tokens: {}",
        over.len(),
        if over.len() == 1 { "" } else { "s" },
        names.join(", "),
        if more > 0 {
            format!(" {more} more")
        } else {
            String::new()
        },
        if over.len() == 1 { "s" } else { "" },
        gen.max_new_tokens,
        budget,
        items[longest].id,
        lens[longest],
        match room {
            0 => "it alone fills the context".to_string(),
            r => format!("pass --max-new-tokens {r} or less"),
        }
    ))
    .into())
}

/// Reads a run's `summary.json`.
pub fn read_summary(run: &Path) -> Result<Summary, EvalError> {
    let p = run.join("summary.json");
    if !p.exists() {
        let why = if !run.is_dir() {
            "no such folder"
        } else if run.join("run.json").exists() {
            "the run has not finished (no summary.json yet): run its `ssrl eval` command again \
             to complete it"
        } else {
            "not an `ssrl eval` run folder (no summary.json)"
        };
        return Err(ferr(run, why));
    }
    let text = std::fs::read(&p).map_err(cause(&p))?;
    serde_json::from_slice(&text).map_err(cause(&p))
}

/// Two runs side by side: `(row, accuracy A, accuracy B)` for overall, each task and variant.
/// How two runs differ in what they measured — benchmark, data file, prompt, number of items
/// — each as `what: A's, B's`; empty when their accuracies are comparable. The same data
/// reached by two paths counts as the same.
pub fn differences(a: &Summary, b: &Summary) -> Vec<String> {
    let mut d = Vec::new();
    if a.bench != b.bench {
        d.push(format!("benchmark: {}, {}", a.bench, b.bench));
    }
    if !crate::same_path(Path::new(&a.data), Path::new(&b.data)) {
        d.push(format!("data: {}, {}", a.data, b.data));
    }
    if a.reasoning != b.reasoning {
        let p = |r: bool| if r { "reasoning" } else { "direct" };
        d.push(format!("prompt: {}, {}", p(a.reasoning), p(b.reasoning)));
    }
    if a.overall.items != b.overall.items {
        d.push(format!("items: {}, {}", a.overall.items, b.overall.items));
    }
    d
}

pub fn compare(a: &Summary, b: &Summary) -> Vec<(String, Option<f64>, Option<f64>)> {
    let mut rows = vec![(
        "overall".to_string(),
        Some(a.overall.accuracy),
        Some(b.overall.accuracy),
    )];
    if a.overall.strict_accuracy.is_some() || b.overall.strict_accuracy.is_some() {
        rows.push((
            "overall (strict)".to_string(),
            a.overall.strict_accuracy,
            b.overall.strict_accuracy,
        ));
    }
    if a.overall.format_rate.is_some() || b.overall.format_rate.is_some() {
        rows.push((
            "format rate".to_string(),
            a.overall.format_rate,
            b.overall.format_rate,
        ));
        let keys: std::collections::BTreeSet<&String> =
            a.by_category.keys().chain(b.by_category.keys()).collect();
        for k in keys {
            let rate = |s: &Summary| s.by_category.get(k).and_then(|c| c.format_rate);
            rows.push((format!("format rate: {k}"), rate(a), rate(b)));
        }
    }
    for (ma, mb) in [
        (&a.grouped, &b.grouped),
        (&a.by_source, &b.by_source),
        (&a.by_category, &b.by_category),
        (&a.by_variant, &b.by_variant),
    ] {
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
