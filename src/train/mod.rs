//! GRPO on the five pretext tasks through the package's graphs: rollouts from the engine,
//! verifiable rewards, group advantages, old/reference log-probs from `logprobs.onnx`, and the
//! gradient step from `train.onnx` (EasyR1's loss and global token-mean normalisation), then
//! gradient clipping and AdamW on the LoRA tensors, which go straight back into the engine.

pub mod batch;
pub mod bench;
pub mod checkpoint;
pub mod config;
mod parallel;
pub mod plot;
pub mod scale;
pub mod sft;

mod data;
mod metrics;
mod policy;

use data::*;
use metrics::*;
pub use metrics::{read_metrics, Metrics};
use policy::*;
pub use policy::{MicroResult, Stats};

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

/// A step's images for the vision tower's LoRA: each prompt's pixel rows (its images' one
/// after the other) and grids, and each row's prompt.
struct StepImages {
    pixels: Vec<Vec<f32>>,
    grids: Vec<Vec<[u32; 3]>>,
    prompt_of: Vec<usize>,
}

/// Adds each gradient of `more` into `acc`'s.
fn add_into(acc: &mut [Vec<f32>], more: &[Vec<f32>]) {
    for (a, b) in acc.iter_mut().zip(more) {
        a.iter_mut().zip(b).for_each(|(x, y)| *x += y);
    }
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

/// The log-probs a step's update takes: the old policy's and the reference's per row, the
/// rollout correction's weights, and the KL coefficient in force.
struct StepLogprobs {
    old: Vec<Vec<f32>>,
    reference: Vec<Vec<f32>>,
    is_weights: Option<Vec<Vec<f32>>>,
    kl_coef: f32,
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
        let w = self.weights.as_ref()?;
        let w = w.lock().unwrap_or_else(|e| e.into_inner());
        Some((w.tensors(), w.bytes()))
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
        let rope = RopeConfig {
            image_token_id: m.tokens.image,
            video_token_id: m.tokens.video,
            spatial_merge_size: m.vision.spatial_merge_size,
            tokens_per_second: m.vision.tokens_per_second,
        };
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

    /// `logprobs.onnx` over rows, in micro-batches; `lora = false` runs the base model (the
    /// reference policy). Returns each row's completion log-probs.
    pub fn completion_logprobs(
        &mut self,
        rows: &[Row<'_>],
        lora: bool,
    ) -> Result<Vec<Vec<f32>>, TrainError> {
        Ok(self
            .completion_logprobs_for(rows, &[lora])?
            .pop()
            .expect("one setting asked for"))
    }

    /// [`Trainer::completion_logprobs`] for several LoRA settings at once: each micro-batch is
    /// laid out and embedded once and run once per setting.
    pub fn completion_logprobs_for(
        &mut self,
        rows: &[Row<'_>],
        loras: &[bool],
    ) -> Result<Vec<Vec<Vec<f32>>>, TrainError> {
        let chunk = self.cfg.actor.micro_batch_size_per_device_for_experience;
        let budget = self.cfg.actor.max_token_len_per_micro_batch;
        let mut out = vec![Vec::with_capacity(rows.len()); loras.len()];
        for range in batch::split(rows, chunk, budget) {
            let mb = self.micro_batch(&rows[range])?;
            let embeds = self.embed(&mb)?;
            for (slot, &lora) in out.iter_mut().zip(loras) {
                let mut inputs = self.batch_inputs(&mb, embeds.clone())?;
                inputs.push(("temperature".into(), scalar(self.cfg.rollout.temperature)?));
                inputs.extend(Param::inputs(&self.params, false, !lora)?);
                let res = self.logprobs.run(inputs).map_err(run_err("logprobs"))?;
                let (_, lp) = res["token_logprobs"]
                    .try_extract_tensor::<f32>()
                    .map_err(run_err("logprobs"))?;
                slot.extend(mb.completion_values(lp));
            }
        }
        Ok(out)
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

    /// One `train.onnx` call: the loss of `rows` (summed over their completion tokens and
    /// divided by `token_count`, the mini-batch's tokens), the LoRA gradients in parameter
    /// order, and the stat sums. Per-row values are in completion order; `is_weights`, when
    /// given, weights each token's policy loss (rollout correction, [`tis_weights`]).
    #[allow(clippy::too_many_arguments)]
    pub fn loss_and_grads(
        &mut self,
        rows: &[Row<'_>],
        old: &[Vec<f32>],
        reference: &[Vec<f32>],
        advantages: &[f32],
        kl_coef: f32,
        token_count: usize,
        is_weights: Option<&[Vec<f32>]>,
    ) -> Result<MicroResult, TrainError> {
        let cfg = &self.cfg;
        let (t, low, high, dual) = (
            cfg.rollout.temperature,
            cfg.actor.clip_ratio_low,
            cfg.actor.clip_ratio_high,
            cfg.actor.clip_ratio_dual,
        );
        let mb = self.micro_batch(rows)?;
        let embeds = self.embed(&mb)?;
        loop {
            let scale = self.loss_scale.map_or(1.0, |s| s.scale);
            let r = self.run_train(
                &mb,
                embeds.clone(),
                [old, reference],
                advantages,
                [t, low, high, dual, kl_coef, token_count as f32, scale],
                is_weights,
            )?;
            // fp16: gradients that overflowed at this scale are run again at a lower one.
            // (with vision-tower LoRA, the image features' gradient too)
            let finite = || scale::all_finite(&r.grads) && scale::finite(&r.feature_grads);
            if !scale::rerun(&mut self.loss_scale, finite) {
                return Ok(r);
            }
            self.scale_backoffs += 1;
        }
    }

    /// One `train.onnx` run of the micro-batch `mb`; `settings` are temperature, the three clip
    /// ratios, the KL coefficient, the token count and the loss scale.
    fn run_train(
        &mut self,
        mb: &MicroBatch,
        embeds: Vec<f32>,
        [old, reference]: [&[Vec<f32>]; 2],
        advantages: &[f32],
        settings: [f32; 7],
        is_weights: Option<&[Vec<f32>]>,
    ) -> Result<MicroResult, TrainError> {
        let mut inputs = self.batch_inputs(mb, embeds)?;
        let olds: Vec<&[f32]> = old.iter().map(Vec::as_slice).collect();
        let refs: Vec<&[f32]> = reference.iter().map(Vec::as_slice).collect();
        let shape = [mb.rows, mb.cols];
        inputs.push((
            "completion_mask".into(),
            tensor(&shape, mb.completion_mask.clone())?,
        ));
        inputs.push(("old_logprobs".into(), tensor(&shape, mb.scatter(&olds))?));
        inputs.push(("ref_logprobs".into(), tensor(&shape, mb.scatter(&refs))?));
        let weights = match is_weights {
            Some(w) => mb.scatter(&w.iter().map(Vec::as_slice).collect::<Vec<_>>()),
            None => vec![1.0; mb.rows * mb.cols],
        };
        inputs.push(("rollout_is_weights".into(), tensor(&shape, weights)?));
        inputs.push((
            "advantages".into(),
            tensor(&[mb.rows], advantages.to_vec())?,
        ));
        let names = [
            "temperature",
            "clip_ratio_low",
            "clip_ratio_high",
            "clip_ratio_dual",
            "kl_coef",
            "token_count",
            "loss_scale",
        ];
        for (name, v) in names.into_iter().zip(settings) {
            inputs.push((name.into(), scalar(v)?));
        }
        inputs.extend(Param::inputs(&self.params, false, false)?);
        let res = self.train.run(inputs).map_err(run_err("train"))?;
        let (_, loss) = res["loss"]
            .try_extract_tensor::<f32>()
            .map_err(run_err("train"))?;
        let (_, st) = res["stats"]
            .try_extract_tensor::<f32>()
            .map_err(run_err("train"))?;
        let m = &self.engine.package.manifest;
        let stats = Stats::read(&m.train.stats, st, "train")?;
        let grads = Param::read_grads(&self.params, &res, "train", false)?;
        let feature_grads = match self.vision_grad {
            None => Vec::new(),
            Some(_) => {
                let (_, g) = res["grad.inputs_embeds"]
                    .try_extract_tensor::<f32>()
                    .map_err(run_err("train"))?;
                let placeholders = [i64::from(m.tokens.image), i64::from(m.tokens.video)];
                let scale = settings[6];
                let mut rows = mb.feature_rows(g, m.text.hidden_size, placeholders);
                rows.iter_mut().for_each(|v| *v /= scale);
                rows
            }
        };
        Ok(MicroResult {
            loss: f64::from(loss[0]),
            grads,
            feature_grads,
            stats,
        })
    }

    /// The image features of one prompt's images (`pixels`: their pixel rows one after the
    /// other, as [`preprocess`](crate::model::processor::preprocess) makes them; `grids`: theirs)
    /// with the current vision-tower LoRA (`lora`) or without it (the reference policy's).
    pub fn image_features(
        &mut self,
        pixels: &[f32],
        grids: &[[u32; 3]],
        lora: bool,
    ) -> Result<Vec<f32>, TrainError> {
        let patches = |g: &[u32; 3]| (g[0] * g[1] * g[2]) as usize;
        let width = pixels.len() / grids.iter().map(patches).sum::<usize>().max(1);
        let (mut out, mut at) = (Vec::new(), 0);
        for g in grids {
            let n = patches(g) * width;
            out.extend(
                self.engine
                    .image_features_of(&pixels[at..at + n], *g, lora)?,
            );
            at += n;
        }
        Ok(out)
    }

    /// The vision-tower LoRA gradients of one prompt's images (as [`Trainer::image_features`]
    /// takes them) from the loss's gradient at their features (`feature_grads`, unscaled, as
    /// [`MicroResult::feature_grads`] gives them, summed over the micro-batches): one
    /// vision_grad.onnx run at the current loss scale, run again at a lower one should the
    /// half-precision backward overflow. In parameter order, zeros for the language model's.
    pub fn vision_grads(
        &mut self,
        pixels: &[f32],
        grids: &[[u32; 3]],
        feature_grads: &[f32],
    ) -> Result<Vec<Vec<f32>>, TrainError> {
        let Some(sess) = self.vision_grad.as_mut() else {
            return Err(TrainError::Run {
                graph: "vision_grad",
                msg: "the package has no vision-tower LoRA".into(),
            });
        };
        let d = self.engine.package.manifest.vision.out_hidden_size;
        let patches: usize = grids.iter().map(|g| (g[0] * g[1] * g[2]) as usize).sum();
        let grid: Vec<i64> = grids.iter().flatten().map(|&v| i64::from(v)).collect();
        loop {
            let scale = self.loss_scale.map_or(1.0, |s| s.scale);
            let mut inputs = vec![
                (
                    "pixel_values".to_string(),
                    tensor(&[patches, pixels.len() / patches.max(1)], pixels.to_vec())?,
                ),
                (
                    "image_grid_thw".into(),
                    tensor(&[grids.len(), 3], grid.clone())?,
                ),
                (
                    "grad_features".into(),
                    tensor(
                        &[feature_grads.len() / d, d],
                        feature_grads.iter().map(|g| g * scale).collect(),
                    )?,
                ),
                ("loss_scale".into(), scalar(scale)?),
            ];
            inputs.extend(Param::inputs(&self.params, true, false)?);
            let res = sess.run(inputs).map_err(run_err("vision_grad"))?;
            let grads = Param::read_grads(&self.params, &res, "vision_grad", true)?;
            if !scale::rerun(&mut self.loss_scale, || scale::all_finite(&grads)) {
                return Ok(grads);
            }
            self.scale_backoffs += 1;
        }
    }

    /// Each prompt's image features, with (`lora`) or without the vision-tower LoRA.
    fn prompt_features(
        &mut self,
        images: &StepImages,
        lora: bool,
    ) -> Result<Vec<Vec<f32>>, TrainError> {
        images
            .pixels
            .iter()
            .zip(&images.grids)
            .map(|(px, g)| self.image_features(px, g, lora))
            .collect()
    }

    /// The step's prompts' pixels for the vision tower's backward (`None` without vision-tower
    /// LoRA), preprocessed again as the rollout did.
    fn step_images(
        &self,
        reqs: &[Request],
        completions: &[Completion],
    ) -> Result<Option<StepImages>, TrainError> {
        if self.vision_grad.is_none() {
            return Ok(None);
        }
        let cfg = &self.engine.preprocessor;
        let each = reqs
            .par_iter()
            .map(|r| {
                let mut px = Vec::new();
                let mut grids = Vec::new();
                for img in &r.images {
                    let p =
                        crate::model::processor::preprocess(img, cfg).map_err(EngineError::from)?;
                    px.extend(p.pixel_values);
                    grids.push(p.grid_thw);
                }
                Ok((px, grids))
            })
            .collect::<Result<Vec<_>, TrainError>>()?;
        let (pixels, grids) = each.into_iter().unzip();
        Ok(Some(StepImages {
            pixels,
            grids,
            prompt_of: completions.iter().map(|c| c.prompt_index).collect(),
        }))
    }

    /// Sets LoRA tensors by package name (`lora.0.q_proj.A`), in the trainer and the engine.
    pub fn set_lora(&mut self, tensors: &[(String, Vec<f32>)]) -> Result<(), TrainError> {
        for (name, v) in tensors {
            let p = self
                .params
                .iter_mut()
                .find(|p| &p.name == name)
                .ok_or_else(|| TrainError::Resume(format!("no LoRA tensor {name}")))?;
            if v.len() != p.value.len() {
                return Err(TrainError::Resume(format!(
                    "{name}: {} values for shape {:?}",
                    v.len(),
                    p.shape
                )));
            }
            p.value = v.clone();
        }
        self.push_lora()
    }

    /// Runs validation: one greedy (or `val_temperature`) sample per held-out prompt, the
    /// prompts dealt over the ranks and their scores gathered.
    pub fn validate(&mut self) -> Result<Metrics, TrainError> {
        let n = self.val.samples.len().min(self.cfg.data.val_batch_size);
        let mine = self.world.share(n);
        let mut metrics = Metrics::new();
        if n == 0 {
            return Ok(metrics);
        }
        let out = self.validate_share(&mine);
        let (scores, left) = parallel::agree(self.world, out)?;
        let (mut scores_all, mut left_all) = (Vec::new(), Vec::new());
        for (s, l) in self.world.gather(&(scores, left)) {
            scores_all.extend(s);
            left_all.extend(l);
        }
        scores_all.sort_by_key(|s: &(usize, String, Score, usize)| s.0);
        left_all.sort_unstable();
        self.left_out.extend(left_all.into_iter().map(|(_, e)| e));
        let scores: Vec<(String, Score, usize)> =
            scores_all.into_iter().map(|s| (s.1, s.2, s.3)).collect();
        metrics.insert(
            "val/reward".into(),
            mean(scores.iter().map(|s| s.1.overall)),
        );
        metrics.insert(
            "val/accuracy".into(),
            mean(scores.iter().map(|s| s.1.accuracy)),
        );
        metrics.insert("val/format".into(), mean(scores.iter().map(|s| s.1.format)));
        metrics.insert(
            "val/response_length".into(),
            mean(scores.iter().map(|s| s.2 as f64)),
        );
        let tasks: std::collections::BTreeSet<&String> = scores.iter().map(|s| &s.0).collect();
        for t in tasks {
            metrics.insert(
                format!("val/accuracy/{t}"),
                mean(scores.iter().filter(|s| &s.0 == t).map(|s| s.1.accuracy)),
            );
        }
        Ok(metrics)
    }

    /// This rank's validation prompts (positions in the validation set) scored: (position,
    /// task, score, response tokens) each, and those whose images cannot be read.
    #[allow(clippy::type_complexity)]
    fn validate_share(
        &mut self,
        mine: &[usize],
    ) -> Result<(Vec<(usize, String, Score, usize)>, Vec<(usize, String)>), TrainError> {
        let (mut scores, mut left) = (Vec::new(), Vec::new());
        let chunk = self
            .cfg
            .actor
            .micro_batch_size_per_device_for_experience
            .max(1);
        for part in mine.chunks(chunk) {
            let loaded = load_requests(&self.val.pending(part), part, 0x7661_6c00);
            let (part, reqs, gone) = usable(part, loaded);
            left.extend(gone);
            if reqs.is_empty() {
                continue;
            }
            let gen = GenerationConfig {
                group: 1,
                max_new_tokens: self.cfg.data.max_response_length,
                sampling: SamplingParams {
                    temperature: self.cfg.rollout.val_temperature,
                    top_k: 0,
                    top_p: self.cfg.rollout.val_top_p,
                    seed: self.cfg.trainer.seed,
                },
                verbatim: false,
                format_sentence: self.format(),
            };
            let out = self.engine.generate(&reqs, &gen, None)?;
            for c in out {
                let at = part[c.prompt_index];
                let s = &self.val.samples[at];
                let text = self
                    .engine
                    .prompts
                    .decode(&c.tokens)
                    .map_err(EngineError::from)?;
                scores.push((at, s.task.clone(), (self.reward)(&text, s), c.tokens.len()));
            }
        }
        Ok((scores, left))
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
                    features: &b[c.prompt_index],
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

    /// This rank's share of the step's prompts (their requests with images decoded): decoded
    /// in the background during the previous step (double buffering), the next step's
    /// decoding started now. A prompt whose images cannot be decoded is left out of the step
    /// (named in `left_out`, on every rank), not the run's end.
    fn step_prompts(&mut self, metrics: &mut Metrics) -> Result<StepShare, TrainError> {
        let seed = self.cfg.trainer.seed;
        let all = self.batch_indices(self.step);
        let mine = self.world.share(all.len());
        let salt = |step: usize| mix64(seed ^ (step as u64) << 20);
        let loaded = match self.prefetch.take() {
            Some((step, handle)) if step == self.step => handle
                .join()
                .map_err(|_| TrainError::Resume("the image loader thread panicked".into()))?,
            _ => load_requests(
                &self.data.pending(&pick(&all, &mine)),
                &mine,
                salt(self.step),
            ),
        };
        let (kept, reqs, left) = usable(&mine, loaded);
        // Which of the step's prompts every rank kept, and why the others were left out.
        let (mut order_all, mut left_all) = (Vec::new(), Vec::new());
        for (k, l) in self.world.gather(&(kept.clone(), left)) {
            order_all.extend(k);
            left_all.extend(l);
        }
        order_all.sort_unstable();
        left_all.sort_unstable();
        self.left_out = left_all.into_iter().map(|(_, e)| e).collect();
        if !self.left_out.is_empty() {
            metrics.insert("data/unreadable_prompts".into(), self.left_out.len() as f64);
        }
        if order_all.is_empty() {
            return Err(TrainError::Data {
                path: self.cfg.data.train_files[0].clone(),
                msg: format!(
                    "no prompt of step {} has images that can be read: {}",
                    self.step + 1,
                    self.left_out.join("; ")
                ),
            });
        }
        if self.step + 1 < self.total_steps() {
            let next_all = self.batch_indices(self.step + 1);
            let next_mine = self.world.share(next_all.len());
            let next = self.data.pending(&pick(&next_all, &next_mine));
            let salt = salt(self.step + 1);
            self.prefetch = Some((
                self.step + 1,
                std::thread::spawn(move || load_requests(&next, &next_mine, salt)),
            ));
        }
        Ok(StepShare {
            idx: pick(&all, &kept),
            order: (kept.iter())
                .map(|p| {
                    order_all
                        .binary_search(p)
                        .expect("every rank's kept are gathered")
                })
                .collect(),
            prompts: order_all.len(),
            reqs,
        })
    }

    /// `rollout.n` samples of each prompt with the current LoRA.
    fn roll_out(&mut self, reqs: &[Request]) -> Result<(Prepared, Vec<Completion>), TrainError> {
        if reqs.is_empty() {
            // (a rank whose share of the step could not be read)
            return Ok((Prepared::default(), Vec::new()));
        }
        let cfg = &self.cfg;
        let gen = GenerationConfig {
            group: cfg.rollout.n,
            max_new_tokens: cfg.data.max_response_length,
            sampling: SamplingParams {
                temperature: cfg.rollout.temperature,
                top_k: cfg.rollout.top_k.max(0) as usize,
                top_p: cfg.rollout.top_p,
                seed: cfg.trainer.seed,
            },
            verbatim: false,
            format_sentence: self.format(),
        };
        let prepared: Prepared = self.engine.prepare(reqs, self.format().as_deref())?;
        let completions = self.engine.generate_prepared(reqs, &prepared, &gen, None)?;
        Ok((prepared, completions))
    }

    /// Each sample's reward against its prompt's sample (`idx`), and the group advantages.
    fn rewards(
        &self,
        idx: &[usize],
        completions: &[Completion],
    ) -> Result<(Vec<Score>, Vec<f32>), TrainError> {
        let mut scores = Vec::with_capacity(completions.len());
        for c in completions {
            let s = &self.data.samples[idx[c.prompt_index]];
            let text = self
                .engine
                .prompts
                .decode(&c.tokens)
                .map_err(EngineError::from)?;
            scores.push((self.reward)(&text, s));
        }
        if scores.is_empty() {
            return Ok((scores, Vec::new()));
        }
        let overall: Vec<f32> = scores.iter().map(|s| s.overall as f32).collect();
        let adv_cfg = self.cfg.algorithm.adv_estimator.config();
        let advantages = self
            .backend
            .advantages(&overall, self.cfg.rollout.n, &adv_cfg)?;
        Ok((scores, advantages))
    }

    /// The KL term's coefficient (0 without it).
    fn kl_coef(&self) -> f32 {
        let alg = &self.cfg.algorithm;
        if alg.use_kl_loss {
            alg.kl_coef
        } else {
            0.0
        }
    }

    /// The old policy's log-probs (recomputed, or the sampler's), the reference's (LoRA off)
    /// where the KL term needs them, and the rollout correction's weights; the sampler /
    /// trainer mismatch and the weights' statistics go to `metrics`. `ref_rows` are the rows
    /// with the base vision tower's image features (a package with vision-tower LoRA; else
    /// `rows` serve both).
    fn policy_logprobs(
        &mut self,
        rows: &[Row<'_>],
        ref_rows: Option<&[Row<'_>]>,
        completions: &[Completion],
        metrics: &mut Metrics,
    ) -> Result<StepLogprobs, TrainError> {
        let rollout_lp: Vec<Vec<f32>> = completions.iter().map(|c| c.logprobs.clone()).collect();
        let kl_coef = self.kl_coef();
        let recompute = self.cfg.actor.old_logprobs == "recompute";
        let tis_cap = self.cfg.actor.tis_cap;
        let wanted = [(recompute, true), (kl_coef != 0.0, false)];
        let computed = match ref_rows {
            // (the two settings embed different features)
            Some(base) => {
                let mut out = Vec::new();
                for (want, lora) in wanted {
                    if want {
                        let on = if lora { rows } else { base };
                        out.extend(self.completion_logprobs_for(on, &[lora])?);
                    }
                }
                out
            }
            None => {
                let settings: Vec<bool> = wanted
                    .into_iter()
                    .filter_map(|(want, lora)| want.then_some(lora))
                    .collect();
                self.completion_logprobs_for(rows, &settings)?
            }
        };
        let mut computed = computed.into_iter();
        let old = if recompute {
            let old = computed.next().expect("asked for");
            let mut diffs = Tally::default();
            (old.iter().flatten().zip(rollout_lp.iter().flatten()))
                .for_each(|(a, b)| diffs.add(f64::from((a - b).abs()), false));
            // (over every rank's tokens)
            let diffs = diffs.over(self.world);
            metrics.insert("rollout/logprob_mismatch_mean".into(), diffs.mean());
            metrics.insert("rollout/logprob_mismatch_max".into(), diffs.max);
            old
        } else {
            rollout_lp.clone()
        };
        let reference = computed.next().unwrap_or_else(|| old.clone());
        let is_weights = (tis_cap > 0.0).then(|| {
            let (w, tally) = tis_weights(&old, &rollout_lp, tis_cap);
            let t = tally.over(self.world);
            metrics.insert("rollout/tis_weight_mean".into(), t.mean());
            metrics.insert("rollout/tis_weight_max".into(), t.max);
            metrics.insert("rollout/tis_capped_frac".into(), t.hit_share());
            w
        });
        Ok(StepLogprobs {
            old,
            reference,
            is_weights,
            kl_coef,
        })
    }

    /// One optimizer step per mini-batch of `actor.global_batch_size` prompts (`minis` of
    /// them; row `i` in mini-batch `mini_of[i]`): its micro-batches through `train.onnx`, the
    /// gradients summed over the ranks, clipped, AdamW; the new LoRA into the engine. A rank
    /// with no rows in a mini-batch adds zeros. The loss, its statistics, the gradient norms
    /// and the time split go to `metrics`.
    #[allow(clippy::too_many_arguments)]
    fn update(
        &mut self,
        rows: &[Row<'_>],
        mini_of: &[usize],
        minis: usize,
        images: Option<&StepImages>,
        advantages: &[f32],
        lp: &StepLogprobs,
        metrics: &mut Metrics,
    ) -> Result<(), TrainError> {
        let a = &self.cfg.actor;
        let (micro_rows, micro_tokens, max_norm) = (
            a.micro_batch_size_per_device_for_update,
            a.max_token_len_per_micro_batch,
            a.max_grad_norm,
        );
        let h = AdamW {
            lr: a.optim.lr,
            beta1: a.optim.betas[0],
            beta2: a.optim.betas[1],
            eps: a.optim.eps,
            weight_decay: a.optim.weight_decay,
        };
        let (mut t_train, mut t_optim, mut t_wait, mut t_sum) = (0.0, 0.0, 0.0, 0.0);
        let mut sums = Stats::default();
        let (mut loss_sum, mut norms, mut skipped) = (0.0, Vec::new(), 0usize);
        self.scale_backoffs = 0;
        for k in 0..minis {
            let t = Instant::now();
            let mini: Vec<usize> = (0..rows.len()).filter(|&i| mini_of[i] == k).collect();
            let mini = &mini[..];
            // EasyR1's global token mean: the mini-batch's tokens on every rank.
            let token_count = self
                .world
                .sum_usize(mini.iter().map(|&i| rows[i].completion.len()).sum());
            let mut grads: Vec<Vec<f32>> = self
                .params
                .iter()
                .map(|p| vec![0.0; p.value.len()])
                .collect();
            // With vision-tower LoRA: after an optimizer step the image features are the
            // updated tower's (the rollout's before the first), and the loss's gradient at
            // them is summed per prompt over the micro-batches, then taken through the tower
            // once per prompt.
            let fresh = match images {
                Some(im) if k > 0 => Some(self.prompt_features(im, true)?),
                _ => None,
            };
            let rows: Vec<Row<'_>> = match (&fresh, images) {
                (Some(f), Some(im)) => rows
                    .iter()
                    .zip(&im.prompt_of)
                    .map(|(r, &p)| Row {
                        features: &f[p],
                        ..*r
                    })
                    .collect(),
                _ => rows.to_vec(),
            };
            let mut feature_grads: BTreeMap<usize, Vec<f32>> = BTreeMap::new();
            let mini_rows: Vec<Row<'_>> = mini.iter().map(|&i| rows[i]).collect();
            let ranges = batch::split(&mini_rows, micro_rows, micro_tokens);
            for range in ranges {
                let micro = &mini[range];
                let part: Vec<Row<'_>> = micro.iter().map(|&i| rows[i]).collect();
                let pick = |v: &[Vec<f32>]| -> Vec<Vec<f32>> {
                    micro.iter().map(|&i| v[i].clone()).collect()
                };
                let adv: Vec<f32> = micro.iter().map(|&i| advantages[i]).collect();
                let r = self.loss_and_grads(
                    &part,
                    &pick(&lp.old),
                    &pick(&lp.reference),
                    &adv,
                    lp.kl_coef,
                    token_count,
                    lp.is_weights.as_deref().map(pick).as_deref(),
                )?;
                loss_sum += r.loss;
                sums.add(&r.stats);
                add_into(&mut grads, &r.grads);
                if let Some(im) = images {
                    let mut at = 0;
                    for &i in micro {
                        let n = rows[i].features.len();
                        let acc = feature_grads
                            .entry(im.prompt_of[i])
                            .or_insert_with(|| vec![0.0; n]);
                        let part =
                            r.feature_grads
                                .get(at..at + n)
                                .ok_or_else(|| TrainError::Run {
                                    graph: "train",
                                    msg: format!(
                                    "{} image-feature gradient values for rows with {} features",
                                    r.feature_grads.len(),
                                    at + n
                                ),
                                })?;
                        acc.iter_mut().zip(part).for_each(|(a, b)| *a += b);
                        at += n;
                    }
                }
            }
            if let Some(im) = images {
                for (p, g) in &feature_grads {
                    let vg = self.vision_grads(&im.pixels[*p], &im.grids[*p], g)?;
                    add_into(&mut grads, &vg);
                }
            }
            let (wait, sum) = parallel::sum_grads(self.world, &self.reducer, &mut grads)?;
            (t_wait, t_sum) = (t_wait + wait, t_sum + sum);
            parallel::agree_loss_scale(self.world, &mut self.loss_scale);
            t_train += t.elapsed().as_secs_f64();
            let t = Instant::now();
            let mut views: Vec<&mut [f32]> = grads.iter_mut().map(|v| v.as_mut_slice()).collect();
            let norm = self.backend.clip(&mut views, max_norm)?;
            norms.push(f64::from(norm));
            if norm.is_finite() {
                let opt_step = (self.step * minis + k + 1) as u32;
                // From here until the step ends, the weights are between states.
                self.updating = true;
                for (p, gr) in self.params.iter_mut().zip(&grads) {
                    self.backend.adamw(p, gr, opt_step, &h)?;
                }
                if let Some(s) = &mut self.loss_scale {
                    s.step_done();
                }
            } else {
                skipped += 1;
            }
            t_optim += t.elapsed().as_secs_f64();
        }
        self.push_lora()?;
        metrics.insert("timing_s/train".into(), t_train - t_wait - t_sum);
        metrics.insert("timing_s/optimizer".into(), t_optim);
        if self.world.size > 1 {
            // (the wait is this rank's for the slowest: the largest over the ranks is kept)
            metrics.insert("timing_s/rank_wait".into(), t_wait);
            metrics.insert("timing_s/allreduce".into(), t_sum);
        }
        let (loss_sum, sums) = parallel::sum_loss(self.world, loss_sum, sums);
        let tokens = sums.get("tokens").max(1.0);
        metrics.insert(
            "actor/pg_loss_plus_kl".into(),
            loss_sum / minis.max(1) as f64,
        );
        for (stat, metric) in [
            ("pg_clipfrac_higher", "pg_clipfrac_higher"),
            ("pg_clipfrac_lower", "pg_clipfrac_lower"),
            ("ppo_kl", "ppo_kl"),
            ("kl", "kl_loss"),
            ("entropy", "entropy"),
        ] {
            metrics.insert(format!("actor/{metric}"), sums.get(stat) / tokens);
        }
        metrics.insert("actor/grad_norm".into(), mean(norms.iter().copied()));
        metrics.insert("actor/skipped_updates".into(), skipped as f64);
        if let Some(s) = self.loss_scale {
            metrics.insert("actor/loss_scale".into(), f64::from(s.scale));
            metrics.insert(
                "actor/loss_scale_backoffs".into(),
                self.scale_backoffs as f64,
            );
        }
        metrics.insert("actor/lr".into(), f64::from(h.lr));
        Ok(())
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

/// One sample of a step as the metrics need it, gathered from every rank: its prompt's place
/// in the step, its task, its scores and advantage, its length and whether it hit the limit.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
struct Sampled {
    order: usize,
    task: String,
    overall: f64,
    format: f64,
    accuracy: f64,
    advantage: f32,
    tokens: usize,
    clipped: bool,
}

/// The step's rewards (overall and per task), advantages, response lengths and rollout
/// throughput, into `metrics`.
fn step_metrics(sampled: &[Sampled], metrics: &mut Metrics) {
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

/// This rank's share of a step's prompts: dataset indices, requests (images decoded) and
/// each one's place among the step's usable prompts over all ranks (its mini-batch), with how
/// many those are.
struct StepShare {
    idx: Vec<usize>,
    reqs: Vec<Request>,
    order: Vec<usize>,
    prompts: usize,
}

/// `all`'s items at `positions`.
fn pick(all: &[usize], positions: &[usize]) -> Vec<usize> {
    positions.iter().map(|&p| all[p]).collect()
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
