//! A model package: the folder `models/export.py` writes (ONNX graphs, manifest, configs and
//! tokenizer). Opening it checks the manifest; [`Package::validate`] loads every graph in ONNX
//! Runtime and checks input and output names and element types, naming the file and the input
//! at fault.

use super::session::{environment, RuntimeError};
use ort::value::TensorElementType as T;
use serde::Deserialize;
use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum PackageError {
    #[error("{path}: {msg}")]
    File { path: PathBuf, msg: String },
    #[error("{path}: input `{name}`: {msg}")]
    Input {
        path: PathBuf,
        name: String,
        msg: String,
    },
    #[error("{path}: output `{name}`: {msg}")]
    Output {
        path: PathBuf,
        name: String,
        msg: String,
    },
    #[error(transparent)]
    Runtime(#[from] RuntimeError),
}

#[derive(Debug, Clone, Deserialize)]
pub struct Graphs {
    pub vision: String,
    pub embedding: String,
    pub decoder: String,
    pub logprobs: String,
    pub train: String,
}

/// The training graph's batch inputs, in order, and its loss statistics.
#[derive(Debug, Clone, Deserialize)]
pub struct TrainSpec {
    pub inputs: Vec<String>,
    pub stats: Vec<String>,
}

/// `train.onnx` batch inputs and their element types (the contract `models/export.py` writes).
pub const TRAIN_INPUTS: [(&str, T); 14] = [
    ("inputs_embeds", T::Float32),
    ("attention_mask", T::Int64),
    ("position_ids", T::Int64),
    ("target_ids", T::Int64),
    ("completion_mask", T::Float32),
    ("old_logprobs", T::Float32),
    ("ref_logprobs", T::Float32),
    ("advantages", T::Float32),
    ("temperature", T::Float32),
    ("clip_ratio_low", T::Float32),
    ("clip_ratio_high", T::Float32),
    ("clip_ratio_dual", T::Float32),
    ("kl_coef", T::Float32),
    ("token_count", T::Float32),
];

#[derive(Debug, Clone, Deserialize)]
pub struct TextSpec {
    pub hidden_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_key_value_heads: usize,
    pub head_dim: usize,
    pub vocab_size: usize,
    pub mrope_section: Vec<usize>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct VisionSpec {
    pub out_hidden_size: usize,
    pub spatial_merge_size: u32,
    pub patch_size: u32,
    pub temporal_patch_size: u32,
    pub tokens_per_second: f32,
    pub window_size: u32,
}

#[derive(Debug, Clone, Deserialize)]
pub struct TokenSpec {
    pub image: u32,
    pub video: u32,
    pub vision_start: u32,
    pub vision_end: u32,
    pub eos: Vec<u32>,
    pub pad: u32,
}

#[derive(Debug, Clone, Deserialize)]
pub struct LoraTensor {
    pub name: String,
    #[serde(rename = "A")]
    pub a: Vec<usize>,
    #[serde(rename = "B")]
    pub b: Vec<usize>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct LoraSpec {
    pub rank: usize,
    pub alpha: f64,
    pub scale: f64,
    pub targets: Vec<String>,
    pub tensors: Vec<LoraTensor>,
}

/// `manifest.json`.
#[derive(Debug, Clone, Deserialize)]
pub struct Manifest {
    pub format: String,
    pub version: u32,
    pub dtype: String,
    pub graphs: Graphs,
    pub train: TrainSpec,
    pub text: TextSpec,
    pub vision: VisionSpec,
    pub tokens: TokenSpec,
    pub lora: LoraSpec,
}

#[derive(Debug, Clone)]
pub struct Package {
    pub dir: PathBuf,
    pub manifest: Manifest,
}

/// Expected `(name, element type)` lists of one graph.
pub struct Signature {
    pub inputs: Vec<(String, T)>,
    pub outputs: Vec<(String, T)>,
}

impl Package {
    pub fn open(dir: &Path) -> Result<Package, PackageError> {
        let path = dir.join("manifest.json");
        if !path.exists() && dir.join("genai_config.json").is_file() {
            return Err(PackageError::File {
                path: dir.join("genai_config.json"),
                msg: "an onnxruntime-genai folder without manifest.json: its decoder keeps a shared, \
                      right-padded KV buffer (GroupQueryAttention) that this runtime does not drive yet; \
                      export a package from the Hugging Face checkpoint with models/export.py"
                    .into(),
            });
        }
        let text = std::fs::read_to_string(&path).map_err(|e| PackageError::File {
            path: path.clone(),
            msg: format!("cannot read the package manifest ({e}); is {} a model package from models/export.py?", dir.display()),
        })?;
        let manifest: Manifest = serde_json::from_str(&text).map_err(|e| PackageError::File {
            path: path.clone(),
            msg: format!("invalid manifest: {e}"),
        })?;
        if manifest.format != "spatial-ssrl-package" {
            return Err(PackageError::File {
                path,
                msg: format!(
                    "format is {:?}, expected \"spatial-ssrl-package\"",
                    manifest.format
                ),
            });
        }
        let contract: Vec<&str> = TRAIN_INPUTS.iter().map(|(n, _)| *n).collect();
        if manifest.train.inputs != contract {
            return Err(PackageError::File {
                path,
                msg: format!(
                    "train inputs {:?} differ from this runtime's contract {contract:?}",
                    manifest.train.inputs
                ),
            });
        }
        let g = &manifest.graphs;
        for g in [&g.vision, &g.embedding, &g.decoder, &g.logprobs, &g.train] {
            let p = dir.join(g);
            if !p.is_file() {
                return Err(PackageError::File {
                    path: p,
                    msg: "graph named in manifest.json is missing".into(),
                });
            }
        }
        Ok(Package {
            dir: dir.to_path_buf(),
            manifest,
        })
    }

    pub fn graph_path(&self, file: &str) -> PathBuf {
        self.dir.join(file)
    }

    /// The I/O contract of each graph, from the manifest.
    pub fn signatures(&self) -> Vec<(String, Signature)> {
        let m = &self.manifest;
        let s = |v: &[(&str, T)]| {
            v.iter()
                .map(|(n, t)| (n.to_string(), *t))
                .collect::<Vec<_>>()
        };
        let mut dec_in = s(&[
            ("inputs_embeds", T::Float32),
            ("attention_mask", T::Int64),
            ("position_ids", T::Int64),
        ]);
        let mut dec_out = s(&[("logits", T::Float32)]);
        for i in 0..m.text.num_hidden_layers {
            for kv in ["key", "value"] {
                dec_in.push((format!("past_key_values.{i}.{kv}"), T::Float32));
                dec_out.push((format!("present.{i}.{kv}"), T::Float32));
            }
        }
        let lora: Vec<(String, T)> = m
            .lora
            .tensors
            .iter()
            .flat_map(|t| {
                [
                    (format!("{}.A", t.name), T::Float32),
                    (format!("{}.B", t.name), T::Float32),
                ]
            })
            .collect();
        dec_in.extend(lora.iter().cloned());
        let mut lp_in = s(&[
            ("inputs_embeds", T::Float32),
            ("attention_mask", T::Int64),
            ("position_ids", T::Int64),
            ("target_ids", T::Int64),
            ("temperature", T::Float32),
        ]);
        lp_in.extend(lora.iter().cloned());
        let mut train_in = s(&TRAIN_INPUTS);
        train_in.extend(lora.iter().cloned());
        let mut train_out = s(&[("loss", T::Float32), ("token_logprobs", T::Float32)]);
        train_out.extend(lora.iter().map(|(n, t)| (format!("grad.{n}"), *t)));
        train_out.push(("stats".into(), T::Float32));
        vec![
            (
                m.graphs.vision.clone(),
                Signature {
                    inputs: s(&[("pixel_values", T::Float32), ("image_grid_thw", T::Int64)]),
                    outputs: s(&[("image_features", T::Float32)]),
                },
            ),
            (
                m.graphs.embedding.clone(),
                Signature {
                    inputs: s(&[("input_ids", T::Int64), ("image_features", T::Float32)]),
                    outputs: s(&[("inputs_embeds", T::Float32)]),
                },
            ),
            (
                m.graphs.decoder.clone(),
                Signature {
                    inputs: dec_in,
                    outputs: dec_out,
                },
            ),
            (
                m.graphs.logprobs.clone(),
                Signature {
                    inputs: lp_in,
                    outputs: s(&[
                        ("token_logprobs", T::Float32),
                        ("token_entropy", T::Float32),
                    ]),
                },
            ),
            (
                m.graphs.train.clone(),
                Signature {
                    inputs: train_in,
                    outputs: train_out,
                },
            ),
        ]
    }

    /// Loads every graph and checks its inputs and outputs against the contract.
    pub fn validate(&self, ort_lib: Option<&Path>) -> Result<(), PackageError> {
        let env = environment(ort_lib)?;
        for (file, sig) in self.signatures() {
            let path = self.graph_path(&file);
            let fe = |msg: String| PackageError::File {
                path: path.clone(),
                msg,
            };
            let session = ort::session::Session::builder(env)
                .map_err(|e| fe(e.to_string()))?
                .commit_from_file(&path)
                .map_err(|e| fe(format!("ONNX Runtime cannot load it: {e}")))?;
            // LoRA inputs may carry a default (zero) value: ONNX Runtime lists them as overridable
            // initializers rather than inputs; both are fed by name.
            let overridable = session.overridable_initializers();
            for (name, ty) in &sig.inputs {
                let dtype = match session.inputs().iter().find(|o| o.name() == name) {
                    Some(i) => i.dtype().clone(),
                    None => match overridable.iter().find(|o| o.name() == name) {
                        Some(o) => o.dtype().clone(),
                        None => {
                            return Err(PackageError::Input {
                                path,
                                name: name.clone(),
                                msg: "missing".into(),
                            })
                        }
                    },
                };
                if dtype.tensor_type() != Some(*ty) {
                    return Err(PackageError::Input {
                        path,
                        name: name.clone(),
                        msg: format!("type {dtype:?}, expected tensor of {ty:?}"),
                    });
                }
            }
            if let Some(extra) = session
                .inputs()
                .iter()
                .find(|i| !sig.inputs.iter().any(|(n, _)| n == i.name()))
            {
                return Err(PackageError::Input {
                    path,
                    name: extra.name().to_string(),
                    msg: "not part of the package contract".into(),
                });
            }
            for (name, ty) in &sig.outputs {
                let Some(o) = session.outputs().iter().find(|o| o.name() == name) else {
                    return Err(PackageError::Output {
                        path,
                        name: name.clone(),
                        msg: "missing".into(),
                    });
                };
                if o.dtype().tensor_type() != Some(*ty) {
                    return Err(PackageError::Output {
                        path,
                        name: name.clone(),
                        msg: format!("type {:?}, expected tensor of {ty:?}", o.dtype()),
                    });
                }
            }
        }
        Ok(())
    }
}
