//! GRPO on the five pretext tasks through the package's graphs: rollouts from the engine,
//! verifiable rewards, group advantages, old/reference log-probs from `logprobs.onnx`, and the
//! gradient step from `train.onnx` (EasyR1's loss and global token-mean normalisation), then
//! gradient clipping and AdamW on the LoRA tensors, which go straight back into the engine.
//!
//! A step ([`Trainer::train_step`]) goes through the files in order: `data` (the prompt sets,
//! screened), `experience` (this rank's prompts, rollouts, rewards, advantages, old and
//! reference log-probs), `update` (the mini-batches through `train.onnx`, the gradients summed
//! over the ranks, AdamW), `metrics` (the step's numbers); `validate` scores held-out prompts,
//! `policy` holds the LoRA tensors and the graphs' inputs, `parallel` what data parallel adds.

pub mod batch;
pub mod bench;
pub mod checkpoint;
pub mod config;
mod parallel;
pub mod plot;
pub mod scale;
pub mod sft;

mod data;
mod experience;
mod metrics;
mod policy;
mod update;
mod validate;

use data::*;
use metrics::*;
pub use metrics::{read_metrics, Metrics};
use policy::*;
pub use policy::{MicroResult, Stats};
pub use update::ImageOutputs;
use update::*;

use crate::data::records::{read_dataset, SampleRecord};
use crate::kernels::{cpu, cuda, AdamW, AdvantageConfig, KernelError, SamplingParams};
use crate::model::package::{PackageError, Positions};
use crate::model::rope::RopeConfig;
use crate::model::session::{Device, DeviceChoice};
use crate::reward::{self, RewardConfig, Score};
use crate::rng::{mix64, Rng};
use crate::rollout::float::Float;
use crate::rollout::{Completion, Engine, EngineError, GenerationConfig, Prepared, Request};
use batch::{MicroBatch, Row};
use checkpoint::{CheckpointError, NamedTensor, State};
use config::TrainConfig;
use ort::session::{Session, SessionInputValue};
use rayon::prelude::*;
use scale::LossScale;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

#[derive(Debug, thiserror::Error)]
pub enum TrainError {
    #[error(transparent)]
    Config(#[from] config::ConfigError),
    #[error(transparent)]
    Engine(#[from] EngineError),
    #[error(transparent)]
    Checkpoint(#[from] CheckpointError),
    #[error(transparent)]
    Kernel(#[from] KernelError),
    #[error(transparent)]
    Image(#[from] crate::data::images::ImageError),
    /// A data file that cannot be read (the message names the file).
    #[error(transparent)]
    Dataset(#[from] crate::data::records::WriteError),
    #[error("{path}: {msg}")]
    Data { path: PathBuf, msg: String },
    #[error("{graph}: {msg}")]
    Run { graph: &'static str, msg: String },
    #[error("{0}")]
    Resume(String),
    /// A failure after which the finished steps were saved.
    #[error("{}\n(the {step} finished steps are saved in {checkpoint}: mend the cause, then run again with --resume)", crate::error_chain(&**.cause), checkpoint = .checkpoint.display())]
    Kept {
        cause: Box<TrainError>,
        step: usize,
        checkpoint: PathBuf,
    },
    #[error("{path}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// A graph's run that ONNX Runtime refused.
    #[error("{graph}")]
    Graph {
        graph: &'static str,
        #[source]
        source: ort::Error,
    },
    /// A line of a run's metrics.jsonl that is not a metrics object.
    #[error("{path}: line {line}")]
    Metrics {
        path: PathBuf,
        line: usize,
        #[source]
        source: serde_json::Error,
    },
    /// A settings file that is not the TOML its reader expects.
    #[error("{path}")]
    Toml {
        path: PathBuf,
        #[source]
        source: toml::de::Error,
    },
    /// The thread decoding the next step's images panicked (a bug, not bad data: a file that
    /// cannot be decoded is left out and named instead).
    #[error("the image loader thread panicked")]
    LoaderPanicked,
    /// LoRA tensors given by name that the package does not have, or of another size.
    #[error("{0}")]
    Lora(String),
    /// Another rank of a data-parallel run failed (its message), or the ranks disagree.
    #[error("rank {rank}: {msg}")]
    Rank { rank: usize, msg: String },
}

fn run_err(graph: &'static str) -> impl Fn(ort::Error) -> TrainError {
    move |source| TrainError::Graph { graph, source }
}

fn io_err(path: &Path) -> impl Fn(std::io::Error) -> TrainError + '_ {
    move |source| TrainError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// Scores a decoded response for a sample. The default is EasyR1's `img_score`.
pub type RewardFn = Arc<dyn Fn(&str, &SampleRecord) -> Score + Send + Sync>;

pub fn img_score(format_weight: f64) -> RewardFn {
    let cfg = RewardConfig { format_weight };
    Arc::new(move |text, s| reward::score(text, &s.answer, &cfg))
}

/// Rollout correction as verl's truncated importance sampling: each token's weight
/// min(exp(old − rollout), cap), the training graph's recomputed old log-prob against the
/// sampler's. Returns the weights (per row, in completion order) and their tally: the weights'
/// mean and max (both after the cap), and the tokens the cap cut (`hits`).
pub fn tis_weights(old: &[Vec<f32>], rollout: &[Vec<f32>], cap: f32) -> (Vec<Vec<f32>>, Tally) {
    let mut tally = Tally::default();
    let w: Vec<Vec<f32>> = old
        .iter()
        .zip(rollout)
        .map(|(o, r)| {
            o.iter()
                .zip(r)
                .map(|(a, b)| {
                    let ratio = (a - b).clamp(-20.0, 20.0).exp();
                    let v = ratio.min(cap);
                    tally.add(f64::from(v), ratio > cap);
                    v
                })
                .collect()
        })
        .collect();
    (w, tally)
}

/// Running statistics of per-token values that ranks add up: count, sum, maximum, and how
/// many were hits (over a cap, say).
#[derive(Debug, Clone, Copy, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Tally {
    pub n: u64,
    pub sum: f64,
    pub max: f64,
    pub hits: u64,
}

impl Tally {
    pub fn add(&mut self, v: f64, hit: bool) {
        self.n += 1;
        self.sum += v;
        self.max = if self.n == 1 { v } else { self.max.max(v) };
        self.hits += u64::from(hit);
    }

    /// Both tallies as one.
    pub fn merge(self, o: Tally) -> Tally {
        Tally {
            n: self.n + o.n,
            sum: self.sum + o.sum,
            max: match (self.n, o.n) {
                (0, _) => o.max,
                (_, 0) => self.max,
                _ => self.max.max(o.max),
            },
            hits: self.hits + o.hits,
        }
    }

    /// Every rank's tallies as one (the same on every rank).
    pub fn over(self, world: &crate::dist::World) -> Tally {
        world
            .gather(&self)
            .into_iter()
            .fold(Tally::default(), Tally::merge)
    }

    /// The mean (0 for none).
    pub fn mean(&self) -> f64 {
        self.sum / self.n.max(1) as f64
    }

    /// The share of hits (0 for none).
    pub fn hit_share(&self) -> f64 {
        self.hits as f64 / self.n.max(1) as f64
    }
}

pub struct Trainer {
    pub cfg: TrainConfig,
    engine: Engine,
    logprobs: Session,
    train: Session,
    /// The vision tower's backward (a package with vision-tower LoRA).
    vision_grad: Option<Session>,
    /// The graphs' embedding type (the package's activations: fp32, fp16 or bf16).
    embeds_type: Float,
    /// Dynamic loss scaling, for a package whose training graph runs in fp16.
    loss_scale: Option<LossScale>,
    /// Micro-batches run again at a lower loss scale during this step.
    scale_backoffs: usize,
    params: Vec<Param>,
    /// Steps completed.
    step: usize,
    data: Dataset,
    val: Dataset,
    backend: Backend,
    reward: RewardFn,
    rope: RopeConfig,
    steps_per_epoch: usize,
    /// The next step's prompts, loading in the background.
    prefetch: Option<Prefetch>,
    /// Prompts left out by `data.filter_overlong_prompts`: training, validation.
    pub overlong: (usize, usize),
    /// Prompts left out when the data opened (training and validation) because an image cannot
    /// be read (`file: cause`) or the prompt cannot be built from its images (`sample ID:
    /// cause`).
    pub unusable: Vec<String>,
    /// The prompts the last step (and its validation) left out because their images cannot
    /// be decoded, as `file: cause`.
    pub left_out: Vec<String>,
    /// Set while a step's optimizer updates are under way: a step that fails then leaves the
    /// weights between two states, which no checkpoint may record.
    updating: bool,
    /// The weights the sessions read (when shared): kept until they are gone.
    weights: Option<std::sync::Arc<std::sync::Mutex<crate::model::weights::SharedWeights>>>,
    /// The data-parallel ranks (one without a launcher): each step's prompts are dealt over
    /// them and their gradients summed.
    world: &'static crate::dist::World,
    /// How the ranks sum their gradients.
    reducer: parallel::Reducer,
}

/// The note of a package with vision-tower LoRA: what trains it (`how`), and where the
/// adapter goes.
pub(crate) fn vision_note(lora: &crate::model::package::LoraSpec, how: &str) -> Option<String> {
    let targets: Vec<&str> = lora
        .targets
        .iter()
        .map(String::as_str)
        .filter(|t| t.starts_with("visual."))
        .collect();
    (!targets.is_empty()).then(|| {
        format!(
            "the package has LoRA on the vision tower ({}): {how}. Loaders of language-model \
             LoRA only (vLLM) would drop its tensors from the checkpoints; ssrl export \
             --adapter merges them all",
            targets.join(", ")
        )
    })
}

/// Where the graphs run, from `rollout.device` and its options (`validate` has checked the
/// name): TensorRT's profiles from the rollout shapes — every prompt's samples at once, prompts
/// up to the image budget.
pub fn device_choice(cfg: &TrainConfig) -> DeviceChoice {
    let r = &cfg.rollout;
    let nonzero = |n: usize| (n > 0).then_some(n);
    let device_id = crate::dist::device_of(r.device_id);
    let device = match Device::from_name(&r.device, device_id).unwrap_or_default() {
        Device::TensorRt { device_id, .. } => Device::TensorRt {
            device_id,
            fp16: r.trt_fp16,
            cache_dir: (!r.trt_cache.as_os_str().is_empty()).then(|| r.trt_cache.clone()),
            workspace_bytes: nonzero(r.trt_workspace),
            limits: Some(crate::model::session::TrtLimits::rollout(
                cfg.data.rollout_batch_size * r.n,
                None,
                cfg.data.max_response_length,
                Some(cfg.data.max_pixels),
            )),
        },
        other => other,
    };
    DeviceChoice {
        device,
        allow_fallback: r.allow_fallback,
        arena: crate::model::session::CudaArena {
            mem_limit: nonzero(r.cuda_mem_limit),
            grow_as_requested: r.cuda_arena_exact,
        },
        profile: None,
        // One copy of the weights for the engine's, the log-prob and the training sessions.
        shared_weights: r.shared_weights,
    }
}

/// Each phase's time of a step into its metrics, and the process's peak resident memory over
/// it (Linux: the peak is reset as each phase ends; elsewhere nothing is recorded).
struct PhaseClock {
    can_reset: bool,
}

impl PhaseClock {
    fn start() -> PhaseClock {
        PhaseClock {
            can_reset: crate::rollout::bench::reset_peak_rss(),
        }
    }

    /// `perf/peak_rss_gb/{k}`: the peak since the last phase ended.
    fn peak(&self, k: &str, m: &mut Metrics) {
        if self.can_reset {
            m.insert(
                format!("perf/peak_rss_gb/{k}"),
                crate::rollout::bench::rss_mb().1 / 1024.0,
            );
            crate::rollout::bench::reset_peak_rss();
        }
    }

    /// `timing_s/{k}` since `t` (and the phase's peak, but for the whole step's).
    fn time(&self, k: &str, t: Instant, m: &mut Metrics) {
        m.insert(format!("timing_s/{k}"), t.elapsed().as_secs_f64());
        if k != "step" {
            self.peak(k, m);
        }
    }
}

impl Trainer {
    /// Opens the package and data and initialises LoRA (PEFT's init: A uniform in
    /// ±1/√fan_in, B zero), seeded by `trainer.seed`.
    pub fn new(cfg: TrainConfig, ort_lib: Option<&Path>) -> Result<Trainer, TrainError> {
        cfg.validate()?;
        let mut t = Trainer::open(cfg, ort_lib)?;
        let cfg = &t.cfg;
        let data = load_dataset(&cfg.data.train_files, cfg.data.images_root())?;
        let val = load_dataset(&cfg.data.val_files, cfg.data.images_root())?;
        let (data, overlong_train, mut unusable) = screened(&t.engine, cfg, data)?;
        let (val, overlong_val, unusable_val) = screened(&t.engine, cfg, val)?;
        unusable.extend(unusable_val);
        let steps_per_epoch = data.samples.len() / cfg.data.rollout_batch_size;
        if steps_per_epoch == 0 {
            return Err(TrainError::Data {
                path: cfg.data.train_files[0].clone(),
                msg: format!(
                    "{} prompts{}, fewer than data.rollout_batch_size = {}",
                    data.samples.len(),
                    {
                        let mut why = Vec::new();
                        if overlong_train > 0 {
                            why.push(format!(
                                "{overlong_train} more too long: data.max_prompt_length"
                            ));
                        }
                        if let Some(first) = unusable.first() {
                            why.push(format!("{} unusable, the first {first}", unusable.len()));
                        }
                        match why.is_empty() {
                            true => String::new(),
                            false => format!(" ({})", why.join("; ")),
                        }
                    },
                    cfg.data.rollout_batch_size
                ),
            });
        }
        t.data = data;
        t.val = val;
        t.steps_per_epoch = steps_per_epoch;
        t.overlong = (overlong_train, overlong_val);
        t.unusable = unusable;
        Ok(t)
    }

    /// The distinct tensors and bytes of the one copy every session reads
    /// (`rollout.shared_weights`, on the CPU or CUDA), `None` when each loads its own.
    pub fn shared_weights(&self) -> Option<(usize, u64)> {
        crate::model::weights::store_size(self.weights.as_ref())
    }

    /// The policy alone — the package's sessions (the engine's, the log-prob and the training
    /// graph), the LoRA parameters at their initial values, the kernels — with no data: what
    /// [`Trainer::new`] builds before it reads the data, and what `ssrl bench train` measures.
    pub fn open(cfg: TrainConfig, ort_lib: Option<&Path>) -> Result<Trainer, TrainError> {
        let choice = device_choice(&cfg);
        let mut engine = Engine::open_on(&cfg.model, ort_lib, &choice)?;
        engine.preprocessor.min_pixels = cfg.data.min_pixels;
        engine.preprocessor.max_pixels = cfg.data.max_pixels;
        // 0: the engine's default.
        engine.set_cpu_slices(Some(cfg.rollout.cpu_slices).filter(|&n| n > 0))?;
        let m = engine.package.manifest.clone();
        if engine.package.is_genai() {
            return Err(TrainError::Data {
                path: cfg.model.clone(),
                msg: "an onnxruntime-genai folder has no LoRA inputs, log-prob or training graph; \
                      train on a package from models/export.py (ssrl export merges the result \
                      back into one for deployment)"
                    .into(),
            });
        }
        if m.graphs.train.is_empty() || m.graphs.logprobs.is_empty() {
            return Err(TrainError::Data {
                path: cfg.model.join("manifest.json"),
                msg: format!(
                    "the package has no log-prob or training graph (a {} package exported before \
                     they existed): it can roll out and be evaluated; export it again with \
                     models/export.py to train it",
                    m.family.name()
                ),
            });
        }
        // Both graphs' activations (GBs at the real widths) go back after each call instead of
        // staying in ONNX Runtime's arena through the other graph's calls and the rollouts, and
        // their weights are not packed beside themselves (Engine::open_graph). 3B widths, 2
        // layers, one row of 190 + 1,024 tokens, weights shared: the log-prob calls' peak 7.2 →
        // 4.1 GB for 7 % of their speed; earlier the training graph's release took its step
        // peak 13.0 → 9.2 GB for 9 % of the step's speed.
        let logprobs = engine.open_graph(&m.graphs.logprobs, true)?;
        let train = engine.open_graph(&m.graphs.train, true)?;
        let vision_grad = match (m.lora.has_vision(), m.graphs.vision_grad.as_str()) {
            (false, _) => None,
            (true, "") => {
                return Err(TrainError::Data {
                    path: cfg.model.join("manifest.json"),
                    msg: "the package has vision-tower LoRA inputs but no vision_grad graph to \
                          train them: export it again with models/export.py"
                        .into(),
                })
            }
            (true, g) => Some(engine.open_graph(g, true)?),
        };
        let backend = Backend::select(
            &cfg.trainer.kernels,
            crate::dist::device_of(cfg.rollout.device_id),
        )?;
        let params = Param::init(&m.lora, cfg.trainer.seed);
        let world = crate::dist::world();
        let reducer = parallel::Reducer::open(world, &backend, cfg.trainer.allreduce)?;
        let rope = m.rope();
        let reward = img_score(cfg.reward.format_weight);
        let empty = || Dataset {
            samples: Vec::new(),
            roots: Vec::new(),
        };
        let embeds_type = Float::of_input(&train, "inputs_embeds");
        let mut t = Trainer {
            cfg,
            weights: engine.shared_weights(),
            engine,
            logprobs,
            train,
            vision_grad,
            embeds_type,
            loss_scale: (embeds_type == Float::F16).then(LossScale::default),
            scale_backoffs: 0,
            params,
            step: 0,
            data: empty(),
            val: empty(),
            backend,
            reward,
            rope,
            steps_per_epoch: 0,
            prefetch: None,
            overlong: (0, 0),
            unusable: Vec::new(),
            left_out: Vec::new(),
            updating: false,
            world,
            reducer,
        };
        t.push_lora()?;
        Ok(t)
    }

    /// Replaces the reward (the default is EasyR1's `img_score`).
    pub fn with_reward(mut self, reward: RewardFn) -> Self {
        self.reward = reward;
        self
    }

    pub fn step(&self) -> usize {
        self.step
    }

    pub fn total_steps(&self) -> usize {
        if self.cfg.trainer.max_steps > 0 {
            self.cfg.trainer.max_steps
        } else {
            self.cfg.trainer.total_epochs * self.steps_per_epoch
        }
    }

    pub fn backend(&self) -> String {
        self.backend.name()
    }

    /// How the ranks sum their gradients: "nccl" or "mpi".
    pub fn allreduce(&self) -> &'static str {
        self.reducer.name()
    }

    pub fn provider(&self) -> &str {
        self.engine.provider()
    }

    /// [`Engine::weights_note`] of the policy's package.
    pub fn weights_note(&self) -> Option<String> {
        self.engine.weights_note()
    }

    /// [`Engine::precision_note`] of the policy's package.
    pub fn precision_note(&self) -> Option<String> {
        self.engine.precision_note()
    }

    /// What a run with vision-tower LoRA should know about its adapter; `None` without one.
    pub fn vision_note(&self) -> Option<String> {
        vision_note(
            &self.engine.package.manifest.lora,
            "ssrl train trains it with the language model's",
        )
    }

    pub fn has_validation(&self) -> bool {
        !self.val.samples.is_empty()
    }

    /// The LoRA tensors by package name.
    pub fn lora(&self) -> Vec<NamedTensor> {
        self.params
            .iter()
            .map(|p| NamedTensor {
                name: p.name.clone(),
                shape: p.shape.clone(),
                data: p.value.clone(),
            })
            .collect()
    }

    fn push_lora(&mut self) -> Result<(), TrainError> {
        let t: Vec<(String, Vec<f32>)> = self
            .params
            .iter()
            .map(|p| (p.name.clone(), p.value.clone()))
            .collect();
        self.engine.set_lora(&t)?;
        Ok(())
    }

    fn checkpoint_root(&self) -> PathBuf {
        self.cfg.out.join("checkpoints")
    }

    /// Writes a checkpoint of the current state ([`parallel::save`]: data parallel, every
    /// rank calls it at the same point and rank 0 writes).
    pub fn save(&self) -> Result<PathBuf, TrainError> {
        parallel::save(
            self.world,
            &self.params,
            self.step,
            self.cfg.resume_key(),
            self.loss_scale,
            &self.cfg.out,
            &self.cfg.model,
            &self.engine.package.manifest.lora,
            self.cfg.trainer.save_limit,
        )
    }

    /// Restores a checkpoint (its configuration must match this run's, except run length and
    /// save/validation frequency).
    pub fn restore(&mut self, dir: &Path) -> Result<(), TrainError> {
        let s = checkpoint::load(dir)?;
        if s.config != self.cfg.resume_key() {
            let diff: Vec<String> = s
                .config
                .lines()
                .zip(self.cfg.resume_key().lines())
                .filter(|(a, b)| a != b)
                .map(|(a, b)| format!("checkpoint `{a}` vs now `{b}`"))
                .take(5)
                .collect();
            return Err(TrainError::Resume(format!(
                "{}: written with other settings ({}); resume with the same train.toml or start a new run folder",
                dir.display(),
                diff.join("; ")
            )));
        }
        Param::restore(&mut self.params, &s, dir)?;
        self.step = s.step;
        if self.loss_scale.is_some() {
            self.loss_scale = Some(s.loss_scale.unwrap_or_default());
        }
        self.prefetch = None;
        self.push_lora()
    }

    /// The newest complete checkpoint of this run, if any.
    pub fn latest_checkpoint(&self) -> Option<PathBuf> {
        checkpoint::latest(&self.checkpoint_root())
    }

    /// Dataset indices of step `step` (0-based): epoch-wise permutation seeded by
    /// `data.seed` and the epoch, incomplete last batch dropped.
    fn batch_indices(&self, step: usize) -> Vec<usize> {
        let b = self.cfg.data.rollout_batch_size;
        let epoch = step / self.steps_per_epoch;
        let within = step % self.steps_per_epoch;
        let mut order: Vec<usize> = (0..self.data.samples.len()).collect();
        if self.cfg.data.shuffle {
            Rng::keyed(self.cfg.data.seed, &[epoch as u64]).shuffle(&mut order);
        }
        order[within * b..(within + 1) * b].to_vec()
    }

    fn format(&self) -> Option<String> {
        format_sentence(&self.cfg)
    }

    fn micro_batch(&self, rows: &[Row<'_>]) -> Result<MicroBatch, TrainError> {
        lay_out(&self.engine, &self.rope, rows)
    }

    fn embed(&mut self, mb: &MicroBatch) -> Result<Vec<f32>, TrainError> {
        embed(&mut self.engine, mb)
    }

    fn batch_inputs(
        &self,
        mb: &MicroBatch,
        embeds: Vec<f32>,
    ) -> Result<Vec<(String, SessionInputValue<'static>)>, TrainError> {
        batch_inputs(&self.engine, self.embeds_type, mb, embeds)
    }

    /// Sets LoRA tensors by package name (`lora.0.q_proj.A`), in the trainer and the engine.
    pub fn set_lora(&mut self, tensors: &[(String, Vec<f32>)]) -> Result<(), TrainError> {
        for (name, v) in tensors {
            let p = self
                .params
                .iter_mut()
                .find(|p| &p.name == name)
                .ok_or_else(|| TrainError::Lora(format!("no LoRA tensor {name}")))?;
            if v.len() != p.value.len() {
                return Err(TrainError::Lora(format!(
                    "{name}: {} values for shape {:?}",
                    v.len(),
                    p.shape
                )));
            }
            p.value = v.clone();
        }
        self.push_lora()
    }

    /// One GRPO step: rollout, reward, advantages, old/ref log-probs, then one optimizer step
    /// per mini-batch. Returns the step's metrics. Data parallel, each rank does this for its
    /// share of the step's prompts, and the ranks sum their gradients before each update.
    pub fn train_step(&mut self) -> Result<Metrics, TrainError> {
        let t_start = Instant::now();
        let mut metrics = Metrics::new();
        let clock = PhaseClock::start();
        let t = Instant::now();
        let share = self.step_prompts(&mut metrics)?;
        clock.time("data", t, &mut metrics);
        let t = Instant::now();
        let out = self.roll_out(&share.reqs);
        let (prepared, completions) = parallel::agree(self.world, out)?;
        clock.time("rollout", t, &mut metrics);
        let t = Instant::now();
        let out = self.rewards(&share.idx, &completions);
        let (scores, advantages) = parallel::agree(self.world, out)?;
        clock.time("reward", t, &mut metrics);
        let rows: Vec<Row<'_>> = completions
            .iter()
            .map(|c| Row {
                prompt: &prepared.prompts[c.prompt_index],
                completion: &c.tokens,
                grids: &prepared.grids[c.prompt_index],
                features: &prepared.features[c.prompt_index],
                deepstack: prepared
                    .deepstack
                    .get(c.prompt_index)
                    .map_or(&[][..], Vec::as_slice),
            })
            .collect();
        let t = Instant::now();
        // With vision-tower LoRA: the prompts' pixels for its backward, and the reference
        // policy's (the base tower's) image features.
        let images = self.step_images(&share.reqs, &completions);
        let images = parallel::agree(self.world, images)?;
        let base = match &images {
            Some(im) if self.kl_coef() != 0.0 => Some(self.prompt_features(im, false)),
            _ => None,
        };
        let base = parallel::agree(self.world, base.transpose())?;
        let ref_rows: Option<Vec<Row<'_>>> = base.as_ref().map(|b| {
            rows.iter()
                .zip(&completions)
                .map(|(r, c)| Row {
                    features: &b[c.prompt_index].0,
                    deepstack: &b[c.prompt_index].1,
                    ..*r
                })
                .collect()
        });
        let lp = self.policy_logprobs(&rows, ref_rows.as_deref(), &completions, &mut metrics);
        let lp = parallel::agree(self.world, lp)?;
        clock.time("logprobs", t, &mut metrics);
        // Each row's mini-batch: its prompt's place among the step's prompts on all ranks.
        let gbs = self.cfg.actor.global_batch_size;
        let mini_of: Vec<usize> = (completions.iter())
            .map(|c| share.order[c.prompt_index] / gbs)
            .collect();
        let minis = share.prompts.div_ceil(gbs);
        self.update(
            &rows,
            &mini_of,
            minis,
            images.as_ref(),
            &advantages,
            &lp,
            &mut metrics,
        )?;
        clock.peak("train", &mut metrics);
        clock.time("step", t_start, &mut metrics);
        let sampled: Vec<Sampled> = (completions.iter().zip(&scores).zip(&advantages))
            .map(|((c, s), a)| Sampled {
                order: share.order[c.prompt_index],
                task: self.data.samples[share.idx[c.prompt_index]].task.clone(),
                overall: s.overall,
                format: s.format,
                accuracy: s.accuracy,
                advantage: *a,
                tokens: c.tokens.len(),
                clipped: c.finish == crate::rollout::Finish::Length,
            })
            .collect();
        let mut sampled: Vec<Sampled> = self.world.gather(&sampled).concat();
        // (in the step's prompt order, each prompt's samples as generated: as one process)
        sampled.sort_by_key(|s| s.order);
        parallel::merge_metrics(self.world, &mut metrics);
        step_metrics(&sampled, &mut metrics);
        self.step += 1;
        self.updating = false;
        metrics.insert("step".into(), self.step as f64);
        metrics.insert(
            "epoch".into(),
            (self.step - 1) as f64 / self.steps_per_epoch as f64,
        );
        Ok(metrics)
    }

    /// `e`, after a checkpoint of the steps finished so far where they have none yet and the
    /// weights are whole (the failure came before the step's first optimizer update), so that
    /// `--resume` continues from there once the cause is mended.
    fn kept_after(&self, e: TrainError) -> TrainError {
        if self.updating || self.step == 0 || !parallel::shared(self.world, &e) {
            return e;
        }
        // (rank 0's listing, so that every rank takes the same way)
        let listed = self.world.is_root().then(|| {
            Ok(checkpoint::list(&self.checkpoint_root())
                .pop()
                .filter(|(step, _)| *step == self.step)
                .map(|(_, dir)| dir))
        });
        let Ok(saved) = parallel::from_root(self.world, listed) else {
            return e;
        };
        match saved.map_or_else(|| self.save(), Ok) {
            Ok(checkpoint) => TrainError::Kept {
                cause: Box::new(e),
                step: self.step,
                checkpoint,
            },
            Err(_) => e,
        }
    }

    /// Runs to `total_steps`, appending to `out/metrics.jsonl`, validating and checkpointing on
    /// schedule. `stop` (set by Ctrl-C) ends the run after the current step, with a checkpoint.
    /// `on_step` sees each step's metrics, its number and the prompts it (and its validation)
    /// left out because their images cannot be decoded, as `file: cause` (progress display).
    pub fn run(
        &mut self,
        stop: &AtomicBool,
        mut on_step: impl FnMut(&Metrics, usize, &[String]),
    ) -> Result<RunEnd, TrainError> {
        let log = parallel::open_log(
            self.world,
            &self.cfg.out,
            "train.toml",
            &self.cfg.to_toml(),
            self.step,
        )?;
        let total = self.total_steps();
        let val_freq = self.cfg.trainer.val_freq;
        let check = self.cfg.trainer.replica_check_freq;
        if self.step == 0 && self.cfg.trainer.val_before_train && self.has_validation() {
            let mut m = self.validate()?;
            m.insert("step".into(), 0.0);
            log.append(&m)?;
            on_step(&m, 0, &self.left_out);
        }
        while self.step < total {
            // (Ctrl-C reaches every rank, not always before the same step: any rank's stop
            // stops them all here)
            if self.world.any(stop.load(Ordering::SeqCst)) {
                let ckpt = self.save()?;
                return Ok(RunEnd::Interrupted { checkpoint: ckpt });
            }
            let mut m = match self.train_step() {
                Ok(m) => m,
                Err(e) => return Err(self.kept_after(e)),
            };
            if check > 0 && self.step % check == 0 {
                parallel::check_replicas(self.world, &self.params, self.step)?;
            }
            if val_freq > 0 && self.step % val_freq == 0 && self.has_validation() {
                match self.validate() {
                    Ok(v) => m.extend(v),
                    Err(e) => {
                        // The step itself is done: its metrics are kept with it.
                        log.append(&m)?;
                        return Err(self.kept_after(e));
                    }
                }
            }
            log.append(&m)?;
            on_step(&m, self.step, &self.left_out);
            let save_freq = self.cfg.trainer.save_freq;
            if (save_freq > 0 && self.step % save_freq == 0) || self.step == total {
                self.save()?;
            }
        }
        Ok(RunEnd::Finished {
            checkpoint: self.latest_checkpoint(),
        })
    }
}

#[derive(Debug)]
pub enum RunEnd {
    Finished { checkpoint: Option<PathBuf> },
    Interrupted { checkpoint: PathBuf },
}

impl From<PackageError> for TrainError {
    fn from(e: PackageError) -> Self {
        TrainError::Engine(e.into())
    }
}

#[cfg(test)]
mod tests {
    /// Statistics are read by the manifest's names and summed by name; a graph reporting
    /// another count than the manifest names is refused, naming them.
    #[test]
    fn statistics_are_named_by_the_manifest() {
        let names: Vec<String> = ["tokens", "kl", "entropy"].map(String::from).to_vec();
        let mut a = super::Stats::read(&names, &[4.0, 0.5, 2.0], "train").unwrap();
        let b = super::Stats::read(&names, &[6.0, 1.5, 3.0], "train").unwrap();
        a.add(&b);
        assert_eq!(
            (a.get("tokens"), a.get("kl"), a.get("entropy")),
            (10.0, 2.0, 5.0)
        );
        assert_eq!(
            a.get("ppo_kl"),
            0.0,
            "a statistic the graph does not report"
        );
        let e = super::Stats::read(&names, &[1.0, 2.0], "train")
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("2 statistics") && e.contains("tokens, kl, entropy"),
            "{e}"
        );
    }

    #[test]
    fn tis_weights_are_capped_ratios_of_old_to_rollout() {
        let old = vec![vec![-1.0f32, -0.5, -3.0], vec![-2.0]];
        let rollout = vec![vec![-1.0f32, -1.5, -2.0], vec![-0.5]];
        let (w, tally) = super::tis_weights(&old, &rollout, 2.0);
        let e = |x: f32| x.exp();
        assert_eq!(w[0][0], 1.0);
        assert_eq!(w[0][1], 2.0, "e^1 = 2.72 is capped at 2");
        assert!((w[0][2] - e(-1.0)).abs() < 1e-7);
        assert!((w[1][0] - e(-1.5)).abs() < 1e-7);
        let mean = (1.0 + 2.0 + f64::from(e(-1.0)) + f64::from(e(-1.5))) / 4.0;
        assert!((tally.mean() - mean).abs() < 1e-6);
        assert_eq!(tally.max, 2.0);
        assert_eq!(tally.hit_share(), 0.25);
        // Ranks' tallies add up to one over all their tokens.
        let (_, a) = super::tis_weights(&old[..1], &rollout[..1], 2.0);
        let (_, b) = super::tis_weights(&old[1..], &rollout[1..], 2.0);
        assert_eq!(a.merge(b), tally);
        assert_eq!(Tally::default().merge(b), b);
    }

    use super::*;

    /// A folder of shards loads as its files in name order, its images resolving against the
    /// folder above `data/`; a folder without data files is an error naming it.
    #[test]
    fn a_data_folder_loads_every_shard_in_order() {
        let dir = std::env::temp_dir().join(format!("ssrl-shards-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(dir.join("data")).unwrap();
        let line = |id: &str| {
            format!(
                r#"{{"id":"{id}","task":"flip","problem":"p","answer":"1","images":[],"source":[],"meta":{{}}}}"#
            )
        };
        std::fs::write(dir.join("data/part-00001.jsonl"), line("c") + "\n").unwrap();
        std::fs::write(
            dir.join("data/part-00000.jsonl"),
            format!("{}\n{}\n", line("a"), line("b")),
        )
        .unwrap();
        std::fs::write(dir.join("data/notes.txt"), "not data").unwrap();
        let d = load_dataset(std::slice::from_ref(&dir), None).unwrap();
        let ids: Vec<&str> = d.samples.iter().map(|s| s.id.as_str()).collect();
        assert_eq!(ids, ["a", "b", "c"]);
        assert!(d.roots.iter().all(|r| r == &dir));
        let empty = dir.join("empty");
        std::fs::create_dir_all(&empty).unwrap();
        let err = load_dataset(&[empty], None).err().unwrap().to_string();
        assert!(
            err.contains("empty") && err.contains("no .parquet or .jsonl"),
            "{err}"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
