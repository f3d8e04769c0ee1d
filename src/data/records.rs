//! Sample records and their files: Parquet in EasyR1's schema (`problem`, `answer`, `images`
//! plus our columns) or JSONL with the same fields; atomic writes; a reader for both.

use parquet::data_type::{ByteArray, ByteArrayType};
use parquet::file::properties::WriterProperties;
use parquet::file::reader::{FileReader, SerializedFileReader};
use parquet::file::writer::SerializedFileWriter;
use parquet::record::Field;
use serde::{Deserialize, Serialize};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// One QA sample. `images` are paths relative to the output folder; `meta` holds the
/// geometry needed to re-check the answer without the generator. Read back, only `problem` is
/// required; the rest default to empty — an empty `answer` is none (prompts to roll out without
/// a reward; training and evaluation need one), and a row without an id is named by its line
/// (JSONL) or row (Parquet).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SampleRecord {
    #[serde(default)]
    pub id: String,
    #[serde(default)]
    pub task: String,
    pub problem: String,
    #[serde(default)]
    pub answer: String,
    /// None for a text-only prompt.
    #[serde(default)]
    pub images: Vec<ImageRef>,
    #[serde(default)]
    pub source: Vec<String>,
    #[serde(default)]
    pub meta: serde_json::Value,
}

/// A sample's image: a file, relative to its data file's folder (or absolute), or an image
/// stored in the data file itself (a Hugging Face `Image` struct's bytes, as EasyR1's example
/// datasets ship). Written and serialised as the path, or for a stored image its name.
#[derive(Debug, Clone, PartialEq)]
pub enum ImageRef {
    File(String),
    /// `name`: `<data file> row N image K`, with the struct's own path when it has one.
    Embedded {
        name: String,
        bytes: Arc<[u8]>,
    },
}

impl ImageRef {
    /// The path, or the stored image's name.
    pub fn label(&self) -> &str {
        match self {
            ImageRef::File(p) => p,
            ImageRef::Embedded { name, .. } => name,
        }
    }

    /// `(width, height)` from the header (the pixels are not decoded).
    pub fn size(&self, root: &Path) -> Result<(u32, u32), super::images::ImageError> {
        match self {
            ImageRef::File(p) => super::images::image_size(&root.join(p)),
            ImageRef::Embedded { name, bytes } => {
                super::images::image_size_of(bytes, Path::new(name))
            }
        }
    }

    /// The decoded image (see [`super::images::decode_rgb`]).
    pub fn load(&self, root: &Path) -> Result<image::RgbImage, super::images::ImageError> {
        match self {
            ImageRef::File(p) => super::images::load_rgb(&root.join(p)),
            ImageRef::Embedded { name, bytes } => super::images::decode_rgb(bytes, Path::new(name)),
        }
    }
}

impl Serialize for ImageRef {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.label())
    }
}

impl<'de> Deserialize<'de> for ImageRef {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        String::deserialize(d).map(ImageRef::File)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Format {
    Parquet,
    Jsonl,
}

impl Format {
    pub fn ext(self) -> &'static str {
        match self {
            Format::Parquet => "parquet",
            Format::Jsonl => "jsonl",
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum WriteError {
    // The causes are in the messages, so they are not error sources as well (a report of the
    // whole chain would print them twice).
    #[error("{path}: {err}")]
    Io { path: PathBuf, err: std::io::Error },
    #[error("{path}: parquet: {err}")]
    Parquet {
        path: PathBuf,
        err: parquet::errors::ParquetError,
    },
    #[error("{path}: {msg}")]
    Format { path: PathBuf, msg: String },
}

/// An io error at `path`, for `map_err`.
pub(crate) fn io(path: &Path) -> impl FnOnce(std::io::Error) -> WriteError + '_ {
    move |err| WriteError::Io {
        path: path.to_path_buf(),
        err,
    }
}

/// Writes `bytes` to `path` in place (its folder made first): for files that something
/// committed later names — a task shard's images, which no reader sees before the shard file
/// that lists them is renamed into place, and which a resumed run writes again whole if the
/// shard was not. Half the file-system operations of [`write_atomic`].
pub fn write_plain(path: &Path, bytes: &[u8]) -> Result<(), WriteError> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(io(dir))?;
    }
    std::fs::write(path, bytes).map_err(io(path))
}

/// Writes `bytes` to `path` through a temporary file and a rename, so a reader (or a resumed
/// run) sees either the old file or the complete new one. `durable` also fsyncs.
pub fn write_atomic(path: &Path, bytes: &[u8], durable: bool) -> Result<(), WriteError> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(io(dir))?;
    }
    let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("out");
    let tmp = path.with_file_name(format!(".{name}.tmp{}", std::process::id()));
    {
        let mut f = std::fs::File::create(&tmp).map_err(io(&tmp))?;
        f.write_all(bytes).map_err(io(&tmp))?;
        if durable {
            f.sync_all().map_err(io(&tmp))?;
        }
    }
    std::fs::rename(&tmp, path).map_err(io(path))
}

pub fn jsonl_bytes(samples: &[SampleRecord]) -> Vec<u8> {
    let mut out = Vec::new();
    for s in samples {
        serde_json::to_writer(&mut out, s).expect("records serialise");
        out.push(b'\n');
    }
    out
}

const SCHEMA: &str = "
message spatial_ssrl_sample {
  REQUIRED BYTE_ARRAY id (UTF8);
  REQUIRED BYTE_ARRAY task (UTF8);
  REQUIRED BYTE_ARRAY problem (UTF8);
  REQUIRED BYTE_ARRAY answer (UTF8);
  REQUIRED group images (LIST) {
    REPEATED group list {
      REQUIRED BYTE_ARRAY element (UTF8);
    }
  }
  REQUIRED group source (LIST) {
    REPEATED group list {
      REQUIRED BYTE_ARRAY element (UTF8);
    }
  }
  REQUIRED BYTE_ARRAY meta (UTF8);
}
";

/// Parquet bytes (one row group, Snappy). `meta` is stored as a JSON string.
pub fn parquet_bytes(
    samples: &[SampleRecord],
    path_for_errors: &Path,
) -> Result<Vec<u8>, WriteError> {
    let perr = |err| WriteError::Parquet {
        path: path_for_errors.to_path_buf(),
        err,
    };
    let schema = Arc::new(parquet::schema::parser::parse_message_type(SCHEMA).map_err(perr)?);
    let props = Arc::new(
        WriterProperties::builder()
            .set_compression(parquet::basic::Compression::SNAPPY)
            .set_created_by("spatial-ssrl".into())
            .build(),
    );
    let mut buf = Vec::new();
    {
        let mut writer = SerializedFileWriter::new(&mut buf, schema, props).map_err(perr)?;
        let mut rg = writer.next_row_group().map_err(perr)?;
        let scalar = |f: fn(&SampleRecord) -> &str| -> Vec<ByteArray> {
            samples
                .iter()
                .map(|s| ByteArray::from(f(s).as_bytes().to_vec()))
                .collect()
        };
        let metas: Vec<String> = samples.iter().map(|s| s.meta.to_string()).collect();
        let mut col = 0;
        while let Some(mut cw) = rg.next_column().map_err(perr)? {
            let w = cw.typed::<ByteArrayType>();
            match col {
                0 => w.write_batch(&scalar(|s| &s.id), None, None),
                1 => w.write_batch(&scalar(|s| &s.task), None, None),
                2 => w.write_batch(&scalar(|s| &s.problem), None, None),
                3 => w.write_batch(&scalar(|s| &s.answer), None, None),
                4 | 5 => {
                    let (mut vals, mut def, mut rep) = (Vec::new(), Vec::new(), Vec::new());
                    for s in samples {
                        let list: Vec<&str> = match col {
                            4 => s.images.iter().map(ImageRef::label).collect(),
                            _ => s.source.iter().map(String::as_str).collect(),
                        };
                        if list.is_empty() {
                            def.push(0);
                            rep.push(0);
                        }
                        for (k, v) in list.iter().enumerate() {
                            vals.push(ByteArray::from(v.as_bytes().to_vec()));
                            def.push(1);
                            rep.push(i16::from(k > 0));
                        }
                    }
                    w.write_batch(&vals, Some(&def), Some(&rep))
                }
                _ => w.write_batch(
                    &metas
                        .iter()
                        .map(|m| ByteArray::from(m.as_bytes().to_vec()))
                        .collect::<Vec<_>>(),
                    None,
                    None,
                ),
            }
            .map_err(perr)?;
            cw.close().map_err(perr)?;
            col += 1;
        }
        rg.close().map_err(perr)?;
        writer.close().map_err(perr)?;
    }
    Ok(buf)
}

fn field_str(f: &Field) -> Option<String> {
    match f {
        Field::Str(s) => Some(s.clone()),
        Field::Bytes(b) => String::from_utf8(b.data().to_vec()).ok(),
        _ => None,
    }
}

/// A Parquet row's `images`: a list (or one value) of paths, or of Hugging Face `Image`
/// structs (`{bytes, path}`: the bytes when stored, else the path); null for none. Any other
/// type is an error, never read as no images.
fn parquet_images(f: &Field, file: &Path, row: usize) -> Result<Vec<ImageRef>, String> {
    let one = |k: usize, f: &Field| -> Result<ImageRef, String> {
        match f {
            Field::Str(p) => Ok(ImageRef::File(p.clone())),
            Field::Bytes(b) => String::from_utf8(b.data().to_vec())
                .map(ImageRef::File)
                .map_err(|_| format!("image {k} is bytes but not a path (an Image struct's bytes go in its `bytes` field)")),
            Field::Group(g) => {
                let (mut bytes, mut path) = (None, None);
                for (n, v) in g.get_column_iter() {
                    match (n.as_str(), v) {
                        ("bytes", Field::Bytes(b)) => bytes = Some(b.data()),
                        ("path", Field::Str(p)) => path = Some(p.clone()),
                        ("bytes" | "path", Field::Null) => {}
                        (n @ ("bytes" | "path"), v) => {
                            return Err(format!("image {k}: field `{n}` holds {v}, not {}", match n {
                                "bytes" => "bytes",
                                _ => "a string",
                            }))
                        }
                        _ => {}
                    }
                }
                match (bytes, path) {
                    (Some(b), p) => Ok(ImageRef::Embedded {
                        name: format!(
                            "{} row {row} image {k}{}",
                            file.display(),
                            p.map(|p| format!(" ({p})")).unwrap_or_default()
                        ),
                        bytes: Arc::from(b),
                    }),
                    (None, Some(p)) => Ok(ImageRef::File(p)),
                    (None, None) => Err(format!("image {k} has neither bytes nor a path")),
                }
            }
            other => Err(format!(
                "image {k} is {other}, not a path or an Image struct ({{bytes, path}})"
            )),
        }
    };
    match f {
        Field::Null => Ok(vec![]),
        Field::ListInternal(l) => l
            .elements()
            .iter()
            .enumerate()
            .map(|(k, e)| one(k, e))
            .collect(),
        single => Ok(vec![one(0, single)?]),
    }
}

/// The data files `path` names: the file itself, or for a folder its `.parquet` and `.jsonl`
/// files in name order (for an `ssrl tasks` output folder, those of its `data/`: every shard).
pub fn data_files(path: &Path) -> Result<Vec<PathBuf>, WriteError> {
    if !path.is_dir() {
        return Ok(vec![path.to_path_buf()]);
    }
    let dir = match path.join("data") {
        d if d.is_dir() => d,
        _ => path.to_path_buf(),
    };
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .map_err(io(&dir))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            p.is_file()
                && matches!(
                    p.extension().and_then(|e| e.to_str()),
                    Some("parquet" | "jsonl")
                )
        })
        .collect();
    files.sort();
    if files.is_empty() {
        return Err(WriteError::Format {
            path: dir,
            msg: "no .parquet or .jsonl files here".into(),
        });
    }
    Ok(files)
}

/// Where a dataset's relative image paths resolve unless told otherwise, as `ssrl tasks` writes
/// them: the folder above a data file's folder (`OUT/data/part-00000.parquet` → `OUT`), an
/// output folder itself (`OUT` → `OUT`), or the folder above a folder of data files
/// (`OUT/data` → `OUT`).
pub fn default_images_root(data: &Path) -> PathBuf {
    let up = match data.is_dir() {
        true if data.join("data").is_dir() => Some(data),
        true => data.parent(),
        false => data.parent().and_then(Path::parent),
    };
    up.map_or_else(|| PathBuf::from("."), Path::to_path_buf)
}

/// The folder a data file's relative image paths resolve against when none is given: the
/// first of the file's own folder, the one above it and the one above that in which the
/// file's first relative image path names a file — `ssrl tasks` output (`OUT/data/part-*.parquet`,
/// `OUT/images/…`), the released Spatial-SSRL-81k as it unpacks (`spatialssrl.parquet` beside
/// `images/{task}/…`) and as its scripts lay it out (`data/parquets/train.parquet`,
/// `data/images/…`) — or else [`default_images_root`] (a missing image is then named when the
/// data opens).
pub fn detect_images_root(file: &Path, samples: &[SampleRecord]) -> PathBuf {
    let first = samples
        .iter()
        .flat_map(|s| &s.images)
        .find_map(|i| match i {
            ImageRef::File(p) if Path::new(p).is_relative() => Some(p.as_str()),
            _ => None,
        });
    let fallback = default_images_root(file);
    let Some(first) = first else {
        return fallback;
    };
    let dir = match file.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    };
    dir.ancestors()
        .take(3)
        .find(|d| d.join(first).is_file())
        .map_or(fallback, Path::to_path_buf)
}

/// The samples `path` names (a data file, or a folder: [`data_files`]), the first `limit` of
/// them, each with the folder its image paths resolve against: `images_root`, or else
/// [`detect_images_root`] of its file. Later files are not read once `limit` is reached.
pub fn read_dataset(
    path: &Path,
    images_root: Option<&Path>,
    limit: usize,
) -> Result<Vec<(SampleRecord, PathBuf)>, WriteError> {
    let mut out = Vec::new();
    for f in data_files(path)? {
        if out.len() >= limit {
            break;
        }
        let samples = read_samples(&f)?;
        let root = images_root.map_or_else(|| detect_images_root(&f, &samples), Path::to_path_buf);
        out.extend(samples.into_iter().map(|s| (s, root.clone())));
    }
    out.truncate(limit);
    Ok(out)
}

impl SampleRecord {
    /// The sample's images, their paths resolved against `root`; errors name the file.
    pub fn load_images(
        &self,
        root: &Path,
    ) -> Result<Vec<image::RgbImage>, super::images::ImageError> {
        self.images.iter().map(|i| i.load(root)).collect()
    }
}

/// LLaMA-Factory's SFT JSON: an array of rows in its alpaca form, as the released
/// `SFT-coldstart.json` is (`{instruction, input, output, images}`), or its ShareGPT form
/// (`{messages: [{role, content}], images}` or `{conversations: [{from, value}], images}`, a
/// system turn allowed), `<image>` placeholders in the text and image paths relative to the
/// file. The problem is the instruction (`input` on the next line when there is one, as
/// LLaMA-Factory joins them) or the user turn, the answer the `\boxed{…}` of the response
/// (empty when it has none: such a row has nothing to score), and `meta.response` the response
/// itself, the SFT target. A row of neither form, or a conversation of more than one exchange,
/// is an error naming the file and row.
fn read_sft_json(path: &Path) -> Result<Vec<SampleRecord>, WriteError> {
    #[derive(Deserialize)]
    struct Turn {
        #[serde(alias = "from")]
        role: String,
        #[serde(alias = "value")]
        content: String,
    }
    #[derive(Deserialize)]
    struct Row {
        instruction: Option<String>,
        #[serde(default)]
        input: String,
        #[serde(default)]
        output: String,
        #[serde(alias = "conversations")]
        messages: Option<Vec<Turn>>,
        #[serde(default)]
        images: Vec<String>,
    }
    let ferr = |msg: String| WriteError::Format {
        path: path.to_path_buf(),
        msg,
    };
    let text = std::fs::read_to_string(path).map_err(io(path))?;
    let rows: Vec<Row> = serde_json::from_str(&text).map_err(|e| {
        ferr(format!(
            "{e} (read as LLaMA-Factory's SFT JSON: an array of alpaca rows {{instruction, input, \
             output, images}} or ShareGPT rows {{messages, images}})"
        ))
    })?;
    rows.into_iter()
        .enumerate()
        .map(|(i, r)| {
            let (problem, response) =
                match (r.instruction, r.messages) {
                    (Some(instruction), _) => match r.input.trim().is_empty() {
                        true => (instruction, r.output),
                        false => (format!("{instruction}\n{}", r.input), r.output),
                    },
                    (None, Some(turns)) => {
                        let talk: Vec<&Turn> =
                            turns.iter().filter(|t| t.role != "system").collect();
                        match talk.as_slice() {
                            [u, a]
                                if matches!(u.role.as_str(), "user" | "human")
                                    && matches!(a.role.as_str(), "assistant" | "gpt") =>
                            {
                                (u.content.clone(), a.content.clone())
                            }
                            _ => {
                                return Err(ferr(format!(
                                "row {i}: a conversation of one user turn and one assistant turn \
                                 is read (this one: {})",
                                talk.iter().map(|t| t.role.as_str()).collect::<Vec<_>>().join(", ")
                            )))
                            }
                        }
                    }
                    (None, None) => {
                        return Err(ferr(format!(
                        "row {i}: neither `instruction` (alpaca) nor `messages` / `conversations` \
                         (ShareGPT)"
                    )))
                    }
                };
            let boxed =
                crate::reward::extract_boxed(&crate::reward::normalize_whitespace(&response));
            // mathruler's "None": no box, or one that never closes — nothing to score against.
            let answer = if boxed == "None" {
                String::new()
            } else {
                boxed
            };
            Ok(SampleRecord {
                id: format!("row-{i}"),
                task: String::new(),
                problem,
                answer,
                images: r.images.into_iter().map(ImageRef::File).collect(),
                source: vec![],
                meta: serde_json::json!({ "response": response }),
            })
        })
        .collect()
}

/// Reads samples from a `.parquet` or `.jsonl` file written by this crate, or any with a
/// `problem` column (EasyR1's `answer` and `images` too, usually), as [`SampleRecord`] says.
pub fn read_samples(path: &Path) -> Result<Vec<SampleRecord>, WriteError> {
    let ferr = |msg: String| WriteError::Format {
        path: path.to_path_buf(),
        msg,
    };
    let ext = path.extension().and_then(|e| e.to_str());
    if ext == Some("json") {
        return read_sft_json(path);
    }
    let is_parquet = ext == Some("parquet");
    if !is_parquet {
        let text = std::fs::read_to_string(path).map_err(io(path))?;
        return text
            .lines()
            .enumerate()
            .filter(|(_, l)| !l.trim().is_empty())
            .map(|(i, l)| {
                let mut rec: SampleRecord = serde_json::from_str(l).map_err(|e| {
                    // Anything but .parquet is read as JSONL: say so, since a wrong file's
                    // first line is where it fails.
                    ferr(format!(
                        "line {}: {e} (read as JSONL: a sample per line with a problem, its \
                         images and an answer to score; or give a .parquet file)",
                        i + 1
                    ))
                })?;
                // Rows without an id are named by their line, as Parquet rows by their row.
                if rec.id.is_empty() {
                    rec.id = format!("line-{}", i + 1);
                }
                Ok(rec)
            })
            .collect();
    }
    let perr = |err| WriteError::Parquet {
        path: path.to_path_buf(),
        err,
    };
    let file = std::fs::File::open(path).map_err(io(path))?;
    let reader = SerializedFileReader::new(file).map_err(perr)?;
    let iter = reader.get_row_iter(None).map_err(perr)?;
    let mut out = Vec::new();
    for (i, row) in iter.enumerate() {
        let row = row.map_err(perr)?;
        let mut rec = SampleRecord {
            id: String::new(),
            task: String::new(),
            problem: String::new(),
            answer: String::new(),
            images: vec![],
            source: vec![],
            meta: serde_json::Value::Null,
        };
        for (name, f) in row.get_column_iter() {
            let list = || -> Vec<String> {
                match f {
                    Field::ListInternal(l) => l.elements().iter().filter_map(field_str).collect(),
                    _ => vec![],
                }
            };
            match name.as_str() {
                "id" => rec.id = field_str(f).unwrap_or_default(),
                "task" => rec.task = field_str(f).unwrap_or_default(),
                "problem" => rec.problem = field_str(f).unwrap_or_default(),
                "answer" => rec.answer = field_str(f).unwrap_or_default(),
                "images" => {
                    rec.images = parquet_images(f, path, i)
                        .map_err(|m| ferr(format!("row {i}: column `images`: {m}")))?
                }
                "source" => rec.source = list(),
                "meta" => {
                    rec.meta = serde_json::from_str(&field_str(f).unwrap_or_default())
                        .map_err(|e| ferr(format!("row {i}: meta is not JSON: {e}")))?
                }
                _ => {}
            }
        }
        if rec.id.is_empty() {
            rec.id = format!("row-{i}");
        }
        out.push(rec);
    }
    Ok(out)
}
