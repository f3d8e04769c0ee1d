//! Engine behaviour: byte-identical output for any thread count, exact resume, refusal to
//! overwrite, and bad inputs skipped with counted reasons while the run goes on.

mod common;

use common::*;
use spatial_ssrl::tasks::{self, Format, SkipReason, TaskKind, TasksConfig};
use std::path::Path;
use std::sync::Mutex;

/// A small but mixed input: two photos and two RGB-D frames of different layouts.
fn small_inputs(root: &Path) -> (std::path::PathBuf, std::path::PathBuf) {
    let f = fixtures();
    let img = root.join("in-images");
    let rgbd = root.join("in-rgbd");
    std::fs::create_dir_all(&img).unwrap();
    std::fs::create_dir_all(rgbd.join("tum")).unwrap();
    for p in ["chelsea.png", "rocket.jpg", "camera.png"] {
        std::fs::copy(f.join("photos").join(p), img.join(p)).unwrap();
    }
    for p in ["rgb.txt", "depth.txt"] {
        std::fs::copy(f.join("rgbd/tum_layout").join(p), rgbd.join("tum").join(p)).unwrap();
    }
    for d in ["rgb", "depth"] {
        std::fs::create_dir_all(rgbd.join("tum").join(d)).unwrap();
        let name = "1462879443.617188.png";
        std::fs::copy(
            f.join("rgbd/tum_layout").join(d).join(name),
            rgbd.join("tum").join(d).join(name),
        )
        .unwrap();
    }
    let mb = rgbd.join("motorcycle");
    std::fs::create_dir_all(&mb).unwrap();
    for p in ["color.png", "depth_mm.png", "intrinsics.json"] {
        std::fs::copy(
            f.join("rgbd/middlebury2014_motorcycle_q").join(p),
            mb.join(p),
        )
        .unwrap();
    }
    (img, rgbd)
}

fn cfg(img: &Path, rgbd: &Path, out: &Path) -> TasksConfig {
    TasksConfig {
        images: vec![img.to_path_buf()],
        rgbd: vec![rgbd.to_path_buf()],
        out: out.to_path_buf(),
        per_image: 2,
        seed: 42,
        shard_sources: 2,
        ..Default::default()
    }
}

fn outputs(dir: &Path) -> Vec<(String, Vec<u8>)> {
    tree_bytes(dir)
        .into_iter()
        .filter(|(p, _)| p != "summary.json")
        .collect()
}

#[test]
fn same_seed_same_bytes_for_any_thread_count() {
    let root = scratch("threads");
    let (img, rgbd) = small_inputs(&root);
    let mut a = cfg(&img, &rgbd, &root.join("t1"));
    a.threads = 1;
    let mut b = cfg(&img, &rgbd, &root.join("t3"));
    b.threads = 3;
    let sa = tasks::run(&a, &tasks::Silent).unwrap();
    let sb = tasks::run(&b, &tasks::Silent).unwrap();
    assert_eq!(sa.tasks, sb.tasks);
    assert!(sa.produced >= 15, "{:?}", sa.tasks);
    let (ta, tb) = (outputs(&root.join("t1")), outputs(&root.join("t3")));
    assert_eq!(ta.len(), tb.len());
    for (x, y) in ta.iter().zip(&tb) {
        assert_eq!(x.0, y.0);
        assert!(x.1 == y.1, "{} differs between 1 and 3 threads", x.0);
    }
    // A different seed gives different samples.
    let mut c = cfg(&img, &rgbd, &root.join("s2"));
    c.seed = 43;
    tasks::run(&c, &tasks::Silent).unwrap();
    assert_ne!(read_all(&root.join("t1")), read_all(&root.join("s2")));
}

#[test]
fn resume_redoes_only_the_interrupted_shard() {
    let root = scratch("resume");
    let (img, rgbd) = small_inputs(&root);
    let full = root.join("full");
    tasks::run(&cfg(&img, &rgbd, &full), &tasks::Silent).unwrap();

    // An interrupted run: all shards done, then the last one lost its data file, a state
    // file and an image half-written, as a kill during the shard leaves it.
    let part = root.join("part");
    let c = cfg(&img, &rgbd, &part);
    tasks::run(&c, &tasks::Silent).unwrap();
    let shards: Vec<_> = std::fs::read_dir(part.join("data"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    assert!(shards.len() >= 3, "expected several shards");
    let mut last = shards.clone();
    last.sort();
    std::fs::remove_file(last.last().unwrap()).unwrap();
    let some_image = read_all(&full).last().unwrap().images[0]
        .label()
        .to_string();
    std::fs::write(part.join(&some_image), b"\xff\xd8 half a jpeg").unwrap();
    let stale = part.join("data/.part-00001.parquet.tmp4242");
    std::fs::write(&stale, b"partial").unwrap();
    let kept_mtime = std::fs::metadata(&last[0]).unwrap().modified().unwrap();

    // Without --resume the folder is refused, and nothing is touched.
    let err = tasks::run(&c, &tasks::Silent).unwrap_err();
    assert!(matches!(err, tasks::TasksError::AlreadyExists(_)), "{err}");
    // --resume with other settings is refused.
    let mut other = c.clone();
    other.resume = true;
    other.seed = 1;
    let err = tasks::run(&other, &tasks::Silent).unwrap_err();
    assert!(err.to_string().contains("seed"), "{err}");
    // So is a run a build with the other JPEG encoder wrote (its images' bytes would differ),
    // saying which build continues it.
    let run_json = part.join("run.json");
    let original = std::fs::read(&run_json).unwrap();
    let mut run: serde_json::Value = serde_json::from_slice(&original).unwrap();
    let other_codec = match tasks::JPEG_CODEC {
        "libjpeg-turbo" => "jpeg-encoder",
        _ => "libjpeg-turbo",
    };
    run["jpeg_codec"] = other_codec.into();
    std::fs::write(&run_json, run.to_string()).unwrap();
    let mut again = c.clone();
    again.resume = true;
    let err = tasks::run(&again, &tasks::Silent).unwrap_err().to_string();
    assert!(
        err.contains("jpeg_codec") && err.contains(other_codec) && err.contains("fast-jpeg"),
        "{err}"
    );
    std::fs::write(&run_json, &original).unwrap();

    let mut r = c.clone();
    r.resume = true;
    r.threads = 2;
    let s = tasks::run(&r, &tasks::Silent).unwrap();
    assert_eq!(s.resumed_shards, shards.len() - 1);
    assert!(
        !stale.exists(),
        "temporary file of the interrupted run left behind"
    );
    assert_eq!(
        std::fs::metadata(&last[0]).unwrap().modified().unwrap(),
        kept_mtime,
        "committed shard rewritten"
    );
    let (a, b) = (outputs(&full), outputs(&part));
    assert_eq!(
        a.iter().map(|x| &x.0).collect::<Vec<_>>(),
        b.iter().map(|x| &x.0).collect::<Vec<_>>()
    );
    for (x, y) in a.iter().zip(&b) {
        assert!(x.1 == y.1, "{} differs after resume", x.0);
    }
    let full_summary: tasks::Summary =
        serde_json::from_slice(&std::fs::read(full.join("summary.json")).unwrap()).unwrap();
    assert_eq!(s.tasks, full_summary.tasks);
    // The encoder the speed and the bytes depend on is recorded with the run.
    assert_eq!(full_summary.jpeg_codec, tasks::JPEG_CODEC);
    let run: serde_json::Value =
        serde_json::from_slice(&std::fs::read(full.join("run.json")).unwrap()).unwrap();
    assert_eq!(run["jpeg_codec"], tasks::JPEG_CODEC);
}

#[test]
fn jsonl_and_parquet_hold_the_same_samples() {
    let root = scratch("formats");
    let (img, rgbd) = small_inputs(&root);
    let mut p = cfg(&img, &rgbd, &root.join("pq"));
    p.tasks = vec![TaskKind::Shuffle, TaskKind::Depth];
    let mut j = p.clone();
    j.out = root.join("js");
    j.format = Format::Jsonl;
    tasks::run(&p, &tasks::Silent).unwrap();
    tasks::run(&j, &tasks::Silent).unwrap();
    let (a, b) = (read_all(&root.join("pq")), read_all(&root.join("js")));
    assert!(!a.is_empty());
    assert_eq!(a, b);
    assert!(a.iter().all(|s| s.task == "shuffle" || s.task == "depth"));
}

struct Collect(Mutex<Vec<String>>);
impl tasks::Progress for Collect {
    fn warn(&self, m: &str) {
        self.0.lock().unwrap().push(m.to_string());
    }
}

#[test]
fn bad_inputs_are_skipped_with_reasons_and_named() {
    let root = scratch("bad");
    let img = root.join("img");
    let rgbd = root.join("rgbd");
    std::fs::create_dir_all(&img).unwrap();
    std::fs::create_dir_all(&rgbd).unwrap();
    let f = fixtures();
    std::fs::copy(f.join("photos/coffee.png"), img.join("good.png")).unwrap();
    let jpg = std::fs::read(f.join("photos/rocket.jpg")).unwrap();
    std::fs::write(img.join("truncated.jpg"), &jpg[..jpg.len() / 3]).unwrap();
    std::fs::write(img.join("notes.png"), b"this is not an image").unwrap();
    let png = std::fs::read(f.join("photos/chelsea.png")).unwrap();
    std::fs::write(img.join("cut.png"), &png[..png.len() / 2]).unwrap();
    std::fs::write(img.join("tiny.png"), {
        let mut v = Vec::new();
        image::RgbImage::new(40, 30)
            .write_to(&mut std::io::Cursor::new(&mut v), image::ImageFormat::Png)
            .unwrap();
        v
    })
    .unwrap();
    // RGB-D: a good frame, one with mismatched depth size, one with no valid depth, one NaN npy.
    let color = f.join("rgbd/mrpt_openni2_bookshelf/color.png");
    std::fs::copy(&color, rgbd.join("good.png")).unwrap();
    std::fs::copy(
        f.join("rgbd/mrpt_openni2_bookshelf/depth_mm.png"),
        rgbd.join("good_depth.png"),
    )
    .unwrap();
    std::fs::copy(&color, rgbd.join("mismatch.png")).unwrap();
    image::ImageBuffer::<image::Luma<u16>, _>::from_pixel(320, 240, image::Luma([2000u16]))
        .save(rgbd.join("mismatch_depth.png"))
        .unwrap();
    std::fs::copy(&color, rgbd.join("empty.png")).unwrap();
    image::ImageBuffer::<image::Luma<u16>, _>::from_pixel(640, 480, image::Luma([0u16]))
        .save(rgbd.join("empty_depth.png"))
        .unwrap();
    std::fs::copy(&color, rgbd.join("nan.png")).unwrap();
    let mut npy = b"\x93NUMPY\x01\x00".to_vec();
    let mut h = "{'descr': '<f4', 'fortran_order': False, 'shape': (480, 640), }".to_string();
    while (10 + h.len() + 1) % 64 != 0 {
        h.push(' ');
    }
    h.push('\n');
    npy.extend_from_slice(&(h.len() as u16).to_le_bytes());
    npy.extend_from_slice(h.as_bytes());
    for i in 0..480 * 640 {
        npy.extend_from_slice(&(if i % 2 == 0 { f32::NAN } else { f32::INFINITY }).to_le_bytes());
    }
    std::fs::write(rgbd.join("nan_depth.npy"), npy).unwrap();

    let out = root.join("out");
    let c = TasksConfig {
        images: vec![img],
        rgbd: vec![rgbd],
        out: out.clone(),
        ..Default::default()
    };
    let warn = Collect(Mutex::new(Vec::new()));
    let s = tasks::run(&c, &warn).unwrap();
    let t = |k| s.tasks.get(&k).cloned().unwrap_or_default();
    assert_eq!(t(TaskKind::Shuffle).produced, 1);
    assert_eq!(
        t(TaskKind::Shuffle).skipped.get(&SkipReason::Decode),
        Some(&3)
    );
    assert_eq!(
        t(TaskKind::Shuffle).skipped.get(&SkipReason::TooSmall),
        Some(&1)
    );
    assert_eq!(t(TaskKind::Depth).produced, 1);
    assert_eq!(
        t(TaskKind::Depth)
            .skipped
            .get(&SkipReason::DepthSizeMismatch),
        Some(&1)
    );
    assert_eq!(
        t(TaskKind::Depth).skipped.get(&SkipReason::InvalidDepth),
        Some(&2)
    );
    let w = warn.0.lock().unwrap().join("\n");
    for name in [
        "truncated.jpg",
        "cut.png",
        "notes.png",
        "mismatch_depth.png",
        "empty_depth.png",
        "nan_depth.npy",
    ] {
        assert!(w.contains(name), "no warning names {name}:\n{w}");
    }
    let on_disk: tasks::Summary =
        serde_json::from_slice(&std::fs::read(out.join("summary.json")).unwrap()).unwrap();
    assert_eq!(on_disk.tasks, s.tasks);
}

#[test]
fn nothing_to_produce_is_an_error() {
    let root = scratch("nothing");
    let img = root.join("img");
    std::fs::create_dir_all(&img).unwrap();
    std::fs::write(img.join("broken.jpg"), b"garbage").unwrap();
    let c = TasksConfig {
        images: vec![img],
        out: root.join("out"),
        tasks: vec![TaskKind::Flip],
        ..Default::default()
    };
    let err = tasks::run(&c, &tasks::Silent).unwrap_err();
    assert!(
        matches!(err, tasks::TasksError::NothingProduced(_)),
        "{err}"
    );
    let missing = TasksConfig {
        images: vec![root.join("does-not-exist")],
        out: root.join("out2"),
        ..Default::default()
    };
    let err = tasks::run(&missing, &tasks::Silent).unwrap_err();
    assert!(err.to_string().contains("does-not-exist"), "{err}");
}

/// An `Image` struct's (bytes, path), either null.
type StructImage<'a> = (Option<Vec<u8>>, Option<&'a str>);

/// A Parquet file laid out as Hugging Face `datasets` writes an `Image` list column (EasyR1's
/// example datasets): `images: list<struct<bytes: binary, path: string>>`, then `problem` and
/// `answer`. `rows[r]` holds each image's (bytes, path); `None` rows have a null `images`.
fn write_image_struct_parquet(path: &Path, rows: &[Option<Vec<StructImage>>]) {
    use parquet::data_type::{ByteArray, ByteArrayType};
    use parquet::file::properties::WriterProperties;
    use parquet::file::writer::SerializedFileWriter;
    use std::sync::Arc;
    let schema = "message schema {
        optional group images (LIST) {
            repeated group list {
                optional group element {
                    optional binary bytes;
                    optional binary path (UTF8);
                }
            }
        }
        optional binary problem (UTF8);
        optional binary answer (UTF8);
    }";
    let schema = Arc::new(parquet::schema::parser::parse_message_type(schema).unwrap());
    let file = std::fs::File::create(path).unwrap();
    let props = Arc::new(WriterProperties::builder().build());
    let mut w = SerializedFileWriter::new(file, schema, props).unwrap();
    let mut rg = w.next_row_group().unwrap();
    // The struct's fields: values with definition level 4 (present) or 3 (null in a present
    // element); an empty or null list has one level 1 or 0 entry.
    let field = |pick: &dyn Fn(&StructImage) -> Option<Vec<u8>>| {
        let (mut vals, mut def, mut rep) = (Vec::new(), Vec::new(), Vec::new());
        for r in rows {
            match r {
                None => {
                    def.push(0);
                    rep.push(0);
                }
                Some(l) if l.is_empty() => {
                    def.push(1);
                    rep.push(0);
                }
                Some(l) => {
                    for (k, im) in l.iter().enumerate() {
                        rep.push(i16::from(k > 0));
                        match pick(im) {
                            Some(v) => {
                                vals.push(ByteArray::from(v));
                                def.push(4);
                            }
                            None => def.push(3),
                        }
                    }
                }
            }
        }
        (vals, def, rep)
    };
    let columns = [
        field(&|im| im.0.clone()),
        field(&|im| im.1.map(|p| p.as_bytes().to_vec())),
    ];
    for (vals, def, rep) in &columns {
        let mut c = rg.next_column().unwrap().unwrap();
        c.typed::<ByteArrayType>()
            .write_batch(vals, Some(def), Some(rep))
            .unwrap();
        c.close().unwrap();
    }
    for text in ["Which patch is flipped?", "2"] {
        let mut c = rg.next_column().unwrap().unwrap();
        let vals: Vec<ByteArray> = rows.iter().map(|_| ByteArray::from(text)).collect();
        c.typed::<ByteArrayType>()
            .write_batch(&vals, Some(&vec![1; rows.len()]), None)
            .unwrap();
        c.close().unwrap();
    }
    rg.close().unwrap();
    w.close().unwrap();
}

#[test]
fn parquet_image_structs_are_read_as_images() {
    use spatial_ssrl::data::records::{read_samples, ImageRef};
    let root = scratch("image_structs");
    let f = fixtures();
    let rocket = std::fs::read(f.join("photos/rocket.jpg")).unwrap();
    let coffee = std::fs::read(f.join("photos/coffee.png")).unwrap();
    std::fs::copy(f.join("photos/chelsea.png"), root.join("chelsea.png")).unwrap();
    let data = root.join("train.parquet");
    write_image_struct_parquet(
        &data,
        &[
            // Stored bytes (the struct's path is only the original file name).
            Some(vec![(Some(rocket.clone()), Some("rocket.jpg"))]),
            // No bytes: the path, relative to the data file.
            Some(vec![(None, Some("chelsea.png"))]),
            // Two stored images, the second without a path.
            Some(vec![
                (Some(coffee.clone()), Some("coffee.png")),
                (Some(rocket), None),
            ]),
            // No images: a text-only prompt.
            None,
        ],
    );
    let s = read_samples(&data).unwrap();
    assert_eq!(s.len(), 4);
    let kinds: Vec<Vec<&str>> = s
        .iter()
        .map(|r| {
            r.images
                .iter()
                .map(|i| match i {
                    ImageRef::File(p) => p.as_str(),
                    ImageRef::Embedded { .. } => "stored",
                })
                .collect()
        })
        .collect();
    assert_eq!(
        kinds,
        vec![
            vec!["stored"],
            vec!["chelsea.png"],
            vec!["stored", "stored"],
            vec![]
        ]
    );
    assert!(s[0].images[0]
        .label()
        .ends_with("train.parquet row 0 image 0 (rocket.jpg)"));
    assert!(s[2].images[1]
        .label()
        .ends_with("train.parquet row 2 image 1"));
    // Each decodes to the file it came from, and its header gives the same size.
    let want =
        |name: &str| spatial_ssrl::data::images::load_rgb(&f.join("photos").join(name)).unwrap();
    let got = s[0].load_images(&root).unwrap();
    assert_eq!(got[0], want("rocket.jpg"));
    assert_eq!(s[0].images[0].size(&root).unwrap(), got[0].dimensions());
    assert_eq!(s[1].load_images(&root).unwrap()[0], want("chelsea.png"));
    let two = s[2].load_images(&root).unwrap();
    assert_eq!(
        (&two[0], &two[1]),
        (&want("coffee.png"), &want("rocket.jpg"))
    );
    assert!(s[3].images.is_empty());

    // Stored bytes that are no image: an error naming the data file, row and image.
    let bad = root.join("bad.parquet");
    write_image_struct_parquet(&bad, &[Some(vec![(Some(b"not an image".to_vec()), None)])]);
    let e = read_samples(&bad).unwrap()[0]
        .load_images(&root)
        .unwrap_err()
        .to_string();
    assert!(e.contains("bad.parquet row 0 image 0"), "{e}");
    // A struct with neither bytes nor path: the reader says so, naming file, row and column.
    let empty = root.join("empty.parquet");
    write_image_struct_parquet(&empty, &[Some(vec![(None, None)])]);
    let e = read_samples(&empty).unwrap_err().to_string();
    assert!(
        e.contains("empty.parquet")
            && e.contains("row 0: column `images`: image 0 has neither bytes nor a path"),
        "{e}"
    );
}

/// The released Spatial-SSRL-81k as it unpacks (`spatialssrl.parquet` beside `images/{task}/`)
/// and as its training scripts lay it out (`data/parquets/train.parquet`, `data/images/`), next
/// to `ssrl tasks`' own output: each file's images are found with no `image_dir`.
#[test]
fn released_layouts_find_their_images() {
    use spatial_ssrl::data::records::{parquet_bytes, read_dataset, ImageRef, SampleRecord};
    let root = scratch("released_layouts");
    let photo = fixtures().join("photos/rocket.jpg");
    let sample = |task: &str| SampleRecord {
        id: String::new(),
        task: String::new(),
        problem: "<image>Which patch is flipped?".into(),
        answer: "2".into(),
        images: vec![ImageRef::File(format!("images/{task}/0.jpg"))],
        source: vec![],
        meta: serde_json::Value::Null,
    };
    let lay = |data: &str, images: &str, task: &str| {
        let data = root.join(data);
        std::fs::create_dir_all(data.parent().unwrap()).unwrap();
        std::fs::write(&data, parquet_bytes(&[sample(task)], &data).unwrap()).unwrap();
        let img = root.join(images).join(format!("images/{task}/0.jpg"));
        std::fs::create_dir_all(img.parent().unwrap()).unwrap();
        std::fs::copy(&photo, &img).unwrap();
        data
    };
    for (data, images) in [
        ("Spatial-SSRL-81k/spatialssrl.parquet", "Spatial-SSRL-81k"),
        ("EasyR1/data/parquets/train.parquet", "EasyR1/data"),
        ("tasks-out/data/part-00000.parquet", "tasks-out"),
    ] {
        let file = lay(data, images, "flip");
        let got = read_dataset(&file, None, usize::MAX).unwrap();
        assert_eq!(got.len(), 1);
        assert_eq!(got[0].1, root.join(images), "{data}");
        let img = got[0].0.load_images(&got[0].1).unwrap();
        assert_eq!(
            img[0].dimensions(),
            spatial_ssrl::data::images::load_rgb(&photo)
                .unwrap()
                .dimensions()
        );
    }
    // An image_dir given is used as it is, found or not.
    let file = root.join("Spatial-SSRL-81k/spatialssrl.parquet");
    let other = root.join("elsewhere");
    assert_eq!(
        read_dataset(&file, Some(&other), usize::MAX).unwrap()[0].1,
        other
    );
}

/// The released cold-start set as it ships: LLaMA-Factory's alpaca JSON (`SFT-coldstart.json`)
/// beside `coldstart_SFT_images/`, read with its images found, the boxed answer to score
/// against and the response kept as the SFT target.
#[test]
fn alpaca_json_reads_as_the_cold_start_set_ships() {
    use spatial_ssrl::data::records::{read_dataset, read_samples, ImageRef};
    let root = scratch("alpaca").join("Spatial-SSRL-81k");
    std::fs::create_dir_all(root.join("coldstart_SFT_images")).unwrap();
    std::fs::copy(
        fixtures().join("photos/rocket.jpg"),
        root.join("coldstart_SFT_images/img_0.jpg"),
    )
    .unwrap();
    let json = root.join("SFT-coldstart.json");
    let rows = serde_json::json!([
        {"instruction": "<image>Which patch is flipped? Options: 1, 2, 3.", "input": "",
         "output": "<think>The second patch is mirrored.</think> \\boxed{2}",
         "images": ["coldstart_SFT_images/img_0.jpg"]},
        {"instruction": "Order the regions.", "input": "A, B, C",
         "output": "no box here", "images": []}
    ]);
    std::fs::write(&json, rows.to_string()).unwrap();
    let got = read_dataset(&json, None, usize::MAX).unwrap();
    assert_eq!(got.len(), 2);
    let (s, root_found) = &got[0];
    assert_eq!(root_found, &root);
    assert_eq!(
        s.problem,
        "<image>Which patch is flipped? Options: 1, 2, 3."
    );
    assert_eq!(s.answer, "2");
    assert_eq!(
        s.images,
        vec![ImageRef::File("coldstart_SFT_images/img_0.jpg".into())]
    );
    assert_eq!(
        s.meta["response"],
        "<think>The second patch is mirrored.</think> \\boxed{2}"
    );
    assert_eq!(s.load_images(root_found).unwrap().len(), 1);
    // `input` joins the instruction on a new line; no box, no answer.
    assert_eq!(got[1].0.problem, "Order the regions.\nA, B, C");
    assert_eq!(got[1].0.answer, "");
    // ShareGPT rows, both spellings, a system turn allowed: the same sample.
    let share = serde_json::json!([
        {"messages": [{"role": "system", "content": "You are helpful."},
                      {"role": "user", "content": "<image>Which patch is flipped? Options: 1, 2, 3."},
                      {"role": "assistant", "content": "<think>The second patch is mirrored.</think> \\boxed{2}"}],
         "images": ["coldstart_SFT_images/img_0.jpg"]},
        {"conversations": [{"from": "human", "value": "<image>Which patch is flipped? Options: 1, 2, 3."},
                           {"from": "gpt", "value": "<think>The second patch is mirrored.</think> \\boxed{2}"}],
         "images": ["coldstart_SFT_images/img_0.jpg"]}
    ]);
    std::fs::write(root.join("sharegpt.json"), share.to_string()).unwrap();
    let sg = read_samples(&root.join("sharegpt.json")).unwrap();
    assert_eq!(sg.len(), 2);
    for r in &sg {
        assert_eq!(
            (&r.problem, &r.answer, &r.images),
            (&s.problem, &s.answer, &s.images)
        );
        assert_eq!(r.meta, s.meta);
    }
    // A row of neither form, a longer conversation, and a file that is no array are named.
    std::fs::write(&json, r#"[{"output": "x"}]"#).unwrap();
    let e = read_samples(&json).unwrap_err().to_string();
    assert!(
        e.contains("SFT-coldstart.json") && e.contains("row 0: neither `instruction`"),
        "{e}"
    );
    let long = r#"[{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},
                   {"role": "user", "content": "c"}, {"role": "assistant", "content": "d"}]}]"#;
    std::fs::write(&json, long).unwrap();
    let e = read_samples(&json).unwrap_err().to_string();
    assert!(
        e.contains("row 0") && e.contains("user, assistant, user, assistant"),
        "{e}"
    );
    std::fs::write(&json, r#"{"instruction": "x"}"#).unwrap();
    let e = read_samples(&json).unwrap_err().to_string();
    assert!(e.contains("SFT JSON"), "{e}");
}
