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

/// PEFT's key for a package LoRA tensor (`lora.{layer}.{target}`, `lora.visual.{block}.{target}`,
/// the merger's `lora.visual.merger.{mlp_0|mlp_2|linear_fc1|linear_fc2}`, Qwen3-VL's DeepStack
/// mergers' `lora.visual.deepstack_merger_list.{k}.{linear_fc1|linear_fc2}`, + `A`/`B`) on
/// Qwen2.5-VL and Qwen3-VL (transformers ≥ 4.52 module paths).
pub fn peft_key(name: &str, which: char) -> Option<String> {
    if let Some(rest) = name.strip_prefix("lora.visual.") {
        let number = |s: &str| s.parse::<usize>().is_ok();
        let module = match rest.split('.').collect::<Vec<_>>()[..] {
            ["merger", t @ ("mlp_0" | "mlp_2")] => format!("merger.mlp.{}", &t[4..]),
            ["merger", t @ ("linear_fc1" | "linear_fc2")] => format!("merger.{t}"),
            ["deepstack_merger_list", k, t @ ("linear_fc1" | "linear_fc2")] if number(k) => {
                format!("deepstack_merger_list.{k}.{t}")
            }
            [b, t @ ("qkv" | "proj")] if number(b) => format!("blocks.{b}.attn.{t}"),
            [b, t @ ("gate_proj" | "up_proj" | "down_proj" | "linear_fc1" | "linear_fc2")]
                if number(b) =>
            {
                format!("blocks.{b}.mlp.{t}")
            }
            _ => return None,
        };
        return Some(format!(
            "base_model.model.model.visual.{module}.lora_{which}.weight"
        ));
    }
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
    if let Some(v) = key
        .strip_prefix("base_model.model.model.visual.")
        .or_else(|| key.strip_prefix("base_model.model.visual."))
    {
        let (module, which) = v.rsplit_once(".lora_")?;
        let which = match which {
            "A.weight" => 'A',
            "B.weight" => 'B',
            _ => return None,
        };
        let name = match module.split('.').collect::<Vec<_>>()[..] {
            ["merger", "mlp", j @ ("0" | "2")] => format!("lora.visual.merger.mlp_{j}"),
            ["merger", t] => format!("lora.visual.merger.{t}"),
            ["deepstack_merger_list", k, t] => format!("lora.visual.deepstack_merger_list.{k}.{t}"),
            ["blocks", b, "attn" | "mlp", t] => format!("lora.visual.{b}.{t}"),
            _ => return None,
        };
        // (only modules a package names: `merger.norm` or `blocks.0.mlp.fc9` are none)
        peft_key(&name, which)?;
        return Some((name, which));
    }
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

/// PEFT's `target_modules` for the package's LoRA layout: its targets' names where that list
/// matches no other module (PEFT matches a listed name against every module path's last part),
/// else a regular expression PEFT matches whole against the module paths — the vision tower's
/// MLP has names of the language model's (Qwen2.5-VL's gate / up / down projections) or of the
/// mergers' (Qwen3-VL's `linear_fc1` / `linear_fc2`), and its attention and Qwen2.5-VL's merger
/// are named by position. Qwen3-VL's merger target takes its DeepStack mergers too.
pub fn target_modules(spec: &LoraSpec) -> serde_json::Value {
    let targets = &spec.targets;
    let unique = ["q_proj", "k_proj", "v_proj", "o_proj"];
    if targets.iter().all(|t| unique.contains(&t.as_str())) {
        return serde_json::json!(targets);
    }
    let lang: Vec<&str> = targets
        .iter()
        .map(String::as_str)
        .filter(|t| !t.starts_with("visual."))
        .collect();
    let blocks: Vec<&str> = targets
        .iter()
        .filter_map(|t| t.strip_prefix("visual."))
        .filter(|t| *t != "merger")
        .collect();
    let mut parts = Vec::new();
    if !lang.is_empty() {
        parts.push(format!(
            r".*\.layers\.\d+\.(self_attn|mlp)\.({})",
            lang.join("|")
        ));
    }
    if !blocks.is_empty() {
        parts.push(format!(
            r".*visual\.blocks\.\d+\.(attn|mlp)\.({})",
            blocks.join("|")
        ));
    }
    if targets.iter().any(|t| t == "visual.merger") {
        let qwen3 =
            (spec.tensors.iter()).any(|t| t.name.starts_with("lora.visual.merger.linear_fc"));
        parts.push(match qwen3 {
            true => {
                r".*visual\.(merger|deepstack_merger_list\.\d+)\.(linear_fc1|linear_fc2)".into()
            }
            false => r".*visual\.merger\.mlp\.(0|2)".into(),
        });
    }
    serde_json::json!(parts.join("|"))
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
        "target_modules": target_modules(spec),
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
    /// The dynamic loss scale of an fp16 run.
    pub loss_scale: Option<super::scale::LossScale>,
}

#[derive(Debug, Serialize, Deserialize)]
struct TrainerState {
    format: String,
    step: usize,
    config: String,
    /// file name → (bytes, FNV-1a 64 hex)
    files: BTreeMap<String, (u64, String)>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    loss_scale: Option<super::scale::LossScale>,
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
        loss_scale: state.loss_scale,
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

/// The newest complete checkpoint under `root`, if any.
pub fn latest(root: &Path) -> Option<PathBuf> {
    list(root).pop().map(|(_, p)| p)
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
        loss_scale: ts.loss_scale,
    })
}

/// Only the adapter (for `ssrl export --adapter`, `ssrl eval --adapter`): package names and
/// values as stored, from a checkpoint folder or a bare PEFT adapter folder. [`load_adapter_for`]
/// is what a caller with a package wants: it also applies the adapter's `adapter_config.json`.
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

/// The scale an adapter's `adapter_config.json` gives its update `scale · B·A`
/// (`lora_alpha / r`, or `lora_alpha / √r` with `use_rslora`), after refusing what this
/// project's graphs cannot apply, naming the field: another `peft_type`, DoRA, trained biases,
/// `fan_in_fan_out`, `modules_to_save`, per-module `rank_pattern` / `alpha_pattern`, and listed
/// `target_modules` the package has no LoRA input for.
pub fn adapter_scale(config: &Path, spec: &LoraSpec) -> Result<f64, CheckpointError> {
    let text = std::fs::read(config).map_err(|e| file_err(config, e))?;
    let v: serde_json::Value = serde_json::from_slice(&text).map_err(|e| file_err(config, e))?;
    let bad = |field: &str, why: String| file_err(config, format!("{field}: {why}"));
    let field = |k: &str| v.get(k).filter(|x| !x.is_null());
    if let Some(t) = field("peft_type") {
        if t.as_str() != Some("LORA") {
            return Err(bad(
                "peft_type",
                format!("{t}, only LORA adapters can be applied"),
            ));
        }
    }
    if field("use_dora").and_then(|x| x.as_bool()) == Some(true) {
        return Err(bad(
            "use_dora",
            "true: DoRA rescales each weight column by a learned magnitude, which this \
             package's LoRA inputs cannot express (merge it with peft instead)"
                .into(),
        ));
    }
    if let Some(b) = field("bias").and_then(|x| x.as_str()) {
        if b != "none" {
            return Err(bad(
                "bias",
                format!("{b:?}: trained biases cannot be applied, only \"none\""),
            ));
        }
    }
    if field("fan_in_fan_out").and_then(|x| x.as_bool()) == Some(true) {
        return Err(bad(
            "fan_in_fan_out",
            "true: the adapter is for Conv1D layers (GPT-2 style), not Qwen's Linear".into(),
        ));
    }
    if field("modules_to_save").is_some_and(|x| x.as_array().is_none_or(|a| !a.is_empty())) {
        return Err(bad(
            "modules_to_save",
            "the adapter also replaces whole modules, which cannot be applied as LoRA".into(),
        ));
    }
    for k in ["rank_pattern", "alpha_pattern"] {
        if field(k).is_some_and(|x| x.as_object().is_none_or(|o| !o.is_empty())) {
            return Err(bad(
                k,
                "per-module ranks or alphas are not supported (one r and lora_alpha)".into(),
            ));
        }
    }
    if let Some(list) = field("target_modules").and_then(|x| x.as_array()) {
        for t in list {
            let name = t.as_str().unwrap_or_default();
            // PEFT matches a listed name against the module path's last part (the merger's
            // layers are `mlp.0` and `mlp.2`).
            let short = name.rsplit('.').next().unwrap_or(name);
            let have = |p: &String| match p.as_str() {
                "visual.merger" => ["0", "2", "linear_fc1", "linear_fc2"].contains(&short),
                p => p.rsplit('.').next() == Some(short),
            };
            if !spec.targets.iter().any(have) {
                return Err(bad(
                    "target_modules",
                    format!(
                        "{t}: the package has LoRA inputs for {} only",
                        spec.targets.join(", ")
                    ),
                ));
            }
        }
    }
    let number = |k: &str| -> Result<f64, CheckpointError> {
        let x = field(k)
            .ok_or_else(|| bad(k, "missing".into()))?
            .as_f64()
            .ok_or_else(|| bad(k, format!("{} is not a number", v[k])))?;
        match x.is_finite() && x > 0.0 {
            true => Ok(x),
            false => Err(bad(k, format!("{x} (must be a positive number)"))),
        }
    };
    let (r, alpha) = (number("r")?, number("lora_alpha")?);
    Ok(match field("use_rslora").and_then(|x| x.as_bool()) {
        Some(true) => alpha / r.sqrt(),
        _ => alpha / r,
    })
}

/// An adapter ready for `spec`'s package: [`load_adapter`]'s tensors, each checked finite and
/// aimed at one of the package's LoRA inputs (named otherwise), with `B` rescaled so that the
/// package's own `scale` gives the adapter's (`adapter_config.json`, [`adapter_scale`]): an
/// adapter trained at `lora_alpha` 32 merges as 32, not as the package's 16. Its rank may
/// differ from the package's (a merge takes any rank; a rollout's LoRA inputs take the
/// package's), its input and output widths may not.
pub fn load_adapter_for(dir: &Path, spec: &LoraSpec) -> Result<Vec<NamedTensor>, CheckpointError> {
    let mut tensors = load_adapter(dir)?;
    let ap = dir.join("adapter_model.safetensors");
    let cp = dir.join("adapter_config.json");
    if !cp.is_file() {
        return Err(file_err(
            &cp,
            "missing: its r and lora_alpha give the adapter's scale (peft writes it beside \
             adapter_model.safetensors)",
        ));
    }
    let scale = adapter_scale(&cp, spec)?;
    for t in &tensors {
        let (base, which) = t.name.rsplit_once('.').unwrap_or((t.name.as_str(), ""));
        let Some(p) = spec.tensors.iter().find(|p| p.name == base) else {
            return Err(file_err(
                &ap,
                format!(
                    "{}: the package has no LoRA input for it (its targets: {})",
                    t.name,
                    spec.targets.join(", ")
                ),
            ));
        };
        // A is [r, in], B [out, r]: the widths that are not the rank must be the package's.
        let (got, want) = match which {
            "A" => (t.shape.get(1), p.a.get(1)),
            _ => (t.shape.first(), p.b.first()),
        };
        if t.shape.len() != 2 || got != want {
            return Err(file_err(
                &ap,
                format!(
                    "{}: shape {:?}, the package's is {:?} (an adapter for another model?)",
                    t.name,
                    t.shape,
                    if which == "A" { &p.a } else { &p.b }
                ),
            ));
        }
        if let Some(i) = t.data.iter().position(|x| !x.is_finite()) {
            return Err(file_err(
                &ap,
                format!("{}: value {} at index {i} is not finite", t.name, t.data[i]),
            ));
        }
    }
    if scale != spec.scale {
        let k = (scale / spec.scale) as f32;
        for t in tensors.iter_mut().filter(|t| t.name.ends_with(".B")) {
            t.data.iter_mut().for_each(|x| *x *= k);
        }
    }
    Ok(tensors)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::package::LoraTensor;

    /// The tiny package's LoRA layout: rank 8, alpha 16, q_proj [8, 16] → 16, v_proj → 8.
    fn spec() -> LoraSpec {
        LoraSpec {
            rank: 8,
            alpha: 16.0,
            scale: 2.0,
            targets: vec!["q_proj".into(), "v_proj".into()],
            tensors: ["q_proj", "v_proj"]
                .iter()
                .map(|t| LoraTensor {
                    name: format!("lora.0.{t}"),
                    a: vec![8, 16],
                    b: vec![if *t == "q_proj" { 16 } else { 8 }, 8],
                })
                .collect(),
        }
    }

    /// A PEFT adapter folder as peft writes it: rank `r` factors for `targets` of layer 0.
    fn peft_folder(name: &str, r: usize, targets: &[&str], config: serde_json::Value) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("ssrl-peft-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let mut tensors = Vec::new();
        for t in targets {
            let out = if *t == "q_proj" { 16 } else { 8 };
            for (which, shape) in [('A', vec![r, 16]), ('B', vec![out, r])] {
                let n = shape.iter().product::<usize>();
                tensors.push(NamedTensor {
                    name: peft_key(&format!("lora.0.{t}"), which).unwrap(),
                    data: (0..n).map(|i| (i as f32 * 0.37).sin()).collect(),
                    shape,
                });
            }
        }
        std::fs::write(
            dir.join("adapter_model.safetensors"),
            safetensors_bytes(&tensors, &BTreeMap::new()),
        )
        .unwrap();
        std::fs::write(dir.join("adapter_config.json"), config.to_string()).unwrap();
        dir
    }

    fn config(r: usize, alpha: f64) -> serde_json::Value {
        let mut c = adapter_config(&spec(), "tiny");
        c["r"] = r.into();
        c["lora_alpha"] = alpha.into();
        c
    }

    /// B's ratio to the stored B after loading for the package (A is never touched).
    fn b_ratio(dir: &Path) -> f32 {
        let stored = load_adapter(dir).unwrap();
        let loaded = load_adapter_for(dir, &spec()).unwrap();
        for (s, l) in stored.iter().zip(&loaded) {
            if s.name.ends_with(".A") {
                assert_eq!(s.data, l.data);
            }
        }
        let (s, l) = (&stored[1], &loaded[1]);
        assert!(s.name.ends_with(".B") && s.data[1] != 0.0);
        l.data[1] / s.data[1]
    }

    /// Every kind of LoRA tensor name goes to PEFT's key for Qwen2.5-VL's module path and back
    /// (the older `model.layers` / `visual` paths read too); names of nothing are refused.
    #[test]
    fn peft_keys_cover_the_language_model_and_the_vision_tower() {
        for (name, key) in [
            (
                "lora.3.down_proj",
                "base_model.model.model.language_model.layers.3.mlp.down_proj.lora_B.weight",
            ),
            (
                "lora.visual.0.qkv",
                "base_model.model.model.visual.blocks.0.attn.qkv.lora_B.weight",
            ),
            (
                "lora.visual.31.proj",
                "base_model.model.model.visual.blocks.31.attn.proj.lora_B.weight",
            ),
            (
                "lora.visual.2.up_proj",
                "base_model.model.model.visual.blocks.2.mlp.up_proj.lora_B.weight",
            ),
            (
                "lora.visual.merger.mlp_2",
                "base_model.model.model.visual.merger.mlp.2.lora_B.weight",
            ),
            // Qwen3-VL's
            (
                "lora.visual.1.linear_fc1",
                "base_model.model.model.visual.blocks.1.mlp.linear_fc1.lora_B.weight",
            ),
            (
                "lora.visual.merger.linear_fc2",
                "base_model.model.model.visual.merger.linear_fc2.lora_B.weight",
            ),
            (
                "lora.visual.deepstack_merger_list.2.linear_fc1",
                "base_model.model.model.visual.deepstack_merger_list.2.linear_fc1.lora_B.weight",
            ),
        ] {
            assert_eq!(peft_key(name, 'B').as_deref(), Some(key));
            assert_eq!(package_name(key), Some((name.to_string(), 'B')));
        }
        assert_eq!(
            package_name("base_model.model.visual.merger.mlp.0.lora_A.weight"),
            Some(("lora.visual.merger.mlp_0".into(), 'A'))
        );
        for bad in [
            "lora.visual.merger.mlp_1",
            "lora.visual.x.qkv",
            "lora.visual.0.q_proj",
            "lora.visual.merger.norm",
            "lora.visual.deepstack_merger_list.x.linear_fc1",
        ] {
            assert_eq!(peft_key(bad, 'A'), None, "{bad}");
        }
        assert_eq!(
            package_name("base_model.model.model.visual.merger.norm.lora_A.weight"),
            None
        );
    }

    /// `target_modules` lists names where PEFT's suffix match finds those modules only, and is a
    /// whole-path pattern where the vision tower has modules of the same name (its MLP) or
    /// targets named by position (its attention, the merger).
    #[test]
    fn target_modules_match_the_adapters_modules_only() {
        let t = |v: &[&str]| {
            target_modules(&LoraSpec {
                targets: v.iter().map(|s| s.to_string()).collect(),
                ..spec()
            })
        };
        assert_eq!(
            t(&["q_proj", "v_proj"]),
            serde_json::json!(["q_proj", "v_proj"])
        );
        assert_eq!(
            t(&["q_proj", "gate_proj"]),
            serde_json::json!(r".*\.layers\.\d+\.(self_attn|mlp)\.(q_proj|gate_proj)")
        );
        assert_eq!(
            t(&["v_proj", "visual.qkv", "visual.down_proj", "visual.merger"]),
            serde_json::json!(
                r".*\.layers\.\d+\.(self_attn|mlp)\.(v_proj)|.*visual\.blocks\.\d+\.(attn|mlp)\.(qkv|down_proj)|.*visual\.merger\.mlp\.(0|2)"
            )
        );
        // Qwen3-VL's merger target (its tensors say so): the merger and the DeepStack mergers.
        let qwen3 = LoraSpec {
            targets: vec![
                "q_proj".into(),
                "visual.linear_fc2".into(),
                "visual.merger".into(),
            ],
            tensors: vec![LoraTensor {
                name: "lora.visual.merger.linear_fc1".into(),
                a: vec![8, 16],
                b: vec![16, 8],
            }],
            ..spec()
        };
        assert_eq!(
            target_modules(&qwen3),
            serde_json::json!(
                r".*\.layers\.\d+\.(self_attn|mlp)\.(q_proj)|.*visual\.blocks\.\d+\.(attn|mlp)\.(linear_fc2)|.*visual\.(merger|deepstack_merger_list\.\d+)\.(linear_fc1|linear_fc2)"
            )
        );
    }

    /// The config's `lora_alpha`, `r` and `use_rslora` set the adapter's scale, carried into B
    /// against the package's own (alpha 16 / r 8 = 2).
    #[test]
    fn adapter_config_sets_the_scale() {
        let qv = ["q_proj", "v_proj"];
        let same = peft_folder("same", 8, &qv, config(8, 16.0));
        assert_eq!(b_ratio(&same), 1.0);
        let alpha32 = peft_folder("alpha32", 8, &qv, config(8, 32.0));
        assert_eq!(b_ratio(&alpha32), 2.0);
        // Rank 16 at alpha 16: scale 1, half the package's.
        let rank16 = peft_folder("rank16", 16, &qv, config(16, 16.0));
        assert_eq!(b_ratio(&rank16), 0.5);
        let mut rs = config(8, 16.0);
        rs["use_rslora"] = true.into();
        let rslora = peft_folder("rslora", 8, &qv, rs);
        assert!((b_ratio(&rslora) - (16.0 / 8f32.sqrt()) / 2.0).abs() < 1e-6);
        // A checkpoint of this package loads at its own scale.
        let stored = load_adapter(&same).unwrap();
        for d in [same, alpha32, rank16, rslora] {
            let _ = std::fs::remove_dir_all(d);
        }
        let root = std::env::temp_dir().join(format!("ssrl-peft-ckpt-{}", std::process::id()));
        let state = State {
            step: 3,
            config: "k".into(),
            params: stored.clone(),
            exp_avg: stored.clone(),
            exp_avg_sq: stored.clone(),
            loss_scale: Some(crate::train::scale::LossScale {
                scale: 1024.0,
                good_steps: 7,
            }),
        };
        let dir = save(&root, &state, &spec(), "tiny", 0).unwrap();
        assert_eq!(load_adapter_for(&dir, &spec()).unwrap(), stored);
        // (an fp16 run's loss scale comes back with it)
        assert_eq!(load(&dir).unwrap().loss_scale, state.loss_scale);
        let _ = std::fs::remove_dir_all(root);
    }

    /// What the package's LoRA inputs cannot express is refused, naming the field or tensor.
    #[test]
    fn adapters_that_cannot_be_applied_are_refused() {
        let qv = ["q_proj", "v_proj"];
        let with = |k: &str, v: serde_json::Value| {
            let mut c = config(8, 16.0);
            c[k] = v;
            c
        };
        let cases: Vec<(&str, PathBuf, &str)> = vec![
            (
                "dora",
                peft_folder("dora", 8, &qv, with("use_dora", true.into())),
                "use_dora",
            ),
            (
                "bias",
                peft_folder("bias", 8, &qv, with("bias", "all".into())),
                "bias",
            ),
            (
                "targets",
                peft_folder(
                    "targets",
                    8,
                    &qv,
                    with("target_modules", serde_json::json!(["q_proj", "k_proj"])),
                ),
                "k_proj",
            ),
            (
                "k tensors",
                peft_folder("ktensor", 8, &["q_proj", "k_proj"], config(8, 16.0)),
                "lora.0.k_proj.A",
            ),
            (
                "alpha",
                peft_folder("alpha", 8, &qv, with("lora_alpha", "x".into())),
                "lora_alpha",
            ),
            ("r", peft_folder("r0", 8, &qv, with("r", 0.into())), "r:"),
            (
                "saved",
                peft_folder(
                    "saved",
                    8,
                    &qv,
                    with("modules_to_save", serde_json::json!(["lm_head"])),
                ),
                "modules_to_save",
            ),
            (
                "pattern",
                peft_folder(
                    "pattern",
                    8,
                    &qv,
                    with("rank_pattern", serde_json::json!({"q_proj": 4})),
                ),
                "rank_pattern",
            ),
            (
                "type",
                peft_folder("type", 8, &qv, with("peft_type", "IA3".into())),
                "peft_type",
            ),
        ];
        for (what, dir, needle) in cases {
            let e = load_adapter_for(&dir, &spec()).unwrap_err().to_string();
            assert!(
                e.contains(needle) && e.contains(&dir.display().to_string()),
                "{what}: {e}"
            );
            let _ = std::fs::remove_dir_all(dir);
        }
        // Non-finite weights, naming the tensor.
        let dir = peft_folder("nan", 8, &qv, config(8, 16.0));
        let mut t = load_adapter(&dir).unwrap();
        t[2].data[5] = f32::NAN;
        for x in &mut t {
            x.name = peft_key(
                x.name.rsplit_once('.').unwrap().0,
                x.name.chars().last().unwrap(),
            )
            .unwrap();
        }
        std::fs::write(
            dir.join("adapter_model.safetensors"),
            safetensors_bytes(&t, &BTreeMap::new()),
        )
        .unwrap();
        let e = load_adapter_for(&dir, &spec()).unwrap_err().to_string();
        assert!(
            e.contains("lora.0.v_proj.A") && e.contains("not finite"),
            "{e}"
        );
        // No adapter_config.json: the scale is unknown.
        std::fs::remove_file(dir.join("adapter_config.json")).unwrap();
        let e = load_adapter_for(&dir, &spec()).unwrap_err().to_string();
        assert!(
            e.contains("adapter_config.json") && e.contains("missing"),
            "{e}"
        );
        let _ = std::fs::remove_dir_all(dir);
        // Widths of another model.
        let mut s = spec();
        s.tensors[0].a = vec![8, 32];
        let dir = peft_folder("width", 8, &qv, config(8, 16.0));
        let e = load_adapter_for(&dir, &s).unwrap_err().to_string();
        assert!(
            e.contains("lora.0.q_proj.A") && e.contains("another model"),
            "{e}"
        );
        let _ = std::fs::remove_dir_all(dir);
    }
}
