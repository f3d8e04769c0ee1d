//! Flipped patch recognition (`data_process/Flip.py`, paper §3.1.1, Eq. 2).

use super::draw::{self, BORDER_BLUE};
use super::imgops;
use super::templates;
use super::{Generated, SkipReason};
use crate::rng::Rng;
use image::RgbImage;
use serde_json::json;

/// A flip that changes the patch by less than this mean absolute difference (0–255 scale)
/// cannot be seen; such draws are redrawn (a uniform or symmetric patch).
pub const MIN_VISIBLE_MAD: f64 = 2.0;
const MAX_DRAWS: usize = 8;

/// 2×2 grid, one patch flipped vertically (0, `cv2.flip(p, 0)`) or horizontally
/// (1, `cv2.flip(p, 1)`); patches stay in place; labels 0–3 drawn after the flip.
pub fn generate(img: &RgbImage, rng: &mut Rng) -> Result<Generated, SkipReason> {
    let (w, h) = img.dimensions();
    let (ph, pw) = (h / 2, w / 2);
    if ph < super::shuffle::MIN_PATCH || pw < super::shuffle::MIN_PATCH {
        return Err(SkipReason::TooSmall);
    }
    let patches: Vec<RgbImage> = (0..4u32)
        .map(|i| imgops::crop(img, (i % 2) * pw, (i / 2) * ph, pw, ph))
        .collect();
    let mut chosen = None;
    for _ in 0..MAX_DRAWS {
        let t = rng.below(4);
        let d = rng.below(2);
        let flipped = if d == 0 {
            imgops::flip_vertical(&patches[t])
        } else {
            imgops::flip_horizontal(&patches[t])
        };
        let mad = imgops::mean_abs_diff(&flipped, &patches[t]);
        if mad >= MIN_VISIBLE_MAD {
            chosen = Some((t, d, flipped, mad));
            break;
        }
    }
    let Some((t, d, flipped, mad)) = chosen else {
        return Err(SkipReason::IndistinctOptions);
    };
    let mut out = RgbImage::new(2 * pw, 2 * ph);
    for (i, p) in patches.iter().enumerate() {
        let mut p = if i == t { flipped.clone() } else { p.clone() };
        draw::border(&mut p, BORDER_BLUE);
        draw::outlined_label(
            &mut p,
            &i.to_string(),
            draw::LABEL_OFFSET,
            draw::LABEL_OFFSET,
            draw::LABEL_SIZE_PX,
        );
        imgops::paste(&mut out, &p, (i as u32 % 2) * pw, (i as u32 / 2) * ph);
    }
    Ok(Generated {
        problem: templates::flip(),
        answer: format!("{t}-{d}"),
        images: vec![out],
        meta: json!({
            "variant": "2x2",
            "grid": [2, 2],
            "patch_size": [pw, ph],
            "flipped": t,
            "direction": d,
            "direction_name": if d == 0 { "vertical" } else { "horizontal" },
            "flip_mad": (mad * 100.0).round() / 100.0,
            "source_size": [w, h],
            "output_size": [2 * pw, 2 * ph],
        }),
    })
}
