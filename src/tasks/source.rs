//! Input discovery and decoding: RGB photos and RGB-D frames in the layouts users have.
//!
//! RGB: jpg / jpeg / png / webp (by content, not extension), grayscale and alpha reduced to
//! RGB (alpha dropped, as `cv2.imread` does), EXIF orientation applied.
//!
//! RGB-D layouts, detected per folder (see `reference/rgbd-formats.md` for units):
//! - **TUM**: `rgb.txt` + `depth.txt` index files; 16-bit PNG depth, value / 5000 = m;
//!   frames associated by nearest timestamp (≤ 0.02 s).
//! - **ScanNet** (exported): `color/N.jpg`, `depth/N.png` (mm), `intrinsic/intrinsic_color.txt`;
//!   depth is resampled (nearest) to the colour size.
//! - **DIODE**: `X.png` + `X_depth.npy` (m, `(H, W, 1)`) + `X_depth_mask.npy` (0/1), anywhere in
//!   its `train|val/indoors|outdoor/scene_*/scan_*` tree.
//! - **MegaDepth**: `X.jpg` + `X.h5` (dataset `depth`, relative, `> 0` valid), side by side or as
//!   MegaDepth_v1 ships them: `<scene>/dense*/imgs/X.jpg` + `<scene>/dense*/depths/X.h5`.
//! - **Official Spatial-SSRL samples**: `RGB-D_imgN.*` + `RGB-D_depthN.{h5,npy}` (+ `RGB-D_depth_maskN.npy`).
//! - **Generic**: `X.png|jpg` + `X_depth.png` (uint16 mm) or `X_depth.npy` (m), or a frame
//!   folder with `color.*` + `depth_mm.png` / `depth.npy`; optional `intrinsics.json` in the folder.
//!
//! Depth is returned in metres (or the source's relative unit) with NaN for every invalid pixel.

use super::npy;
use super::SkipReason;
use crate::data::images::{checked_decoder, load_rgb, ImageError, ImageFault};
use image::{DynamicImage, ImageReader, RgbImage};
use serde::Serialize;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// Why a source could not be used: a reason for the summary and a message naming the file.
#[derive(Debug, Clone)]
pub struct SourceError {
    pub reason: SkipReason,
    pub message: String,
}

impl SourceError {
    pub fn new(reason: SkipReason, path: &Path, detail: impl std::fmt::Display) -> Self {
        SourceError {
            reason,
            message: format!("{}: {detail}", path.display()),
        }
    }
}

impl std::fmt::Display for SourceError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for SourceError {}

/// An image's fault as the tasks' summary counts it.
impl From<ImageError> for SourceError {
    fn from(e: ImageError) -> Self {
        SourceError {
            reason: match e.fault {
                ImageFault::Io => SkipReason::Io,
                ImageFault::Decode => SkipReason::Decode,
                ImageFault::TooLarge => SkipReason::TooLarge,
            },
            message: e.message,
        }
    }
}

/// Pinhole intrinsics in pixels of the colour image.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, serde::Deserialize)]
pub struct Intrinsics {
    pub fx: f64,
    pub fy: f64,
    pub cx: f64,
    pub cy: f64,
}

impl Intrinsics {
    fn scaled(self, sx: f64, sy: f64) -> Self {
        Intrinsics {
            fx: self.fx * sx,
            fy: self.fy * sy,
            cx: self.cx * sx,
            cy: self.cy * sy,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Layout {
    Tum,
    Scannet,
    Diode,
    Megadepth,
    Generic,
}

/// How a depth file stores depth.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum DepthEncoding {
    /// `.npy` float metres (or relative); non-finite and ≤ 0 invalid unless a mask says otherwise.
    Npy,
    /// HDF5 dataset `depth`, relative depth, `> 0` valid.
    H5,
    /// 16-bit PNG, `metres = value * scale`, 0 invalid.
    Png16 { scale: f32 },
}

/// 16-bit PNG in millimetres.
const PNG_MM: DepthEncoding = DepthEncoding::Png16 { scale: 1e-3 };

#[derive(Debug, Clone)]
pub struct RgbdSource {
    pub layout: Layout,
    pub color: PathBuf,
    pub depth: PathBuf,
    pub mask: Option<PathBuf>,
    pub encoding: DepthEncoding,
    /// Depth and colour may differ in size and depth is resampled (ScanNet).
    pub resample_depth: bool,
    pub intrinsics: Option<Intrinsics>,
    /// Depth has a metric scale (false for MegaDepth).
    pub metric: bool,
}

/// One input of the task engine.
#[derive(Debug, Clone)]
pub enum Source {
    Rgb { path: PathBuf },
    Rgbd(RgbdSource),
}

impl Source {
    pub fn files(&self) -> Vec<&Path> {
        match self {
            Source::Rgb { path } => vec![path.as_path()],
            Source::Rgbd(s) => {
                let mut v = vec![s.color.as_path(), s.depth.as_path()];
                if let Some(m) = &s.mask {
                    v.push(m.as_path());
                }
                v
            }
        }
    }
}

fn is_image_ext(p: &Path) -> bool {
    matches!(
        p.extension()
            .and_then(|e| e.to_str())
            .map(str::to_ascii_lowercase)
            .as_deref(),
        Some("jpg" | "jpeg" | "png" | "webp")
    )
}

/// A walk over input folders: each directory is visited once by its canonical path (so a
/// symlink loop ends and a folder reached twice is read once), a file reached twice (a folder
/// and a file in it, or through a link) is listed once, the `skip` folders (the run's own
/// output) are never entered, and only regular files are listed — a FIFO or device named
/// `*.jpg` would block a read forever. What it passes over that looks like input is noted.
#[derive(Debug, Default)]
pub struct Walk {
    seen_dirs: std::collections::HashSet<PathBuf>,
    seen_files: std::collections::HashSet<PathBuf>,
    skip: Vec<PathBuf>,
    /// Input-looking entries passed over, each naming the path and why.
    pub notes: Vec<String>,
}

impl Walk {
    /// A walk that never enters `skip` (folders that do not exist yet are ignored).
    pub fn new(skip: &[PathBuf]) -> Walk {
        Walk {
            skip: skip.iter().filter_map(|p| p.canonicalize().ok()).collect(),
            ..Default::default()
        }
    }

    /// True the first time the file at `p` (canonically) is offered.
    fn first_visit(&mut self, p: &Path) -> bool {
        let key = p.canonicalize().unwrap_or_else(|_| p.to_path_buf());
        self.seen_files.insert(key)
    }

    /// `dir`'s regular files and subfolders, sorted; `None` when `dir` was visited already or
    /// is a skipped folder.
    fn list(&mut self, dir: &Path) -> std::io::Result<Option<(Vec<PathBuf>, Vec<PathBuf>)>> {
        let canon = dir.canonicalize()?;
        if self.skip.contains(&canon) {
            self.notes.push(format!(
                "{}: the run's output folder, not read as input",
                dir.display()
            ));
            return Ok(None);
        }
        if !self.seen_dirs.insert(canon) {
            return Ok(None);
        }
        let (files, dirs) = list_dir(dir, &mut self.notes)?;
        let files = files.into_iter().filter(|f| self.first_visit(f)).collect();
        Ok(Some((files, dirs)))
    }
}

/// `dir`'s regular files and folders (links followed), sorted; an entry that is neither (a
/// FIFO, socket or device, or a broken link) is noted when its name is an image's.
fn list_dir(dir: &Path, notes: &mut Vec<String>) -> std::io::Result<(Vec<PathBuf>, Vec<PathBuf>)> {
    let mut files = Vec::new();
    let mut dirs = Vec::new();
    for e in std::fs::read_dir(dir)? {
        let e = e?;
        let p = e.path();
        match std::fs::metadata(&p) {
            Ok(m) if m.is_dir() => dirs.push(p),
            Ok(m) if m.is_file() => files.push(p),
            Ok(_) if is_image_ext(&p) => notes.push(format!(
                "{}: not a regular file (a FIFO, socket or device), skipped",
                p.display()
            )),
            Err(err) if is_image_ext(&p) => notes.push(format!("{}: skipped ({err})", p.display())),
            _ => {}
        }
    }
    files.sort();
    dirs.sort();
    Ok((files, dirs))
}

/// All photos under `dir` (recursively), sorted by path; `dir` may also be one photo.
pub fn discover_images(dir: &Path) -> std::io::Result<Vec<PathBuf>> {
    discover_images_in(dir, &mut Walk::default())
}

/// [`discover_images`] within a [`Walk`] shared by several inputs (each file once, the
/// output left out).
pub fn discover_images_in(dir: &Path, walk: &mut Walk) -> std::io::Result<Vec<PathBuf>> {
    let meta = std::fs::metadata(dir)?;
    if !meta.is_dir() {
        return match (meta.is_file(), is_image_ext(dir)) {
            (true, true) => Ok(match walk.first_visit(dir) {
                true => vec![dir.to_path_buf()],
                false => vec![],
            }),
            (false, _) => Err(std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                "not a regular file or folder (a FIFO, socket or device)",
            )),
            (true, false) => Err(std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                "neither a folder nor a jpg/png/webp image",
            )),
        };
    }
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Some((files, dirs)) = walk.list(&d)? else {
            continue;
        };
        out.extend(files.into_iter().filter(|p| is_image_ext(p)));
        stack.extend(dirs);
    }
    out.sort();
    Ok(out)
}

/// Refuses intrinsics no pinhole camera has: focal lengths must be positive, every value finite.
fn check_intrinsics(k: Intrinsics, path: &Path) -> Result<Intrinsics, String> {
    let all = [("fx", k.fx), ("fy", k.fy), ("cx", k.cx), ("cy", k.cy)];
    if let Some((n, v)) = all.iter().find(|(_, v)| !v.is_finite()) {
        return Err(format!(
            "{}: {n} = {v} is not a finite number",
            path.display()
        ));
    }
    if let Some((n, v)) = all[..2].iter().find(|(_, v)| *v <= 0.0) {
        return Err(format!(
            "{}: {n} = {v}: a focal length in pixels must be positive",
            path.display()
        ));
    }
    Ok(k)
}

/// Reads `intrinsics.json`: `{fx, fy, cx, cy}` at the top level, under `K` / `intrinsics`
/// (an object or a 3×3 matrix), or, failing those, the one nested object with all four keys
/// (preferring a key that mentions depth when there are several).
pub fn read_intrinsics_json(path: &Path) -> Result<Intrinsics, String> {
    let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let v: serde_json::Value = serde_json::from_str(&text)
        .map_err(|e| format!("{}: invalid JSON: {e}", path.display()))?;
    fn from_obj(v: &serde_json::Value) -> Option<Intrinsics> {
        if let Some(m) = v.as_array() {
            let row = |i: usize| m.get(i)?.as_array().cloned();
            let (r0, r1) = (row(0)?, row(1)?);
            return Some(Intrinsics {
                fx: r0.first()?.as_f64()?,
                cx: r0.get(2)?.as_f64()?,
                fy: r1.get(1)?.as_f64()?,
                cy: r1.get(2)?.as_f64()?,
            });
        }
        let g = |k: &str| v.get(k)?.as_f64();
        Some(Intrinsics {
            fx: g("fx")?,
            fy: g("fy")?,
            cx: g("cx")?,
            cy: g("cy")?,
        })
    }
    if let Some(k) = from_obj(&v) {
        return check_intrinsics(k, path);
    }
    for key in ["K", "intrinsics", "camera"] {
        if let Some(k) = v.get(key).and_then(from_obj) {
            return check_intrinsics(k, path);
        }
    }
    let mut found: Vec<(String, Intrinsics)> = v
        .as_object()
        .map(|o| {
            o.iter()
                .filter_map(|(k, x)| from_obj(x).map(|i| (k.clone(), i)))
                .collect()
        })
        .unwrap_or_default();
    if found.len() > 1 {
        if let Some(p) = found
            .iter()
            .position(|(k, _)| k.to_ascii_lowercase().contains("depth"))
        {
            return check_intrinsics(found.swap_remove(p).1, path);
        }
    }
    found
        .into_iter()
        .next()
        .map(|x| x.1)
        .ok_or_else(|| format!("{}: no fx, fy, cx, cy found", path.display()))
        .and_then(|k| check_intrinsics(k, path))
}

/// ScanNet's `intrinsic_color.txt`: a 4×4 matrix, whitespace separated.
fn read_matrix_intrinsics(path: &Path) -> Result<Intrinsics, String> {
    let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let v: Vec<f64> = text
        .split_whitespace()
        .map(|s| s.parse::<f64>())
        .collect::<Result<_, _>>()
        .map_err(|e| format!("{}: {e}", path.display()))?;
    if v.len() < 9 {
        return Err(format!("{}: expected a 3×3 or 4×4 matrix", path.display()));
    }
    let n = if v.len() >= 16 { 4 } else { 3 };
    check_intrinsics(
        Intrinsics {
            fx: v[0],
            cx: v[2],
            fy: v[n + 1],
            cy: v[n + 2],
        },
        path,
    )
}

/// Parses a TUM index file: `timestamp path` lines, `#` comments.
fn read_tum_index(path: &Path) -> Result<Vec<(f64, PathBuf)>, String> {
    let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let dir = path.parent().unwrap_or(Path::new("."));
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let mut it = line.split_whitespace();
        let (Some(ts), Some(file)) = (it.next(), it.next()) else {
            return Err(format!(
                "{}:{}: expected 'timestamp filename'",
                path.display(),
                i + 1
            ));
        };
        let ts: f64 = ts
            .parse()
            .map_err(|_| format!("{}:{}: bad timestamp {ts:?}", path.display(), i + 1))?;
        out.push((ts, dir.join(file)));
    }
    Ok(out)
}

/// What discovery found, and what it could not use.
#[derive(Debug, Default)]
pub struct Discovered {
    pub frames: Vec<RgbdSource>,
    /// Problems that make a whole folder or file unusable (e.g. a malformed index file).
    pub warnings: Vec<String>,
}

fn invalid(msg: String) -> std::io::Error {
    std::io::Error::new(std::io::ErrorKind::InvalidData, msg)
}

/// All RGB-D frames under `dir`, layout detected per folder, sorted by colour path. A
/// malformed `intrinsics.json` or `intrinsic_color.txt`, or one with a focal length ≤ 0, is an
/// error naming the file: taken as missing, it would change `--position-geometry metric`'s
/// answers.
/// A layout that keeps colour and depth in two sibling folders under the same file stem
/// (ScanNet's `color/` + `depth/`, MegaDepth's `imgs/` + `depths/`).
struct Paired {
    colour: &'static str,
    depth: &'static str,
    /// The depth file's extension.
    ext: &'static str,
    layout: Layout,
    encoding: DepthEncoding,
    resample_depth: bool,
    metric: bool,
}

impl Paired {
    /// Every image in `dir/colour` with its depth file, or a warning naming the missing one.
    fn collect(
        &self,
        dir: &Path,
        intrinsics: Option<Intrinsics>,
        walk: &mut Walk,
        found: &mut Discovered,
    ) -> std::io::Result<()> {
        let (files, _) = list_dir(&dir.join(self.colour), &mut walk.notes)?;
        for c in files.into_iter().filter(|p| is_image_ext(p)) {
            let stem = c.file_stem().and_then(|s| s.to_str()).unwrap_or("");
            let dp = dir.join(self.depth).join(format!("{stem}.{}", self.ext));
            if dp.is_file() {
                found.frames.push(RgbdSource {
                    layout: self.layout,
                    color: c,
                    depth: dp,
                    mask: None,
                    encoding: self.encoding,
                    resample_depth: self.resample_depth,
                    intrinsics,
                    metric: self.metric,
                });
            } else {
                found
                    .warnings
                    .push(format!("{}: no depth frame {}", c.display(), dp.display()));
            }
        }
        Ok(())
    }
}

pub fn discover_rgbd(dir: &Path) -> std::io::Result<Discovered> {
    discover_rgbd_in(dir, &mut Walk::default())
}

/// [`discover_rgbd`] within a [`Walk`] shared by several inputs.
pub fn discover_rgbd_in(dir: &Path, walk: &mut Walk) -> std::io::Result<Discovered> {
    let mut found = Discovered::default();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Some((files, dirs)) = walk.list(&d)? else {
            continue;
        };
        let folder_k = {
            let p = d.join("intrinsics.json");
            match p.is_file() {
                true => Some(read_intrinsics_json(&p).map_err(invalid)?),
                false => None,
            }
        };
        let name = |p: &Path| {
            p.file_name()
                .and_then(|n| n.to_str())
                .unwrap_or("")
                .to_string()
        };
        // TUM
        if d.join("rgb.txt").is_file() && d.join("depth.txt").is_file() {
            match (
                read_tum_index(&d.join("rgb.txt")),
                read_tum_index(&d.join("depth.txt")),
            ) {
                (Ok(rgb), Ok(depth)) => {
                    for (ts, color) in rgb {
                        let best = depth
                            .iter()
                            .min_by(|a, b| (a.0 - ts).abs().total_cmp(&(b.0 - ts).abs()));
                        match best {
                            Some((dts, dp)) if (dts - ts).abs() <= 0.02 => {
                                found.frames.push(RgbdSource {
                                    layout: Layout::Tum,
                                    color,
                                    depth: dp.clone(),
                                    mask: None,
                                    encoding: DepthEncoding::Png16 {
                                        scale: 1.0 / 5000.0,
                                    },
                                    resample_depth: false,
                                    intrinsics: folder_k,
                                    metric: true,
                                });
                            }
                            _ => found.warnings.push(format!(
                                "{}: no depth frame within 0.02 s of rgb timestamp {ts}",
                                d.join("depth.txt").display()
                            )),
                        }
                    }
                }
                (Err(e), _) | (_, Err(e)) => found.warnings.push(e),
            }
            stack.extend(
                dirs.into_iter()
                    .filter(|p| !matches!(name(p).as_str(), "rgb" | "depth")),
            );
            continue;
        }
        // ScanNet export: color/N.jpg ↔ depth/N.png (mm), resampled to the colour size.
        if d.join("color").is_dir() && d.join("depth").is_dir() {
            let kp = d.join("intrinsic").join("intrinsic_color.txt");
            let k = match kp.is_file() {
                true => Some(read_matrix_intrinsics(&kp).map_err(invalid)?),
                false => folder_k,
            };
            let pairing = Paired {
                colour: "color",
                depth: "depth",
                ext: "png",
                layout: Layout::Scannet,
                encoding: PNG_MM,
                resample_depth: true,
                metric: true,
            };
            pairing.collect(&d, k, walk, &mut found)?;
            stack.extend(
                dirs.into_iter().filter(|p| {
                    !matches!(name(p).as_str(), "color" | "depth" | "intrinsic" | "pose")
                }),
            );
            continue;
        }
        // MegaDepth_v1 as it ships: <scene>/dense*/imgs/X.jpg ↔ dense*/depths/X.h5.
        if d.join("imgs").is_dir() && d.join("depths").is_dir() {
            let pairing = Paired {
                colour: "imgs",
                depth: "depths",
                ext: "h5",
                layout: Layout::Megadepth,
                encoding: DepthEncoding::H5,
                resample_depth: false,
                metric: false,
            };
            pairing.collect(&d, folder_k, walk, &mut found)?;
            stack.extend(
                dirs.into_iter()
                    .filter(|p| !matches!(name(p).as_str(), "imgs" | "depths")),
            );
            continue;
        }
        // File-level pairings in this folder.
        let set: BTreeMap<String, PathBuf> = files.iter().map(|p| (name(p), p.clone())).collect();
        let has = |n: &str| set.get(n).cloned();
        for f in &files {
            if !is_image_ext(f) {
                continue;
            }
            let stem = f
                .file_stem()
                .and_then(|s| s.to_str())
                .unwrap_or("")
                .to_string();
            if stem.ends_with("_depth")
                || stem.ends_with("_depth_mask")
                || stem.starts_with("depth")
            {
                continue;
            }
            let mut push = |layout, depth: PathBuf, mask, encoding, metric| {
                found.frames.push(RgbdSource {
                    layout,
                    color: f.clone(),
                    depth,
                    mask,
                    encoding,
                    resample_depth: false,
                    intrinsics: folder_k,
                    metric,
                })
            };
            // Official sample naming: RGB-D_imgN.* ↔ RGB-D_depthN.{h5,npy}, RGB-D_depth_maskN.npy
            if let Some(n) = stem.strip_prefix("RGB-D_img") {
                if let Some(h5) = has(&format!("RGB-D_depth{n}.h5")) {
                    push(Layout::Megadepth, h5, None, DepthEncoding::H5, false);
                    continue;
                }
                if let Some(npy) = has(&format!("RGB-D_depth{n}.npy")) {
                    let mask = has(&format!("RGB-D_depth_mask{n}.npy"));
                    push(Layout::Diode, npy, mask, DepthEncoding::Npy, true);
                    continue;
                }
            }
            if let Some(npy) = has(&format!("{stem}_depth.npy")) {
                match has(&format!("{stem}_depth_mask.npy")) {
                    Some(mask) => push(Layout::Diode, npy, Some(mask), DepthEncoding::Npy, true),
                    None => push(Layout::Generic, npy, None, DepthEncoding::Npy, true),
                }
                continue;
            }
            if let Some(h5) = has(&format!("{stem}.h5")) {
                push(Layout::Megadepth, h5, None, DepthEncoding::H5, false);
                continue;
            }
            if let Some(png) = has(&format!("{stem}_depth.png")) {
                push(Layout::Generic, png, None, PNG_MM, true);
                continue;
            }
            if matches!(stem.as_str(), "color" | "rgb" | "image") {
                let depth = has("depth_mm.png")
                    .map(|p| (p, PNG_MM))
                    .or_else(|| has("depth.npy").map(|p| (p, DepthEncoding::Npy)))
                    .or_else(|| has("depth.png").map(|p| (p, PNG_MM)));
                if let Some((d, enc)) = depth {
                    push(Layout::Generic, d, None, enc, true);
                }
            }
        }
        stack.extend(dirs);
    }
    found.frames.sort_by(|a, b| a.color.cmp(&b.color));
    Ok(found)
}

/// A decoded RGB-D frame; `depth` is row-major, same size as `rgb`, NaN = invalid.
#[derive(Debug, Clone)]
pub struct RgbdFrame {
    pub rgb: RgbImage,
    pub depth: Vec<f32>,
    pub metric: bool,
    pub intrinsics: Option<Intrinsics>,
}

impl RgbdFrame {
    pub fn width(&self) -> usize {
        self.rgb.width() as usize
    }
    pub fn height(&self) -> usize {
        self.rgb.height() as usize
    }
    pub fn valid_fraction(&self) -> f64 {
        self.depth.iter().filter(|v| v.is_finite()).count() as f64 / self.depth.len().max(1) as f64
    }
}

/// Loads a depth map as `(width, height, values)` with invalid pixels as NaN.
pub fn load_depth(src: &RgbdSource) -> Result<(usize, usize, Vec<f32>), SourceError> {
    let p = src.depth.as_path();
    let (w, h, mut data) = match src.encoding {
        DepthEncoding::Npy => {
            let a = npy::read(p).map_err(|e| SourceError::new(SkipReason::Decode, p, e))?;
            let (h, w) = match a.shape.as_slice() {
                [h, w] | [h, w, 1] => (*h, *w),
                s => {
                    return Err(SourceError::new(
                        SkipReason::Decode,
                        p,
                        format!("depth array has shape {s:?}, expected (H, W) or (H, W, 1)"),
                    ))
                }
            };
            let mut d = a.data;
            invalid_to_nan(&mut d);
            (w, h, d)
        }
        DepthEncoding::H5 => {
            let f =
                hdf5_pure::File::open(p).map_err(|e| SourceError::new(SkipReason::Decode, p, e))?;
            let ds = f.dataset("depth").map_err(|e| {
                SourceError::new(SkipReason::Decode, p, format!("no dataset 'depth': {e}"))
            })?;
            let shape = ds
                .shape()
                .map_err(|e| SourceError::new(SkipReason::Decode, p, e))?;
            let [h, w] = shape.as_slice() else {
                return Err(SourceError::new(
                    SkipReason::Decode,
                    p,
                    format!("dataset 'depth' has shape {shape:?}, expected (H, W)"),
                ));
            };
            let (h, w) = (*h as usize, *w as usize);
            let mut d = match deflated_f32_chunks(&f, &ds, h, w) {
                Some(d) => d,
                None => ds
                    .read_f32()
                    .map_err(|e| SourceError::new(SkipReason::Decode, p, e))?,
            };
            invalid_to_nan(&mut d);
            (w, h, d)
        }
        DepthEncoding::Png16 { scale } => {
            let derr = |e: image::ImageError| SourceError::new(SkipReason::Decode, p, e);
            let reader = ImageReader::open(p)
                .map_err(|e| SourceError::new(SkipReason::Io, p, e))?
                .with_guessed_format()
                .map_err(|e| SourceError::new(SkipReason::Decode, p, e))?;
            let img = DynamicImage::from_decoder(checked_decoder(reader, p)?).map_err(derr)?;
            let img = match img {
                DynamicImage::ImageLuma16(i) => i,
                other => {
                    return Err(SourceError::new(
                        SkipReason::Decode,
                        p,
                        format!(
                            "depth PNG must be 16-bit single channel, found {:?}",
                            other.color()
                        ),
                    ))
                }
            };
            let (w, h) = img.dimensions();
            let d = img
                .into_raw()
                .into_iter()
                .map(|v| {
                    if v == 0 {
                        f32::NAN
                    } else {
                        f32::from(v) * scale
                    }
                })
                .collect();
            (w as usize, h as usize, d)
        }
    };
    if data.len() != w * h {
        return Err(SourceError::new(
            SkipReason::Decode,
            p,
            "depth data size does not match its shape",
        ));
    }
    if let Some(mp) = &src.mask {
        let m = npy::read(mp).map_err(|e| SourceError::new(SkipReason::Decode, mp, e))?;
        let (mh, mw) = match m.shape.as_slice() {
            [h, w] | [h, w, 1] => (*h, *w),
            s => {
                return Err(SourceError::new(
                    SkipReason::Decode,
                    mp,
                    format!("mask shape {s:?}"),
                ))
            }
        };
        // The official code crops a wider mask to the depth width.
        if mh != h || mw < w {
            return Err(SourceError::new(
                SkipReason::DepthSizeMismatch,
                mp,
                format!("mask is {mw}×{mh}, depth is {w}×{h}"),
            ));
        }
        for (row, mrow) in data
            .chunks_exact_mut(w.max(1))
            .zip(m.data.chunks_exact(mw.max(1)))
        {
            // (a select and a store for every pixel, not a branch: masks are irregular)
            for (v, &keep) in row.iter_mut().zip(mrow) {
                *v = if keep == 0.0 { f32::NAN } else { *v };
            }
        }
    }
    Ok((w, h, data))
}

/// A 2-D dataset of little-endian IEEE f32 stored as deflated chunks (MegaDepth's layout: 64 ×
/// 64 chunks, deflate alone), read straight from the file's bytes: each chunk inflated into one
/// buffer and its rows copied into place. The same inflater and the same values as
/// `Dataset::read_f32`, without its per-chunk buffers and copies (a third of the read on
/// MegaDepth frames). `None` for any other layout or anything unexpected — a missing chunk
/// (fill values), another filter, a chunk that does not inflate to its size — which the general
/// reader then reads or names.
fn deflated_f32_chunks(
    file: &hdf5_pure::File,
    ds: &hdf5_pure::Dataset,
    h: usize,
    w: usize,
) -> Option<Vec<f32>> {
    use hdf5_pure::{Datatype, DatatypeByteOrder, FloatingPointLayout};
    let f32_le = matches!(
        ds.datatype().ok()?,
        Datatype::FloatingPoint {
            size: 4,
            byte_order: DatatypeByteOrder::LittleEndian,
            layout: FloatingPointLayout::IEEE754_BINARY32,
        }
    );
    let deflate_only = matches!(ds.filter_pipeline().as_slice(), [f] if f.id == 1);
    let [ch, cw] = ds.chunk_shape().ok()??.as_slice().try_into().ok()?;
    let (ch, cw) = (usize::try_from(ch).ok()?, usize::try_from(cw).ok()?);
    if !f32_le || !deflate_only || ch == 0 || cw == 0 {
        return None;
    }
    let chunks = ds.chunks().ok()?;
    // Every chunk present once (none left to fill values).
    if chunks.len() != h.div_ceil(ch) * w.div_ceil(cw) {
        return None;
    }
    let bytes = file.as_bytes();
    let mut out = vec![0f32; h * w];
    let mut seen = vec![false; chunks.len()];
    let mut buf = vec![0u8; ch * cw * 4];
    let mut inflate = flate2::Decompress::new(true);
    for c in &chunks {
        let [y0, x0] = c.offset.as_slice().try_into().ok()?;
        let (y0, x0) = (usize::try_from(y0).ok()?, usize::try_from(x0).ok()?);
        if c.filter_mask != 0 || y0 % ch != 0 || x0 % cw != 0 || y0 >= h || x0 >= w {
            return None;
        }
        let slot = &mut seen[(y0 / ch) * w.div_ceil(cw) + x0 / cw];
        if std::mem::replace(slot, true) {
            return None;
        }
        let start = usize::try_from(c.address).ok()?;
        let stored = bytes.get(start..start.checked_add(usize::try_from(c.storage_size).ok()?)?)?;
        inflate.reset(true);
        let status = inflate
            .decompress(stored, &mut buf, flate2::FlushDecompress::Finish)
            .ok()?;
        if status != flate2::Status::StreamEnd || inflate.total_out() != buf.len() as u64 {
            return None;
        }
        let cols = cw.min(w - x0);
        for (r, row) in buf.chunks_exact(cw * 4).take(ch.min(h - y0)).enumerate() {
            let dst = &mut out[(y0 + r) * w + x0..][..cols];
            for (o, b) in dst.iter_mut().zip(row.chunks_exact(4)) {
                *o = f32::from_le_bytes([b[0], b[1], b[2], b[3]]);
            }
        }
    }
    Some(out)
}

/// Depths that are not finite and positive become NaN (invalid), with a select per pixel
/// rather than a branch: invalid pixels come in irregular patterns.
fn invalid_to_nan(d: &mut [f32]) {
    for v in d {
        let x = *v;
        *v = if x.is_finite() & (x > 0.0) {
            x
        } else {
            f32::NAN
        };
    }
}

/// Nearest-neighbour resampling of a depth map (never mixes depths across edges).
pub fn resample_nearest(src: &[f32], sw: usize, sh: usize, dw: usize, dh: usize) -> Vec<f32> {
    let mut out = vec![f32::NAN; dw * dh];
    for y in 0..dh {
        let sy = (((y as f64 + 0.5) * sh as f64 / dh as f64) as usize).min(sh - 1);
        for x in 0..dw {
            let sx = (((x as f64 + 0.5) * sw as f64 / dw as f64) as usize).min(sw - 1);
            out[y * dw + x] = src[sy * sw + sx];
        }
    }
    out
}

/// Reduces an image so its longer side is at most `max_side` (anti-aliased); returns the scale.
pub fn limit_side(img: RgbImage, max_side: u32) -> (RgbImage, f64) {
    let (w, h) = img.dimensions();
    let long = w.max(h);
    if max_side == 0 || long <= max_side {
        return (img, 1.0);
    }
    let s = f64::from(max_side) / f64::from(long);
    let nw = ((f64::from(w) * s).round() as u32).max(1);
    let nh = ((f64::from(h) * s).round() as u32).max(1);
    (
        image::imageops::resize(&img, nw, nh, image::imageops::FilterType::Triangle),
        s,
    )
}

/// Loads and validates an RGB-D frame; `max_side` bounds the colour size (depth follows).
pub fn load_rgbd(src: &RgbdSource, max_side: u32) -> Result<RgbdFrame, SourceError> {
    let rgb = load_rgb(&src.color)?;
    let (dw, dh, depth) = load_depth(src)?;
    let (cw, ch) = (rgb.width() as usize, rgb.height() as usize);
    let depth = if (dw, dh) == (cw, ch) {
        depth
    } else if src.resample_depth {
        resample_nearest(&depth, dw, dh, cw, ch)
    } else {
        return Err(SourceError::new(
            SkipReason::DepthSizeMismatch,
            &src.depth,
            format!(
                "depth is {dw}×{dh} but {} is {cw}×{ch}",
                src.color.display()
            ),
        ));
    };
    if !depth.iter().any(|v| v.is_finite()) {
        return Err(SourceError::new(
            SkipReason::InvalidDepth,
            &src.depth,
            "no valid depth pixel",
        ));
    }
    let (rgb, s) = limit_side(rgb, max_side);
    let (nw, nh) = (rgb.width() as usize, rgb.height() as usize);
    let (depth, intrinsics) = if s == 1.0 {
        (depth, src.intrinsics)
    } else {
        (
            resample_nearest(&depth, cw, ch, nw, nh),
            src.intrinsics
                .map(|k| k.scaled(nw as f64 / cw as f64, nh as f64 / ch as f64)),
        )
    };
    Ok(RgbdFrame {
        rgb,
        depth,
        metric: src.metric,
        intrinsics,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The chunk reader gives `read_f32`'s values to the bit — on MegaDepth's files and on
    /// written ones whose edge chunks are partial — and declines layouts it does not read
    /// (shuffle before deflate, no filter), which the general reader then reads.
    #[test]
    fn deflated_chunks_read_as_the_general_reader() {
        let read = |bytes: Vec<u8>| {
            let f = hdf5_pure::File::from_bytes(bytes).unwrap();
            let ds = f.dataset("depth").unwrap();
            let [h, w] = ds.shape().unwrap()[..] else {
                panic!("2-D")
            };
            let fast = deflated_f32_chunks(&f, &ds, h as usize, w as usize);
            let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
            (fast.map(|v| bits(&v)), bits(&ds.read_f32().unwrap()))
        };
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/official");
        for name in ["RGB-D_depth1.h5", "RGB-D_depth2.h5"] {
            let (fast, general) = read(std::fs::read(root.join(name)).unwrap());
            assert_eq!(fast.as_ref(), Some(&general), "{name}");
        }
        let (h, w) = (70usize, 45usize);
        let data: Vec<f32> = (0..h * w)
            .map(|i| match i % 13 {
                0 => f32::NAN,
                1 => 0.0,
                _ => (i as f32 * 0.37).sin() * 50.0 + 60.0,
            })
            .collect();
        let write = |chunks: &[u64], shuffle: bool, deflate: bool| {
            let mut b = hdf5_pure::FileBuilder::new();
            let ds = b.create_dataset("depth");
            ds.with_f32_data(&data)
                .with_shape(&[h as u64, w as u64])
                .with_chunks(chunks);
            if shuffle {
                ds.with_shuffle();
            }
            if deflate {
                ds.with_deflate(6);
            }
            b.finish().unwrap()
        };
        // 16 × 16 chunks over 70 × 45: the last row and column of chunks partial.
        let (fast, general) = read(write(&[16, 16], false, true));
        assert_eq!(fast.as_ref(), Some(&general));
        let want: Vec<u32> = data.iter().map(|x| x.to_bits()).collect();
        assert_eq!(general, want);
        for (shuffle, deflate) in [(true, true), (false, false)] {
            let (fast, general) = read(write(&[16, 16], shuffle, deflate));
            assert_eq!(fast, None, "shuffle {shuffle} deflate {deflate}");
            assert_eq!(general, want);
        }
    }
}
