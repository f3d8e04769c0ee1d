//! Benchmark readers: each file format becomes a list of [`BenchItem`]s carrying the prompt
//! byte for byte as the benchmark's official evaluation builds it, where the images come from,
//! the reference answer and the scoring rule. Errors name the file and the item (and its line).

use super::score::{self, Scored};
use crate::data::images::{decode_rgb, image_size_of, load_rgb};
use crate::data::records::{read_dataset, ImageRef, SampleRecord};
use crate::data::FORMAT_SENTENCE;
use base64::Engine as _;
use image::RgbImage;
use serde_json::value::RawValue;
use serde_json::Value;
use std::collections::{BTreeSet, HashMap, HashSet};
use std::path::{Path, PathBuf};

/// One patch of the vision tower's 28×28 merged grid, in pixels.
const PATCH: u64 = 28 * 28;

/// Which benchmark a data file holds.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize, clap::ValueEnum,
)]
#[serde(rename_all = "lowercase")]
pub enum Bench {
    /// Held-out pretext tasks written by `ssrl tasks` (.parquet / .jsonl).
    Pretext,
    /// ViewSpatial-Bench JSON (question_type, image_path, question, choices, answer).
    Viewspatial,
    /// What'sUp JSON (image_path, caption_options; the first caption is the right one).
    Whatsup,
    /// VSI-Bench JSON / JSONL / Parquet; each video is a folder of frames.
    Vsi,
    /// VLMEvalKit multiple-choice TSV (3DSRBench, SpatialEval, CV-Bench, …).
    Mcq,
}

impl Bench {
    pub fn name(self) -> &'static str {
        match self {
            Bench::Pretext => "pretext",
            Bench::Viewspatial => "viewspatial",
            Bench::Whatsup => "whatsup",
            Bench::Vsi => "vsi",
            Bench::Mcq => "mcq",
        }
    }

    /// The official evaluation's generation budget.
    pub fn max_new_tokens(self) -> usize {
        match self {
            Bench::Pretext | Bench::Mcq => 2048,
            Bench::Viewspatial | Bench::Whatsup | Bench::Vsi => 4096,
        }
    }

    /// `(min_pixels, max_pixels)` per image as the official evaluation sets them; `None` keeps
    /// the package's preprocessor bounds. VSI-Bench frames share the video path's budget of
    /// 24,576 patches (`qwen_vl_utils`), split over the frames: frames go in as images, which
    /// the video path would have merged in pairs, so the visual token count stays the same.
    pub fn pixels(self, frames: usize) -> Option<(u64, u64)> {
        match self {
            Bench::Pretext => None,
            Bench::Viewspatial => Some((256 * PATCH, 1280 * PATCH)),
            Bench::Whatsup => Some((4 * PATCH, 512 * PATCH)),
            Bench::Mcq => Some((1280 * PATCH, 16384 * PATCH)),
            Bench::Vsi => {
                let min = 128 * PATCH;
                let share = 24576 * PATCH / frames.max(1) as u64;
                Some((min, share.clamp(min * 21 / 20, 768 * PATCH)))
            }
        }
    }
}

/// Where an item's image comes from; decoded batch by batch.
#[derive(Debug, Clone, PartialEq)]
pub enum ImageSource {
    File(PathBuf),
    /// Resized to exactly `(width, height)` first (ViewSpatial's `resized_width/height`).
    Resized(PathBuf, u32, u32),
    /// Base64 bytes from a TSV cell; the path names the file for errors.
    Base64(std::sync::Arc<str>, String),
    /// An image stored in a data file (a Parquet `Image` struct's bytes), and its name.
    Stored(std::sync::Arc<[u8]>, String),
}

impl ImageSource {
    /// `(width, height)` as [`ImageSource::load`] gives it, from the file's header (a TSV
    /// cell's base64 is decoded, its pixels are not).
    pub fn size(&self) -> Result<(u32, u32), crate::data::images::ImageError> {
        match self {
            ImageSource::File(p) => crate::data::images::image_size(p),
            ImageSource::Resized(_, w, h) => Ok((*w, *h)),
            ImageSource::Base64(b64, name) => {
                image_size_of(&base64_bytes(b64, name)?, Path::new(name))
            }
            ImageSource::Stored(bytes, name) => image_size_of(bytes, Path::new(name)),
        }
    }

    pub fn load(&self) -> Result<RgbImage, crate::data::images::ImageError> {
        match self {
            ImageSource::File(p) => load_rgb(p),
            ImageSource::Resized(p, w, h) => Ok(image::imageops::resize(
                &load_rgb(p)?,
                *w,
                *h,
                image::imageops::FilterType::CatmullRom,
            )),
            ImageSource::Base64(b64, name) => {
                decode_rgb(&base64_bytes(b64, name)?, Path::new(name))
            }
            ImageSource::Stored(bytes, name) => decode_rgb(bytes, Path::new(name)),
        }
    }
}

/// The bytes of a TSV cell's base64 image (`name` names it in errors).
fn base64_bytes(b64: &str, name: &str) -> Result<Vec<u8>, crate::data::images::ImageError> {
    base64::engine::general_purpose::STANDARD
        .decode(b64.trim().as_bytes())
        .map_err(|e| {
            crate::data::images::ImageError::new(
                crate::data::images::ImageFault::Decode,
                Path::new(name),
                format!("image is not base64: {e}"),
            )
        })
}

/// How a response is scored.
#[derive(Debug, Clone, PartialEq)]
pub enum Rule {
    /// The training reward's answer check (EasyR1 boxed extraction, exact string).
    Pretext,
    Viewspatial,
    /// What'sUp: the letter of the right caption.
    Whatsup(char),
    Vsi,
    Mcq(Vec<(char, String)>),
}

#[derive(Debug, Clone, PartialEq)]
pub struct BenchItem {
    pub id: String,
    pub category: String,
    pub variant: String,
    /// The user text, `<image>` where each image goes, used verbatim.
    pub prompt: String,
    pub images: Vec<ImageSource>,
    pub answer: String,
    pub rule: Rule,
    /// 3DSRBench's question id (`XXXXXXXX`, circular variants `XXXXXXXX…`, flipped images
    /// `…-flip`), for its grouped accuracies.
    pub qid: Option<String>,
    /// CV-Bench-2D's image source (ADE20K, COCO): its overall accuracy is the mean of the
    /// sources' accuracies. Set only where every row of the file is of split `2D`.
    pub source: Option<String>,
}

impl BenchItem {
    pub fn score(&self, response: &str, reasoning: bool) -> Scored {
        match &self.rule {
            Rule::Pretext => {
                let r = crate::reward::score(
                    response,
                    &self.answer,
                    &crate::reward::RewardConfig::default(),
                );
                Scored {
                    score: r.accuracy,
                    predicted: r.predicted,
                    strict: None,
                }
            }
            Rule::Viewspatial => score::viewspatial(response, &self.answer, reasoning),
            Rule::Whatsup(label) => score::whatsup(response, *label, reasoning),
            Rule::Vsi => score::vsi(response, &self.answer, reasoning),
            Rule::Mcq(choices) => score::multiple_choice(response, &self.answer, choices),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    #[error("{}: {msg}", path.display())]
    File { path: PathBuf, msg: String },
    /// The file cannot be opened or parsed: the reader's or the system's error as the source.
    #[error("{}", path.display())]
    Cause {
        path: PathBuf,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// A pretext set, as the task writer's reader reports it (it names the file).
    #[error(transparent)]
    Samples(#[from] crate::data::records::WriteError),
}

/// What a reader needs besides the file.
#[derive(Debug, Clone)]
pub struct ReadOptions {
    /// Image paths and frame folders resolve against this.
    pub images_root: PathBuf,
    /// `images_root` is a default, not the user's: a task dataset's (`Bench::Pretext`) folder
    /// is found from its own image paths (see `detect_images_root`).
    pub detect_root: bool,
    /// The reasoning prompt (the training format sentence) instead of "answer directly".
    pub reasoning: bool,
    /// VSI-Bench: frames sampled per video.
    pub frames: usize,
    /// TSV columns to accept besides the known ones.
    pub allow_columns: Vec<String>,
}

/// Reads `path` as `bench`.
pub fn read(bench: Bench, path: &Path, opt: &ReadOptions) -> Result<Vec<BenchItem>, ReadError> {
    let err = |msg: String| ReadError::File {
        path: path.to_path_buf(),
        msg,
    };
    // Each JSON item through `parse`; an error names the item and its line.
    let each = |parse: &dyn Fn(usize, &Value) -> Result<BenchItem, String>| {
        json_items(path)?
            .iter()
            .map(|(i, line, v)| {
                parse(*i, v).map_err(|m| err(format!("item {i} (line {line}): {m}")))
            })
            .collect::<Result<Vec<_>, _>>()
    };
    let items = match bench {
        Bench::Pretext => pretext(path, opt)?,
        Bench::Viewspatial => each(&|i, v| viewspatial(i, v, opt))?,
        Bench::Whatsup => {
            let stem = path.file_stem().map_or("whatsup".into(), |s| {
                s.to_string_lossy().trim_end_matches("_dataset").to_string()
            });
            each(&|i, v| whatsup(i, v, &stem, opt))?
        }
        Bench::Vsi => each(&|i, v| vsi(i, v, opt))?,
        Bench::Mcq => return tsv(path, opt),
    };
    let mut seen = HashSet::new();
    for it in &items {
        if !seen.insert(it.id.as_str()) {
            return Err(err(format!("id {:?} appears twice", it.id)));
        }
    }
    check_files(&items).map_err(err)?;
    Ok(items)
}

/// Every image file exists (checked up front, so a run does not stop half-way on a typo).
fn check_files(items: &[BenchItem]) -> Result<(), String> {
    for it in items {
        for src in &it.images {
            if let ImageSource::File(p) | ImageSource::Resized(p, ..) = src {
                if !p.is_file() {
                    return Err(format!("item {}: image {} not found", it.id, p.display()));
                }
            }
        }
    }
    Ok(())
}

fn pretext(path: &Path, opt: &ReadOptions) -> Result<Vec<BenchItem>, ReadError> {
    let given = (!opt.detect_root).then_some(opt.images_root.as_path());
    let samples = read_dataset(path, given, usize::MAX)?;
    if let Some(i) = samples.iter().position(|(s, _)| s.answer.is_empty()) {
        return Err(ReadError::File {
            path: path.to_path_buf(),
            msg: format!(
                "sample {} ({}) has no answer to score against",
                i + 1,
                samples[i].0.id
            ),
        });
    }
    Ok(samples
        .iter()
        .map(|(s, root): &(SampleRecord, PathBuf)| {
            let variant = s
                .meta
                .get("variant")
                .or_else(|| s.meta.get("geometry"))
                .and_then(Value::as_str)
                .unwrap_or("-");
            // EasyR1's user turn: the trimmed problem, then one space and the format sentence.
            let prompt = match opt.reasoning {
                true => format!("{} {FORMAT_SENTENCE}", s.problem.trim()),
                false => s.problem.trim().to_string(),
            };
            BenchItem {
                id: s.id.clone(),
                category: s.task.clone(),
                variant: variant.to_string(),
                prompt,
                images: s
                    .images
                    .iter()
                    .map(|i| match i {
                        ImageRef::File(p) => ImageSource::File(root.join(p)),
                        ImageRef::Embedded { name, bytes } => {
                            ImageSource::Stored(bytes.clone(), name.clone())
                        }
                    })
                    .collect(),
                answer: s.answer.clone(),
                rule: Rule::Pretext,
                qid: None,
                source: None,
            }
        })
        .collect())
}

/// [`ReadError::Cause`] of `path`.
fn cause<E: Into<Box<dyn std::error::Error + Send + Sync>>>(
    path: &Path,
) -> impl Fn(E) -> ReadError + '_ {
    move |e| ReadError::Cause {
        path: path.to_path_buf(),
        source: e.into(),
    }
}

/// A JSON array, JSON lines or a Parquet file (as the Hugging Face copies ship) as
/// `(index, line, value)`; syntax errors name the line (Parquet: the row).
fn json_items(path: &Path) -> Result<Vec<(usize, usize, Value)>, ReadError> {
    let err = |msg: String| ReadError::File {
        path: path.to_path_buf(),
        msg,
    };
    if path.extension().is_some_and(|e| e == "parquet") {
        use parquet::file::reader::{FileReader, SerializedFileReader};
        let file = std::fs::File::open(path).map_err(cause(path))?;
        let reader = SerializedFileReader::new(file).map_err(cause(path))?;
        let rows = reader.get_row_iter(None).map_err(cause(path))?;
        return rows
            .enumerate()
            .map(|(i, r)| {
                r.map(|r| (i, i + 1, r.to_json_value()))
                    .map_err(|e| err(format!("row {}: {e}", i + 1)))
            })
            .collect();
    }
    let text = std::fs::read_to_string(path).map_err(cause(path))?;
    let line_of = |s: &str| {
        text[..s.as_ptr() as usize - text.as_ptr() as usize]
            .matches('\n')
            .count()
            + 1
    };
    let raws: Vec<(usize, &str)> = if text.trim_start().starts_with('[') {
        let raws: Vec<&RawValue> = serde_json::from_str(&text)
            .map_err(|e| err(format!("line {}: not a JSON array: {e}", e.line())))?;
        raws.iter().map(|r| (line_of(r.get()), r.get())).collect()
    } else {
        text.lines()
            .enumerate()
            .filter(|(_, l)| !l.trim().is_empty())
            .map(|(i, l)| (i + 1, l))
            .collect()
    };
    raws.into_iter()
        .enumerate()
        .map(|(i, (line, raw))| {
            serde_json::from_str(raw)
                .map(|v| (i, line, v))
                .map_err(|e| err(format!("item {i} (line {line}): {e}")))
        })
        .collect()
}

fn field<'a>(v: &'a Value, key: &str) -> Result<&'a str, String> {
    match v.get(key) {
        Some(Value::String(s)) => Ok(s),
        Some(other) => Err(format!("`{key}` must be a string, found {other}")),
        None => Err(format!("missing `{key}`")),
    }
}

/// A string or a list of strings.
fn paths(v: &Value, key: &str) -> Result<Vec<String>, String> {
    match v.get(key) {
        Some(Value::String(s)) => Ok(vec![s.clone()]),
        Some(Value::Array(a)) if !a.is_empty() => a
            .iter()
            .map(|x| {
                x.as_str()
                    .map(str::to_string)
                    .ok_or_else(|| format!("`{key}` must hold strings, found {x}"))
            })
            .collect(),
        Some(other) => Err(format!(
            "`{key}` must be a path or a list of paths, found {other}"
        )),
        None => Err(format!("missing `{key}`")),
    }
}

fn image_tags(n: usize) -> String {
    "<image>".repeat(n)
}

/// The reasoning tail the Spatial-SSRL evaluation appends for letter answers.
fn letter_cot() -> String {
    format!(
        "\nThe final answer should be the option letter from the given choices.\n{FORMAT_SENTENCE}"
    )
}

fn viewspatial(i: usize, v: &Value, opt: &ReadOptions) -> Result<BenchItem, String> {
    let images = paths(v, "image_path")?;
    let (question, choices, answer) = (
        field(v, "question")?,
        field(v, "choices")?,
        field(v, "answer")?,
    );
    if score::first_standalone_letter(answer, 'D').is_none() {
        return Err(format!("answer {answer:?} has no option letter A-D"));
    }
    let tail = match opt.reasoning {
        true => letter_cot(),
        false => "\nReply only to the corresponding option.\nAnswer:".to_string(),
    };
    Ok(BenchItem {
        id: i.to_string(),
        category: field(v, "question_type")?.to_string(),
        variant: "-".into(),
        prompt: format!("{}{question}\n{choices}{tail}", image_tags(images.len())),
        images: images
            .iter()
            .map(|p| ImageSource::Resized(opt.images_root.join(p), 420, 280))
            .collect(),
        answer: answer.to_string(),
        rule: Rule::Viewspatial,
        qid: None,
        source: None,
    })
}

/// The spatial relation a What'sUp caption states (for the per-relation breakdown).
fn relation(caption: &str) -> &'static str {
    let c = format!(" {} ", caption.to_lowercase());
    [
        (" left of ", "left"),
        (" right of ", "right"),
        (" in front of ", "front"),
        (" behind ", "behind"),
        (" under ", "under"),
        (" below ", "under"),
        (" on ", "on"),
        (" above ", "on"),
    ]
    .iter()
    .find(|(k, _)| c.contains(k))
    .map_or("-", |(_, v)| v)
}

fn whatsup(i: usize, v: &Value, subset: &str, opt: &ReadOptions) -> Result<BenchItem, String> {
    let image = field(v, "image_path")?;
    let captions: Vec<&str> = match v.get("caption_options") {
        Some(Value::Array(a)) => a
            .iter()
            .map(|x| {
                x.as_str()
                    .ok_or_else(|| format!("caption {x} is not a string"))
            })
            .collect::<Result<_, _>>()?,
        _ => return Err("missing `caption_options` (a list of captions)".into()),
    };
    if !(2..=4).contains(&captions.len()) {
        return Err(format!(
            "{} captions; What'sUp items have 2 to 4",
            captions.len()
        ));
    }
    let options: Vec<String> = captions
        .iter()
        .zip('A'..)
        .map(|(c, l)| format!("{l}: {c}"))
        .collect();
    let head = match opt.reasoning {
        true => format!("Based on the image, choose the correct option from the list below.{FORMAT_SENTENCE}"),
        false => "Based on the image, choose the correct option from the list below. Only respond the corresponding letter (e.g., C).\n\n".to_string(),
    };
    Ok(BenchItem {
        id: i.to_string(),
        category: subset.to_string(),
        variant: relation(captions[0]).to_string(),
        prompt: format!("<image>{head}{}", options.join("\n")),
        images: vec![ImageSource::File(opt.images_root.join(image))],
        answer: "A".into(),
        rule: Rule::Whatsup('A'),
        qid: None,
        source: None,
    })
}

/// `np.linspace(0, total-1, n).round()` (round half to even), or every frame when `total ≤ n`.
pub fn frame_indices(total: usize, n: usize) -> Vec<usize> {
    if total <= n {
        return (0..total).collect();
    }
    if n == 1 {
        return vec![0];
    }
    let step = (total - 1) as f64 / (n - 1) as f64;
    (0..n)
        .map(|i| match i + 1 == n {
            true => total - 1,
            false => (i as f64 * step).round_ties_even() as usize,
        })
        .collect()
}

/// Orders frame names with embedded numbers numerically ("f2" before "f10").
fn natural_key(name: &str) -> Vec<(u8, u128, String)> {
    let mut key = Vec::new();
    let mut chars = name.chars().peekable();
    while let Some(&c) = chars.peek() {
        let digit = c.is_ascii_digit();
        let mut run = String::new();
        while let Some(&d) = chars.peek() {
            if d.is_ascii_digit() != digit {
                break;
            }
            run.push(d);
            chars.next();
        }
        key.push(match digit {
            true => (0, run.parse().unwrap_or(u128::MAX), String::new()),
            false => (1, 0, run),
        });
    }
    key
}

/// The frames of a video folder in order.
pub fn list_frames(dir: &Path) -> Result<Vec<PathBuf>, String> {
    let rd = std::fs::read_dir(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    let mut frames: Vec<PathBuf> = rd
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| {
            p.extension().is_some_and(|x| {
                ["jpg", "jpeg", "png", "webp"]
                    .contains(&x.to_string_lossy().to_lowercase().as_str())
            })
        })
        .collect();
    frames
        .sort_by_cached_key(|p| natural_key(&p.file_name().unwrap_or_default().to_string_lossy()));
    if frames.is_empty() {
        return Err(format!(
            "{}: no frames (.jpg/.png/.webp) in the video folder",
            dir.display()
        ));
    }
    Ok(frames)
}

fn vsi(i: usize, v: &Value, opt: &ReadOptions) -> Result<BenchItem, String> {
    let question = field(v, "question")?;
    // The Spatial-SSRL layout (mp4_path, A-D, answer) or the dataset's (dataset, scene_name,
    // options, ground_truth).
    let (video, options, answer) = if v.get("mp4_path").is_some() {
        let mut opts = Vec::new();
        for k in ["A", "B", "C", "D"] {
            match v.get(k) {
                Some(Value::String(s)) => opts.push(s.clone()),
                None | Some(Value::Null) => break,
                Some(other) => {
                    return Err(format!(
                        "option `{k}` must be a string or null, found {other}"
                    ))
                }
            }
        }
        let p = PathBuf::from(field(v, "mp4_path")?);
        (p.with_extension(""), opts, field(v, "answer")?.to_string())
    } else {
        let dir = PathBuf::from(field(v, "dataset")?).join(field(v, "scene_name")?);
        let opts = match v.get("options") {
            None | Some(Value::Null) => vec![],
            Some(Value::Array(a)) => a
                .iter()
                .map(|x| {
                    x.as_str()
                        .map(str::to_string)
                        .ok_or_else(|| format!("option {x} is not a string"))
                })
                .collect::<Result<_, _>>()?,
            Some(other) => return Err(format!("`options` must be a list or null, found {other}")),
        };
        let gt = match v.get("ground_truth") {
            Some(Value::String(s)) => s.clone(),
            Some(Value::Number(n)) => n.to_string(),
            _ => return Err("missing `ground_truth`".into()),
        };
        (dir, opts, gt)
    };
    if options.len() > 4 {
        return Err(format!(
            "{} options; the official prompt labels at most 4",
            options.len()
        ));
    }
    let dir = opt.images_root.join(&video);
    let frames = list_frames(&dir)?;
    let picked: Vec<ImageSource> = frame_indices(frames.len(), opt.frames)
        .into_iter()
        .map(|k| ImageSource::File(frames[k].clone()))
        .collect();
    let mut prompt = format!(
        "{}Watch the given video and anser the following question.\n\n{question}",
        image_tags(picked.len())
    );
    for (l, o) in ['A', 'B', 'C', 'D'].iter().zip(&options) {
        prompt += &format!("{l}. {o}");
    }
    prompt += match (opt.reasoning, options.is_empty()) {
        (false, true) => "\nAnswer directly with a number(integer or decimal).",
        (false, false) => "\nAnswer directly with the option letter from the given choices.",
        (true, true) => "\nThe final answer should be a number(integer or decimal).\n",
        (true, false) => "\nThe final answer should be the option letter from the given choices.\n",
    };
    if opt.reasoning {
        prompt += FORMAT_SENTENCE;
    }
    let id = match v.get("id") {
        Some(Value::String(s)) => s.clone(),
        Some(Value::Number(n)) => n.to_string(),
        _ => i.to_string(),
    };
    Ok(BenchItem {
        id,
        category: field(v, "question_type")?.to_string(),
        variant: if options.is_empty() {
            "numeric"
        } else {
            "choice"
        }
        .into(),
        prompt,
        images: picked,
        answer,
        rule: Rule::Vsi,
        qid: None,
        source: None,
    })
}

/// Columns a VLMEvalKit multiple-choice TSV may have besides the option letters (`prompt` and
/// `source` are CV-Bench's).
const TSV_COLUMNS: [&str; 12] = [
    "index",
    "image",
    "image_path",
    "question",
    "hint",
    "answer",
    "category",
    "l2-category",
    "split",
    "qid",
    "prompt",
    "source",
];

/// The cells pandas' `read_csv` reads as missing (NaN) by default, compared whole: `""` is
/// one, a cell of spaces is not.
const PANDAS_NA: [&str; 19] = [
    "", "#N/A", "#N/A N/A", "#NA", "-1.#IND", "-1.#QNAN", "-NaN", "-nan", "1.#IND", "1.#QNAN",
    "<NA>", "N/A", "NA", "NULL", "NaN", "None", "n/a", "nan", "null",
];

fn pandas_na(cell: &str) -> bool {
    PANDAS_NA.contains(&cell)
}

/// Python's `repr(float)`: the shortest digits that read back, positional for exponents
/// −4 to 15 (`3.0`, `0.0001`), else `1e-05` / `1.5e+16`.
fn py_float_repr(x: f64) -> String {
    if x.is_nan() {
        return "nan".into();
    }
    if x.is_infinite() {
        return if x > 0.0 { "inf" } else { "-inf" }.into();
    }
    let sci = format!("{x:e}");
    let (mantissa, exp) = sci.split_once('e').expect("{:e} has an exponent");
    let exp: i32 = exp.parse().expect("an integer exponent");
    let (sign, digits) = match mantissa.strip_prefix('-') {
        Some(m) => ("-", m.replace('.', "")),
        None => ("", mantissa.replace('.', "")),
    };
    if (-4..16).contains(&exp) {
        let point = exp + 1;
        let body = if point <= 0 {
            format!("0.{}{digits}", "0".repeat((-point) as usize))
        } else if point as usize >= digits.len() {
            format!("{digits}{}.0", "0".repeat(point as usize - digits.len()))
        } else {
            format!(
                "{}.{}",
                &digits[..point as usize],
                &digits[point as usize..]
            )
        };
        format!("{sign}{body}")
    } else {
        let frac = if digits.len() > 1 {
            format!(".{}", &digits[1..])
        } else {
            String::new()
        };
        format!(
            "{sign}{}{frac}e{}{:02}",
            &digits[..1],
            if exp < 0 { '-' } else { '+' },
            exp.abs()
        )
    }
}

/// How pandas types a column, for the text VLMEvalKit's `f"{value}"` gives its cells.
enum ColumnKind {
    Text,
    /// Every present cell an integer and none missing: int64, printed as the integer.
    Int,
    /// Every present cell a number, some not integers or some missing: float64, printed as
    /// Python prints a float (`3` becomes `3.0`).
    Float,
}

fn column_kind<'a>(cells: impl Iterator<Item = &'a str>) -> ColumnKind {
    let (mut missing, mut all_int, mut any) = (false, true, false);
    for c in cells {
        if pandas_na(c) {
            missing = true;
            continue;
        }
        let t = c.trim_matches(|c| c == ' ' || c == '\t');
        if t.parse::<i64>().is_err() {
            all_int = false;
            if !pandas_number(t) {
                return ColumnKind::Text;
            }
        }
        any = true;
    }
    match (any || missing, all_int && !missing && any) {
        (_, true) => ColumnKind::Int,
        (true, false) => ColumnKind::Float,
        (false, _) => ColumnKind::Text,
    }
}

/// A cell pandas' C parser reads as a float (digits with a point or exponent, `inf`, `nan`
/// spellings it does not take as missing are text).
fn pandas_number(t: &str) -> bool {
    let body = t.trim_start_matches(['+', '-']);
    let lower = body.to_ascii_lowercase();
    matches!(lower.as_str(), "inf" | "infinity")
        || (body.starts_with(|c: char| c.is_ascii_digit() || c == '.')
            && !lower.contains("inf")
            && !lower.contains("nan")
            && t.parse::<f64>().is_ok())
}

/// A cell's text as VLMEvalKit prints it after pandas read the column as `kind`; `None` when
/// pandas reads it as missing.
fn pandas_text(cell: &str, kind: &ColumnKind) -> Option<String> {
    if pandas_na(cell) {
        return None;
    }
    let t = cell.trim_matches(|c| c == ' ' || c == '\t');
    Some(match kind {
        ColumnKind::Text => cell.to_string(),
        ColumnKind::Int => t
            .parse::<i64>()
            .map_or_else(|_| cell.to_string(), |n| n.to_string()),
        ColumnKind::Float => t
            .parse::<f64>()
            .map_or_else(|_| cell.to_string(), py_float_repr),
    })
}

/// `"['a', 'b']"` (a Python list literal, as VLMEvalKit writes several images) or one value.
fn str_list(cell: &str) -> Vec<String> {
    let t = cell.trim();
    if !(t.starts_with('[') && t.ends_with(']')) {
        return vec![t.to_string()];
    }
    t[1..t.len() - 1]
        .split(',')
        .map(|s| s.trim().trim_matches(|c| c == '\'' || c == '"').to_string())
        .filter(|s| !s.is_empty())
        .collect()
}

fn tsv(path: &Path, opt: &ReadOptions) -> Result<Vec<BenchItem>, ReadError> {
    let err = |msg: String| ReadError::File {
        path: path.to_path_buf(),
        msg,
    };
    let mut rdr = csv::ReaderBuilder::new()
        .delimiter(b'\t')
        .from_path(path)
        .map_err(cause(path))?;
    let header: Vec<String> = rdr
        .headers()
        .map_err(|e| err(format!("line 1: {e}")))?
        .iter()
        .map(str::to_string)
        .collect();
    let letters: BTreeSet<char> = header
        .iter()
        .filter(|h| h.len() == 1 && h.chars().all(|c| c.is_ascii_uppercase()))
        .filter_map(|h| h.chars().next())
        .collect();
    for h in &header {
        let known = TSV_COLUMNS.contains(&h.as_str())
            || (h.len() == 1 && letters.contains(&h.chars().next().unwrap_or(' ')))
            || opt.allow_columns.iter().any(|a| a == h);
        if !known {
            return Err(err(format!(
                "line 1: unknown column {h:?} (known: {}, A-Z options; pass --allow-columns {h} to accept it)",
                TSV_COLUMNS.join(", ")
            )));
        }
    }
    for need in ["index", "question", "answer"] {
        if !header.iter().any(|h| h == need) {
            return Err(err(format!("line 1: no `{need}` column")));
        }
    }
    if !header.iter().any(|h| h == "image" || h == "image_path") {
        return Err(err("line 1: no `image` or `image_path` column".into()));
    }
    if !letters.contains(&'A') || !letters.contains(&'B') {
        return Err(err("line 1: no option columns `A` and `B`".into()));
    }
    let col = |name: &str| header.iter().position(|h| h == name);
    struct Row {
        line: u64,
        index: String,
        cells: Vec<String>,
    }
    let mut rows = Vec::new();
    for rec in rdr.records() {
        let rec = rec.map_err(|e| {
            let line = e.position().map_or(0, |p| p.line());
            err(format!("line {line}: malformed row: {e}"))
        })?;
        let line = rec.position().map_or(0, |p| p.line());
        let cells: Vec<String> = rec.iter().map(str::to_string).collect();
        let index = cells[col("index").expect("checked")].trim().to_string();
        rows.push(Row { line, index, cells });
    }
    // VLMEvalKit reads the file with pandas: a column of numbers with a gap is float64 and
    // prints `3.0`, missing cells (`None`, `NA`, `null`, …) are dropped, spaces are kept.
    let kinds: HashMap<usize, ColumnKind> = header
        .iter()
        .enumerate()
        .filter(|(_, h)| h.len() == 1 || *h == "hint" || *h == "question" || *h == "prompt")
        .map(|(i, _)| (i, column_kind(rows.iter().map(|r| r.cells[i].as_str()))))
        .collect();
    let text_of = |r: &Row, name: &str| -> Option<String> {
        let i = col(name)?;
        pandas_text(&r.cells[i], kinds.get(&i).unwrap_or(&ColumnKind::Text))
    };
    // CV-Bench-2D's overall accuracy is the mean over its image sources (VLMEvalKit's
    // `report_accuracy`, taken when every row's split is 2D).
    let two_d = col("source").is_some()
        && col("split").is_some_and(|i| rows.iter().all(|r| r.cells[i] == "2D"));
    // VLMEvalKit stores a repeated image once: a short `image` cell names the row that has it.
    let by_index: HashMap<&str, usize> = rows
        .iter()
        .enumerate()
        .map(|(i, r)| (r.index.as_str(), i))
        .collect();
    let name = path.display().to_string();
    let mut items = Vec::with_capacity(rows.len());
    for r in &rows {
        let at = |msg: String| err(format!("line {}: {msg}", r.line));
        let cell = |c: &str| cell_of(&r.cells, col(c));
        if r.index.is_empty() {
            return Err(at("empty `index`".into()));
        }
        let question = text_of(r, "question").ok_or_else(|| at("empty `question`".into()))?;
        let choices: Vec<(char, String)> = letters
            .iter()
            .filter_map(|&l| text_of(r, &l.to_string()).map(|t| (l, t)))
            .collect();
        let answer = cell("answer")
            .ok_or_else(|| at("empty `answer`".into()))?
            .trim();
        if !choices
            .iter()
            .any(|(l, _)| answer.len() == 1 && answer.starts_with(*l))
        {
            return Err(at(format!(
                "answer {answer:?} is not one of the row's option letters"
            )));
        }
        let images: Vec<ImageSource> = if let Some(img) = cell("image") {
            let img = if img.len() <= 64 {
                let j = by_index.get(img.trim()).ok_or_else(|| {
                    at(format!(
                        "image refers to row index {img:?}, which is not in the file"
                    ))
                })?;
                cell_of(&rows[*j].cells, col("image"))
                    .filter(|s| s.len() > 64)
                    .ok_or_else(|| {
                        at(format!(
                            "image refers to row index {img:?}, which has no image"
                        ))
                    })?
            } else {
                img
            };
            str_list(img)
                .into_iter()
                .map(|b| ImageSource::Base64(b.into(), format!("{name} line {}", r.line)))
                .collect()
        } else if let Some(p) = cell("image_path") {
            str_list(p)
                .into_iter()
                .map(|p| ImageSource::File(opt.images_root.join(p)))
                .collect()
        } else {
            return Err(at("no image".into()));
        };
        let mut text = String::new();
        if col("prompt").is_some() {
            // CV-Bench: the dataset's own prompt, as it is (pandas' `nan` for a missing one).
            text += &text_of(r, "prompt").unwrap_or_else(|| "nan".into());
        } else {
            if let Some(h) = text_of(r, "hint") {
                text += &format!("Hint: {h}\n");
            }
            text += &format!("Question: {question}\nOptions:\n");
            for (l, t) in &choices {
                text += &format!("{l}. {t}\n");
            }
            text += "Please select the correct answer from the options above. \n";
        }
        if opt.reasoning {
            // Spatial-SSRL's VLMEvalKit concatenates the format sentence with no separator
            // (and asks for a direct answer where the question mentions LaTeX).
            text += if text.contains("LaTeX") {
                "Please directly give the answer."
            } else {
                FORMAT_SENTENCE
            };
        }
        items.push(BenchItem {
            id: r.index.clone(),
            category: cell("category").unwrap_or("-").to_string(),
            variant: cell("l2-category").unwrap_or("-").to_string(),
            prompt: format!("{}{text}", image_tags(images.len())),
            images,
            answer: answer.to_string(),
            rule: Rule::Mcq(choices),
            qid: cell("qid").map(|q| q.trim().to_string()),
            source: two_d.then(|| cell("source").unwrap_or("nan").trim().to_string()),
        });
    }
    check_files(&items).map_err(err)?;
    let mut seen = HashSet::new();
    for (it, r) in items.iter().zip(&rows) {
        if !seen.insert(it.id.as_str()) {
            return Err(err(format!(
                "line {}: index {:?} appears twice",
                r.line, it.id
            )));
        }
    }
    Ok(items)
}

fn cell_of(cells: &[String], i: Option<usize>) -> Option<&str> {
    i.map(|i| cells[i].as_str())
        .filter(|s| !s.trim().is_empty())
}
