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

/// The random draw for one vocabulary entry of one decoding step.
#[inline]
pub fn token_uniform(seed: u64, sequence: u32, step: u32, token: u32) -> f32 {
    let key = [seed as u32, (seed >> 32) as u32];
    uniform_open(philox4x32([token, step, sequence, 0x5353_524C], key)[0])
}

/// Lanes per [`token_uniforms`] call.
pub const LANES: usize = 8;

/// [`token_uniform`] for tokens `first .. first + LANES` at once (the same numbers, bit for
/// bit): eight independent lanes per round keep the multipliers busy, 4-5× faster than one
/// token at a time on the 2-core development machine.
#[inline]
pub fn token_uniforms(seed: u64, sequence: u32, step: u32, first: u32) -> [f32; LANES] {
    #[cfg(target_arch = "x86_64")]
    {
        sse2::token_uniforms(seed, sequence, step, first)
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        token_uniforms_portable(seed, sequence, step, first)
    }
}

/// [`token_uniform`] for tokens `first ..` into every entry of `out` (the same numbers, bit for
/// bit): sixteen lanes at a time with AVX2 where the CPU has it (checked at run time), else
/// [`token_uniforms`] eight at a time.
pub fn fill_uniforms(seed: u64, sequence: u32, step: u32, first: u32, out: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if std::is_x86_feature_detected!("avx2") {
        // SAFETY: the CPU has AVX2.
        unsafe { avx2::fill(seed, sequence, step, first, out) };
        return;
    }
    fill_by_lanes(seed, sequence, step, first, out);
}

/// [`fill_uniforms`] from [`token_uniforms`].
fn fill_by_lanes(seed: u64, sequence: u32, step: u32, first: u32, out: &mut [f32]) {
    for (k, chunk) in out.chunks_mut(LANES).enumerate() {
        let u = token_uniforms(seed, sequence, step, first.wrapping_add((k * LANES) as u32));
        chunk.copy_from_slice(&u[..chunk.len()]);
    }
}

/// The lanes in plain Rust (other targets, and the reference the SSE2 version is tested on).
#[cfg_attr(target_arch = "x86_64", allow(dead_code))]
fn token_uniforms_portable(seed: u64, sequence: u32, step: u32, first: u32) -> [f32; LANES] {
    let (k0, k1) = (seed as u32, (seed >> 32) as u32);
    let mut c0: [u32; LANES] = std::array::from_fn(|i| first.wrapping_add(i as u32));
    let mut c1 = [step; LANES];
    let mut c2 = [sequence; LANES];
    let mut c3 = [0x5353_524C; LANES];
    let (mut ka, mut kb) = (k0, k1);
    for _ in 0..10 {
        for i in 0..LANES {
            let p0 = u64::from(M0) * u64::from(c0[i]);
            let p1 = u64::from(M1) * u64::from(c2[i]);
            let (hi0, lo0, hi1, lo1) = ((p0 >> 32) as u32, p0 as u32, (p1 >> 32) as u32, p1 as u32);
            let n0 = hi1 ^ c1[i] ^ ka;
            let n2 = hi0 ^ c3[i] ^ kb;
            (c0[i], c1[i], c2[i], c3[i]) = (n0, lo1, n2, lo0);
        }
        ka = ka.wrapping_add(W0);
        kb = kb.wrapping_add(W1);
    }
    c0.map(uniform_open)
}

/// Eight lanes as two SSE2 vectors of four (SSE2 is part of the x86-64 baseline): the 32 × 32 →
/// 64-bit products come from `pmuludq`, two lanes per instruction, where the compiler kept the
/// plain version scalar.
#[cfg(target_arch = "x86_64")]
mod sse2 {
    use super::{uniform_open, LANES, M0, M1, W0, W1};
    use std::arch::x86_64::*;

    /// High and low words of `a · m` per lane (`m` the same in every lane).
    #[inline(always)]
    fn mulhilo(m: __m128i, a: __m128i) -> (__m128i, __m128i) {
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

    #[inline]
    pub fn token_uniforms(seed: u64, sequence: u32, step: u32, first: u32) -> [f32; LANES] {
        // SAFETY: SSE2 instructions, always available on x86-64; the store writes 16 bytes
        // into each 16-byte half of `words`.
        unsafe {
            let (m0, m1) = (_mm_set1_epi32(M0 as i32), _mm_set1_epi32(M1 as i32));
            let lane = |j: u32| first.wrapping_add(j) as i32;
            let mut c0 = [
                _mm_setr_epi32(lane(0), lane(1), lane(2), lane(3)),
                _mm_setr_epi32(lane(4), lane(5), lane(6), lane(7)),
            ];
            let mut c1 = [_mm_set1_epi32(step as i32); 2];
            let mut c2 = [_mm_set1_epi32(sequence as i32); 2];
            let mut c3 = [_mm_set1_epi32(0x5353_524C); 2];
            let (mut ka, mut kb) = (seed as u32, (seed >> 32) as u32);
            for _ in 0..10 {
                let (a, b) = (_mm_set1_epi32(ka as i32), _mm_set1_epi32(kb as i32));
                for h in 0..2 {
                    let (hi0, lo0) = mulhilo(m0, c0[h]);
                    let (hi1, lo1) = mulhilo(m1, c2[h]);
                    c0[h] = _mm_xor_si128(_mm_xor_si128(hi1, c1[h]), a);
                    c2[h] = _mm_xor_si128(_mm_xor_si128(hi0, c3[h]), b);
                    c1[h] = lo1;
                    c3[h] = lo0;
                }
                ka = ka.wrapping_add(W0);
                kb = kb.wrapping_add(W1);
            }
            let mut words = [0u32; LANES];
            _mm_storeu_si128(words.as_mut_ptr().cast(), c0[0]);
            _mm_storeu_si128(words.as_mut_ptr().add(4).cast(), c0[1]);
            words.map(uniform_open)
        }
    }
}

/// Sixteen lanes as two AVX2 vectors of eight: the SSE2 scheme on 256-bit registers
/// (`vpmuludq` gives four 64-bit products per instruction; shuffles stay within 128-bit halves,
/// so lane order is kept), and the conversion to uniforms vectorised too.
#[cfg(target_arch = "x86_64")]
mod avx2 {
    use super::{fill_by_lanes, M0, M1, W0, W1};
    use std::arch::x86_64::*;

    #[target_feature(enable = "avx2")]
    #[inline]
    fn mulhilo(m: __m256i, a: __m256i) -> (__m256i, __m256i) {
        let p02 = _mm256_mul_epu32(a, m);
        let p13 = _mm256_mul_epu32(_mm256_srli_epi64::<32>(a), m);
        let lo = _mm256_unpacklo_epi32(
            _mm256_shuffle_epi32::<0b00_00_10_00>(p02),
            _mm256_shuffle_epi32::<0b00_00_10_00>(p13),
        );
        let hi = _mm256_unpacklo_epi32(
            _mm256_shuffle_epi32::<0b00_00_11_01>(p02),
            _mm256_shuffle_epi32::<0b00_00_11_01>(p13),
        );
        (hi, lo)
    }

    /// `uniform_open` per lane: `((x >> 9) + 0.5) / 2²³`, exact (below 2²³ every step is).
    #[target_feature(enable = "avx2")]
    #[inline]
    fn uniforms(x: __m256i) -> __m256 {
        let v = _mm256_cvtepi32_ps(_mm256_srli_epi32::<9>(x));
        _mm256_mul_ps(
            _mm256_add_ps(v, _mm256_set1_ps(0.5)),
            _mm256_set1_ps(1.0 / 8_388_608.0),
        )
    }

    /// # Safety
    /// The CPU must have AVX2.
    #[target_feature(enable = "avx2")]
    pub unsafe fn fill(seed: u64, sequence: u32, step: u32, first: u32, out: &mut [f32]) {
        let (m0, m1) = (_mm256_set1_epi32(M0 as i32), _mm256_set1_epi32(M1 as i32));
        let iota = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
        let mut chunks = out.chunks_exact_mut(16);
        let mut base = first;
        for chunk in &mut chunks {
            let a = _mm256_add_epi32(_mm256_set1_epi32(base as i32), iota);
            let mut c0 = [a, _mm256_add_epi32(a, _mm256_set1_epi32(8))];
            let mut c1 = [_mm256_set1_epi32(step as i32); 2];
            let mut c2 = [_mm256_set1_epi32(sequence as i32); 2];
            let mut c3 = [_mm256_set1_epi32(0x5353_524C); 2];
            let (mut ka, mut kb) = (seed as u32, (seed >> 32) as u32);
            for _ in 0..10 {
                let (ka_v, kb_v) = (_mm256_set1_epi32(ka as i32), _mm256_set1_epi32(kb as i32));
                for h in 0..2 {
                    let (hi0, lo0) = mulhilo(m0, c0[h]);
                    let (hi1, lo1) = mulhilo(m1, c2[h]);
                    c0[h] = _mm256_xor_si256(_mm256_xor_si256(hi1, c1[h]), ka_v);
                    c2[h] = _mm256_xor_si256(_mm256_xor_si256(hi0, c3[h]), kb_v);
                    c1[h] = lo1;
                    c3[h] = lo0;
                }
                ka = ka.wrapping_add(W0);
                kb = kb.wrapping_add(W1);
            }
            // SAFETY: the chunk holds 16 f32, written as two unaligned 8-lane stores.
            unsafe {
                _mm256_storeu_ps(chunk.as_mut_ptr(), uniforms(c0[0]));
                _mm256_storeu_ps(chunk.as_mut_ptr().add(8), uniforms(c0[1]));
            }
            base = base.wrapping_add(16);
        }
        fill_by_lanes(seed, sequence, step, base, chunks.into_remainder());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lanes_match_the_scalar_generator_on_random_keys() {
        let mut r = crate::rng::Rng::keyed(5, &[]);
        for _ in 0..2_000 {
            let seed = r.next_u64();
            let (seq, step, first) = (
                r.next_u64() as u32,
                r.next_u64() as u32,
                r.next_u64() as u32,
            );
            let v = token_uniforms(seed, seq, step, first);
            let w = token_uniforms_portable(seed, seq, step, first);
            for (i, x) in v.iter().enumerate() {
                let t = first.wrapping_add(i as u32);
                assert_eq!(x.to_bits(), token_uniform(seed, seq, step, t).to_bits());
                assert_eq!(x.to_bits(), w[i].to_bits());
            }
        }
    }

    #[test]
    fn lanes_match_the_scalar_generator() {
        for (seed, seq, step, first) in [(7u64, 3u32, 11u32, 0u32), (u64::MAX, 0, 0, u32::MAX - 3)]
        {
            let v = token_uniforms(seed, seq, step, first);
            for (i, x) in v.iter().enumerate() {
                let t = first.wrapping_add(i as u32);
                assert_eq!(x.to_bits(), token_uniform(seed, seq, step, t).to_bits());
            }
        }
    }

    /// Every length (the 16-lane blocks and the tail) and counters that wrap past u32::MAX.
    #[test]
    fn filled_uniforms_match_the_scalar_generator() {
        let mut r = crate::rng::Rng::keyed(9, &[]);
        for len in [0usize, 1, 7, 8, 15, 16, 17, 40, 64, 100] {
            for first in [0u32, 5, u32::MAX - 20] {
                let (seed, seq, step) = (r.next_u64(), r.next_u64() as u32, r.next_u64() as u32);
                let mut out = vec![0f32; len];
                fill_uniforms(seed, seq, step, first, &mut out);
                for (i, x) in out.iter().enumerate() {
                    let t = first.wrapping_add(i as u32);
                    let want = token_uniform(seed, seq, step, t);
                    assert_eq!(x.to_bits(), want.to_bits(), "len {len}, token {t}");
                }
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
