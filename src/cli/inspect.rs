//! `ssrl inspect`: a package's graphs loaded and checked against the contract.

use super::*;

#[derive(clap::Args)]
pub(crate) struct InspectArgs {
    /// Package folder (manifest.json, *.onnx, tokenizer and configs), or an onnxruntime-genai
    /// Qwen2.5-VL folder (genai_config.json).
    #[arg(long, value_name = "DIR")]
    pub(crate) model: PathBuf,
    /// libonnxruntime.so to load (default: ORT_DYLIB_PATH, then vendor/ort/ from `make ort`).
    #[arg(long, value_name = "PATH")]
    pub(crate) ort_lib: Option<PathBuf>,
}

pub(crate) fn run_inspect(a: InspectArgs) -> Result<()> {
    use spatial_ssrl::model::package::Package;
    let p = Package::open(&a.model)?;
    let m = &p.manifest;
    outln!(
        "{}: {} {} ({}), text {} layers × hidden {} ({} / {} heads, head_dim {}), vocab {}, mrope {:?}",
        a.model.display(),
        m.family.name(),
        if p.is_genai() {
            "onnxruntime-genai folder (rollouts only)"
        } else {
            "package"
        },
        m.dtype,
        m.text.num_hidden_layers,
        m.text.hidden_size,
        m.text.num_attention_heads,
        m.text.num_key_value_heads,
        m.text.head_dim,
        m.text.vocab_size,
        m.text.mrope_section
    );
    if let Some(n) = p.context_length() {
        outln!("context: {n} tokens, prompt and generated");
    }
    let attention = match (m.vision.window_size, m.vision.deepstack_layers) {
        (0, 0) => "full attention".to_string(),
        (0, k) => format!("full attention, DeepStack into the first {k} language layers"),
        (w, _) => format!("window {w} px"),
    };
    outln!(
        "vision: patch {}, merge {}, {attention} → features of {}; {}",
        m.vision.patch_size,
        m.vision.spatial_merge_size,
        m.vision.out_hidden_size,
        match m.lora.tensors.is_empty() {
            true => "no LoRA inputs".to_string(),
            false => format!(
                "LoRA rank {} alpha {} on {}",
                m.lora.rank,
                m.lora.alpha,
                m.lora.targets.join(", ")
            ),
        }
    );
    {
        use spatial_ssrl::model::package::{KvLayout, OwnCache};
        outln!(
            "cache: {}",
            match (m.kv_layout, m.own_cache) {
                (KvLayout::Shared, OwnCache::InPlace) => {
                    "prompts' cache shared by their samples; rows' own tokens read in place"
                }
                (KvLayout::Shared, OwnCache::Append) => {
                    "prompts' cache shared by their samples; rows' own tokens past + present"
                }
                (KvLayout::Packed, _) => {
                    "GroupQueryAttention, each row's cache packed from position 0"
                }
                (KvLayout::Append, _) => "past + present, the prompt's cache fanned out",
            }
        );
    }
    if !p.is_genai() && m.graphs.train.is_empty() {
        outln!(
            "log-prob and training graphs: none (inference graphs only: rollouts and evaluation)"
        );
    } else if !p.is_genai() {
        use spatial_ssrl::model::package::Positions;
        let t = &m.train;
        outln!(
            "log-prob and training graphs: {}; {}; {}",
            match t.positions {
                Positions::Completion => "the completion's columns only",
                Positions::All => "every column of the rows",
            },
            match t.head_chunks {
                Some(n) if n > 1 => format!("the vocabulary head in {n} chunks of positions"),
                _ => "the vocabulary head over every position at once".to_string(),
            },
            match t.attention_chunks {
                Some(n) if n > 1 => format!("attention in {n} chunks of queries"),
                _ => "attention over every query at once".to_string(),
            }
        );
    }
    if let Some(r) = spatial_ssrl::model::export::Record::of(&a.model) {
        let mut done = Vec::new();
        if r.adapter_merged {
            done.push("adapter merged".to_string());
        }
        if r.weights_fp16 {
            done.push("weights stored as fp16".into());
        }
        if !r.optimized.is_empty() {
            done.push(format!("optimised offline: {}", r.optimized.join(", ")));
        }
        if done.is_empty() {
            done.push("copied as it was".into());
        }
        outln!("exported from {}: {}", r.from, done.join("; "));
    }
    p.validate(a.ort_lib.as_deref())?;
    // The data files the graphs read their weights from, and how many graphs read each.
    let mut files: std::collections::BTreeMap<String, usize> = Default::default();
    for (file, _) in p.signatures() {
        let bytes = std::fs::read(p.graph_path(&file)).unwrap_or_default();
        let named = spatial_ssrl::model::onnx_edit::external_initializers(&bytes)
            .unwrap_or_default()
            .into_iter()
            .map(|t| t.location)
            .collect::<std::collections::BTreeSet<_>>();
        for f in named {
            *files.entry(f).or_default() += 1;
        }
    }
    for (f, n) in &files {
        let size = std::fs::metadata(a.model.join(f)).map_or(0, |m| m.len());
        let shared = match n {
            1 => "read by 1 graph".to_string(),
            n => format!("shared by {n} graphs, each tensor stored once"),
        };
        outln!("weights: {f}, {} ({shared})", human_bytes(size));
    }
    for (file, sig) in p.signatures() {
        let path = p.graph_path(&file);
        let (own, all) = (
            std::fs::metadata(&path).map_or(0, |m| m.len()),
            spatial_ssrl::model::onnx_edit::size_with_data(&path),
        );
        let external = match all > own {
            true => " with the weights it reads",
            false => "",
        };
        outln!(
            "  {file}: ok ({} inputs, {} outputs; {}{external})",
            sig.inputs.len(),
            sig.outputs.len(),
            human_bytes(all)
        );
    }
    Ok(())
}

/// `n` bytes as KB / MB / GB (powers of 1,000, one decimal).
pub(crate) fn human_bytes(n: u64) -> String {
    match n {
        0..1_000_000 => format!("{:.1} KB", n as f64 / 1e3),
        1_000_000..1_000_000_000 => format!("{:.1} MB", n as f64 / 1e6),
        _ => format!("{:.1} GB", n as f64 / 1e9),
    }
}
