//! Shuffled patch reordering (`data_process/Shuffle.py`, paper §3.1.1, Table 6).

use super::draw::{self, BORDER_BLUE};
use super::imgops;
use super::templates;
use super::{Generated, SkipReason};
use crate::rng::Rng;
use image::RgbImage;
use serde_json::json;

/// Smallest patch side that still fits the 48-px label with some context around it.
pub const MIN_PATCH: u32 = 64;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Variant {
    /// 2×2 grid.
    Grid,
    /// 2×2 grid with one patch painted white.
    GridMasked,
    /// `n` strips side by side (1×n).
    Horizontal(u32),
    /// `n` strips stacked (n×1).
    Vertical(u32),
}

impl Variant {
    /// Rows and columns `(M, N)`.
    pub fn grid(self) -> (u32, u32) {
        match self {
            Variant::Grid | Variant::GridMasked => (2, 2),
            Variant::Horizontal(n) => (1, n),
            Variant::Vertical(n) => (n, 1),
        }
    }

    pub fn name(self) -> String {
        match self {
            Variant::Grid => "2x2".into(),
            Variant::GridMasked => "2x2_mask".into(),
            Variant::Horizontal(n) => format!("1x{n}"),
            Variant::Vertical(n) => format!("{n}x1"),
        }
    }

    /// Draws a variant in the released dataset's proportions (paper Table 6:
    /// 4,000 / 4,028 / 4,991 / 3,009); 3 or 4 strips with equal probability (unspecified there).
    pub fn sample(rng: &mut Rng) -> Variant {
        match rng.weighted(&[4000.0, 4028.0, 4991.0, 3009.0]) {
            0 => Variant::Grid,
            1 => Variant::GridMasked,
            2 => Variant::Horizontal(3 + rng.below(2) as u32),
            _ => Variant::Vertical(3 + rng.below(2) as u32),
        }
    }
}

/// Splits the image into an M×N grid (remainder pixels on the right and bottom dropped),
/// shuffles the patches, optionally whitens one display slot, draws borders and labels, and
/// answers with the label found at each original position in raster order.
pub fn generate(img: &RgbImage, rng: &mut Rng, variant: Variant) -> Result<Generated, SkipReason> {
    let (m, n) = variant.grid();
    let (w, h) = img.dimensions();
    let (ph, pw) = (h / m, w / n);
    if ph < MIN_PATCH || pw < MIN_PATCH {
        return Err(SkipReason::TooSmall);
    }
    let k = (m * n) as usize;
    let patches: Vec<RgbImage> = (0..k as u32)
        .map(|i| imgops::crop(img, (i % n) * pw, (i / n) * ph, pw, ph))
        .collect();
    let mut perm: Vec<usize> = (0..k).collect();
    rng.shuffle(&mut perm);
    let masked = (variant == Variant::GridMasked).then(|| rng.below(k));
    let mut out = RgbImage::new(n * pw, m * ph);
    for (slot, &orig) in perm.iter().enumerate() {
        let mut p = patches[orig].clone();
        if masked == Some(slot) {
            imgops::fill_rect(&mut p, 0, 0, pw, ph, draw::WHITE);
        }
        draw::border(&mut p, BORDER_BLUE);
        draw::outlined_label(
            &mut p,
            &slot.to_string(),
            draw::LABEL_OFFSET,
            draw::LABEL_OFFSET,
            draw::LABEL_SIZE_PX,
        );
        let s = slot as u32;
        imgops::paste(&mut out, &p, (s % n) * pw, (s / n) * ph);
    }
    // argsort(perm): for each original position, the display label of the patch that belongs there.
    let mut answer = vec![0usize; k];
    for (slot, &orig) in perm.iter().enumerate() {
        answer[orig] = slot;
    }
    let answer: Vec<String> = answer.iter().map(ToString::to_string).collect();
    let problem = match variant {
        Variant::Grid => templates::shuffle_grid(false),
        Variant::GridMasked => templates::shuffle_grid(true),
        Variant::Horizontal(s) => templates::shuffle_strips(true, s as usize),
        Variant::Vertical(s) => templates::shuffle_strips(false, s as usize),
    };
    Ok(Generated {
        problem,
        answer: answer.join("-"),
        images: vec![out],
        meta: json!({
            "variant": variant.name(),
            "grid": [m, n],
            "patch_size": [pw, ph],
            "permutation": perm,
            "masked_slot": masked,
            "source_size": [w, h],
            "output_size": [n * pw, m * ph],
            "dropped": [w - n * pw, h - m * ph],
        }),
    })
}
