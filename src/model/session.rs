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

/// Candidate library paths in order of preference.
pub fn candidates(explicit: Option<&Path>) -> Vec<PathBuf> {
    let mut v = Vec::new();
    if let Some(p) = explicit {
        v.push(p.to_path_buf());
    }
    if let Some(p) = std::env::var_os("ORT_DYLIB_PATH") {
        v.push(PathBuf::from(p));
    }
    v.push(Path::new(env!("CARGO_MANIFEST_DIR")).join("vendor/ort/libonnxruntime.so"));
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
    let tried = candidates(explicit);
    let Some(path) = tried.iter().find(|p| p.is_file()).cloned() else {
        return Err(RuntimeError::NotFound {
            tried: tried
                .iter()
                .map(|p| p.display().to_string())
                .collect::<Vec<_>>()
                .join(", "),
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
    },
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
}

#[derive(Debug, thiserror::Error)]
#[error("{device} execution provider unavailable: {msg} (pass --allow-fallback to run on the CPU instead)")]
pub struct ProviderError {
    pub device: &'static str,
    pub msg: String,
}

/// The CUDA provider on GPU `device_id`. TF32 is off: fp32 graphs then give the CPU's
/// numbers (TF32 matrix products moved token log-probs by up to 3e-3 on an H200, which GRPO's
/// ratio against the training graph would read as policy drift); fp16 / bf16 graphs are not
/// affected.
fn cuda_ep(device_id: i32) -> ort::ep::ExecutionProviderDispatch {
    ort::ep::CUDA::default()
        .with_device_id(device_id)
        .with_tf32(false)
        .build()
        .error_on_failure()
}

/// A session builder with the chosen provider registered. Returns the builder and the name of
/// the provider actually in use (`"cpu (fallback from cuda: …)"` when falling back).
pub fn session_builder(
    env: &ort::environment::Environment,
    choice: &DeviceChoice,
) -> Result<(ort::session::builder::SessionBuilder, String), ProviderError> {
    use ort::ep;
    let perr = |msg: String| ProviderError {
        device: choice.device.name(),
        msg,
    };
    // Idle ONNX Runtime workers spin by default, taking the cores that sampling and cache
    // bookkeeping need between calls (+15-20 % tokens/s on 2 cores with spinning off).
    let builder = ort::session::Session::builder(env)
        .map_err(|e| perr(e.to_string()))?
        .with_intra_op_spinning(false)
        .map_err(|e| perr(e.to_string()))?;
    let eps = match &choice.device {
        Device::Cpu => return Ok((builder, "cpu".into())),
        Device::Cuda { device_id } => vec![cuda_ep(*device_id)],
        Device::TensorRt {
            device_id,
            fp16,
            cache_dir,
            workspace_bytes,
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
            vec![trt.build().error_on_failure(), cuda_ep(*device_id)]
        }
    };
    match builder.with_execution_providers(eps) {
        Ok(b) => Ok((b, choice.device.name().into())),
        Err(e) if choice.allow_fallback => {
            let msg = e.to_string();
            Ok((
                e.recover(),
                format!("cpu (fallback from {}: {msg})", choice.device.name()),
            ))
        }
        Err(e) => Err(ProviderError {
            device: choice.device.name(),
            msg: e.to_string(),
        }),
    }
}
