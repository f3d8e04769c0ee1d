//! The types the engine's parts share — its error, a finished sample, the step trace, the time
//! split — in one place that the runner, the cache, the GPU side and the float conversions
//! import without importing the engine itself.

use crate::model::package::PackageError;
use crate::model::processor::ProcessorError;
use crate::model::prompt::PromptError;
use crate::model::rope::RopeError;
use crate::model::session::ProviderError;
use ort::session::SessionInputValue;
use ort::value::Tensor;

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
    /// ONNX Runtime's own error from one of the engine's graphs.
    #[error("{graph}")]
    Ort {
        graph: &'static str,
        #[source]
        source: ort::Error,
    },
    #[error("decoder: GPU cache")]
    GpuCache(#[source] crate::kernels::KernelError),
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
    move |source| EngineError::Ort { graph, source }
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
    pub(super) fn add(&mut self, o: &EngineStats, workers: usize) {
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

/// The graph input or output of cache slot `i` under `prefix` (`past_key_values.3.value`): the
/// layers' keys at even slots, values at odd ones.
pub(super) fn kv_name(prefix: &str, i: usize) -> String {
    let kind = if i % 2 == 0 { "key" } else { "value" };
    format!("{prefix}.{}.{kind}", i / 2)
}
