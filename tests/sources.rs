//! Loaders against the facts recorded in fixtures/PROVENANCE.md: sizes, channels, units,
//! invalid markers, intrinsics, layouts, and region depths of the real frames.

mod common;

use common::*;
use spatial_ssrl::data::images;
use spatial_ssrl::tasks::depth_order;
use spatial_ssrl::tasks::source::{self, Layout, RgbdFrame};
use std::path::Path;

fn frame_of(dir: &str, color_name: &str) -> (source::RgbdSource, RgbdFrame) {
    let found = source::discover_rgbd(&fixtures().join(dir)).unwrap();
    let s = found
        .frames
        .into_iter()
        .find(|f| f.color.ends_with(color_name))
        .unwrap();
    let f = source::load_rgbd(&s, 0).unwrap();
    (s, f)
}

/// Median of valid depth in rows `r0..r1`, columns `c0..c1`, and the valid fraction there.
fn median(f: &RgbdFrame, r0: usize, r1: usize, c0: usize, c1: usize) -> (f64, f64) {
    let w = f.width();
    let mut v: Vec<f32> = Vec::new();
    for y in r0..r1 {
        for x in c0..c1 {
            let d = f.depth[y * w + x];
            if d.is_finite() {
                v.push(d);
            }
        }
    }
    let frac = v.len() as f64 / ((r1 - r0) * (c1 - c0)) as f64;
    if v.is_empty() {
        return (f64::NAN, 0.0);
    }
    v.sort_by(f32::total_cmp);
    let n = v.len();
    let m = if n % 2 == 1 {
        f64::from(v[n / 2])
    } else {
        (f64::from(v[n / 2 - 1]) + f64::from(v[n / 2])) / 2.0
    };
    (m, frac)
}

fn close(a: f64, b: f64, rel: f64) -> bool {
    (a - b).abs() <= rel * b.abs()
}

#[test]
fn photos_decode_to_rgb_with_their_sizes() {
    let p = fixtures().join("photos");
    for (name, w, h) in [
        ("astronaut.png", 512, 512),
        ("camera.png", 512, 512),
        ("chelsea.png", 451, 300),
        ("coffee.png", 600, 400),
        ("rocket.jpg", 640, 427),
    ] {
        let img = images::load_rgb(&p.join(name)).unwrap();
        assert_eq!(img.dimensions(), (w, h), "{name}");
    }
    // Grayscale expands to three equal channels.
    let cam = images::load_rgb(&p.join("camera.png")).unwrap();
    assert!(cam.pixels().all(|px| px[0] == px[1] && px[1] == px[2]));
    // The official RGBA photo loses its alpha channel.
    let rgba = images::load_rgb(&fixtures().join("official/RGB_img.png")).unwrap();
    assert_eq!(rgba.dimensions(), (902, 1186));
}

#[test]
fn webp_sources_decode() {
    let dir = scratch("webp");
    let img = images::load_rgb(&fixtures().join("photos/chelsea.png")).unwrap();
    img.save(dir.join("chelsea.webp")).unwrap();
    let back = images::load_rgb(&dir.join("chelsea.webp")).unwrap();
    assert_eq!(back, img, "lossless WebP round trip");
    assert_eq!(source::discover_images(&dir).unwrap().len(), 1);
}

/// Inserts an EXIF APP1 segment with the given orientation right after the JPEG SOI marker.
fn with_orientation(jpeg: &[u8], orientation: u16) -> Vec<u8> {
    let mut tiff = b"II*\x00\x08\x00\x00\x00".to_vec();
    tiff.extend_from_slice(&1u16.to_le_bytes());
    tiff.extend_from_slice(&0x0112u16.to_le_bytes());
    tiff.extend_from_slice(&3u16.to_le_bytes());
    tiff.extend_from_slice(&1u32.to_le_bytes());
    tiff.extend_from_slice(&orientation.to_le_bytes());
    tiff.extend_from_slice(&[0, 0, 0, 0, 0, 0]);
    let mut app1 = b"Exif\x00\x00".to_vec();
    app1.extend_from_slice(&tiff);
    let mut out = jpeg[..2].to_vec();
    out.extend_from_slice(&[0xFF, 0xE1]);
    out.extend_from_slice(&((app1.len() + 2) as u16).to_be_bytes());
    out.extend_from_slice(&app1);
    out.extend_from_slice(&jpeg[2..]);
    out
}

#[test]
fn exif_orientation_is_applied() {
    let img = image::RgbImage::from_fn(64, 32, |x, _| {
        if x < 32 {
            image::Rgb([250, 10, 10])
        } else {
            image::Rgb([10, 10, 250])
        }
    });
    let mut jpeg = Vec::new();
    image::codecs::jpeg::JpegEncoder::new_with_quality(&mut jpeg, 95)
        .encode_image(&img)
        .unwrap();
    let plain = images::decode_rgb(&jpeg, Path::new("plain.jpg")).unwrap();
    assert_eq!(plain.dimensions(), (64, 32));
    // Orientation 6: rotate 90° clockwise to display; the left (red) half ends up on top.
    let rotated = images::decode_rgb(&with_orientation(&jpeg, 6), Path::new("rot.jpg")).unwrap();
    assert_eq!(rotated.dimensions(), (32, 64));
    assert!(rotated.get_pixel(16, 8)[0] > 200 && rotated.get_pixel(16, 56)[2] > 200);
}

#[test]
fn layouts_are_detected_per_folder() {
    let official = source::discover_rgbd(&fixtures().join("official")).unwrap();
    let kinds: Vec<(String, Layout)> = official
        .frames
        .iter()
        .map(|f| {
            (
                f.color.file_name().unwrap().to_string_lossy().to_string(),
                f.layout,
            )
        })
        .collect();
    assert_eq!(
        kinds,
        vec![
            ("RGB-D_img1.jpg".into(), Layout::Megadepth),
            ("RGB-D_img2.jpg".into(), Layout::Megadepth),
            ("RGB-D_img3.png".into(), Layout::Diode)
        ]
    );
    let rgbd = source::discover_rgbd(&fixtures().join("rgbd")).unwrap();
    let layouts: Vec<Layout> = rgbd.frames.iter().map(|f| f.layout).collect();
    assert_eq!(layouts, vec![Layout::Generic, Layout::Generic, Layout::Tum]);
    assert!(rgbd.warnings.is_empty(), "{:?}", rgbd.warnings);
}

#[test]
fn diode_depth_in_metres_with_mask() {
    let (s, f) = frame_of("official", "RGB-D_img3.png");
    assert!(s.mask.is_some());
    assert_eq!((f.width(), f.height()), (1024, 768));
    assert!(
        close(f.valid_fraction(), 0.893, 0.01),
        "{}",
        f.valid_fraction()
    );
    let kerb = median(&f, 600, 768, 0, 1024).0;
    let trunk = median(&f, 250, 500, 250, 330).0;
    let street = median(&f, 420, 520, 0, 600).0;
    let facade = median(&f, 50, 250, 350, 700).0;
    assert!(
        close(kerb, 3.26, 0.02) && close(trunk, 5.54, 0.02),
        "{kerb} {trunk}"
    );
    assert!(
        close(street, 13.95, 0.02) && close(facade, 49.55, 0.02),
        "{street} {facade}"
    );
    // Depth.py's normalisation: percentiles and bin populations.
    let (norm, lo, hi) = depth_order::normalise(&f.depth).unwrap();
    assert!(
        close(f64::from(lo), 1.3193, 1e-4) && close(f64::from(hi), 61.4988, 1e-4),
        "{lo} {hi}"
    );
    let count = |a: f32, b: f32| norm.iter().filter(|v| **v >= a && **v <= b).count();
    assert_eq!(count(0.0, 0.3), 499_936);
    assert_eq!(count(0.35, 0.65), 100_653);
    assert_eq!(count(0.7, 1.0), 60_300);
}

#[test]
fn megadepth_h5_relative_depth() {
    let (s, f) = frame_of("official", "RGB-D_img1.jpg");
    assert!(!s.metric);
    assert_eq!((f.width(), f.height()), (1600, 1064));
    assert!(close(f.valid_fraction(), 0.662, 0.01));
    let tower = median(&f, 850, 1060, 800, 1100).0;
    let roof = median(&f, 550, 800, 0, 250).0;
    let sky = median(&f, 50, 250, 400, 1000).0;
    assert!(
        close(tower, 100.97, 0.01) && close(roof, 137.36, 0.01) && close(sky, 379.72, 0.01),
        "{tower} {roof} {sky}"
    );
    let (_, f2) = frame_of("official", "RGB-D_img2.jpg");
    assert_eq!(median(&f2, 0, 400, 0, 600).1, 0.0);
    let (statue, frac) = median(&f2, 300, 750, 950, 1200);
    assert!(
        close(statue, 18.64, 0.01) && close(frac, 0.62, 0.03),
        "{statue} {frac}"
    );
}

#[test]
fn png16_millimetres_tum_and_intrinsics() {
    let (s, mb) = frame_of("rgbd", "middlebury2014_motorcycle_q/color.png");
    assert_eq!(s.intrinsics.unwrap().fx, 994.978);
    assert!(close(median(&mb, 170, 215, 360, 450).0, 2.290, 0.01));
    assert!(close(median(&mb, 20, 90, 540, 690).0, 3.843, 0.01));
    assert!(close(mb.valid_fraction(), 0.9265, 0.005));
    let (s, mrpt) = frame_of("rgbd", "mrpt_openni2_bookshelf/color.png");
    // Two parameter sets in the file; the depth one is chosen.
    assert_eq!(s.intrinsics.unwrap().fx, 572.8827);
    assert!(close(median(&mrpt, 160, 200, 140, 270).0, 1.813, 0.01));
    assert!(close(median(&mrpt, 20, 100, 40, 200).0, 2.415, 0.01));
    assert!(close(mrpt.valid_fraction(), 0.8894, 0.005));
    // TUM (÷5000) gives exactly the millimetre loader's metres.
    let (t, tum) = frame_of("rgbd", "1462879443.617188.png");
    assert_eq!(t.layout, Layout::Tum);
    assert_eq!(tum.depth.len(), mrpt.depth.len());
    for (a, b) in tum.depth.iter().zip(&mrpt.depth) {
        assert!(
            (a.is_nan() && b.is_nan()) || (a - b).abs() <= 1e-6 * b.abs(),
            "{a} {b}"
        );
    }
}

#[test]
fn scannet_depth_is_resampled_to_the_colour_size() {
    let root = scratch("scannet").join("scene0000_00");
    for d in ["color", "depth", "intrinsic"] {
        std::fs::create_dir_all(root.join(d)).unwrap();
    }
    let f = fixtures().join("rgbd/mrpt_openni2_bookshelf");
    let color = image::open(f.join("color.png")).unwrap().to_rgb8();
    let big = image::imageops::resize(&color, 1280, 960, image::imageops::FilterType::Triangle);
    big.save(root.join("color/0.jpg")).unwrap();
    std::fs::copy(f.join("depth_mm.png"), root.join("depth/0.png")).unwrap();
    std::fs::write(
        root.join("intrinsic/intrinsic_color.txt"),
        "1169.6 0 646.3 0\n0 1167.1 489.9 0\n0 0 1 0\n0 0 0 1\n",
    )
    .unwrap();
    let found = source::discover_rgbd(root.parent().unwrap()).unwrap();
    assert_eq!(found.frames.len(), 1);
    let s = &found.frames[0];
    assert_eq!(s.layout, Layout::Scannet);
    assert_eq!(s.intrinsics.unwrap().cy, 489.9);
    let fr = source::load_rgbd(s, 0).unwrap();
    assert_eq!((fr.width(), fr.height()), (1280, 960));
    // Nearest resampling at 2×: pixel (2x, 2y) holds the source depth at (x, y).
    let (_, mrpt) = frame_of("rgbd", "mrpt_openni2_bookshelf/color.png");
    for (x, y) in [(100usize, 100usize), (320, 240), (500, 400)] {
        let a = fr.depth[(2 * y) * 1280 + 2 * x];
        let b = mrpt.depth[y * 640 + x];
        assert!((a.is_nan() && b.is_nan()) || a == b);
    }
}

#[test]
fn max_side_scales_frame_depth_and_intrinsics() {
    let (s, full) = frame_of("rgbd", "middlebury2014_motorcycle_q/color.png");
    let small = source::load_rgbd(&s, 370).unwrap();
    assert_eq!((small.width(), small.height()), (370, 250));
    let k = small.intrinsics.unwrap();
    assert!(close(k.fx, 994.978 * 370.0 / 741.0, 1e-9));
    // Depth follows the colour (nearest): the motorcycle is still nearer than the shelves.
    assert!(median(&small, 85, 107, 180, 225).0 < median(&small, 10, 45, 270, 345).0);
    assert!(full.width() == 741);
}

/// The released datasets' own folder trees, made from the repo's frames: MegaDepth_v1's
/// `<scene>/dense0/imgs` + `dense0/depths`, DIODE's `val/outdoor/scene_*/scan_*`.
#[test]
fn released_trees_megadepth_v1_and_diode() {
    let root = scratch("released_trees");
    let official = fixtures().join("official");
    let mega = root.join("MegaDepth_v1/0015/dense0");
    std::fs::create_dir_all(mega.join("imgs")).unwrap();
    std::fs::create_dir_all(mega.join("depths")).unwrap();
    let copy = |from: &str, to: &Path| std::fs::copy(official.join(from), to).unwrap();
    copy(
        "RGB-D_img1.jpg",
        &mega.join("imgs/5008984_74a994ce1c_o.jpg"),
    );
    copy(
        "RGB-D_depth1.h5",
        &mega.join("depths/5008984_74a994ce1c_o.h5"),
    );
    // A photo whose depth map is missing: named in a warning, never a frame.
    copy("RGB-D_img2.jpg", &mega.join("imgs/no_depth.jpg"));
    let scan = root.join("DIODE/val/outdoor/scene_00022/scan_00193");
    std::fs::create_dir_all(&scan).unwrap();
    let stem = "00022_00193_outdoor_000_010";
    copy("RGB-D_img3.png", &scan.join(format!("{stem}.png")));
    copy("RGB-D_depth3.npy", &scan.join(format!("{stem}_depth.npy")));
    copy(
        "RGB-D_depth_mask3.npy",
        &scan.join(format!("{stem}_depth_mask.npy")),
    );

    let found = source::discover_rgbd(&root).unwrap();
    let got: Vec<(String, Layout)> = found
        .frames
        .iter()
        .map(|f| {
            let rel = f.color.strip_prefix(&root).unwrap();
            (rel.to_string_lossy().into_owned(), f.layout)
        })
        .collect();
    assert_eq!(
        got,
        vec![
            (
                format!("DIODE/val/outdoor/scene_00022/scan_00193/{stem}.png"),
                Layout::Diode
            ),
            (
                "MegaDepth_v1/0015/dense0/imgs/5008984_74a994ce1c_o.jpg".into(),
                Layout::Megadepth
            ),
        ]
    );
    assert_eq!(found.warnings.len(), 1, "{:?}", found.warnings);
    assert!(
        found.warnings[0].contains("no_depth.jpg")
            && found.warnings[0].contains("depths/no_depth.h5"),
        "{:?}",
        found.warnings
    );
    // The frames read as their flat twins do (see megadepth_h5_relative_depth and
    // diode_depth_in_metres_with_mask).
    let mega_frame = source::load_rgbd(&found.frames[1], 0).unwrap();
    assert!(!found.frames[1].metric);
    assert!(close(
        median(&mega_frame, 850, 1060, 800, 1100).0,
        100.97,
        0.01
    ));
    let diode = source::load_rgbd(&found.frames[0], 0).unwrap();
    assert!(found.frames[0].mask.is_some());
    assert!(close(median(&diode, 600, 768, 0, 1024).0, 3.26, 0.02));
}
