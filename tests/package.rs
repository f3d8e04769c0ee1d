//! The committed tiny package: every graph loads in ONNX Runtime with the manifest's I/O names
//! and element types; a wrong package is refused with an error naming the file and the input.

mod common;

use common::*;
use spatial_ssrl::model::package::{Package, PackageError};
use spatial_ssrl::model::session::{self, RuntimeError};
use std::io::Write;
use std::path::{Path, PathBuf};

fn tiny() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("models/tiny")
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
}

#[test]
fn a_wrong_package_is_refused_clearly() {
    let dir = scratch("bad-package");
    for e in std::fs::read_dir(tiny()).unwrap() {
        let e = e.unwrap();
        if e.path().is_file() {
            std::fs::copy(e.path(), dir.join(e.file_name())).unwrap();
        }
    }
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
    // A graph that is not ONNX at all.
    std::fs::write(dir.join("vision.onnx"), b"not a model").unwrap();
    if let Some(r) = validate(&p) {
        let e = r.unwrap_err().to_string();
        assert!(
            e.contains("vision.onnx") && e.contains("cannot load"),
            "{e}"
        );
    }
    // No manifest, and a missing graph.
    std::fs::remove_file(dir.join("manifest.json")).unwrap();
    let e = Package::open(&dir).unwrap_err().to_string();
    assert!(e.contains("manifest.json"), "{e}");
    let e = Package::open(&fixtures()).unwrap_err().to_string();
    assert!(e.contains("model package"), "{e}");
}

#[test]
fn library_search_order() {
    let c = session::candidates(Some(Path::new("/opt/ort/libonnxruntime.so")));
    assert_eq!(c[0], Path::new("/opt/ort/libonnxruntime.so"));
    assert!(c
        .iter()
        .any(|p| p.ends_with("vendor/ort/libonnxruntime.so")));
}
