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
//! fp16 / bf16 builds) take their types at the graphs' edges (`float.rs`); their cache stays on
//! the host.

use super::float::{bytes, bytes_mut, values_f32, Float};
use super::gpu::{gpu_err, trt_profiles, OnGpu};
use super::kv::{
    compaction, gather_host, kv_name, leading_rows, move_rows, own_cache_in_place, room_for,
    slot_tables, widened_tensor, Kv, OwnBuf, Prefix, OWN_CHUNK,
};
use super::share::{deal, joined, length_groups, prompt_shares, PromptCost};
use crate::kernels::cuda::Cuda;
use crate::kernels::{cpu, Logits, RowKey, Sampled, SamplingParams};
use crate::model::package::{KvLayout, Manifest, Package, PackageError};
use crate::model::processor::{
    grid_thw, image_tokens, preprocess, preprocess_into, PreprocessorConfig, ProcessorError,
};
use crate::model::prompt::{PromptBuilder, PromptError};
use crate::model::rope::{rope_index, RopeConfig, RopeError};
use crate::model::session::{
    environment, session_builder, with_kernel_hint, ComputeStream, Device, DeviceChoice,
    ProviderError,
};
use image::RgbImage;
use ort::session::{OutputSelector, RunOptions, Session, SessionInputValue};
use ort::value::{DynTensor, DynTensorValueType, Tensor, TensorElementType, TensorRef};
use rayon::prelude::*;
use std::path::Path;
use std::sync::Arc;
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
    /// A request whose prompt cannot be built, by its position among the requests.
    #[error("prompt {at}: {cause}")]
    InPrompt { at: usize, cause: Box<EngineError> },
}

pub(super) fn run_err(graph: &'static str) -> impl Fn(ort::Error) -> EngineError {
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
    /// CPU slices: time a slice sat idle waiting for the slowest one to finish.
    pub slice_wait_s: f64,
}

impl EngineStats {
    /// Adds one of `workers` concurrent workers' stats: counts add up, times are averaged over
    /// the workers (each time is then a share of the wall time, as with one worker).
    fn add(&mut self, o: &EngineStats, workers: usize) {
        let w = workers.max(1) as f64;
        self.ort_s += o.ort_s / w;
        self.vision_s += o.vision_s / w;
        self.prefill_s += o.prefill_s / w;
        self.decode_s += o.decode_s / w;
        self.preprocess_s += o.preprocess_s / w;
        self.sample_s += o.sample_s / w;
        self.cache_s += o.cache_s / w;
        self.slice_wait_s += o.slice_wait_s / w;
        self.prefill_tokens += o.prefill_tokens;
        self.decode_steps += o.decode_steps;
        self.generated_tokens += o.generated_tokens;
    }
}

/// Prompts ready to generate from: token ids (image placeholders expanded), image grids and
/// vision features, per request.
#[derive(Debug, Clone, Default)]
pub struct Prepared {
    pub prompts: Vec<Vec<u32>>,
    pub grids: Vec<ImageGrids>,
    /// `[image tokens, out_hidden_size]` flattened, per request.
    pub features: Vec<Vec<f32>>,
}

impl Prepared {
    /// The requests at `share`'s indices.
    fn pick(&self, share: &[usize]) -> Prepared {
        Prepared {
            prompts: share.iter().map(|&i| self.prompts[i].clone()).collect(),
            grids: share.iter().map(|&i| self.grids[i].clone()).collect(),
            features: share.iter().map(|&i| self.features[i].clone()).collect(),
        }
    }
}

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
}

/// One CPU slice: its sessions and the thread they run on, kept for the engine's life.
struct Slice {
    graphs: Graphs,
    /// One thread; the slice's own parallel work (sampling) runs on it as well.
    thread: rayon::ThreadPool,
}

/// How a request's problem becomes the user turn: as it is (`verbatim`), or with the format
/// sentence added; and the room the prompt has: `(context length, new tokens)`, where known.
#[derive(Clone, Copy)]
struct PromptText<'a> {
    format_sentence: Option<&'a str>,
    verbatim: bool,
    room: Option<(usize, usize)>,
}

impl<'a> PromptText<'a> {
    /// The problem with `format_sentence` after it, no room checked.
    fn formatted(format_sentence: Option<&'a str>) -> PromptText<'a> {
        PromptText {
            format_sentence,
            verbatim: false,
            room: None,
        }
    }

    /// As `cfg` renders it, no room checked.
    fn of(cfg: &'a GenerationConfig) -> PromptText<'a> {
        PromptText {
            format_sentence: cfg.format_sentence.as_deref(),
            verbatim: cfg.verbatim,
            room: None,
        }
    }
}

/// A prompt without room for the new tokens in the model's context: its position among the
/// requests, its length, the new tokens asked for and the context length.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NoRoom {
    pub at: usize,
    pub len: usize,
    pub new: usize,
    pub context: usize,
}

impl NoRoom {
    /// The prompt at `at` of `len` tokens, when `new` more do not fit in `context`.
    fn of(at: usize, len: usize, new: usize, context: Option<usize>) -> Option<NoRoom> {
        let context = context.filter(|&c| len + new > c)?;
        Some(NoRoom {
            at,
            len,
            new,
            context,
        })
    }
}

impl std::fmt::Display for NoRoom {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} tokens and {} new ones exceed the model's context length of {}",
            self.len, self.new, self.context
        )?;
        match self.context.checked_sub(self.len) {
            Some(room) if room > 0 => write!(f, " (room for {room} new tokens)"),
            _ => write!(f, " (the prompt alone fills it)"),
        }
    }
}

impl From<NoRoom> for EngineError {
    fn from(r: NoRoom) -> EngineError {
        EngineError::Config(format!(
            "prompt {}: {r} (fewer or smaller images, or fewer new tokens)",
            r.at
        ))
    }
}

/// Each request's prompt ids (image placeholders expanded) and image grids. The prompts need
/// only each image's patch grid; the pixels are prepared next to the vision calls. A prompt
/// without room for the new tokens ([`PromptText::room`]) is an error naming its position
/// (`at[i]` for `requests[i]`).
fn tokenize(
    builder: &PromptBuilder,
    pre: &PreprocessorConfig,
    merge: u32,
    requests: &[&Request],
    at: &[usize],
    text: PromptText<'_>,
) -> Result<(Vec<Vec<u32>>, Vec<ImageGrids>), EngineError> {
    let (mut grids, mut prompts) = (Vec::new(), Vec::new());
    for (&r, &at) in requests.iter().zip(at) {
        let sizes: Vec<(u32, u32)> = r.images.iter().map(|i| i.dimensions()).collect();
        let (ids, g) = prompt_ids(builder, pre, merge, &r.problem, &sizes, text).map_err(|e| {
            EngineError::InPrompt {
                at,
                cause: Box::new(e),
            }
        })?;
        if let Some((context, new)) = text.room {
            if let Some(r) = NoRoom::of(at, ids.len(), new, Some(context)) {
                return Err(r.into());
            }
        }
        prompts.push(ids);
        grids.push(g);
    }
    Ok((prompts, grids))
}

/// A problem's prompt ids (image placeholders expanded for images of `sizes`, `(w, h)` each) and
/// its images' grids.
fn prompt_ids(
    builder: &PromptBuilder,
    pre: &PreprocessorConfig,
    merge: u32,
    problem: &str,
    sizes: &[(u32, u32)],
    text: PromptText<'_>,
) -> Result<(Vec<u32>, ImageGrids), EngineError> {
    let g = sizes
        .iter()
        .map(|&(w, h)| grid_thw(w, h, pre))
        .collect::<Result<Vec<_>, _>>()?;
    let msgs = match text.verbatim {
        true => PromptBuilder::verbatim(problem),
        false => PromptBuilder::content(problem, text.format_sentence),
    };
    let rendered = builder.render(&msgs)?;
    let counts: Vec<usize> = g.iter().map(|g| image_tokens(*g, merge)).collect();
    Ok((builder.encode(&rendered, &counts)?, g))
}

/// One request's image grids, `[t, h, w]` in patches each.
pub type ImageGrids = Vec<[u32; 3]>;

/// A LoRA tensor: name, shape and the value fed to the decoder.
type LoraInput = (String, Vec<usize>, Tensor<f32>);

/// The sessions one worker runs, and its buffer for one image's pixel rows (kept, so that
/// every round does not fault fresh pages in for it).
struct Graphs {
    vision: Session,
    embedding: Session,
    decoder: Session,
    pixels: Vec<f32>,
    floats: Floats,
}

impl Graphs {
    fn new(vision: Session, embedding: Session, decoder: Session) -> Graphs {
        let floats = Floats {
            pixels: Float::of_input(&vision, "pixel_values"),
            features: Float::of_input(&embedding, "image_features"),
            embeds: Float::of_input(&decoder, "inputs_embeds"),
            cache: Float::of_input(&decoder, "past_key_values.0.key"),
        };
        Graphs {
            vision,
            embedding,
            decoder,
            pixels: Vec::new(),
            floats,
        }
    }
}

/// The floating-point types the graphs take: fp32 throughout for this project's packages; an
/// onnxruntime-genai folder's half-precision builds take fp16 or bf16. Outputs are read in
/// whatever type they come.
#[derive(Debug, Clone, Copy)]
struct Floats {
    pixels: Float,
    features: Float,
    embeds: Float,
    cache: Float,
}

/// One worker of the engine: its sessions and what every worker shares. The engine runs one on
/// its own sessions, or one per CPU slice on a thread each.
struct Runner<'e> {
    g: &'e mut Graphs,
    m: &'e Manifest,
    lora: &'e [LoraInput],
    gpu: Option<&'e OnGpu>,
    /// The rows' own tokens stay where the decoder reads them: an [`OwnBuf`], or for
    /// GroupQueryAttention a past with room that is also the present (see
    /// [`Engine::set_own_cache`]).
    own_in_place: bool,
    stats: EngineStats,
}

/// One decoder step's logits at each row's last position: `[rows, vocab]`.
enum StepLogits {
    Host(HostLogits),
    /// ONNX Runtime's output buffer on the GPU, `[rows, 1, vocab]`.
    Gpu(DynTensor),
}

/// `[rows, vocab]` logits on the host: ONNX Runtime's own output where it is exactly that (this
/// project's packages return the last position only), else the rows' last positions copied out.
enum HostLogits {
    Output(DynTensor),
    Picked(Vec<f32>),
}

impl HostLogits {
    fn values(&mut self) -> Result<&mut [f32], EngineError> {
        match self {
            HostLogits::Output(t) => Ok(t
                .try_extract_tensor_mut::<f32>()
                .map_err(run_err("decoder"))?
                .1),
            HostLogits::Picked(v) => Ok(v),
        }
    }
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
        let mut load = |file: &str, k: usize| -> Result<Session, EngineError> {
            let path = package.graph_path(file);
            let profile = profiles.as_ref().map(|p| &p[k]);
            let (mut b, used) = session_builder(env, choice, profile, stream)?;
            provider = used;
            let session = b.commit_from_file(&path).map_err(|e| {
                EngineError::Package(PackageError::File {
                    path,
                    msg: with_kernel_hint(e.to_string(), &provider),
                })
            })?;
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
            prompts: Arc::new(PromptBuilder::from_dir(dir)?),
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
        })
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
    /// ([`Manifest::own_cache`]) all but the newest `OWN_CHUNK` stay in a buffer the decoder
    /// reads in place; a GroupQueryAttention decoder ([`KvLayout::Packed`]) gets a past with
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
                    Err(e) => Some((at, e.to_string())),
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
    /// execution provider.
    pub fn open_graph(&self, file: &str) -> Result<Session, EngineError> {
        let path = self.package.graph_path(file);
        let (mut b, _) = session_builder(self.env, &self.choice, None, None)?;
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
        let features = requests
            .iter()
            .map(|r| each.by_ref().take(r.images.len()).flatten().collect())
            .collect();
        Ok(Prepared {
            prompts,
            grids,
            features,
        })
    }

    /// The vision tower on each image, one call per image (attention cost and memory grow
    /// with the square of the patches in a call). One set of sessions: the images are
    /// preprocessed on the rayon pool first. With CPU slices the images are shared out among
    /// them, and each slice preprocesses an image just before its vision call, on its own
    /// thread (one image's pixels alive at a time, their memory reused).
    fn vision_features(&mut self, images: &[&RgbImage]) -> Result<Vec<Vec<f32>>, EngineError> {
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
                    .map(|p| r.vision_features(&p.pixel_values, p.grid_thw))
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
        let mut features = vec![Vec::new(); images.len()];
        for (part, share) in parts.into_iter().zip(&shares) {
            for (f, &i) in part.into_iter().zip(share) {
                features[i] = f;
            }
        }
        Ok(features)
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
    /// under 64 MB, else 1. Ignored (with `Ok(false)`) on a GPU provider.
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
                let fail = |msg: String| {
                    EngineError::Package(PackageError::File {
                        path: path.clone(),
                        msg,
                    })
                };
                b.with_intra_threads(1)
                    .map_err(|e| fail(e.to_string()))?
                    .commit_from_file(&path)
                    .map_err(|e| fail(e.to_string()))
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
        let small = std::fs::metadata(decoder).is_ok_and(|m| m.len() < 64 << 20);
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        if small {
            cores.min(8)
        } else {
            1
        }
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
    /// ([`SamplingParams::check`]) are an error.
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
            let features = requests
                .iter()
                .map(|q| {
                    let f = q.images.iter().map(|img| r.image_features(img, &pre));
                    Ok(f.collect::<Result<Vec<_>, EngineError>>()?.concat())
                })
                .collect::<Result<_, EngineError>>()?;
            let prepared = Prepared {
                prompts,
                grids,
                features,
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

/// The prompts as one padded batch: ids `[b, s]` row-major, each row's attention mask, and the
/// width `s` (the longest prompt). Left padding, except for decoders that keep each row's cache
/// packed from position 0 (GroupQueryAttention, `packed`): those get right padding and write
/// each new token at the row's own length.
fn padded_batch(prompts: &[Vec<u32>], pad: u32, packed: bool) -> (Vec<u32>, Vec<Vec<i64>>, usize) {
    let s = prompts.iter().map(Vec::len).max().unwrap_or(0);
    let mut ids = Vec::with_capacity(prompts.len() * s);
    let mut mask = Vec::with_capacity(prompts.len());
    for p in prompts {
        let n = s - p.len();
        let (pads, tokens) = (std::iter::repeat_n(pad, n), p.iter().copied());
        let (zeros, ones) = (std::iter::repeat_n(0, n), std::iter::repeat_n(1, p.len()));
        if packed {
            ids.extend(tokens.chain(pads));
            mask.push(ones.chain(zeros).collect());
        } else {
            ids.extend(pads.chain(tokens));
            mask.push(zeros.chain(ones).collect());
        }
    }
    (ids, mask, s)
}

/// The random stream of a sample's draw at a step: keyed by its request id and sample index
/// only, so a sample draws the same numbers in any batch, on any worker.
fn row_key(request_id: u64, sample: usize, step: usize) -> RowKey {
    RowKey {
        sequence: crate::rng::mix64(request_id.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ sample as u64)
            as u32,
        step: step as u32,
    }
}

/// A decode step's M-RoPE positions `[3, n]` for the `n` live rows (`active[k]`: row k's index
/// among all B·G, `seen[k]`: the tokens it holds): text positions, the same on all three axes,
/// shifted by the row's prompt's rope delta (`deltas`, one per prompt; G rows per prompt).
fn step_positions(active: &[usize], seen: &[usize], deltas: &[i64], g: usize) -> Vec<i64> {
    let n = active.len();
    let mut pos = vec![0i64; 3 * n];
    for (k, &i) in active.iter().enumerate() {
        let p = seen[k] as i64 + deltas[i / g];
        for r in 0..3 {
            pos[r * n + k] = p;
        }
    }
    pos
}

impl Runner<'_> {
    fn embed(
        &mut self,
        ids: Vec<i64>,
        rows: usize,
        cols: usize,
        features: (Vec<f32>, usize),
    ) -> Result<Vec<f32>, EngineError> {
        let d = self.m.vision.out_hidden_size;
        let features =
            (self.g.floats.features).tensor("embedding", &[features.1, d], features.0)?;
        let inputs: Vec<(String, SessionInputValue<'static>)> = vec![
            ("input_ids".into(), input("embedding", &[rows, cols], ids)?),
            ("image_features".into(), features.into()),
        ];
        let t = Instant::now();
        let out = self.g.embedding.run(inputs).map_err(run_err("embedding"))?;
        self.stats.ort_s += t.elapsed().as_secs_f64();
        let e = values_f32(&out["inputs_embeds"], "embedding")?;
        Ok(e.into_owned())
    }

    /// Runs the decoder on the live rows of `kv`; returns the logits of column `last[r]` of each
    /// row `r` and the new cache. With the cache on the GPU the new cache stays there, and so do
    /// the logits of one-token steps.
    #[allow(clippy::too_many_arguments)]
    fn decode(
        &mut self,
        embeds: Vec<f32>,
        rows: usize,
        cols: usize,
        mask: &[Vec<i64>],
        pos: Vec<i64>,
        kv: &mut Kv,
        prefix: Option<(&mut Prefix, &[usize])>,
        own: Option<&mut OwnBuf>,
        last: &[usize],
    ) -> Result<(StepLogits, Kv), EngineError> {
        let t = &self.m.text;
        let (layers, hidden, vocab) = (t.num_hidden_layers, t.hidden_size, t.vocab_size);
        let (kvh, hd) = (t.num_key_value_heads, t.head_dim);
        let total = kv.len + cols;
        let flat_mask: Vec<i64> = mask.iter().flatten().copied().collect();
        let floats = self.g.floats;
        let mut inputs: Vec<(String, SessionInputValue<'_>)> = vec![
            (
                "inputs_embeds".into(),
                (floats.embeds)
                    .tensor("decoder", &[rows, cols, hidden], embeds)?
                    .into(),
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
        // A cache with room: each buffer is both the past fed and the present ONNX Runtime
        // writes (preallocated below), so the step only writes its token.
        let share = kv.shares_present();
        let mut shared_present = Vec::new();
        if share {
            for (i, mut v) in std::mem::take(&mut kv.data).into_iter().enumerate() {
                let info = v.memory_info().to_owned();
                // SAFETY: `v` is a host tensor of exactly this shape and type; it moves into
                // the run's preallocated outputs, which keep it alive until the run is over,
                // and ONNX Runtime's share-buffer mode reads and writes it as one buffer.
                let view = unsafe { kv.ty.view(info, v.data_ptr_mut(), &[rows, kvh, kv.cap, hd]) }?;
                inputs.push((kv_name("past_key_values", i), view));
                shared_present.push(v);
            }
        } else {
            for (i, v) in kv.data.iter_mut().enumerate() {
                let view = leading_rows(v, [kv.rows, kvh, kv.len, hd])?;
                inputs.push((kv_name("past_key_values", i), view));
            }
        }
        if let Some((p, row_prompt)) = prefix {
            let (prompts, len) = (p.cache.rows, p.cache.len);
            let (slot_rows, row_slots) = slot_tables(row_prompt, prompts);
            let mask: Vec<i64> = p.mask[..prompts].iter().flatten().copied().collect();
            inputs.push((
                "prefix_mask".into(),
                input("decoder", &[prompts, len], mask)?,
            ));
            inputs.push((
                "slot_rows".into(),
                input("decoder", &[slot_rows.len()], slot_rows)?,
            ));
            inputs.push((
                "row_slots".into(),
                input("decoder", &[row_slots.len()], row_slots)?,
            ));
            for (i, v) in p.cache.data.iter_mut().enumerate() {
                let view = leading_rows(v, [prompts, kvh, len, hd])?;
                inputs.push((kv_name("prefix_key_values", i), view));
            }
        }
        if let Some(o) = own {
            let (orows, cap) = (o.rows, o.cap);
            for (i, v) in o.data.iter_mut().enumerate() {
                let view = leading_rows(v, [orows, kvh, cap, hd])?;
                inputs.push((kv_name("own_key_values", i), view));
            }
            let mask = &o.mask[..o.rows * o.cap];
            let view =
                TensorRef::from_array_view(([o.rows, o.cap], mask)).map_err(run_err("decoder"))?;
            inputs.push(("own_mask".into(), view.into()));
        }
        inputs.extend(
            self.lora
                .iter()
                .map(|(n, _, t)| (n.clone(), SessionInputValue::from(t))),
        );
        // On the GPU: the cache (and one-token logits) into GPU buffers; the rest to the host.
        let opts = match &self.gpu {
            None if share => {
                let mut sel = OutputSelector::default();
                for (i, v) in shared_present.into_iter().enumerate() {
                    sel = sel.preallocate(kv_name("present", i), v);
                }
                Some(
                    RunOptions::new()
                        .map_err(run_err("decoder"))?
                        .with_outputs(sel),
                )
            }
            None => None,
            Some(g) => {
                let mut sel = OutputSelector::default();
                for i in 0..2 * layers {
                    sel =
                        sel.preallocate(kv_name("present", i), g.tensor(&[rows, kvh, total, hd])?);
                }
                if cols == 1 || g.last_only {
                    sel = sel.preallocate("logits", g.tensor(&[rows, 1, vocab])?);
                }
                Some(
                    RunOptions::new()
                        .map_err(run_err("decoder"))?
                        .with_outputs(sel),
                )
            }
        };
        let t0 = Instant::now();
        let mut out = match &opts {
            None => self.g.decoder.run(inputs),
            Some(o) => self.g.decoder.run_with_options(inputs, o),
        }
        .map_err(run_err("decoder"))?;
        if let Some(g) = &self.gpu {
            g.cuda.synchronize_all().map_err(gpu_err)?;
        }
        self.stats.ort_s += t0.elapsed().as_secs_f64();
        let take = |out: &mut ort::session::SessionOutputs<'_>,
                    name: &str|
         -> Result<DynTensor, EngineError> {
            out.remove(name)
                .ok_or_else(|| EngineError::Run {
                    graph: "decoder",
                    msg: format!("no output {name}"),
                })?
                .downcast::<DynTensorValueType>()
                .map_err(run_err("decoder"))
        };
        let logits = if self.gpu.as_ref().is_some_and(|g| cols == 1 || g.last_only) {
            StepLogits::Gpu(take(&mut out, "logits")?)
        } else {
            let shape = out["logits"].shape().to_vec();
            // Packages from models/export.py return the last position only ([rows, 1, vocab]);
            // other decoders every position.
            let width = shape.get(1).copied().unwrap_or(1) as usize;
            for (r, &c) in last.iter().enumerate().take(rows) {
                if width != cols && !(width == 1 && c + 1 == cols) {
                    return Err(EngineError::Run {
                        graph: "decoder",
                        msg: format!(
                            "logits for {width} of {cols} positions, and row {r} ends at position {c}"
                        ),
                    });
                }
            }
            let f32_out = out["logits"].dtype().tensor_type() == Some(TensorElementType::Float32);
            if width == 1 && shape.first() == Some(&(rows as i64)) && f32_out {
                StepLogits::Host(HostLogits::Output(take(&mut out, "logits")?))
            } else {
                // Half-precision logits are widened here.
                let logits = values_f32(&out["logits"], "decoder")?;
                let mut picked = Vec::with_capacity(rows * vocab);
                for (r, &c) in last.iter().enumerate().take(rows) {
                    let c = if width == 1 { 0 } else { c };
                    let start = (r * width + c) * vocab;
                    picked.extend_from_slice(&logits[start..start + vocab]);
                }
                StepLogits::Host(HostLogits::Picked(picked))
            }
        };
        let mut data = Vec::with_capacity(2 * layers);
        for i in 0..2 * layers {
            data.push(take(&mut out, &kv_name("present", i))?);
        }
        Ok((
            logits,
            Kv {
                data,
                rows,
                len: total,
                cap: if share { kv.cap } else { total },
                ty: floats.cache,
            },
        ))
    }

    /// A new cache of the rows `src` of `kv` (in that order; a row may repeat, which fans
    /// prompts out to their samples).
    fn gather_rows(&mut self, kv: &mut Kv, src: &[usize]) -> Result<Kv, EngineError> {
        let t0 = Instant::now();
        let t = &self.m.text;
        let shape = [src.len(), t.num_key_value_heads, kv.cap, t.head_dim];
        let row = shape[1] * shape[2] * shape[3];
        let mut data = Vec::with_capacity(kv.data.len());
        for v in &mut kv.data {
            match &self.gpu {
                None => {
                    let mut t = kv.ty.zeros(&shape)?;
                    let (from, to) = (bytes(v)?, bytes_mut(&mut t)?);
                    // Rows of rb bytes (at least one: an empty cache has nothing to copy).
                    let rb = (row * kv.ty.bytes()).max(1);
                    for (dst, &r) in to.chunks_exact_mut(rb).zip(src) {
                        dst.copy_from_slice(&from[r * rb..(r + 1) * rb]);
                    }
                    data.push(t);
                }
                Some(g) => data.push(g.gather(v, &shape, src)?),
            }
        }
        if let Some(g) = &self.gpu {
            g.cuda.synchronize_all().map_err(gpu_err)?;
        }
        self.stats.cache_s += t0.elapsed().as_secs_f64();
        Ok(Kv {
            data,
            rows: src.len(),
            len: kv.len,
            cap: kv.cap,
            ty: kv.ty,
        })
    }

    /// Host cache `kv` moved into tensors of `cap` positions (the used ones copied).
    fn with_room(&mut self, kv: &mut Kv, cap: usize) -> Result<(), EngineError> {
        let t0 = Instant::now();
        let t = &self.m.text;
        let shape = [kv.rows, t.num_key_value_heads, cap, t.head_dim];
        for v in &mut kv.data {
            *v = widened_tensor(Some(v), shape, kv.cap, kv.len, kv.ty, None)?;
        }
        kv.cap = cap;
        self.stats.cache_s += t0.elapsed().as_secs_f64();
        Ok(())
    }

    /// Keeps the live rows `keep` (ascending) of `kv` in place: rows from beyond the new end
    /// move into the gaps, one row copy per finished row below it, and the buffers keep their
    /// size. Returns, for each new row, the old row it holds.
    fn keep_rows(&mut self, kv: &mut Kv, keep: &[usize]) -> Result<Vec<usize>, EngineError> {
        let t0 = Instant::now();
        let n = keep.len();
        let (order, moves) = compaction(kv.rows, keep);
        let t = &self.m.text;
        let row = t.num_key_value_heads * kv.cap * t.head_dim;
        move_rows(&mut kv.data, row, &moves, self.gpu)?;
        kv.rows = n;
        self.stats.cache_s += t0.elapsed().as_secs_f64();
        Ok(order)
    }

    /// Compacts the prompts of `p` that no row of `row_prompt` continues away (with
    /// [`Runner::keep_rows`], as rows) and renumbers `row_prompt` to match.
    fn drop_finished_prompts(
        &mut self,
        p: &mut Prefix,
        row_prompt: &mut [usize],
    ) -> Result<(), EngineError> {
        let prompts = p.cache.rows;
        let mut live = vec![false; prompts];
        for &q in row_prompt.iter() {
            live[q] = true;
        }
        if live.iter().all(|&l| l) {
            return Ok(());
        }
        let keep: Vec<usize> = (0..prompts).filter(|&q| live[q]).collect();
        let order = self.keep_rows(&mut p.cache, &keep)?;
        let mut now = vec![0; prompts];
        for (k, &o) in order.iter().enumerate() {
            now[o] = k;
            p.mask.swap(k, o);
        }
        for q in row_prompt.iter_mut() {
            *q = now[*q];
        }
        Ok(())
    }

    /// A step's logits on the host (`[rows, vocab]`), copied back from the GPU if there.
    fn host_logits(&self, l: StepLogits) -> Result<Vec<f32>, EngineError> {
        match (l, &self.gpu) {
            (StepLogits::Host(HostLogits::Picked(v)), _) => Ok(v),
            (StepLogits::Host(mut v), _) => Ok(v.values()?.to_vec()),
            (StepLogits::Gpu(mut t), Some(g)) => {
                let n = t.shape().iter().product::<i64>() as usize;
                let mut v = vec![0f32; n];
                // SAFETY: `t` holds n f32 values on this GPU.
                unsafe { g.cuda.read_device(t.data_ptr_mut() as u64, &mut v) }.map_err(gpu_err)?;
                Ok(v)
            }
            (StepLogits::Gpu(_), None) => unreachable!("GPU logits without a GPU cache"),
        }
    }

    /// Preprocesses `img` into the worker's image buffer, then runs the vision tower on it.
    fn image_features(
        &mut self,
        img: &RgbImage,
        cfg: &PreprocessorConfig,
    ) -> Result<Vec<f32>, EngineError> {
        let t = Instant::now();
        let mut pixels = std::mem::take(&mut self.g.pixels);
        let grid = preprocess_into(img, cfg, &mut pixels);
        self.stats.preprocess_s += t.elapsed().as_secs_f64();
        let features = grid
            .map_err(EngineError::from)
            .and_then(|g| self.vision_features(&pixels, g));
        self.g.pixels = pixels;
        features
    }

    /// The vision tower on one preprocessed image (its pixel rows and patch grid):
    /// `[tokens, out_hidden_size]` flattened.
    fn vision_features(&mut self, pixels: &[f32], grid: [u32; 3]) -> Result<Vec<f32>, EngineError> {
        let rows = (grid[0] * grid[1] * grid[2]) as usize;
        let g: Vec<i64> = grid.iter().map(|v| i64::from(*v)).collect();
        let shape = [rows, pixels.len() / rows.max(1)];
        let pixels: SessionInputValue<'_> = match self.g.floats.pixels {
            Float::F32 => TensorRef::from_array_view((shape, pixels))
                .map_err(run_err("vision"))?
                .into(),
            half => half.tensor("vision", &shape, pixels.to_vec())?.into(),
        };
        let inputs: Vec<(String, SessionInputValue<'_>)> = vec![
            ("pixel_values".into(), pixels),
            ("image_grid_thw".into(), input("vision", &[1, 3], g)?),
        ];
        let t = Instant::now();
        let out = self.g.vision.run(inputs).map_err(run_err("vision"))?;
        let dt = t.elapsed().as_secs_f64();
        self.stats.ort_s += dt;
        self.stats.vision_s += dt;
        Ok(values_f32(&out["image_features"], "vision")?.into_owned())
    }

    /// One prefill call on prompts of `lengths` tokens padded to `width` positions (padding at
    /// the start for `left`, else at the end), with nothing before them (for a shared-prefix
    /// decoder, every prompt on its own slot of an empty prefix); logits at each prompt's last
    /// position.
    #[allow(clippy::too_many_arguments)]
    fn prefill_call(
        &mut self,
        embeds: Vec<f32>,
        mask: &[Vec<i64>],
        pos: Vec<i64>,
        lengths: &[usize],
        width: usize,
        shared: bool,
        left: bool,
    ) -> Result<(StepLogits, Kv), EngineError> {
        let t = &self.m.text;
        let rows = lengths.len();
        let last: Vec<usize> = match left {
            true => vec![width.max(1) - 1; rows],
            false => lengths.iter().map(|&n| n.max(1) - 1).collect(),
        };
        let own: Vec<usize> = (0..rows).collect();
        let ty = self.g.floats.cache;
        let mut none = match shared {
            true => Some(Prefix {
                cache: Kv::empty(t, rows, ty)?,
                mask: vec![Vec::new(); rows],
            }),
            false => None,
        };
        let mut start = Kv::empty(t, rows, ty)?;
        let prefix = none.as_mut().map(|p| (p, &own[..]));
        self.decode(
            embeds, rows, width, mask, pos, &mut start, prefix, None, &last,
        )
    }

    /// The prefill of padded prompts of several lengths, on the host: one decoder call per
    /// group of [`length_groups`], each on just its prompts padded to its own longest (a batch
    /// of many-image and one-image prompts would otherwise run every short prompt at the
    /// longest one's length), their caches then placed in each row of the padded `[prompts, ..,
    /// longest, ..]` cache at the end (`left`-padded prompts) or the start (right-padded), zero
    /// in the slots no group wrote. `mask` is the batch's padding mask. Logits `[prompts, vocab]`
    /// at the prompts' last positions.
    #[allow(clippy::too_many_arguments)]
    fn prefill_apart(
        &mut self,
        embeds: &[f32],
        pos: &[i64],
        mask: &[Vec<i64>],
        lengths: &[usize],
        groups: &[Vec<usize>],
        shared: bool,
        left: bool,
    ) -> Result<(StepLogits, Kv), EngineError> {
        let t = &self.m.text;
        let (b, s) = (lengths.len(), lengths.iter().copied().max().unwrap_or(0));
        let (hidden, vocab) = (t.hidden_size, t.vocab_size);
        let (kvh, hd) = (t.num_key_value_heads, t.head_dim);
        let ty = self.g.floats.cache;
        let vb = ty.bytes();
        let mut logits = vec![0f32; b * vocab];
        let mut cache = (0..2 * t.num_hidden_layers)
            .map(|_| ty.zeros(&[b, kvh, s, hd]))
            .collect::<Result<Vec<_>, _>>()?;
        for rows in groups {
            let g = rows.len();
            let w = rows.iter().map(|&i| lengths[i]).max().unwrap_or(0);
            let from = if left { s - w } else { 0 };
            let mut e = Vec::with_capacity(g * w * hidden);
            for &i in rows {
                e.extend_from_slice(&embeds[(i * s + from) * hidden..(i * s + from + w) * hidden]);
            }
            let mut p = Vec::with_capacity(3 * g * w);
            for axis in 0..3 {
                for &i in rows {
                    let at = (axis * b + i) * s + from;
                    p.extend_from_slice(&pos[at..at + w]);
                }
            }
            let m: Vec<Vec<i64>> = rows
                .iter()
                .map(|&i| mask[i][from..from + w].to_vec())
                .collect();
            let n: Vec<usize> = rows.iter().map(|&i| lengths[i]).collect();
            let (mut l, kv) = self.prefill_call(e, &m, p, &n, w, shared, left)?;
            let StepLogits::Host(l) = &mut l else {
                unreachable!("GPU logits from a host prefill")
            };
            let l = l.values()?;
            for (j, &i) in rows.iter().enumerate() {
                logits[i * vocab..(i + 1) * vocab].copy_from_slice(&l[j * vocab..(j + 1) * vocab]);
            }
            for (dst, v) in cache.iter_mut().zip(&kv.data) {
                let (src, dst) = (bytes(v)?, bytes_mut(dst)?);
                // `[g, kvh, w, hd]` into rows `rows` of `[b, kvh, s, hd]`, positions `from..`
                // (bytes: e per value).
                let block = w * hd * vb;
                for (j, &i) in rows.iter().enumerate() {
                    for h in 0..kvh {
                        let at = ((i * kvh + h) * s + from) * hd * vb;
                        let src = &src[(j * kvh + h) * block..(j * kvh + h + 1) * block];
                        dst[at..at + block].copy_from_slice(src);
                    }
                }
            }
        }
        let kv = Kv {
            data: cache,
            rows: b,
            len: s,
            cap: s,
            ty,
        };
        Ok((StepLogits::Host(HostLogits::Picked(logits)), kv))
    }

    /// One token per row from a step's logits, with its log-prob: on the host by the CPU
    /// sampler, or on the GPU by the CUDA kernel where the logits are there. Image and video
    /// placeholders are never drawn: the embedding graph would look for vision features behind
    /// them (vLLM likewise never emits them).
    fn draw(
        &self,
        logits: StepLogits,
        keys: &[RowKey],
        sampling: &SamplingParams,
    ) -> Result<Vec<Sampled>, EngineError> {
        let vocab = self.m.text.vocab_size;
        let banned = [self.m.tokens.image, self.m.tokens.video];
        match (logits, self.gpu) {
            (StepLogits::Host(mut l), _) => {
                let l = l.values()?;
                for row in l.chunks_exact_mut(vocab) {
                    for id in banned {
                        if let Some(x) = row.get_mut(id as usize) {
                            *x = f32::NEG_INFINITY;
                        }
                    }
                }
                cpu::sample(Logits::F32(l), vocab, keys, sampling)
                    .map_err(|e| EngineError::Config(e.to_string()))
            }
            (StepLogits::Gpu(mut l), Some(g)) => {
                // SAFETY: `l` is ONNX Runtime's [rows, 1, vocab] f32 output on this GPU,
                // finished (the run was synchronised) and used by nothing else.
                unsafe {
                    g.cuda
                        .sample_device(l.data_ptr_mut() as u64, 0, vocab, keys, sampling, &banned)
                }
                .map_err(gpu_err)
            }
            (StepLogits::Gpu(_), None) => unreachable!("GPU logits without a GPU cache"),
        }
    }

    /// [`Engine::generate_prepared`] on this worker's sessions.
    fn generate(
        &mut self,
        request_ids: &[u64],
        prepared: &Prepared,
        cfg: &GenerationConfig,
        mut trace: Option<&mut Trace>,
    ) -> Result<Vec<Completion>, EngineError> {
        let m = self.m.clone();
        let merge = m.vision.spatial_merge_size;
        let prompts = &prepared.prompts;
        let grids: Vec<[u32; 3]> = prepared.grids.iter().flatten().copied().collect();
        let features = {
            let f: Vec<f32> = prepared.features.concat();
            let n = f.len() / m.vision.out_hidden_size;
            (f, n)
        };
        // Padded prompt batch, M-RoPE positions.
        let b = request_ids.len();
        let packed = m.kv_layout == KvLayout::Packed;
        let (ids, mask, s) = padded_batch(prompts, m.tokens.pad, packed);
        let mask_u8: Vec<u8> = mask.iter().flatten().map(|&v| v as u8).collect();
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
        let shared = m.kv_layout == KvLayout::Shared;
        let embeds = self.embed(ids.iter().map(|v| i64::from(*v)).collect(), b, s, features)?;
        let t_prefill = Instant::now();
        let lengths: Vec<usize> = prompts.iter().map(Vec::len).collect();
        let groups = length_groups(&lengths);
        let (prefill_logits, mut kv) = if self.gpu.is_none() && groups.len() > 1 {
            self.prefill_apart(&embeds, &pos, &mask, &lengths, &groups, shared, !packed)?
        } else {
            self.prefill_call(embeds, &mask, pos, &lengths, s, shared, !packed)?
        };
        self.stats.prefill_s += t_prefill.elapsed().as_secs_f64();
        self.stats.prefill_tokens += prompts.iter().map(Vec::len).sum::<usize>();
        let t_decode = Instant::now();
        // Row i = prompt i / G, sample i % G. A shared prefix: the prefill's cache becomes the
        // prompts' cache as it is and the rows start with none of their own; otherwise the
        // cache is fanned out to the rows.
        let g = cfg.group;
        let fan: Vec<usize> = (0..b * g).map(|i| i / g).collect();
        let (mut kv, mut prefix, mut masks) = if shared {
            let ty = kv.ty;
            let prefix = Prefix { cache: kv, mask };
            (
                Kv::empty(t, b * g, ty)?,
                Some(prefix),
                vec![Vec::new(); b * g],
            )
        } else {
            let rows = self.gather_rows(&mut kv, &fan)?;
            (rows, None, fan.iter().map(|&p| mask[p].clone()).collect())
        };
        // The rows' older own tokens in a buffer read in place, the newest in `kv` (the
        // decoder's past); without the buffer, all of them in `kv`.
        let mut own_buf = (shared && self.own_in_place)
            .then(|| OwnBuf::new(t, b * g, cfg.max_new_tokens.saturating_sub(1), kv.ty));
        // Each live row's prompt, as a row of the prefix.
        let mut row_prompt = fan.clone();
        let vocab = t.vocab_size;
        let mut logits = match (prefill_logits, &self.gpu) {
            (StepLogits::Host(mut l), _) => {
                StepLogits::Host(HostLogits::Picked(gather_host(l.values()?, vocab, &fan)))
            }
            (StepLogits::Gpu(mut l), Some(g)) => {
                let out = g.gather(&mut l, &[fan.len(), 1, vocab], &fan)?;
                g.cuda.synchronize_all().map_err(gpu_err)?;
                StepLogits::Gpu(out)
            }
            (StepLogits::Gpu(_), None) => unreachable!("GPU logits without a GPU cache"),
        };
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
            if trace.is_some() {
                let host = self.host_logits(logits)?;
                if let Some(t) = trace.as_deref_mut() {
                    t.steps.push((active.clone(), host.clone()));
                }
                logits = StepLogits::Host(HostLogits::Picked(host));
            }
            let keys: Vec<RowKey> = active
                .iter()
                .map(|&i| row_key(request_ids[i / g], i % g, step))
                .collect();
            let t_sample = Instant::now();
            let drawn = self.draw(logits, &keys, &cfg.sampling)?;
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
                let order = if kv.shares_present() {
                    // Shared past/present buffers must be exactly the batch: the kept rows
                    // move into new ones.
                    kv = self.gather_rows(&mut kv, &keep)?;
                    keep.clone()
                } else {
                    self.keep_rows(&mut kv, &keep)?
                };
                if let Some(o) = own_buf.as_mut() {
                    let t0 = Instant::now();
                    o.keep(&compaction(o.rows, &keep).1, keep.len(), self.gpu)?;
                    self.stats.cache_s += t0.elapsed().as_secs_f64();
                }
                masks = order
                    .iter()
                    .map(|&o| std::mem::take(&mut masks[o]))
                    .collect();
                seen = order.iter().map(|&o| seen[o]).collect();
                active = order.iter().map(|&o| active[o]).collect();
                row_prompt = order.iter().map(|&o| row_prompt[o]).collect();
                if let Some(p) = prefix.as_mut() {
                    self.drop_finished_prompts(p, &mut row_prompt)?;
                }
            }
            let n = active.len();
            let next: Vec<i64> = active
                .iter()
                .map(|&i| i64::from(*out[i].tokens.last().expect("one token")))
                .collect();
            self.stats.decode_steps += 1;
            let embeds = self.embed(next, n, 1, (Vec::new(), 0))?;
            let pos = step_positions(&active, &seen, &deltas, g);
            if let Some(o) = own_buf.as_mut().filter(|_| kv.len == OWN_CHUNK) {
                // A full chunk of past moves into the own buffer.
                let t0 = Instant::now();
                o.absorb(&mut kv, self.gpu)?;
                kv = Kv::empty(t, n, kv.ty)?;
                for mrow in masks.iter_mut() {
                    mrow.clear();
                }
                self.stats.cache_s += t0.elapsed().as_secs_f64();
            }
            if packed && self.own_in_place && kv.cap < kv.len + 1 {
                let cap = room_for(kv.len + 1, s + cfg.max_new_tokens);
                self.with_room(&mut kv, cap)?;
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
            let (l, new_kv) = self.decode(
                embeds,
                n,
                1,
                &masks,
                pos,
                &mut kv,
                prefix.as_mut().map(|p| (p, &row_prompt[..])),
                own_buf.as_mut().filter(|o| o.len > 0),
                &vec![0; n],
            )?;
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

#[cfg(test)]
mod tests {
    use super::*;

    /// Left padding puts each prompt at the end of its row, right padding (packed caches) at
    /// the start; the masks mark the prompt's tokens.
    #[test]
    fn prompts_are_padded_left_or_right_to_the_longest() {
        let prompts = vec![vec![5, 6, 7], vec![8]];
        let (ids, mask, s) = padded_batch(&prompts, 0, false);
        assert_eq!(s, 3);
        assert_eq!(ids, [5, 6, 7, 0, 0, 8]);
        assert_eq!(mask, [vec![1, 1, 1], vec![0, 0, 1]]);
        let (ids, mask, _) = padded_batch(&prompts, 0, true);
        assert_eq!(ids, [5, 6, 7, 8, 0, 0]);
        assert_eq!(mask, [vec![1, 1, 1], vec![1, 0, 0]]);
        assert_eq!(padded_batch(&[], 0, false), (vec![], vec![], 0));
    }

    /// A sample's stream is its request's and its own: neighbouring samples, requests and steps
    /// draw from different streams, and the same triple from the same one.
    #[test]
    fn row_keys_depend_on_request_sample_and_step_only() {
        let k = row_key(7, 1, 3);
        assert_eq!(k, row_key(7, 1, 3));
        assert_eq!(k.step, 3);
        let streams = [row_key(7, 0, 3), k, row_key(8, 1, 3), row_key(6, 1, 3)];
        for (a, x) in streams.iter().enumerate() {
            for y in &streams[a + 1..] {
                assert_ne!(x.sequence, y.sequence);
            }
        }
        assert_eq!(row_key(7, 1, 4).sequence, k.sequence);
    }

    /// Each live row's position is the tokens it holds plus its prompt's rope delta, the same on
    /// all three axes.
    #[test]
    fn step_positions_follow_each_rows_tokens_and_prompt_delta() {
        // Two prompts × 2 samples; rows 1 (prompt 0) and 2 (prompt 1) live.
        let pos = step_positions(&[1, 2], &[10, 7], &[-3, 4], 2);
        assert_eq!(pos, [7, 11, 7, 11, 7, 11]);
    }
}
