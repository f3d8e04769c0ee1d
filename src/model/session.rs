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
