//! Qwen2-VL image preprocessing, as transformers' `Qwen2VLImageProcessor` does it:
//! smart_resize to multiples of `patch_size · merge_size`, PIL bicubic resize, rescale by 1/255,
//! CLIP normalisation, and patchify to `[t·h·w, C·T·P·P]` rows in merge-block-major order with the
//! still frame repeated over the temporal patch.

use image::RgbImage;
use serde::{Deserialize, Serialize};

/// The fields of `preprocessor_config.json` the pipeline needs (Qwen2.5-VL defaults).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct PreprocessorConfig {
    pub patch_size: u32,
    pub merge_size: u32,
    pub temporal_patch_size: u32,
    pub min_pixels: u64,
    pub max_pixels: u64,
    pub image_mean: [f32; 3],
    pub image_std: [f32; 3],
    pub rescale_factor: f64,
}

impl PreprocessorConfig {
    /// Values per patch row of `pixel_values`: channels × temporal patch × patch².
    pub fn row_len(&self) -> usize {
        (3 * self.temporal_patch_size * self.patch_size * self.patch_size) as usize
    }
}

impl Default for PreprocessorConfig {
    // The CLIP statistics exactly as preprocessor_config.json writes them.
    #[allow(clippy::excessive_precision)]
    fn default() -> Self {
        PreprocessorConfig {
            patch_size: 14,
            merge_size: 2,
            temporal_patch_size: 2,
            min_pixels: 3136,
            max_pixels: 12_845_056,
            image_mean: [0.481_454_66, 0.457_827_5, 0.408_210_73],
            image_std: [0.268_629_54, 0.261_302_58, 0.275_777_11],
            rescale_factor: 1.0 / 255.0,
        }
    }
}

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum ProcessorError {
    #[error("image is {w}×{h}: aspect ratio above 200 is not supported by Qwen2-VL")]
    AspectRatio { w: u32, h: u32 },
    #[error("image is empty ({w}×{h})")]
    Empty { w: u32, h: u32 },
}

/// `smart_resize(height, width, factor, min_pixels, max_pixels)`: the target `(h, w)`, multiples
/// of `factor`, closest to the input while the pixel count stays within bounds. Python's `round`
/// rounds halves to even, hence `round_ties_even`.
pub fn smart_resize(
    h: u32,
    w: u32,
    factor: u32,
    min_pixels: u64,
    max_pixels: u64,
) -> Result<(u32, u32), ProcessorError> {
    if h == 0 || w == 0 {
        return Err(ProcessorError::Empty { w, h });
    }
    if f64::from(h.max(w)) / f64::from(h.min(w)) > 200.0 {
        return Err(ProcessorError::AspectRatio { w, h });
    }
    let f = f64::from(factor);
    let (hf, wf) = (f64::from(h), f64::from(w));
    let mut hb = ((hf / f).round_ties_even() * f).max(f);
    let mut wb = ((wf / f).round_ties_even() * f).max(f);
    if hb * wb > max_pixels as f64 {
        let beta = (hf * wf / max_pixels as f64).sqrt();
        hb = f.max((hf / beta / f).floor() * f);
        wb = f.max((wf / beta / f).floor() * f);
    } else if hb * wb < min_pixels as f64 {
        let beta = (min_pixels as f64 / (hf * wf)).sqrt();
        hb = (hf * beta / f).ceil() * f;
        wb = (wf * beta / f).ceil() * f;
    }
    Ok((hb as u32, wb as u32))
}

// ---- PIL's bicubic resampling (Pillow `libImaging/Resample.c`), bit-exact for 8-bit RGB ----

const PRECISION_BITS: u32 = 32 - 8 - 2;

fn bicubic(x: f64) -> f64 {
    const A: f64 = -0.5;
    let x = x.abs();
    if x < 1.0 {
        ((A + 2.0) * x - (A + 3.0)) * x * x + 1.0
    } else if x < 2.0 {
        (((x - 5.0) * x + 8.0) * x - 4.0) * A
    } else {
        0.0
    }
}

/// Per output pixel: first input index, and fixed-point weights.
fn coefficients(in_size: u32, out_size: u32) -> (usize, Vec<(usize, Vec<i32>)>) {
    let scale = f64::from(in_size) / f64::from(out_size);
    let filterscale = scale.max(1.0);
    let support = 2.0 * filterscale;
    let ksize = support.ceil() as usize * 2 + 1;
    let ss = 1.0 / filterscale;
    let mut out = Vec::with_capacity(out_size as usize);
    for xx in 0..out_size {
        let center = (f64::from(xx) + 0.5) * scale;
        let xmin = ((center - support + 0.5) as i64).max(0) as usize;
        let xmax = ((center + support + 0.5) as i64).min(i64::from(in_size)) as usize;
        let mut w: Vec<f64> = (xmin..xmax)
            .map(|x| bicubic((x as f64 - center + 0.5) * ss))
            .collect();
        let total: f64 = w.iter().sum();
        if total != 0.0 {
            for v in &mut w {
                *v /= total;
            }
        }
        let k = w
            .iter()
            .map(|v| {
                let s = v * f64::from(1u32 << PRECISION_BITS);
                (if *v < 0.0 { s - 0.5 } else { s + 0.5 }) as i32
            })
            .collect();
        out.push((xmin, k));
    }
    (ksize, out)
}

#[inline]
fn clip8(v: i32) -> u8 {
    // Pillow's clip8 on its 32-bit sums: 8-bit taps times 22-bit weights that sum to one stay
    // far inside i32, as in Pillow.
    (v >> PRECISION_BITS).clamp(0, 255) as u8
}

fn pass_horizontal(src: &[u8], iw: u32, ih: u32, w: u32) -> Vec<u8> {
    let (_, cx) = coefficients(iw, w);
    let (iw, w) = (iw as usize, w as usize);
    let mut out = vec![0u8; w * ih as usize * 3];
    for (row, orow) in src.chunks_exact(iw * 3).zip(out.chunks_exact_mut(w * 3)) {
        for ((xmin, k), px) in cx.iter().zip(orow.chunks_exact_mut(3)) {
            let taps = &row[xmin * 3..(xmin + k.len()) * 3];
            let mut ss = [1i32 << (PRECISION_BITS - 1); 3];
            for (p, &kv) in taps.chunks_exact(3).zip(k) {
                for c in 0..3 {
                    ss[c] += i32::from(p[c]) * kv;
                }
            }
            for c in 0..3 {
                px[c] = clip8(ss[c]);
            }
        }
    }
    out
}

fn pass_vertical(src: &[u8], w: u32, ih: u32, h: u32) -> Vec<u8> {
    let (_, cy) = coefficients(ih, h);
    let stride = w as usize * 3;
    let mut out = vec![0u8; stride * h as usize];
    let mut acc = vec![0i32; stride];
    for ((ymin, k), orow) in cy.iter().zip(out.chunks_exact_mut(stride)) {
        // Whole rows per tap: the inner loop runs over contiguous bytes and vectorises.
        acc.fill(1 << (PRECISION_BITS - 1));
        for (i, &kv) in k.iter().enumerate() {
            let line = &src[(ymin + i) * stride..(ymin + i + 1) * stride];
            for (a, &v) in acc.iter_mut().zip(line) {
                *a += i32::from(v) * kv;
            }
        }
        for (o, &a) in orow.iter_mut().zip(&acc) {
            *o = clip8(a);
        }
    }
    out
}

/// `PIL.Image.resize((w, h), Image.BICUBIC)` on an RGB image with Pillow's fixed-point weights
/// and 8-bit rounding between the two passes. Pillow (13.0) runs the horizontal pass first,
/// except when the width grows while the height shrinks; the order changes the rounding, so it
/// is reproduced here (checked against Pillow on all four combinations).
pub fn resize_bicubic_pil(img: &RgbImage, w: u32, h: u32) -> RgbImage {
    let (iw, ih) = img.dimensions();
    let src = img.as_raw();
    let vertical_first = w > iw && h < ih;
    let out = if vertical_first {
        let v = pass_vertical(src, iw, ih, h);
        pass_horizontal(&v, iw, h, w)
    } else {
        let hz = if iw == w {
            src.clone()
        } else {
            pass_horizontal(src, iw, ih, w)
        };
        if ih == h {
            hz
        } else {
            pass_vertical(&hz, w, ih, h)
        }
    };
    RgbImage::from_raw(w, h, out).expect("size matches")
}

/// One image's model inputs: rows of `pixel_values` and its `[t, h, w]` grid in patches.
#[derive(Debug, Clone, PartialEq)]
pub struct ProcessedImage {
    /// `[t·h·w, C·T·P·P]`, row-major.
    pub pixel_values: Vec<f32>,
    pub row_len: usize,
    pub grid_thw: [u32; 3],
}

/// `<|image_pad|>` tokens an image of patch grid `[t, h, w]` takes in the prompt.
pub fn image_tokens(grid_thw: [u32; 3], merge_size: u32) -> usize {
    (grid_thw[0] * grid_thw[1] * grid_thw[2] / (merge_size * merge_size)) as usize
}

/// The `[t, h, w]` patch grid [`preprocess`] gives a `w × h` image: smart_resize only, without
/// touching a pixel (what a prompt needs to size its image tokens).
pub fn grid_thw(w: u32, h: u32, cfg: &PreprocessorConfig) -> Result<[u32; 3], ProcessorError> {
    let factor = cfg.patch_size * cfg.merge_size;
    let (hb, wb) = smart_resize(h, w, factor, cfg.min_pixels, cfg.max_pixels)?;
    Ok([1, hb / cfg.patch_size, wb / cfg.patch_size])
}

/// The full pipeline for one still image.
pub fn preprocess(
    img: &RgbImage,
    cfg: &PreprocessorConfig,
) -> Result<ProcessedImage, ProcessorError> {
    let mut pixel_values = Vec::new();
    let grid_thw = preprocess_into(img, cfg, &mut pixel_values)?;
    Ok(ProcessedImage {
        row_len: cfg.row_len(),
        pixel_values,
        grid_thw,
    })
}

/// [`preprocess`] into `out` (cleared first, its memory reused: a worker that keeps one buffer
/// does not fault fresh pages in for every image); returns the patch grid.
pub fn preprocess_into(
    img: &RgbImage,
    cfg: &PreprocessorConfig,
    out: &mut Vec<f32>,
) -> Result<[u32; 3], ProcessorError> {
    let (w, h) = img.dimensions();
    let grid = grid_thw(w, h, cfg)?;
    let (ps, ms, tp) = (
        cfg.patch_size as usize,
        cfg.merge_size as usize,
        cfg.temporal_patch_size as usize,
    );
    let (gh, gw) = (grid[1] as usize, grid[2] as usize);
    let (hb, wb) = ((gh * ps) as u32, (gw * ps) as u32);
    let resized = if (wb, hb) == (w, h) {
        std::borrow::Cow::Borrowed(img)
    } else {
        std::borrow::Cow::Owned(resize_bicubic_pil(img, wb, hb))
    };
    // Rescale and normalise, as the processor does it in float32, for each of the 256 values of
    // each channel: the pixels are then looked up.
    let lut: [[f32; 256]; 3] = std::array::from_fn(|c| {
        std::array::from_fn(|v| {
            let x = (v as f64 * cfg.rescale_factor) as f32;
            (x - cfg.image_mean[c]) / cfg.image_std[c]
        })
    });
    // One pass from the interleaved pixels straight into the patch rows, no intermediate
    // image. Rows: (block_row, block_col, row_in_block, col_in_block); values: (channel,
    // temporal, y, x), the temporal copies of a still image equal.
    let raw = resized.as_raw();
    let stride = wb as usize * 3;
    let row_len = cfg.row_len();
    out.clear();
    out.reserve(gh * gw * row_len);
    for br in 0..gh / ms {
        for bc in 0..gw / ms {
            for ir in 0..ms {
                for ic in 0..ms {
                    let (py, px) = ((br * ms + ir) * ps, (bc * ms + ic) * ps);
                    for (c, lut) in lut.iter().enumerate() {
                        let first = out.len();
                        for y in 0..ps {
                            let line = &raw[(py + y) * stride + px * 3..][..ps * 3];
                            out.extend(line.chunks_exact(3).map(|p| lut[p[c] as usize]));
                        }
                        for _ in 1..tp {
                            out.extend_from_within(first..first + ps * ps);
                        }
                    }
                }
            }
        }
    }
    Ok(grid)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn smart_resize_cases() {
        let d = PreprocessorConfig::default();
        let sr = |h, w| smart_resize(h, w, 28, d.min_pixels, d.max_pixels).unwrap();
        assert_eq!(sr(168, 224), (168, 224));
        // 42/28 = 1.5 rounds to 2 (even), 70/28 = 2.5 rounds to 2 (even).
        assert_eq!(sr(42, 70), (56, 56));
        assert_eq!(sr(300, 451), (308, 448));
        // Too small: scaled up to at least min_pixels.
        assert_eq!(sr(20, 30), (56, 84));
        // Too large: scaled down below max_pixels.
        let (h, w) = sr(10_000, 8_000);
        assert!(u64::from(h) * u64::from(w) <= d.max_pixels && h % 28 == 0 && w % 28 == 0);
        assert_eq!(
            smart_resize(1, 300, 28, 3136, 1 << 30),
            Err(ProcessorError::AspectRatio { w: 300, h: 1 })
        );
    }

    #[test]
    fn patch_rows_are_merge_block_major() {
        // 56×56 image → 4×4 patches; 2×2 merge blocks. Paint each patch with its index.
        let d = PreprocessorConfig::default();
        let img = RgbImage::from_fn(56, 56, |x, y| {
            let v = ((y / 14) * 4 + x / 14) as u8 * 10;
            image::Rgb([v, v, v])
        });
        let p = preprocess(&img, &d).unwrap();
        assert_eq!(p.grid_thw, [1, 4, 4]);
        assert_eq!(p.row_len, 1176);
        let first = |r: usize| p.pixel_values[r * 1176];
        let val = |idx: u32| ((idx * 10) as f32 / 255.0 - d.image_mean[0]) / d.image_std[0];
        // Block (0,0) holds patches 0, 1, 4, 5; block (0,1) holds 2, 3, 6, 7.
        for (row, patch) in [
            (0, 0),
            (1, 1),
            (2, 4),
            (3, 5),
            (4, 2),
            (5, 3),
            (6, 6),
            (7, 7),
            (8, 8),
        ] {
            assert!((first(row) - val(patch)).abs() < 1e-6, "row {row}");
        }
        // The temporal copy repeats the frame: values 196..392 equal 0..196 in each channel.
        assert_eq!(p.pixel_values[..196], p.pixel_values[196..392]);
        assert_eq!(image_tokens(p.grid_thw, 2), 4);
    }
}
