//! The committed tiny package: every graph loads in ONNX Runtime with the manifest's I/O names
//! and element types; a wrong package is refused with an error naming the file and the input.

mod common;

use common::*;
use spatial_ssrl::model::package::{Package, PackageError};
use spatial_ssrl::model::session::{self, RuntimeError};
use std::io::Write;
use std::path::{Path, PathBuf};

fn tiny_fp16() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("models/tiny-fp16")
}

fn tiny() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("models/tiny")
}

/// A fresh copy of the tiny package's top-level files (graphs, manifest, configs).
fn tiny_copy(name: &str) -> PathBuf {
    let dir = scratch(name);
    for e in std::fs::read_dir(tiny()).unwrap() {
        let e = e.unwrap();
        if e.path().is_file() {
            std::fs::copy(e.path(), dir.join(e.file_name())).unwrap();
        }
    }
    dir
}

/// Validates, or prints a visible SKIP when no ONNX Runtime library is installed.
fn validate(p: &Package) -> Option<Result<(), PackageError>> {
    match p.validate(None) {
        Err(PackageError::Runtime(RuntimeError::NotFound { tried })) => {
            let _ = writeln!(
                std::io::stderr(),
                "SKIP: no ONNX Runtime library (run `make ort`); tried {tried}"
            );
            None
        }
        r => Some(r),
    }
}

#[test]
fn tiny_package_matches_its_contract() {
    let p = Package::open(&tiny()).unwrap();
    let m = &p.manifest;
    assert_eq!(m.text.num_hidden_layers, 2);
    assert_eq!(m.text.mrope_section, vec![4, 6, 6]);
    assert_eq!(
        m.text.head_dim,
        2 * m.text.mrope_section.iter().sum::<usize>(),
        "sections cover head_dim / 2"
    );
    assert_eq!(m.lora.targets, vec!["q_proj", "v_proj"]);
    assert_eq!(m.lora.tensors.len(), 4);
    assert_eq!(m.lora.tensors[0].a, vec![m.lora.rank, m.text.hidden_size]);
    // Token ids agree with the tokenizer the package ships.
    let tok: serde_json::Value =
        serde_json::from_slice(&std::fs::read(tiny().join("tokenizer.json")).unwrap()).unwrap();
    let id = |c: &str| {
        tok["added_tokens"]
            .as_array()
            .unwrap()
            .iter()
            .find(|t| t["content"] == c)
            .unwrap()["id"]
            .as_u64()
            .unwrap() as u32
    };
    assert_eq!(m.tokens.image, id("<|image_pad|>"));
    assert_eq!(m.tokens.vision_start, id("<|vision_start|>"));
    assert_eq!(m.tokens.pad, id("<|endoftext|>"));
    assert!(m.tokens.eos.contains(&id("<|im_end|>")));
    if let Some(r) = validate(&p) {
        r.unwrap();
    }
    // The fp16 package: the same model, its activations and cache typed fp16 in every graph.
    let h = Package::open(&tiny_fp16()).unwrap();
    assert_eq!(h.manifest.dtype, "fp16");
    assert_eq!(h.activation_type(), ort::value::TensorElementType::Float16);
    if let Some(r) = validate(&h) {
        r.unwrap();
    }
}

/// Every committed package of either family, with and without vision-tower LoRA, has exactly
/// its contract's inputs and outputs in every graph (what `ssrl inspect` checks): the
/// Qwen3-VL graphs' DeepStack inputs and, with vision-tower LoRA, their gradients.
#[test]
fn every_committed_package_meets_its_contract() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("models");
    for name in [
        "tiny",
        "tiny-fp16",
        "tiny-vision-lora",
        "tiny-qwen3-vl",
        "tiny-qwen3-vl-vision-lora",
    ] {
        let p = Package::open(&root.join(name)).unwrap();
        let Some(r) = validate(&p) else { return };
        if let Err(e) = r {
            panic!("{name}: {}", spatial_ssrl::error_chain(&e));
        }
    }
}

/// A manifest whose sizes disagree with its graphs is refused when the graphs load — by
/// `inspect`'s validation and by the engine before any run (it indexed past a tensor's end
/// mid-rollout) — naming the graph, the input or output, and the manifest field.
#[test]
fn a_manifest_that_disagrees_with_its_graphs_is_refused() {
    let dir = tiny_copy("manifest-sizes");
    let orig: serde_json::Value =
        serde_json::from_slice(&std::fs::read(tiny().join("manifest.json")).unwrap()).unwrap();
    let cases: [(&str, &str, serde_json::Value, &str, &str); 4] = [
        (
            "text",
            "hidden_size",
            256.into(),
            "embedding.onnx",
            "inputs_embeds",
        ),
        ("text", "vocab_size", 4096.into(), "decoder.onnx", "logits"),
        (
            "text",
            "num_key_value_heads",
            4.into(),
            "decoder.onnx",
            "past_key_values.0.key",
        ),
        (
            "vision",
            "out_hidden_size",
            64.into(),
            "vision.onnx",
            "image_features",
        ),
    ];
    for (section, key, value, graph, io) in cases {
        let mut m = orig.clone();
        m[section][key] = value.clone();
        std::fs::write(dir.join("manifest.json"), m.to_string()).unwrap();
        let p = Package::open(&dir).unwrap();
        let Some(r) = validate(&p) else { return };
        let e = r.unwrap_err().to_string();
        let field = format!("{section}.{key} is {value}");
        for needle in [graph, io, &field] {
            assert!(e.contains(needle), "{key}: {needle} not in: {e}");
        }
        match spatial_ssrl::rollout::Engine::open(&dir, None) {
            Err(e) => assert!(e.to_string().contains(&field), "{key}: {e}"),
            Ok(_) => panic!("the engine opened a package whose {section}.{key} is wrong"),
        }
    }
    // The same package with its own manifest is fine.
    std::fs::write(dir.join("manifest.json"), orig.to_string()).unwrap();
    assert!(validate(&Package::open(&dir).unwrap()).unwrap().is_ok());
}

#[test]
fn a_wrong_package_is_refused_clearly() {
    let dir = tiny_copy("bad-package");
    // The decoder replaced by the embedding graph: its inputs are not the decoder's.
    std::fs::copy(tiny().join("embedding.onnx"), dir.join("decoder.onnx")).unwrap();
    let p = Package::open(&dir).unwrap();
    if let Some(r) = validate(&p) {
        let e = r.unwrap_err().to_string();
        assert!(
            e.contains("decoder.onnx") && e.contains("inputs_embeds"),
            "{e}"
        );
    }
    // The engine checks the graphs it loads the same way, before any run.
    match spatial_ssrl::rollout::Engine::open(&dir, None) {
        Err(e) => {
            let e = e.to_string();
            assert!(
                e.contains("decoder.onnx") && e.contains("inputs_embeds"),
                "{e}"
            );
        }
        Ok(_) => panic!("the engine opened a package whose decoder is the embedding graph"),
    }
    // A graph that is not ONNX at all: named, with ONNX Runtime's own error kept as the cause
    // (by inspect's validation and by the engine).
    std::fs::write(dir.join("vision.onnx"), b"not a model").unwrap();
    if let Some(r) = validate(&p) {
        let e = r.unwrap_err();
        let top = e.to_string();
        assert!(
            top.contains("vision.onnx") && top.contains("cannot load"),
            "{top}"
        );
        let cause = std::error::Error::source(&e).map(|c| c.to_string());
        assert!(
            cause
                .as_deref()
                .is_some_and(|c| c.to_lowercase().contains("protobuf")),
            "ONNX Runtime's error is not the cause: {cause:?}"
        );
        match spatial_ssrl::rollout::Engine::open(&dir, None) {
            Err(e) => {
                let chain = spatial_ssrl::error_chain(&e);
                assert!(
                    chain.contains("vision.onnx") && chain.to_lowercase().contains("protobuf"),
                    "{chain}"
                );
                // (ONNX Runtime's error is the cause, not text folded into the message)
                let cause = std::error::Error::source(&e).map(|c| c.to_string());
                assert!(
                    cause.is_some_and(|c| c.to_lowercase().contains("protobuf")),
                    "{chain}"
                );
            }
            Ok(_) => panic!("the engine opened a package whose vision graph is not ONNX"),
        }
    }
    // No manifest, and a missing graph.
    std::fs::remove_file(dir.join("manifest.json")).unwrap();
    // Without the manifest, genai_config.json describes the folder (rollouts only).
    let g = Package::open(&dir).unwrap();
    assert!(g.is_genai() && g.manifest.lora.tensors.is_empty());
    assert_eq!(g.signatures().len(), 3, "no log-prob or training graph");
    // A config this runtime cannot drive is refused, naming the file and the field.
    let cfg_path = dir.join("genai_config.json");
    let orig: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&cfg_path).unwrap()).unwrap();
    let mut cfg = orig.clone();
    cfg["model"]["decoder"]["inputs"]["inputs_embeds"] = "embeds".into();
    std::fs::write(&cfg_path, cfg.to_string()).unwrap();
    let e = Package::open(&dir).unwrap_err().to_string();
    assert!(
        e.contains("genai_config.json") && e.contains("inputs.inputs_embeds is \"embeds\""),
        "{e}"
    );
    let mut cfg = orig.clone();
    cfg["model"]["type"] = "phi3".into();
    std::fs::write(&cfg_path, cfg.to_string()).unwrap();
    let e = Package::open(&dir).unwrap_err().to_string();
    assert!(e.contains("only Qwen2.5-VL"), "{e}");
    std::fs::remove_file(&cfg_path).unwrap();
    let e = Package::open(&dir).unwrap_err().to_string();
    assert!(e.contains("manifest.json"), "{e}");
    let e = Package::open(&fixtures()).unwrap_err().to_string();
    assert!(e.contains("model package"), "{e}");
}

#[test]
fn library_search_order() {
    use std::ffi::OsStr;
    let (lib, env) = (
        Path::new("/opt/ort/libonnxruntime.so"),
        OsStr::new("/env/lib.so"),
    );
    // Named libraries are the only candidates: --ort-lib first, then ORT_DYLIB_PATH.
    assert_eq!(session::candidates(Some(lib), Some(env)), [lib]);
    assert_eq!(session::candidates(None, Some(env)), [Path::new(env)]);
    let c = session::candidates(None, None);
    assert!(c[0].ends_with("vendor/ort/libonnxruntime.so"), "{c:?}");
}

/// One GRPO step through `train.onnx` in ONNX Runtime from Rust, against the torch autograd
/// goldens written by the exporter: loss, token log-probs, every LoRA gradient and the stats.
#[test]
fn train_graph_matches_torch_autograd_goldens() {
    let Some(env) = ort_env() else { return };
    let dir = tiny();
    let out = run_train_goldens(env, &dir, &dir.join("goldens/train"), &[]);
    assert_near_goldens(&out, &dir.join("goldens/train"), 1e-5, 1e-4);
}

/// One SFT step through `sft.onnx` from Rust against its torch autograd goldens (loss, every
/// LoRA gradient, label and correct-label counts), in fp32 and in fp16.
#[test]
fn sft_graph_matches_torch_autograd_goldens() {
    let Some(env) = ort_env() else { return };
    // (fp16: a near tie may rank the other way, one correct label in 23)
    for (dir, tol, stats_tol) in [(tiny(), 1e-5, 0.0), (tiny_fp16(), 2e-2, 0.05)] {
        let gd = dir.join("goldens/sft");
        let out = run_goldens(env, &dir, true, &gd, &[]);
        assert_near_goldens(&out, &gd, tol, stats_tol);
        let (_, stats) = out.iter().find(|(n, _)| n == "stats").unwrap();
        assert_eq!(
            stats[0], 23.0,
            "label tokens: 2 rows × 12 columns, one masked"
        );
    }
}

/// The fp16 training graph (forward and backward in fp16, fp32 LoRA tensors and gradients)
/// against torch autograd in fp16 on the same inputs (relative 2e-2: two fp16 implementations
/// round differently), against the fp32 graph of the same weights on the same inputs (relative
/// 5e-2: fp16's own error), and with loss scaling: at scale 1,024 the gradients are the
/// same, divided back in the graph; at 1e30 they overflow, which the trainer's scaler detects.
#[test]
fn fp16_train_graph_matches_autograd_and_the_fp32_graph() {
    let Some(env) = ort_env() else { return };
    let dir = tiny_fp16();
    let gd = dir.join("goldens/train");
    let out = run_train_goldens(env, &dir, &gd, &[]);
    assert_near_goldens(&out, &gd, 2e-2, 2e-2);
    // The fp32 package on the fp16 goldens' inputs (its embeddings are exact in fp32).
    let wide = run_train_goldens(env, &tiny(), &gd, &[]);
    let grads = |o: &Outputs| -> Vec<(String, Vec<f32>)> {
        o.iter()
            .filter(|(n, _)| n.starts_with("grad."))
            .cloned()
            .collect()
    };
    for ((name, a), (_, b)) in grads(&out).iter().zip(grads(&wide)) {
        let rel = max_diff(a, &b) / max_abs(&b);
        assert!(rel < 5e-2, "{name}: fp16 vs fp32 graph, relative {rel}");
    }
    let scaled = run_train_goldens(env, &dir, &gd, &[("loss_scale", 1024.0)]);
    for ((name, a), (_, b)) in grads(&scaled).iter().zip(grads(&out)) {
        let rel = max_diff(a, &b) / max_abs(&b);
        assert!(
            rel < 1e-2,
            "{name}: scaled by 1024 and back, relative {rel}"
        );
    }
    let over = run_train_goldens(env, &dir, &gd, &[("loss_scale", 1e30)]);
    assert!(
        !grads(&over)
            .iter()
            .all(|(_, g)| g.iter().all(|x| x.is_finite())),
        "fp16 gradients at loss scale 1e30 should overflow"
    );
}

type Outputs = Vec<(String, Vec<f32>)>;

fn ort_env() -> Option<&'static ort::environment::Environment> {
    match session::environment(None) {
        Ok(e) => Some(e),
        Err(e) => {
            let _ = writeln!(std::io::stderr(), "SKIP: {e}");
            None
        }
    }
}

/// `dir`'s train.onnx on the inputs saved in `gd` (`in.NAME.npy`; the embeddings converted to
/// the package's activation type), scalars in `set` replacing theirs: every output as f32.
fn run_train_goldens(
    env: &'static ort::environment::Environment,
    dir: &Path,
    gd: &Path,
    set: &[(&str, f32)],
) -> Outputs {
    run_goldens(env, dir, false, gd, set)
}

/// [`run_train_goldens`] of train.onnx, or with `sft` of sft.onnx.
fn run_goldens(
    env: &'static ort::environment::Environment,
    dir: &Path,
    sft: bool,
    gd: &Path,
    set: &[(&str, f32)],
) -> Outputs {
    use ort::value::{Tensor, TensorElementType as T};
    use spatial_ssrl::model::package::{SFT_INPUTS, TRAIN_INPUTS};
    use spatial_ssrl::tasks::npy;
    let p = Package::open(dir).unwrap();
    let contract: &[(&str, T)] = if sft { &SFT_INPUTS } else { &TRAIN_INPUTS };
    let graph = if sft {
        &p.manifest.graphs.sft
    } else {
        &p.manifest.graphs.train
    };
    let mut names: Vec<String> = contract.iter().map(|(n, _)| n.to_string()).collect();
    for t in &p.manifest.lora.tensors {
        names.push(format!("{}.A", t.name));
        names.push(format!("{}.B", t.name));
    }
    let mut inputs: Vec<(String, ort::session::SessionInputValue<'static>)> = Vec::new();
    for n in &names {
        let mut a = npy::read(&gd.join(format!("in.{n}.npy"))).unwrap();
        if let Some((_, v)) = set.iter().find(|(k, _)| k == n) {
            a.data = vec![*v];
        }
        let ty = match contract.iter().find(|(k, _)| k == n) {
            Some(_) if n == "inputs_embeds" => p.activation_type(),
            Some((_, t)) => *t,
            None => T::Float32,
        };
        let shape: Vec<i64> = a.shape.iter().map(|d| *d as i64).collect();
        let v: ort::session::SessionInputValue<'static> = match ty {
            T::Int64 => {
                Tensor::from_array((shape, a.data.iter().map(|x| *x as i64).collect::<Vec<_>>()))
                    .unwrap()
                    .into()
            }
            T::Float16 => {
                let h: Vec<half::f16> = a.data.iter().map(|x| half::f16::from_f32(*x)).collect();
                Tensor::from_array((shape, h)).unwrap().into()
            }
            _ => Tensor::from_array((shape, a.data)).unwrap().into(),
        };
        inputs.push((n.clone(), v));
    }
    let mut sess = ort::session::Session::builder(env)
        .unwrap()
        .commit_from_file(p.graph_path(graph))
        .unwrap();
    let out = sess.run(inputs).unwrap();
    let res: Outputs = out
        .iter()
        .map(|(name, value)| {
            let (_, v) = value.try_extract_tensor::<f32>().unwrap();
            (name.to_string(), v.to_vec())
        })
        .collect();
    let first = if sft { 1 } else { 2 };
    assert_eq!(res.len(), first + 2 * p.manifest.lora.tensors.len() + 1);
    res
}

fn max_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0f32, f32::max)
}

fn max_abs(a: &[f32]) -> f32 {
    a.iter().fold(0f32, |m, v| m.max(v.abs())).max(1e-6)
}

/// Every output within `tol` of the autograd golden (relative to its largest value, at least
/// 1), the stats within `stats_tol`.
fn assert_near_goldens(out: &Outputs, gd: &Path, tol: f32, stats_tol: f32) {
    for (name, got) in out {
        let want = spatial_ssrl::tasks::npy::read(&gd.join(format!("out.{name}.npy"))).unwrap();
        let scale = max_abs(&want.data);
        let err = max_diff(got, &want.data);
        let tol = if name == "stats" { stats_tol } else { tol };
        assert!(
            err <= tol * scale.max(1.0),
            "{name}: max |ort − torch| {err} (scale {scale})"
        );
    }
}

/// A package whose training graph takes another set of batch inputs (exported by an earlier
/// models/export.py, before `loss_scale`) is refused by name, with what to do; so is a manifest
/// of a dtype this runtime does not know.
#[test]
fn a_package_from_another_exporter_version_is_refused_with_the_fix() {
    let dir = scratch("old_contract");
    let text = std::fs::read_to_string(tiny().join("manifest.json")).unwrap();
    let mut m: serde_json::Value = serde_json::from_str(&text).unwrap();
    let inputs = m["train"]["inputs"].as_array_mut().unwrap();
    assert_eq!(inputs.pop().unwrap(), "loss_scale");
    std::fs::write(dir.join("manifest.json"), m.to_string()).unwrap();
    let e = Package::open(&dir).unwrap_err().to_string();
    assert!(
        e.contains("manifest.json")
            && e.contains("differ from this runtime's contract")
            && e.contains("export it again"),
        "{e}"
    );
    let mut m: serde_json::Value = serde_json::from_str(&text).unwrap();
    m["dtype"] = "int8".into();
    std::fs::write(dir.join("manifest.json"), m.to_string()).unwrap();
    let e = Package::open(&dir).unwrap_err().to_string();
    assert!(e.contains("dtype is \"int8\""), "{e}");
    // A family this runtime does not know is named, with the ones it does.
    let mut m: serde_json::Value = serde_json::from_str(&text).unwrap();
    m["family"] = "llava_next".into();
    std::fs::write(dir.join("manifest.json"), m.to_string()).unwrap();
    // The error and its causes, as ssrl prints them.
    let e = spatial_ssrl::error_chain(&Package::open(&dir).unwrap_err());
    assert!(
        e.contains("manifest.json")
            && e.contains("llava_next")
            && e.contains("qwen2_5_vl")
            && e.contains("qwen3_vl"),
        "{e}"
    );
    // One without a family (earlier exports) is Qwen2.5-VL's.
    m.as_object_mut().unwrap().remove("family");
    let parsed: spatial_ssrl::model::package::Manifest = serde_json::from_value(m).unwrap();
    assert_eq!(
        parsed.family,
        spatial_ssrl::model::package::Family::QWEN2_5_VL
    );
}

/// A manifest saying fp16 over fp32 graphs (say, edited by hand) is refused when the graphs
/// are checked, naming the graph, the input and both types.
#[test]
fn half_manifest_over_fp32_graphs_is_refused_by_the_contract() {
    let dir = tiny_copy("dtype_mismatch");
    let path = dir.join("manifest.json");
    let mut m: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    m["dtype"] = "fp16".into();
    std::fs::write(&path, m.to_string()).unwrap();
    let Some(r) = validate(&Package::open(&dir).unwrap()) else {
        return;
    };
    let e = r.unwrap_err().to_string();
    assert!(
        e.contains("vision.onnx") && e.contains("image_features") && e.contains("Float16"),
        "{e}"
    );
}

/// A package whose weights file is cut short (an interrupted copy), missing, or not a file is
/// refused when it is opened, naming the file, whether the sessions share one copy of the
/// weights (the trainer's way) or load their own.
#[test]
fn weights_that_cannot_be_read_are_named() {
    use spatial_ssrl::model::session::DeviceChoice;
    let dir = tiny_copy("bad-weights");
    if validate(&Package::open(&dir).unwrap()).is_none() {
        return;
    }
    let data = dir.join("weights.data");
    let whole = std::fs::read(&data).unwrap();
    // (what breaks it, and what the error must say besides the file's name)
    let cases: [(&str, &dyn Fn(), &str); 3] = [
        (
            "cut short",
            &|| std::fs::write(&data, &whole[..whole.len() / 2]).unwrap(),
            &format!("{} bytes, but", whole.len() / 2),
        ),
        (
            "missing",
            &|| std::fs::remove_file(&data).unwrap(),
            "cannot open",
        ),
        (
            "a folder",
            &|| std::fs::create_dir(&data).unwrap(),
            "not a file",
        ),
    ];
    for (case, break_it, says) in cases {
        break_it();
        // `ssrl inspect`'s validation, then the engine both ways.
        let e = validate(&Package::open(&dir).unwrap())
            .unwrap()
            .unwrap_err();
        let chain = spatial_ssrl::error_chain(&e);
        assert!(
            chain.contains("weights.data") && chain.contains(says),
            "{case}: {chain}"
        );
        for shared_weights in [true, false] {
            let choice = DeviceChoice {
                shared_weights,
                ..Default::default()
            };
            match spatial_ssrl::rollout::Engine::open_on(&dir, None, &choice) {
                Err(e) => {
                    let chain = spatial_ssrl::error_chain(&e);
                    assert!(
                        chain.contains("weights.data") && chain.contains(says),
                        "{case}: {chain}"
                    );
                }
                Ok(_) => panic!("{case}: the engine opened a package with no usable weights"),
            }
        }
    }
}
