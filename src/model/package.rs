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
    #[error("{}: cannot read", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{}: {what}", path.display())]
    Json {
        path: PathBuf,
        what: &'static str,
        #[source]
        source: serde_json::Error,
    },
    #[error("{}: ONNX Runtime", path.display())]
    Ort {
        path: PathBuf,
        #[source]
        source: ort::Error,
    },
    /// The shared weights could not serve a graph's.
    #[error(transparent)]
    Weights(#[from] super::weights::WeightsError),
    /// A graph ONNX Runtime cannot load, with what to do about it where its error says
    /// ([`kernel_hint`](super::session::kernel_hint)).
    #[error("{}: ONNX Runtime cannot load it{hint}", path.display())]
    Load {
        path: PathBuf,
        hint: &'static str,
        #[source]
        source: ort::Error,
    },
}

impl PackageError {
    /// ONNX Runtime's error loading the graph at `path` on `provider`, with what to do about it
    /// where the error says ([`kernel_hint`](super::session::kernel_hint)).
    pub fn load(path: &Path, provider: &str, source: ort::Error) -> PackageError {
        PackageError::Load {
            path: path.to_path_buf(),
            hint: super::session::kernel_hint(source.message(), provider),
            source,
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
pub struct Graphs {
    pub vision: String,
    pub embedding: String,
    pub decoder: String,
    /// The log-prob and training graphs ("" in packages without them: onnxruntime-genai
    /// folders, Qwen3-VL packages so far).
    #[serde(default)]
    pub logprobs: String,
    #[serde(default)]
    pub train: String,
    /// The SFT cold start's training graph; "" in packages exported before it.
    #[serde(default)]
    pub sft: String,
    /// The vision tower's backward pass for its LoRA (packages with vision-tower LoRA targets;
    /// "" otherwise): pixel rows, grids, the loss's gradient at the image features → the vision
    /// LoRA gradients.
    #[serde(default)]
    pub vision_grad: String,
}

/// `sft.onnx`'s batch inputs, in order, and its statistics.
#[derive(Debug, Clone, Deserialize)]
pub struct SftSpec {
    pub inputs: Vec<String>,
    pub stats: Vec<String>,
}

/// `sft.onnx` batch inputs and their element types; `inputs_embeds` is of the package's
/// activation type, as in [`TRAIN_INPUTS`].
pub const SFT_INPUTS: [(&str, T); 7] = [
    ("inputs_embeds", T::Float32),
    ("attention_mask", T::Int64),
    ("position_ids", T::Int64),
    ("target_ids", T::Int64),
    ("loss_mask", T::Float32),
    ("token_count", T::Float32),
    ("loss_scale", T::Float32),
];

/// The training graph's batch inputs, in order, and its loss statistics.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct TrainSpec {
    pub inputs: Vec<String>,
    pub stats: Vec<String>,
    /// Which columns `target_ids`, `completion_mask`, the old / reference log-probs and the
    /// log-prob outputs of `logprobs.onnx` and `train.onnx` cover.
    #[serde(default)]
    pub positions: Positions,
    /// The chunks of positions the vocabulary head runs over, one after another (`None`:
    /// packages exported before the chunked head, which take every position at once).
    #[serde(default)]
    pub head_chunks: Option<u32>,
    /// The chunks of queries each layer's attention runs over in these graphs, one after
    /// another (`None`: packages exported before the chunked attention, every query at once).
    #[serde(default)]
    pub attention_chunks: Option<u32>,
}

/// [`TrainSpec::positions`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Positions {
    /// Every column of the rows (packages exported before the memory-lean graphs).
    #[default]
    All,
    /// The last C columns: the completion's predictions only.
    Completion,
}

/// `train.onnx` batch inputs and their element types (the contract `models/export.py` writes);
/// `inputs_embeds` is of the package's activation type ([`Package::activation_type`]).
pub const TRAIN_INPUTS: [(&str, T); 16] = [
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
    ("rollout_is_weights", T::Float32),
    ("loss_scale", T::Float32),
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
    /// DeepStack (Qwen3-VL): how many vision blocks' merged features vision.onnx also gives
    /// (`deepstack_features` [K, tokens, D]) and the decoder adds to its first K layers' hidden
    /// states at the image positions (`visual_mask`); 0 for Qwen2.5-VL.
    #[serde(default)]
    pub deepstack_layers: usize,
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
    /// The language model's targets (`q_proj` …) and the vision tower's (`visual.qkv` …).
    pub targets: Vec<String>,
    pub tensors: Vec<LoraTensor>,
}

impl LoraTensor {
    /// A vision-tower tensor (`lora.visual.{block}.{target}`, the mergers'
    /// `lora.visual.merger.…` and Qwen3-VL's `lora.visual.deepstack_merger_list.{k}.…`):
    /// an input of the vision graphs; the others are the language model's graphs'.
    pub fn is_vision(&self) -> bool {
        is_vision_name(&self.name)
    }
}

/// Whether a LoRA tensor name (with or without its `.A` / `.B`) is the vision tower's.
pub fn is_vision_name(name: &str) -> bool {
    name.starts_with("lora.visual.")
}

impl LoraSpec {
    /// The language model's tensors (the decoder's, log-prob and training graphs' inputs).
    pub fn text(&self) -> impl Iterator<Item = &LoraTensor> {
        self.tensors.iter().filter(|t| !t.is_vision())
    }
    /// The vision tower's tensors (vision.onnx's and vision_grad.onnx's inputs).
    pub fn vision(&self) -> impl Iterator<Item = &LoraTensor> {
        self.tensors.iter().filter(|t| t.is_vision())
    }
    pub fn has_vision(&self) -> bool {
        self.vision().next().is_some()
    }
}

/// How the decoder keeps its cache. `Append`: the graph concatenates past and new keys, so
/// prompts are left-padded and every row grows at the end (onnxruntime-genai's standard-op
/// graphs, older packages). `Shared`: as `Append` for each row's own tokens, while the prompt's
/// cache is a separate input that all samples of the prompt read in place (`prefix_key_values`,
/// `prefix_mask`, `slot_rows`, `row_slots`; this project's graphs): no step copies or fans out
/// the prompt's cache. `Packed`: GroupQueryAttention (onnxruntime-genai's builder) keeps each
/// row's tokens from position 0 and writes the next one at the row's own length, so prompts are
/// right-padded.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum KvLayout {
    #[default]
    Append,
    Shared,
    Packed,
}

/// Where a [`KvLayout::Shared`] decoder keeps the rows' own tokens. `Append`: in `past` /
/// `present`, so each step's `present` is a new tensor holding all of them (a copy that grows
/// with the tokens so far). `InPlace`: in a buffer the runtime keeps and feeds as
/// `own_key_values.{i}.key/value` `[rows, kv_heads, capacity, head_dim]` with `own_mask`
/// `[rows, capacity]` marking the written slots; `present` is then only `past` (which the
/// runtime keeps short) and the step's new keys and values, and the runtime moves tokens into
/// the buffer itself (packages from models/export.py).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OwnCache {
    #[default]
    Append,
    InPlace,
}

pub use super::family::Family;

/// `manifest.json`.
#[derive(Debug, Clone, Deserialize)]
pub struct Manifest {
    pub format: String,
    pub version: u32,
    /// The model family (packages exported before it had one are Qwen2.5-VL's); another one is
    /// refused by name.
    #[serde(default)]
    pub family: Family,
    pub dtype: String,
    pub graphs: Graphs,
    /// The training graph's contract (a package without training graphs has the default).
    #[serde(default)]
    pub train: TrainSpec,
    /// `sft.onnx`'s contract (packages exported before it have none).
    #[serde(default)]
    pub sft: Option<SftSpec>,
    pub text: TextSpec,
    pub vision: VisionSpec,
    pub tokens: TokenSpec,
    pub lora: LoraSpec,
    #[serde(default)]
    pub kv_layout: KvLayout,
    #[serde(default)]
    pub own_cache: OwnCache,
}

impl Manifest {
    /// The host-side M-RoPE settings, as the package's family reads them.
    pub fn rope(&self) -> crate::model::rope::RopeConfig {
        self.family.rope(self)
    }
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

/// `mrope_section` of a Hugging Face Qwen2.5-VL `config.json` (either transformers layout).
fn hf_mrope_section(c: &serde_json::Value) -> Option<Vec<usize>> {
    for path in [
        ["text_config", "rope_parameters"],
        ["text_config", "rope_scaling"],
        ["rope_scaling", ""],
    ] {
        let mut v = &c[path[0]];
        if !path[1].is_empty() {
            v = &v[path[1]];
        }
        if let Some(a) = v["mrope_section"].as_array() {
            return Some(
                a.iter()
                    .filter_map(|x| x.as_u64())
                    .map(|x| x as usize)
                    .collect(),
            );
        }
    }
    None
}

impl Package {
    pub fn open(dir: &Path) -> Result<Package, PackageError> {
        let path = dir.join("manifest.json");
        if !path.exists() && dir.join("genai_config.json").is_file() {
            return Package::from_genai(dir);
        }
        let text = std::fs::read_to_string(&path).map_err(|e| PackageError::File {
            path: path.clone(),
            msg: format!(
                "cannot read the package manifest ({e}); is {} a model package from \
                 models/export.py, or an onnxruntime-genai folder (genai_config.json)?",
                dir.display()
            ),
        })?;
        let manifest: Manifest =
            serde_json::from_str(&text).map_err(|source| PackageError::Json {
                path: path.clone(),
                what: "invalid manifest",
                source,
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
        // (a package without a training graph has no training contract to check)
        if !manifest.graphs.train.is_empty() && manifest.train.inputs != contract {
            return Err(PackageError::File {
                path,
                msg: format!(
                    "train inputs {:?} differ from this runtime's contract {contract:?} (a \
                     package from another version of models/export.py: export it again)",
                    manifest.train.inputs
                ),
            });
        }
        if let Some(sft) = &manifest.sft {
            let contract: Vec<&str> = SFT_INPUTS.iter().map(|(n, _)| *n).collect();
            if sft.inputs != contract {
                return Err(PackageError::File {
                    path,
                    msg: format!(
                        "sft inputs {:?} differ from this runtime's contract {contract:?} (a \
                         package from another version of models/export.py: export it again)",
                        sft.inputs
                    ),
                });
            }
        }
        if !["fp32", "fp16", "bf16"].contains(&manifest.dtype.as_str()) {
            return Err(PackageError::File {
                path,
                msg: format!(
                    "dtype is {:?}; this runtime knows fp32, fp16 and bf16",
                    manifest.dtype
                ),
            });
        }
        let g = &manifest.graphs;
        // (the log-prob, training and SFT graphs and the vision tower's backward where named)
        let optional = [&g.logprobs, &g.train, &g.sft, &g.vision_grad]
            .into_iter()
            .filter(|f| !f.is_empty());
        for g in [&g.vision, &g.embedding, &g.decoder]
            .into_iter()
            .chain(optional)
        {
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

    /// A plain onnxruntime-genai Qwen2.5-VL folder (`genai_config.json` with vision, embedding
    /// and decoder sections): rollouts and evaluation only, no LoRA, no log-prob or training
    /// graph. The manifest is read off the config; I/O names must be the standard ones.
    pub fn from_genai(dir: &Path) -> Result<Package, PackageError> {
        let path = dir.join("genai_config.json");
        let bad = |msg: String| PackageError::File {
            path: path.clone(),
            msg,
        };
        let text = std::fs::read_to_string(&path).map_err(|source| PackageError::Read {
            path: path.clone(),
            source,
        })?;
        let cfg: serde_json::Value =
            serde_json::from_str(&text).map_err(|source| PackageError::Json {
                path: path.clone(),
                what: "not JSON",
                source,
            })?;
        let model = &cfg["model"];
        if model["type"] != "qwen2_5_vl" {
            return Err(bad(format!(
                "model type {}: only Qwen2.5-VL (\"qwen2_5_vl\") folders are supported",
                model["type"]
            )));
        }
        let num = |v: &serde_json::Value, key: &str| -> Result<u64, PackageError> {
            v[key]
                .as_u64()
                .ok_or_else(|| bad(format!("missing or non-integer `{key}`")))
        };
        let (dec, emb, vis) = (&model["decoder"], &model["embedding"], &model["vision"]);
        for (section, v) in [("decoder", dec), ("embedding", emb), ("vision", vis)] {
            if !v.is_object() {
                return Err(bad(format!(
                    "no `model.{section}` section: rollouts need the vision, embedding and decoder graphs"
                )));
            }
        }
        let file = |v: &serde_json::Value, section: &str| -> Result<String, PackageError> {
            v["filename"]
                .as_str()
                .map(str::to_string)
                .ok_or_else(|| bad(format!("no `model.{section}.filename`")))
        };
        // The graphs must use the standard I/O names this runtime feeds.
        let names = [
            (dec, "inputs", "inputs_embeds", "inputs_embeds"),
            (dec, "inputs", "attention_mask", "attention_mask"),
            (dec, "inputs", "position_ids", "position_ids"),
            (dec, "inputs", "past_key_names", "past_key_values.%d.key"),
            (
                dec,
                "inputs",
                "past_value_names",
                "past_key_values.%d.value",
            ),
            (dec, "outputs", "logits", "logits"),
            (dec, "outputs", "present_key_names", "present.%d.key"),
            (dec, "outputs", "present_value_names", "present.%d.value"),
            (emb, "inputs", "input_ids", "input_ids"),
            (emb, "inputs", "image_features", "image_features"),
            (emb, "outputs", "inputs_embeds", "inputs_embeds"),
            (vis, "inputs", "pixel_values", "pixel_values"),
            (vis, "inputs", "image_grid_thw", "image_grid_thw"),
            (vis, "outputs", "image_features", "image_features"),
        ];
        for (v, io, key, want) in names {
            if let Some(got) = v[io][key].as_str() {
                if got != want {
                    return Err(bad(format!(
                        "{io}.{key} is {got:?}; this runtime feeds {want:?}"
                    )));
                }
            }
        }
        let decoder = file(dec, "decoder")?;
        let bytes = std::fs::read(dir.join(&decoder)).map_err(|source| PackageError::Read {
            path: dir.join(&decoder),
            source,
        })?;
        let gqa = bytes
            .windows(b"GroupQueryAttention".len())
            .any(|w| w == b"GroupQueryAttention");
        // The builder's precision, as the decoder takes its embeddings (the engine reads every
        // graph's types again when it loads them).
        let dtype = match super::onnx_edit::input_elem_type(&bytes, "inputs_embeds") {
            Some(10) => "fp16",
            Some(16) => "bf16",
            _ => "fp32",
        };
        let hidden = num(dec, "hidden_size")? as usize;
        let heads = num(dec, "num_attention_heads")? as usize;
        let eos: Vec<u32> = match &model["eos_token_id"] {
            serde_json::Value::Array(a) => a
                .iter()
                .filter_map(|x| x.as_u64())
                .map(|x| x as u32)
                .collect(),
            v => v.as_u64().map(|x| vec![x as u32]).unwrap_or_default(),
        };
        let vision_start = num(model, "vision_start_token_id")? as u32;
        let hf: serde_json::Value = std::fs::read(dir.join("config.json"))
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .unwrap_or_default();
        let vision_end = hf["vision_end_token_id"]
            .as_u64()
            .map_or(vision_start + 1, |v| v as u32);
        let manifest = Manifest {
            format: "onnxruntime-genai".into(),
            version: 1,
            family: Family::QWEN2_5_VL,
            dtype: dtype.into(),
            graphs: Graphs {
                vision: file(vis, "vision")?,
                embedding: file(emb, "embedding")?,
                decoder,
                logprobs: String::new(),
                train: String::new(),
                sft: String::new(),
                vision_grad: String::new(),
            },
            train: TrainSpec {
                inputs: vec![],
                stats: vec![],
                positions: Positions::All,
                head_chunks: None,
                attention_chunks: None,
            },
            sft: None,
            text: TextSpec {
                hidden_size: hidden,
                num_hidden_layers: num(dec, "num_hidden_layers")? as usize,
                num_attention_heads: heads,
                num_key_value_heads: num(dec, "num_key_value_heads")? as usize,
                head_dim: dec["head_size"]
                    .as_u64()
                    .map_or(hidden / heads.max(1), |v| v as usize),
                vocab_size: num(model, "vocab_size")? as usize,
                // The split of the rotary dimensions (informational: the graphs apply it), from
                // the Hugging Face config.json when the folder has one.
                mrope_section: hf_mrope_section(&hf).unwrap_or_else(|| vec![16, 24, 24]),
            },
            vision: VisionSpec {
                out_hidden_size: hidden,
                spatial_merge_size: num(vis, "spatial_merge_size")? as u32,
                patch_size: vis["patch_size"].as_u64().unwrap_or(14) as u32,
                temporal_patch_size: 2,
                tokens_per_second: vis["tokens_per_second"].as_f64().unwrap_or(2.0) as f32,
                window_size: vis["window_size"].as_u64().unwrap_or(112) as u32,
                deepstack_layers: 0,
            },
            tokens: TokenSpec {
                image: num(model, "image_token_id")? as u32,
                video: num(model, "video_token_id")? as u32,
                vision_start,
                vision_end,
                pad: num(model, "pad_token_id")? as u32,
                eos,
            },
            lora: LoraSpec {
                rank: 0,
                alpha: 0.0,
                scale: 0.0,
                targets: vec![],
                tensors: vec![],
            },
            kv_layout: if gqa {
                KvLayout::Packed
            } else {
                KvLayout::Append
            },
            own_cache: OwnCache::Append,
        };
        let g = &manifest.graphs;
        for g in [&g.vision, &g.embedding, &g.decoder] {
            if !dir.join(g).is_file() {
                return Err(bad(format!(
                    "graph {g} named in genai_config.json is missing"
                )));
            }
        }
        Ok(Package {
            dir: dir.to_path_buf(),
            manifest,
        })
    }

    /// A folder read from `genai_config.json` has no log-prob or training graph.
    pub fn is_genai(&self) -> bool {
        self.manifest.format == "onnxruntime-genai"
    }

    pub fn graph_path(&self, file: &str) -> PathBuf {
        self.dir.join(file)
    }

    /// The element type of the package's activations — image features, embeddings, the KV
    /// cache — at the graphs' edges: half for a package exported with `--dtype fp16|bf16`
    /// (whose graphs compute in half, as transformers does in that dtype), fp32 otherwise.
    /// Logits, log-probs, LoRA tensors and their gradients are fp32 in every package.
    pub fn activation_type(&self) -> T {
        match self.manifest.dtype.as_str() {
            "fp16" => T::Float16,
            "bf16" => T::Bfloat16,
            _ => T::Float32,
        }
    }

    /// The I/O contract of each graph, from the manifest.
    pub fn signatures(&self) -> Vec<(String, Signature)> {
        let m = &self.manifest;
        let act = self.activation_type();
        let s = |v: &[(&str, T)]| {
            v.iter()
                .map(|(n, t)| (n.to_string(), *t))
                .collect::<Vec<_>>()
        };
        let mut dec_in = s(&[
            ("inputs_embeds", act),
            ("attention_mask", T::Int64),
            ("position_ids", T::Int64),
        ]);
        let mut dec_out = s(&[("logits", T::Float32)]);
        for i in 0..m.text.num_hidden_layers {
            for kv in ["key", "value"] {
                dec_in.push((format!("past_key_values.{i}.{kv}"), act));
                dec_out.push((format!("present.{i}.{kv}"), act));
            }
        }
        if m.kv_layout == KvLayout::Shared {
            for i in 0..m.text.num_hidden_layers {
                for kv in ["key", "value"] {
                    dec_in.push((format!("prefix_key_values.{i}.{kv}"), act));
                }
            }
            dec_in.extend(s(&[
                ("prefix_mask", T::Int64),
                ("slot_rows", T::Int64),
                ("row_slots", T::Int64),
            ]));
            if m.own_cache == OwnCache::InPlace {
                for i in 0..m.text.num_hidden_layers {
                    for kv in ["key", "value"] {
                        dec_in.push((format!("own_key_values.{i}.{kv}"), act));
                    }
                }
                dec_in.push(("own_mask".into(), T::Int64));
            }
        }
        let inputs_of = |ts: &mut dyn Iterator<Item = &LoraTensor>| -> Vec<(String, T)> {
            ts.flat_map(|t| {
                [
                    (format!("{}.A", t.name), T::Float32),
                    (format!("{}.B", t.name), T::Float32),
                ]
            })
            .collect()
        };
        let lora = inputs_of(&mut m.lora.text());
        let vision_lora = inputs_of(&mut m.lora.vision());
        // With vision-tower LoRA the training graphs also give the (scaled) loss's gradient at
        // the input embeddings (and a DeepStack package's at its DeepStack features), which the
        // trainer takes through vision_grad.onnx.
        let deepstack = m.vision.deepstack_layers > 0;
        let embeds_grad: Vec<(String, T)> = match (vision_lora.is_empty(), deepstack) {
            (true, _) => vec![],
            (false, false) => vec![("grad.inputs_embeds".into(), T::Float32)],
            (false, true) => s(&[
                ("grad.inputs_embeds", T::Float32),
                ("grad.deepstack_features", T::Float32),
            ]),
        };
        dec_in.extend(lora.iter().cloned());
        let mut lp_in = s(&[
            ("inputs_embeds", act),
            ("attention_mask", T::Int64),
            ("position_ids", T::Int64),
            ("target_ids", T::Int64),
            ("temperature", T::Float32),
        ]);
        lp_in.extend(lora.iter().cloned());
        let mut train_in = s(&TRAIN_INPUTS);
        train_in[0].1 = act;
        train_in.extend(lora.iter().cloned());
        let mut train_out = s(&[("loss", T::Float32), ("token_logprobs", T::Float32)]);
        train_out.extend(lora.iter().map(|(n, t)| (format!("grad.{n}"), *t)));
        train_out.push(("stats".into(), T::Float32));
        train_out.extend(embeds_grad.iter().cloned());
        let mut sft_in = s(&SFT_INPUTS);
        sft_in[0].1 = act;
        sft_in.extend(lora.iter().cloned());
        let mut sft_out = s(&[("loss", T::Float32)]);
        sft_out.extend(lora.iter().map(|(n, t)| (format!("grad.{n}"), *t)));
        sft_out.push(("stats".into(), T::Float32));
        sft_out.extend(embeds_grad.iter().cloned());
        if deepstack {
            // (the DeepStack inputs follow the LoRA inputs in every language-model graph)
            let deep = s(&[("deepstack_features", act), ("visual_mask", T::Int64)]);
            for inputs in [&mut dec_in, &mut lp_in, &mut train_in, &mut sft_in] {
                inputs.extend(deep.iter().cloned());
            }
        }
        let mut vision_out = s(&[("image_features", act)]);
        if deepstack {
            vision_out.push(("deepstack_features".into(), act));
        }
        let mut vision_in = s(&[("pixel_values", T::Float32), ("image_grid_thw", T::Int64)]);
        vision_in.extend(vision_lora.iter().cloned());
        let mut vgrad_in = s(&[
            ("pixel_values", T::Float32),
            ("image_grid_thw", T::Int64),
            ("grad_features", T::Float32),
            ("loss_scale", T::Float32),
        ]);
        if deepstack {
            vgrad_in.push(("grad_deepstack".into(), T::Float32));
        }
        vgrad_in.extend(vision_lora.iter().cloned());
        let vgrad_out = vision_lora
            .iter()
            .map(|(n, t)| (format!("grad.{n}"), *t))
            .collect();
        vec![
            (
                m.graphs.vision.clone(),
                Signature {
                    inputs: vision_in,
                    outputs: vision_out,
                },
            ),
            (
                m.graphs.embedding.clone(),
                Signature {
                    inputs: s(&[("input_ids", T::Int64), ("image_features", act)]),
                    outputs: s(&[("inputs_embeds", act)]),
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
            (
                m.graphs.sft.clone(),
                Signature {
                    inputs: sft_in,
                    outputs: sft_out,
                },
            ),
            (
                m.graphs.vision_grad.clone(),
                Signature {
                    inputs: vgrad_in,
                    outputs: vgrad_out,
                },
            ),
        ]
        .into_iter()
        // An onnxruntime-genai folder has no log-prob or training graph.
        .filter(|(file, _)| !file.is_empty())
        .collect()
    }

    /// The model's context length, prompt and generated tokens together: an onnxruntime-genai
    /// folder's `model.context_length`, else `max_position_embeddings` of its `config.json`
    /// (transformers' 4.x or 5.x layout); `None` where neither says.
    pub fn context_length(&self) -> Option<usize> {
        let read = |f: &str| -> Option<serde_json::Value> {
            serde_json::from_slice(&std::fs::read(self.dir.join(f)).ok()?).ok()
        };
        let genai = read("genai_config.json").and_then(|c| c["model"]["context_length"].as_u64());
        let hf = read("config.json").and_then(|c| {
            let t = &c["text_config"]["max_position_embeddings"];
            t.as_u64().or(c["max_position_embeddings"].as_u64())
        });
        genai.or(hf).map(|n| n as usize)
    }

    /// Loads every graph and checks its inputs and outputs against the contract.
    pub fn validate(&self, ort_lib: Option<&Path>) -> Result<(), PackageError> {
        let env = environment(ort_lib)?;
        for (file, _) in self.signatures() {
            let path = self.graph_path(&file);
            super::weights::check_external_data(&path)?;
            let session = ort::session::Session::builder(env)
                .map_err(|source| PackageError::Ort {
                    path: path.clone(),
                    source,
                })?
                .commit_from_file(&path)
                .map_err(|source| PackageError::load(&path, "cpu", source))?;
            self.check_graph(&file, &session)?;
        }
        Ok(())
    }

    /// The sizes graph `file`'s inputs and outputs must have where the graph fixes them:
    /// `(name, axis, size, the manifest field that gives it)`. A manifest that disagrees with
    /// its graphs would otherwise index past the end of a tensor in the middle of a rollout.
    fn sizes(&self, file: &str) -> Vec<(String, usize, usize, String)> {
        let (m, g) = (&self.manifest, &self.manifest.graphs);
        let (t, v) = (&m.text, &m.vision);
        let dim =
            |name: &str, axis, size, field: &str| (name.to_string(), axis, size, field.to_string());
        let mut d = Vec::new();
        // The vision graph's output is the embedding graph's input; every graph but the vision
        // graph has the text width on its embeddings' last axis.
        if file == g.vision || file == g.embedding {
            d.push(dim(
                "image_features",
                1,
                v.out_hidden_size,
                "vision.out_hidden_size",
            ));
        }
        if file != g.vision {
            d.push(dim("inputs_embeds", 2, t.hidden_size, "text.hidden_size"));
        }
        if file == g.decoder {
            d.push(dim("logits", 2, t.vocab_size, "text.vocab_size"));
            for i in 0..t.num_hidden_layers {
                for kv in ["past_key_values", "present"] {
                    for part in ["key", "value"] {
                        let n = format!("{kv}.{i}.{part}");
                        d.push(dim(
                            &n,
                            1,
                            t.num_key_value_heads,
                            "text.num_key_value_heads",
                        ));
                        d.push(dim(&n, 3, t.head_dim, "text.head_dim"));
                    }
                }
            }
        }
        if file != g.vision && file != g.embedding {
            for l in &m.lora.tensors {
                for (which, shape) in [("A", &l.a), ("B", &l.b)] {
                    for (axis, &size) in shape.iter().enumerate() {
                        let field = format!("lora.tensors[{}].{which}", l.name);
                        d.push(dim(&format!("{}.{which}", l.name), axis, size, &field));
                    }
                }
            }
        }
        d
    }

    /// Checks the inputs and outputs of graph `file`, loaded as `session`, against the contract:
    /// the first name missing, extra or of another type, or of another size than
    /// `manifest.json` gives where the graph fixes it, is the error, naming the file.
    pub fn check_graph(
        &self,
        file: &str,
        session: &ort::session::Session,
    ) -> Result<(), PackageError> {
        let path = self.graph_path(file);
        let Some((_, sig)) = self.signatures().into_iter().find(|(f, _)| f == file) else {
            return Ok(());
        };
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
            let accepted = accepted_types(self.is_genai(), *ty);
            if !dtype.tensor_type().is_some_and(|t| accepted.contains(&t)) {
                return Err(PackageError::Input {
                    path,
                    name: name.clone(),
                    msg: type_mismatch(&dtype, &accepted),
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
            let accepted = accepted_types(self.is_genai(), *ty);
            if !o
                .dtype()
                .tensor_type()
                .is_some_and(|t| accepted.contains(&t))
            {
                return Err(PackageError::Output {
                    path,
                    name: name.clone(),
                    msg: type_mismatch(o.dtype(), &accepted),
                });
            }
        }
        for (name, axis, size, field) in self.sizes(file) {
            let (dtype, output) = match session.inputs().iter().find(|i| i.name() == name) {
                Some(i) => (i.dtype(), false),
                None => match overridable.iter().find(|o| o.name() == name) {
                    Some(o) => (o.dtype(), false),
                    None => match session.outputs().iter().find(|o| o.name() == name) {
                        Some(o) => (o.dtype(), true),
                        None => continue,
                    },
                },
            };
            let Some(shape) = dtype.tensor_shape() else {
                continue;
            };
            // A dynamic axis (negative) takes any size.
            match shape.get(axis) {
                Some(&got) if got < 0 || got as usize == size => {}
                got => {
                    let msg = format!(
                        "{} is {}, but manifest.json's {field} is {size}: the manifest does not \
                         describe this graph",
                        match got {
                            Some(_) => format!("axis {axis}"),
                            None => format!("rank {}, so axis {axis}", shape.len()),
                        },
                        got.map_or("missing".into(), |g| g.to_string())
                    );
                    return Err(match output {
                        true => PackageError::Output { path, name, msg },
                        false => PackageError::Input { path, name, msg },
                    });
                }
            }
        }
        Ok(())
    }
}

/// The element types an input or output of contract type `want` may have: `want` itself; an
/// onnxruntime-genai folder's floating-point ones may be of any float type (its builder's
/// `-p fp16` / `-p bf16` decoder beside an fp32 vision graph, say), which the engine converts
/// at the graph's edge.
fn accepted_types(genai: bool, want: T) -> Vec<T> {
    match (genai, want) {
        (true, T::Float32 | T::Float16 | T::Bfloat16) => vec![T::Float32, T::Float16, T::Bfloat16],
        _ => vec![want],
    }
}

/// "tensor of Int32, expected tensor of Int64" (or "of Float32, Float16 or Bfloat16").
fn type_mismatch(got: &ort::value::ValueType, accepted: &[T]) -> String {
    let want = match accepted {
        [] => "another type".to_string(),
        [one] => format!("{one:?}"),
        [rest @ .., last] => {
            let rest: Vec<String> = rest.iter().map(|t| format!("{t:?}")).collect();
            format!("{} or {last:?}", rest.join(", "))
        }
    };
    match got.tensor_type() {
        Some(t) => format!("tensor of {t:?}, expected tensor of {want}"),
        None => format!("{got:?}, expected tensor of {want}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ort::value::{Shape, SymbolicDimensions, ValueType};

    /// A type mismatch names the type found and the types accepted; an onnxruntime-genai
    /// folder's floats may be half precision, this project's packages' may not.
    #[test]
    fn type_mismatch_names_the_types_and_genai_floats_may_be_half() {
        let half = ValueType::Tensor {
            ty: T::Float16,
            shape: Shape::new([-1, -1, 128]),
            dimension_symbols: SymbolicDimensions::new(vec![String::new(); 3]),
        };
        assert_eq!(
            type_mismatch(&half, &accepted_types(false, T::Float32)),
            "tensor of Float16, expected tensor of Float32"
        );
        assert!(accepted_types(true, T::Float32).contains(&T::Float16));
        assert!(accepted_types(true, T::Float32).contains(&T::Bfloat16));
        assert!(!accepted_types(false, T::Float32).contains(&T::Float16));
        assert_eq!(accepted_types(true, T::Int64), [T::Int64]);
        let ids = ValueType::Tensor {
            ty: T::Int32,
            shape: Shape::new([-1]),
            dimension_symbols: SymbolicDimensions::new(vec![String::new()]),
        };
        assert_eq!(
            type_mismatch(&ids, &accepted_types(true, T::Float32)),
            "tensor of Int32, expected tensor of Float32, Float16 or Bfloat16"
        );
    }
}
