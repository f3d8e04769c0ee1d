//! Drawing primitives with the look of the official generators: blue 2-px grid borders,
//! white digit labels with a black outline (PIL, Arial 48), and round region markers (a white
//! circle with a black edge and a black digit, as matplotlib's `boxstyle="circle"` draws them).
//!
//! The font is Liberation Sans, metric-compatible with Arial (SIL OFL 1.1, see
//! `assets/fonts/LICENSE-LiberationSans.txt`), embedded so output never depends on the host.

use ab_glyph::{Font, FontRef, PxScale, ScaleFont};
use image::RgbImage;
use std::sync::OnceLock;

static FONT_BYTES: &[u8] = include_bytes!("../../assets/fonts/LiberationSans-Regular.ttf");

/// PIL's `truetype(size)` is the em size in pixels; ab_glyph scales by ascent − descent.
fn em_scale(size_px: f32) -> PxScale {
    let f = font();
    let upem = f.units_per_em().unwrap_or(2048.0);
    PxScale::from(size_px * f.height_unscaled() / upem)
}

fn font() -> &'static FontRef<'static> {
    static FONT: OnceLock<FontRef<'static>> = OnceLock::new();
    FONT.get_or_init(|| FontRef::try_from_slice(FONT_BYTES).expect("embedded font parses"))
}

/// Blue in RGB. The official code draws `(255, 0, 0)` on a BGR image.
pub const BORDER_BLUE: [u8; 3] = [0, 0, 255];
pub const WHITE: [u8; 3] = [255, 255, 255];
pub const BLACK: [u8; 3] = [0, 0, 0];

#[inline]
fn blend(img: &mut RgbImage, x: i64, y: i64, rgb: [u8; 3], cov: f32) {
    if x < 0 || y < 0 || x >= i64::from(img.width()) || y >= i64::from(img.height()) || cov <= 0.0 {
        return;
    }
    let c = cov.min(1.0);
    let p = img.get_pixel_mut(x as u32, y as u32);
    for k in 0..3 {
        let v = f32::from(p[k]) * (1.0 - c) + f32::from(rgb[k]) * c;
        p[k] = v.round().clamp(0.0, 255.0) as u8;
    }
}

/// Pixel size of a string at an em size of `size_px` (PIL's `truetype(size)` convention):
/// `(advance width, ascent, descent)`.
pub fn text_metrics(text: &str, size_px: f32) -> (f32, f32, f32) {
    let f = font();
    let scale = em_scale(size_px);
    let sf = f.as_scaled(scale);
    let w: f32 = text.chars().map(|c| sf.h_advance(f.glyph_id(c))).sum();
    (w, sf.ascent(), sf.descent())
}

/// Draws `text` with its pen origin at `x` and its ascender line at `y` (PIL's default `"la"`
/// anchor), anti-aliased.
pub fn draw_text(img: &mut RgbImage, text: &str, x: f32, y: f32, size_px: f32, rgb: [u8; 3]) {
    let f = font();
    let scale = em_scale(size_px);
    let sf = f.as_scaled(scale);
    let baseline = y + sf.ascent();
    let mut pen = x;
    for ch in text.chars() {
        let id = f.glyph_id(ch);
        let glyph = id.with_scale_and_position(scale, ab_glyph::point(pen, baseline));
        pen += sf.h_advance(id);
        if let Some(outlined) = f.outline_glyph(glyph) {
            let b = outlined.px_bounds();
            outlined.draw(|gx, gy, cov| {
                blend(
                    img,
                    b.min.x as i64 + i64::from(gx),
                    b.min.y as i64 + i64::from(gy),
                    rgb,
                    cov,
                );
            });
        }
    }
}

/// Pixel bounds (min x, min y, max x, max y) of the inked part of `text` drawn at origin (0, 0)
/// with the `"la"` anchor.
fn ink_bounds(text: &str, size_px: f32) -> (f32, f32, f32, f32) {
    let f = font();
    let scale = em_scale(size_px);
    let sf = f.as_scaled(scale);
    let mut pen = 0.0;
    let (mut x0, mut y0, mut x1, mut y1) = (f32::MAX, f32::MAX, f32::MIN, f32::MIN);
    for ch in text.chars() {
        let id = f.glyph_id(ch);
        let glyph = id.with_scale_and_position(scale, ab_glyph::point(pen, sf.ascent()));
        pen += sf.h_advance(id);
        if let Some(o) = f.outline_glyph(glyph) {
            let b = o.px_bounds();
            x0 = x0.min(b.min.x);
            y0 = y0.min(b.min.y);
            x1 = x1.max(b.max.x);
            y1 = y1.max(b.max.y);
        }
    }
    (x0, y0, x1, y1)
}

/// The official patch label: the text drawn 8 times in black at offsets (±2, ±2), (0, ±2),
/// (±2, 0), then once in white, at (10, 10) with Arial 48.
pub fn outlined_label(img: &mut RgbImage, text: &str, x: f32, y: f32, size_px: f32) {
    for dx in [-2.0, 0.0, 2.0] {
        for dy in [-2.0, 0.0, 2.0] {
            if dx != 0.0 || dy != 0.0 {
                draw_text(img, text, x + dx, y + dy, size_px, BLACK);
            }
        }
    }
    draw_text(img, text, x, y, size_px, WHITE);
}

/// Label size and offset used by the shuffle and flip tasks (`arial.ttf`, 48, at (10, 10)).
pub const LABEL_SIZE_PX: f32 = 48.0;
pub const LABEL_OFFSET: f32 = 10.0;

/// `cv2.rectangle(patch, (0, 0), (w-1, h-1), color, thickness=2)`: a 2-pixel frame inside the patch.
pub fn border(img: &mut RgbImage, rgb: [u8; 3]) {
    let (w, h) = img.dimensions();
    let t = 2.min(w).min(h);
    for y in 0..h {
        for x in 0..w {
            if x < t || y < t || x + t >= w || y + t >= h {
                img.put_pixel(x, y, image::Rgb(rgb));
            }
        }
    }
}

/// Geometry of a round marker.
#[derive(Clone, Copy, Debug, serde::Serialize)]
pub struct MarkerStyle {
    /// Em size of the digit in pixels.
    pub font_px: f32,
    /// Outer radius of the circle (edge included) in pixels.
    pub radius: f32,
    /// Width of the black edge in pixels.
    pub edge: f32,
}

impl MarkerStyle {
    /// Scales matplotlib's look to the frame's native resolution. The official script shows
    /// the frame in an 8×6 inch figure at 150 dpi (about 930×697 px of axes) with a
    /// `fontsize`-point label in a circle of padding `pad` and edge `lw` points; we keep those
    /// proportions relative to the frame.
    pub fn matplotlib_like(w: u32, h: u32, fontsize_pt: f32, pad: f32, lw_pt: f32) -> Self {
        let s = (w as f32 / 930.0).max(h as f32 / 697.5).max(0.5);
        let font_px = fontsize_pt * 150.0 / 72.0 * s;
        // Text box of a digit is about 0.6 em wide and 0.75 em tall; the circle encloses the
        // padded box: r = (diag/2) + pad·em.
        let half_diag = 0.5 * (0.6f32.powi(2) + 0.75f32.powi(2)).sqrt() * font_px;
        let radius = half_diag + pad * font_px;
        MarkerStyle {
            font_px,
            radius,
            edge: (lw_pt * 150.0 / 72.0 * s).max(1.0),
        }
    }
}

/// Draws a white disc with a black edge centred at `(cx, cy)` and the digit(s) `text` centred in it.
pub fn marker(img: &mut RgbImage, cx: f32, cy: f32, text: &str, style: &MarkerStyle) {
    let r = style.radius;
    let inner = (r - style.edge).max(0.0);
    let x0 = (cx - r - 1.0).floor() as i64;
    let x1 = (cx + r + 1.0).ceil() as i64;
    let y0 = (cy - r - 1.0).floor() as i64;
    let y1 = (cy + r + 1.0).ceil() as i64;
    for y in y0..=y1 {
        for x in x0..=x1 {
            let d = ((x as f32 + 0.5 - cx).powi(2) + (y as f32 + 0.5 - cy).powi(2)).sqrt();
            let outer_cov = (r + 0.5 - d).clamp(0.0, 1.0);
            if outer_cov <= 0.0 {
                continue;
            }
            blend(img, x, y, BLACK, outer_cov);
            let inner_cov = (inner + 0.5 - d).clamp(0.0, 1.0);
            blend(img, x, y, WHITE, inner_cov);
        }
    }
    let (bx0, by0, bx1, by1) = ink_bounds(text, style.font_px);
    let ox = cx - (bx0 + bx1) / 2.0;
    let oy = cy - (by0 + by1) / 2.0;
    draw_text(img, text, ox, oy, style.font_px, BLACK);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn label_has_white_core_and_black_outline() {
        let mut img = RgbImage::from_pixel(120, 120, image::Rgb([128, 128, 128]));
        outlined_label(&mut img, "3", LABEL_OFFSET, LABEL_OFFSET, LABEL_SIZE_PX);
        let whites = img.pixels().filter(|p| p.0 == WHITE).count();
        let blacks = img.pixels().filter(|p| p.0 == BLACK).count();
        assert!(whites > 50, "white ink {whites}");
        assert!(blacks > 50, "black outline {blacks}");
        // Nothing drawn far from the label box.
        assert_eq!(img.get_pixel(100, 100).0, [128, 128, 128]);
        // Arial-metric 48 px digits are ~27 px wide and ~34 px tall.
        let (w, asc, _) = text_metrics("3", LABEL_SIZE_PX);
        assert!((26.0..28.5).contains(&w), "advance {w}");
        assert!((42.0..46.0).contains(&asc), "ascent {asc}");
    }

    #[test]
    fn border_is_two_pixels_blue() {
        let mut img = RgbImage::from_pixel(10, 8, image::Rgb([9, 9, 9]));
        border(&mut img, BORDER_BLUE);
        assert_eq!(img.get_pixel(0, 0).0, BORDER_BLUE);
        assert_eq!(img.get_pixel(1, 4).0, BORDER_BLUE);
        assert_eq!(img.get_pixel(8, 4).0, BORDER_BLUE);
        assert_eq!(img.get_pixel(2, 2).0, [9, 9, 9]);
        assert_eq!(img.get_pixel(7, 5).0, [9, 9, 9]);
    }

    #[test]
    fn marker_is_white_ring_with_black_edge_and_digit() {
        let mut img = RgbImage::from_pixel(200, 200, image::Rgb([0, 128, 0]));
        let st = MarkerStyle::matplotlib_like(930, 697, 15.0, 0.3, 1.5);
        marker(&mut img, 100.0, 100.0, "2", &st);
        // Edge ring just inside the radius is black, the pad area is white, far outside untouched.
        let r = st.radius;
        assert_eq!(
            img.get_pixel((100.0 + r - st.edge / 2.0) as u32, 100).0,
            BLACK
        );
        assert_eq!(
            img.get_pixel((100.0 + r - st.edge - 3.0) as u32, 100).0,
            WHITE
        );
        assert_eq!(img.get_pixel(100, (100.0 + r + 3.0) as u32).0, [0, 128, 0]);
        // Digit ink near the centre.
        let dark = (90..110)
            .flat_map(|y| (90..110).map(move |x| (x, y)))
            .filter(|&(x, y)| img.get_pixel(x, y).0[0] < 64)
            .count();
        assert!(dark > 20, "digit ink {dark}");
    }
}
