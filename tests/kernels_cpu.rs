//! CPU kernels against direct f64 formulas and hand-computed values, on awkward shapes.

use spatial_ssrl::kernels::{cpu, AdamW, AdvantageConfig, Logits, RowKey, SamplingParams};
use spatial_ssrl::rng::Rng;

fn random_logits(rows: usize, vocab: usize, scale: f64, seed: u64) -> Vec<f32> {
    let mut r = Rng::keyed(seed, &[]);
    (0..rows * vocab)
        .map(|_| ((r.f64() * 2.0 - 1.0) * scale) as f32)
        .collect()
}

/// log-softmax and entropy in f64 of `x / T` (the division in f32, as torch does it).
fn direct(row: &[f32], t: f32, target: usize) -> (f64, f64) {
    let x: Vec<f64> = row.iter().map(|v| f64::from(v / t)).collect();
    let m = x.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
    let z: f64 = x.iter().map(|v| (v - m).exp()).sum();
    let lz = m + z.ln();
    let ent = -x
        .iter()
        .map(|v| {
            let p = (v - lz).exp();
            if p > 0.0 {
                p * (v - lz)
            } else {
                0.0
            }
        })
        .sum::<f64>();
    (x[target] - lz, ent)
}

fn close(a: f64, b: f64, rel: f64, abs: f64) -> bool {
    (a - b).abs() <= abs + rel * b.abs()
}

#[test]
fn logprobs_and_entropy_match_the_formula() {
    for (rows, vocab, scale, t) in [
        (1, 151_936, 8.0, 1.0f32),
        (5, 777, 3.0, 0.7),
        (3, 1023, 1e4, 1.0),
        (4, 257, 5.0, 1e-3),
        (2, 4099, 20.0, 2.5),
    ] {
        let l = random_logits(rows, vocab, scale, vocab as u64);
        let mut r = Rng::keyed(1, &[]);
        let targets: Vec<Option<u32>> = (0..rows)
            .map(|i| {
                if i == 1 {
                    None
                } else {
                    Some(r.below(vocab) as u32)
                }
            })
            .collect();
        let out = cpu::token_logprobs(Logits::F32(&l), vocab, &targets, t).unwrap();
        for (i, tg) in targets.iter().enumerate() {
            match tg {
                None => assert_eq!((out.logprobs[i], out.entropy[i]), (0.0, 0.0)),
                Some(tg) => {
                    let (lp, ent) = direct(&l[i * vocab..(i + 1) * vocab], t, *tg as usize);
                    assert!(
                        close(f64::from(out.logprobs[i]), lp, 1e-6, 1e-5),
                        "V={vocab} T={t}: {} vs {lp}",
                        out.logprobs[i]
                    );
                    assert!(
                        close(f64::from(out.entropy[i]), ent, 1e-5, 1e-5),
                        "V={vocab} T={t}: {} vs {ent}",
                        out.entropy[i]
                    );
                }
            }
        }
    }
}

#[test]
fn half_precision_inputs_and_minus_infinity() {
    let vocab = 333;
    let l = random_logits(2, vocab, 6.0, 9);
    let h: Vec<half::f16> = l.iter().map(|v| half::f16::from_f32(*v)).collect();
    let b: Vec<half::bf16> = l.iter().map(|v| half::bf16::from_f32(*v)).collect();
    let tg = [Some(5u32), Some(300)];
    for (logits, back) in [
        (
            Logits::F16(&h),
            h.iter().map(|v| v.to_f32()).collect::<Vec<_>>(),
        ),
        (
            Logits::Bf16(&b),
            b.iter().map(|v| v.to_f32()).collect::<Vec<_>>(),
        ),
    ] {
        let out = cpu::token_logprobs(logits, vocab, &tg, 1.0).unwrap();
        for r in 0..2 {
            let (lp, _) = direct(
                &back[r * vocab..(r + 1) * vocab],
                1.0,
                tg[r].unwrap() as usize,
            );
            assert!(close(f64::from(out.logprobs[r]), lp, 1e-6, 1e-5));
        }
    }
    // −∞ logits (masked vocabulary) have zero probability and do not poison the sums.
    let mut m = random_logits(1, 50, 2.0, 3);
    for v in m.iter_mut().skip(10) {
        *v = f32::NEG_INFINITY;
    }
    let out = cpu::token_logprobs(Logits::F32(&m), 50, &[Some(3)], 1.0).unwrap();
    let (lp, ent) = direct(&m[..10], 1.0, 3);
    assert!(
        close(f64::from(out.logprobs[0]), lp, 1e-6, 1e-6)
            && close(f64::from(out.entropy[0]), ent, 1e-6, 1e-6)
    );
    assert!(cpu::token_logprobs(Logits::F32(&m), 50, &[Some(50)], 1.0).is_err());
    assert!(cpu::token_logprobs(Logits::F32(&m), 49, &[Some(1)], 1.0).is_err());
}

fn softmax(x: &[f32], t: f32) -> Vec<f64> {
    let v: Vec<f64> = x.iter().map(|a| f64::from(a / t)).collect();
    let m = v.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
    let z: f64 = v.iter().map(|a| (a - m).exp()).sum();
    v.iter().map(|a| (a - m).exp() / z).collect()
}

fn frequencies(logits: &[f32], p: &SamplingParams, n: u32) -> Vec<f64> {
    let keys: Vec<RowKey> = (0..n)
        .map(|s| RowKey {
            sequence: 3,
            step: s,
        })
        .collect();
    let rows: Vec<f32> = (0..n).flat_map(|_| logits.iter().copied()).collect();
    let out = cpu::sample(Logits::F32(&rows), logits.len(), &keys, p).unwrap();
    let mut f = vec![0.0; logits.len()];
    for s in &out {
        f[s.token as usize] += 1.0 / f64::from(n);
    }
    f
}

#[test]
fn sampling_follows_the_filtered_distribution() {
    let logits = [2.0f32, 1.0, 0.5, 0.0, -1.0];
    let n = 40_000;
    let p = SamplingParams {
        temperature: 0.8,
        top_k: 0,
        top_p: 1.0,
        seed: 11,
    };
    let want = softmax(&logits, 0.8);
    for (f, w) in frequencies(&logits, &p, n).iter().zip(&want) {
        assert!((f - w).abs() < 0.01, "{f} vs {w}");
    }
    // top-k = 2: only the two best, renormalised.
    let f = frequencies(&logits, &SamplingParams { top_k: 2, ..p }, n);
    let w2 = softmax(&logits[..2], 0.8);
    assert!(
        (f[0] - w2[0]).abs() < 0.01
            && (f[1] - w2[1]).abs() < 0.01
            && f[2..].iter().all(|x| *x == 0.0),
        "{f:?}"
    );
    // top-p = 0.75 at T = 0.8: masses 0.62, 0.18, ... → the nucleus is {0, 1}.
    let f = frequencies(&logits, &SamplingParams { top_p: 0.75, ..p }, n);
    assert!(f[2..].iter().all(|x| *x == 0.0) && f[1] > 0.1, "{f:?}");
    // top-p below the first mass keeps only the best token.
    let f = frequencies(&logits, &SamplingParams { top_p: 0.3, ..p }, 200);
    assert!(f[1..].iter().all(|x| *x == 0.0), "{f:?}");
}

/// The log-prob of `token` under the distribution the sampler draws from, in f64: the
/// softmax of `x / T` over the tokens top-k keeps (the k largest, ties at the k-th kept), then
/// top-p (largest first while the mass before is below p, ties at the last kept).
fn kept_logprob(row: &[f32], p: &SamplingParams, token: usize) -> f64 {
    let x: Vec<f64> = row.iter().map(|v| f64::from(v / p.temperature)).collect();
    let mut order: Vec<usize> = (0..row.len()).filter(|i| row[*i].is_finite()).collect();
    order.sort_by(|a, b| row[*b].total_cmp(&row[*a]));
    let mut floor = f32::NEG_INFINITY;
    if p.top_k > 0 && p.top_k < order.len() {
        floor = row[order[p.top_k - 1]];
    }
    let kept: Vec<usize> = order.into_iter().filter(|i| row[*i] >= floor).collect();
    let m = x[kept[0]];
    let z: f64 = kept.iter().map(|i| (x[*i] - m).exp()).sum();
    let mut before = 0.0;
    for i in &kept {
        if before >= f64::from(p.top_p) * z {
            break;
        }
        before += (x[*i] - m).exp();
        floor = row[*i];
    }
    let z: f64 = kept
        .iter()
        .filter(|i| row[**i] >= floor)
        .map(|i| (x[*i] - m).exp())
        .sum();
    assert!(row[token] >= floor, "token {token} is outside the kept set");
    x[token] - m - z.ln()
}

/// Every draw's log-prob is over the set it was drawn from: the full tempered softmax without
/// filters, renormalised over what top-k and top-p keep with them (what an importance ratio
/// against the sampler needs; TRL's and verl's engines report it so).
#[test]
fn sampled_log_probs_are_over_the_kept_set() {
    let vocab = 2048;
    let l = random_logits(16, vocab, 5.0, 8);
    let keys: Vec<RowKey> = (0..16)
        .map(|i| RowKey {
            sequence: i,
            step: 3,
        })
        .collect();
    for (temperature, top_k, top_p) in [
        (1.0, 0, 1.0),
        (0.7, 0, 1.0),
        (1.0, 20, 1.0),
        (0.7, 0, 0.9),
        (1.3, 0, 0.5),
        (1.0, 100, 0.8),
        (0.6, 1, 1.0),
    ] {
        let p = SamplingParams {
            temperature,
            top_k,
            top_p,
            seed: 4,
        };
        let out = cpu::sample(Logits::F32(&l), vocab, &keys, &p).unwrap();
        let filtered = top_k > 0 || top_p < 1.0;
        for (r, s) in out.iter().enumerate() {
            let row = &l[r * vocab..(r + 1) * vocab];
            let want = kept_logprob(row, &p, s.token as usize);
            assert!(
                close(f64::from(s.logprob), want, 1e-6, 1e-5),
                "{p:?} row {r}: {} vs {want}",
                s.logprob
            );
            let (full, _) = direct(row, temperature, s.token as usize);
            if filtered {
                // The cut mass raises every kept token's probability.
                assert!(f64::from(s.logprob) > full + 1e-4, "{p:?} row {r}");
            } else {
                assert!(close(f64::from(s.logprob), full, 1e-6, 1e-5));
            }
        }
        if top_k == 1 {
            assert!(out.iter().all(|s| s.logprob == 0.0), "{out:?}");
        }
    }
}

#[test]
fn greedy_draws_and_batch_independence() {
    let vocab = 1001;
    let l = random_logits(6, vocab, 4.0, 21);
    let keys: Vec<RowKey> = (0..6)
        .map(|i| RowKey {
            sequence: 100 + i,
            step: 7,
        })
        .collect();
    let g = cpu::sample(
        Logits::F32(&l),
        vocab,
        &keys,
        &SamplingParams {
            temperature: 0.0,
            ..Default::default()
        },
    )
    .unwrap();
    let tg: Vec<Option<u32>> = g.iter().map(|s| Some(s.token)).collect();
    let lp = cpu::token_logprobs(Logits::F32(&l), vocab, &tg, 1.0).unwrap();
    for r in 0..6 {
        let row = &l[r * vocab..(r + 1) * vocab];
        let arg = (0..vocab)
            .max_by(|a, b| row[*a].total_cmp(&row[*b]))
            .unwrap();
        assert_eq!(g[r].token as usize, arg);
        assert!((g[r].logprob - lp.logprobs[r]).abs() < 1e-6);
    }
    // Sampling: each row's draw depends only on its key, not on the batch around it.
    let p = SamplingParams {
        temperature: 1.0,
        top_k: 50,
        top_p: 0.9,
        seed: 5,
    };
    let all = cpu::sample(Logits::F32(&l), vocab, &keys, &p).unwrap();
    for r in 0..6 {
        let one = cpu::sample(
            Logits::F32(&l[r * vocab..(r + 1) * vocab]),
            vocab,
            &keys[r..r + 1],
            &p,
        )
        .unwrap();
        assert_eq!(one[0], all[r]);
        let want = kept_logprob(&l[r * vocab..(r + 1) * vocab], &p, one[0].token as usize);
        assert!(close(f64::from(one[0].logprob), want, 1e-6, 1e-5));
    }
    let other = cpu::sample(
        Logits::F32(&l),
        vocab,
        &keys,
        &SamplingParams { seed: 6, ..p },
    )
    .unwrap();
    assert_ne!(all, other);
}

#[test]
fn grpo_advantages_by_hand() {
    // Group [1, 0, 0, 1, 1]: mean 0.6, unbiased std sqrt(0.3).
    let a = cpu::group_advantages(
        &[1.0, 0.0, 0.0, 1.0, 1.0, 0.9, 0.9, 0.9, 0.9, 0.9],
        5,
        &AdvantageConfig::EASYR1,
    )
    .unwrap();
    let s = 0.3f64.sqrt() + 1e-6;
    for (got, want) in a[..5]
        .iter()
        .zip([0.4 / s, -0.6 / s, -0.6 / s, 0.4 / s, 0.4 / s])
    {
        assert!((f64::from(*got) - want).abs() < 1e-6, "{got} {want}");
    }
    assert!(
        a[5..].iter().all(|v| *v == 0.0),
        "equal rewards give zero advantage"
    );
    let d = cpu::group_advantages(&[1.0, 0.0, 0.5, 0.5], 2, &AdvantageConfig::DR_GRPO).unwrap();
    assert_eq!(d, vec![0.5, -0.5, 0.0, 0.0]);
    let t = cpu::group_advantages(&[1.0, 0.0], 2, &AdvantageConfig::TRL).unwrap();
    let s = 0.5f64.sqrt() + 1e-4;
    assert!((f64::from(t[0]) - 0.5 / s).abs() < 1e-6);
    assert!(cpu::group_advantages(&[1.0, 2.0, 3.0], 2, &AdvantageConfig::EASYR1).is_err());
    assert!(cpu::group_advantages(&[1.0], 1, &AdvantageConfig::EASYR1).is_err());
}

#[test]
fn adamw_and_clipping_by_hand() {
    let h = AdamW {
        lr: 0.1,
        beta1: 0.9,
        beta2: 0.999,
        eps: 1e-8,
        weight_decay: 0.01,
    };
    let (mut p, mut m, mut v) = (vec![1.0f32], vec![0.0f32], vec![0.0f32]);
    cpu::adamw_step(&mut p, &[0.5], &mut m, &mut v, 1, &h);
    // decay: 1 − 0.1·0.01 = 0.999; m̂ = 0.5, v̂ = 0.25 → step 0.1
    assert!((p[0] - 0.899).abs() < 1e-6, "{}", p[0]);
    cpu::adamw_step(&mut p, &[-0.25], &mut m, &mut v, 2, &h);
    let p1 = 0.899f64 * (1.0 - 0.001);
    let m2 = 0.9 * 0.05 + 0.1 * -0.25;
    let v2 = 0.999 * 0.00025 + 0.001 * 0.0625;
    let want = p1 - 0.1 * (m2 / (1.0 - 0.81)) / ((v2 / (1.0 - 0.999f64.powi(2))).sqrt() + 1e-8);
    assert!((f64::from(p[0]) - want).abs() < 1e-6, "{} {want}", p[0]);

    let (mut a, mut b) = (vec![3.0f32], vec![0.0f32, 4.0]);
    let n = cpu::clip_grad_norm(&mut [&mut a[..], &mut b[..]], 1.0);
    assert!((n - 5.0).abs() < 1e-6);
    assert!((a[0] - 3.0 / (5.0 + 1e-6)).abs() < 1e-6 && (b[1] - 4.0 / (5.0 + 1e-6)).abs() < 1e-6);
    let mut c = vec![0.3f32, 0.4];
    assert!((cpu::clip_grad_norm(&mut [&mut c[..]], 1.0) - 0.5).abs() < 1e-6);
    assert_eq!(c, vec![0.3, 0.4], "below the limit nothing changes");
}

/// The sampler skips tokens that cannot win: those more than 19.5 below the row's top logit,
/// and those whose draw, bounded from its uniform, cannot beat the best score so far. Its draws
/// must equal the plain Gumbel-max argmax over every token, on peaked and on flat rows.
#[test]
fn pruned_sampling_equals_the_full_gumbel_argmax() {
    use spatial_ssrl::kernels::philox::token_uniform;
    let vocab = 5_003;
    for (scale, t) in [
        (40.0, 1.0f32),
        (1e4, 0.7),
        (3.0, 1.0),
        (60.0, 2.5),
        (0.5, 1.0),
        (0.01, 0.3),
    ] {
        let logits = random_logits(16, vocab, scale, 9);
        let keys: Vec<RowKey> = (0..16u32)
            .map(|i| RowKey {
                sequence: i * 3 + 1,
                step: i,
            })
            .collect();
        let p = SamplingParams {
            temperature: t,
            top_k: 0,
            top_p: 1.0,
            seed: 11,
        };
        let got = cpu::sample(Logits::F32(&logits), vocab, &keys, &p).unwrap();
        for (r, k) in keys.iter().enumerate() {
            let row = &logits[r * vocab..(r + 1) * vocab];
            let (mut best, mut bs) = (0usize, f32::NEG_INFINITY);
            for (i, x) in row.iter().enumerate() {
                let u = token_uniform(p.seed, k.sequence, k.step, i as u32);
                let score = x / t - (-u.ln()).ln();
                if score > bs {
                    bs = score;
                    best = i;
                }
            }
            assert_eq!(got[r].token as usize, best, "scale {scale} T {t} row {r}");
        }
    }
}

/// The sampler's two-pass normaliser (f32 polynomial exponential, f64 sum) agrees with the f64
/// online pass to 1e-6 on flat and peaked rows, odd lengths, −∞ entries and a single finite one.
#[test]
fn fast_log_normaliser_matches_the_f64_pass() {
    let mut rows: Vec<Vec<f32>> = vec![];
    for (n, scale, seed) in [
        (2048, 0.5, 1),
        (2048, 3.0, 2),
        (151_936, 3.0, 3),
        (1001, 40.0, 4),
    ] {
        rows.push(random_logits(1, n, scale, seed));
    }
    let mut banned = random_logits(1, 517, 2.0, 5);
    for i in (0..517).step_by(3) {
        banned[i] = f32::NEG_INFINITY;
    }
    rows.push(banned);
    let mut one = vec![f32::NEG_INFINITY; 9];
    one[4] = -3.25;
    rows.push(one);
    rows.push(vec![100.0, 0.0, -100.0]);
    for (k, row) in rows.iter().enumerate() {
        let (max, log_z) = cpu::log_normaliser(row);
        let st = cpu::RowStats::of(row.iter().copied(), 1.0);
        assert_eq!(f64::from(max), st.max, "row {k}");
        assert!(
            (log_z - st.log_z()).abs() < 1e-6,
            "row {k}: {log_z} vs {}",
            st.log_z()
        );
    }
}
