//! `ssrl sft`: the SFT cold start of Spatial-SSRL's recipe, LoRA supervised fine-tuning as
//! LLaMA-Factory runs it, through the package's exported `sft.onnx` (no torch at run time).
//!
//! Each example is a prompt (the chat template's user turn, images expanded) and a response
//! whose tokens are the labels (prompt, image and padding positions masked, as LLaMA-Factory's
//! −100). The loss is the labels' token-mean cross-entropy over the whole optimizer step:
//! every micro-batch's sum is divided by the step's label count, so micro-batches add up
//! exactly. AdamW with a cosine (or linear, constant) schedule and warm-up, gradient clipping,
//! PEFT checkpoints, exact resume, Ctrl-C saves; `metrics.jsonl` has `sft/loss`,
//! `sft/token_accuracy`, `sft/lr`, `sft/grad_norm`, `sft/tokens_per_s`.

use super::checkpoint;
use super::scale::{self, LossScale};
use super::{
    batch, batch_inputs, embed, io_err, lay_out, scalar, tensor, Backend, Metrics, Param, RunEnd,
    TrainError,
};
use crate::data::records::{read_dataset, SampleRecord};
use crate::kernels::AdamW;
use crate::model::rope::RopeConfig;
use crate::model::session::{Device, DeviceChoice};
use crate::rng::Rng;
use crate::rollout::float::Float;
use crate::rollout::{Engine, Request};
use batch::Row;
use ort::session::Session;
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

/// `sft.toml`: the official cold start's values by default (LLaMA-Factory's key names; the
/// Spatial-SSRL release's `sft_scripts/*.yaml`). Unknown keys are errors.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SftConfig {
    /// Model package folder (`models/export.py` output with `sft.onnx`).
    pub model: PathBuf,
    /// Run folder: sft.toml, metrics.jsonl, checkpoints/.
    pub out: PathBuf,
    pub data: SftData,
    pub learning_rate: f32,
    pub num_train_epochs: f64,
    /// Optimizer steps; 0: `num_train_epochs` of the data.
    pub max_steps: usize,
    /// Examples per micro-batch (one `sft.onnx` call).
    pub per_device_train_batch_size: usize,
    /// Micro-batches per optimizer step.
    pub gradient_accumulation_steps: usize,
    pub lr_scheduler_type: Scheduler,
    /// Share of the steps the learning rate rises linearly from 0.
    pub warmup_ratio: f64,
    /// Tokens per example, prompt (images included) and response: a longer response is cut
    /// (the labels keep its start), a prompt that leaves no room is left out and named.
    pub cutoff_len: usize,
    /// The first this many examples; 0: all.
    pub max_samples: usize,
    pub max_grad_norm: f32,
    pub weight_decay: f32,
    pub adam_beta1: f32,
    pub adam_beta2: f32,
    pub adam_epsilon: f32,
    /// The package's LoRA must be this: its rank, alpha and targets are fixed when it is
    /// exported (`models/export.py --lora-rank --lora-alpha --lora-targets`).
    pub lora_rank: usize,
    pub lora_alpha: f32,
    /// `all` (every linear layer of the language model: q, k, v, o, gate, up, down) or a comma
    /// list.
    pub lora_target: String,
    /// A checkpoint every this many optimizer steps (and at the end); 0: at the end only.
    pub save_steps: usize,
    /// Checkpoints kept, newest first; 0: all.
    pub save_total_limit: usize,
    /// Image size bounds in pixels (LLaMA-Factory's `image_max_pixels` / `image_min_pixels`).
    pub image_max_pixels: u64,
    pub image_min_pixels: u64,
    pub seed: u64,
    /// Where the graphs run: `cpu`, `cuda` or `tensorrt`.
    pub device: String,
    pub device_id: i32,
    /// Every session reads one copy of the weights (on the CPU one memory-mapped copy, under
    /// CUDA one device copy); false: each loads its own — on the CPU packed, somewhat faster
    /// for one more copy of the weights per session (Qwen2.5-VL-3B's widths, 2 layers, a
    /// two-step run: peak 3.45 GB and 30.0 s shared, 5.25 GB and 26.9 s not).
    pub shared_weights: bool,
    /// AdamW and clipping kernels: `auto` (CUDA where a device answers), `cuda` or `cpu`.
    pub kernels: String,
    /// Data parallel: compare every rank's LoRA tensors (a digest) every this many steps and
    /// at each checkpoint, stopping the run where one differs (0: at checkpoints only).
    pub replica_check_steps: usize,
    /// Data parallel: how gradients are summed over the ranks (`auto`, `mpi`, `nccl`).
    pub allreduce: super::config::Allreduce,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SftData {
    /// LLaMA-Factory alpaca or ShareGPT JSON (the released `SFT-coldstart.json`), whose
    /// responses are the labels; or `ssrl tasks` output (Parquet / JSONL, a folder), whose
    /// responses are made from each answer by `response_template`.
    pub train_files: Vec<PathBuf>,
    /// What image paths resolve against; "": each file's own folder or one of the two above.
    pub image_dir: PathBuf,
    /// The response of an `ssrl tasks` sample: `{answer}` is replaced by its answer.
    pub response_template: String,
    /// Appended after one space to an `ssrl tasks` problem, as GRPO's prompts are made
    /// (JSON rows are used as they are: their instruction carries its own).
    pub format_prompt: String,
}

/// The learning-rate schedule (`lr_scheduler_type`, transformers' names).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Scheduler {
    /// Linear warm-up, then a cosine to 0.
    Cosine,
    /// Linear warm-up, then linearly to 0.
    Linear,
    /// The learning rate throughout, no warm-up.
    Constant,
    /// Linear warm-up, then the learning rate.
    ConstantWithWarmup,
}

impl Scheduler {
    /// Its name in sft.toml.
    pub fn name(self) -> &'static str {
        match self {
            Scheduler::Cosine => "cosine",
            Scheduler::Linear => "linear",
            Scheduler::Constant => "constant",
            Scheduler::ConstantWithWarmup => "constant_with_warmup",
        }
    }
}

/// The default response of an `ssrl tasks` sample: the reasoning format GRPO's reward checks.
pub const RESPONSE_TEMPLATE: &str =
    "<think>\nI look at the marked parts of the image and compare them before answering.\n</think>\n\\boxed{{answer}}";

impl Default for SftConfig {
    fn default() -> Self {
        SftConfig {
            model: PathBuf::new(),
            out: PathBuf::from("runs/sft"),
            data: SftData::default(),
            learning_rate: 1e-5,
            num_train_epochs: 5.0,
            max_steps: 0,
            per_device_train_batch_size: 4,
            gradient_accumulation_steps: 8,
            lr_scheduler_type: Scheduler::Cosine,
            warmup_ratio: 0.1,
            cutoff_len: 4096,
            max_samples: 4000,
            max_grad_norm: 1.0,
            weight_decay: 0.0,
            adam_beta1: 0.9,
            adam_beta2: 0.999,
            adam_epsilon: 1e-8,
            lora_rank: 128,
            lora_alpha: 256.0,
            lora_target: "all".into(),
            save_steps: 15,
            save_total_limit: 0,
            image_max_pixels: 262_144,
            image_min_pixels: 1024,
            seed: 42,
            device: "cpu".into(),
            device_id: 0,
            shared_weights: true,
            kernels: "auto".into(),
            replica_check_steps: 10,
            allreduce: super::config::Allreduce::Auto,
        }
    }
}

impl Default for SftData {
    fn default() -> Self {
        SftData {
            train_files: Vec::new(),
            image_dir: PathBuf::new(),
            response_template: RESPONSE_TEMPLATE.into(),
            format_prompt: crate::data::FORMAT_SENTENCE.into(),
        }
    }
}

/// The language model's linear layers, LLaMA-Factory's `all` for these models (the vision
/// tower and projector frozen, its defaults).
const ALL_TARGETS: [&str; 7] = [
    "q_proj",
    "k_proj",
    "v_proj",
    "o_proj",
    "gate_proj",
    "up_proj",
    "down_proj",
];

impl SftConfig {
    /// Reads `path` (relative paths in it resolve against its folder).
    pub fn load(path: &Path) -> Result<SftConfig, TrainError> {
        let text = std::fs::read_to_string(path).map_err(io_err(path))?;
        let mut c: SftConfig = toml::from_str(&text).map_err(|source| TrainError::Toml {
            path: path.to_path_buf(),
            source,
        })?;
        let base = path.parent().unwrap_or(Path::new(""));
        let at = |p: &mut PathBuf| {
            if !p.as_os_str().is_empty() && p.is_relative() {
                *p = base.join(&*p);
            }
        };
        at(&mut c.model);
        at(&mut c.out);
        at(&mut c.data.image_dir);
        c.data.train_files.iter_mut().for_each(at);
        // A value out of range is named with the file it came from.
        c.check(path)?;
        Ok(c)
    }

    pub fn to_toml(&self) -> String {
        toml::to_string(self).expect("the config serialises")
    }

    /// The settings a resumed run must share with the checkpoint's: all but the run's length
    /// and how often it saves.
    pub fn resume_key(&self) -> String {
        let mut c = self.clone();
        c.max_steps = 0;
        c.num_train_epochs = 0.0;
        c.save_steps = 0;
        c.save_total_limit = 0;
        c.device = String::new();
        c.device_id = 0;
        c.kernels = String::new();
        c.replica_check_steps = 0;
        c.allreduce = super::config::Allreduce::Auto;
        c.to_toml()
    }

    fn targets(&self) -> Vec<String> {
        match self.lora_target.trim() {
            "all" => ALL_TARGETS.iter().map(|t| t.to_string()).collect(),
            list => list.split(',').map(|t| t.trim().to_string()).collect(),
        }
    }

    /// Checks the values (a configuration built in code rather than read from a file is
    /// named as `sft.toml`).
    pub fn validate(&self) -> Result<(), TrainError> {
        self.check(Path::new("sft.toml"))
    }

    fn check(&self, file: &Path) -> Result<(), TrainError> {
        let bad = |msg: String| TrainError::Data {
            path: file.to_path_buf(),
            msg,
        };
        if self.model.as_os_str().is_empty() {
            return Err(bad("`model` (a package folder) is required".into()));
        }
        if self.data.train_files.is_empty() {
            return Err(bad("`data.train_files` is empty".into()));
        }
        if self.per_device_train_batch_size == 0 || self.gradient_accumulation_steps == 0 {
            return Err(bad(
                "per_device_train_batch_size and gradient_accumulation_steps must be at least 1"
                    .into(),
            ));
        }
        let positive = |v: f64| v > 0.0 && v.is_finite();
        if !positive(f64::from(self.learning_rate)) || !(0.0..1.0).contains(&self.warmup_ratio) {
            return Err(bad(format!(
                "learning_rate {} must be positive and warmup_ratio {} in [0, 1)",
                self.learning_rate, self.warmup_ratio
            )));
        }
        if self.max_steps == 0 && !positive(self.num_train_epochs) {
            return Err(bad("set max_steps or a positive num_train_epochs".into()));
        }
        if self.cutoff_len < 2 {
            return Err(bad("cutoff_len must be at least 2".into()));
        }
        if !self.data.response_template.contains("{answer}") {
            return Err(bad(
                "data.response_template has no {answer} to put the answer in".into(),
            ));
        }
        if Device::from_name(&self.device, self.device_id).is_none() {
            return Err(bad(format!(
                "device {:?}: cpu, cuda or tensorrt",
                self.device
            )));
        }
        Ok(())
    }
}

impl super::config::RunConfig for SftConfig {
    type Error = TrainError;
    fn load(path: &Path) -> Result<Self, TrainError> {
        SftConfig::load(path)
    }
    fn set_max_steps(&mut self, steps: usize) {
        self.max_steps = steps;
    }
    fn to_toml(&self) -> String {
        SftConfig::to_toml(self)
    }
}

/// The learning rate at optimizer step `step` (0-based) of `total`, as transformers'
/// schedulers give it: linear warm-up over the first ⌈ratio · total⌉ steps, then cosine or
/// linear decay to 0, or constant.
pub fn learning_rate(cfg: &SftConfig, step: usize, total: usize) -> f32 {
    let warm = (cfg.warmup_ratio * total as f64).ceil() as usize;
    let lr = f64::from(cfg.learning_rate);
    if step < warm && cfg.lr_scheduler_type != Scheduler::Constant {
        return (lr * step as f64 / warm.max(1) as f64) as f32;
    }
    let progress = (step - warm.min(step)) as f64 / (total - warm.min(total)).max(1) as f64;
    (match cfg.lr_scheduler_type {
        Scheduler::Cosine => lr * 0.5 * (1.0 + (std::f64::consts::PI * progress).cos()),
        Scheduler::Linear => lr * (1.0 - progress).max(0.0),
        Scheduler::Constant | Scheduler::ConstantWithWarmup => lr,
    }) as f32
}

/// One training example: the prompt's problem and images, and the response's token ids.
struct Example {
    id: String,
    problem: String,
    /// JSON rows' instructions are used as they are; `ssrl tasks` problems get the format prompt.
    verbatim: bool,
    images: Vec<crate::data::records::ImageRef>,
    root: PathBuf,
    response: Vec<u32>,
}

/// The examples of `cfg.data`, their responses tokenised: a JSON row's `meta.response`, or the
/// template filled with a task sample's answer. A row with neither is named.
fn examples(cfg: &SftConfig, engine: &Engine) -> Result<Vec<Example>, TrainError> {
    let limit = match cfg.max_samples {
        0 => usize::MAX,
        n => n,
    };
    let root = Some(&cfg.data.image_dir).filter(|p| !p.as_os_str().is_empty());
    let mut out = Vec::new();
    let tok = engine.prompts.tokenizer();
    for f in &cfg.data.train_files {
        let rows = read_dataset(f, root.map(PathBuf::as_path), limit - out.len().min(limit))
            .map_err(|e| TrainError::Data {
                path: f.clone(),
                msg: crate::error_chain(&e),
            })?;
        for (s, root) in rows {
            let (text, verbatim) =
                response_of(&s, &cfg.data.response_template).ok_or_else(|| TrainError::Data {
                    path: f.clone(),
                    msg: format!(
                        "sample {}: no response and no answer to make one from",
                        s.id
                    ),
                })?;
            // The assistant turn as LLaMA-Factory's qwen2_vl template writes it; every token
            // of it is a label.
            let enc = tok
                .encode(format!("{text}<|im_end|>\n"), false)
                .map_err(|e| TrainError::Data {
                    path: f.clone(),
                    msg: format!("sample {}: {e}", s.id),
                })?;
            out.push(Example {
                id: s.id.clone(),
                problem: s.problem.clone(),
                verbatim,
                images: s.images.clone(),
                root,
                response: enc.get_ids().to_vec(),
            });
        }
    }
    Ok(out)
}

/// A sample's response and whether its prompt is used as it is: an SFT JSON row's own
/// (`meta.response`), or `template` with a task sample's answer.
fn response_of(s: &SampleRecord, template: &str) -> Option<(String, bool)> {
    if let Some(r) = s.meta.get("response").and_then(|r| r.as_str()) {
        return Some((r.to_string(), true));
    }
    (!s.answer.is_empty()).then(|| (template.replace("{answer}", &s.answer), false))
}

/// An example ready for the graph: prompt ids (images expanded), response ids (the labels),
/// image grids and features.
struct Prepped {
    prompt: Vec<u32>,
    response: Vec<u32>,
    grids: Vec<[u32; 3]>,
    features: Vec<f32>,
    deepstack: Vec<f32>,
}

/// What one `sft.onnx` call gives: the loss (its labels' sum / the step's label count), the
/// LoRA gradients, and the labels and correct labels it saw.
struct Micro {
    loss: f64,
    grads: Vec<Vec<f32>>,
    stats: super::Stats,
}

/// The SFT run: the package's sessions, the LoRA tensors, the data.
pub struct Sft {
    pub cfg: SftConfig,
    engine: Engine,
    sft: Session,
    /// The names of `sft.onnx`'s statistics (the manifest's `sft.stats`).
    stat_names: Vec<String>,
    embeds_type: Float,
    loss_scale: Option<LossScale>,
    params: Vec<Param>,
    backend: Backend,
    rope: RopeConfig,
    examples: Vec<Example>,
    /// Optimizer steps done.
    step: usize,
    /// Examples left out (images that cannot be read, prompts longer than `cutoff_len`), as
    /// `sample ID: cause`, over the run.
    pub left_out: Vec<String>,
    /// The data-parallel ranks: each step's examples are dealt over them.
    world: &'static crate::dist::World,
    /// How the ranks sum their gradients.
    reducer: super::parallel::Reducer,
    /// The weights the sessions read (when shared), `sft` among them: last, so that they are
    /// dropped after every session that reads them (the engine's own go first).
    weights: Option<std::sync::Arc<std::sync::Mutex<crate::model::weights::SharedWeights>>>,
}

impl Sft {
    pub fn new(cfg: SftConfig, ort_lib: Option<&Path>) -> Result<Sft, TrainError> {
        cfg.validate()?;
        let device_id = crate::dist::device_of(cfg.device_id);
        let device = Device::from_name(&cfg.device, device_id).unwrap_or_default();
        let choice = DeviceChoice {
            device,
            shared_weights: cfg.shared_weights,
            ..Default::default()
        };
        let mut engine = Engine::open_on(&cfg.model, ort_lib, &choice)?;
        engine.preprocessor.min_pixels = cfg.image_min_pixels;
        engine.preprocessor.max_pixels = cfg.image_max_pixels;
        let m = engine.package.manifest.clone();
        let Some(spec) = m.sft.clone().filter(|_| !m.graphs.sft.is_empty()) else {
            return Err(TrainError::Data {
                path: cfg.model.join("manifest.json"),
                msg: "the package has no SFT graph (sft.onnx; it was exported before there was \
                      one): export it again with models/export.py"
                    .into(),
            });
        };
        // The language model's targets: sft.toml's `lora_target` names those (a vision-tower
        // LoRA in the package is held at zero, as LLaMA-Factory freezes the vision tower).
        let mut have: Vec<String> = m
            .lora
            .targets
            .iter()
            .filter(|t| !t.starts_with("visual."))
            .cloned()
            .collect();
        let mut want = cfg.targets();
        have.sort();
        want.sort();
        if m.lora.rank != cfg.lora_rank || m.lora.alpha as f32 != cfg.lora_alpha || have != want {
            return Err(TrainError::Data {
                path: cfg.model.join("manifest.json"),
                msg: format!(
                    "the package's LoRA is rank {} alpha {} on {}, sft.toml asks for rank {} \
                     alpha {} on {}: export the package with --lora-rank {} --lora-alpha {} \
                     --lora-targets {}, or set lora_rank, lora_alpha and lora_target to the \
                     package's",
                    m.lora.rank,
                    m.lora.alpha,
                    m.lora.targets.join(","),
                    cfg.lora_rank,
                    cfg.lora_alpha,
                    cfg.lora_target,
                    cfg.lora_rank,
                    cfg.lora_alpha,
                    want.join(","),
                ),
            });
        }
        let sft = engine.open_graph(&m.graphs.sft, true)?;
        let embeds_type = Float::of_input(&sft, "inputs_embeds");
        let examples = examples(&cfg, &engine)?;
        if examples.is_empty() {
            return Err(TrainError::Data {
                path: cfg.data.train_files[0].clone(),
                msg: "no examples".into(),
            });
        }
        let backend = Backend::select(&cfg.kernels, device_id)?;
        let world = crate::dist::world();
        let reducer = super::parallel::Reducer::open(world, &backend, cfg.allreduce)?;
        Ok(Sft {
            backend,
            reducer,
            params: Param::init(&m.lora, cfg.seed),
            rope: m.rope(),
            loss_scale: (embeds_type == Float::F16).then(LossScale::default),
            cfg,
            // (taken before the engine moves in)
            weights: engine.shared_weights(),
            engine,
            sft,
            stat_names: spec.stats,
            embeds_type,
            examples,
            step: 0,
            left_out: Vec::new(),
            world,
        })
    }

    /// What a cold start on a package with vision-tower LoRA should know; `None` without one.
    pub fn vision_note(&self) -> Option<String> {
        super::vision_note(
            &self.engine.package.manifest.lora,
            "the cold start leaves its adapter at zero, as LLaMA-Factory's freezes the vision tower",
        )
    }

    /// The distinct tensors and bytes of the one copy of the weights every session reads
    /// (`None` where each loads its own: the GPU's store could not be made).
    pub fn shared_weights(&self) -> Option<(usize, u64)> {
        crate::model::weights::store_size(self.weights.as_ref())
    }

    /// [`Engine::weights_note`] of the package.
    pub fn weights_note(&self) -> Option<String> {
        self.engine.weights_note()
    }

    /// [`Engine::precision_note`] of the package.
    pub fn precision_note(&self) -> Option<String> {
        self.engine.precision_note()
    }

    pub fn examples(&self) -> usize {
        self.examples.len()
    }

    /// Examples per optimizer step: per device × accumulation × ranks, as the HF trainer's.
    fn per_step(&self) -> usize {
        self.cfg.per_device_train_batch_size
            * self.cfg.gradient_accumulation_steps
            * self.world.size
    }

    pub fn steps_per_epoch(&self) -> usize {
        self.examples.len().div_ceil(self.per_step())
    }

    pub fn total_steps(&self) -> usize {
        match self.cfg.max_steps {
            0 => (self.cfg.num_train_epochs * self.steps_per_epoch() as f64).ceil() as usize,
            n => n,
        }
    }

    pub fn step(&self) -> usize {
        self.step
    }

    /// The examples of optimizer step `step`: the epoch's seeded permutation, a slice of it
    /// (the last step of an epoch may be short, as the HF trainer's).
    fn step_examples(&self, step: usize) -> Vec<usize> {
        let spe = self.steps_per_epoch();
        let (epoch, k) = (step / spe, step % spe);
        let mut order: Vec<usize> = (0..self.examples.len()).collect();
        Rng::keyed(self.cfg.seed, &[0x5f7, epoch as u64]).shuffle(&mut order);
        let n = self.per_step();
        order[k * n..((k + 1) * n).min(order.len())].to_vec()
    }

    /// The step's examples tokenised with their images' features, the responses cut to
    /// `cutoff_len`; the examples that cannot be are named in `left_out`.
    fn prepare(&mut self, picked: &[usize]) -> Result<Vec<Prepped>, TrainError> {
        let mut out = Vec::new();
        for &i in picked {
            let ex = &self.examples[i];
            let images = match ex
                .images
                .iter()
                .map(|im| im.load(&ex.root))
                .collect::<Result<Vec<_>, _>>()
            {
                Ok(v) => v,
                Err(e) => {
                    self.left_out
                        .push(format!("sample {}: {}", ex.id, crate::error_chain(&e)));
                    continue;
                }
            };
            let req = Request {
                id: i as u64,
                problem: ex.problem.clone(),
                images,
            };
            let format = (!ex.verbatim && !self.cfg.data.format_prompt.is_empty())
                .then_some(self.cfg.data.format_prompt.as_str());
            let p = match self.engine.prepare(std::slice::from_ref(&req), format) {
                Ok(p) => p,
                Err(e) => {
                    self.left_out
                        .push(format!("sample {}: {}", ex.id, crate::error_chain(&e)));
                    continue;
                }
            };
            let prompt = p.prompts[0].clone();
            let room = self.cfg.cutoff_len.saturating_sub(prompt.len());
            if room == 0 {
                self.left_out.push(format!(
                    "sample {}: its prompt is {} tokens, cutoff_len {}",
                    ex.id,
                    prompt.len(),
                    self.cfg.cutoff_len
                ));
                continue;
            }
            let response = ex.response[..ex.response.len().min(room)].to_vec();
            out.push(Prepped {
                prompt,
                response,
                grids: p.grids[0].clone(),
                features: p.features[0].clone(),
                deepstack: p.deepstack.first().cloned().unwrap_or_default(),
            });
        }
        Ok(out)
    }

    /// One `sft.onnx` call: the micro-batch's loss (its label sum / `token_count`), gradients
    /// and stats (labels, correct labels). fp16 graphs run again at a lower loss scale when a
    /// gradient overflows.
    fn micro_step(&mut self, rows: &[Row<'_>], token_count: usize) -> Result<Micro, TrainError> {
        let mb = lay_out(&self.engine, &self.rope, rows)?;
        let embeds = embed(&mut self.engine, &mb)?;
        loop {
            let mut inputs = batch_inputs(&self.engine, self.embeds_type, &mb, embeds.clone())?;
            inputs.push((
                "loss_mask".into(),
                tensor(&[mb.rows, mb.cols], mb.completion_mask.clone())?,
            ));
            inputs.push(("token_count".into(), scalar(token_count as f32)?));
            let s = self.loss_scale.map_or(1.0, |s| s.scale);
            inputs.push(("loss_scale".into(), scalar(s)?));
            inputs.extend(Param::inputs(&self.params, false, false)?);
            let res = self.sft.run(inputs).map_err(super::run_err("sft"))?;
            let f = |name: &str| -> Result<Vec<f32>, TrainError> {
                let (_, v) = res[name]
                    .try_extract_tensor::<f32>()
                    .map_err(super::run_err("sft"))?;
                Ok(v.to_vec())
            };
            let loss = f64::from(f("loss")?[0]);
            let st = f("stats")?;
            // (the vision tower's LoRA, where the package has one, stays as initialised —
            // zero — as LLaMA-Factory's cold start freezes the vision tower)
            let grads = Param::read_grads(&self.params, &res, "sft", false)?;
            if !scale::rerun(&mut self.loss_scale, || scale::all_finite(&grads)) {
                return Ok(Micro {
                    loss,
                    grads,
                    stats: super::Stats::read(&self.stat_names, &st, "sft")?,
                });
            }
        }
    }

    /// One optimizer step: its examples through the graph in micro-batches, the gradients
    /// clipped, AdamW at the schedule's learning rate.
    pub fn train_step(&mut self) -> Result<Metrics, TrainError> {
        let t0 = Instant::now();
        let total = self.total_steps();
        let all = self.step_examples(self.step);
        let picked: Vec<usize> = (self.world.share(all.len()).iter())
            .map(|&p| all[p])
            .collect();
        let before = self.left_out.len();
        let prepared = self.prepare(&picked);
        let prepared = super::parallel::agree(self.world, prepared)?;
        // Every rank's left-out examples, on every rank.
        if self.world.size > 1 {
            let mine = self.left_out.split_off(before);
            self.left_out
                .extend(self.world.gather(&mine).into_iter().flatten());
        }
        let mut m = Metrics::new();
        // (the loss is the token mean over the examples of every rank)
        let tokens = self
            .world
            .sum_usize(prepared.iter().map(|p| p.response.len()).sum());
        let examples = self.world.sum_usize(prepared.len());
        let mut grads: Vec<Vec<f32>> = self
            .params
            .iter()
            .map(|p| vec![0.0; p.value.len()])
            .collect();
        let (mut loss, mut stats) = (0.0, super::Stats::default());
        for chunk in prepared.chunks(self.cfg.per_device_train_batch_size) {
            let rows: Vec<Row<'_>> = chunk
                .iter()
                .map(|p| Row {
                    prompt: &p.prompt,
                    completion: &p.response,
                    grids: &p.grids,
                    features: &p.features,
                    deepstack: &p.deepstack,
                })
                .collect();
            let r = self.micro_step(&rows, tokens)?;
            loss += r.loss;
            stats.add(&r.stats);
            super::add_into(&mut grads, &r.grads);
        }
        let (t_wait, t_sum) = super::parallel::sum_grads(self.world, &self.reducer, &mut grads)?;
        super::parallel::agree_loss_scale(self.world, &mut self.loss_scale);
        let (loss, stats) = super::parallel::sum_loss(self.world, loss, stats);
        let lr = learning_rate(&self.cfg, self.step, total);
        let mut views: Vec<&mut [f32]> = grads.iter_mut().map(|v| v.as_mut_slice()).collect();
        let norm = self.backend.clip(&mut views, self.cfg.max_grad_norm)?;
        if examples == 0 || !norm.is_finite() {
            m.insert("sft/skipped_updates".into(), 1.0);
        } else {
            let h = AdamW {
                lr,
                beta1: self.cfg.adam_beta1,
                beta2: self.cfg.adam_beta2,
                eps: self.cfg.adam_epsilon,
                weight_decay: self.cfg.weight_decay,
            };
            for (p, g) in self.params.iter_mut().zip(&grads) {
                self.backend.adamw(p, g, self.step as u32 + 1, &h)?;
            }
            if let Some(s) = &mut self.loss_scale {
                s.step_done();
            }
            m.insert("sft/skipped_updates".into(), 0.0);
        }
        self.step += 1;
        let secs = t0.elapsed().as_secs_f64();
        m.insert("step".into(), self.step as f64);
        m.insert(
            "sft/epoch".into(),
            self.step as f64 / self.steps_per_epoch() as f64,
        );
        m.insert("sft/loss".into(), loss);
        m.insert(
            "sft/token_accuracy".into(),
            stats.get("correct") / stats.get("tokens").max(1.0),
        );
        m.insert("sft/lr".into(), f64::from(lr));
        m.insert("sft/grad_norm".into(), f64::from(norm));
        m.insert("sft/tokens".into(), tokens as f64);
        m.insert("sft/examples".into(), examples as f64);
        m.insert("timing_s/step".into(), secs);
        if self.world.size > 1 {
            m.insert("timing_s/rank_wait".into(), t_wait);
            m.insert("timing_s/allreduce".into(), t_sum);
        }
        if let Some(s) = self.loss_scale {
            m.insert("sft/loss_scale".into(), f64::from(s.scale));
        }
        super::parallel::merge_metrics(self.world, &mut m);
        m.insert(
            "sft/tokens_per_s".into(),
            tokens as f64 / m["timing_s/step"].max(1e-9),
        );
        Ok(m)
    }

    /// Writes a checkpoint of the current state (a PEFT adapter `ssrl export --adapter`
    /// merges, and the optimizer's moments for a resume); data parallel, as GRPO's.
    pub fn save(&self) -> Result<PathBuf, TrainError> {
        super::parallel::save(
            self.world,
            &self.params,
            self.step,
            self.cfg.resume_key(),
            self.loss_scale,
            &self.cfg.out,
            &self.cfg.model,
            &self.engine.package.manifest.lora,
            self.cfg.save_total_limit,
        )
    }

    /// The newest complete checkpoint of this run, if any.
    pub fn latest_checkpoint(&self) -> Option<PathBuf> {
        checkpoint::latest(&self.cfg.out.join("checkpoints"))
    }

    /// Restores a checkpoint of a run with the same settings (but its length and saving).
    pub fn restore(&mut self, dir: &Path) -> Result<(), TrainError> {
        let s = checkpoint::load(dir)?;
        if s.config != self.cfg.resume_key() {
            return Err(TrainError::Resume(format!(
                "{}: written with other settings; resume with the same sft.toml or start a \
                 new run folder",
                dir.display()
            )));
        }
        Param::restore(&mut self.params, &s, dir)?;
        self.step = s.step;
        if self.loss_scale.is_some() {
            self.loss_scale = Some(s.loss_scale.unwrap_or_default());
        }
        Ok(())
    }

    /// Trains to the last step, a checkpoint every `save_steps` and at the end; `stop` (Ctrl-C)
    /// saves where the run is and returns. `on_step` gets each step's metrics, its number and
    /// the examples it left out.
    pub fn run(
        &mut self,
        stop: &AtomicBool,
        mut on_step: impl FnMut(&Metrics, usize, &[String]),
    ) -> Result<RunEnd, TrainError> {
        let log = super::parallel::open_log(
            self.world,
            &self.cfg.out,
            "sft.toml",
            &self.cfg.to_toml(),
            self.step,
        )?;
        let total = self.total_steps();
        let check = self.cfg.replica_check_steps;
        while self.step < total {
            if self.world.any(stop.load(Ordering::SeqCst)) {
                return Ok(RunEnd::Interrupted {
                    checkpoint: self.save()?,
                });
            }
            let before = self.left_out.len();
            let m = self.train_step()?;
            if check > 0 && self.step % check == 0 {
                super::parallel::check_replicas(self.world, &self.params, self.step)?;
            }
            log.append(&m)?;
            on_step(&m, self.step, &self.left_out[before..]);
            let every = self.cfg.save_steps;
            if (every > 0 && self.step % every == 0) || self.step == total {
                self.save()?;
            }
        }
        Ok(RunEnd::Finished {
            checkpoint: self.latest_checkpoint(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// transformers' get_cosine_schedule_with_warmup and linear / constant schedules: 0 at
    /// the first step, the peak after the warm-up, half way down at the middle of the decay.
    #[test]
    fn schedules_follow_transformers() {
        let mut c = SftConfig::default();
        let total = 75;
        // ⌈0.1 · 75⌉ = 8 warm-up steps.
        assert_eq!(learning_rate(&c, 0, total), 0.0);
        assert!((learning_rate(&c, 4, total) - 0.5e-5).abs() < 1e-12);
        assert!((learning_rate(&c, 8, total) - 1e-5).abs() < 1e-12);
        let mid = 8 + (75 - 8) / 2;
        let want = 1e-5 * 0.5 * (1.0 + (std::f64::consts::PI * 33.0 / 67.0).cos());
        assert!((f64::from(learning_rate(&c, mid, total)) - want).abs() < 1e-11);
        assert!(learning_rate(&c, 74, total) < 1e-8);
        c.lr_scheduler_type = Scheduler::Linear;
        assert!(
            (learning_rate(&c, 8 + 67 / 2, total) - 1e-5 * (1.0 - 33.0 / 67.0) as f32).abs()
                < 1e-11
        );
        c.lr_scheduler_type = Scheduler::Constant;
        assert_eq!(learning_rate(&c, 0, total), 1e-5);
        c.lr_scheduler_type = Scheduler::ConstantWithWarmup;
        assert_eq!(learning_rate(&c, 0, total), 0.0);
        assert_eq!(learning_rate(&c, 40, total), 1e-5);
    }

    /// An SFT JSON row answers with its own response, used verbatim; a task sample with the
    /// template, its answer in the box; a row with neither has none.
    #[test]
    fn responses_come_from_the_row_or_the_template() {
        let mut s = SampleRecord {
            id: "a".into(),
            task: String::new(),
            problem: "p".into(),
            answer: "2".into(),
            images: vec![],
            source: vec![],
            meta: serde_json::json!({"response": "<think>x</think> \\boxed{1}"}),
        };
        assert_eq!(
            response_of(&s, RESPONSE_TEMPLATE),
            Some(("<think>x</think> \\boxed{1}".into(), true))
        );
        s.meta = serde_json::Value::Null;
        let (r, verbatim) = response_of(&s, RESPONSE_TEMPLATE).unwrap();
        assert!(!verbatim && crate::reward::in_format(&r), "{r}");
        assert_eq!(crate::reward::extract_boxed(&r), "2");
        s.answer.clear();
        assert_eq!(response_of(&s, RESPONSE_TEMPLATE), None);
    }

    /// The official cold start is the default; a bad key is named.
    #[test]
    fn defaults_are_the_official_cold_start() {
        let c = SftConfig::default();
        assert_eq!(
            (
                c.lora_rank,
                c.lora_alpha,
                c.learning_rate,
                c.num_train_epochs
            ),
            (128, 256.0, 1e-5, 5.0)
        );
        assert_eq!(
            (
                c.per_device_train_batch_size,
                c.gradient_accumulation_steps,
                c.save_steps
            ),
            (4, 8, 15)
        );
        assert_eq!(c.targets().len(), 7);
        assert!(c.to_toml().contains("lr_scheduler_type = \"cosine\""));
        assert_eq!(c.lr_scheduler_type.name(), "cosine");
        let e = toml::from_str::<SftConfig>("learning_rat = 1e-4").unwrap_err();
        assert!(e.to_string().contains("learning_rat"), "{e}");
        // A schedule of another name is refused with the four it can be.
        let e = toml::from_str::<SftConfig>("lr_scheduler_type = \"step\"")
            .unwrap_err()
            .to_string();
        assert!(
            [
                "step",
                "cosine",
                "linear",
                "constant",
                "constant_with_warmup"
            ]
            .iter()
            .all(|k| e.contains(k)),
            "{e}"
        );
    }
}
