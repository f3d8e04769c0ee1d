//! B prompts × G samples: vision and prefill once per prompt, then batched decode of the G
//! samples with per-sequence stop; finished rows leave the batch. On the host the prefill runs
//! in groups of near-equal prompt length (`length_groups`), so short prompts are not padded to
//! long ones. With this project's packages the prompt's cache is shared: all G samples read it
//! in place (the decoder's prefix inputs), so neither the fan-out nor any step copies it; other
//! decoders get it fanned out. The rows' own tokens stay where the decoder reads them, so long
//! generations do not copy them every step: this project's packages keep all but the newest few
//! in a buffer read in place (`OWN_CHUNK`; CPU and CUDA); GroupQueryAttention decoders get one
//! past/present buffer (CPU). Small models on few cores run as CPU slices, the prompts dealt
//! among them by estimated cost (`prompt_shares`). Every
//! token carries its log-prob under the distribution it was drawn from (temperature-scaled,
//! renormalised over the top-k / top-p set when those cut the row); LoRA tensors are plain
//! graph inputs, swapped with [`Engine::set_lora`] between calls without rebuilding sessions.
//! On CUDA / TensorRT the cache and logits stay on the GPU and tokens are drawn there by the
//! CUDA kernels, on the stream the sessions run on. Half-precision decoders (onnxruntime-genai's
//! fp16 / bf16 builds, and this project's packages exported in half precision) take their types
//! at the graphs' edges (`float.rs`); a half cache stays on the GPU as an fp32 one does, but for
//! decoders whose logits are half (onnxruntime-genai's), whose cache stays on the host.

use super::gpu::{trt_profiles, OnGpu};
use super::kv::own_cache_in_place;
use super::request::{
    prompt_ids, tokenize, GenerationConfig, NoRoom, Prepared, PromptText, Request,
};
use super::runner::{Graphs, LoraInput, Runner, VisionOut};
use super::share::{deal, joined, prompt_shares, PromptCost};
pub(crate) use super::types::input;
use super::types::run_err;
pub use super::types::{Completion, EngineError, EngineStats, Finish, Trace};
use crate::kernels::cuda::Cuda;
use crate::model::package::{Package, PackageError};
use crate::model::processor::{grid_thw, image_tokens, preprocess, PreprocessorConfig};
use crate::model::prompt::PromptBuilder;
use crate::model::session::{environment, session_builder, ComputeStream, Device, DeviceChoice};
use crate::model::weights::{check_external_data, SharedWeights};
use image::RgbImage;
use ort::session::Session;
use ort::value::Tensor;
use rayon::prelude::*;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Instant;

pub struct Engine {
    pub package: Package,
    /// Shared with the CPU slices, which tokenise their own prompts.
    pub prompts: Arc<PromptBuilder>,
    pub preprocessor: PreprocessorConfig,
    graphs: Graphs,
    /// CPU slices ([`Engine::set_cpu_slices`]): single-threaded sessions of their own, each
    /// generating a share of the prompts concurrently with the others.
    slices: Vec<Slice>,
    /// LoRA inputs as ONNX Runtime values, built when set and fed by reference every step.
    lora: Vec<LoraInput>,
    provider: String,
    stats: EngineStats,
    env: &'static ort::environment::Environment,
    choice: DeviceChoice,
    /// On CUDA / TensorRT: the decoder's cache and logits stay on the GPU and tokens are
    /// drawn there. `None` on the CPU, or with [`Engine::set_host_cache`].
    gpu: Option<OnGpu>,
    /// The GPU side while the cache is kept on the host: its stream is the one the sessions
    /// run on, so it lives as long as they do (fields drop in order, the sessions first).
    parked: Option<OnGpu>,
    /// The decode loop keeps the rows' own tokens where the decoder reads them, not copied
    /// every step ([`own_cache_in_place`]).
    own_in_place: bool,
    /// The most tokens a sequence may hold, prompt and new ones ([`Engine::context_length`]).
    context: Option<usize>,
    /// With [`DeviceChoice::shared_weights`] (CPU or CUDA): the one copy of the weights every
    /// session reads. Last: dropped after the sessions.
    weights: Option<Arc<Mutex<SharedWeights>>>,
    /// Why the sessions could not share one copy of the weights where it was asked for.
    weights_note: Option<String>,
}

/// An error opening the graph at `path`.
fn file_error(path: &Path, msg: impl ToString) -> EngineError {
    EngineError::Package(PackageError::File {
        path: path.to_path_buf(),
        msg: msg.to_string(),
    })
}

/// ONNX Runtime's own error setting up a session for the graph at `path`.
fn ort_error(path: &Path) -> impl Fn(ort::Error) -> EngineError + '_ {
    move |source| {
        PackageError::Ort {
            path: path.to_path_buf(),
            source,
        }
        .into()
    }
}

/// ONNX Runtime's error loading the graph at `path` on `provider` ([`PackageError::load`]).
fn load_error<'a>(path: &'a Path, provider: &'a str) -> impl Fn(ort::Error) -> EngineError + 'a {
    move |source| PackageError::load(path, provider, source).into()
}

/// `b` reading its graph's weights from `weights` (with no pre-packed copies), when given; the
/// graph's weight files are checked first ([`check_external_data`], which the store's
/// `attach` does on the tensors it lists), shared or not.
fn shared(
    b: ort::session::builder::SessionBuilder,
    weights: Option<&Arc<Mutex<SharedWeights>>>,
    path: &Path,
) -> Result<ort::session::builder::SessionBuilder, EngineError> {
    let Some(w) = weights else {
        check_external_data(path).map_err(PackageError::Weights)?;
        return Ok(b);
    };
    let b = (b.with_prepacking(false)).map_err(|e| ort_error(path)(e.into()))?;
    let mut w = w.lock().unwrap_or_else(|e| e.into_inner());
    w.attach(b, path)
        .map_err(|e| EngineError::Package(PackageError::Weights(e)))
}

/// One CPU slice: its sessions and the thread they run on, kept for the engine's life.
struct Slice {
    graphs: Graphs,
    /// One thread; the slice's own parallel work (sampling) runs on it as well.
    thread: rayon::ThreadPool,
}

/// `b`, writing ONNX Runtime's per-operator profile of the session into `dir` (when given) as
/// `{graph file stem}{suffix}_{time}.json` once [`Engine::end_profiling`] is called.
fn profiled(
    b: ort::session::builder::SessionBuilder,
    dir: Option<&Path>,
    file: &str,
    suffix: &str,
    path: &Path,
) -> Result<ort::session::builder::SessionBuilder, EngineError> {
    let Some(dir) = dir else { return Ok(b) };
    let stem = file.strip_suffix(".onnx").unwrap_or(file);
    b.with_profiling(dir.join(format!("{stem}{suffix}")))
        .map_err(|e| file_error(path, format!("cannot profile: {e}")))
}

/// The store of the one copy of the weights every session of the package in `dir` reads, for
/// sessions on `provider` (the label [`session_builder`] gave): the mapped file on the CPU —
/// after a fallback from a GPU provider too — and one device copy under the CUDA provider; with
/// the note saying why where the GPU's store cannot be made (each session then loads its own).
/// TensorRT builds its engines from each graph's own weights.
fn weight_store(
    dir: &Path,
    device: &Device,
    provider: &str,
) -> (Option<Arc<Mutex<SharedWeights>>>, Option<String>) {
    let store = match device {
        _ if provider.starts_with("cpu") => SharedWeights::new(dir),
        Device::Cuda { device_id } => match SharedWeights::on_cuda(dir, *device_id) {
            Ok(w) => w,
            Err(e) => {
                let note = format!(
                    "one copy of the weights on GPU {device_id} is not available ({}): each \
                     session holds its own copy",
                    crate::error_chain(&e)
                );
                return (None, Some(note));
            }
        },
        _ => return (None, None),
    };
    (Some(Arc::new(Mutex::new(store))), None)
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
        let gpu_id = match choice.device {
            Device::Cuda { device_id } | Device::TensorRt { device_id, .. } => Some(device_id),
            Device::Cpu => None,
        };
        // The kernels' stream, handed to ONNX Runtime: graphs, row moves and sampling then run
        // in one stream order.
        let cuda = gpu_id.map(|id| Cuda::with_own_stream(id.max(0) as usize));
        let stream = match &cuda {
            Some(Ok(c)) => Some(ComputeStream(c.raw_stream())),
            _ => None,
        };
        let pp = dir.join("preprocessor_config.json");
        let preprocessor: PreprocessorConfig = match std::fs::read_to_string(&pp) {
            Ok(t) => serde_json::from_str(&t)
                .map_err(|e| EngineError::Config(format!("{}: {e}", pp.display())))?,
            Err(_) => PreprocessorConfig::default(),
        };
        let profiles = match choice.device {
            Device::TensorRt {
                limits: Some(l), ..
            } => {
                let v = &package.manifest.vision;
                let shapes = l.shapes(
                    v.patch_size as usize,
                    v.spatial_merge_size as usize,
                    preprocessor.max_pixels,
                );
                Some(trt_profiles(&package.manifest, &shapes))
            }
            _ => None,
        };
        // One copy of the weights, for the provider the first session gets (`weight_store`).
        let (mut weights, mut weights_note) = (None, None);
        let mut load = |file: &str, k: usize| -> Result<Session, EngineError> {
            let path = package.graph_path(file);
            let profile = profiles.as_ref().map(|p| &p[k]);
            let (b, used) = session_builder(env, choice, profile, stream)?;
            if k == 0 && choice.shared_weights {
                (weights, weights_note) = weight_store(dir, &choice.device, &used);
            }
            provider = used;
            let b = shared(b, weights.as_ref(), &path)?;
            let mut b = profiled(b, choice.profile.as_deref(), file, "", &path)?;
            let session = b
                .commit_from_file(&path)
                .map_err(load_error(&path, &provider))?;
            // Names and types up front: a wrong graph is one error naming the file and the
            // input, not a failed run later.
            package.check_graph(file, &session)?;
            Ok(session)
        };
        let m = &package.manifest;
        let (vision, embedding, decoder) = (
            load(&m.graphs.vision, 0)?,
            load(&m.graphs.embedding, 1)?,
            load(&m.graphs.decoder, 2)?,
        );
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
        let gpu = match (gpu_id, cuda) {
            // After a fallback to the CPU provider the cache stays on the host.
            (Some(id), Some(c)) if provider == choice.device.name() => {
                match c
                    .map_err(|e| e.to_string())
                    .and_then(|c| OnGpu::new(c, &decoder, id))
                {
                    Ok(g) => Some(g),
                    Err(e) => {
                        provider = format!("{provider} (cache and sampling on the host: {e})");
                        None
                    }
                }
            }
            _ => None,
        };
        let own_in_place = own_cache_in_place(m, &provider);
        Ok(Engine {
            own_in_place,
            context: package.context_length(),
            prompts: Arc::new(PromptBuilder::from_dir(dir, package.manifest.family)?),
            preprocessor,
            package,
            graphs: Graphs::new(vision, embedding, decoder),
            slices: Vec::new(),
            lora,
            provider,
            stats: EngineStats::default(),
            env,
            choice: choice.clone(),
            gpu,
            parked: None,
            weights,
            weights_note,
        })
    }

    /// The store every session reads its weights from ([`DeviceChoice::shared_weights`]); its
    /// holders keep it past the sessions they open with it.
    pub fn shared_weights(&self) -> Option<Arc<Mutex<SharedWeights>>> {
        self.weights.clone()
    }

    /// Keeps the decoder's cache and logits on the host even on a GPU provider (each step's
    /// cache then goes through host memory; for comparisons). No effect on the CPU.
    pub fn set_host_cache(&mut self, host: bool) {
        if host {
            if let Some(g) = self.gpu.take() {
                self.parked = Some(g);
            }
        } else if let Some(g) = self.parked.take() {
            self.gpu = Some(g);
        }
    }

    /// With `true` (the default where the decoder allows it, `own_cache_in_place`) a step does
    /// not copy the rows' own tokens: with a package's in-place own cache
    /// ([`Manifest::own_cache`](crate::model::package::Manifest::own_cache)) all but the
    /// newest `OWN_CHUNK` stay in a buffer the decoder reads in place; a GroupQueryAttention
    /// decoder ([`KvLayout::Packed`](crate::model::package::KvLayout::Packed)) gets a past with
    /// room that is also its present, so it writes each token in place. `false` feeds them all
    /// back as `past`, each step's `present` a new copy (for comparisons). Returns whether the
    /// in-place cache is in use.
    pub fn set_own_cache(&mut self, in_place: bool) -> bool {
        self.own_in_place = in_place && own_cache_in_place(&self.package.manifest, &self.provider);
        self.own_in_place
    }

    /// Whether the decode loop keeps the rows' older own tokens in a buffer read in place.
    pub fn own_cache_in_place(&self) -> bool {
        self.own_in_place
    }

    /// The most tokens a sequence may hold, prompt and generated (from the folder's
    /// `genai_config.json` or `config.json`); `None` where neither says. A prompt without room
    /// for `max_new_tokens` more is an error of [`Engine::generate`].
    pub fn context_length(&self) -> Option<usize> {
        self.context
    }

    /// Each request's prompt length in tokens (images included) as [`Engine::generate`] would
    /// render it with `cfg` — tokenising only, to find prompts too long before generating.
    pub fn prompt_lengths(
        &self,
        requests: &[Request],
        cfg: &GenerationConfig,
    ) -> Result<Vec<usize>, EngineError> {
        let text = PromptText::of(cfg);
        let all: Vec<&Request> = requests.iter().collect();
        let at: Vec<usize> = (0..requests.len()).collect();
        let merge = self.package.manifest.vision.spatial_merge_size;
        let (prompts, _) = tokenize(&self.prompts, &self.preprocessor, merge, &all, &at, text)?;
        Ok(prompts.iter().map(Vec::len).collect())
    }

    /// The prompt length in tokens of `problem` with images of `sizes` (`(width, height)`
    /// each; only their sizes count) as [`Engine::generate`] would render it with `cfg` — to
    /// check a dataset's prompts before any image is decoded.
    pub fn prompt_length(
        &self,
        problem: &str,
        sizes: &[(u32, u32)],
        cfg: &GenerationConfig,
    ) -> Result<usize, EngineError> {
        let text = PromptText::of(cfg);
        let merge = self.package.manifest.vision.spatial_merge_size;
        let (ids, _) = prompt_ids(
            &self.prompts,
            &self.preprocessor,
            merge,
            problem,
            sizes,
            text,
        )?;
        Ok(ids.len())
    }

    /// The requests [`Engine::generate`] would refuse with `cfg`, in order, each with the
    /// reason: a prompt that cannot be built (image placeholders that do not match the images,
    /// an image the processor refuses), or one without room for `cfg.max_new_tokens` in the
    /// model's context ([`NoRoom`]).
    pub fn unusable(&self, requests: &[Request], cfg: &GenerationConfig) -> Vec<(usize, String)> {
        (requests.iter().enumerate())
            .filter_map(|(at, r)| {
                let sizes: Vec<(u32, u32)> = r.images.iter().map(|i| i.dimensions()).collect();
                match self.prompt_length(&r.problem, &sizes, cfg) {
                    Err(e) => Some((at, crate::error_chain(&e))),
                    Ok(len) => NoRoom::of(at, len, cfg.max_new_tokens, self.context)
                        .map(|r| (at, format!("its prompt's {r}"))),
                }
            })
            .collect()
    }

    /// Whether the decode loop keeps its cache and logits on the GPU.
    pub fn cache_on_gpu(&self) -> bool {
        self.gpu.is_some()
    }

    /// Opens another graph of the package (`logprobs.onnx`, `train.onnx`) on the engine's
    /// execution provider. `release` (on the CPU): no arena and no memory pattern, so what a
    /// call allocates goes back when it ends, and no pre-packed weights — the training graph
    /// reads each weight two ways (forward and backward), and ONNX Runtime packed a copy for
    /// each beside the weight itself (3B widths, 2 layers: 1.75 GB more held, for 6–9 % of
    /// speed). With [`DeviceChoice::shared_weights`] the session reads the engine's copy of the
    /// weights: drop it before the engine, or keep [`Engine::shared_weights`] until it is gone
    /// (as the trainer does).
    pub fn open_graph(&self, file: &str, release: bool) -> Result<Session, EngineError> {
        let path = self.package.graph_path(file);
        let (b, provider) = session_builder(self.env, &self.choice, None, None)?;
        let mut b = shared(b, self.weights.as_ref(), &path)?;
        if release && self.choice.device == Device::Cpu {
            let no_arena = ort::ep::CPU::default().with_arena_allocator(false).build();
            let err = ort_error(&path);
            b = (b.with_execution_providers([no_arena])).map_err(|e| err(e.into()))?;
            b = b.with_memory_pattern(false).map_err(|e| err(e.into()))?;
            b = b.with_prepacking(false).map_err(|e| err(e.into()))?;
        }
        b.commit_from_file(&path)
            .map_err(load_error(&path, &provider))
    }

    /// The time split since the last call, and resets it.
    pub fn take_stats(&mut self) -> EngineStats {
        std::mem::take(&mut self.stats)
    }

    /// The execution provider in use (with the reason, after a fallback).
    pub fn provider(&self) -> &str {
        &self.provider
    }

    /// Why each session holds its own copy of the weights where one shared copy was asked for
    /// (the GPU's weight store could not be set up); `None` otherwise.
    pub fn weights_note(&self) -> Option<String> {
        self.weights_note.clone()
    }

    /// What a package in half precision computes in half, and on the CPU what that costs;
    /// `None` for fp32. A builder decoder's precision is its I/O's; this project's half
    /// packages compute in half as transformers does in that dtype and return fp32 logits.
    pub fn precision_note(&self) -> Option<String> {
        let dtype = &self.package.manifest.dtype;
        if dtype == "fp32" {
            return None;
        }
        let dir = self.package.dir.display();
        Some(match self.package.is_genai() {
            true => format!("{dir}: {dtype} embeddings, cache and logits"),
            false => format!(
                "{dir}: {dtype} weights, arithmetic and cache (norms, softmax and rotary angles in \
                 fp32){}",
                if self.provider == "cpu" {
                    "; on the CPU, ONNX Runtime widens it to fp32 where it has no fp16 kernel, \
                     with fp32 copies of the weights in each session: an fp32 package is the CPU's"
                } else {
                    ""
                }
            ),
        })
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

    /// Tokenises every request's prompt and runs the vision tower once over all their images.
    pub fn prepare(
        &mut self,
        requests: &[Request],
        format_sentence: Option<&str>,
    ) -> Result<Prepared, EngineError> {
        self.prepare_as(requests, PromptText::formatted(format_sentence))
    }

    fn prepare_as(
        &mut self,
        requests: &[Request],
        text: PromptText<'_>,
    ) -> Result<Prepared, EngineError> {
        let merge = self.package.manifest.vision.spatial_merge_size;
        let all: Vec<&Request> = requests.iter().collect();
        let at: Vec<usize> = (0..requests.len()).collect();
        let (prompts, grids) = tokenize(&self.prompts, &self.preprocessor, merge, &all, &at, text)?;
        let images: Vec<&RgbImage> = requests.iter().flat_map(|r| &r.images).collect();
        let mut each = self.vision_features(&images)?.into_iter();
        let (mut features, mut deepstack) = (Vec::new(), Vec::new());
        let k = self.package.manifest.vision.deepstack_layers;
        for r in requests {
            let mine: Vec<VisionOut> = each.by_ref().take(r.images.len()).collect();
            let (f, d) = join_images(&mine, k);
            features.push(f);
            deepstack.push(d);
        }
        Ok(Prepared {
            prompts,
            grids,
            features,
            deepstack,
        })
    }

    /// The vision tower on each image, one call per image (attention cost and memory grow
    /// with the square of the patches in a call). One set of sessions: the images are
    /// preprocessed on the rayon pool first. With CPU slices the images are shared out among
    /// them, and each slice preprocesses an image just before its vision call, on its own
    /// thread (one image's pixels alive at a time, their memory reused).
    fn vision_features(&mut self, images: &[&RgbImage]) -> Result<Vec<VisionOut>, EngineError> {
        let k = self.slices.len().min(images.len());
        let cfg = &self.preprocessor;
        if k < 2 {
            let t = Instant::now();
            let pre = images
                .par_iter()
                .map(|img| preprocess(img, cfg))
                .collect::<Result<Vec<_>, _>>()?;
            self.stats.preprocess_s += t.elapsed().as_secs_f64();
            return self.on_own(|r| {
                pre.iter()
                    .map(|p| r.vision_features(&p.pixel_values, p.grid_thw, true))
                    .collect()
            });
        }
        // Dealt by patches (a share's vision time), any number of images to a share.
        let costs = images
            .iter()
            .map(|img| {
                grid_thw(img.width(), img.height(), cfg).map(|[t, h, w]| (t * h * w) as usize)
            })
            .collect::<Result<Vec<_>, _>>()?;
        let shares = deal(&costs, k);
        let cfg = cfg.clone();
        let parts = self.on_slices(shares.clone(), |r, share: Vec<usize>| {
            share
                .iter()
                .map(|&i| r.image_features(images[i], &cfg))
                .collect::<Result<Vec<_>, _>>()
        })?;
        let mut features = vec![(Vec::new(), Vec::new()); images.len()];
        for (part, share) in parts.into_iter().zip(&shares) {
            for (f, &i) in part.into_iter().zip(share) {
                features[i] = f;
            }
        }
        Ok(features)
    }

    /// The vision tower on one prompt's preprocessed images (`pixels`: their pixel rows one
    /// after the other, as [`preprocess`](crate::model::processor::preprocess) makes them;
    /// `grids`: theirs), one call per image, with the current vision-tower LoRA (`lora`) or
    /// without (the base tower, the reference policy's): the prompt's features `[tokens, D]`
    /// and, for a DeepStack package, its DeepStack features `[K, tokens, D]` (empty for others),
    /// laid out as [`Engine::prepare`] lays a request's out.
    pub fn prompt_image_outputs(
        &mut self,
        pixels: &[f32],
        grids: &[[u32; 3]],
        lora: bool,
    ) -> Result<(Vec<f32>, Vec<f32>), EngineError> {
        let patches = |g: &[u32; 3]| (g[0] * g[1] * g[2]) as usize;
        let width = pixels.len() / grids.iter().map(patches).sum::<usize>().max(1);
        let k = self.package.manifest.vision.deepstack_layers;
        let mut outs = Vec::with_capacity(grids.len());
        let mut at = 0;
        for g in grids {
            let n = patches(g) * width;
            let px = pixels.get(at..at + n).ok_or_else(|| EngineError::Run {
                graph: "vision",
                msg: format!(
                    "{} pixel values for images of {} patches",
                    pixels.len(),
                    grids.iter().map(patches).sum::<usize>()
                ),
            })?;
            outs.push(self.on_own(|r| r.vision_features(px, *g, lora))?);
            at += n;
        }
        Ok(join_images(&outs, k))
    }

    /// Runs `work` on a worker over the engine's own sessions; its stats join the engine's.
    fn on_own<T>(&mut self, work: impl FnOnce(&mut Runner<'_>) -> T) -> T {
        let mut r = Runner {
            g: &mut self.graphs,
            m: &self.package.manifest,
            lora: &self.lora,
            gpu: self.gpu.as_ref(),
            own_in_place: self.own_in_place,
            stats: EngineStats::default(),
            deepstack: None,
        };
        let out = work(&mut r);
        let stats = r.stats;
        self.stats.add(&stats, 1);
        out
    }

    /// Runs `work` on the first `shares.len()` CPU slices, one share each, concurrently; their
    /// stats join the engine's (times averaged over the slices) and the results come back in
    /// slice order, or the first slice's error.
    fn on_slices<S: Send, T: Send>(
        &mut self,
        shares: Vec<S>,
        work: impl Fn(&mut Runner<'_>, S) -> Result<T, EngineError> + Sync,
    ) -> Result<Vec<T>, EngineError> {
        let k = shares.len();
        let (m, lora, work) = (&self.package.manifest, &self.lora[..], &work);
        let own_in_place = self.own_in_place;
        // Each slice's work runs on its own thread (`install` blocks its caller, so one
        // short-lived caller per slice waits for it).
        // Each slice's result, stats and busy seconds.
        let mut done: Vec<(Result<T, EngineError>, EngineStats, f64)> =
            std::thread::scope(|scope| {
                let workers: Vec<_> = self
                    .slices
                    .iter_mut()
                    .zip(shares)
                    .map(|(slice, share)| {
                        let (g, thread) = (&mut slice.graphs, &slice.thread);
                        scope.spawn(move || {
                            thread.install(|| {
                                let mut r = Runner {
                                    g,
                                    m,
                                    lora,
                                    gpu: None,
                                    own_in_place,
                                    stats: EngineStats::default(),
                                    deepstack: None,
                                };
                                let t = Instant::now();
                                let out = work(&mut r, share);
                                (out, r.stats, t.elapsed().as_secs_f64())
                            })
                        })
                    })
                    .collect();
                workers
                    .into_iter()
                    .map(|w| w.join().expect("a CPU slice panicked"))
                    .collect()
            });
        let slowest = done.iter().map(|d| d.2).fold(0.0, f64::max);
        for (_, stats, busy) in &mut done {
            stats.slice_wait_s = slowest - *busy;
            self.stats.add(stats, k);
        }
        done.into_iter().map(|(out, ..)| out).collect()
    }

    /// Splits every later [`Engine::generate`] on the CPU into `n` slices of the prompts (and
    /// the vision calls into `n` shares of the images), each on single-threaded sessions of its
    /// own, run concurrently: for small models on few cores, where one step's operators are too
    /// small to spread over threads. Each slice holds its own copy of the weights. `n` ≤ 1 goes
    /// back to the engine's sessions; `None`: one slice per core up to 8 when `decoder.onnx` is
    /// under 64 MB (with its external data), else 1. Ignored (with `Ok(false)`) on a GPU provider.
    pub fn set_cpu_slices(&mut self, n: Option<usize>) -> Result<bool, EngineError> {
        let n = n.unwrap_or_else(|| self.default_cpu_slices());
        self.slices.clear();
        // "cpu", or "cpu (fallback from …)".
        if n <= 1 || !self.provider.starts_with("cpu") {
            return Ok(n <= 1);
        }
        let m = &self.package.manifest;
        let files = [&m.graphs.vision, &m.graphs.embedding, &m.graphs.decoder];
        for i in 0..n {
            let open = |file: &String| -> Result<Session, EngineError> {
                let path = self.package.graph_path(file);
                let (b, _) = session_builder(self.env, &DeviceChoice::default(), None, None)?;
                let slice = format!("-slice{i}");
                let b = shared(b, self.weights.as_ref(), &path)?;
                profiled(b, self.choice.profile.as_deref(), file, &slice, &path)?
                    .with_intra_threads(1)
                    .map_err(|e| ort_error(&path)(e.into()))?
                    .commit_from_file(&path)
                    .map_err(load_error(&path, "cpu"))
            };
            let thread = rayon::ThreadPoolBuilder::new()
                .num_threads(1)
                .thread_name(move |_| format!("ssrl-slice-{i}"))
                .build()
                .map_err(|e| EngineError::Config(format!("CPU slice {i}: no thread: {e}")))?;
            self.slices.push(Slice {
                graphs: Graphs::new(open(files[0])?, open(files[1])?, open(files[2])?),
                thread,
            });
        }
        Ok(true)
    }

    /// The CPU slices a run gets unless told: one per core up to 8 when `decoder.onnx` is under
    /// 64 MB (a small model, whose operators are too small to spread over threads; each slice
    /// holds a copy of the weights), else 1.
    fn default_cpu_slices(&self) -> usize {
        let decoder = self
            .package
            .graph_path(&self.package.manifest.graphs.decoder);
        // Weights in an external data file count (a large model's graph file alone is small).
        let small = crate::model::onnx_edit::size_with_data(&decoder) < 64 << 20;
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        if small {
            cores.min(8)
        } else {
            1
        }
    }

    /// Ends ONNX Runtime's profiling of every session opened with
    /// [`DeviceChoice::profile`](crate::model::session::DeviceChoice::profile) and returns the
    /// profile files written (none without it).
    pub fn end_profiling(&mut self) -> Result<Vec<std::path::PathBuf>, EngineError> {
        if self.choice.profile.is_none() {
            return Ok(vec![]);
        }
        let mut files = self.graphs.end_profiling()?;
        for s in &mut self.slices {
            files.extend(s.graphs.end_profiling()?);
        }
        Ok(files)
    }

    /// How many CPU slices generate concurrently (0: the engine's own sessions).
    pub fn cpu_slices(&self) -> usize {
        self.slices.len()
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
        self.on_own(|r| r.embed(ids, rows, cols, (features, n)))
    }

    /// Generates `cfg.group` samples for every request. Sampling settings that cannot sample
    /// ([`SamplingParams::check`](crate::kernels::SamplingParams::check)) are an error.
    pub fn generate(
        &mut self,
        requests: &[Request],
        cfg: &GenerationConfig,
        trace: Option<&mut Trace>,
    ) -> Result<Vec<Completion>, EngineError> {
        cfg.sampling.check().map_err(EngineError::Config)?;
        if requests.is_empty() || cfg.group == 0 {
            return Ok(vec![]);
        }
        let text = PromptText {
            room: self.context.map(|c| (c, cfg.max_new_tokens)),
            ..PromptText::of(cfg)
        };
        let k = self.slices.len().min(requests.len());
        if k < 2 || trace.is_some() {
            let prepared = self.prepare_as(requests, text)?;
            return self.generate_prepared(requests, &prepared, cfg, trace);
        }
        // With CPU slices each slice tokenises its own prompts, runs the vision tower on their
        // images and goes straight on to generating them: one hand-off per call, and no wait
        // for the slowest slice in between.
        let (builder, pre) = (Arc::clone(&self.prompts), self.preprocessor.clone());
        let merge = self.package.manifest.vision.spatial_merge_size;
        // A prompt's cost before tokenising: its image tokens and about a token per four bytes
        // of text.
        let costs = requests
            .iter()
            .map(|q| {
                let images = q.images.iter().map(|img| {
                    grid_thw(img.width(), img.height(), &pre).map(|g| image_tokens(g, merge))
                });
                let vision: usize = images.collect::<Result<Vec<_>, _>>()?.iter().sum();
                Ok(PromptCost {
                    tokens: vision + q.problem.len() / 4,
                    vision,
                })
            })
            .collect::<Result<Vec<_>, EngineError>>()?;
        let shares = prompt_shares(&costs, k);
        let parts = self.on_slices(shares.clone(), |r, share: Vec<usize>| {
            let requests: Vec<&Request> = share.iter().map(|&i| &requests[i]).collect();
            let (prompts, grids) = tokenize(&builder, &pre, merge, &requests, &share, text)?;
            let k = r.m.vision.deepstack_layers;
            let (features, deepstack) = requests
                .iter()
                .map(|q| {
                    let f = q.images.iter().map(|img| r.image_features(img, &pre));
                    Ok(join_images(&f.collect::<Result<Vec<_>, EngineError>>()?, k))
                })
                .collect::<Result<Vec<_>, EngineError>>()?
                .into_iter()
                .unzip();
            let prepared = Prepared {
                prompts,
                grids,
                features,
                deepstack,
            };
            let ids: Vec<u64> = requests.iter().map(|q| q.id).collect();
            r.generate(&ids, &prepared, cfg, None)
        })?;
        Ok(joined(parts, &shares))
    }

    /// [`Engine::generate`] on prompts already prepared (the trainer keeps them for the
    /// training batch). With CPU slices ([`Engine::set_cpu_slices`]) the prompts are dealt
    /// into shares of balanced cost (`prompt_shares`) generated concurrently; the samples are
    /// the same either way (every draw is keyed by prompt id, sample and step).
    pub fn generate_prepared(
        &mut self,
        requests: &[Request],
        prepared: &Prepared,
        cfg: &GenerationConfig,
        trace: Option<&mut Trace>,
    ) -> Result<Vec<Completion>, EngineError> {
        cfg.sampling.check().map_err(EngineError::Config)?;
        if requests.is_empty() || cfg.group == 0 {
            return Ok(vec![]);
        }
        let new = cfg.max_new_tokens;
        let no_room = (prepared.prompts.iter().enumerate())
            .find_map(|(at, p)| NoRoom::of(at, p.len(), new, self.context));
        if let Some(r) = no_room {
            return Err(r.into());
        }
        let k = self.slices.len().min(requests.len());
        let ids: Vec<u64> = requests.iter().map(|q| q.id).collect();
        if k < 2 || trace.is_some() {
            return self.on_own(|r| r.generate(&ids, prepared, cfg, trace));
        }
        let costs: Vec<PromptCost> = prepared
            .prompts
            .iter()
            .map(|p| PromptCost {
                tokens: p.len(),
                vision: 0,
            })
            .collect();
        let shares = prompt_shares(&costs, k);
        let parts = self.on_slices(shares.clone(), |r, share: Vec<usize>| {
            let ids: Vec<u64> = share.iter().map(|&i| ids[i]).collect();
            r.generate(&ids, &prepared.pick(&share), cfg, None)
        })?;
        Ok(joined(parts, &shares))
    }
}

/// One request's images' vision outputs (features, DeepStack features) as the request's: the
/// features one image after another, and the `k` DeepStack layers' `[K, tokens, D]`, layer by
/// layer with the images one after another in each.
fn join_images(outs: &[VisionOut], k: usize) -> VisionOut {
    let features = outs.iter().flat_map(|(f, _)| f.iter().copied()).collect();
    let mut deep = Vec::with_capacity(outs.iter().map(|(_, d)| d.len()).sum());
    for j in 0..k {
        for (_, d) in outs {
            let per = d.len() / k;
            deep.extend_from_slice(&d[j * per..(j + 1) * per]);
        }
    }
    (features, deep)
}
