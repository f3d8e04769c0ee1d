//! B prompts × G samples: vision and prefill once per prompt, the KV cache fanned out to its G
//! samples, then batched decode with per-sequence stop; finished rows leave the batch. Every
//! token carries its log-prob under the temperature-scaled distribution; LoRA tensors are plain
//! graph inputs, swapped with [`Engine::set_lora`] between calls without rebuilding sessions.

use crate::kernels::{cpu, Logits, RowKey, SamplingParams};
use crate::model::package::{KvLayout, Package, PackageError};
use crate::model::processor::{preprocess, PreprocessorConfig, ProcessedImage, ProcessorError};
use crate::model::prompt::{PromptBuilder, PromptError};
use crate::model::rope::{rope_index, RopeConfig, RopeError};
use crate::model::session::{environment, session_builder, DeviceChoice, ProviderError};
use image::RgbImage;
use ort::session::{Session, SessionInputValue};
use ort::value::Tensor;
use rayon::prelude::*;
use std::path::Path;
use std::time::Instant;

#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error(transparent)]
    Package(#[from] PackageError),
    #[error(transparent)]
    Prompt(#[from] PromptError),
    #[error(transparent)]
    Image(#[from] ProcessorError),
    #[error(transparent)]
    Rope(#[from] RopeError),
    #[error("{graph}: {msg}")]
    Run { graph: &'static str, msg: String },
    #[error("LoRA: {0}")]
    Lora(String),
    #[error("{0}")]
    Config(String),
    #[error(transparent)]
    Provider(#[from] ProviderError),
}

fn run_err(graph: &'static str) -> impl Fn(ort::Error) -> EngineError {
    move |e| EngineError::Run {
        graph,
        msg: e.to_string(),
    }
}

/// An owned tensor input of `graph`.
pub(crate) fn input<T>(
    graph: &'static str,
    shape: &[usize],
    data: Vec<T>,
) -> Result<SessionInputValue<'static>, EngineError>
where
    T: ort::value::PrimitiveTensorElementType + std::fmt::Debug + Clone + 'static,
{
    let shape: Vec<i64> = shape.iter().map(|d| *d as i64).collect();
    Ok(Tensor::from_array((shape, data))
        .map_err(run_err(graph))?
        .into())
}

/// A cache tensor as an ONNX Runtime value.
fn kv_value(shape: &[usize], data: Vec<f32>) -> Result<ort::value::DynValue, EngineError> {
    let shape: Vec<i64> = shape.iter().map(|d| *d as i64).collect();
    Ok(Tensor::from_array((shape, data))
        .map_err(run_err("decoder"))?
        .into_dyn())
}

/// One prompt: EasyR1's `problem` (with `<image>` placeholders) and its images.
#[derive(Debug, Clone)]
pub struct Request {
    /// Keys the random streams: the same id, sample and step draw the same numbers in any batch.
    pub id: u64,
    pub problem: String,
    pub images: Vec<RgbImage>,
}

#[derive(Debug, Clone)]
pub struct GenerationConfig {
    pub group: usize,
    pub max_new_tokens: usize,
    pub sampling: SamplingParams,
    /// Appended to the problem after one space (EasyR1's format prompt); `None` for none.
    pub format_sentence: Option<String>,
    /// Use each problem as the user text byte for byte: no trimming, no format sentence
    /// (benchmark prompts).
    pub verbatim: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Finish {
    Stop,
    Length,
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct Completion {
    pub prompt_index: usize,
    pub sample_index: usize,
    pub tokens: Vec<u32>,
    pub logprobs: Vec<f32>,
    pub finish: Finish,
}

/// Optional record of each step's last-position logits, for parity checks: `steps[s]` holds
/// `(row ids, logits [rows, vocab])`, rows numbered `prompt · group + sample`.
#[derive(Debug, Default)]
pub struct Trace {
    pub prompt_ids: Vec<Vec<u32>>,
    pub position_ids: Vec<i64>,
    pub rope_deltas: Vec<i64>,
    pub steps: Vec<(Vec<usize>, Vec<f32>)>,
}

/// Where the engine's time went since the last [`Engine::take_stats`].
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct EngineStats {
    /// Inside ONNX Runtime `run` calls (all graphs).
    pub ort_s: f64,
    pub vision_s: f64,
    /// Prefill (embedding excluded) and the decode loop (sampling and cache bookkeeping
    /// included).
    pub prefill_s: f64,
    pub decode_s: f64,
    pub prefill_tokens: usize,
    pub decode_steps: usize,
    pub generated_tokens: usize,
    /// Outside ONNX Runtime: image preprocessing, sampling, and cache row selection.
    pub preprocess_s: f64,
    pub sample_s: f64,
    pub cache_s: f64,
}

/// Prompts ready to generate from: token ids (image placeholders expanded), image grids and
/// vision features, per request.
#[derive(Debug, Clone, Default)]
pub struct Prepared {
    pub prompts: Vec<Vec<u32>>,
    pub grids: Vec<Vec<[u32; 3]>>,
    /// `[image tokens, out_hidden_size]` flattened, per request.
    pub features: Vec<Vec<f32>>,
}

pub struct Engine {
    pub package: Package,
    pub prompts: PromptBuilder,
    pub preprocessor: PreprocessorConfig,
    vision: Session,
    embedding: Session,
    decoder: Session,
    /// LoRA inputs as ONNX Runtime values, built when set and fed by reference every step.
    lora: Vec<(String, Vec<usize>, Tensor<f32>)>,
    provider: String,
    stats: EngineStats,
    env: &'static ort::environment::Environment,
    choice: DeviceChoice,
}

struct Kv {
    /// Per layer and k/v: [rows, kv_heads, len, head_dim], as ONNX Runtime returned them (fed back
    /// without a copy).
    data: Vec<ort::value::DynValue>,
    len: usize,
}

impl Engine {
    /// Opens a package on the CPU execution provider.
    pub fn open(dir: &Path, ort_lib: Option<&Path>) -> Result<Engine, EngineError> {
        Engine::open_on(dir, ort_lib, &DeviceChoice::default())
    }

    /// Opens a package on the chosen execution provider; an unavailable provider is an error
    /// unless `choice.allow_fallback`.
    pub fn open_on(
        dir: &Path,
        ort_lib: Option<&Path>,
        choice: &DeviceChoice,
    ) -> Result<Engine, EngineError> {
        let package = Package::open(dir)?;
        let env = environment(ort_lib).map_err(PackageError::from)?;
        let mut provider = String::new();
        let mut load = |file: &str| -> Result<Session, EngineError> {
            let path = package.graph_path(file);
            let (mut b, used) = session_builder(env, choice)?;
            provider = used;
            b.commit_from_file(&path).map_err(|e| {
                EngineError::Package(PackageError::File {
                    path,
                    msg: e.to_string(),
                })
            })
        };
        let m = &package.manifest;
        let (vision, embedding, decoder) = (
            load(&m.graphs.vision)?,
            load(&m.graphs.embedding)?,
            load(&m.graphs.decoder)?,
        );
        let pp = dir.join("preprocessor_config.json");
        let preprocessor: PreprocessorConfig = match std::fs::read_to_string(&pp) {
            Ok(t) => serde_json::from_str(&t)
                .map_err(|e| EngineError::Config(format!("{}: {e}", pp.display())))?,
            Err(_) => PreprocessorConfig::default(),
        };
        let zeros = |name: String,
                     shape: &[usize]|
         -> Result<(String, Vec<usize>, Tensor<f32>), EngineError> {
            let dims: Vec<i64> = shape.iter().map(|d| *d as i64).collect();
            let t = Tensor::from_array((dims, vec![0f32; shape.iter().product()]))
                .map_err(run_err("decoder"))?;
            Ok((name, shape.to_vec(), t))
        };
        let mut lora = Vec::with_capacity(2 * m.lora.tensors.len());
        for t in &m.lora.tensors {
            lora.push(zeros(format!("{}.A", t.name), &t.a)?);
            lora.push(zeros(format!("{}.B", t.name), &t.b)?);
        }
        Ok(Engine {
            prompts: PromptBuilder::from_dir(dir)?,
            preprocessor,
            package,
            vision,
            embedding,
            decoder,
            lora,
            provider,
            stats: EngineStats::default(),
            env,
            choice: choice.clone(),
        })
    }

    /// Opens another graph of the package (`logprobs.onnx`, `train.onnx`) on the engine's
    /// execution provider.
    pub fn open_graph(&self, file: &str) -> Result<Session, EngineError> {
        let path = self.package.graph_path(file);
        let (mut b, _) = session_builder(self.env, &self.choice)?;
        b.commit_from_file(&path).map_err(|e| {
            EngineError::Package(PackageError::File {
                path,
                msg: e.to_string(),
            })
        })
    }

    /// The time split since the last call, and resets it.
    pub fn take_stats(&mut self) -> EngineStats {
        std::mem::take(&mut self.stats)
    }

    /// The execution provider in use (with the reason, after a fallback).
    pub fn provider(&self) -> &str {
        &self.provider
    }

    /// Replaces LoRA tensors by name (PEFT layout, `lora.{layer}.{target}.A|B`); no session rebuild.
    pub fn set_lora(&mut self, tensors: &[(String, Vec<f32>)]) -> Result<(), EngineError> {
        if self.lora.is_empty() && !tensors.is_empty() {
            return Err(EngineError::Lora(format!(
                "{} has no LoRA inputs (an onnxruntime-genai folder?): merge the adapter with \
                 `ssrl export` into a package from models/export.py instead",
                self.package.dir.display()
            )));
        }
        for (name, values) in tensors {
            let slot = self
                .lora
                .iter_mut()
                .find(|(n, _, _)| n == name)
                .ok_or_else(|| EngineError::Lora(format!("the package has no input {name}")))?;
            if values.len() != slot.1.iter().product::<usize>() {
                return Err(EngineError::Lora(format!(
                    "{name}: {} values for shape {:?}",
                    values.len(),
                    slot.1
                )));
            }
            let dims: Vec<i64> = slot.1.iter().map(|d| *d as i64).collect();
            slot.2 = Tensor::from_array((dims, values.clone())).map_err(run_err("decoder"))?;
        }
        Ok(())
    }

    fn embed(
        &mut self,
        ids: Vec<i64>,
        rows: usize,
        cols: usize,
        features: (Vec<f32>, usize),
    ) -> Result<Vec<f32>, EngineError> {
        let d = self.package.manifest.vision.out_hidden_size;
        let inputs: Vec<(String, SessionInputValue<'static>)> = vec![
            ("input_ids".into(), input("embedding", &[rows, cols], ids)?),
            (
                "image_features".into(),
                input("embedding", &[features.1, d], features.0)?,
            ),
        ];
        let t = Instant::now();
        let out = self.embedding.run(inputs).map_err(run_err("embedding"))?;
        self.stats.ort_s += t.elapsed().as_secs_f64();
        let (_, e) = out["inputs_embeds"]
            .try_extract_tensor::<f32>()
            .map_err(run_err("embedding"))?;
        Ok(e.to_vec())
    }

    /// Runs the decoder; returns the logits of column `last[r]` of each row `r` and the new cache.
    #[allow(clippy::too_many_arguments)]
    fn decode(
        &mut self,
        embeds: Vec<f32>,
        rows: usize,
        cols: usize,
        mask: &[Vec<i64>],
        pos: Vec<i64>,
        kv: Kv,
        last: &[usize],
    ) -> Result<(Vec<f32>, Kv), EngineError> {
        let t = &self.package.manifest.text;
        let (layers, hidden, vocab) = (t.num_hidden_layers, t.hidden_size, t.vocab_size);
        let total = kv.len + cols;
        let flat_mask: Vec<i64> = mask.iter().flatten().copied().collect();
        let mut inputs: Vec<(String, SessionInputValue<'_>)> = vec![
            (
                "inputs_embeds".into(),
                input("decoder", &[rows, cols, hidden], embeds)?,
            ),
            (
                "attention_mask".into(),
                input("decoder", &[rows, total], flat_mask)?,
            ),
            (
                "position_ids".into(),
                input("decoder", &[3, rows, cols], pos)?,
            ),
        ];
        for (i, data) in kv.data.into_iter().enumerate() {
            let name = format!(
                "past_key_values.{}.{}",
                i / 2,
                if i % 2 == 0 { "key" } else { "value" }
            );
            inputs.push((name, SessionInputValue::from(data)));
        }
        inputs.extend(
            self.lora
                .iter()
                .map(|(n, _, t)| (n.clone(), SessionInputValue::from(t))),
        );
        let t = Instant::now();
        let mut out = self.decoder.run(inputs).map_err(run_err("decoder"))?;
        self.stats.ort_s += t.elapsed().as_secs_f64();
        let (_, logits) = out["logits"]
            .try_extract_tensor::<f32>()
            .map_err(run_err("decoder"))?;
        let mut picked = Vec::with_capacity(rows * vocab);
        for (r, &c) in last.iter().enumerate().take(rows) {
            let start = (r * cols + c) * vocab;
            picked.extend_from_slice(&logits[start..start + vocab]);
        }
        let mut data = Vec::with_capacity(2 * layers);
        for i in 0..2 * layers {
            let name = format!(
                "present.{}.{}",
                i / 2,
                if i % 2 == 0 { "key" } else { "value" }
            );
            data.push(out.remove(&name).ok_or_else(|| EngineError::Run {
                graph: "decoder",
                msg: format!("no output {name}"),
            })?);
        }
        Ok((picked, Kv { data, len: total }))
    }

    /// Keeps the cache rows `keep` (in that order; a row may repeat, which fans prompts out).
    fn select_rows(&mut self, kv: &Kv, keep: &[usize]) -> Result<Kv, EngineError> {
        let t0 = Instant::now();
        let t = &self.package.manifest.text;
        let (kvh, hd) = (t.num_key_value_heads, t.head_dim);
        let row = kvh * kv.len * hd;
        let mut data = Vec::with_capacity(kv.data.len());
        for v in &kv.data {
            let (_, d) = v.try_extract_tensor::<f32>().map_err(run_err("decoder"))?;
            let mut out = Vec::with_capacity(keep.len() * row);
            for &r in keep {
                out.extend_from_slice(&d[r * row..(r + 1) * row]);
            }
            data.push(kv_value(&[keep.len(), kvh, kv.len, hd], out)?);
        }
        self.stats.cache_s += t0.elapsed().as_secs_f64();
        Ok(Kv { data, len: kv.len })
    }

    /// Tokenises every request's prompt and runs the vision tower once over all their images.
    pub fn prepare(
        &mut self,
        requests: &[Request],
        format_sentence: Option<&str>,
    ) -> Result<Prepared, EngineError> {
        self.prepare_as(requests, format_sentence, false)
    }

    fn prepare_as(
        &mut self,
        requests: &[Request],
        format_sentence: Option<&str>,
        verbatim: bool,
    ) -> Result<Prepared, EngineError> {
        let merge = self.package.manifest.vision.spatial_merge_size;
        // Image preprocessing on the rayon pool; then one vision call per image (attention
        // cost and memory grow with the square of the patches in a call).
        let t_pre = Instant::now();
        let pre: Vec<Vec<ProcessedImage>> = requests
            .par_iter()
            .map(|r| {
                r.images
                    .par_iter()
                    .map(|img| preprocess(img, &self.preprocessor))
                    .collect::<Result<Vec<_>, _>>()
            })
            .collect::<Result<_, _>>()?;
        self.stats.preprocess_s += t_pre.elapsed().as_secs_f64();
        let (mut grids, mut prompts, mut features) = (Vec::new(), Vec::new(), Vec::new());
        for (r, images) in requests.iter().zip(pre) {
            let msgs = if verbatim {
                PromptBuilder::verbatim(&r.problem)
            } else {
                PromptBuilder::content(&r.problem, format_sentence)
            };
            let rendered = self.prompts.render(&msgs)?;
            let counts: Vec<usize> = images.iter().map(|p| p.num_tokens(merge)).collect();
            prompts.push(self.prompts.encode(&rendered, &counts)?);
            grids.push(images.iter().map(|p| p.grid_thw).collect());
            let mut f = Vec::new();
            for p in images {
                f.extend(self.vision_features(p)?);
            }
            features.push(f);
        }
        Ok(Prepared {
            prompts,
            grids,
            features,
        })
    }

    /// The vision tower on one preprocessed image: `[tokens, out_hidden_size]` flattened.
    fn vision_features(&mut self, p: ProcessedImage) -> Result<Vec<f32>, EngineError> {
        let n = p.pixel_values.len() / p.row_len;
        let g: Vec<i64> = p.grid_thw.iter().map(|v| i64::from(*v)).collect();
        let inputs: Vec<(String, SessionInputValue<'static>)> = vec![
            (
                "pixel_values".into(),
                input("vision", &[n, p.row_len], p.pixel_values)?,
            ),
            ("image_grid_thw".into(), input("vision", &[1, 3], g)?),
        ];
        let t = Instant::now();
        let out = self.vision.run(inputs).map_err(run_err("vision"))?;
        let dt = t.elapsed().as_secs_f64();
        self.stats.ort_s += dt;
        self.stats.vision_s += dt;
        let (_, f) = out["image_features"]
            .try_extract_tensor::<f32>()
            .map_err(run_err("vision"))?;
        Ok(f.to_vec())
    }

    /// Token embeddings of `[rows, cols]` ids with `features` (`[n, out_hidden_size]`, in row
    /// order) scattered over the image placeholders: `[rows, cols, hidden]`.
    pub fn embed_rows(
        &mut self,
        ids: Vec<i64>,
        rows: usize,
        cols: usize,
        features: Vec<f32>,
    ) -> Result<Vec<f32>, EngineError> {
        let n = features.len() / self.package.manifest.vision.out_hidden_size;
        self.embed(ids, rows, cols, (features, n))
    }

    /// Generates `cfg.group` samples for every request.
    pub fn generate(
        &mut self,
        requests: &[Request],
        cfg: &GenerationConfig,
        trace: Option<&mut Trace>,
    ) -> Result<Vec<Completion>, EngineError> {
        if requests.is_empty() || cfg.group == 0 {
            return Ok(vec![]);
        }
        let prepared = self.prepare_as(requests, cfg.format_sentence.as_deref(), cfg.verbatim)?;
        self.generate_prepared(requests, &prepared, cfg, trace)
    }

    /// [`Engine::generate`] on prompts already prepared (the trainer keeps them for the
    /// training batch).
    pub fn generate_prepared(
        &mut self,
        requests: &[Request],
        prepared: &Prepared,
        cfg: &GenerationConfig,
        mut trace: Option<&mut Trace>,
    ) -> Result<Vec<Completion>, EngineError> {
        if requests.is_empty() || cfg.group == 0 {
            return Ok(vec![]);
        }
        let m = self.package.manifest.clone();
        let merge = m.vision.spatial_merge_size;
        let prompts = &prepared.prompts;
        let grids: Vec<[u32; 3]> = prepared.grids.iter().flatten().copied().collect();
        let features = {
            let f: Vec<f32> = prepared.features.concat();
            let n = f.len() / m.vision.out_hidden_size;
            (f, n)
        };
        // Padded prompt batch, M-RoPE positions.
        let b = requests.len();
        let s = prompts.iter().map(Vec::len).max().unwrap_or(0);
        let pad = m.tokens.pad;
        let mut ids = Vec::with_capacity(b * s);
        let mut mask: Vec<Vec<i64>> = Vec::with_capacity(b);
        let mut mask_u8 = Vec::with_capacity(b * s);
        // Left padding, except for decoders that keep each row's cache packed from position 0
        // (GroupQueryAttention): those get right padding and write each new token at the row's
        // own length.
        let packed = m.kv_layout == KvLayout::Packed;
        for p in prompts {
            let n = s - p.len();
            let row: Vec<i64> = if packed {
                ids.extend(p.iter().copied().chain(std::iter::repeat_n(pad, n)));
                std::iter::repeat_n(1, p.len())
                    .chain(std::iter::repeat_n(0, n))
                    .collect()
            } else {
                ids.extend(std::iter::repeat_n(pad, n).chain(p.iter().copied()));
                std::iter::repeat_n(0, n)
                    .chain(std::iter::repeat_n(1, p.len()))
                    .collect()
            };
            mask_u8.extend(row.iter().map(|v| *v as u8));
            mask.push(row);
        }
        let rope_cfg = RopeConfig {
            image_token_id: m.tokens.image,
            video_token_id: m.tokens.video,
            spatial_merge_size: merge,
            tokens_per_second: m.vision.tokens_per_second,
        };
        let (pos, deltas) = rope_index(&ids, &mask_u8, b, &grids, &[], &[], &rope_cfg)?;
        if let Some(t) = trace.as_deref_mut() {
            t.prompt_ids = prompts.clone();
            t.position_ids = pos.clone();
            t.rope_deltas = deltas.clone();
        }
        let t = &m.text;
        let empty = Kv {
            data: (0..2 * t.num_hidden_layers)
                .map(|_| kv_value(&[b, t.num_key_value_heads, 0, t.head_dim], Vec::new()))
                .collect::<Result<_, _>>()?,
            len: 0,
        };
        let embeds = self.embed(ids.iter().map(|v| i64::from(*v)).collect(), b, s, features)?;
        let t_prefill = Instant::now();
        let last: Vec<usize> = match packed {
            true => prompts.iter().map(|p| p.len().max(1) - 1).collect(),
            false => vec![s.max(1) - 1; b],
        };
        let (prefill_logits, kv) = self.decode(embeds, b, s, &mask, pos, empty, &last)?;
        self.stats.prefill_s += t_prefill.elapsed().as_secs_f64();
        self.stats.prefill_tokens += prompts.iter().map(Vec::len).sum::<usize>();
        let t_decode = Instant::now();
        // Fan out: row i = prompt i / G, sample i % G.
        let g = cfg.group;
        let fan: Vec<usize> = (0..b * g).map(|i| i / g).collect();
        let mut kv = self.select_rows(&kv, &fan)?;
        let mut masks: Vec<Vec<i64>> = fan.iter().map(|&p| mask[p].clone()).collect();
        let vocab = t.vocab_size;
        let mut logits: Vec<f32> = fan
            .iter()
            .flat_map(|&p| prefill_logits[p * vocab..(p + 1) * vocab].iter().copied())
            .collect();
        let mut active: Vec<usize> = (0..b * g).collect();
        let mut seen: Vec<usize> = fan.iter().map(|&p| prompts[p].len()).collect();
        let mut out: Vec<Completion> = (0..b * g)
            .map(|i| Completion {
                prompt_index: i / g,
                sample_index: i % g,
                tokens: vec![],
                logprobs: vec![],
                finish: Finish::Length,
            })
            .collect();
        for step in 0..cfg.max_new_tokens {
            if let Some(t) = trace.as_deref_mut() {
                t.steps.push((active.clone(), logits.clone()));
            }
            let keys: Vec<RowKey> = active
                .iter()
                .map(|&i| RowKey {
                    sequence: crate::rng::mix64(
                        requests[i / g].id.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ (i % g) as u64,
                    ) as u32,
                    step: step as u32,
                })
                .collect();
            // Image and video placeholders are never sampled: the embedding graph would look for
            // vision features behind them (vLLM likewise never emits them).
            for row in logits.chunks_exact_mut(vocab) {
                for id in [m.tokens.image, m.tokens.video] {
                    if let Some(x) = row.get_mut(id as usize) {
                        *x = f32::NEG_INFINITY;
                    }
                }
            }
            let t_sample = Instant::now();
            let drawn = cpu::sample(Logits::F32(&logits), vocab, &keys, &cfg.sampling)
                .map_err(|e| EngineError::Config(e.to_string()))?;
            self.stats.sample_s += t_sample.elapsed().as_secs_f64();
            let mut keep = Vec::new();
            for (k, (&i, s)) in active.iter().zip(&drawn).enumerate() {
                out[i].tokens.push(s.token);
                out[i].logprobs.push(s.logprob);
                if m.tokens.eos.contains(&s.token) {
                    out[i].finish = Finish::Stop;
                } else if out[i].tokens.len() < cfg.max_new_tokens {
                    keep.push(k);
                }
            }
            if keep.is_empty() {
                break;
            }
            if keep.len() != active.len() {
                kv = self.select_rows(&kv, &keep)?;
                masks = keep.iter().map(|&k| masks[k].clone()).collect();
                seen = keep.iter().map(|&k| seen[k]).collect();
                active = keep.iter().map(|&k| active[k]).collect();
            }
            let n = active.len();
            let next: Vec<i64> = active
                .iter()
                .map(|&i| i64::from(*out[i].tokens.last().expect("one token")))
                .collect();
            self.stats.decode_steps += 1;
            let embeds = self.embed(next, n, 1, (Vec::new(), 0))?;
            let mut pos = vec![0i64; 3 * n];
            for (k, &i) in active.iter().enumerate() {
                let p = seen[k] as i64 + deltas[i / g];
                for r in 0..3 {
                    pos[r * n + k] = p;
                }
            }
            if packed {
                // Row k holds seen[k] tokens from position 0; the new one goes right after.
                let width = kv.len + 1;
                for (mrow, &sk) in masks.iter_mut().zip(&seen) {
                    mrow.clear();
                    mrow.extend((0..width).map(|j| i64::from(j <= sk)));
                }
            } else {
                for mrow in masks.iter_mut() {
                    mrow.push(1);
                }
            }
            let (l, new_kv) = self.decode(embeds, n, 1, &masks, pos, kv, &vec![0; n])?;
            kv = new_kv;
            logits = l;
            for s in seen.iter_mut() {
                *s += 1;
            }
        }
        self.stats.decode_s += t_decode.elapsed().as_secs_f64();
        self.stats.generated_tokens += out.iter().map(|c| c.tokens.len()).sum::<usize>();
        Ok(out)
    }
}
