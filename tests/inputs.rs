//! What `ssrl tasks` reads and refuses: its own output inside an input, files reached twice,
//! symlink loops, FIFOs, images whose header claims more pixels than a source may have,
//! intrinsics no camera has, an output folder of files without a run, and a stop between
//! shards.

mod common;

use common::*;
use spatial_ssrl::data::images;
use spatial_ssrl::tasks::{self, source, Progress, SkipReason, TaskKind, TasksConfig};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

/// Collects the warnings a run gives.
#[derive(Default)]
struct Warnings(Mutex<Vec<String>>);

impl Progress for Warnings {
    fn warn(&self, message: &str) {
        self.0.lock().unwrap().push(message.to_string());
    }
}

impl Warnings {
    fn all(&self) -> Vec<String> {
        self.0.lock().unwrap().clone()
    }
}

fn photo_config(images: Vec<PathBuf>, out: &Path) -> TasksConfig {
    TasksConfig {
        images,
        out: out.to_path_buf(),
        tasks: vec![TaskKind::Flip],
        threads: 2,
        ..Default::default()
    }
}

/// Two photos in `dir`.
fn two_photos(dir: &Path) {
    std::fs::create_dir_all(dir).unwrap();
    for f in ["coffee.png", "rocket.jpg"] {
        std::fs::copy(fixtures().join("photos").join(f), dir.join(f)).unwrap();
    }
}

/// `--images inp --out inp/out`: the output is never read back as input (it was: 40 sources
/// on the second run instead of 2, and no resume), and a file given twice counts once.
#[test]
fn the_output_inside_an_input_is_not_read_and_files_count_once() {
    let dir = scratch("inputs-out-inside");
    let inp = dir.join("inp");
    two_photos(&inp);
    let out = inp.join("out");
    let cfg = photo_config(vec![inp.clone(), inp.join("coffee.png")], &out);
    let w = Warnings::default();
    let s = tasks::run(&cfg, &w).unwrap();
    assert_eq!(s.sources, 2, "{:?}", w.all());
    assert!(
        w.all()
            .iter()
            .any(|m| m.contains("coffee.png: given twice")),
        "{:?}",
        w.all()
    );
    // Again, with the first run's images in the tree: the same two sources, resumed.
    let s = tasks::run(
        &TasksConfig {
            resume: true,
            ..cfg
        },
        &w,
    )
    .unwrap();
    assert_eq!((s.sources, s.resumed_shards), (2, 1));
    assert!(
        w.all()
            .iter()
            .any(|m| m.contains("output folder, not read")),
        "{:?}",
        w.all()
    );
}

/// Directory symlink loops end (they hung the walk, growing without bound) and a folder reached
/// through a link is read once.
#[cfg(unix)]
#[test]
fn symlink_loops_end_and_each_folder_is_read_once() {
    let dir = scratch("inputs-loops");
    let inp = dir.join("inp");
    two_photos(&inp.join("sub"));
    std::os::unix::fs::symlink("..", inp.join("sub/up")).unwrap();
    std::os::unix::fs::symlink(&inp, inp.join("sub/root")).unwrap();
    std::os::unix::fs::symlink(inp.join("sub"), inp.join("again")).unwrap();
    let found = source::discover_images(&inp).unwrap();
    assert_eq!(found.len(), 2, "{found:?}");
    let rgbd = source::discover_rgbd(&inp).unwrap();
    assert!(rgbd.frames.is_empty());
}

/// A FIFO named like a photo would block its read forever: only regular files are read, and
/// the FIFO is named.
#[cfg(unix)]
#[test]
fn a_fifo_named_like_a_photo_is_passed_over_and_named() {
    let dir = scratch("inputs-fifo");
    let inp = dir.join("inp");
    two_photos(&inp);
    let fifo = inp.join("pipe.jpg");
    let made = std::process::Command::new("mkfifo").arg(&fifo).status();
    if !made.is_ok_and(|s| s.success()) {
        eprintln!("SKIP: mkfifo unavailable");
        return;
    }
    let w = Warnings::default();
    let s = tasks::run(&photo_config(vec![inp.clone()], &dir.join("out")), &w).unwrap();
    assert_eq!(s.sources, 2);
    assert!(
        w.all()
            .iter()
            .any(|m| m.contains("pipe.jpg") && m.contains("not a regular file")),
        "{:?}",
        w.all()
    );
    // Given by name, it is refused as input.
    let e = tasks::run(&photo_config(vec![fifo], &dir.join("out2")), &w).unwrap_err();
    assert!(e.to_string().contains("not a regular file"), "{e}");
}

/// The CRC-32 of PNG chunks.
fn crc32(bytes: &[u8]) -> u32 {
    let mut c = 0xFFFF_FFFFu32;
    for &b in bytes {
        c ^= u32::from(b);
        for _ in 0..8 {
            c = if c & 1 == 1 {
                0xEDB8_8320 ^ (c >> 1)
            } else {
                c >> 1
            };
        }
    }
    !c
}

/// A PNG of a few bytes whose header claims `w` × `h` pixels.
fn png_claiming(w: u32, h: u32) -> Vec<u8> {
    let mut small = Vec::new();
    image::RgbImage::new(4, 4)
        .write_to(
            &mut std::io::Cursor::new(&mut small),
            image::ImageFormat::Png,
        )
        .unwrap();
    // IHDR's data starts after the 8-byte signature, the length and the type (16 bytes).
    small[16..20].copy_from_slice(&w.to_be_bytes());
    small[20..24].copy_from_slice(&h.to_be_bytes());
    let crc = crc32(&small[12..29]);
    small[29..33].copy_from_slice(&crc.to_be_bytes());
    small
}

/// A small file claiming 60,000 × 60,000 pixels is skipped from its header with a reason (it
/// took 12 GB and 45 s before --max-side applied).
#[test]
fn an_image_claiming_too_many_pixels_is_skipped_before_decoding() {
    let dir = scratch("inputs-huge");
    let inp = dir.join("inp");
    two_photos(&inp);
    let huge = inp.join("huge.png");
    std::fs::write(&huge, png_claiming(60_000, 60_000)).unwrap();
    let e = images::load_rgb(&huge).unwrap_err();
    assert_eq!(e.fault, images::ImageFault::TooLarge, "{e}");
    assert!(e.to_string().contains("huge.png"), "{e}");
    let w = Warnings::default();
    let s = tasks::run(&photo_config(vec![inp], &dir.join("out")), &w).unwrap();
    assert_eq!(
        s.tasks[&TaskKind::Flip].skipped.get(&SkipReason::TooLarge),
        Some(&1)
    );
    assert!(
        w.all().iter().any(|m| m.contains("huge.png")),
        "{:?}",
        w.all()
    );
    // Just under the limit in pixels, the header alone is not refused.
    let fine = png_claiming(16_384, 16_384);
    let r = images::decode_rgb(&fine, Path::new("fine.png")).unwrap_err();
    assert_ne!(r.fault, images::ImageFault::TooLarge, "{r}");
}

/// A whole (end-of-image marker present) 4×4 JPEG whose frame header claims `w × h` pixels.
fn jpeg_claiming(w: u16, h: u16) -> Vec<u8> {
    let mut jpeg = Vec::new();
    image::codecs::jpeg::JpegEncoder::new_with_quality(&mut jpeg, 90)
        .encode_image(&image::RgbImage::new(4, 4))
        .unwrap();
    // SOF0: FF C0, length (2), precision (1), height (2), width (2).
    let sof = jpeg.windows(2).position(|m| m == [0xFF, 0xC0]).unwrap();
    jpeg[sof + 5..sof + 7].copy_from_slice(&h.to_be_bytes());
    jpeg[sof + 7..sof + 9].copy_from_slice(&w.to_be_bytes());
    jpeg
}

/// A JPEG is held to the same limit from its header, whichever decoder the build uses.
#[test]
fn a_jpeg_claiming_too_many_pixels_is_refused_before_decoding() {
    let e = images::decode_rgb(&jpeg_claiming(60_000, 60_000), Path::new("huge.jpg")).unwrap_err();
    assert_eq!(e.fault, images::ImageFault::TooLarge, "{e}");
    assert!(e.to_string().contains("huge.jpg"), "{e}");
    // Under the limit the header is not refused (the scan is too short for such a frame: a
    // decoder may pad it or fail, but not for its size).
    if let Err(r) = images::decode_rgb(&jpeg_claiming(2_000, 1_500), Path::new("fine.jpg")) {
        assert_ne!(r.fault, images::ImageFault::TooLarge, "{r}");
    }
}

/// Intrinsics no camera has, or a file that cannot be read as intrinsics, are refused naming
/// the file (they were taken as missing, or used, changing metric position answers).
#[test]
fn intrinsics_no_camera_has_are_refused() {
    let dir = scratch("inputs-intrinsics");
    let src = fixtures().join("rgbd/middlebury2014_motorcycle_q");
    for (name, text, want) in [
        (
            "zero",
            r#"{"fx": 0, "fy": 500, "cx": 10, "cy": 10}"#,
            "fx = 0",
        ),
        (
            "negative",
            r#"{"fx": 500, "fy": -500, "cx": 10, "cy": 10}"#,
            "fy = -500",
        ),
        ("broken", r#"{"fx": 500, "fy""#, "invalid JSON"),
        ("partial", r#"{"fx": 500}"#, "no fx, fy, cx, cy"),
    ] {
        let d = dir.join(name);
        std::fs::create_dir_all(&d).unwrap();
        for e in std::fs::read_dir(&src).unwrap() {
            let e = e.unwrap();
            std::fs::copy(e.path(), d.join(e.file_name())).unwrap();
        }
        let k = d.join("intrinsics.json");
        std::fs::write(&k, text).unwrap();
        let e = source::discover_rgbd(&d).unwrap_err().to_string();
        assert!(
            e.contains(&k.display().to_string()) && e.contains(want),
            "{name}: {e}"
        );
    }
}

/// An output folder holding `data/` or `images/` but no `run.json` is refused: the run would
/// overwrite the files it meets and leave the others (a stray shard then broke rollouts).
#[test]
fn an_output_folder_with_files_but_no_run_is_refused() {
    let dir = scratch("inputs-not-a-run");
    for sub in ["data", "images"] {
        let out = dir.join(sub).join("out");
        std::fs::create_dir_all(out.join(sub)).unwrap();
        let stray = out.join(sub).join("part-00099.parquet");
        std::fs::write(&stray, "old").unwrap();
        let cfg = photo_config(vec![fixtures().join("photos")], &out);
        let e = tasks::run(&cfg, &Warnings::default())
            .unwrap_err()
            .to_string();
        assert!(e.contains(sub) && e.contains("no run.json"), "{e}");
        assert_eq!(std::fs::read_to_string(&stray).unwrap(), "old");
        assert!(!out.join("run.json").exists());
    }
}

/// A stop (Ctrl-C) lets the shard in progress finish and writes no more; `--resume` then
/// gives what an uninterrupted run gives.
#[test]
fn a_stop_between_shards_keeps_the_shards_written() {
    let dir = scratch("inputs-stop");
    let cfg = TasksConfig {
        shard_sources: 1,
        ..photo_config(vec![fixtures().join("photos")], &dir.join("out"))
    };
    let stop = std::sync::atomic::AtomicBool::new(true);
    let s = tasks::run_until(&cfg, &Warnings::default(), &stop).unwrap();
    assert!(s.stopped && s.produced == 0);
    assert!(!dir.join("out/summary.json").exists());
    let whole = tasks::run(
        &TasksConfig {
            resume: true,
            ..cfg.clone()
        },
        &Warnings::default(),
    )
    .unwrap();
    let once = tasks::run(
        &TasksConfig {
            out: dir.join("once"),
            ..cfg
        },
        &Warnings::default(),
    )
    .unwrap();
    assert!(!whole.stopped && whole.produced == once.produced && once.produced > 0);
    assert_eq!(read_all(&dir.join("out")), read_all(&dir.join("once")));
}
