//! `ssrl export`: a deployment copy of a package, an adapter merged in.

use super::*;

#[derive(clap::Args)]
pub struct ExportArgs {
    /// Package folder to start from.
    #[arg(long, value_name = "DIR")]
    pub(crate) model: PathBuf,
    /// LoRA to merge into the weights: a checkpoint folder (checkpoints/global_step_N) or a
    /// PEFT adapter folder (adapter_model.safetensors).
    #[arg(long, value_name = "DIR")]
    pub(crate) adapter: Option<PathBuf>,
    /// Output package folder. Over an existing package (the source itself too) only the
    /// files the export writes are replaced, once all are written; other files and folders
    /// there (notes, runs, hf/, goldens/) stay. Any other existing folder is refused.
    #[arg(long, value_name = "DIR")]
    pub(crate) out: PathBuf,
    /// Store weights as fp16 (half the size; arithmetic stays fp32).
    #[arg(long)]
    pub(crate) fp16: bool,
    /// Apply ONNX Runtime's extended graph optimisations offline to the inference graphs
    /// (do it on the kind of machine you deploy to).
    #[arg(long)]
    pub(crate) optimize: bool,
    /// libonnxruntime.so to load (default: $ORT_DYLIB_PATH, then vendor/ort).
    #[arg(long, value_name = "FILE")]
    pub(crate) ort_lib: Option<PathBuf>,
}

/// An adapter's tensors as `(package input name, values)`, from a checkpoint or PEFT folder,
/// checked against `model`'s LoRA inputs and at the scale its `adapter_config.json` gives.
pub(crate) fn adapter_tensors(dir: &Path, model: &Path) -> Result<Vec<(String, Vec<f32>)>> {
    let spec = spatial_ssrl::model::package::Package::open(model)?
        .manifest
        .lora;
    Ok(
        spatial_ssrl::train::checkpoint::load_adapter_for(dir, &spec)?
            .into_iter()
            .map(|t| (t.name, t.data))
            .collect(),
    )
}

pub fn run_export(a: ExportArgs) -> Result<()> {
    use spatial_ssrl::model::export::{export_with, ExportOptions};
    let adapter = (a.adapter.as_deref())
        .map(|d| adapter_tensors(d, &a.model))
        .transpose()?;
    // A large model's graphs take minutes each: a bar over the stages, each stage's time.
    let pb = styled(
        ProgressBar::new(0),
        "{bar:30} {pos}/{len} · {msg} · {elapsed}",
    );
    let t = std::time::Instant::now();
    let mut last = 0.0;
    let r = export_with(
        &a.model,
        &a.out,
        &ExportOptions {
            adapter,
            fp16: a.fp16,
            optimize: a.optimize,
        },
        a.ort_lib.as_deref(),
        |s| {
            let now = t.elapsed().as_secs_f64();
            pb.set_length(s.total as u64);
            pb.set_position(s.done as u64);
            pb.set_message(format!("{} {}", s.graph, s.what));
            if now - last >= 1.0 {
                say(
                    &pb,
                    format!("  {}: {} ({:.1} s)", s.graph, s.what, now - last),
                );
            }
            last = now;
        },
    );
    pb.finish_and_clear();
    let r = r?;
    for (file, targets) in &r.merged {
        if !targets.is_empty() {
            outln!("{file}: merged {}", targets.join(", "));
        }
    }
    if r.fp16_weights > 0 {
        let kept = if a.fp16 {
            ""
        } else {
            " again (the package was stored in fp16; the optimiser had widened them)"
        };
        outln!("{} weight tensors stored as fp16{kept}", r.fp16_weights);
    }
    if !r.optimized.is_empty() {
        outln!("optimised offline: {}", r.optimized.join(", "));
    }
    outln!(
        "wrote {} (graphs {:.1} MB → {:.1} MB)",
        a.out.display(),
        r.bytes_in as f64 / 1e6,
        r.bytes_out as f64 / 1e6
    );
    Ok(())
}
