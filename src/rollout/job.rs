//! `ssrl rollout` as a library: every prompt of a task dataset rolled out G times into a JSONL
//! file, a batch at a time, scored by the reward, resumable.
//!
//! Responses go to `OUT.partial` with the settings in `OUT.run.json`; an interrupted run
//! continues there under the same settings, and the file becomes `OUT` when every prompt is done.
//! [`RolloutJob::plan`] reads the data and checks the files before anything is written or a
//! model is loaded; [`Plan::run`] generates.

use super::{Engine, EngineError, GenerationConfig, Request};
use crate::data::records::{read_dataset, SampleRecord, WriteError};
use crate::reward::{self, RewardConfig};
use serde::{Deserialize, Serialize};
use std::collections::{HashMap, HashSet};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

#[derive(Debug, thiserror::Error)]
pub enum RolloutError {
    // Not an error source: the message holds the cause (a report of the chain would print it
    // twice).
    #[error("cannot read samples: {0}")]
    Data(WriteError),
    #[error("{0}: exists (a finished rollout); pick another --out, or remove it to run again")]
    Exists(String),
    #[error("{0}: is a folder; --out takes the JSONL file to write (say, {0}/rollouts.jsonl)")]
    OutIsFolder(String),
    /// An unfinished run that cannot be continued (other settings, changed data).
    #[error("{path}: {msg}; pick another --out, or remove it and {settings} to start over")]
    Resume {
        path: String,
        settings: String,
        msg: String,
    },
    #[error("{}: cannot write", path.display())]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{}: cannot read", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Engine(#[from] EngineError),
    /// Rank 0's failure, as another rank of a data-parallel run hears of it.
    #[error("rank 0: {0}")]
    Root(String),
    #[error("no sample of {data} could be rolled out ({skipped} skipped; see the warnings)")]
    Nothing { data: String, skipped: usize },
}

/// What to roll out and where.
#[derive(Debug, Clone)]
pub struct RolloutJob {
    /// The model's folder, as given (recorded with the settings; the engine is opened by the
    /// caller).
    pub model: PathBuf,
    /// A `.parquet` / `.jsonl` file or an `ssrl tasks` folder.
    pub data: PathBuf,
    /// What image paths resolve against (default: the folder above each data file's folder).
    pub images_root: Option<PathBuf>,
    /// Only the first N prompts.
    pub limit: Option<usize>,
    /// Prompts per engine call.
    pub batch: usize,
    pub cfg: GenerationConfig,
    /// The output JSONL.
    pub out: PathBuf,
}

/// What [`Plan::run`] reports as it goes.
#[derive(Debug)]
pub enum Progress<'a> {
    /// A sample left out: its images cannot be read, its prompt cannot be built from them, or
    /// it has no room for the new tokens in the model's context.
    Skipped {
        id: &'a str,
        index: usize,
        why: String,
    },
    /// A batch written: prompts done of all, tokens generated in this run so far.
    Batch {
        done: usize,
        total: usize,
        tokens: usize,
    },
}

/// A checked job: its samples, and what an earlier run of it left.
pub struct Plan {
    job: RolloutJob,
    samples: Vec<(SampleRecord, PathBuf)>,
    settings: serde_json::Value,
    /// The earlier run's lines of finished prompts, and those prompts.
    kept: String,
    done: HashSet<usize>,
}

/// How a run ended.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct RolloutSummary {
    /// Prompts in the data (after `limit`), and those written with all their responses.
    pub total: usize,
    pub finished: usize,
    /// Samples skipped in this run.
    pub skipped: usize,
    /// Responses in the output, and the mean overall reward of those with an answer to score
    /// against (finished runs; `None`: no sample has an answer).
    pub responses: usize,
    pub mean_reward: Option<f64>,
    /// Tokens generated in this run, and its seconds.
    pub tokens: usize,
    pub secs: f64,
    /// Stopped by the caller's flag: the output is still `OUT.partial`.
    pub stopped: bool,
}

/// `path` with `suffix` appended to its name.
fn beside(path: &Path, suffix: &str) -> PathBuf {
    let mut p = path.as_os_str().to_os_string();
    p.push(suffix);
    PathBuf::from(p)
}

impl RolloutJob {
    /// Where responses are written until every prompt is done.
    pub fn partial_path(&self) -> PathBuf {
        beside(&self.out, ".partial")
    }

    /// The settings of the unfinished run.
    pub fn settings_path(&self) -> PathBuf {
        beside(&self.out, ".run.json")
    }

    /// The settings a run continues only under.
    fn settings(&self) -> serde_json::Value {
        let (c, s) = (&self.cfg, &self.cfg.sampling);
        serde_json::json!({
            "model": self.model, "data": self.data, "group": c.group,
            "max_new_tokens": c.max_new_tokens, "temperature": s.temperature, "top_p": s.top_p,
            "top_k": s.top_k, "seed": s.seed, "format_prompt": c.format_sentence.is_some(),
            "limit": self.limit,
        })
    }

    /// Reads the samples and checks the output: a finished `out` is refused, and an unfinished
    /// run there continues only under the same settings and data. Writes nothing.
    pub fn plan(&self) -> Result<Plan, RolloutError> {
        let limit = self.limit.unwrap_or(usize::MAX);
        let samples = read_dataset(&self.data, self.images_root.as_deref(), limit)
            .map_err(RolloutError::Data)?;
        if self.out.is_dir() {
            return Err(RolloutError::OutIsFolder(self.out.display().to_string()));
        }
        if self.out.exists() {
            return Err(RolloutError::Exists(self.out.display().to_string()));
        }
        let settings = self.settings();
        let (tmp, key_path) = (self.partial_path(), self.settings_path());
        let resume_err = |msg: String| RolloutError::Resume {
            path: tmp.display().to_string(),
            settings: key_path.display().to_string(),
            msg,
        };
        let (kept, done) = match std::fs::read_to_string(&tmp) {
            Ok(text) => {
                let ids: Vec<&str> = samples.iter().map(|(s, _)| s.id.as_str()).collect();
                let (kept, done) = finished_prompts(&text, self.cfg.group, &ids)
                    .map_err(|e| resume_err(format!("cannot continue: {e}")))?;
                let old: serde_json::Value = std::fs::read(&key_path)
                    .ok()
                    .and_then(|b| serde_json::from_slice(&b).ok())
                    .unwrap_or_default();
                if old != settings && !done.is_empty() {
                    let differ: Vec<String> = match settings.as_object() {
                        Some(now) if old.is_object() => now
                            .iter()
                            .filter(|(k, v)| old[k.as_str()] != **v)
                            .map(|(k, v)| format!("{k} {} there, {v} here", old[k.as_str()]))
                            .collect(),
                        _ => vec![format!("no settings in {}", key_path.display())],
                    };
                    return Err(resume_err(format!(
                        "an unfinished rollout with other settings ({})",
                        differ.join(", ")
                    )));
                }
                (kept, done)
            }
            Err(_) => (String::new(), HashSet::new()),
        };
        Ok(Plan {
            job: self.clone(),
            samples,
            settings,
            kept,
            done,
        })
    }
}

impl Plan {
    /// Prompts in the data, and those an earlier run finished.
    pub fn prompts(&self) -> (usize, usize) {
        (self.samples.len(), self.done.len())
    }

    /// Rolls out the prompts not yet done, a batch at a time (the next batch's images decoded
    /// on a thread of their own meanwhile), appending each batch's responses to the partial
    /// file; stops between batches once `stop` is set. Done, the partial file becomes the
    /// output.
    pub fn run(
        self,
        engine: &mut Engine,
        stop: &AtomicBool,
        mut progress: impl FnMut(Progress<'_>),
    ) -> Result<RolloutSummary, RolloutError> {
        let job = &self.job;
        let cfg = &job.cfg;
        let world = crate::dist::world();
        let (tmp, key_path) = (job.partial_path(), job.settings_path());
        let io_err = |path: &Path| {
            let path = path.to_path_buf();
            move |source: std::io::Error| RolloutError::Write {
                path: path.clone(),
                source,
            }
        };
        // Data parallel, rank 0 alone writes; every rank goes by rank 0's finished prompts.
        let mut out = None;
        if world.is_root() {
            if let Some(dir) = tmp.parent().filter(|d| !d.as_os_str().is_empty()) {
                std::fs::create_dir_all(dir).map_err(io_err(dir))?;
            }
            std::fs::write(&key_path, self.settings.to_string()).map_err(io_err(&key_path))?;
            // Only whole prompts are kept (a torn last line or a prompt's first samples dropped).
            std::fs::write(&tmp, &self.kept).map_err(io_err(&tmp))?;
            out = Some(
                std::fs::OpenOptions::new()
                    .append(true)
                    .open(&tmp)
                    .map_err(io_err(&tmp))?,
            );
        }
        let done: HashSet<usize> = world.broadcast(self.done.clone());
        let todo: Vec<Todo<'_>> = (self.samples.iter().enumerate())
            .filter(|(i, _)| !done.contains(i))
            .collect();
        let total = self.samples.len();
        let t0 = Instant::now();
        let (mut tokens, mut skipped, mut finished) = (0usize, 0usize, done.len());
        let mut stopped = false;
        // Prompts done or skipped, for the progress.
        let mut attempted = total - todo.len();
        // Rounds of a batch per rank, each rank's prompts dealt round robin; rank 0 writes a
        // round's responses in the data's order, as one process would.
        let rounds: Vec<&[Todo<'_>]> = todo.chunks(job.batch.max(1) * world.size).collect();
        let load = |chunk: Vec<Todo<'_>>| {
            chunk
                .iter()
                .map(|(_, (s, root))| s.load_images(root))
                .collect::<Vec<_>>()
        };
        std::thread::scope(|scope| -> Result<(), RolloutError> {
            let mut next = rounds.first().map(|&r| {
                let c = pick(world, r);
                scope.spawn(move || load(c))
            });
            for (k, &round) in rounds.iter().enumerate() {
                if world.any(stop.load(Ordering::SeqCst)) {
                    stopped = true;
                    break;
                }
                let loaded = next
                    .take()
                    .expect("a load runs for every batch")
                    .join()
                    .expect("the image loader panicked");
                next = rounds.get(k + 1).map(|&r| {
                    let c = pick(world, r);
                    scope.spawn(move || load(c))
                });
                let chunk = pick(world, round);
                let mut skips = Vec::new();
                let b = roll_batch(engine, cfg, &chunk, loaded, &mut skips)?;
                let all = world.gather(&(b, skips));
                let (mut lines, mut skips) = (Vec::new(), Vec::new());
                for (b, s) in all {
                    (finished, skipped, tokens) =
                        (finished + b.rolled, skipped + b.skipped, tokens + b.tokens);
                    lines.extend(b.lines);
                    skips.extend(s);
                }
                skips.sort_by_key(|s: &Skip| s.1);
                for (id, index, why) in skips {
                    progress(Progress::Skipped {
                        id: &id,
                        index,
                        why,
                    });
                }
                lines.sort_by_key(|l| (l.0, l.1));
                if let Some(out) = &mut out {
                    let text: String = lines.iter().map(|l| format!("{}\n", l.2)).collect();
                    out.write_all(text.as_bytes())
                        .and_then(|()| out.flush())
                        .map_err(io_err(&tmp))?;
                }
                attempted += round.len();
                progress(Progress::Batch {
                    done: attempted,
                    total,
                    tokens,
                });
            }
            Ok(())
        })?;
        drop(out);
        let mut summary = RolloutSummary {
            total,
            finished,
            skipped,
            responses: 0,
            mean_reward: None,
            tokens,
            secs: t0.elapsed().as_secs_f64(),
            stopped,
        };
        if stopped {
            return Ok(summary);
        }
        let ended = world.is_root().then(|| self.finish(&mut summary));
        match ended {
            Some(r) if world.size == 1 => r.map(|()| summary),
            Some(r) => {
                world.send_from_root(
                    &r.as_ref()
                        .map(|()| &summary)
                        .map_err(|e| crate::error_chain(e)),
                );
                r.map(|()| summary)
            }
            None => world
                .recv_from_root::<Result<RolloutSummary, String>>()
                .map_err(RolloutError::Root),
        }
    }

    /// A finished run's partial file made the output, its settings file removed, and the
    /// responses counted and their rewards averaged into `summary`.
    fn finish(&self, summary: &mut RolloutSummary) -> Result<(), RolloutError> {
        let job = &self.job;
        let (tmp, key_path) = (job.partial_path(), job.settings_path());
        let text = std::fs::read_to_string(&tmp).map_err(|source| RolloutError::Read {
            path: tmp.clone(),
            source,
        })?;
        let lines: Vec<serde_json::Value> = text
            .lines()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .collect();
        if lines.is_empty() && summary.total > 0 {
            return Err(RolloutError::Nothing {
                data: job.data.display().to_string(),
                skipped: summary.skipped,
            });
        }
        std::fs::rename(&tmp, &job.out).map_err(|source| RolloutError::Write {
            path: job.out.clone(),
            source,
        })?;
        let _ = std::fs::remove_file(&key_path);
        let rewards: Vec<f64> = (lines.iter())
            .filter_map(|v| v["reward"]["overall"].as_f64())
            .collect();
        summary.responses = lines.len();
        summary.mean_reward =
            (!rewards.is_empty()).then(|| rewards.iter().sum::<f64>() / rewards.len() as f64);
        Ok(())
    }
}

/// A sample to roll out: its index in the data, and it with its images' folder.
type Todo<'s> = (usize, &'s (SampleRecord, PathBuf));

/// This rank's samples of a round (all of them for one process).
fn pick<'s>(world: &crate::dist::World, round: &[Todo<'s>]) -> Vec<Todo<'s>> {
    world.share(round.len()).iter().map(|&p| round[p]).collect()
}

/// What one batch gave: its JSONL lines (each with its prompt's index and sample, which order
/// them), the prompts rolled out and skipped, tokens generated.
#[derive(Serialize, Deserialize)]
struct Batch {
    lines: Vec<(usize, usize, String)>,
    rolled: usize,
    skipped: usize,
    tokens: usize,
}

/// A sample left out: its id, index and why.
type Skip = (String, usize, String);

/// Rolls out one batch: `chunk`'s samples, their images decoded (`loaded`, in order). A sample
/// whose images cannot be read, whose prompt cannot be built from them (placeholders that do
/// not match) or that has no room for the new tokens in the model's context is skipped and
/// reported, not left to fail the batch. Responses are scored where the sample has an answer.
fn roll_batch(
    engine: &mut Engine,
    cfg: &GenerationConfig,
    chunk: &[Todo<'_>],
    loaded: Vec<Result<Vec<image::RgbImage>, crate::data::images::ImageError>>,
    skips: &mut Vec<Skip>,
) -> Result<Batch, RolloutError> {
    let mut b = Batch {
        lines: Vec::new(),
        rolled: 0,
        skipped: 0,
        tokens: 0,
    };
    let mut reqs = Vec::with_capacity(chunk.len());
    let mut sources = Vec::with_capacity(chunk.len());
    for (&(index, (s, _)), images) in chunk.iter().zip(loaded) {
        match images {
            Ok(images) => {
                reqs.push(Request {
                    id: crate::rng::hash_str(&s.id) ^ index as u64,
                    problem: s.problem.clone(),
                    images,
                });
                sources.push((index, s));
            }
            Err(e) => {
                b.skipped += 1;
                skips.push((s.id.clone(), index, crate::error_chain(&e)));
            }
        }
    }
    let unusable = engine.unusable(&reqs, cfg);
    for (at, why) in &unusable {
        let (index, s) = sources[*at];
        b.skipped += 1;
        skips.push((s.id.clone(), index, why.clone()));
    }
    for (at, _) in unusable.iter().rev() {
        sources.remove(*at);
        reqs.remove(*at);
    }
    b.rolled = sources.len();
    if reqs.is_empty() {
        return Ok(b);
    }
    for c in engine.generate(&reqs, cfg, None)? {
        let (index, s) = sources[c.prompt_index];
        let text = engine
            .prompts
            .decode(&c.tokens)
            .map_err(EngineError::from)?;
        let (answer, reward) = match s.answer.as_str() {
            "" => (None, None),
            a => (
                Some(a),
                Some(reward::score(&text, a, &RewardConfig::default())),
            ),
        };
        b.tokens += c.tokens.len();
        let line = serde_json::json!({"prompt_id": s.id, "prompt_index": index,
        "task": s.task, "sample": c.sample_index, "tokens": c.tokens, "text": text,
        "logprobs": c.logprobs, "finish": c.finish, "answer": answer, "reward": reward});
        b.lines.push((index, c.sample_index, line.to_string()));
    }
    Ok(b)
}

/// The lines of an unfinished rollout file that belong to prompts with all `group` responses,
/// and those prompts' indices; a torn last line and the responses of an unfinished prompt are
/// left out. A line whose prompt is not the data's prompt at its index (`ids`: the data's
/// prompt ids in order) is an error: the data changed under the file.
fn finished_prompts(
    text: &str,
    group: usize,
    ids: &[&str],
) -> Result<(String, HashSet<usize>), String> {
    let mut lines: Vec<(usize, &str)> = Vec::new();
    let mut count: HashMap<usize, usize> = HashMap::new();
    for (n, l) in text.lines().enumerate() {
        let Ok(v) = serde_json::from_str::<serde_json::Value>(l) else {
            continue;
        };
        let Some(i) = v["prompt_index"].as_u64().map(|i| i as usize) else {
            continue;
        };
        if let Some(&id) = ids.get(i).filter(|&&id| v["prompt_id"] != id) {
            return Err(format!(
                "line {}: prompt {i} is {} there but {id} in the data now (the data changed)",
                n + 1,
                v["prompt_id"]
            ));
        }
        *count.entry(i).or_default() += 1;
        lines.push((i, l));
    }
    let done: HashSet<usize> = count
        .into_iter()
        .filter(|&(_, n)| n >= group)
        .map(|(i, _)| i)
        .collect();
    let mut kept = String::new();
    for (i, l) in lines {
        if done.contains(&i) {
            kept += l;
            kept.push('\n');
        }
    }
    Ok((kept, done))
}

#[cfg(test)]
mod tests {
    use super::finished_prompts;

    fn line(index: usize, id: &str, sample: usize) -> String {
        serde_json::json!({"prompt_id": id, "prompt_index": index, "sample": sample}).to_string()
    }

    /// Prompts with every response are kept, in file order; a prompt short of its group and a
    /// torn last line are dropped; a line naming another prompt than the data's is refused.
    #[test]
    fn only_whole_prompts_of_the_same_data_are_kept() {
        let ids = ["a", "b", "c"];
        let text = [
            line(1, "b", 0),
            line(0, "a", 0),
            line(1, "b", 1),
            line(0, "a", 1),
            line(2, "c", 0),
            "{\"prompt_id\": \"c\", \"prompt_in".to_string(),
        ]
        .join("\n");
        let (kept, done) = finished_prompts(&text, 2, &ids).unwrap();
        let mut done: Vec<usize> = done.into_iter().collect();
        done.sort();
        assert_eq!(done, [0, 1]);
        let want = [
            line(1, "b", 0),
            line(0, "a", 0),
            line(1, "b", 1),
            line(0, "a", 1),
        ];
        assert_eq!(kept, want.join("\n") + "\n");
        // One response per prompt suffices for a group of one.
        assert_eq!(finished_prompts(&text, 1, &ids).unwrap().1.len(), 3);
        let e = finished_prompts(&text, 2, &["a", "x", "c"]).unwrap_err();
        assert!(e.contains("line 1: prompt 1 is \"b\" there but x"), "{e}");
    }
}
