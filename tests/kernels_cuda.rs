//! CUDA kernels against their CPU twins on fresh random inputs. Without libnvrtc / a GPU these
//! print a visible SKIP; with the NVRTC library alone the kernels are still compiled.

use spatial_ssrl::kernels::{
    cpu, cuda, AdamW, AdvantageConfig, KernelError, Logits, RowKey, SamplingParams,
};
use spatial_ssrl::rng::Rng;

mod common;
use common::gpu_skip as skip;

fn device() -> Option<cuda::Cuda> {
    match cuda::Cuda::new(0) {
        Ok(c) => {
            eprintln!("CUDA device: {}", c.device_name());
            Some(c)
        }
        Err(KernelError::Unavailable(why)) => {
            skip(&format!("no CUDA device ({why})"));
            None
        }
        Err(e) => panic!("CUDA present but unusable: {e}"),
    }
}

fn random(n: usize, scale: f64, seed: u64) -> Vec<f32> {
    let mut r = Rng::keyed(seed, &[]);
    (0..n)
        .map(|_| ((r.f64() * 2.0 - 1.0) * scale) as f32)
        .collect()
}

#[test]
fn kernels_compile_with_nvrtc() {
    if !cuda::nvrtc_present() {
        skip("libnvrtc not found, kernels/*.cu not compiled (make test fetches it when PyPI is reachable)");
        return;
    }
    let cuda::Image::Ptx(text) = cuda::compile(None).expect("kernels compile to PTX") else {
        panic!("no architecture asked for, yet no PTX");
    };
    let entries = [
        "logprob_partials",
        "logprob_finish",
        "sample_rows",
        "mask_tokens",
        "group_advantages",
        "sum_squares",
        "scale",
        "adamw",
    ];
    for entry in entries {
        assert!(
            text.contains(&format!(".entry {entry}")),
            "no entry {entry} in the PTX"
        );
    }
    // Machine code for the data-centre GPUs users train on (A100, H100/H200): an ELF image
    // that names every kernel.
    for arch in [(8, 0), (9, 0)] {
        let cuda::Image::Cubin(bin) = cuda::compile(Some(arch)).expect("kernels compile to CUBIN")
        else {
            panic!("sm_{}{}: no CUBIN", arch.0, arch.1);
        };
        assert_eq!(
            &bin[..4],
            b"\x7fELF",
            "sm_{}{}: not an ELF image",
            arch.0,
            arch.1
        );
        for entry in entries {
            assert!(
                bin.windows(entry.len()).any(|w| w == entry.as_bytes()),
                "sm_{}{}: no {entry}",
                arch.0,
                arch.1
            );
        }
    }
}

#[test]
fn logprobs_match_cpu() {
    let Some(gpu) = device() else { return };
    for (rows, vocab, scale, t) in [
        (1usize, 151_936usize, 8.0, 1.0f32),
        (7, 777, 3.0, 0.7),
        (3, 1023, 1e4, 1.0),
        (4, 257, 5.0, 1e-3),
        (40, 151_936, 6.0, 0.9),
    ] {
        let l = random(rows * vocab, scale, vocab as u64);
        let mut r = Rng::keyed(2, &[]);
        let tg: Vec<Option<u32>> = (0..rows)
            .map(|i| {
                if i == 1 {
                    None
                } else {
                    Some(r.below(vocab) as u32)
                }
            })
            .collect();
        let a = cpu::token_logprobs(Logits::F32(&l), vocab, &tg, t).unwrap();
        let b = gpu.token_logprobs(Logits::F32(&l), vocab, &tg, t).unwrap();
        for i in 0..rows {
            for (x, y) in [(a.logprobs[i], b.logprobs[i]), (a.entropy[i], b.entropy[i])] {
                assert!(
                    (x - y).abs() <= 1e-5 * x.abs().max(1.0),
                    "V={vocab} T={t} row {i}: cpu {x} gpu {y}"
                );
            }
        }
        let h: Vec<half::bf16> = l.iter().map(|v| half::bf16::from_f32(*v)).collect();
        let f: Vec<half::f16> = l.iter().map(|v| half::f16::from_f32(*v)).collect();
        for (name, x) in [("bf16", Logits::Bf16(&h)), ("f16", Logits::F16(&f))] {
            let a = cpu::token_logprobs(x, vocab, &tg, t).unwrap();
            let b = gpu.token_logprobs(x, vocab, &tg, t).unwrap();
            for i in 0..rows {
                let (x, y) = (a.logprobs[i], b.logprobs[i]);
                assert!(
                    (x - y).abs() <= 1e-5 * x.abs().max(1.0),
                    "{name} V={vocab} T={t} row {i}: cpu {x} gpu {y}"
                );
            }
        }
    }
}

/// Greedy, plain, top-k, top-p and both.
fn sampling_cases() -> Vec<SamplingParams> {
    vec![
        SamplingParams {
            temperature: 0.0,
            ..Default::default()
        },
        SamplingParams {
            temperature: 1.0,
            top_k: 0,
            top_p: 1.0,
            seed: 1,
        },
        SamplingParams {
            temperature: 0.7,
            top_k: 40,
            top_p: 1.0,
            seed: 2,
        },
        SamplingParams {
            temperature: 1.0,
            top_k: 0,
            top_p: 0.9,
            seed: 3,
        },
        SamplingParams {
            temperature: 1.2,
            top_k: 100,
            top_p: 0.8,
            seed: 4,
        },
    ]
}

#[test]
fn sampling_matches_cpu() {
    let Some(gpu) = device() else { return };
    let (rows, vocab) = (64usize, 32_003usize);
    let l = random(rows * vocab, 6.0, 77);
    let keys: Vec<RowKey> = (0..rows as u32)
        .map(|i| RowKey {
            sequence: i * 7,
            step: i % 5,
        })
        .collect();
    for p in sampling_cases() {
        let a = cpu::sample(Logits::F32(&l), vocab, &keys, &p).unwrap();
        let b = gpu.sample(Logits::F32(&l), vocab, &keys, &p).unwrap();
        let same = a.iter().zip(&b).filter(|(x, y)| x.token == y.token).count();
        assert_eq!(same, rows, "{p:?}: {same}/{rows} tokens agree");
        for (x, y) in a.iter().zip(&b) {
            assert!((x.logprob - y.logprob).abs() <= 1e-5 * x.logprob.abs().max(1.0));
        }
    }
}

/// Sampling from logits already on the device (the rollout engine's path, on ONNX Runtime's
/// output buffer) with banned tokens: the same draws as the CPU twin on host-masked logits.
#[test]
fn device_sampling_with_banned_tokens_matches_cpu() {
    use cudarc::driver::DevicePtr;
    let Some(gpu) = device() else { return };
    let (rows, vocab) = (40usize, 151_936usize);
    let mut l = random(rows * vocab, 4.0, 91);
    // The banned ids would win every greedy draw and most sampled ones.
    let banned = [151_655u32, 151_656];
    for r in 0..rows {
        for &id in &banned {
            l[r * vocab + id as usize] = 60.0;
        }
    }
    let mut masked = l.clone();
    for r in 0..rows {
        for &id in &banned {
            masked[r * vocab + id as usize] = f32::NEG_INFINITY;
        }
    }
    let keys: Vec<RowKey> = (0..rows as u32)
        .map(|i| RowKey {
            sequence: 1000 + i,
            step: 3,
        })
        .collect();
    for p in sampling_cases() {
        let want = cpu::sample(Logits::F32(&masked), vocab, &keys, &p).unwrap();
        let d = gpu.stream().clone_htod(&l).unwrap();
        let got = {
            let (ptr, _g) = d.device_ptr(gpu.stream());
            // SAFETY: `d` holds rows · vocab f32 values and nothing else uses it meanwhile.
            unsafe { gpu.sample_device(ptr, 0, vocab, &keys, &p, &banned) }.unwrap()
        };
        for (r, (x, y)) in want.iter().zip(&got).enumerate() {
            assert_eq!(x.token, y.token, "{p:?}: row {r}");
            assert!(!banned.contains(&y.token));
            assert!((x.logprob - y.logprob).abs() <= 1e-5 * x.logprob.abs().max(1.0));
        }
        let back = gpu.stream().clone_dtoh(&d).unwrap();
        assert_eq!(
            back[5 * vocab + 151_655],
            f32::NEG_INFINITY,
            "masked in place"
        );
    }
}

#[test]
fn optimizer_kernels_match_cpu() {
    let Some(gpu) = device() else { return };
    let scores = random(5 * 33, 1.0, 5);
    for cfg in [
        AdvantageConfig::EASYR1,
        AdvantageConfig::DR_GRPO,
        AdvantageConfig::TRL,
    ] {
        let a = cpu::group_advantages(&scores, 5, &cfg).unwrap();
        let b = gpu.group_advantages(&scores, 5, &cfg).unwrap();
        for (x, y) in a.iter().zip(&b) {
            assert!((x - y).abs() <= 1e-5 * x.abs().max(1.0));
        }
    }
    let g1 = random(100_003, 0.01, 6);
    let g2 = random(4097, 0.5, 7);
    let n_cpu = cpu::global_norm(&[&g1, &g2]);
    let n_gpu = gpu.global_norm(&[&g1, &g2]).unwrap();
    assert!((n_cpu - n_gpu).abs() <= 1e-5 * n_cpu);
    let h = AdamW {
        lr: 1e-3,
        ..Default::default()
    };
    let (mut p1, mut m1, mut v1) = (random(10_007, 1.0, 8), vec![0.0; 10_007], vec![0.0; 10_007]);
    let (mut p2, mut m2, mut v2) = (p1.clone(), m1.clone(), v1.clone());
    for step in 1..=3 {
        let g = random(10_007, 0.1, 100 + step as u64);
        cpu::adamw_step(&mut p1, &g, &mut m1, &mut v1, step, &h);
        gpu.adamw_step(&mut p2, &g, &mut m2, &mut v2, step, &h)
            .unwrap();
    }
    for (x, y) in p1.iter().zip(&p2) {
        assert!((x - y).abs() <= 1e-5 * x.abs().max(1e-3), "{x} {y}");
    }
}

/// The rollout cache's device copies: a 2-D copy puts each of 6 blocks of 5 values at column 2
/// of blocks 8 wide (one call for all blocks), after a zeroing of the whole destination; the
/// values outside the copied columns are zero, not what the buffer held before.
#[test]
fn block_copies_land_at_their_pitch_in_a_zeroed_buffer() {
    use cudarc::driver::{DevicePtr, DevicePtrMut};
    let Some(c) = device() else { return };
    let s = c.stream().clone();
    let src: Vec<f32> = (0..30).map(|i| i as f32 + 1.0).collect();
    let d_src = s.clone_htod(&src).unwrap();
    let mut d_dst = s.clone_htod(&[7f32; 48]).unwrap();
    {
        let (ps, _read) = d_src.device_ptr(&s);
        let (pd, _write) = d_dst.device_ptr_mut(&s);
        // SAFETY: 48 floats at `pd`; 6 rows of 20 bytes, 32 bytes apart, from byte 8 end at
        // byte 8 + 5·32 + 20 = 188 ≤ 192; the source's 6 rows of 20 bytes are its 120 bytes.
        unsafe {
            c.zero_device(pd, 48 * 4).unwrap();
            c.copy_device_2d(pd + 8, 32, ps, 20, 20, 6).unwrap();
        }
    }
    let got = s.clone_dtoh(&d_dst).unwrap();
    let want: Vec<f32> = (0..48)
        .map(|j| {
            let (b, k) = (j / 8, j % 8);
            match k {
                2..=6 => (b * 5 + k - 2 + 1) as f32,
                _ => 0.0,
            }
        })
        .collect();
    assert_eq!(got, want);
}
