//! `--position-geometry metric`: the paper's camera-frame formulation (Eq. 7–9) with intrinsics.

mod common;

use common::*;
use spatial_ssrl::tasks::{self, position::Geometry, source, SkipReason, TaskKind, TasksConfig};

#[test]
fn metric_answers_follow_the_back_projected_geometry() {
    let out = scratch("metric");
    let f = fixtures();
    let cfg = TasksConfig {
        rgbd: vec![f.join("rgbd"), f.join("official")],
        out: out.clone(),
        tasks: vec![TaskKind::Position],
        per_image: 6,
        seed: 3,
        position_geometry: Geometry::Metric,
        ..Default::default()
    };
    let s = tasks::run(&cfg, &tasks::Silent).unwrap();
    let st = &s.tasks[&TaskKind::Position];
    // TUM has no intrinsics file; MegaDepth has no metric scale; DIODE has no intrinsics file.
    assert_eq!(st.skipped.get(&SkipReason::NoIntrinsics), Some(&(4 * 6)));
    assert!(st.produced >= 6, "{st:?}");
    for smp in read_all(&out) {
        assert_eq!(smp.meta["geometry"], "metric");
        let src =
            source::discover_rgbd(std::path::Path::new(&smp.source[0]).parent().unwrap()).unwrap();
        let frame = source::load_rgbd(&src.frames[0], 1600).unwrap();
        let k = frame.intrinsics.unwrap();
        let cam_label = smp.meta["camera_label"].as_u64().unwrap();
        let ms = smp.meta["markers"].as_array().unwrap();
        let cam = ms
            .iter()
            .find(|m| m["label"].as_u64() == Some(cam_label))
            .unwrap();
        let tgt = ms
            .iter()
            .find(|m| m["label"].as_u64() != Some(cam_label))
            .unwrap();
        let back = |m: &serde_json::Value| {
            let z = m["depth"].as_f64().unwrap();
            (
                (m["center"][0].as_f64().unwrap() + 0.5 - k.cx) * z / k.fx,
                z,
            )
        };
        let ((xc, zc), (xt, zt)) = (back(cam), back(tgt));
        let (dx, dz) = (xt - xc, zt - zc);
        let facing = smp.meta["facing"].as_u64().unwrap() as usize;
        let th = [90f64, 270.0, 180.0, 0.0][facing].to_radians();
        let (sn, cs) = (th.sin().round(), th.cos().round());
        let (rx, rz) = (cs * dx + sn * dz, -sn * dx + cs * dz);
        let (lo, hi) = frame
            .depth
            .iter()
            .filter(|v| v.is_finite())
            .fold((f32::MAX, f32::MIN), |(a, b), v| (a.min(*v), b.max(*v)));
        let d_dep = 0.25 * f64::from(hi - lo);
        let d_lat = 150.0 * (zc + zt) / 2.0 / k.fx;
        let (tx, tz) = if facing >= 2 {
            (d_lat, d_dep)
        } else {
            (d_dep, d_lat)
        };
        let lx = if rx > tx {
            Some("Right")
        } else if rx < -tx {
            Some("Left")
        } else {
            None
        };
        let lz = if rz > tz {
            Some("Front")
        } else if rz < -tz {
            Some("Back")
        } else {
            None
        };
        let expect = match (lx, lz) {
            (Some(a), Some(b)) => format!("{a}-{b}"),
            (Some(a), None) | (None, Some(a)) => a.to_string(),
            _ => panic!("{}: ambiguous sample was kept", smp.id),
        };
        let slot = ["A", "B", "C", "D"]
            .iter()
            .position(|l| *l == smp.answer)
            .unwrap();
        assert_eq!(
            smp.meta["options"][slot].as_str().unwrap(),
            expect,
            "{}",
            smp.id
        );
    }
}
