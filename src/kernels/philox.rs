//! Philox4x32-10 (Salmon et al., SC'11), the counter-based generator both backends use, so
//! the CPU and CUDA samplers draw the same numbers for the same `(seed, sequence, step, token)`.
//! `kernels/common.cuh` holds the identical device version.

const M0: u32 = 0xD251_1F53;
const M1: u32 = 0xCD9E_8D57;
const W0: u32 = 0x9E37_79B9;
const W1: u32 = 0xBB67_AE85;

#[inline]
fn mulhilo(a: u32, b: u32) -> (u32, u32) {
    let p = u64::from(a) * u64::from(b);
    ((p >> 32) as u32, p as u32)
}

/// Ten rounds of Philox4x32 on `counter` with `key`.
#[inline]
pub fn philox4x32(counter: [u32; 4], key: [u32; 2]) -> [u32; 4] {
    let (mut c, mut k) = (counter, key);
    for _ in 0..10 {
        let (hi0, lo0) = mulhilo(M0, c[0]);
        let (hi1, lo1) = mulhilo(M1, c[2]);
        c = [hi1 ^ c[1] ^ k[0], lo1, hi0 ^ c[3] ^ k[1], lo0];
        k = [k[0].wrapping_add(W0), k[1].wrapping_add(W1)];
    }
    c
}

/// Uniform in the open interval (0, 1) from the top 23 bits: `((x >> 9) + 0.5) / 2^23`, exact in
/// f32 on both backends.
#[inline]
pub fn uniform_open(x: u32) -> f32 {
    ((x >> 9) as f32 + 0.5) * (1.0 / 8_388_608.0)
}

/// The fourth counter word, a constant ("SSRL").
const TAG: u32 = 0x5353_524C;

/// Block counters are token / 4, so they live in 30 bits (token indices wrap at 2³²).
const COUNTER_MASK: u32 = 0x3FFF_FFFF;

/// The Philox block that serves tokens `4·counter .. 4·counter + 4` of one decoding step.
#[inline]
fn block(seed: u64, sequence: u32, step: u32, counter: u32) -> [u32; 4] {
    philox4x32(
        [counter & COUNTER_MASK, step, sequence, TAG],
        [seed as u32, (seed >> 32) as u32],
    )
}

/// The random draw for one vocabulary entry of one decoding step: word `token mod 4` of the
/// Philox block at counter `(token / 4, step, sequence, "SSRL")` — one block serves four
/// consecutive entries.
#[inline]
pub fn token_uniform(seed: u64, sequence: u32, step: u32, token: u32) -> f32 {
    uniform_open(block(seed, sequence, step, token >> 2)[(token & 3) as usize])
}

/// [`token_uniform`] for tokens `first ..` into every entry of `out` (the same numbers, bit for
/// bit): whole blocks sixteen at a time on AVX2 where the CPU has it (checked at run time),
/// else eight at a time on SSE2 (the x86-64 baseline), else one at a time.
pub fn fill_uniforms(seed: u64, sequence: u32, step: u32, first: u32, out: &mut [f32]) {
    // The entries before the first whole block.
    let head = ((4 - (first & 3) as usize) & 3).min(out.len());
    let (lead, rest) = out.split_at_mut(head);
    if head > 0 {
        let w = block(seed, sequence, step, first >> 2);
        for (o, x) in lead.iter_mut().zip(&w[(first & 3) as usize..]) {
            *o = uniform_open(*x);
        }
    }
    let counter = first.wrapping_add(head as u32) >> 2;
    #[cfg(target_arch = "x86_64")]
    {
        if std::is_x86_feature_detected!("avx2") {
            // SAFETY: the CPU has AVX2.
            unsafe { x86::fill_avx2(seed, sequence, step, counter, rest) };
        } else {
            x86::fill_sse2(seed, sequence, step, counter, rest);
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    fill_blocks(seed, sequence, step, counter, rest);
}

/// Whole blocks from `counter` on into `out`, one at a time (the last one cut to fit).
fn fill_blocks(seed: u64, sequence: u32, step: u32, counter: u32, out: &mut [f32]) {
    for (j, chunk) in out.chunks_mut(4).enumerate() {
        let w = block(seed, sequence, step, counter.wrapping_add(j as u32));
        for (o, x) in chunk.iter_mut().zip(w) {
            *o = uniform_open(x);
        }
    }
}

/// Eight blocks (32 entries) per round of the loop: their four counter words as lanes of
/// 128-bit (SSE2, two vectors of four blocks) or 256-bit (AVX2, one vector of eight, two such
/// chains per round) registers.
/// `pmuludq` gives the 32 × 32 → 64-bit products two or four per instruction; a 4 × 4
/// transpose then puts each block's four words next to each other, in token order.
#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::{fill_blocks, COUNTER_MASK, M0, M1, TAG, W0, W1};
    use std::arch::x86_64::*;

    /// High and low words of `a · m` per lane (`m` the same in every lane).
    #[inline(always)]
    fn mulhilo_sse2(m: __m128i, a: __m128i) -> (__m128i, __m128i) {
        // SAFETY: SSE2 instructions, always available on x86-64.
        unsafe {
            let p02 = _mm_mul_epu32(a, m);
            let p13 = _mm_mul_epu32(_mm_srli_epi64::<32>(a), m);
            let lo = _mm_unpacklo_epi32(
                _mm_shuffle_epi32::<0b00_00_10_00>(p02),
                _mm_shuffle_epi32::<0b00_00_10_00>(p13),
            );
            let hi = _mm_unpacklo_epi32(
                _mm_shuffle_epi32::<0b00_00_11_01>(p02),
                _mm_shuffle_epi32::<0b00_00_11_01>(p13),
            );
            (hi, lo)
        }
    }

    /// `uniform_open` per lane: `((x >> 9) + 0.5) / 2²³`, exact (below 2²³ every step is).
    #[inline(always)]
    fn uniforms_sse2(x: __m128i) -> __m128 {
        // SAFETY: SSE2 instructions, always available on x86-64.
        unsafe {
            let v = _mm_cvtepi32_ps(_mm_srli_epi32::<9>(x));
            _mm_mul_ps(
                _mm_add_ps(v, _mm_set1_ps(0.5)),
                _mm_set1_ps(1.0 / 8_388_608.0),
            )
        }
    }

    pub fn fill_sse2(seed: u64, sequence: u32, step: u32, counter: u32, out: &mut [f32]) {
        let mut chunks = out.chunks_exact_mut(32);
        let mut base = counter;
        for chunk in &mut chunks {
            // SAFETY: SSE2 instructions, always available on x86-64; the stores write 8 × 16
            // bytes into the 32 f32 of the chunk.
            unsafe {
                let (m0, m1) = (_mm_set1_epi32(M0 as i32), _mm_set1_epi32(M1 as i32));
                let mask = _mm_set1_epi32(COUNTER_MASK as i32);
                let a = _mm_add_epi32(_mm_set1_epi32(base as i32), _mm_setr_epi32(0, 1, 2, 3));
                let mut c0 = [
                    _mm_and_si128(a, mask),
                    _mm_and_si128(_mm_add_epi32(a, _mm_set1_epi32(4)), mask),
                ];
                let mut c1 = [_mm_set1_epi32(step as i32); 2];
                let mut c2 = [_mm_set1_epi32(sequence as i32); 2];
                let mut c3 = [_mm_set1_epi32(TAG as i32); 2];
                let (mut ka, mut kb) = (seed as u32, (seed >> 32) as u32);
                for _ in 0..10 {
                    let (a, b) = (_mm_set1_epi32(ka as i32), _mm_set1_epi32(kb as i32));
                    for h in 0..2 {
                        let (hi0, lo0) = mulhilo_sse2(m0, c0[h]);
                        let (hi1, lo1) = mulhilo_sse2(m1, c2[h]);
                        c0[h] = _mm_xor_si128(_mm_xor_si128(hi1, c1[h]), a);
                        c2[h] = _mm_xor_si128(_mm_xor_si128(hi0, c3[h]), b);
                        c1[h] = lo1;
                        c3[h] = lo0;
                    }
                    ka = ka.wrapping_add(W0);
                    kb = kb.wrapping_add(W1);
                }
                let o = chunk.as_mut_ptr();
                for h in 0..2 {
                    let t0 = _mm_unpacklo_epi32(c0[h], c1[h]);
                    let t1 = _mm_unpackhi_epi32(c0[h], c1[h]);
                    let t2 = _mm_unpacklo_epi32(c2[h], c3[h]);
                    let t3 = _mm_unpackhi_epi32(c2[h], c3[h]);
                    let rows = [
                        _mm_unpacklo_epi64(t0, t2),
                        _mm_unpackhi_epi64(t0, t2),
                        _mm_unpacklo_epi64(t1, t3),
                        _mm_unpackhi_epi64(t1, t3),
                    ];
                    for (j, r) in rows.into_iter().enumerate() {
                        _mm_storeu_ps(o.add(16 * h + 4 * j), uniforms_sse2(r));
                    }
                }
            }
            base = base.wrapping_add(8);
        }
        fill_blocks(seed, sequence, step, base, chunks.into_remainder());
    }

    #[target_feature(enable = "avx2")]
    #[inline]
    fn mulhilo_avx2(m: __m256i, a: __m256i) -> (__m256i, __m256i) {
        // 64-bit products of the even lanes and of the odd lanes, each in its lane pair; the
        // halves are blended back into lane order (blends and shifts, no shuffle-port work).
        let p02 = _mm256_mul_epu32(a, m);
        let p13 = _mm256_mul_epu32(_mm256_srli_epi64::<32>(a), m);
        let lo = _mm256_blend_epi32::<0b1010_1010>(p02, _mm256_slli_epi64::<32>(p13));
        let hi = _mm256_blend_epi32::<0b1010_1010>(_mm256_srli_epi64::<32>(p02), p13);
        (hi, lo)
    }

    #[target_feature(enable = "avx2")]
    #[inline]
    fn uniforms_avx2(x: __m256i) -> __m256 {
        let v = _mm256_cvtepi32_ps(_mm256_srli_epi32::<9>(x));
        _mm256_mul_ps(
            _mm256_add_ps(v, _mm256_set1_ps(0.5)),
            _mm256_set1_ps(1.0 / 8_388_608.0),
        )
    }

    /// `N` vectors of eight blocks, the blocks at counters `base + 8v + (0..8)`, each
    /// vector's words in token order: four vectors of eight tokens. The `N` chains are
    /// independent, so their multiplications overlap (one chain waits on each round's latency).
    #[target_feature(enable = "avx2")]
    #[inline]
    fn blocks_avx2<const N: usize>(
        seed: u64,
        sequence: u32,
        step: u32,
        base: u32,
    ) -> [[__m256; 4]; N] {
        let (m0, m1) = (_mm256_set1_epi32(M0 as i32), _mm256_set1_epi32(M1 as i32));
        let mask = _mm256_set1_epi32(COUNTER_MASK as i32);
        let iota = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
        let mut c0: [__m256i; N] = std::array::from_fn(|v| {
            let first = _mm256_set1_epi32(base.wrapping_add(8 * v as u32) as i32);
            _mm256_and_si256(_mm256_add_epi32(first, iota), mask)
        });
        let mut c1 = [_mm256_set1_epi32(step as i32); N];
        let mut c2 = [_mm256_set1_epi32(sequence as i32); N];
        let mut c3 = [_mm256_set1_epi32(TAG as i32); N];
        let (mut ka, mut kb) = (seed as u32, (seed >> 32) as u32);
        for _ in 0..10 {
            let (a, b) = (_mm256_set1_epi32(ka as i32), _mm256_set1_epi32(kb as i32));
            for v in 0..N {
                let (hi0, lo0) = mulhilo_avx2(m0, c0[v]);
                let (hi1, lo1) = mulhilo_avx2(m1, c2[v]);
                c0[v] = _mm256_xor_si256(_mm256_xor_si256(hi1, c1[v]), a);
                c2[v] = _mm256_xor_si256(_mm256_xor_si256(hi0, c3[v]), b);
                c1[v] = lo1;
                c3[v] = lo0;
            }
            ka = ka.wrapping_add(W0);
            kb = kb.wrapping_add(W1);
        }
        // Per 128-bit half (blocks 0-3 low, 4-7 high) a 4 × 4 transpose, then the halves put
        // in order.
        std::array::from_fn(|v| {
            let t0 = _mm256_unpacklo_epi32(c0[v], c1[v]);
            let t1 = _mm256_unpackhi_epi32(c0[v], c1[v]);
            let t2 = _mm256_unpacklo_epi32(c2[v], c3[v]);
            let t3 = _mm256_unpackhi_epi32(c2[v], c3[v]);
            let u0 = _mm256_unpacklo_epi64(t0, t2); // blocks 0 | 4
            let u1 = _mm256_unpackhi_epi64(t0, t2); // blocks 1 | 5
            let u2 = _mm256_unpacklo_epi64(t1, t3); // blocks 2 | 6
            let u3 = _mm256_unpackhi_epi64(t1, t3); // blocks 3 | 7
            [
                _mm256_permute2x128_si256::<0x20>(u0, u1), // blocks 0, 1
                _mm256_permute2x128_si256::<0x20>(u2, u3), // blocks 2, 3
                _mm256_permute2x128_si256::<0x31>(u0, u1), // blocks 4, 5
                _mm256_permute2x128_si256::<0x31>(u2, u3), // blocks 6, 7
            ]
            .map(|x| uniforms_avx2(x))
        })
    }

    /// # Safety
    /// The CPU must have AVX2.
    #[target_feature(enable = "avx2")]
    pub unsafe fn fill_avx2(seed: u64, sequence: u32, step: u32, counter: u32, out: &mut [f32]) {
        // Two chains of eight blocks at a time (64 tokens), then one, then single blocks.
        let mut chunks = out.chunks_exact_mut(64);
        let mut base = counter;
        for chunk in &mut chunks {
            let o = chunk.as_mut_ptr();
            for (v, rows) in blocks_avx2::<2>(seed, sequence, step, base)
                .iter()
                .enumerate()
            {
                for (j, r) in rows.iter().enumerate() {
                    // SAFETY: the chunk holds 64 f32, written as eight unaligned 8-lane stores.
                    unsafe { _mm256_storeu_ps(o.add(32 * v + 8 * j), *r) };
                }
            }
            base = base.wrapping_add(16);
        }
        let mut rest = chunks.into_remainder();
        if rest.len() >= 32 {
            let (chunk, tail) = rest.split_at_mut(32);
            let o = chunk.as_mut_ptr();
            for (j, r) in blocks_avx2::<1>(seed, sequence, step, base)[0]
                .iter()
                .enumerate()
            {
                // SAFETY: the chunk holds 32 f32, written as four unaligned 8-lane stores.
                unsafe { _mm256_storeu_ps(o.add(8 * j), *r) };
            }
            base = base.wrapping_add(8);
            rest = tail;
        }
        fill_blocks(seed, sequence, step, base, rest);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every length (the 32-entry rounds, the blocks after them, a partial first block) and
    /// counters that wrap past u32::MAX, on each path the CPU has.
    #[test]
    fn filled_uniforms_match_the_scalar_generator() {
        type Fill = fn(u64, u32, u32, u32, &mut [f32]);
        let mut paths: Vec<(&str, Fill)> = vec![("dispatch", fill_uniforms)];
        #[cfg(target_arch = "x86_64")]
        {
            // From a block boundary on.
            paths.push(("sse2", |s, q, t, first, out| {
                x86::fill_sse2(s, q, t, first >> 2, out)
            }));
            if std::is_x86_feature_detected!("avx2") {
                paths.push(("avx2", |s, q, t, first, out| {
                    // SAFETY: the CPU has AVX2.
                    unsafe { x86::fill_avx2(s, q, t, first >> 2, out) }
                }));
            }
        }
        let mut r = crate::rng::Rng::keyed(9, &[]);
        for (name, fill) in paths {
            for len in [0usize, 1, 3, 4, 7, 31, 32, 33, 40, 64, 100, 127, 2048] {
                for first in [0u32, 4, 5, 7, 32, u32::MAX - 63, u32::MAX - 20] {
                    if name != "dispatch" && first % 4 != 0 {
                        continue;
                    }
                    let (seed, seq, step) =
                        (r.next_u64(), r.next_u64() as u32, r.next_u64() as u32);
                    let mut out = vec![0f32; len];
                    fill(seed, seq, step, first, &mut out);
                    for (i, x) in out.iter().enumerate() {
                        let t = first.wrapping_add(i as u32);
                        let want = token_uniform(seed, seq, step, t);
                        assert_eq!(x.to_bits(), want.to_bits(), "{name}: len {len}, token {t}");
                    }
                }
            }
        }
    }

    /// Four entries per block, each a different word of it, and blocks keyed by token / 4.
    #[test]
    fn one_block_serves_four_tokens() {
        let key = [7u32, 0];
        for t in [0u32, 1, 2, 3, 4, 9, 4 * 1000 + 3] {
            let w = philox4x32([t / 4, 11, 3, TAG], key);
            assert_eq!(
                token_uniform(7, 3, 11, t),
                uniform_open(w[(t % 4) as usize])
            );
        }
        let u: Vec<f32> = (0..8).map(|t| token_uniform(7, 3, 11, t)).collect();
        for i in 0..8 {
            for j in 0..i {
                assert_ne!(u[i], u[j]);
            }
        }
    }

    /// Known-answer vectors from the Random123 distribution (`kat_vectors`, philox4x32_10).
    #[test]
    fn random123_known_answers() {
        assert_eq!(
            philox4x32([0, 0, 0, 0], [0, 0]),
            [0x6627_e8d5, 0xe169_c58d, 0xbc57_ac4c, 0x9b00_dbd8]
        );
        assert_eq!(
            philox4x32([0xffff_ffff; 4], [0xffff_ffff; 2]),
            [0x408f_276d, 0x41c8_3b0e, 0xa20b_c7c6, 0x6d54_51fd]
        );
        assert_eq!(
            philox4x32(
                [0x243f_6a88, 0x85a3_08d3, 0x1319_8a2e, 0x0370_7344],
                [0xa409_3822, 0x299f_31d0]
            ),
            [0xd16c_fe09, 0x94fd_cceb, 0x5001_e420, 0x2412_6ea1]
        );
    }

    #[test]
    fn uniforms_are_open_and_spread() {
        assert!(uniform_open(0) > 0.0 && uniform_open(u32::MAX) < 1.0);
        let mean: f64 = (0..10_000)
            .map(|i| f64::from(token_uniform(7, 1, 2, i)))
            .sum::<f64>()
            / 10_000.0;
        assert!((mean - 0.5).abs() < 0.01, "{mean}");
    }
}
