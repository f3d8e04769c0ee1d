//! `ssrl export`: a deployment copy of a package — an adapter merged into the base weights,
//! optionally fp16 weight storage and ONNX Runtime's graph optimisations applied offline.

use super::onnx_edit::{Adapter, DataFile, Graph, WEIGHTS_FILE};
use super::package::{Package, PackageError};
use super::session::environment;
use std::path::{Path, PathBuf};

#[derive(Debug, Clone, Default)]
pub struct ExportOptions {
    /// LoRA tensors by package name (`lora.0.q_proj.A`), merged into the weights.
    pub adapter: Option<Vec<(String, Vec<f32>)>>,
    pub fp16: bool,
    pub optimize: bool,
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct ExportReport {
    /// Graph file → LoRA targets merged into it.
    pub merged: Vec<(String, Vec<String>)>,
    pub fp16_weights: usize,
    pub optimized: Vec<String>,
    pub bytes_in: u64,
    pub bytes_out: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum ExportError {
    #[error(transparent)]
    Package(#[from] PackageError),
    #[error("{path}: {msg}")]
    File { path: PathBuf, msg: String },
}

fn ferr(path: &Path, msg: impl std::fmt::Display) -> ExportError {
    ExportError::File {
        path: path.to_path_buf(),
        msg: msg.to_string(),
    }
}

/// `out` may be written: it does not exist, or it is an empty folder or a package (which the
/// export replaces when complete). Anything else is refused before any work, so a mistyped
/// `--out` never deletes a folder of other files.
fn check_replaceable(out: &Path) -> Result<(), ExportError> {
    if !out.exists() {
        return Ok(());
    }
    let empty = std::fs::read_dir(out).is_ok_and(|mut d| d.next().is_none());
    let package = std::fs::read(out.join("manifest.json"))
        .ok()
        .and_then(|b| serde_json::from_slice::<serde_json::Value>(&b).ok())
        .is_some_and(|v| v["format"] == "spatial-ssrl-package");
    match empty || package {
        true => Ok(()),
        false => Err(ferr(
            out,
            "exists and is not a model package (an existing package's files are replaced, other \
             folders are not written into); pick another --out",
        )),
    }
}

/// What `ssrl export` did to a package, from its `manifest.json`'s `exported` (across exports:
/// an optimised graph stays optimised, merged weights stay merged).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Record {
    /// The package the last export started from.
    pub from: String,
    pub adapter_merged: bool,
    pub weights_fp16: bool,
    /// Graphs ONNX Runtime's offline optimisations rewrote.
    pub optimized: Vec<String>,
}

impl Record {
    /// The record of the package in `model`; `None` when no export wrote it.
    pub fn of(model: &Path) -> Option<Record> {
        let bytes = std::fs::read(model.join("manifest.json")).ok()?;
        let v: serde_json::Value = serde_json::from_slice(&bytes).ok()?;
        let e = v.get("exported")?;
        let flag = |k: &str| e[k].as_bool().unwrap_or(false);
        Some(Record {
            from: e["from"]
                .as_str()
                .unwrap_or("an unnamed package")
                .to_string(),
            adapter_merged: flag("adapter_merged"),
            weights_fp16: flag("weights_fp16"),
            optimized: (e["ort_optimized"].as_array().into_iter().flatten())
                .filter_map(|g| g.as_str().map(String::from))
                .collect(),
        })
    }
}

/// ONNX Runtime's extended optimisations of the graph at `src`, written to `dst`; with
/// `external_data`, its weights go to that file beside it (a model over 2 GB cannot be written
/// otherwise).
fn optimise(
    env: &ort::environment::Environment,
    src: &Path,
    dst: &Path,
    external_data: Option<&str>,
) -> Result<(), ExportError> {
    use ort::session::builder::GraphOptimizationLevel;
    let fail = |e: ort::Error| ferr(src, e);
    let mut b = ort::session::Session::builder(env)
        .map_err(fail)?
        .with_optimization_level(GraphOptimizationLevel::Level2)
        .map_err(|e| fail(e.into()))?;
    if let Some(name) = external_data {
        b = b
            .with_config_entry(
                "session.optimized_model_external_initializers_file_name",
                name,
            )
            .map_err(|e| fail(e.into()))?
            .with_config_entry(
                "session.optimized_model_external_initializers_min_size_in_bytes",
                "1024",
            )
            .map_err(|e| fail(e.into()))?;
    }
    b.with_optimized_model_path(dst)
        .map_err(|e| fail(e.into()))?
        .commit_from_file(src)
        .map_err(fail)?;
    Ok(())
}

/// Removes a folder when dropped.
struct RemoveOnDrop<'a>(&'a Path);

impl Drop for RemoveOnDrop<'_> {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(self.0);
    }
}

/// One finished stage of an export, for progress reports: `done` of `total` stages.
#[derive(Debug, Clone, Copy)]
pub struct Stage<'a> {
    pub graph: &'a str,
    /// "written" (read, merged where asked, stored in fp16 where asked unless optimised next,
    /// written) or "optimised" (and then stored in fp16 where asked).
    pub what: &'static str,
    pub done: usize,
    pub total: usize,
}

/// Writes the exported package to `out` (through `out.partial`, moved in when complete); over
/// an existing package (the source itself included) only the files the export writes are
/// replaced and the old graphs' leftover data files removed, anything else kept; any other
/// existing `out` is refused.
pub fn export(
    model: &Path,
    out: &Path,
    opts: &ExportOptions,
    ort_lib: Option<&Path>,
) -> Result<ExportReport, ExportError> {
    export_with(model, out, opts, ort_lib, |_| {})
}

/// [`export`], reporting each stage as it finishes (a large model's graphs take minutes each).
pub fn export_with(
    model: &Path,
    out: &Path,
    opts: &ExportOptions,
    ort_lib: Option<&Path>,
    mut progress: impl FnMut(Stage<'_>),
) -> Result<ExportReport, ExportError> {
    let pkg = Package::open(model)?;
    if pkg.is_genai() {
        return Err(ferr(
            &model.join("genai_config.json"),
            "an onnxruntime-genai folder is already a deployment folder; export from a package made by models/export.py",
        ));
    }
    check_replaceable(out)?;
    // What earlier exports did to this package.
    let before = Record::of(model).unwrap_or_default();
    if opts.adapter.is_some() && !before.optimized.is_empty() {
        return Err(ferr(
            &model.join("manifest.json"),
            format!(
                "written with --optimize: ONNX Runtime's offline optimisations rewrote where the \
                 LoRA enters {}, so an adapter cannot be merged into it; merge it into the \
                 package this one came from ({}), adding --optimize there",
                before.optimized.join(", "),
                before.from
            ),
        ));
    }
    let m = &pkg.manifest;
    if opts.optimize && m.dtype != "fp32" {
        // Measured on the tiny fp16 package: 35 Casts in the decoder became 92.
        return Err(ferr(
            &model.join("manifest.json"),
            format!(
                "a package that computes in {} cannot take --optimize: ONNX Runtime's offline \
                 optimisations run for its CPU provider, which widens half-precision operators to \
                 fp32 (Casts around each), and the GPU would then run them so; export without \
                 --optimize (the GPU session optimises the graphs when it opens them)",
                m.dtype
            ),
        ));
    }
    let tmp = out.with_extension("partial");
    if tmp.exists() {
        std::fs::remove_dir_all(&tmp).map_err(|e| ferr(&tmp, e))?;
    }
    std::fs::create_dir_all(&tmp).map_err(|e| ferr(&tmp, e))?;
    // A failed export leaves no half-written copy behind (a large model's is many GB); after
    // the final rename there is nothing left to remove.
    let _partial = RemoveOnDrop(&tmp);
    let graphs: Vec<String> = [
        &m.graphs.vision,
        &m.graphs.embedding,
        &m.graphs.decoder,
        &m.graphs.logprobs,
        &m.graphs.train,
        &m.graphs.sft,
        &m.graphs.vision_grad,
    ]
    .into_iter()
    .filter(|g| !g.is_empty())
    .cloned()
    .collect();
    let adapter: Option<Adapter> = opts.adapter.as_ref().map(|t| {
        let mut map = Adapter::new();
        for (name, v) in t {
            if let Some(base) = name.strip_suffix(".A") {
                map.entry(base.to_string()).or_default().0 = v.clone();
            } else if let Some(base) = name.strip_suffix(".B") {
                map.entry(base.to_string()).or_default().1 = v.clone();
            }
        }
        map
    });
    if let Some(a) = &adapter {
        for t in &m.lora.tensors {
            if !a.contains_key(&t.name) {
                return Err(ferr(model, format!("the adapter has no {}.A/.B", t.name)));
            }
        }
    }
    let mut report = ExportReport {
        merged: vec![],
        fp16_weights: 0,
        optimized: vec![],
        bytes_in: 0,
        bytes_out: 0,
    };
    // fp16 storage comes last: ORT's constant folding would turn Cast(fp16 weight) back into
    // fp32 — and does so to a package stored in fp16, which is therefore stored in fp16 again
    // (only the graphs the optimiser rewrote: the others keep their storage as it was).
    let source_fp16 = before.weights_fp16 || m.dtype == "fp16";
    let fp16 = opts.fp16 || (opts.optimize && source_fp16);
    let inference = [&m.graphs.vision, &m.graphs.embedding, &m.graphs.decoder];
    let to_fp16: Vec<String> = match (opts.fp16, fp16) {
        (true, _) => graphs.to_vec(),
        (false, true) => inference.iter().map(|g| g.to_string()).collect(),
        (false, false) => vec![],
    };
    // Each graph is written once: in fp16 right away, or (an optimised one) after ONNX Runtime
    // has rewritten it.
    let optimised = |file: &String| opts.optimize && inference.contains(&file);
    let total = graphs.len() + if opts.optimize { inference.len() } else { 0 };
    let mut done = 0;
    let mut stage = |graph: &str, what| {
        done += 1;
        progress(Stage {
            graph,
            what,
            done,
            total,
        });
    };
    // The graphs' external data files (rewritten with the graphs, not copied), and which graphs
    // keep their weights in one.
    let mut data_files = std::collections::BTreeSet::new();
    let mut external = std::collections::HashSet::new();
    // The graphs that keep their weights outside share one file, each tensor stored once
    // (SharedWeights then hands every session the same copy).
    let data_path = tmp.join(WEIGHTS_FILE);
    let mut data: Option<DataFile> = None;
    // Adapter name → (the weight it was merged into, its merged values), for merges by name.
    let mut by_name = std::collections::HashMap::new();
    for file in &graphs {
        let src = pkg.graph_path(file);
        let mut g = Graph::open_file(&src).map_err(|e| ferr(&src, e))?;
        report.bytes_in += std::fs::metadata(&src).map_or(0, |m| m.len()) + g.external_bytes;
        data_files.extend(g.external_files.iter().cloned());
        if let Some(a) = &adapter {
            // (the language model's graphs take its tensors, the vision graphs the tower's)
            let inputs = g.inputs();
            let aimed = a
                .keys()
                .filter(|n| inputs.contains(&format!("{n}.A")))
                .count();
            // vision_grad.onnx (the vision tower's backward) takes the weights vision.onnx's
            // merge made: the exporter pruned its last projection's LoRA branch, whose output
            // only the backward pass needed.
            let merged = if *file == m.graphs.vision_grad {
                g.merge_lora_by_name(&by_name)
            } else {
                g.merge_lora_weights(a, m.lora.scale as f32).map(|pairs| {
                    let mut names = Vec::new();
                    for (n, w) in pairs {
                        if let Some(v) = g.initializer(&w).and_then(|t| t.values()) {
                            by_name.insert(n.clone(), (w, v));
                        }
                        names.push(n);
                    }
                    names
                })
            }
            .map_err(|e| ferr(&src, e))?;
            if merged.len() != aimed {
                return Err(ferr(
                    &src,
                    format!("merged {} of its {aimed} LoRA targets", merged.len()),
                ));
            }
            report.merged.push((file.clone(), merged));
        }
        let dst = tmp.join(file);
        if g.needs_external() {
            external.insert(file.clone());
        }
        if to_fp16.contains(file) && !optimised(file) {
            report.fp16_weights += g.store_weights_fp16(1024);
        }
        let shared = shared_data(&mut data, &data_path, external.contains(file))?;
        g.save(&dst, shared).map_err(|e| ferr(&dst, e))?;
        stage(file, "written");
    }
    // Every other top-level file (tokenizer, configs, manifest) is copied as is — never over a
    // data file just written.
    for e in std::fs::read_dir(model)
        .map_err(|e| ferr(model, e))?
        .flatten()
    {
        let name = e.file_name().to_string_lossy().into_owned();
        let ours = graphs.contains(&name) || data_files.contains(&name) || tmp.join(&name).exists();
        if e.path().is_file() && !ours {
            std::fs::copy(e.path(), tmp.join(&name)).map_err(|er| ferr(&e.path(), er))?;
        }
    }
    if opts.optimize {
        let env = environment(ort_lib).map_err(PackageError::from)?;
        // The inference graphs; the training graphs keep their exported form (their gradient
        // outputs are what the trainer checks against autograd).
        for file in inference {
            let p = tmp.join(file);
            let opt = tmp.join(format!("{file}.opt"));
            let opt_data = format!("{file}.opt.data");
            let large = external.contains(file);
            optimise(env, &p, &opt, large.then_some(opt_data.as_str()))?;
            if large || to_fp16.contains(file) {
                // In fp16 where asked, and back under the graph's own data file name.
                let mut g = Graph::open_file(&opt).map_err(|e| ferr(&opt, e))?;
                if to_fp16.contains(file) {
                    report.fp16_weights += g.store_weights_fp16(1024);
                }
                let shared = shared_data(&mut data, &data_path, large)?;
                g.save(&p, shared).map_err(|e| ferr(&p, e))?;
                std::fs::remove_file(&opt).map_err(|e| ferr(&opt, e))?;
                if large {
                    let d = tmp.join(&opt_data);
                    std::fs::remove_file(&d).map_err(|e| ferr(&d, e))?;
                }
            } else {
                std::fs::rename(&opt, &p).map_err(|e| ferr(&p, e))?;
            }
            report.optimized.push(file.clone());
            stage(file, "optimised");
        }
    }
    // The manifest records what was done.
    let mp = tmp.join("manifest.json");
    let mut mv: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&mp).map_err(|e| ferr(&mp, e))?)
            .map_err(|e| ferr(&mp, e))?;
    // Earlier exports' work is kept in the record: an optimised graph stays optimised, merged
    // weights stay merged.
    let mut optimized = before.optimized.clone();
    for g in &report.optimized {
        if !optimized.contains(g) {
            optimized.push(g.clone());
        }
    }
    mv["exported"] = serde_json::json!({
        "from": model.display().to_string(),
        "adapter_merged": adapter.is_some() || before.adapter_merged,
        "weights_fp16": fp16 || before.weights_fp16,
        "ort_optimized": optimized,
    });
    std::fs::write(&mp, serde_json::to_vec_pretty(&mv).expect("json")).map_err(|e| ferr(&mp, e))?;
    drop(data);
    for f in graphs.iter().map(String::as_str).chain([WEIGHTS_FILE]) {
        report.bytes_out += std::fs::metadata(tmp.join(f)).map_or(0, |m| m.len());
    }
    if out.exists() {
        // In place or over an older package: only the files this export wrote are replaced;
        // anything else in the folder (notes, runs, the source's `hf/` and `goldens/`) stays.
        let in_place = crate::same_path(model, out);
        replace_package(&tmp, out, in_place.then_some(&data_files))?;
    } else {
        std::fs::rename(&tmp, out).map_err(|e| ferr(out, e))?;
    }
    Ok(report)
}

/// The package's shared data file for a graph that keeps its weights outside (`external`),
/// created at `path` by the first such graph; `None` for a graph with its weights inline.
fn shared_data<'a>(
    data: &'a mut Option<DataFile>,
    path: &Path,
    external: bool,
) -> Result<Option<&'a mut DataFile>, ExportError> {
    if !external {
        return Ok(None);
    }
    if data.is_none() {
        *data = Some(DataFile::create(path).map_err(|e| ferr(path, e))?);
    }
    Ok(data.as_mut())
}

/// Moves every file of the finished export `tmp` into the existing package `out` (one rename
/// each, over the old file of that name) and removes what belonged to the old package's graphs
/// alone: a graph or `{graph}.data` the new package no longer has, and (`old_data`, an export
/// in place) the external data files the old graphs read. Nothing else in `out` is touched.
fn replace_package(
    tmp: &Path,
    out: &Path,
    old_data: Option<&std::collections::BTreeSet<String>>,
) -> Result<(), ExportError> {
    let mut stale: Vec<String> = old_data.into_iter().flatten().cloned().collect();
    // The old manifest's graph names (read alone: the old package need not be whole).
    let old: serde_json::Value = std::fs::read(out.join("manifest.json"))
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok())
        .unwrap_or_default();
    for f in old["graphs"]
        .as_object()
        .into_iter()
        .flat_map(|g| g.values())
    {
        // A plain file name in the folder, never a path out of it.
        if let Some(f) = f
            .as_str()
            .filter(|f| !f.is_empty() && !f.contains(['/', '\\']))
        {
            stale.push(f.to_string());
            stale.push(format!("{f}.data"));
        }
    }
    let mut written = Vec::new();
    for e in std::fs::read_dir(tmp).map_err(|e| ferr(tmp, e))? {
        let e = e.map_err(|e| ferr(tmp, e))?;
        written.push(e.file_name().to_string_lossy().into_owned());
    }
    // The manifest last: until it is in, the folder still reads as the package it was.
    written.sort_by_key(|n| n == "manifest.json");
    for name in &written {
        let dst = out.join(name);
        std::fs::rename(tmp.join(name), &dst).map_err(|e| ferr(&dst, e))?;
    }
    for name in stale {
        let p = out.join(&name);
        if !written.contains(&name) && p.is_file() {
            std::fs::remove_file(&p).map_err(|e| ferr(&p, e))?;
        }
    }
    Ok(())
}
