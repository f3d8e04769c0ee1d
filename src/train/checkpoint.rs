//! Checkpoints: the LoRA adapter in PEFT's layout (`adapter_model.safetensors` +
//! `adapter_config.json`, loadable by peft and vLLM), the optimizer moments, and
//! `trainer_state.json` (step, configuration, and the size and hash of every file). A checkpoint
//! is written into `global_step_N.partial/` and renamed when complete; loading re-hashes every
//! file, so a torn or altered checkpoint is refused with the file named.

use crate::model::package::LoraSpec;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum CheckpointError {
    #[error("{path}: {msg}")]
    File { path: PathBuf, msg: String },
}

fn file_err(path: &Path, msg: impl std::fmt::Display) -> CheckpointError {
    CheckpointError::File {
        path: path.to_path_buf(),
        msg: msg.to_string(),
    }
}

/// A named f32 tensor.
#[derive(Debug, Clone, PartialEq)]
pub struct NamedTensor {
    pub name: String,
    pub shape: Vec<usize>,
    pub data: Vec<f32>,
}

/// safetensors bytes of f32 tensors, in the given order.
pub fn safetensors_bytes(tensors: &[NamedTensor], metadata: &BTreeMap<String, String>) -> Vec<u8> {
    let mut header = serde_json::Map::new();
    if !metadata.is_empty() {
        header.insert(
            "__metadata__".into(),
            serde_json::to_value(metadata).expect("strings"),
        );
    }
    let mut at = 0usize;
    for t in tensors {
        let end = at + 4 * t.data.len();
        header.insert(
            t.name.clone(),
            serde_json::json!({"dtype": "F32", "shape": t.shape, "data_offsets": [at, end]}),
        );
        at = end;
    }
    let mut h = serde_json::to_vec(&header).expect("json");
    while h.len() % 8 != 0 {
        h.push(b' ');
    }
    let mut out = Vec::with_capacity(8 + h.len() + at);
    out.extend_from_slice(&(h.len() as u64).to_le_bytes());
    out.extend_from_slice(&h);
    for t in tensors {
        for v in &t.data {
            out.extend_from_slice(&v.to_le_bytes());
        }
    }
    out
}

/// Reads the f32 (or f16/bf16, widened) tensors of a safetensors file.
pub fn read_safetensors(path: &Path) -> Result<Vec<NamedTensor>, CheckpointError> {
    let bytes = std::fs::read(path).map_err(|e| file_err(path, e))?;
    parse_safetensors(&bytes).map_err(|m| file_err(path, m))
}

fn parse_safetensors(bytes: &[u8]) -> Result<Vec<NamedTensor>, String> {
    let n = u64::from_le_bytes(
        bytes
            .get(..8)
            .ok_or("shorter than a safetensors header")?
            .try_into()
            .expect("8 bytes"),
    ) as usize;
    let header = bytes
        .get(8..8usize.saturating_add(n))
        .ok_or("header runs past the end of the file (truncated?)")?;
    let data = &bytes[8 + n..];
    let header: BTreeMap<String, serde_json::Value> =
        serde_json::from_slice(header).map_err(|e| format!("header: {e}"))?;
    let mut out = Vec::new();
    for (name, v) in header {
        if name == "__metadata__" {
            continue;
        }
        let dtype = v["dtype"].as_str().unwrap_or("");
        let shape: Vec<usize> = serde_json::from_value(v["shape"].clone())
            .map_err(|e| format!("{name}: shape: {e}"))?;
        let off: [usize; 2] = serde_json::from_value(v["data_offsets"].clone())
            .map_err(|e| format!("{name}: data_offsets: {e}"))?;
        let raw = data
            .get(off[0]..off[1])
            .ok_or_else(|| format!("{name}: data past the end of the file (truncated?)"))?;
        let count: usize = shape.iter().product();
        let values: Vec<f32> = match dtype {
            "F32" => raw
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes(c.try_into().expect("4 bytes")))
                .collect(),
            "F16" => raw
                .chunks_exact(2)
                .map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f32())
                .collect(),
            "BF16" => raw
                .chunks_exact(2)
                .map(|c| half::bf16::from_le_bytes([c[0], c[1]]).to_f32())
                .collect(),
            other => return Err(format!("{name}: dtype {other} (F32, F16 or BF16 expected)")),
        };
        if values.len() != count {
            return Err(format!(
                "{name}: {} values for shape {shape:?}",
                values.len()
            ));
        }
        out.push(NamedTensor {
            name,
            shape,
            data: values,
        });
    }
    Ok(out)
}

/// PEFT's key for a package LoRA tensor (`lora.{layer}.{target}` + `A`/`B`) on Qwen2.5-VL
/// (transformers ≥ 4.52 module paths).
pub fn peft_key(name: &str, which: char) -> Option<String> {
    let mut it = name.split('.');
    let (Some("lora"), Some(layer), Some(target), None) =
        (it.next(), it.next(), it.next(), it.next())
    else {
        return None;
    };
    let block = match target {
        "q_proj" | "k_proj" | "v_proj" | "o_proj" => "self_attn",
        "gate_proj" | "up_proj" | "down_proj" => "mlp",
        _ => return None,
    };
    Some(format!(
        "base_model.model.model.language_model.layers.{layer}.{block}.{target}.lora_{which}.weight"
    ))
}

/// The package name of a PEFT key, accepting both the ≥ 4.52 (`model.language_model.layers`)
/// and older (`model.layers`) module paths.
pub fn package_name(key: &str) -> Option<(String, char)> {
    let rest = key
        .strip_prefix("base_model.model.model.language_model.layers.")
        .or_else(|| key.strip_prefix("base_model.model.model.layers."))?;
    let mut it = rest.split('.');
    let layer = it.next()?;
    let _block = it.next()?;
    let target = it.next()?;
    let which = match it.next()? {
        "lora_A" => 'A',
        "lora_B" => 'B',
        _ => return None,
    };
    Some((format!("lora.{layer}.{target}"), which))
}

/// PEFT's `adapter_config.json` for the package's LoRA layout.
pub fn adapter_config(spec: &LoraSpec, base_model: &str) -> serde_json::Value {
    serde_json::json!({
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model,
        "r": spec.rank,
        "lora_alpha": spec.alpha,
        "lora_dropout": 0.0,
        "target_modules": spec.targets,
        "bias": "none",
        "fan_in_fan_out": false,
        "inference_mode": true,
        "init_lora_weights": true,
        "use_rslora": false,
        "use_dora": false,
        "modules_to_save": null,
        "layers_to_transform": null,
        "revision": null
    })
}

/// What a checkpoint restores.
#[derive(Debug, Clone, PartialEq)]
pub struct State {
    pub step: usize,
    /// `TrainConfig::resume_key` of the run that wrote it.
    pub config: String,
    /// LoRA tensors by package name (`lora.0.q_proj.A`), with AdamW's moments.
    pub params: Vec<NamedTensor>,
    pub exp_avg: Vec<NamedTensor>,
    pub exp_avg_sq: Vec<NamedTensor>,
}

#[derive(Debug, Serialize, Deserialize)]
struct TrainerState {
    format: String,
    step: usize,
    config: String,
    /// file name → (bytes, FNV-1a 64 hex)
    files: BTreeMap<String, (u64, String)>,
}

const FORMAT: &str = "spatial-ssrl-checkpoint-1";

fn fnv64(bytes: &[u8]) -> String {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in bytes {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    format!("{h:016x}")
}

pub fn step_dir(root: &Path, step: usize) -> PathBuf {
    root.join(format!("global_step_{step}"))
}

/// Writes a checkpoint atomically and keeps the newest `keep` (0 = all).
pub fn save(
    root: &Path,
    state: &State,
    spec: &LoraSpec,
    base_model: &str,
    keep: usize,
) -> Result<PathBuf, CheckpointError> {
    std::fs::create_dir_all(root).map_err(|e| file_err(root, e))?;
    let dst = step_dir(root, state.step);
    let tmp = dst.with_extension("partial");
    if tmp.exists() {
        std::fs::remove_dir_all(&tmp).map_err(|e| file_err(&tmp, e))?;
    }
    std::fs::create_dir_all(&tmp).map_err(|e| file_err(&tmp, e))?;
    let peft: Vec<NamedTensor> = state
        .params
        .iter()
        .map(|t| {
            let (base, which) = t.name.rsplit_once('.').expect("lora.X.Y.A");
            NamedTensor {
                name: peft_key(base, which.chars().next().expect("A or B"))
                    .unwrap_or_else(|| t.name.clone()),
                ..t.clone()
            }
        })
        .collect();
    let meta: BTreeMap<String, String> = [("format".to_string(), "pt".to_string())].into();
    let moments: Vec<NamedTensor> = state
        .exp_avg
        .iter()
        .map(|t| NamedTensor {
            name: format!("exp_avg.{}", t.name),
            ..t.clone()
        })
        .chain(state.exp_avg_sq.iter().map(|t| NamedTensor {
            name: format!("exp_avg_sq.{}", t.name),
            ..t.clone()
        }))
        .collect();
    let files: Vec<(&str, Vec<u8>)> = vec![
        ("adapter_model.safetensors", safetensors_bytes(&peft, &meta)),
        (
            "adapter_config.json",
            serde_json::to_vec_pretty(&adapter_config(spec, base_model)).expect("json"),
        ),
        (
            "optimizer.safetensors",
            safetensors_bytes(&moments, &BTreeMap::new()),
        ),
    ];
    let mut index = BTreeMap::new();
    for (name, bytes) in &files {
        let p = tmp.join(name);
        std::fs::write(&p, bytes).map_err(|e| file_err(&p, e))?;
        index.insert(name.to_string(), (bytes.len() as u64, fnv64(bytes)));
    }
    let ts = TrainerState {
        format: FORMAT.into(),
        step: state.step,
        config: state.config.clone(),
        files: index,
    };
    let p = tmp.join("trainer_state.json");
    std::fs::write(&p, serde_json::to_vec_pretty(&ts).expect("json"))
        .map_err(|e| file_err(&p, e))?;
    if dst.exists() {
        std::fs::remove_dir_all(&dst).map_err(|e| file_err(&dst, e))?;
    }
    std::fs::rename(&tmp, &dst).map_err(|e| file_err(&dst, e))?;
    if keep > 0 {
        let mut all = list(root);
        while all.len() > keep {
            let (_, old) = all.remove(0);
            let _ = std::fs::remove_dir_all(old);
        }
    }
    Ok(dst)
}

/// Complete checkpoints under `root` (no `.partial`), oldest first.
pub fn list(root: &Path) -> Vec<(usize, PathBuf)> {
    let mut v: Vec<(usize, PathBuf)> = std::fs::read_dir(root)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let name = e.file_name().into_string().ok()?;
            let step = name.strip_prefix("global_step_")?.parse().ok()?;
            Some((step, e.path()))
        })
        .collect();
    v.sort();
    v
}

/// Loads and verifies a checkpoint folder.
pub fn load(dir: &Path) -> Result<State, CheckpointError> {
    let sp = dir.join("trainer_state.json");
    let text = std::fs::read(&sp).map_err(|e| {
        file_err(
            &sp,
            format!("{e} (not a checkpoint folder, or one whose writing was interrupted)"),
        )
    })?;
    let ts: TrainerState = serde_json::from_slice(&text).map_err(|e| file_err(&sp, e))?;
    if ts.format != FORMAT {
        return Err(file_err(
            &sp,
            format!("format {:?}, expected {FORMAT:?}", ts.format),
        ));
    }
    for (name, (len, hash)) in &ts.files {
        let p = dir.join(name);
        let bytes = std::fs::read(&p).map_err(|e| file_err(&p, e))?;
        if bytes.len() as u64 != *len || fnv64(&bytes) != *hash {
            return Err(file_err(
                &p,
                format!(
                    "corrupt: {} bytes with hash {}, trainer_state.json records {len} bytes with hash {hash}",
                    bytes.len(),
                    fnv64(&bytes)
                ),
            ));
        }
    }
    let ap = dir.join("adapter_model.safetensors");
    let mut params = Vec::new();
    for t in read_safetensors(&ap)? {
        let (base, which) = package_name(&t.name)
            .ok_or_else(|| file_err(&ap, format!("{}: not a LoRA key of this model", t.name)))?;
        params.push(NamedTensor {
            name: format!("{base}.{which}"),
            ..t
        });
    }
    let op = dir.join("optimizer.safetensors");
    let (mut exp_avg, mut exp_avg_sq) = (Vec::new(), Vec::new());
    for t in read_safetensors(&op)? {
        if let Some(n) = t.name.strip_prefix("exp_avg_sq.") {
            exp_avg_sq.push(NamedTensor {
                name: n.to_string(),
                ..t
            });
        } else if let Some(n) = t.name.strip_prefix("exp_avg.") {
            exp_avg.push(NamedTensor {
                name: n.to_string(),
                ..t
            });
        } else {
            return Err(file_err(&op, format!("unexpected tensor {}", t.name)));
        }
    }
    Ok(State {
        step: ts.step,
        config: ts.config,
        params,
        exp_avg,
        exp_avg_sq,
    })
}

/// Only the adapter (for `ssrl export --adapter`, `ssrl rollout --adapter`): package names and
/// values, from a checkpoint folder or a bare PEFT adapter folder.
pub fn load_adapter(dir: &Path) -> Result<Vec<NamedTensor>, CheckpointError> {
    if dir.join("trainer_state.json").exists() {
        return Ok(load(dir)?.params);
    }
    let ap = dir.join("adapter_model.safetensors");
    read_safetensors(&ap)?
        .into_iter()
        .map(|t| {
            let (base, which) = package_name(&t.name).ok_or_else(|| {
                file_err(&ap, format!("{}: not a LoRA key of this model", t.name))
            })?;
            Ok(NamedTensor {
                name: format!("{base}.{which}"),
                ..t
            })
        })
        .collect()
}
