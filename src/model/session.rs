//! ONNX Runtime: the shared library is loaded at run time (`ort` with `load-dynamic`), from
//! `--ort-lib`, `ORT_DYLIB_PATH`, or the project's setup location `vendor/ort/` (filled by
//! `make ort` from the onnxruntime wheel). A missing or wrong library is an error, never a panic.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

#[derive(Debug, thiserror::Error)]
pub enum RuntimeError {
    #[error("ONNX Runtime library not found: tried {tried}. Run `make ort`, or pass --ort-lib / set ORT_DYLIB_PATH to libonnxruntime.so from the onnxruntime wheel (onnxruntime/capi/)")]
    NotFound { tried: String },
    #[error("{path}: cannot load ONNX Runtime: {msg}")]
    Load { path: PathBuf, msg: String },
    #[error("ONNX Runtime: {0}")]
    Ort(String),
}

/// Candidate library paths in order of preference, given `--ort-lib` and the value of
/// `ORT_DYLIB_PATH`: a library asked for by name is the only candidate (a typo must not load
/// another library, say the CPU build in place of the GPU one); else the setup location, then
/// next to the executable.
pub fn candidates(explicit: Option<&Path>, env: Option<&std::ffi::OsStr>) -> Vec<PathBuf> {
    if let Some(p) = explicit.map(Path::as_os_str).or(env) {
        return vec![PathBuf::from(p)];
    }
    let mut v = vec![Path::new(env!("CARGO_MANIFEST_DIR")).join("vendor/ort/libonnxruntime.so")];
    if let Ok(exe) = std::env::current_exe() {
        if let Some(dir) = exe.parent() {
            v.push(dir.join("libonnxruntime.so"));
        }
    }
    v
}

/// Loads the library once per process and returns the environment.
pub fn environment(
    explicit: Option<&Path>,
) -> Result<&'static ort::environment::Environment, RuntimeError> {
    static ENV: OnceLock<Result<ort::environment::Environment, String>> = OnceLock::new();
    if let Some(r) = ENV.get() {
        return r.as_ref().map_err(|e| RuntimeError::Ort(e.clone()));
    }
    let env = std::env::var_os("ORT_DYLIB_PATH");
    let tried = candidates(explicit, env.as_deref());
    let Some(path) = tried.iter().find(|p| p.is_file()).cloned() else {
        let named = match (explicit, &env) {
            (Some(_), _) => " (--ort-lib)",
            (None, Some(_)) => " (ORT_DYLIB_PATH)",
            (None, None) => "",
        };
        return Err(RuntimeError::NotFound {
            tried: tried
                .iter()
                .map(|p| p.display().to_string())
                .collect::<Vec<_>>()
                .join(", ")
                + named,
        });
    };
    let built = ort::init_from(&path)
        .map_err(|e| RuntimeError::Load {
            path: path.clone(),
            msg: e.to_string(),
        })?
        .with_name("spatial-ssrl")
        .build()
        .map_err(|e| RuntimeError::Load {
            path: path.clone(),
            msg: e.to_string(),
        })?;
    // Warnings such as "initializer appears in graph inputs" (the optional LoRA inputs) are
    // expected; errors still surface through the API.
    built.set_log_level(ort::logging::LogLevel::Error);
    let r = ENV.get_or_init(|| Ok(built));
    r.as_ref().map_err(|e| RuntimeError::Ort(e.clone()))
}

/// Where graphs run.
#[derive(Debug, Clone, PartialEq, Default)]
pub enum Device {
    #[default]
    Cpu,
    Cuda {
        device_id: i32,
    },
    /// TensorRT, with CUDA for the nodes TensorRT does not take.
    TensorRt {
        device_id: i32,
        fp16: bool,
        cache_dir: Option<PathBuf>,
        workspace_bytes: Option<usize>,
        /// Shape ranges to build each graph's engine for; `None` builds per shape seen.
        limits: Option<TrtLimits>,
    },
}

/// The rollout's size limits, from which each graph gets one TensorRT optimisation profile
/// (min / opt / max shapes): one engine serves every batch and length within them, where
/// without a profile a new shape means a new engine build.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct TrtLimits {
    /// Sequences decoded together (prompts × samples).
    pub max_rows: usize,
    /// Tokens of one prompt, images included; `None`: one image at `max_pixels` plus 1,024 text
    /// tokens.
    pub max_prompt: Option<usize>,
    pub max_new_tokens: usize,
    /// Pixels of one image after resizing; `None`: the package's `max_pixels`
    /// (preprocessor_config.json), which bounds what the preprocessor can produce.
    pub max_pixels: Option<u64>,
}

/// [`TrtLimits`] resolved against a package: the dimensions the profiles are built from.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct TrtShapes {
    pub max_rows: usize,
    /// Prompt plus generated tokens of one sequence.
    pub max_total: usize,
    /// Vision patches of one image (before merging).
    pub max_patches: usize,
}

impl TrtLimits {
    /// `rows` sequences of prompts up to `max_prompt` tokens plus `max_new_tokens`.
    pub fn rollout(
        rows: usize,
        max_prompt: Option<usize>,
        max_new_tokens: usize,
        max_pixels: Option<u64>,
    ) -> TrtLimits {
        TrtLimits {
            max_rows: rows.max(1),
            max_prompt,
            max_new_tokens,
            max_pixels,
        }
    }

    /// The shapes for a package of `patch_size`-pixel patches merged `merge × merge` into one
    /// token, whose preprocessor allows `package_max_pixels`.
    pub fn shapes(&self, patch_size: usize, merge: usize, package_max_pixels: u64) -> TrtShapes {
        let pixels = self.max_pixels.unwrap_or(package_max_pixels) as usize;
        let max_patches = (pixels / (patch_size * patch_size).max(1)).max(merge * merge);
        let max_prompt = self
            .max_prompt
            .unwrap_or(max_patches / (merge * merge).max(1) + 1024);
        TrtShapes {
            max_rows: self.max_rows,
            max_total: max_prompt + self.max_new_tokens,
            max_patches,
        }
    }
}

/// One optimisation profile in ONNX Runtime's TensorRT syntax (`name:d0xd1,…`).
#[derive(Debug, Clone, PartialEq)]
pub struct TrtProfile {
    pub min: String,
    pub opt: String,
    pub max: String,
}

/// One dimension's `(min, opt, max)`.
pub type DimRange = (usize, usize, usize);

impl TrtProfile {
    /// From `(input, [range per dimension])`.
    pub fn new(inputs: &[(String, Vec<DimRange>)]) -> TrtProfile {
        let pick = |f: fn(&DimRange) -> usize| {
            inputs
                .iter()
                .map(|(name, dims)| {
                    let d: Vec<String> = dims.iter().map(|x| f(x).to_string()).collect();
                    format!("{name}:{}", d.join("x"))
                })
                .collect::<Vec<_>>()
                .join(",")
        };
        TrtProfile {
            min: pick(|d| d.0),
            opt: pick(|d| d.1),
            max: pick(|d| d.2),
        }
    }
}

/// ONNX Runtime's CUDA memory arena: a cap on the bytes it may hold, and whether it grows by
/// what is asked (instead of doubling, which can overshoot the cap on a shared GPU).
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct CudaArena {
    pub mem_limit: Option<usize>,
    pub grow_as_requested: bool,
}

/// A size in bytes written as a whole number, or with a unit: `512MB`, `4GiB`, `1.5G` (K / M /
/// G / T are powers of 1,000 with `B`, of 1,024 with `iB` or alone, as memory sizes are usually
/// meant). Zero is refused: neither ONNX Runtime's arena nor TensorRT's workspace can be empty.
/// Errors quote the text.
pub fn parse_size(s: &str) -> Result<usize, String> {
    let t = s.trim();
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    const KI: f64 = 1024.0;
    let scale = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1.0,
        "k" | "kib" => KI,
        "m" | "mib" => KI * KI,
        "g" | "gib" => KI * KI * KI,
        "t" | "tib" => KI * KI * KI * KI,
        "kb" => 1e3,
        "mb" => 1e6,
        "gb" => 1e9,
        "tb" => 1e12,
        u => {
            return Err(format!(
                "{s:?}: unknown unit {u:?} (bytes, or K/M/G/T with B or iB)"
            ))
        }
    };
    let n: f64 = num
        .parse()
        .map_err(|_| format!("{s:?}: not a size (e.g. 1073741824, 1GiB, 512MB)"))?;
    let b = (n * scale).round();
    if b < 1.0 {
        return Err(format!("{s:?}: must be at least 1 byte"));
    }
    if b > usize::MAX as f64 {
        return Err(format!("{s:?}: too large"));
    }
    Ok(b as usize)
}

impl Device {
    /// `cpu`, `cuda` or `tensorrt` (default TensorRT options) on GPU `device_id`; `None` for
    /// any other name.
    pub fn from_name(name: &str, device_id: i32) -> Option<Device> {
        match name {
            "cpu" => Some(Device::Cpu),
            "cuda" => Some(Device::Cuda { device_id }),
            "tensorrt" => Some(Device::TensorRt {
                device_id,
                fp16: false,
                cache_dir: None,
                workspace_bytes: None,
                limits: None,
            }),
            _ => None,
        }
    }

    pub fn name(&self) -> &'static str {
        match self {
            Device::Cpu => "cpu",
            Device::Cuda { .. } => "cuda",
            Device::TensorRt { .. } => "tensorrt",
        }
    }
}

/// The execution provider to use, and whether falling back to the CPU is acceptable.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct DeviceChoice {
    pub device: Device,
    pub allow_fallback: bool,
    /// CUDA arena settings (CUDA, and TensorRT's CUDA fallback).
    pub arena: CudaArena,
    /// Write ONNX Runtime's per-operator profile of every session into this folder.
    pub profile: Option<std::path::PathBuf>,
    /// Every session reads one copy of the package's weights
    /// ([`SharedWeights`](crate::model::weights::SharedWeights)), whatever graphs are open (the
    /// trainer's setting): on the CPU one mapping of its data files, with no pre-packed copies;
    /// under the CUDA provider one device copy; after a fallback to the CPU provider, the CPU's
    /// mapping. Off, each session loads its own (on the CPU
    /// packed for speed: small batches decode up to 1.5–2× as fast).
    pub shared_weights: bool,
}

#[derive(Debug, thiserror::Error)]
#[error("{device} execution provider unavailable{hint} (pass --allow-fallback to run on the CPU instead)")]
pub struct ProviderError {
    pub device: &'static str,
    /// What to do about it, where ONNX Runtime's error says ([`gpu_library_hint`]).
    pub hint: &'static str,
    #[source]
    pub source: ort::Error,
}

impl ProviderError {
    fn new(device: &'static str, source: ort::Error) -> Self {
        ProviderError {
            device,
            hint: gpu_library_hint(source.message()),
            source,
        }
    }
}

/// The CUDA provider on GPU `device_id`. TF32 is off: fp32 graphs then give the CPU's
/// numbers (TF32 matrix products moved token log-probs by up to 3e-3 on an H200, which GRPO's
/// ratio against the training graph would read as policy drift); fp16 / bf16 graphs are not
/// affected.
fn cuda_ep(
    device_id: i32,
    arena: &CudaArena,
    stream: Option<ComputeStream>,
) -> ort::ep::ExecutionProviderDispatch {
    let mut ep = ort::ep::CUDA::default()
        .with_device_id(device_id)
        .with_tf32(false);
    if let Some(s) = stream {
        // SAFETY: the caller keeps the stream alive as long as the session (ComputeStream).
        ep = unsafe { ep.with_compute_stream(s.0) };
    }
    if let Some(b) = arena.mem_limit {
        ep = ep.with_memory_limit(b);
    }
    if arena.grow_as_requested {
        ep = ep.with_arena_extend_strategy(ort::ep::ArenaExtendStrategy::SameAsRequested);
    }
    ep.build().error_on_failure()
}

/// A CUDA stream (`cudaStream_t`) for ONNX Runtime's CUDA provider to run a session's graphs on;
/// whoever passes one keeps the stream alive until the session is dropped.
#[derive(Debug, Clone, Copy)]
pub struct ComputeStream(pub *mut ());

/// A session builder with the chosen provider registered (with `profile` as TensorRT's
/// optimisation profile, and the CUDA provider on `stream`, when given). Returns the builder and
/// the name of the provider actually in use (`"cpu (fallback from cuda: …)"` when falling back).
pub fn session_builder(
    env: &ort::environment::Environment,
    choice: &DeviceChoice,
    profile: Option<&TrtProfile>,
    stream: Option<ComputeStream>,
) -> Result<(ort::session::builder::SessionBuilder, String), ProviderError> {
    use ort::ep;
    let perr = |e: ort::Error| ProviderError::new(choice.device.name(), e);
    // Idle ONNX Runtime workers spin by default, taking the cores that sampling and cache
    // bookkeeping need between calls (+15-20 % tokens/s on 2 cores with spinning off).
    let builder = ort::session::Session::builder(env)
        .map_err(perr)?
        .with_intra_op_spinning(false)
        .map_err(|e| perr(e.into()))?;
    let eps = match &choice.device {
        Device::Cpu => return Ok((builder, "cpu".into())),
        Device::Cuda { device_id } => vec![cuda_ep(*device_id, &choice.arena, stream)],
        Device::TensorRt {
            device_id,
            fp16,
            cache_dir,
            workspace_bytes,
            limits: _,
        } => {
            let mut trt = ep::TensorRT::default()
                .with_device_id(*device_id)
                .with_fp16(*fp16);
            if let Some(dir) = cache_dir {
                let d = dir.display().to_string();
                trt = trt
                    .with_engine_cache(true)
                    .with_engine_cache_path(&d)
                    .with_timing_cache(true)
                    .with_timing_cache_path(&d);
            }
            if let Some(w) = workspace_bytes {
                trt = trt.with_max_workspace_size(*w);
            }
            if let Some(p) = profile {
                trt = trt
                    .with_profile_min_shapes(&p.min)
                    .with_profile_opt_shapes(&p.opt)
                    .with_profile_max_shapes(&p.max);
            }
            vec![
                trt.build().error_on_failure(),
                cuda_ep(*device_id, &choice.arena, stream),
            ]
        }
    };
    match builder.with_execution_providers(eps) {
        Ok(b) => Ok((b, choice.device.name().into())),
        Err(e) if choice.allow_fallback => {
            // (the provider's label for people: why it fell back, and what to load instead)
            let hint = gpu_library_hint(e.message());
            let text = match hint.is_empty() {
                true => e.message(),
                false => e.message().trim_end_matches('.'),
            };
            let msg = format!("{text}{hint}");
            Ok((
                e.recover(),
                format!("cpu (fallback from {}: {msg})", choice.device.name()),
            ))
        }
        Err(e) => Err(ProviderError::new(choice.device.name(), e.into())),
    }
}

/// ONNX Runtime's "Could not find an implementation" (`msg`) on the CPU provider: an operator
/// of the graph has no CPU kernel in its precision (a bf16 build's MatMul, say); says where it
/// may run (empty for other errors and providers).
pub fn kernel_hint(msg: &str, provider: &str) -> &'static str {
    match provider.starts_with("cpu") && msg.contains("Could not find an implementation") {
        true => {
            " (ONNX Runtime's CPU provider has no kernel for it in this graph's precision: \
             half-precision builds, bf16 above all, are made for --device cuda)"
        }
        false => "",
    }
}

/// ONNX Runtime's "not enabled in this build" (`msg`) means the library loaded is the CPU
/// build: says which library to load instead (empty for other errors).
fn gpu_library_hint(msg: &str) -> &'static str {
    match msg.contains("not enabled in this build") {
        true => {
            "; the libonnxruntime loaded is the CPU build: point --ort-lib or ORT_DYLIB_PATH at \
             onnxruntime-gpu's (README, \"On an NVIDIA server\")"
        }
        false => "",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_read_with_and_without_units() {
        assert_eq!(parse_size("1073741824"), Ok(1 << 30));
        assert_eq!(parse_size("4GiB"), Ok(4 << 30));
        assert_eq!(parse_size("4g"), Ok(4 << 30));
        assert_eq!(parse_size("512MB"), Ok(512_000_000));
        assert_eq!(parse_size("1.5 GiB"), Ok(3 << 29));
        assert_eq!(parse_size("64k"), Ok(65_536));
        for bad in ["0", "0.1", "", "GiB", "4 parsecs", "-1", "1e9"] {
            let e = parse_size(bad).expect_err(bad);
            assert!(e.contains(&format!("{bad:?}")), "{bad}: {e}");
        }
    }

    /// A CPU build of the library is named as the cause, with the way to the GPU build; other
    /// provider errors get no hint.
    #[test]
    fn a_cpu_library_gets_the_gpu_library_hint() {
        let m = gpu_library_hint("CUDA execution provider is not enabled in this build.");
        assert!(
            m.contains("CPU build") && m.contains("ORT_DYLIB_PATH"),
            "{m}"
        );
        assert_eq!(
            gpu_library_hint("libcudnn.so.9: cannot open shared object file"),
            ""
        );
    }

    /// A missing CPU kernel gets the way to the GPU; other errors, and other providers, none.
    #[test]
    fn a_missing_cpu_kernel_gets_the_device_hint() {
        let m = "Could not find an implementation for MatMul(13) node with name 'q'";
        assert!(kernel_hint(m, "cpu").contains("--device cuda"));
        assert!(kernel_hint(m, "cpu (fallback from cuda: …)").contains("--device cuda"));
        assert_eq!(kernel_hint(m, "cuda"), "");
        assert_eq!(kernel_hint("other", "cpu"), "");
    }

    /// Patches follow the image budget and the package's patch size; the prompt budget defaults
    /// to one image's tokens plus 1,024 of text; explicit limits win.
    #[test]
    fn trt_shapes_follow_the_image_budget_and_the_package() {
        let l = TrtLimits::rollout(40, None, 64, Some(448 * 336));
        let s = l.shapes(14, 2, 12_845_056);
        assert_eq!(s.max_patches, 32 * 24);
        assert_eq!(s.max_total, 32 * 24 / 4 + 1024 + 64);
        assert_eq!(s.max_rows, 40);
        // A 16-pixel patch package: fewer patches for the same pixels.
        assert_eq!(l.shapes(16, 2, 12_845_056).max_patches, 448 * 336 / 256);
        // No pixel budget: the package's.
        let l = TrtLimits::rollout(0, Some(4096), 64, None);
        let s = l.shapes(14, 2, 14 * 14 * 16_384);
        assert_eq!((s.max_rows, s.max_patches, s.max_total), (1, 16_384, 4160));
    }
}
