//! Images under this project's limits: headers read without decoding, photos decoded to RGB
//! (by content, EXIF orientation applied, truncated JPEGs refused, sizes bounded before any
//! pixel is decoded). Every stage that reads an image — tasks, rollouts, training, evaluation —
//! comes through here.

use image::{DynamicImage, ImageDecoder, ImageReader, RgbImage};
use std::path::Path;

/// What went wrong with an image: the file could not be read, is not a (whole) image, or
/// claims more pixels than a source may have.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ImageFault {
    Io,
    Decode,
    TooLarge,
}

/// An image that cannot be used: what went wrong, and a message naming the file.
#[derive(Debug, Clone)]
pub struct ImageError {
    pub fault: ImageFault,
    pub message: String,
}

impl ImageError {
    pub fn new(fault: ImageFault, path: &Path, detail: impl std::fmt::Display) -> Self {
        ImageError {
            fault,
            message: format!("{}: {detail}", path.display()),
        }
    }
}

impl std::fmt::Display for ImageError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for ImageError {}

/// `(width, height)` of an image held in memory (`path` names it in errors), from its header.
pub fn image_size_of(bytes: &[u8], path: &Path) -> Result<(u32, u32), ImageError> {
    ImageReader::new(std::io::Cursor::new(bytes))
        .with_guessed_format()
        .map_err(|e| ImageError::new(ImageFault::Decode, path, e))?
        .into_dimensions()
        .map_err(|e| ImageError::new(ImageFault::Decode, path, e))
}

/// `(width, height)` of the image at `path`, from its header (the pixels are not decoded).
pub fn image_size(path: &Path) -> Result<(u32, u32), ImageError> {
    ImageReader::open(path)
        .map_err(|e| ImageError::new(ImageFault::Io, path, e))?
        .with_guessed_format()
        .map_err(|e| ImageError::new(ImageFault::Decode, path, e))?
        .into_dimensions()
        .map_err(|e| ImageError::new(ImageFault::Decode, path, e))
}

/// The photo at `path` decoded to RGB ([`decode_rgb`]).
pub fn load_rgb(path: &Path) -> Result<RgbImage, ImageError> {
    let bytes = std::fs::read(path).map_err(|e| ImageError::new(ImageFault::Io, path, e))?;
    decode_rgb(&bytes, path)
}

/// A JPEG is complete when an end-of-image marker follows its last start-of-scan marker.
/// (Decoders pad a truncated scan with grey instead of failing.) Entropy-coded data stuffs
/// every 0xFF byte, so the markers cannot occur inside it.
pub fn jpeg_is_complete(bytes: &[u8]) -> bool {
    let last = |m: u8| bytes.windows(2).rposition(|w| w[0] == 0xFF && w[1] == m);
    match (last(0xDA), last(0xD9)) {
        (Some(sos), Some(eoi)) => eoi > sos,
        _ => false,
    }
}

/// The most pixels a source image may have (16,384², 268 M): a larger one is skipped from its
/// header, before any pixel is decoded (a 10 MB PNG can claim 60,000 × 60,000 pixels, 11 GB
/// decoded). `--max-side` applies after decoding, so it cannot guard this.
pub const MAX_PIXELS: u64 = 1 << 28;

/// A decoder for `reader` under this project's limits: at most [`MAX_PIXELS`], and at most
/// 2 GiB allocated by the decoder itself (the image crate's own check, for formats whose
/// header understates what they allocate). Each thread that decodes goes through here.
pub fn checked_decoder<'a, R: std::io::BufRead + std::io::Seek + 'a>(
    mut reader: ImageReader<R>,
    path: &Path,
) -> Result<impl ImageDecoder + 'a, ImageError> {
    let mut limits = image::Limits::default();
    limits.max_alloc = Some(2 << 30);
    reader.limits(limits);
    let decoder = reader.into_decoder().map_err(|e| match e {
        image::ImageError::Limits(l) => ImageError::new(
            ImageFault::TooLarge,
            path,
            format!("{l}: more than a source may take (at most {MAX_PIXELS} pixels; not decoded)"),
        ),
        e => ImageError::new(ImageFault::Decode, path, e),
    })?;
    let (w, h) = decoder.dimensions();
    if u64::from(w) * u64::from(h) > MAX_PIXELS {
        return Err(ImageError::new(
            ImageFault::TooLarge,
            path,
            format!(
                "{w} × {h} pixels, over the {MAX_PIXELS}-pixel limit of a source (not decoded)"
            ),
        ));
    }
    Ok(decoder)
}

/// Decodes a photo to RGB: any supported format by content, EXIF orientation applied,
/// grayscale expanded, alpha dropped; a JPEG without its end-of-image marker is refused as
/// truncated (decoders would pad it with grey).
pub fn decode_rgb(bytes: &[u8], path: &Path) -> Result<RgbImage, ImageError> {
    let err = |e: image::ImageError| ImageError::new(ImageFault::Decode, path, e);
    let reader = ImageReader::new(std::io::Cursor::new(bytes))
        .with_guessed_format()
        .map_err(|e| ImageError::new(ImageFault::Decode, path, e))?;
    match reader.format() {
        None => {
            return Err(ImageError::new(
                ImageFault::Decode,
                path,
                "not a recognised image format",
            ))
        }
        Some(image::ImageFormat::Jpeg) if !jpeg_is_complete(bytes) => {
            return Err(ImageError::new(
                ImageFault::Decode,
                path,
                "truncated JPEG (no end-of-image marker)",
            ))
        }
        _ => {}
    }
    #[cfg(feature = "fast-jpeg")]
    let jpeg = reader.format() == Some(image::ImageFormat::Jpeg);
    let mut decoder = checked_decoder(reader, path)?;
    let orientation = decoder.orientation().map_err(err)?;
    #[cfg(feature = "fast-jpeg")]
    if jpeg {
        if let Some(rgb) = decode_jpeg_turbo(bytes) {
            let mut img = DynamicImage::ImageRgb8(
                rgb.map_err(|e| ImageError::new(ImageFault::Decode, path, e))?,
            );
            img.apply_orientation(orientation);
            return Ok(to_rgb8(img));
        }
    }
    let mut img = DynamicImage::from_decoder(decoder).map_err(err)?;
    img.apply_orientation(orientation);
    Ok(to_rgb8(img))
}

/// libjpeg-turbo's decode of a whole JPEG to RGB (the `fast-jpeg` build: its SIMD decoder,
/// 1.3–1.5× the image crate's on photos) with libjpeg's defaults — the accurate integer IDCT
/// and fancy upsampling, as Pillow and OpenCV decode: their pixels exactly (checked on
/// baseline 4:2:0, 4:2:2 and 4:4:4, progressive and greyscale files). `None` for a colour
/// space it does not convert to RGB (CMYK, YCCK): the image crate decodes those.
#[cfg(feature = "fast-jpeg")]
fn decode_jpeg_turbo(bytes: &[u8]) -> Option<Result<RgbImage, String>> {
    use mozjpeg::{ColorSpace, Decompress};
    let run = || -> std::io::Result<Option<RgbImage>> {
        let d = Decompress::new_mem(bytes)?;
        let space = d.color_space();
        if !matches!(
            space,
            ColorSpace::JCS_YCbCr | ColorSpace::JCS_GRAYSCALE | ColorSpace::JCS_RGB
        ) {
            return Ok(None);
        }
        let mut s = d.rgb()?;
        let (w, h) = (s.width() as u32, s.height() as u32);
        let px = s.read_scanlines::<u8>()?;
        s.finish()?;
        Ok(RgbImage::from_raw(w, h, px))
    };
    // (libjpeg's fatal errors unwind out of the decoder as a panic payload: its message)
    match std::panic::catch_unwind(std::panic::AssertUnwindSafe(run)) {
        Ok(Ok(img)) => img.map(Ok),
        Ok(Err(e)) => Some(Err(e.to_string())),
        Err(payload) => Some(Err(payload
            .downcast_ref::<String>()
            .cloned()
            .unwrap_or_else(|| "libjpeg-turbo could not decode it".into()))),
    }
}

/// `DynamicImage::to_rgb8` with the common 8-bit layouts done directly (grey repeated, alpha
/// dropped: the same pixels as image's conversion, which goes through a general per-pixel path
/// several times slower); other layouts through image's conversion.
fn to_rgb8(img: DynamicImage) -> RgbImage {
    let (w, h) = (img.width(), img.height());
    // `src` in pixels of `n` bytes, each made RGB by `f`.
    let convert = |src: &[u8], n: usize, f: fn(&mut [u8], &[u8])| {
        let mut rgb = vec![0u8; w as usize * h as usize * 3];
        rgb.chunks_exact_mut(3)
            .zip(src.chunks_exact(n))
            .for_each(|(o, p)| f(o, p));
        RgbImage::from_raw(w, h, rgb).expect("buffer size matches")
    };
    match img {
        DynamicImage::ImageRgb8(i) => i,
        DynamicImage::ImageLuma8(i) => convert(i.as_raw(), 1, |o, p| o.fill(p[0])),
        DynamicImage::ImageLumaA8(i) => convert(i.as_raw(), 2, |o, p| o.fill(p[0])),
        DynamicImage::ImageRgba8(i) => convert(i.as_raw(), 4, |o, p| o.copy_from_slice(&p[..3])),
        other => other.to_rgb8(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// With `fast-jpeg`, JPEGs decode to Pillow's pixels exactly (`tests/fixtures/pillow`:
    /// Pillow 13's digests of a photo, an RGB-D frame, OpenCV's 4:2:0 output, a 4:4:4 and a
    /// progressive greyscale file) — the pixels transformers' processor and the official
    /// scripts (OpenCV, the same library and settings) start from.
    #[cfg(feature = "fast-jpeg")]
    #[test]
    fn jpegs_decode_to_pillows_pixels() {
        let root = Path::new(env!("CARGO_MANIFEST_DIR"));
        let g: serde_json::Value = serde_json::from_slice(
            &std::fs::read(root.join("tests/fixtures/pillow/decoded.json")).unwrap(),
        )
        .unwrap();
        let fnv1a64 = |b: &[u8]| {
            b.iter().fold(0xcbf29ce484222325u64, |h, &x| {
                (h ^ u64::from(x)).wrapping_mul(0x100000001b3)
            })
        };
        let digests = g["digests"].as_object().unwrap();
        assert_eq!(digests.len(), 5);
        for (file, d) in digests {
            let img = load_rgb(&root.join(file)).unwrap();
            assert_eq!(
                (u64::from(img.width()), u64::from(img.height())),
                (d["width"].as_u64().unwrap(), d["height"].as_u64().unwrap()),
                "{file}"
            );
            assert_eq!(
                format!("{:016x}", fnv1a64(img.as_raw())),
                d["fnv1a64"].as_str().unwrap(),
                "{file}: not Pillow's pixels"
            );
        }
    }

    #[test]
    fn direct_conversions_give_image_crates_pixels() {
        let grey = image::GrayImage::from_fn(7, 5, |x, y| image::Luma([(x * 31 + y * 7) as u8]));
        let grey_a = image::GrayAlphaImage::from_fn(7, 5, |x, y| {
            image::LumaA([(x * 13 + y) as u8, (y * 50) as u8])
        });
        let rgba = image::RgbaImage::from_fn(7, 5, |x, y| {
            image::Rgba([x as u8 * 30, y as u8 * 40, 200, (x * y) as u8])
        });
        let rgb16 = image::ImageBuffer::<image::Rgb<u16>, _>::from_fn(7, 5, |x, y| {
            image::Rgb([x as u16 * 9000, y as u16 * 13000, 65535])
        });
        for img in [
            DynamicImage::ImageLuma8(grey),
            DynamicImage::ImageLumaA8(grey_a),
            DynamicImage::ImageRgba8(rgba),
            DynamicImage::ImageRgb16(rgb16),
        ] {
            assert_eq!(to_rgb8(img.clone()), img.to_rgb8(), "{:?}", img.color());
        }
        // The fixtures in those layouts, decoded: a grey PNG and an RGBA one.
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures");
        for (file, color) in [
            ("photos/camera.png", image::ColorType::L8),
            ("official/RGB_img.png", image::ColorType::Rgba8),
        ] {
            let img = image::open(root.join(file)).unwrap();
            assert_eq!(img.color(), color, "{file}");
            assert_eq!(load_rgb(&root.join(file)).unwrap(), img.to_rgb8(), "{file}");
        }
    }
}
