//! Image preprocessing against Pillow: the bicubic resize is bit-exact.

mod common;

use common::*;
use spatial_ssrl::model::processor::resize_bicubic_pil;

#[test]
fn bicubic_resize_is_bit_exact_with_pillow() {
    let g = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/goldens");
    let src = image::open(fixtures().join("photos/chelsea.png"))
        .unwrap()
        .to_rgb8();
    for (name, w, h, crop) in [
        ("down", 224, 140, None),
        ("up", 150, 100, Some((200, 100, 60, 40))),
        ("mixed", 476, 196, None),
        ("mixed2", 300, 400, None),
    ] {
        let input = match crop {
            None => src.clone(),
            Some((x, y, cw, ch)) => image::imageops::crop_imm(&src, x, y, cw, ch).to_image(),
        };
        let want = image::open(g.join(format!("pil_bicubic_{name}.png")))
            .unwrap()
            .to_rgb8();
        let got = resize_bicubic_pil(&input, w, h);
        let diff = got
            .as_raw()
            .iter()
            .zip(want.as_raw())
            .filter(|(a, b)| a != b)
            .count();
        assert_eq!(
            diff,
            0,
            "{name}: {diff} of {} values differ from Pillow",
            want.as_raw().len()
        );
    }
}

#[test]
fn rope_index_matches_the_reference() {
    use spatial_ssrl::model::rope::{decode_position, rope_index, RopeConfig};
    let g: serde_json::Value = serde_json::from_slice(
        &std::fs::read(
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/goldens/rope_index.json"),
        )
        .unwrap(),
    )
    .unwrap();
    let u32s = |k: &str| -> Vec<u32> {
        g[k].as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_u64().unwrap() as u32)
            .collect()
    };
    let grids = |k: &str| -> Vec<[u32; 3]> {
        g[k].as_array()
            .unwrap()
            .iter()
            .map(|r| [0, 1, 2].map(|i| r[i].as_u64().unwrap() as u32))
            .collect()
    };
    let cfg = RopeConfig {
        image_token_id: g["image_token_id"].as_u64().unwrap() as u32,
        video_token_id: g["video_token_id"].as_u64().unwrap() as u32,
        spatial_merge_size: 2,
        tokens_per_second: 2.0,
    };
    let mask: Vec<u8> = u32s("attention_mask").iter().map(|v| *v as u8).collect();
    let secs: Vec<f32> = g["second_per_grid"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_f64().unwrap() as f32)
        .collect();
    let batch = g["batch"].as_u64().unwrap() as usize;
    let (pos, deltas) = rope_index(
        &u32s("input_ids"),
        &mask,
        batch,
        &grids("image_grids"),
        &grids("video_grids"),
        &secs,
        &cfg,
    )
    .unwrap();
    let want_pos: Vec<i64> = g["position_ids"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_i64().unwrap())
        .collect();
    let want_d: Vec<i64> = g["rope_deltas"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_i64().unwrap())
        .collect();
    assert_eq!(pos, want_pos);
    assert_eq!(deltas, want_d);
    // A 12×16-patch image advances positions by 8 instead of 48: delta −40 (the documented case).
    assert_eq!(deltas[0], -40);
    assert_eq!(deltas[2], 0, "text-only rows have no delta");
    // Decoding continues from max position + 1.
    let n0 = mask[..g["seq"].as_u64().unwrap() as usize]
        .iter()
        .filter(|m| **m == 1)
        .count();
    let s = g["seq"].as_u64().unwrap() as usize;
    let max0 = (0..3)
        .flat_map(|r| pos[r * batch * s..r * batch * s + s].to_vec())
        .max()
        .unwrap();
    assert_eq!(decode_position(n0, deltas[0]), max0 + 1);
    // Missing grids are an error, not a panic.
    assert!(rope_index(&u32s("input_ids"), &mask, batch, &[], &[], &[], &cfg).is_err());
}

#[test]
fn pixel_values_match_transformers() {
    use spatial_ssrl::model::processor::{preprocess, PreprocessorConfig};
    let g = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/goldens");
    let meta: serde_json::Value =
        serde_json::from_slice(&std::fs::read(g.join("processor.json")).unwrap()).unwrap();
    let src = image::open(fixtures().join("photos/chelsea.png"))
        .unwrap()
        .to_rgb8();
    for c in meta["cases"].as_array().unwrap() {
        let name = c["name"].as_str().unwrap();
        let img = match c["crop"].as_array() {
            Some(b) => {
                let v: Vec<u32> = b.iter().map(|x| x.as_u64().unwrap() as u32).collect();
                image::imageops::crop_imm(&src, v[0], v[1], v[2] - v[0], v[3] - v[1]).to_image()
            }
            None => src.clone(),
        };
        let cfg = PreprocessorConfig {
            min_pixels: c["min_pixels"].as_u64().unwrap(),
            max_pixels: c["max_pixels"].as_u64().unwrap(),
            ..Default::default()
        };
        let got = preprocess(&img, &cfg).unwrap();
        let grid: Vec<u32> = c["grid_thw"]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_u64().unwrap() as u32)
            .collect();
        assert_eq!(got.grid_thw.to_vec(), grid, "{name}");
        let want =
            spatial_ssrl::tasks::npy::read(&g.join(format!("processor_{name}.npy"))).unwrap();
        assert_eq!(
            want.shape,
            vec![got.pixel_values.len() / 1176, 1176],
            "{name}"
        );
        let max = got
            .pixel_values
            .iter()
            .zip(&want.data)
            .map(|(a, b)| (a - b).abs())
            .fold(0f32, f32::max);
        assert!(max < 1e-5, "{name}: max |diff| {max}");
    }
}
