//! The policy's side of a training step: the LoRA tensors with their optimizer state, the
//! kernels that clip and update them, the graphs' shared inputs, their statistics and the
//! checkpoints the tensors go to.

use super::*;

/// One LoRA tensor with its AdamW moments.
#[derive(Debug, Clone)]
pub(super) struct Param {
    pub(super) name: String,
    pub(super) shape: Vec<usize>,
    pub(super) value: Vec<f32>,
    pub(super) m: Vec<f32>,
    pub(super) v: Vec<f32>,
}

pub(super) enum Backend {
    Cpu,
    Cuda(Box<cuda::Cuda>),
}

impl Param {
    /// A vision-tower tensor: an input of vision.onnx and vision_grad.onnx, not of the
    /// language model's graphs.
    pub(super) fn is_vision(&self) -> bool {
        crate::model::package::is_vision_name(&self.name)
    }

    /// The LoRA inputs of a graph of the language model's (`vision` false) or the vision
    /// tower's (`vision`): each tensor by name, its values or (with `zero`) zeros (the base
    /// model).
    pub(super) fn inputs(
        params: &[Param],
        vision: bool,
        zero: bool,
    ) -> Result<Vec<(String, SessionInputValue<'static>)>, TrainError> {
        params
            .iter()
            .filter(|p| p.is_vision() == vision)
            .map(|p| {
                let v = match zero {
                    true => vec![0.0; p.value.len()],
                    false => p.value.clone(),
                };
                Ok((p.name.clone(), tensor(&p.shape, v)?))
            })
            .collect()
    }

    /// A graph's LoRA gradients (`grad.{name}`) in parameter order: the language model's
    /// (`vision` false: the training graphs') or the vision tower's (vision_grad.onnx's); the
    /// other tower's tensors, which the graph does not take, get zeros.
    pub(super) fn read_grads(
        params: &[Param],
        res: &ort::session::SessionOutputs<'_>,
        graph: &'static str,
        vision: bool,
    ) -> Result<Vec<Vec<f32>>, TrainError> {
        params
            .iter()
            .map(|p| {
                if p.is_vision() != vision {
                    return Ok(vec![0.0; p.value.len()]);
                }
                let (_, g) = res[format!("grad.{}", p.name).as_str()]
                    .try_extract_tensor::<f32>()
                    .map_err(run_err(graph))?;
                Ok(g.to_vec())
            })
            .collect()
    }

    /// A checkpoint's state: the tensors, AdamW's moments, the step, the settings' key and an
    /// fp16 run's loss scale.
    pub(super) fn state(
        params: &[Param],
        step: usize,
        config: String,
        loss_scale: Option<LossScale>,
    ) -> State {
        let tensors = |f: fn(&Param) -> &Vec<f32>| -> Vec<NamedTensor> {
            params
                .iter()
                .map(|p| NamedTensor {
                    name: p.name.clone(),
                    shape: p.shape.clone(),
                    data: f(p).clone(),
                })
                .collect()
        };
        State {
            step,
            config,
            params: tensors(|p| &p.value),
            exp_avg: tensors(|p| &p.m),
            exp_avg_sq: tensors(|p| &p.v),
            loss_scale,
        }
    }

    /// The tensors and moments of the checkpoint `s` (read from `dir`), each of its shape.
    pub(super) fn restore(params: &mut [Param], s: &State, dir: &Path) -> Result<(), TrainError> {
        for p in params {
            let find = |v: &[NamedTensor]| -> Result<Vec<f32>, TrainError> {
                let t = v.iter().find(|t| t.name == p.name).ok_or_else(|| {
                    TrainError::Resume(format!("{}: no tensor {}", dir.display(), p.name))
                })?;
                if t.shape != p.shape {
                    return Err(TrainError::Resume(format!(
                        "{}: {} has shape {:?}, the package {:?}",
                        dir.display(),
                        p.name,
                        t.shape,
                        p.shape
                    )));
                }
                Ok(t.data.clone())
            };
            p.value = find(&s.params)?;
            p.m = find(&s.exp_avg)?;
            p.v = find(&s.exp_avg_sq)?;
        }
        Ok(())
    }

    /// The package's LoRA tensors at PEFT's init (A uniform in ±1/√fan_in, B zero), seeded.
    pub(super) fn init(lora: &crate::model::package::LoraSpec, seed: u64) -> Vec<Param> {
        let mut params = Vec::new();
        for t in &lora.tensors {
            let fan_in = t.a[1] as f64;
            let bound = 1.0 / fan_in.sqrt();
            let mut r = Rng::keyed(seed, &[crate::rng::hash_str(&t.name)]);
            let a: Vec<f32> = (0..t.a.iter().product::<usize>())
                .map(|_| ((r.f64() * 2.0 - 1.0) * bound) as f32)
                .collect();
            for (suffix, shape, value) in
                [("A", &t.a, a), ("B", &t.b, vec![0.0; t.b.iter().product()])]
            {
                let n = value.len();
                params.push(Param {
                    name: format!("{}.{suffix}", t.name),
                    shape: shape.clone(),
                    value,
                    m: vec![0.0; n],
                    v: vec![0.0; n],
                });
            }
        }
        params
    }
}

impl Backend {
    /// The kernels `kernels` names (`cpu`, `cuda`, or `auto`: CUDA where a device answers).
    pub(super) fn select(kernels: &str, device_id: i32) -> Result<Backend, TrainError> {
        Ok(match kernels {
            "cpu" => Backend::Cpu,
            want => match cuda::Cuda::new(device_id.max(0) as usize) {
                Ok(c) => Backend::Cuda(Box::new(c)),
                Err(e) if want == "cuda" => return Err(e.into()),
                Err(_) => Backend::Cpu,
            },
        })
    }

    pub(super) fn name(&self) -> String {
        match self {
            Backend::Cpu => "cpu".into(),
            Backend::Cuda(c) => format!("cuda ({})", c.device_name()),
        }
    }
    pub(super) fn advantages(
        &self,
        s: &[f32],
        g: usize,
        c: &AdvantageConfig,
    ) -> Result<Vec<f32>, KernelError> {
        match self {
            Backend::Cpu => cpu::group_advantages(s, g, c),
            Backend::Cuda(d) => d.group_advantages(s, g, c),
        }
    }
    pub(super) fn clip(&self, grads: &mut [&mut [f32]], max: f32) -> Result<f32, KernelError> {
        match self {
            Backend::Cpu => Ok(cpu::clip_grad_norm(grads, max)),
            Backend::Cuda(d) => d.clip_grad_norm(grads, max),
        }
    }
    pub(super) fn adamw(
        &self,
        p: &mut Param,
        g: &[f32],
        step: u32,
        h: &AdamW,
    ) -> Result<(), KernelError> {
        match self {
            Backend::Cpu => {
                cpu::adamw_step(&mut p.value, g, &mut p.m, &mut p.v, step, h);
                Ok(())
            }
            Backend::Cuda(d) => d.adamw_step(&mut p.value, g, &mut p.m, &mut p.v, step, h),
        }
    }
}

/// What one `train.onnx` call gives.
#[derive(Debug, Clone)]
pub struct MicroResult {
    pub loss: f64,
    /// Per LoRA tensor, in [`Trainer::lora`] order (zeros for the vision tower's: see
    /// `feature_grads`).
    pub grads: Vec<Vec<f32>>,
    /// With vision-tower LoRA: the loss's gradient at the rows' image features, in the rows'
    /// order (`[image tokens, out_hidden_size]` as their features are; a DeepStack package's
    /// rows `[1 + K, image tokens, out_hidden_size]`: the features' gradient, then each
    /// DeepStack layer's), unscaled; empty otherwise. [`Trainer::vision_grads`] takes a
    /// prompt's part through the vision tower.
    pub feature_grads: Vec<f32>,
    /// Sums over completion tokens, by the manifest's names: tokens, pg_clipfrac_higher,
    /// pg_clipfrac_lower, ppo_kl (−log-ratio), kl (k3), entropy.
    pub stats: Stats,
}

/// A training graph's statistics (its `stats` output), each by the name the package's manifest
/// gives it (`train.stats`, `sft.stats`), summed over micro-batches.
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Stats(BTreeMap<String, f64>);

impl Stats {
    /// The `stats` output `values` of `graph`, named by `names`; a count that differs from the
    /// names' is an error (the manifest does not describe the graph).
    pub(super) fn read(
        names: &[String],
        values: &[f32],
        graph: &'static str,
    ) -> Result<Stats, TrainError> {
        if names.len() != values.len() {
            return Err(TrainError::Run {
                graph,
                msg: format!(
                    "{} statistics, but manifest.json names {} ({})",
                    values.len(),
                    names.len(),
                    names.join(", ")
                ),
            });
        }
        Ok(Stats(
            names
                .iter()
                .zip(values)
                .map(|(n, v)| (n.clone(), f64::from(*v)))
                .collect(),
        ))
    }

    /// Adds `other`'s sums to these.
    pub fn add(&mut self, other: &Stats) {
        for (k, v) in &other.0 {
            *self.0.entry(k.clone()).or_default() += v;
        }
    }

    /// The sum named `name`; 0 for a statistic the graph does not report.
    pub fn get(&self, name: &str) -> f64 {
        self.0.get(name).copied().unwrap_or(0.0)
    }
}

/// Writes `state` as a checkpoint under `out/checkpoints` (a PEFT adapter of `lora` on the
/// base `model`, whose path it records, and the optimizer's state), keeping the newest `keep`.
pub(super) fn write_checkpoint(
    out: &Path,
    model: &Path,
    lora: &crate::model::package::LoraSpec,
    state: &State,
    keep: usize,
) -> Result<PathBuf, TrainError> {
    let base = std::fs::canonicalize(model).unwrap_or(model.to_path_buf());
    Ok(checkpoint::save(
        &out.join("checkpoints"),
        state,
        lora,
        &base.display().to_string(),
        keep,
    )?)
}

pub(super) fn lay_out(
    engine: &Engine,
    rope: &RopeConfig,
    rows: &[Row<'_>],
) -> Result<MicroBatch, TrainError> {
    let m = &engine.package.manifest;
    let mut mb = batch::build(rows, m.tokens.pad, rope).map_err(EngineError::from)?;
    if m.train.positions == Positions::Completion {
        mb.completion_columns();
    }
    Ok(mb)
}

/// The rows' token embeddings with their image features in place: the features go to the
/// prompts' placeholders, and a placeholder id a completion sampled gets its token's own
/// embedding, as it had when the sampler fed it back.
pub(super) fn embed(engine: &mut Engine, mb: &MicroBatch) -> Result<Vec<f32>, TrainError> {
    let t = &engine.package.manifest.tokens;
    let placeholders = [i64::from(t.image), i64::from(t.video)];
    let pad = i64::from(t.pad);
    let sampled = mb.sampled_placeholders(placeholders);
    let ids = mb.embedding_ids(&sampled, pad);
    let mut embeds = engine.embed_rows(ids, mb.rows, mb.len, mb.features.clone())?;
    if !sampled.is_empty() {
        let d = embeds.len() / (mb.rows * mb.len).max(1);
        let own = engine.embed_rows(placeholders.to_vec(), 1, 2, Vec::new())?;
        for pos in sampled {
            let k = usize::from(mb.ids[pos] == placeholders[1]);
            embeds[pos * d..(pos + 1) * d].copy_from_slice(&own[k * d..(k + 1) * d]);
        }
    }
    Ok(embeds)
}

/// The inputs every training graph shares: embeddings (in the graphs' type `ty`), mask,
/// positions, targets.
pub(super) fn batch_inputs(
    engine: &Engine,
    ty: Float,
    mb: &MicroBatch,
    embeds: Vec<f32>,
) -> Result<Vec<(String, SessionInputValue<'static>)>, TrainError> {
    let m = &engine.package.manifest;
    let hidden = m.text.hidden_size;
    let shape = [mb.rows, mb.len, hidden];
    let k = m.vision.deepstack_layers;
    let deepstack = match k {
        0 => vec![],
        _ => {
            // (the features' width is the language model's: DeepStack adds them to its states)
            let n = mb.features.len() / hidden.max(1);
            let t = &m.tokens;
            let placeholders = [i64::from(t.image), i64::from(t.video)];
            vec![
                (
                    "deepstack_features".to_string(),
                    ty.tensor("train", &[k, n, hidden], mb.deepstack.clone())?
                        .into(),
                ),
                (
                    "visual_mask".into(),
                    tensor(&[mb.rows, mb.len], mb.visual_mask(placeholders))?,
                ),
            ]
        }
    };
    let mut inputs = vec![
        (
            "inputs_embeds".into(),
            ty.tensor("train", &shape, embeds)?.into(),
        ),
        (
            "attention_mask".into(),
            tensor(&[mb.rows, mb.len], mb.attention_mask.clone())?,
        ),
        (
            "position_ids".into(),
            tensor(&[3, mb.rows, mb.len], mb.position_ids.clone())?,
        ),
        (
            "target_ids".into(),
            tensor(&[mb.rows, mb.cols], mb.target_ids.clone())?,
        ),
    ];
    inputs.extend(deepstack);
    Ok(inputs)
}

pub(super) fn tensor<T>(
    shape: &[usize],
    data: Vec<T>,
) -> Result<SessionInputValue<'static>, TrainError>
where
    T: ort::value::PrimitiveTensorElementType + std::fmt::Debug + Clone + 'static,
{
    Ok(crate::rollout::engine::input("train", shape, data)?)
}

pub(super) fn scalar(v: f32) -> Result<SessionInputValue<'static>, TrainError> {
    tensor(&[], vec![v])
}
