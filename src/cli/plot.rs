//! `ssrl plot`: a run's metrics drawn as curves.

use super::*;

#[derive(clap::Args)]
pub struct PlotArgs {
    /// Run folder (holds metrics.jsonl).
    #[arg(value_name = "RUN")]
    pub(crate) run: PathBuf,
    /// Output PNG (default: RUN/curves.png).
    #[arg(long, value_name = "FILE")]
    pub(crate) out: Option<PathBuf>,
    /// Metrics to draw, comma-separated (default: those of the run among SFT loss, token
    /// accuracy, lr and grad norm, GRPO rewards, KL, entropy, grad norm, lengths).
    #[arg(long, value_delimiter = ',')]
    pub(crate) keys: Vec<String>,
}

/// Draws `rows` (the run's metrics) to `out`; false when none of `keys` has a value.
pub(crate) fn write_plot(
    run: &Path,
    rows: &[spatial_ssrl::train::Metrics],
    out: &Path,
    keys: &[String],
) -> Result<bool> {
    let keys: Vec<&str> = if keys.is_empty() {
        spatial_ssrl::train::plot::DEFAULT_KEYS.to_vec()
    } else {
        keys.iter().map(String::as_str).collect()
    };
    let title = format!(
        "{} — {} steps",
        run.display(),
        rows.iter()
            .filter_map(|m| m.get("step"))
            .fold(0.0f64, |a, b| a.max(*b))
    );
    let Some(img) = spatial_ssrl::train::plot::plot(rows, &keys, &title) else {
        return Ok(false);
    };
    img.save(out)
        .with_context(|| format!("{}: cannot write", out.display()))?;
    Ok(true)
}

pub fn run_plot(a: PlotArgs) -> Result<()> {
    let out = a.out.unwrap_or_else(|| a.run.join("curves.png"));
    // Metrics asked for by name must be in the run: a typo is named, with what there is.
    let rows = spatial_ssrl::train::read_metrics(&a.run.join("metrics.jsonl"))?;
    let have: std::collections::BTreeSet<&str> = rows
        .iter()
        .flat_map(|m| m.keys().map(String::as_str))
        .filter(|k| *k != "step")
        .collect();
    let missing: Vec<&str> = (a.keys.iter().map(String::as_str))
        .filter(|k| !have.contains(k))
        .collect();
    let listed = || have.iter().copied().collect::<Vec<_>>().join(", ");
    if !missing.is_empty() && missing.len() == a.keys.len() {
        bail!(
            "{}: no metric {} in metrics.jsonl; it has {}",
            a.run.display(),
            missing.join(", "),
            listed()
        );
    }
    if !missing.is_empty() {
        eprintln!(
            "warning: not in {}/metrics.jsonl, left out: {} (it has {})",
            a.run.display(),
            missing.join(", "),
            listed()
        );
    }
    if !write_plot(&a.run, &rows, &out, &a.keys)? {
        bail!("{}: no metric to draw in metrics.jsonl", a.run.display());
    }
    outln!("wrote {}", out.display());
    Ok(())
}
