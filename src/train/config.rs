//! `train.toml`: every setting of a run, with the paper's values as defaults (Spatial-SSRL's
//! EasyR1 recipe) and EasyR1's key names where it has one. Unknown keys are errors, so a typo
//! never silently trains with a default.

use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TrainConfig {
    /// Model package folder (`models/export.py` output).
    pub model: PathBuf,
    /// Run folder: metrics.jsonl, checkpoints/, plots.
    pub out: PathBuf,
    pub data: DataConfig,
    pub rollout: RolloutConfig,
    pub actor: ActorConfig,
    pub algorithm: AlgorithmConfig,
    pub trainer: TrainerConfig,
    pub reward: RewardSection,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DataConfig {
    /// Task datasets written by `ssrl tasks`: parquet or JSONL files, or folders (an `ssrl tasks`
    /// output folder or its `data/`: every shard, in name order); images resolve against
    /// `image_dir`, or else each file's own folder or one of the two above it, whichever holds
    /// its first image (`ssrl tasks` output, the released Spatial-SSRL-81k).
    pub train_files: Vec<PathBuf>,
    /// Held-out task set for validation (from sources not used for training); empty: none.
    pub val_files: Vec<PathBuf>,
    /// What every data file's image paths resolve against (relative to this file); "": the
    /// file's own folder or one of the two above it, whichever holds its first image.
    pub image_dir: PathBuf,
    /// Prompts per step (EasyR1 `data.rollout_batch_size`).
    pub rollout_batch_size: usize,
    /// Validation prompts per evaluation (the first N of the validation set).
    pub val_batch_size: usize,
    /// Prompts longer than this many tokens (images included) are left out when
    /// `filter_overlong_prompts` (EasyR1's `data.max_prompt_length` and filter).
    pub max_prompt_length: usize,
    /// Leave out prompts over `max_prompt_length`, and any without room for
    /// `max_response_length` in the model's context (EasyR1 `data.filter_overlong_prompts`);
    /// `false` keeps them, and a rollout of one without room fails.
    pub filter_overlong_prompts: bool,
    pub max_response_length: usize,
    /// Image size bounds in pixels (EasyR1 `data.min_pixels` / `data.max_pixels`): every image
    /// is resized into this range before patching.
    pub min_pixels: u64,
    pub max_pixels: u64,
    pub shuffle: bool,
    pub seed: u64,
    /// Appended to every problem after one space (EasyR1's format prompt); "" for none.
    pub format_prompt: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RolloutConfig {
    /// Samples per prompt (G).
    pub n: usize,
    pub temperature: f32,
    pub top_p: f32,
    /// -1 or 0: no top-k.
    pub top_k: i64,
    /// Validation sampling (EasyR1 `val_override_config`); 0 = greedy.
    pub val_temperature: f32,
    pub val_top_p: f32,
    /// Execution provider for every graph: cpu, cuda or tensorrt.
    pub device: String,
    pub device_id: i32,
    pub allow_fallback: bool,
    /// CPU: prompts generated in this many concurrent single-threaded slices (a copy of the
    /// weights each); 0 = one per core up to 8 for a decoder.onnx under 64 MB with its weights,
    /// else 1.
    pub cpu_slices: usize,
    /// TensorRT: build fp16 engines.
    pub trt_fp16: bool,
    /// TensorRT: engine and timing cache folder, reused by later runs and resumes (relative
    /// to this file); "" keeps none, so every run builds its engines again.
    pub trt_cache: PathBuf,
    /// TensorRT: builder workspace, bytes or with a unit ("4GiB"); 0 = ONNX Runtime's default.
    #[serde(deserialize_with = "size_or_zero")]
    pub trt_workspace: usize,
    /// CUDA: cap on what ONNX Runtime's GPU arena may hold, bytes or with a unit ("40GiB");
    /// 0 = no cap.
    #[serde(deserialize_with = "size_or_zero")]
    pub cuda_mem_limit: usize,
    /// CUDA: grow the arena by what is asked instead of doubling (tighter on a shared GPU).
    pub cuda_arena_exact: bool,
    /// Every session (the engine's, the log-prob and the training graph's) reads one copy of
    /// the weights: on the CPU one memory-mapped copy with no pre-packed copy beside it, under
    /// CUDA one device copy; false: each loads its own (on the CPU packed: small-batch decoding
    /// up to twice as fast, one copy of the weights more per session).
    pub shared_weights: bool,
}

/// A size in bytes: a TOML integer, or a string with a unit (`"40GiB"`,
/// [`crate::model::session::parse_size`]); 0 (or `"0"`) for none.
fn size_or_zero<'de, D: serde::Deserializer<'de>>(d: D) -> Result<usize, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Size {
        Bytes(u64),
        Text(String),
    }
    match Size::deserialize(d)? {
        Size::Bytes(n) => usize::try_from(n).map_err(serde::de::Error::custom),
        Size::Text(t) if t.trim() == "0" => Ok(0),
        Size::Text(t) => crate::model::session::parse_size(&t).map_err(serde::de::Error::custom),
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct OptimConfig {
    pub lr: f32,
    pub betas: [f32; 2],
    pub weight_decay: f32,
    pub eps: f32,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ActorConfig {
    /// Prompts per optimizer step (EasyR1 `worker.actor.global_batch_size`); × n sequences.
    pub global_batch_size: usize,
    /// Sequences per `train.onnx` call.
    pub micro_batch_size_per_device_for_update: usize,
    /// Sequences per `logprobs.onnx` call.
    pub micro_batch_size_per_device_for_experience: usize,
    /// Also cap each graph call at this many padded tokens (rows × length; 0 = no cap), so long
    /// image prompts do not share a call with many others (EasyR1's dynamic batching).
    pub max_token_len_per_micro_batch: usize,
    pub max_grad_norm: f32,
    pub clip_ratio_low: f32,
    pub clip_ratio_high: f32,
    pub clip_ratio_dual: f32,
    /// Where old log-probs come from: "recompute" (EasyR1: the actor recomputes them after
    /// generation) or "rollout" (the sampler's own, one forward pass fewer; with top-p / top-k
    /// they are over the filtered set, the behaviour policy's probabilities).
    pub old_logprobs: String,
    /// Rollout correction (verl's truncated importance sampling): each token's policy loss is
    /// weighted by min(π_old / π_rollout, tis_cap), the recomputed old log-prob against the
    /// sampler's, correcting for the sampler not being the training graph (precision, kernels,
    /// top-p / top-k). 0: off (EasyR1's default); verl suggests 2. Needs old_logprobs =
    /// "recompute".
    pub tis_cap: f32,
    pub optim: OptimConfig,
}

/// How group advantages are normalised (`algorithm.adv_estimator`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AdvEstimator {
    /// EasyR1's GRPO: (s − mean) / (std + 1e-6).
    Grpo,
    /// Dr. GRPO: no std scaling.
    DrGrpo,
    /// TRL's: ε = 1e-4.
    Trl,
}

impl AdvEstimator {
    /// The kernels' settings for it.
    pub fn config(self) -> crate::kernels::AdvantageConfig {
        use crate::kernels::AdvantageConfig;
        match self {
            AdvEstimator::Grpo => AdvantageConfig::EASYR1,
            AdvEstimator::DrGrpo => AdvantageConfig::DR_GRPO,
            AdvEstimator::Trl => AdvantageConfig::TRL,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AlgorithmConfig {
    pub adv_estimator: AdvEstimator,
    pub use_kl_loss: bool,
    /// k3 ("low_var_kl") is the only penalty the training graph computes.
    pub kl_penalty: String,
    pub kl_coef: f32,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TrainerConfig {
    /// Steps to run; 0 = `total_epochs` over the training set.
    pub max_steps: usize,
    pub total_epochs: usize,
    /// Validate every N steps (0 = never) and before the first step.
    pub val_freq: usize,
    pub val_before_train: bool,
    /// Checkpoint every N steps (0 = only at the end and on Ctrl-C); keep the last `save_limit`.
    pub save_freq: usize,
    pub save_limit: usize,
    /// Seeds sampling and the LoRA initialisation.
    pub seed: u64,
    /// Kernels for advantages, gradient norm and AdamW: "auto" (CUDA when a GPU is present),
    /// "cpu" or "cuda".
    pub kernels: String,
    /// Data parallel: compare every rank's LoRA tensors (a digest) every N steps and at each
    /// checkpoint, stopping the run where one differs (0 = at checkpoints only).
    pub replica_check_freq: usize,
    /// Data parallel: how gradients are summed over the ranks.
    pub allreduce: Allreduce,
}

/// How data-parallel ranks sum their gradients.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Allreduce {
    /// NCCL through the GPUs where every rank's kernels run on CUDA, else MPI on the host.
    #[default]
    Auto,
    /// MPI on the host buffers.
    Mpi,
    /// NCCL through the GPUs (an error where a rank has no CUDA kernels or no NCCL).
    Nccl,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RewardSection {
    pub format_weight: f64,
}

impl Default for TrainConfig {
    fn default() -> Self {
        TrainConfig {
            model: "models/tiny".into(),
            out: "runs/grpo".into(),
            data: DataConfig::default(),
            rollout: RolloutConfig::default(),
            actor: ActorConfig::default(),
            algorithm: AlgorithmConfig::default(),
            trainer: TrainerConfig::default(),
            reward: RewardSection::default(),
        }
    }
}

impl Default for DataConfig {
    fn default() -> Self {
        DataConfig {
            train_files: vec![],
            val_files: vec![],
            image_dir: PathBuf::new(),
            rollout_batch_size: 256,
            val_batch_size: 1024,
            max_prompt_length: 4096,
            filter_overlong_prompts: true,
            max_response_length: 2048,
            min_pixels: 262_144,
            max_pixels: 4_194_304,
            shuffle: true,
            seed: 1,
            format_prompt: crate::data::FORMAT_SENTENCE.into(),
        }
    }
}

impl DataConfig {
    /// `image_dir` when given.
    pub fn images_root(&self) -> Option<&Path> {
        (!self.image_dir.as_os_str().is_empty()).then_some(self.image_dir.as_path())
    }
}

impl Default for RolloutConfig {
    fn default() -> Self {
        RolloutConfig {
            n: 5,
            temperature: 1.0,
            top_p: 1.0,
            top_k: -1,
            val_temperature: 0.6,
            val_top_p: 0.95,
            device: "cpu".into(),
            device_id: 0,
            allow_fallback: false,
            cpu_slices: 0,
            trt_fp16: false,
            trt_cache: PathBuf::new(),
            trt_workspace: 0,
            cuda_mem_limit: 0,
            cuda_arena_exact: false,
            shared_weights: true,
        }
    }
}

impl Default for OptimConfig {
    fn default() -> Self {
        OptimConfig {
            // EasyR1's LoRA recipe (the paper's full fine-tune takes 1e-6).
            lr: 1e-5,
            betas: [0.9, 0.999],
            weight_decay: 1e-2,
            eps: 1e-8,
        }
    }
}

impl Default for ActorConfig {
    fn default() -> Self {
        ActorConfig {
            global_batch_size: 128,
            micro_batch_size_per_device_for_update: 4,
            micro_batch_size_per_device_for_experience: 16,
            max_token_len_per_micro_batch: 16_384,
            max_grad_norm: 1.0,
            clip_ratio_low: 0.2,
            clip_ratio_high: 0.3,
            clip_ratio_dual: 3.0,
            old_logprobs: "recompute".into(),
            tis_cap: 0.0,
            optim: OptimConfig::default(),
        }
    }
}

impl Default for AlgorithmConfig {
    fn default() -> Self {
        AlgorithmConfig {
            adv_estimator: AdvEstimator::Grpo,
            use_kl_loss: true,
            kl_penalty: "low_var_kl".into(),
            kl_coef: 1e-2,
        }
    }
}

impl Default for TrainerConfig {
    fn default() -> Self {
        TrainerConfig {
            max_steps: 0,
            total_epochs: 1,
            val_freq: 5,
            val_before_train: true,
            save_freq: 5,
            save_limit: 3,
            seed: 1,
            kernels: "auto".into(),
            replica_check_freq: 10,
            allreduce: Allreduce::Auto,
        }
    }
}

impl Default for RewardSection {
    fn default() -> Self {
        RewardSection { format_weight: 0.1 }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{path}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}")]
    Parse {
        path: PathBuf,
        #[source]
        source: toml::de::Error,
    },
    /// A value out of range, named with the file it came from.
    #[error("{path}")]
    Invalid {
        path: PathBuf,
        #[source]
        source: Box<ConfigError>,
    },
    #[error("{key}: {msg}")]
    Value { key: &'static str, msg: String },
}

/// `a/b/../c` → `a/c`, lexically (for readable paths in messages).
fn normalize(p: &Path) -> PathBuf {
    use std::path::Component;
    let mut out = PathBuf::new();
    for c in p.components() {
        match c {
            Component::CurDir => {}
            Component::ParentDir
                if matches!(out.components().next_back(), Some(Component::Normal(_))) =>
            {
                out.pop();
            }
            c => out.push(c.as_os_str()),
        }
    }
    out
}

/// What the training commands (`ssrl train`, `ssrl sft`) share about their settings: read from
/// a TOML file (relative paths against its folder, values checked and named with the file),
/// the run's length overridden from the command line, printed back as TOML.
pub trait RunConfig: Default + Sized {
    type Error: std::error::Error + Send + Sync + 'static;
    fn load(path: &Path) -> Result<Self, Self::Error>;
    /// Sets the run's optimizer steps.
    fn set_max_steps(&mut self, steps: usize);
    fn to_toml(&self) -> String;
}

impl RunConfig for TrainConfig {
    type Error = ConfigError;
    fn load(path: &Path) -> Result<Self, ConfigError> {
        TrainConfig::load(path)
    }
    fn set_max_steps(&mut self, steps: usize) {
        self.trainer.max_steps = steps;
    }
    fn to_toml(&self) -> String {
        TrainConfig::to_toml(self)
    }
}

impl TrainConfig {
    /// Reads a TOML file; relative paths in it resolve against the file's folder.
    pub fn load(path: &Path) -> Result<TrainConfig, ConfigError> {
        let path_buf = || path.to_path_buf();
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path_buf(),
            source,
        })?;
        let mut cfg: TrainConfig = toml::from_str(&text).map_err(|source| ConfigError::Parse {
            path: path_buf(),
            source,
        })?;
        let base = path.parent().unwrap_or(Path::new("."));
        let fix = |p: &mut PathBuf| {
            if p.is_relative() {
                *p = normalize(&base.join(&*p));
            }
        };
        fix(&mut cfg.model);
        fix(&mut cfg.out);
        cfg.data.train_files.iter_mut().for_each(fix);
        cfg.data.val_files.iter_mut().for_each(fix);
        if !cfg.data.image_dir.as_os_str().is_empty() {
            fix(&mut cfg.data.image_dir);
        }
        if !cfg.rollout.trt_cache.as_os_str().is_empty() {
            fix(&mut cfg.rollout.trt_cache);
        }
        // A value out of range is named with the file it came from.
        cfg.validate().map_err(|e| ConfigError::Invalid {
            path: path_buf(),
            source: Box::new(e),
        })?;
        Ok(cfg)
    }

    /// The whole configuration as TOML (what `ssrl train --print-config` shows and every
    /// checkpoint stores).
    pub fn to_toml(&self) -> String {
        toml::to_string(self).expect("the config serialises")
    }

    pub fn validate(&self) -> Result<(), ConfigError> {
        let bad = |key: &'static str, msg: &str| {
            Err(ConfigError::Value {
                key,
                msg: msg.into(),
            })
        };
        if self.data.train_files.is_empty() {
            return bad(
                "data.train_files",
                "no training data (a file written by `ssrl tasks`)",
            );
        }
        if self.data.rollout_batch_size == 0 {
            return bad("data.rollout_batch_size", "must be at least 1");
        }
        if self.rollout.n < 2 {
            return bad("rollout.n", "GRPO needs at least 2 samples per prompt");
        }
        let r = &self.rollout;
        for (key, t) in [
            ("rollout.temperature", r.temperature),
            ("rollout.val_temperature", r.val_temperature),
        ] {
            if let Err(msg) = crate::kernels::check_temperature(t) {
                return bad(key, &msg);
            }
        }
        for (key, p) in [
            ("rollout.top_p", r.top_p),
            ("rollout.val_top_p", r.val_top_p),
        ] {
            if let Err(msg) = crate::kernels::check_top_p(p) {
                return bad(key, &msg);
            }
        }
        if r.top_k < -1 {
            return bad(
                "rollout.top_k",
                "-1 or 0 for no top-k, else the number of tokens kept",
            );
        }
        if self.actor.global_batch_size == 0
            || self.data.rollout_batch_size % self.actor.global_batch_size != 0
        {
            return bad(
                "actor.global_batch_size",
                "must divide data.rollout_batch_size",
            );
        }
        if self.actor.micro_batch_size_per_device_for_update == 0
            || self.actor.micro_batch_size_per_device_for_experience == 0
        {
            return bad("actor.micro_batch_size_*", "must be at least 1");
        }
        if self.data.min_pixels > self.data.max_pixels || self.data.max_pixels < 3136 {
            return bad(
                "data.max_pixels",
                "must be at least 3136 and at least data.min_pixels",
            );
        }
        if self.data.max_response_length == 0 {
            return bad("data.max_response_length", "must be at least 1");
        }
        if self.data.max_prompt_length == 0 {
            return bad("data.max_prompt_length", "must be at least 1");
        }
        if !matches!(self.actor.old_logprobs.as_str(), "recompute" | "rollout") {
            return bad("actor.old_logprobs", "\"recompute\" or \"rollout\"");
        }
        if !(self.actor.tis_cap >= 0.0 && self.actor.tis_cap.is_finite()) {
            return bad("actor.tis_cap", "0 (off) or a positive cap");
        }
        if self.actor.tis_cap > 0.0 && self.actor.old_logprobs != "recompute" {
            return bad(
                "actor.tis_cap",
                "needs actor.old_logprobs = \"recompute\" (with the sampler's own log-probs as \
                 the old policy every weight is 1)",
            );
        }
        if self.algorithm.kl_penalty != "low_var_kl" {
            return bad(
                "algorithm.kl_penalty",
                "only \"low_var_kl\" (k3) is in the training graph",
            );
        }
        if !matches!(self.trainer.kernels.as_str(), "auto" | "cpu" | "cuda") {
            return bad("trainer.kernels", "\"auto\", \"cpu\" or \"cuda\"");
        }
        if crate::model::session::Device::from_name(&self.rollout.device, 0).is_none() {
            return bad("rollout.device", "\"cpu\", \"cuda\" or \"tensorrt\"");
        }
        if self.trainer.max_steps == 0 && self.trainer.total_epochs == 0 {
            return bad("trainer.max_steps", "set max_steps or total_epochs");
        }
        if !(self.actor.optim.lr.is_finite() && self.actor.optim.lr >= 0.0) {
            return bad("actor.optim.lr", "must be a finite, non-negative number");
        }
        Ok(())
    }

    /// What must not change between a checkpoint and `--resume` for the run to continue
    /// exactly: everything except how long to run, how often to save/validate, and where.
    pub fn resume_key(&self) -> String {
        let mut c = self.clone();
        c.trainer.max_steps = 0;
        c.trainer.total_epochs = 0;
        c.trainer.save_freq = 0;
        c.trainer.save_limit = 0;
        c.trainer.val_freq = 0;
        c.trainer.val_before_train = false;
        c.trainer.replica_check_freq = 0;
        c.trainer.allreduce = Allreduce::Auto;
        c.out = PathBuf::new();
        c.to_toml()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn load(dir: &Path, rollout: &str) -> Result<TrainConfig, ConfigError> {
        let path = dir.join("train.toml");
        let text = format!("[data]\ntrain_files = [\"d.jsonl\"]\n[rollout]\n{rollout}");
        std::fs::write(&path, text).unwrap();
        TrainConfig::load(&path)
    }

    /// actor.tis_cap: off by default, a positive cap with recomputed old log-probs, and a clear
    /// error otherwise.
    /// The advantage estimator is read by name; another is refused with the three it can be.
    #[test]
    fn adv_estimator_is_one_of_three() {
        let c: TrainConfig = toml::from_str("[algorithm]\nadv_estimator = \"dr_grpo\"").unwrap();
        assert_eq!(c.algorithm.adv_estimator, AdvEstimator::DrGrpo);
        assert_eq!(
            c.algorithm.adv_estimator.config(),
            crate::kernels::AdvantageConfig::DR_GRPO
        );
        let e = toml::from_str::<TrainConfig>("[algorithm]\nadv_estimator = \"ppo\"")
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("ppo") && e.contains("grpo") && e.contains("dr_grpo") && e.contains("trl"),
            "{e}"
        );
    }

    #[test]
    fn tis_cap_needs_recomputed_old_logprobs() {
        let mut c = TrainConfig::default();
        c.data.train_files = vec!["d.jsonl".into()];
        assert_eq!(c.actor.tis_cap, 0.0);
        c.actor.tis_cap = 2.0;
        assert!(c.validate().is_ok());
        c.actor.old_logprobs = "rollout".into();
        let e = c.validate().unwrap_err().to_string();
        assert!(
            e.contains("actor.tis_cap") && e.contains("recompute"),
            "{e}"
        );
        c.actor.old_logprobs = "recompute".into();
        c.actor.tis_cap = -1.0;
        assert!(c
            .validate()
            .unwrap_err()
            .to_string()
            .contains("actor.tis_cap"));
    }

    /// TensorRT and CUDA options reach the device choice: sizes as integers or with units, the
    /// engine cache relative to the file; a size that does not read is named with the file.
    #[test]
    fn device_options_and_the_image_folder_are_read_from_the_file() {
        use crate::model::session::Device;
        let dir = std::env::temp_dir().join(format!("ssrl-config-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let cfg = load(
            &dir,
            "device = \"tensorrt\"\ndevice_id = 1\ntrt_fp16 = true\ntrt_cache = \"engines\"\n\
             trt_workspace = \"4GiB\"\ncuda_mem_limit = 1073741824\ncuda_arena_exact = true\n",
        )
        .unwrap();
        let c = crate::train::device_choice(&cfg);
        match &c.device {
            Device::TensorRt {
                device_id,
                fp16,
                cache_dir,
                workspace_bytes,
                limits,
            } => {
                assert_eq!((*device_id, *fp16), (1, true));
                assert_eq!(cache_dir.as_deref(), Some(dir.join("engines").as_path()));
                assert_eq!(*workspace_bytes, Some(4 << 30));
                assert!(limits.is_some());
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(c.arena.mem_limit, Some(1 << 30));
        assert!(c.arena.grow_as_requested);
        // The defaults: no cache, ONNX Runtime's workspace and arena.
        let cfg = load(&dir, "device = \"cuda\"\n").unwrap();
        let c = crate::train::device_choice(&cfg);
        assert_eq!(c.device, Device::Cuda { device_id: 0 });
        assert_eq!(
            (c.arena.mem_limit, c.arena.grow_as_requested),
            (None, false)
        );
        // data.image_dir: "" (the default, shown by --print-config) is none; a folder resolves
        // against the file's.
        assert_eq!(cfg.data.images_root(), None);
        std::fs::write(
            dir.join("images.toml"),
            "[data]\ntrain_files = [\"d.jsonl\"]\nimage_dir = \"imgs\"\n",
        )
        .unwrap();
        let with_dir = TrainConfig::load(&dir.join("images.toml")).unwrap();
        assert_eq!(
            with_dir.data.images_root(),
            Some(dir.join("imgs").as_path())
        );
        assert!(TrainConfig::default()
            .to_toml()
            .contains("image_dir = \"\""));
        // (the file, then the parser's cause, through the error's source chain)
        let e = crate::error_chain(&load(&dir, "cuda_mem_limit = \"40 parsecs\"\n").unwrap_err());
        assert!(
            e.contains("train.toml") && e.contains("cuda_mem_limit") && e.contains("unknown unit"),
            "{e}"
        );
        let _ = std::fs::remove_dir_all(&dir);
    }
}
