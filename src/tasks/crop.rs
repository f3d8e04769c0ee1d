//! Cropped patch inpainting (`data_process/Crop.py`, paper §3.1.1 Eq. 3–4, Table 7).

use super::imgops;
use super::templates;
use super::{Generated, SkipReason};
use crate::rng::Rng;
use image::RgbImage;
use serde_json::json;

/// Options closer than this mean absolute difference (0–255 scale) count as the same picture.
/// The paper promises distinct distractors; the official code does not check, so a uniform
/// region (sky, a wall) can yield rotations identical to the answer.
pub const MIN_OPTION_MAD: f64 = 3.0;
const MAX_PLACEMENTS: usize = 6;
const MIN_SIDE: u32 = 32;

/// The five distractor kinds of the official code.
pub const KINDS: [&str; 5] = [
    "left_rotate",
    "right_rotate",
    "interior",
    "large1",
    "large2",
];

/// Builds one distractor of `kind` for the crop at `(x, y)` of side `side`.
/// Returns the image and, for zooms, the source region `[x0, y0, x1, y1)` it shows.
fn distractor(
    img: &RgbImage,
    crop: &RgbImage,
    kind: &str,
    x: u32,
    y: u32,
    side: u32,
) -> (RgbImage, Option<[u32; 4]>) {
    let (w, h) = img.dimensions();
    match kind {
        "left_rotate" => (imgops::rotate_ccw(crop), None),
        "right_rotate" => (imgops::rotate_cw(crop), None),
        "interior" => {
            let (a, b) = (side / 4, 3 * side / 4);
            let inner = imgops::crop(crop, a, a, b - a, b - a);
            (
                imgops::resize_bilinear(&inner, side, side),
                Some([x + a, y + a, x + b, y + b]),
            )
        }
        _ => {
            // large1: θ = 0.25 → margin side//4; large2: θ = 0.5 → margin side//2.
            let m = if kind == "large1" { side / 4 } else { side / 2 };
            let x0 = x.saturating_sub(m);
            let y0 = y.saturating_sub(m);
            let x1 = (x + side + m).min(w);
            let y1 = (y + side + m).min(h);
            let region = imgops::crop(img, x0, y0, x1 - x0, y1 - y0);
            (
                imgops::resize_bilinear(&region, side, side),
                Some([x0, y0, x1, y1]),
            )
        }
    }
}

/// A black square of side `int(min(h, w) / 2)` at a uniform position; the true patch and three
/// distractors of distinct kinds (drawn without replacement from the five) as options A–D,
/// all pairwise distinct. Five images: the blackened frame, then options A, B, C, D.
pub fn generate(img: &RgbImage, rng: &mut Rng) -> Result<Generated, SkipReason> {
    let (w, h) = img.dimensions();
    let side = w.min(h) / 2;
    if side < MIN_SIDE {
        return Err(SkipReason::TooSmall);
    }
    for _ in 0..MAX_PLACEMENTS {
        let x = rng.range_incl(0, (w - side) as usize) as u32;
        let y = rng.range_incl(0, (h - side) as usize) as u32;
        let truth = imgops::crop(img, x, y, side, side);
        let gt = rng.below(4);
        let mut pool: Vec<&str> = KINDS.to_vec();
        let mut options: Vec<(RgbImage, &str, Option<[u32; 4]>)> = Vec::with_capacity(4);
        // The distances between the options placed so far (every pair, once).
        let mut pair_mads: Vec<f64> = Vec::with_capacity(6);
        let mut ok = true;
        for slot in 0..4 {
            if slot == gt {
                options.push((truth.clone(), "true", Some([x, y, x + side, y + side])));
                continue;
            }
            // Draw kinds without replacement until one is distinct from the true patch and
            // from every distractor so far.
            let mut placed = false;
            while !pool.is_empty() {
                let kind = pool.remove(rng.below(pool.len()));
                let (im, region) = distractor(img, &truth, kind, x, y, side);
                let mut mads = Vec::with_capacity(4);
                let distinct = std::iter::once(&truth)
                    .chain(
                        options
                            .iter()
                            .enumerate()
                            .filter(|&(i, _)| i != gt)
                            .map(|(_, o)| &o.0),
                    )
                    .all(|o| {
                        let d = imgops::mean_abs_diff_sampled(&im, o);
                        mads.push(d);
                        d >= MIN_OPTION_MAD
                    });
                if distinct {
                    pair_mads.extend(mads);
                    options.push((im, kind, region));
                    placed = true;
                    break;
                }
            }
            if !placed {
                ok = false;
                break;
            }
        }
        if !ok {
            continue;
        }
        let min_mad = pair_mads.iter().copied().fold(f64::MAX, f64::min);
        let mut black = img.clone();
        imgops::fill_rect(&mut black, x, y, side, side, [0, 0, 0]);
        let meta_opts: Vec<_> = options
            .iter()
            .zip(['A', 'B', 'C', 'D'])
            .map(|((_, kind, region), l)| json!({"letter": l.to_string(), "kind": kind, "region": region}))
            .collect();
        let mut images = vec![black];
        images.extend(options.into_iter().map(|o| o.0));
        return Ok(Generated {
            problem: templates::crop(),
            answer: ["A", "B", "C", "D"][gt].to_string(),
            images,
            meta: json!({
                "variant": "crop",
                "side": side,
                "box": [x, y, side, side],
                "answer_slot": gt,
                "options": meta_opts,
                "min_option_mad": (min_mad * 100.0).round() / 100.0,
                "source_size": [w, h],
            }),
        });
    }
    Err(SkipReason::IndistinctOptions)
}
