//! `ssrl eval`: a package on held-out tasks or a spatial benchmark; `--compare`.

use super::*;

#[derive(clap::Args)]
pub struct EvalArgs {
    /// Package folder, or an onnxruntime-genai Qwen2.5-VL folder (genai_config.json; no
    /// adapter then).
    #[arg(long, value_name = "DIR", required_unless_present = "compare")]
    pub(crate) model: Option<PathBuf>,
    /// LoRA to apply: a checkpoint folder or a PEFT adapter folder.
    #[arg(long, value_name = "DIR")]
    pub(crate) adapter: Option<PathBuf>,
    /// What the data file holds; sets the prompts, image sizes, token budget and scoring of
    /// that benchmark's official evaluation.
    #[arg(long, value_enum, default_value = "pretext")]
    pub(crate) bench: spatial_ssrl::eval::Bench,
    /// The items: `ssrl tasks` output (.parquet / .jsonl, or its folder: every shard),
    /// ViewSpatial-Bench / What'sUp / VSI-Bench JSON, or a VLMEvalKit multiple-choice TSV.
    #[arg(long, value_name = "FILE", required_unless_present = "compare")]
    pub(crate) data: Option<PathBuf>,
    /// Image paths and VSI-Bench video folders resolve against this (default: the folder above
    /// the data file's folder; for a task dataset, its own folder or one of the two above it,
    /// whichever holds its first image).
    #[arg(long, value_name = "DIR")]
    pub(crate) images: Option<PathBuf>,
    /// Run folder: items.jsonl, summary.json, run.json. An interrupted run continues where it
    /// stopped.
    #[arg(long, value_name = "DIR", required_unless_present = "compare")]
    pub(crate) out: Option<PathBuf>,
    /// Prompts per generation call.
    #[arg(long, default_value_t = 8, value_parser = at_least_one)]
    pub(crate) batch: usize,
    /// Default: the benchmark's official budget (4096 for ViewSpatial, What'sUp and VSI-Bench,
    /// 2048 otherwise).
    #[arg(long, value_parser = at_least_one)]
    pub(crate) max_new_tokens: Option<usize>,
    /// 0 = greedy (the default, as the paper evaluates).
    #[arg(long, default_value_t = 0.0, value_parser = temperature, allow_negative_numbers = true)]
    pub(crate) temperature: f32,
    /// Sample from the k most likely tokens only (0 = all).
    #[arg(long, default_value_t = 0)]
    pub(crate) top_k: usize,
    /// Sample from the most likely tokens whose mass reaches P (1 = all).
    #[arg(long, default_value_t = 1.0, value_parser = top_p, allow_negative_numbers = true)]
    pub(crate) top_p: f32,
    #[arg(long, default_value_t = 0)]
    pub(crate) seed: u64,
    /// Ask for the answer directly (each benchmark's non-reasoning prompt) instead of the
    /// reasoning prompt with the training format sentence.
    #[arg(long, alias = "direct")]
    pub(crate) no_format_prompt: bool,
    /// VSI-Bench: frames sampled uniformly from each video folder.
    #[arg(long, default_value_t = 128, value_parser = at_least_one)]
    pub(crate) frames: usize,
    /// TSV: accept these extra columns (comma-separated) instead of refusing the file.
    #[arg(long, value_delimiter = ',', value_name = "COL")]
    pub(crate) allow_columns: Vec<String>,
    /// Evaluate the first N items only.
    #[arg(long, value_parser = at_least_one)]
    pub(crate) limit: Option<usize>,
    /// Print two finished runs side by side with deltas instead of evaluating.
    #[arg(long, num_args = 2, value_names = ["RUN_A", "RUN_B"])]
    pub(crate) compare: Vec<PathBuf>,
    /// libonnxruntime.so to load (default: $ORT_DYLIB_PATH, then vendor/ort).
    #[arg(long, value_name = "FILE")]
    pub(crate) ort_lib: Option<PathBuf>,
    #[command(flatten)]
    pub(crate) device: DeviceArgs,
}

pub(crate) fn pct(v: Option<f64>) -> String {
    v.map_or("-".into(), |v| format!("{:.1}", 100.0 * v))
}

pub fn run_eval(a: EvalArgs) -> Result<()> {
    if let [ra, rb] = a.compare.as_slice() {
        let (sa, sb) = (
            spatial_ssrl::eval::read_summary(ra)?,
            spatial_ssrl::eval::read_summary(rb)?,
        );
        let rows = spatial_ssrl::eval::compare(&sa, &sb);
        // Runs that measured different things get no deltas: their accuracies are side by
        // side, and why they are not comparable is said first.
        let differ = spatial_ssrl::eval::differences(&sa, &sb);
        if !differ.is_empty() {
            eprintln!(
                "warning: the runs are not comparable ({}): no deltas",
                differ.join("; ")
            );
        }
        let w = rows
            .iter()
            .map(|(k, ..)| k.chars().count())
            .max()
            .unwrap_or(8);
        outln!("{:<w$} {:>8} {:>8} {:>8}", "", "A %", "B %", "B − A");
        for (k, x, y) in rows {
            let d = match (x, y) {
                (Some(x), Some(y)) if differ.is_empty() => format!("{:+.1}", 100.0 * (y - x)),
                _ => "-".into(),
            };
            outln!("{k:<w$} {:>8} {:>8} {d:>8}", pct(x), pct(y));
        }
        outln!("A = {}\nB = {}", ra.display(), rb.display());
        if !differ.is_empty() {
            outln!("not comparable: {}", differ.join("; "));
        }
        return Ok(());
    }
    // Under mpirun / srun the items are dealt over the ranks; rank 0 writes the folder.
    let world = spatial_ssrl::dist::init()?;
    world.announce("the items are dealt over them, rank 0 writes the folder");
    let (model, data, out) = (
        a.model.expect("clap requires it"),
        a.data.expect("clap requires it"),
        a.out.expect("clap requires it"),
    );
    let mut cfg = spatial_ssrl::eval::EvalConfig::new(
        a.bench,
        data,
        out.clone(),
        model.display().to_string(),
    );
    cfg.images_root = a.images;
    cfg.batch = a.batch;
    cfg.max_new_tokens = a.max_new_tokens;
    cfg.sampling = spatial_ssrl::kernels::SamplingParams {
        temperature: a.temperature,
        top_k: a.top_k,
        top_p: a.top_p,
        seed: a.seed,
    };
    cfg.reasoning = !a.no_format_prompt;
    cfg.frames = a.frames;
    cfg.allow_columns = a.allow_columns;
    cfg.limit = a.limit;
    cfg.adapter = a.adapter.as_ref().map(|p| p.display().to_string());
    // The data and the adapter are checked before the model is loaded.
    let items = spatial_ssrl::eval::load(&cfg)?;
    let lora = (a.adapter.as_deref())
        .map(|d| adapter_tensors(d, &model))
        .transpose()?;
    let mut engine = a.device.open(
        &model,
        a.ort_lib.as_deref(),
        cfg.batch,
        cfg.max_new_tokens.unwrap_or(4096),
        None,
    )?;
    if let Some(t) = &lora {
        engine.set_lora(t)?;
    }
    let pb = styled(rank_bar(0), "{bar:30} {pos}/{len} items · ETA {eta}");
    let s = spatial_ssrl::eval::run_items(&mut engine, &cfg, &items, |done, total| {
        pb.set_length(total as u64);
        pb.set_position(done as u64);
    })?;
    pb.finish_and_clear();
    if !world.is_root() {
        return Ok(());
    }
    let rows: Vec<(&str, &spatial_ssrl::eval::Score)> = std::iter::once(("overall", &s.overall))
        .chain(s.by_category.iter().map(|(k, v)| (k.as_str(), v)))
        .chain(s.by_variant.iter().map(|(k, v)| (k.as_str(), v)))
        .collect();
    let title = format!(
        "{} ({})",
        s.bench,
        if s.reasoning { "reasoning" } else { "direct" }
    );
    let w = rows
        .iter()
        .map(|(k, _)| k.chars().count())
        .chain([title.chars().count()])
        .max()
        .unwrap_or(8);
    let strict = s.overall.strict_accuracy.is_some();
    // The share of responses in the reasoning format, where the prompt asks for it.
    let format = s.reasoning && s.overall.format_rate.is_some();
    outln!(
        "{:<w$} {:>6} {:>8}{}{}",
        title,
        "items",
        "acc %",
        if strict { "  strict %" } else { "" },
        if format { "  format %" } else { "" }
    );
    for (k, v) in rows {
        let st = v
            .strict_accuracy
            .map_or(String::new(), |x| format!("  {:>8.1}", 100.0 * x));
        let fr = match (format, v.format_rate) {
            (true, Some(x)) => format!("  {:>8.1}", 100.0 * x),
            _ => String::new(),
        };
        outln!("{k:<w$} {:>6} {:>8.1}{st}{fr}", v.items, 100.0 * v.accuracy);
    }
    for (k, v) in &s.grouped {
        outln!(
            "{k:<w$} {:>6} {:>8.1}  (groups)",
            v.items,
            100.0 * v.accuracy
        );
    }
    outln!(
        "items: {}, summary: {}",
        out.join("items.jsonl").display(),
        out.join("summary.json").display()
    );
    Ok(())
}
