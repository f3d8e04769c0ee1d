//! `ssrl export`: an adapter merged into the weights gives the same greedy tokens and logits as
//! the unmerged package with the adapter fed as LoRA inputs; fp16 storage and offline
//! optimisation keep the logits.

use spatial_ssrl::kernels::SamplingParams;
use spatial_ssrl::model::export::{export, export_with, ExportOptions};
use spatial_ssrl::model::package::Package;
use spatial_ssrl::rng::Rng;
use spatial_ssrl::rollout::{Engine, GenerationConfig, Request, Trace};
use std::io::Write;
use std::path::{Path, PathBuf};

fn tiny() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("models/tiny")
}

fn requests() -> Vec<Request> {
    let img = image::open(tiny().join("goldens/image_0_0.png"))
        .unwrap()
        .to_rgb8();
    vec![
        Request {
            id: 1,
            problem: "<image>Which part of the picture is closer to the camera?".into(),
            images: vec![img],
        },
        Request {
            id: 2,
            problem: "Count the objects from left to right.".into(),
            images: vec![],
        },
    ]
}

fn greedy(e: &mut Engine) -> (Vec<Vec<u32>>, Trace) {
    let cfg = GenerationConfig {
        group: 1,
        max_new_tokens: 12,
        sampling: SamplingParams {
            temperature: 0.0,
            ..Default::default()
        },
        verbatim: false,
        format_sentence: None,
    };
    let mut trace = Trace::default();
    let out = e.generate(&requests(), &cfg, Some(&mut trace)).unwrap();
    (out.into_iter().map(|c| c.tokens).collect(), trace)
}

fn max_diff(a: &Trace, b: &Trace) -> (f32, f32) {
    let (mut d, mut scale) = (0f32, 0f32);
    for ((ra, la), (rb, lb)) in a.steps.iter().zip(&b.steps) {
        assert_eq!(ra, rb);
        for (x, y) in la.iter().zip(lb) {
            d = d.max((x - y).abs());
            scale = scale.max(x.abs());
        }
    }
    (d, scale)
}

/// A random adapter for the tiny package, strong enough to change its greedy tokens.
fn random_adapter() -> Vec<(String, Vec<f32>)> {
    let m = Package::open(&tiny()).unwrap().manifest;
    let mut r = Rng::keyed(42, &[]);
    let mut adapter = Vec::new();
    for t in &m.lora.tensors {
        for (suffix, shape) in [("A", &t.a), ("B", &t.b)] {
            let n: usize = shape.iter().product();
            let v = (0..n)
                .map(|_| ((r.f64() * 2.0 - 1.0) * 0.3) as f32)
                .collect();
            adapter.push((format!("{}.{suffix}", t.name), v));
        }
    }
    adapter
}

/// The engine on `dir`, or `None` with a SKIP line when ONNX Runtime cannot be loaded.
fn engine_or_skip(dir: &Path) -> Option<Engine> {
    match Engine::open(dir, None) {
        Ok(e) => Some(e),
        Err(e) if e.to_string().contains("libonnxruntime") => {
            let _ = writeln!(std::io::stderr(), "SKIP: {e}");
            None
        }
        Err(e) => panic!("{e}"),
    }
}

/// A package of earlier exporters, each graph's weights in a `{graph}.data` of its own, runs as
/// the shared-file package does, and `ssrl export` reads it in, merges the adapter, optimises
/// or stores fp16, and writes the shared layout (one `weights.data`) — the result equals the
/// package plus the adapter. A data file cut short is an error naming the graph, the tensor and
/// the file.
#[test]
fn external_data_packages_export_and_run() {
    use spatial_ssrl::model::onnx_edit::{DataFile, Graph, WEIGHTS_FILE};
    let Some(mut base) = engine_or_skip(&tiny()) else {
        return;
    };
    let dir = std::env::temp_dir().join(format!("ssrl-export-ext-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let src = dir.join("external");
    std::fs::create_dir_all(&src).unwrap();
    let m = Package::open(&tiny()).unwrap().manifest;
    let g = &m.graphs;
    let graphs = [
        &g.vision,
        &g.embedding,
        &g.decoder,
        &g.logprobs,
        &g.train,
        &g.sft,
    ];
    for e in std::fs::read_dir(tiny()).unwrap().flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if e.path().is_file() && !graphs.iter().any(|g| **g == name) && name != WEIGHTS_FILE {
            std::fs::copy(e.path(), src.join(&name)).unwrap();
        }
    }
    // The layout of earlier exporters: each graph's weights in a data file of its own.
    for file in graphs {
        let g = Graph::open_file(&tiny().join(file)).unwrap();
        assert!(
            g.needs_external(),
            "{file}: in weights.data in the committed package"
        );
        let mut own = DataFile::create(&src.join(format!("{file}.data"))).unwrap();
        g.save(&src.join(file), Some(&mut own)).unwrap();
    }
    assert!(!src.join(WEIGHTS_FILE).exists());
    let size = |p: PathBuf| std::fs::metadata(p).unwrap().len();
    let decoder = src.join(&g.decoder);
    assert!(size(decoder.clone()) < 200_000, "{}", size(decoder.clone()));
    assert!(size(decoder.with_extension("onnx.data")) > 1_000_000);
    // What decides the default CPU slices counts the weights a graph reads: its own data file
    // (less the alignment between tensors), and of a shared file only its part.
    let with = spatial_ssrl::model::onnx_edit::size_with_data;
    let own_data = size(decoder.with_extension("onnx.data"));
    let counted = with(&decoder) - size(decoder.clone());
    assert!(
        counted <= own_data && counted + 64 * 4096 > own_data,
        "{counted} of {own_data}"
    );
    let shared = tiny().join(&g.decoder);
    assert_eq!(with(&shared) - size(shared.clone()), counted);
    assert!(counted < size(tiny().join(WEIGHTS_FILE)));
    // The package of per-graph files runs as the shared-file one.
    let mut ext = Engine::open(&src, None).unwrap();
    let (plain, plain_trace) = greedy(&mut base);
    let (tokens, trace) = greedy(&mut ext);
    assert_eq!(tokens, plain);
    let (d, _) = max_diff(&plain_trace, &trace);
    assert!(d <= 1e-6, "logits differ by {d}");
    // Merged, optimised, written out external again.
    let adapter = random_adapter();
    base.set_lora(&adapter).unwrap();
    let (want, want_trace) = greedy(&mut base);
    assert_ne!(want, plain);
    let out = dir.join("merged");
    let opts = |fp16, optimize| ExportOptions {
        adapter: Some(adapter.clone()),
        fp16,
        optimize,
    };
    let mut stages = Vec::new();
    let rep = export_with(&src, &out, &opts(false, true), None, |s| {
        stages.push((s.graph.to_string(), s.what, s.done, s.total))
    })
    .unwrap();
    assert_eq!((rep.merged.len(), rep.optimized.len()), (6, 3));
    // Progress: each graph written, then each inference graph optimised, counted to the end.
    let whats: Vec<&str> = stages.iter().map(|s| s.1).collect();
    assert_eq!(
        whats,
        [["written"; 6].as_slice(), &["optimised"; 3]].concat()
    );
    assert!(stages
        .iter()
        .enumerate()
        .all(|(i, s)| s.2 == i + 1 && s.3 == 9));
    assert_eq!(stages[8].0, g.decoder);
    // Each graph's own copy read in, one shared copy written out.
    assert!(
        rep.bytes_in > 8_000_000 && rep.bytes_out > 3_000_000 && rep.bytes_out * 2 < rep.bytes_in,
        "{rep:?}"
    );
    let mut names: Vec<String> = std::fs::read_dir(&out)
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    // Written in the shared layout: one data file, no graph's own.
    assert!(names.contains(&WEIGHTS_FILE.to_string()), "{names:?}");
    for file in graphs {
        assert!(
            !names.contains(&format!("{file}.data")),
            "{file}: {names:?}"
        );
    }
    assert!(!names.iter().any(|n| n.contains(".opt")), "{names:?}");
    let mut merged = Engine::open(&out, None).unwrap();
    let (got, got_trace) = greedy(&mut merged);
    assert_eq!(got, want);
    let (d, scale) = max_diff(&want_trace, &got_trace);
    assert!(d <= 1e-4 * scale.max(1.0), "logits differ by {d}");
    // fp16 storage of external weights: the data files halve.
    let out16 = dir.join("merged16");
    let rep16 = export(&src, &out16, &opts(true, false), None).unwrap();
    assert!(rep16.fp16_weights > 10 && rep16.bytes_out * 10 < rep16.bytes_in * 6);
    let (_, half_trace) = greedy(&mut Engine::open(&out16, None).unwrap());
    let (d, scale) = max_diff(&want_trace, &half_trace);
    assert!(d <= 2e-2 * scale.max(1.0), "fp16 logits differ by {d}");
    // A data file cut short: refused, naming what is missing, nothing written.
    let data = src.join(format!("{}.data", g.embedding));
    let bytes = std::fs::read(&data).unwrap();
    std::fs::write(&data, &bytes[..bytes.len() / 2]).unwrap();
    let bad = dir.join("bad");
    let e = export(&src, &bad, &opts(false, false), None)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains(&g.embedding) && e.contains(".data") && e.contains("past its end"),
        "{e}"
    );
    assert!(!bad.exists() && !bad.with_extension("partial").exists());
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn merged_package_equals_base_plus_adapter() {
    let base = match Engine::open(&tiny(), None) {
        Ok(e) => e,
        Err(e) if e.to_string().contains("libonnxruntime") => {
            let _ = writeln!(std::io::stderr(), "SKIP: {e}");
            return;
        }
        Err(e) => panic!("{e}"),
    };
    let mut base = base;
    let adapter = random_adapter();
    let (plain_tokens, _) = greedy(&mut base);
    base.set_lora(&adapter).unwrap();
    let (want, want_trace) = greedy(&mut base);
    assert_ne!(
        want, plain_tokens,
        "the adapter changes nothing; the test would prove nothing"
    );
    let dir = std::env::temp_dir().join(format!("ssrl-export-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let out = dir.join("merged");
    let rep = export(
        &tiny(),
        &out,
        &ExportOptions {
            adapter: Some(adapter.clone()),
            fp16: false,
            optimize: true,
        },
        None,
    )
    .unwrap();
    assert_eq!(rep.merged.len(), 6);
    assert_eq!(rep.optimized.len(), 3);
    let mut merged = Engine::open(&out, None).unwrap();
    let (got, got_trace) = greedy(&mut merged);
    assert_eq!(got, want);
    let (d, scale) = max_diff(&want_trace, &got_trace);
    assert!(
        d <= 1e-4 * scale.max(1.0),
        "logits differ by {d} (scale {scale})"
    );
    // fp16 weight storage: half the bytes, logits within fp16 rounding.
    let out16 = dir.join("merged16");
    let rep16 = export(
        &tiny(),
        &out16,
        &ExportOptions {
            adapter: Some(adapter.clone()),
            fp16: true,
            optimize: false,
        },
        None,
    )
    .unwrap();
    assert!(rep16.fp16_weights > 10 && rep16.bytes_out * 10 < rep16.bytes_in * 6);
    let mut half = Engine::open(&out16, None).unwrap();
    let (_, half_trace) = greedy(&mut half);
    let (d, scale) = max_diff(&want_trace, &half_trace);
    assert!(
        d <= 2e-2 * scale.max(1.0),
        "fp16 logits differ by {d} (scale {scale})"
    );
    // Into a package whose weights are already stored in fp16 (the exporter's --dtype fp16, or
    // an earlier --fp16 export) the adapter merges through the Casts into the fp16 weights.
    let opts = |adapter, fp16| ExportOptions {
        adapter,
        fp16,
        optimize: false,
    };
    let half_base = dir.join("half");
    export(&tiny(), &half_base, &opts(None, true), None).unwrap();
    let half_merged = dir.join("half-merged");
    let rep = export(&half_base, &half_merged, &opts(Some(adapter), false), None).unwrap();
    assert_eq!(rep.merged.len(), 6);
    let (_, merged_trace) = greedy(&mut Engine::open(&half_merged, None).unwrap());
    let (d, scale) = max_diff(&want_trace, &merged_trace);
    assert!(
        d <= 2e-2 * scale.max(1.0),
        "merged fp16 logits differ by {d}"
    );
    let (_, unmerged) = greedy(&mut Engine::open(&half_base, None).unwrap());
    let (far, _) = max_diff(&want_trace, &unmerged);
    assert!(
        far > 10.0 * d,
        "the merge changed little: {far} against {d}"
    );
    // Optimised, a package stored in fp16 stays so (ONNX Runtime's folding widens its weights);
    // the graphs the optimiser leaves alone keep their storage, as the exporter's fp32 training
    // graph beside fp16 inference graphs.
    let train = Package::open(&half_base).unwrap().manifest.graphs.train;
    {
        use spatial_ssrl::model::onnx_edit::{DataFile, Graph};
        let g = Graph::open_file(&tiny().join(&train)).unwrap();
        let mut own = DataFile::create(&half_base.join(format!("{train}.data"))).unwrap();
        g.save(&half_base.join(&train), Some(&mut own)).unwrap();
    }
    let half_opt = dir.join("half-opt");
    let rep = export(
        &half_base,
        &half_opt,
        &ExportOptions {
            adapter: None,
            fp16: false,
            optimize: true,
        },
        None,
    )
    .unwrap();
    assert!(
        rep.fp16_weights > 10 && rep.bytes_out < rep.bytes_in,
        "{rep:?}"
    );
    assert!(
        spatial_ssrl::model::export::Record::of(&half_opt)
            .unwrap()
            .weights_fp16
    );
    let size = |dir: &Path| std::fs::metadata(dir.join(&train)).unwrap().len();
    assert_eq!(size(&half_opt), size(&tiny()));
    // An optimised package takes no adapter (its graphs no longer hold the LoRA's pattern):
    // refused before any work, naming the package it came from. Exported again, it keeps the
    // record of what was done to it.
    let again = dir.join("again");
    let e = export(
        &out,
        &again,
        &ExportOptions {
            adapter: Some(vec![]),
            fp16: false,
            optimize: false,
        },
        None,
    )
    .unwrap_err()
    .to_string();
    assert!(
        e.contains("written with --optimize") && e.contains(&tiny().display().to_string()),
        "{e}"
    );
    assert!(!again.exists() && !again.with_extension("partial").exists());
    export(
        &out,
        &again,
        &ExportOptions {
            adapter: None,
            fp16: true,
            optimize: false,
        },
        None,
    )
    .unwrap();
    let r = spatial_ssrl::model::export::Record::of(&again).unwrap();
    assert_eq!(r.from, out.display().to_string());
    assert_eq!(r.optimized.len(), 3, "{r:?}");
    assert!(r.adapter_merged && r.weights_fp16, "{r:?}");
    assert_eq!(spatial_ssrl::model::export::Record::of(&tiny()), None);
    let _ = std::fs::remove_dir_all(&dir);
}

/// An `--out` that holds anything but a package is refused before any work, and left as it
/// was; over an existing package only the files the export writes are replaced (and the old
/// graphs' leftover data files removed): a user's notes, runs and the package's `hf/` and
/// `goldens/` stay, in place too.
#[test]
fn export_replaces_only_its_own_files_and_refuses_any_other_folder() {
    let dir = std::env::temp_dir().join(format!("ssrl-export-out-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("notes.txt"), "mine").unwrap();
    let err = export(&tiny(), &dir, &ExportOptions::default(), None)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains(&dir.display().to_string()) && err.contains("not a model package"),
        "{err}"
    );
    assert_eq!(
        std::fs::read_to_string(dir.join("notes.txt")).unwrap(),
        "mine"
    );
    assert!(!dir.with_extension("partial").exists());
    // A file in the way is refused too.
    let file = dir.join("notes.txt");
    let err = export(&tiny(), &file, &ExportOptions::default(), None).unwrap_err();
    assert!(err.to_string().contains("not a model package"), "{err}");
    // An existing package: its graphs and top-level files are replaced, a leftover data file
    // of an old graph removed, everything else kept.
    let pkg = dir.join("pkg");
    std::fs::create_dir_all(pkg.join("runs/r1")).unwrap();
    std::fs::create_dir_all(pkg.join("hf")).unwrap();
    std::fs::copy(tiny().join("manifest.json"), pkg.join("manifest.json")).unwrap();
    std::fs::write(pkg.join("decoder.onnx.data"), "old weights").unwrap();
    std::fs::write(pkg.join("notes.txt"), "mine").unwrap();
    std::fs::write(pkg.join("runs/r1/metrics.jsonl"), "{}").unwrap();
    std::fs::write(pkg.join("hf/model.safetensors"), "weights").unwrap();
    match export(&tiny(), &pkg, &ExportOptions::default(), None) {
        Ok(_) => {
            assert!(!pkg.join("decoder.onnx.data").exists() && pkg.join("decoder.onnx").is_file());
            assert!(Package::open(&pkg).is_ok());
            for (f, text) in [
                ("notes.txt", "mine"),
                ("runs/r1/metrics.jsonl", "{}"),
                ("hf/model.safetensors", "weights"),
            ] {
                assert_eq!(std::fs::read_to_string(pkg.join(f)).unwrap(), text, "{f}");
            }
            // In place (`--model X --out X`): the same, and the graphs still run.
            let before = std::fs::read(pkg.join("decoder.onnx")).unwrap();
            let opts = ExportOptions {
                fp16: true,
                ..Default::default()
            };
            let r = export(&pkg, &pkg, &opts, None).unwrap();
            assert!(r.fp16_weights > 0, "{r:?}");
            assert_ne!(std::fs::read(pkg.join("decoder.onnx")).unwrap(), before);
            assert!(Package::open(&pkg).is_ok() && !pkg.with_extension("partial").exists());
            assert_eq!(
                spatial_ssrl::model::export::Record::of(&pkg).map(|r| r.weights_fp16),
                Some(true)
            );
            for f in ["notes.txt", "runs/r1/metrics.jsonl", "hf/model.safetensors"] {
                assert!(pkg.join(f).is_file(), "{f}");
            }
        }
        Err(e) if e.to_string().contains("libonnxruntime") => {
            let _ = writeln!(std::io::stderr(), "SKIP: {e}");
        }
        Err(e) => panic!("{e}"),
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// The fp16 package (computing in fp16): an adapter merges into its fp16 weights — through
/// PEFT's fp32 LoRA branch — and the merged package gives the tokens of the package with the
/// adapter fed as inputs, logits within fp16's rounding of the merge. `--optimize` is refused
/// with why: ONNX Runtime's CPU optimiser would widen the half graphs to fp32.
#[test]
fn adapter_merges_into_an_fp16_package() {
    let dir16 = Path::new(env!("CARGO_MANIFEST_DIR")).join("models/tiny-fp16");
    let Some(mut base) = engine_or_skip(&dir16) else {
        return;
    };
    let adapter = random_adapter();
    let (plain, _) = greedy(&mut base);
    base.set_lora(&adapter).unwrap();
    let (want, want_trace) = greedy(&mut base);
    assert_ne!(
        want, plain,
        "the adapter changes nothing; the test would prove nothing"
    );
    let dir = std::env::temp_dir().join(format!("ssrl-export-fp16-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let opts = |optimize| ExportOptions {
        adapter: Some(adapter.clone()),
        fp16: false,
        optimize,
    };
    let out = dir.join("merged");
    let rep = export(&dir16, &out, &opts(false), None).unwrap();
    assert_eq!(rep.merged.len(), 6, "{rep:?}");
    let mut merged = Engine::open(&out, None).unwrap();
    assert_eq!(merged.package.manifest.dtype, "fp16");
    let (got, got_trace) = greedy(&mut merged);
    assert_eq!(got, want);
    let (d, scale) = max_diff(&want_trace, &got_trace);
    assert!(d <= 2e-2 * scale.max(1.0), "logits differ by {d}");
    let e = export(&dir16, &dir.join("optimised"), &opts(true), None)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("fp16") && e.contains("--optimize") && e.contains("widens"),
        "{e}"
    );
    assert!(!dir.join("optimised").exists());
    let _ = std::fs::remove_dir_all(&dir);
}
