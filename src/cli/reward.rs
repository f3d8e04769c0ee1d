//! `ssrl reward`: the verifiable reward of JSON lines on standard input.

use super::*;

#[derive(clap::Args)]
pub(crate) struct RewardArgs {
    /// JSONL file of {response, answer}; standard input when omitted or `-`. Output line N
    /// scores input line N (a blank line stays blank).
    pub(crate) file: Option<PathBuf>,
    /// Weight of the format score in `overall`.
    #[arg(long, default_value_t = 0.1)]
    pub(crate) format_weight: f64,
}

#[derive(serde::Deserialize)]
pub(crate) struct RewardIn {
    pub(crate) response: String,
    #[serde(alias = "ground_truth")]
    pub(crate) answer: String,
}

pub(crate) fn run_reward(a: RewardArgs) -> Result<()> {
    let cfg = RewardConfig {
        format_weight: a.format_weight,
    };
    // `-` is standard input, as for most filters.
    let file = a.file.filter(|p| p.as_os_str() != "-");
    let name = file
        .as_ref()
        .map(|p| p.display().to_string())
        .unwrap_or_else(|| "<stdin>".into());
    let input: Box<dyn BufRead> = match &file {
        Some(p) => Box::new(std::io::BufReader::new(
            std::fs::File::open(p).with_context(|| format!("{}: cannot open", p.display()))?,
        )),
        None => Box::new(std::io::stdin().lock()),
    };
    let stdout = std::io::stdout();
    let mut out = std::io::BufWriter::new(stdout.lock());
    for (i, line) in input.lines().enumerate() {
        let line = line.with_context(|| format!("{name}: read error at line {}", i + 1))?;
        // Output line N answers input line N: a blank line gives a blank line.
        if line.trim().is_empty() {
            out.write_all(b"\n")?;
            continue;
        }
        let r: RewardIn = serde_json::from_str(&line).with_context(|| {
            format!(
                "{name}:{}: expected {{\"response\": string, \"answer\": string}}",
                i + 1
            )
        })?;
        let s = spatial_ssrl::reward::score(&r.response, &r.answer, &cfg);
        serde_json::to_writer(&mut out, &s)?;
        out.write_all(b"\n")?;
    }
    out.flush()?;
    Ok(())
}
