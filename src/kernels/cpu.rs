//! CPU reference implementations (rows in parallel with rayon). Accumulation is in f64, so
//! these are the yardstick the CUDA kernels are tested against.

use super::{
    check_groups, check_rows, check_targets, philox, AdamW, AdvantageConfig, KernelError, Logits,
    RowKey, Sampled, SamplingParams, TokenLogprobs,
};
use rayon::prelude::*;

/// One pass over a row: max `m`, `s = Σ exp(x'−m)` and `t = Σ exp(x'−m)·x'` for `x' = x / T`,
/// rescaled whenever the running max grows. Entries of −∞ have zero probability and are skipped.
#[derive(Debug, Clone, Copy)]
pub struct RowStats {
    pub max: f64,
    pub sum: f64,
    pub weighted: f64,
}

impl RowStats {
    pub fn of(row: impl Iterator<Item = f32>, temperature: f32) -> RowStats {
        let (mut m, mut s, mut t) = (f64::NEG_INFINITY, 0.0f64, 0.0f64);
        for x in row {
            let x = f64::from(x / temperature);
            if x == f64::NEG_INFINITY {
                continue;
            }
            if x > m {
                let r = (m - x).exp();
                s = s * r + 1.0;
                t = t * r + x;
                m = x;
            } else {
                let e = (x - m).exp();
                s += e;
                t += e * x;
            }
        }
        RowStats {
            max: m,
            sum: s,
            weighted: t,
        }
    }

    /// `log Σ exp(x')`.
    pub fn log_z(&self) -> f64 {
        self.max + self.sum.ln()
    }

    /// `−Σ p log p = log Z − E[x']`.
    pub fn entropy(&self) -> f64 {
        self.log_z() - self.weighted / self.sum
    }
}

fn row<'a>(logits: &Logits<'a>, r: usize, vocab: usize) -> impl Iterator<Item = f32> + 'a {
    let l = *logits;
    (r * vocab..(r + 1) * vocab).map(move |i| l.get(i))
}

/// Temperature-scaled log-softmax at each row's target, and each row's entropy.
pub fn token_logprobs(
    logits: Logits<'_>,
    vocab: usize,
    targets: &[Option<u32>],
    temperature: f32,
) -> Result<TokenLogprobs, KernelError> {
    check_rows(logits.len(), vocab, targets.len())?;
    check_targets(targets, vocab)?;
    let out: Vec<(f32, f32)> = targets
        .par_iter()
        .enumerate()
        .map(|(r, t)| match t {
            None => (0.0, 0.0),
            Some(t) => {
                let st = RowStats::of(row(&logits, r, vocab), temperature);
                let x = f64::from(logits.get(r * vocab + *t as usize) / temperature);
                ((x - st.log_z()) as f32, st.entropy() as f32)
            }
        })
        .collect();
    Ok(TokenLogprobs {
        logprobs: out.iter().map(|p| p.0).collect(),
        entropy: out.iter().map(|p| p.1).collect(),
    })
}

/// The k-th largest value of a row (k ≥ 1).
pub fn kth_largest(values: &mut [f32], k: usize) -> f32 {
    let k = k.min(values.len());
    let (_, v, _) = values.select_nth_unstable_by(k - 1, |a, b| b.total_cmp(a));
    *v
}

/// Draws one token per row with the Gumbel-max trick over the filtered set:
/// `argmax_i x_i/T − ln(−ln u_i)` with `u_i` from Philox(seed; token i, step, sequence); its
/// log-prob is over that set (see [`Sampled`]).
pub fn sample(
    logits: Logits<'_>,
    vocab: usize,
    keys: &[RowKey],
    p: &SamplingParams,
) -> Result<Vec<Sampled>, KernelError> {
    check_rows(logits.len(), vocab, keys.len())?;
    Ok(keys
        .par_iter()
        .enumerate()
        .map(|(r, key)| match logits {
            // f32 rows are read in place; half-precision rows are widened once.
            Logits::F32(v) => sample_row(&v[r * vocab..(r + 1) * vocab], key, p),
            _ => sample_row(&row(&logits, r, vocab).collect::<Vec<f32>>(), key, p),
        })
        .collect())
}

/// An upper bound of the Gumbel draw `−ln(−ln u)` (as computed in f32) for a uniform `u` of
/// [`philox::token_uniform`]: the draw grows with `u`, so the bound is its value at the top of
/// the binade of `1 − u` (exact in f32: `u` has 24 significant bits), plus 1e-4 for rounding.
/// `table` is [`gumbel_bounds`], fetched once per row rather than per token.
#[inline]
fn gumbel_bound(table: &[f32; 26], u: f32) -> f32 {
    table[binade(u).clamp(1, 25) as usize]
}

/// `k` with `1 − u ∈ [2⁻ᵏ, 2¹⁻ᵏ)`: minus the f32 exponent of `1 − u`.
#[inline(always)]
fn binade(u: f32) -> i32 {
    127 - (((1.0 - u).to_bits() >> 23) & 0xff) as i32
}

/// A looser bound than [`gumbel_bound`] without its table (so a loop of it vectorises): with
/// `1 − u ∈ [2⁻ᵏ, 2¹⁻ᵏ)`, `−ln(−ln u) ≤ −ln(−ln(1 − 2⁻ᵏ)) < −ln 2⁻ᵏ = k · ln 2` (as
/// `−ln(1 − ε) > ε`), plus the same 1e-4 for rounding.
#[inline(always)]
fn gumbel_bound_loose(u: f32) -> f32 {
    binade(u) as f32 * std::f32::consts::LN_2 + 1e-4
}

/// The bounds of [`gumbel_bound`] by binade, computed once per process.
fn gumbel_bounds() -> &'static [f32; 26] {
    static BOUND: std::sync::OnceLock<[f32; 26]> = std::sync::OnceLock::new();
    BOUND.get_or_init(|| {
        // k = −exponent of 1 − u: 1 − u ∈ [2⁻ᵏ, 2¹⁻ᵏ), so u ≤ 1 − 2⁻ᵏ.
        std::array::from_fn(|k| {
            let u = 1.0 - 2f64.powi(-(k.max(1) as i32));
            (-(-u.ln()).ln() + 1e-4) as f32
        })
    })
}

/// `e^d` for `d ≤ 0` in f32 (Cephes' `expf`: `d = n·ln 2 + r`, a degree-7 polynomial in
/// `r ∈ [−ln 2 / 2, ln 2 / 2]`, relative error below 2e-7); 0 below −87 and for −∞. Branch-free,
/// so a loop of it vectorises.
#[inline(always)]
fn exp_nonpositive(d: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    // 1.5 · 2²³: adding and subtracting it rounds to the nearest integer.
    const ROUND: f32 = 12_582_912.0;
    let x = if d > -87.0 { d } else { -87.0 };
    let t = x * LOG2E + ROUND;
    let n = t - ROUND;
    // n as an integer: the low mantissa bits of t (integer ops vectorise, `as i32` does not).
    let ni = t.to_bits().wrapping_sub(ROUND.to_bits());
    let r = x - n * 0.693_359_4 + n * 2.121_944_4e-4;
    let mut q = 1.987_569_1e-4_f32;
    q = q * r + 1.398_199_9e-3;
    q = q * r + 8.333_452e-3;
    q = q * r + 4.166_579_6e-2;
    q = q * r + 1.666_666_5e-1;
    q = q * r + 0.5;
    let e = q * r * r + r + 1.0;
    let scale = f32::from_bits(ni.wrapping_add(127) << 23);
    // A mask rather than a branch: all ones where d ≥ −87, zero below and for −∞.
    let keep = u32::from(d >= -87.0).wrapping_neg();
    f32::from_bits((e * scale).to_bits() & keep)
}

/// `(max, ln Σ exp(x))` of a row with at least one finite entry (−∞ entries have zero
/// probability): the sampler's normaliser. Two passes, the max and then `Σ exp(x − max)` with
/// `exp_nonpositive` summed in f64 — about 10× faster than the online f64 pass of
/// [`RowStats`] and within 1e-6 of it (its terms' f32 rounding only). Always inlined, so the
/// row sampler's AVX2 build gets an AVX2 copy of it.
#[inline(always)]
pub fn log_normaliser(row: &[f32]) -> (f32, f64) {
    let mut lanes = [f32::NEG_INFINITY; 8];
    let mut chunks = row.chunks_exact(8);
    for c in &mut chunks {
        for j in 0..8 {
            lanes[j] = if c[j] > lanes[j] { c[j] } else { lanes[j] };
        }
    }
    let m = chunks
        .remainder()
        .iter()
        .chain(&lanes)
        .copied()
        .fold(f32::NEG_INFINITY, f32::max);
    (m, kept_log_normaliser(row, row, None, m))
}

/// `ln Σ exp(scaled)` over the tokens `values ≥ floor` (ties kept; every token with no floor,
/// the test then compiled out), `exp(scaled − max)` in f32 summed in f64; `max` is the row's
/// largest scaled value. Always inlined, as [`log_normaliser`].
#[inline(always)]
fn kept_log_normaliser(values: &[f32], scaled: &[f32], floor: Option<f32>, max: f32) -> f64 {
    let term = |x: f32, s: f32| {
        let e = exp_nonpositive(s - max);
        if floor.is_none_or(|f| x >= f) {
            e
        } else {
            0.0
        }
    };
    // Eight lanes, as in `log_normaliser`, so the loop vectorises.
    let mut acc = [0f64; 8];
    let (vs, ss) = (values.chunks_exact(8), scaled.chunks_exact(8));
    let tail: f64 = (vs.remainder().iter().zip(ss.remainder()))
        .map(|(x, s)| f64::from(term(*x, *s)))
        .sum();
    for (v, s) in vs.zip(ss) {
        let mut e = [0f32; 8];
        for j in 0..8 {
            e[j] = term(v[j], s[j]);
        }
        for j in 0..8 {
            acc[j] += f64::from(e[j]);
        }
    }
    f64::from(max) + (acc.iter().sum::<f64>() + tail).ln()
}

/// The tokens top-k keeps, `values ≥ floor` (every token, floor −∞, when `k` is 0 or the whole
/// row), and their normaliser; `max` and `log_z` are the whole row's ([`log_normaliser`] of
/// `scaled`). Always inlined, as [`log_normaliser`].
#[inline(always)]
fn top_k_set(values: &[f32], scaled: &[f32], max: f32, log_z: f64, k: usize) -> (f32, f64) {
    if k == 0 || k >= values.len() {
        return (f32::NEG_INFINITY, log_z);
    }
    let floor = kth_largest(&mut values.to_vec(), k);
    (floor, kept_log_normaliser(values, scaled, Some(floor), max))
}

/// Nucleus filtering of the tokens `values ≥ floor`: largest first, tokens are kept while the
/// mass before them is below `p` of theirs (at least one), and ties at the last kept value are
/// kept too. Returns the lowest kept value and the kept tokens' normaliser `ln Σ exp(scaled)`.
/// `scaled` is `values / T`, `max` its largest entry and `log_z` the normaliser of the tokens
/// `≥ floor`.
///
/// No sort of the row: one pass puts each token's mass into one of [`NUCLEUS_BINS`] bins by
/// its distance below `max` (bin 0 the largest values; a larger value never lands in a later
/// bin, so the nucleus, a prefix of the descending order, is whole bins and part of one), the
/// bins are summed from the top to the one where the target is reached, and only that bin's
/// tokens are sorted. Always inlined, so the row sampler's AVX2 build gets its own copy.
#[inline(always)]
fn nucleus(values: &[f32], scaled: &[f32], floor: f32, max: f32, log_z: f64, p: f32) -> (f32, f64) {
    const NONE: u16 = u16::MAX;
    let target = f64::from(p) * (log_z - f64::from(max)).exp();
    let n = values.len();
    assert_eq!(scaled.len(), n);
    // Each kept token's mass and bin. Tokens more than 87 below the top have no mass in f32:
    // they share the last bin. Indexed loops, so they stay in the AVX2 build and vectorise.
    let (per_unit, last_bin) = (NUCLEUS_BINS as f32 / 88.0, (NUCLEUS_BINS - 1) as f32);
    let (mut w, mut bin_of) = (vec![0f32; n], vec![NONE; n]);
    for i in 0..n {
        let (x, s) = (values[i], scaled[i]);
        let kept = x >= floor && x != f32::NEG_INFINITY;
        let e = exp_nonpositive(s - max);
        let b = ((max - s) * per_unit).min(last_bin) as u16;
        w[i] = if kept { e } else { 0.0 };
        bin_of[i] = if kept { b } else { NONE };
    }
    let mut bins = vec![0f64; NUCLEUS_BINS];
    for i in 0..n {
        if bin_of[i] != NONE {
            bins[usize::from(bin_of[i])] += f64::from(w[i]);
        }
    }
    let (mut before, mut edge) = (0.0f64, None);
    for (b, m) in bins.iter().enumerate() {
        if before + m >= target {
            edge = Some(b);
            break;
        }
        before += m;
    }
    let Some(edge) = edge else {
        // Rounding left the whole set's sum short of the target: all of it is the nucleus.
        let mut lowest = f32::INFINITY;
        for i in 0..n {
            if bin_of[i] != NONE {
                lowest = lowest.min(values[i]);
            }
        }
        return (lowest, f64::from(max) + before.ln());
    };
    // The edge bin holds mass (the target was not reached before it), so a token: its tokens
    // (value, mass), largest first.
    let mut last = Vec::new();
    for i in 0..n {
        if usize::from(bin_of[i]) == edge {
            last.push((values[i], w[i]));
        }
    }
    last.sort_unstable_by(|a, b| b.0.total_cmp(&a.0));
    let mut cut = None;
    for (x, m) in &last {
        if cut.is_some_and(|c| *x < c) {
            break;
        }
        before += f64::from(*m);
        if cut.is_none() && before >= target {
            // Kept from here on: `x` and its ties.
            cut = Some(*x);
        }
    }
    let cut = cut.unwrap_or_else(|| last.last().expect("the edge bin has a token").0);
    (cut, f64::from(max) + before.ln())
}

/// Value bins of [`nucleus`]: 88 / 4,096 ≈ 0.02 of a logit (after temperature) each.
const NUCLEUS_BINS: usize = 4096;

/// Tokens the sampler draws for at a time.
const BLOCK: usize = 32;

/// Which tokens of a row can be drawn: kept by top-k / top-p (`x ≥ floor`) and not pruned
/// (`x / T ≥ cut`). Written branch-free over whole blocks, so the loops vectorise.
#[derive(Clone, Copy)]
struct Live {
    floor: f32,
    cut: f32,
}

impl Live {
    #[inline(always)]
    fn at(self, x: f32, scaled: f32) -> bool {
        (x >= self.floor) & (scaled >= self.cut)
    }

    /// Whether any token of the block is live.
    #[inline(always)]
    fn any(self, xs: &[f32; BLOCK], ss: &[f32; BLOCK]) -> bool {
        let mut lanes = [0u32; 8];
        for c in 0..BLOCK / 8 {
            for (j, lane) in lanes.iter_mut().enumerate() {
                *lane |= u32::from(self.at(xs[8 * c + j], ss[8 * c + j]));
            }
        }
        lanes.iter().fold(0, |a, l| a | l) != 0
    }

    /// The block's best possible score, from the looser bound that vectorises
    /// ([`gumbel_bound_loose`]); −∞ when no token is live. Each token's bound first (an
    /// element-wise loop), then their maximum as eight running maxima, one per lane.
    #[inline(always)]
    fn block_top(self, xs: &[f32; BLOCK], ss: &[f32; BLOCK], u: &[f32; BLOCK]) -> f32 {
        let mut b = [0f32; BLOCK];
        for (i, b) in b.iter_mut().enumerate() {
            let bound = ss[i] + gumbel_bound_loose(u[i]);
            *b = if self.at(xs[i], ss[i]) {
                bound
            } else {
                f32::NEG_INFINITY
            };
        }
        let mut tops = [f32::NEG_INFINITY; 8];
        for c in b.chunks_exact(8) {
            for (top, &x) in tops.iter_mut().zip(c) {
                *top = if x > *top { x } else { *top };
            }
        }
        tops.into_iter().fold(f32::NEG_INFINITY, f32::max)
    }
}

avx2_twin! {
/// One row of [`sample`], compiled for AVX2 as well where the CPU has it (checked at run time;
/// the same operations in the same order, so the same token and log-prob bit for bit).
fn sample_row / sample_row_baseline(values: &[f32], key: &RowKey, p: &SamplingParams) -> Sampled {
    let vocab = values.len();
    let greedy = p.temperature <= 0.0;
    let t = if greedy { 1.0 } else { p.temperature };
    // x / 1 is x, bit for bit: at T = 1 the row is read as it is.
    let scaled: std::borrow::Cow<[f32]> = if t == 1.0 {
        values.into()
    } else {
        values.iter().map(|x| x / t).collect::<Vec<f32>>().into()
    };
    let (max, log_z) = log_normaliser(&scaled);
    let (token, log_z) = if greedy {
        let mut best = 0usize;
        let mut bv = f32::NEG_INFINITY;
        for (i, &x) in values.iter().enumerate() {
            if x > bv {
                bv = x;
                best = i;
            }
        }
        (best, log_z)
    } else {
        // The set drawn from (`values ≥ floor`) and its normaliser.
        let (mut floor, mut norm) = top_k_set(values, &scaled, max, log_z, p.top_k);
        if p.top_p < 1.0 {
            (floor, norm) = nucleus(values, &scaled, floor, max, norm, p.top_p);
        }
        // Exact pruning: a Gumbel draw here lies in [−2.82, 16.64] (u is in
        // [2⁻²⁴, 1 − 2⁻²⁴]), so the top logit scores at least max − 2.82 and a token more
        // than 19.5 below it can never win; its draw is skipped (1.0 of margin for
        // rounding). Peaked rows of a large vocabulary draw a few hundred numbers, not V.
        // Draws come BLOCK tokens at a time; a block with no live token is skipped.
        // `max` is finite, so `cut` is, and −∞ entries fail the second test.
        let live = Live {
            floor,
            cut: max - 20.5,
        };
        let mut best = 0usize;
        let mut bs = f32::NEG_INFINITY;
        let bounds = gumbel_bounds();
        // The last, partial block is padded with −∞ (never live).
        let (mut xs, mut ss, mut u) = (
            [f32::NEG_INFINITY; BLOCK],
            [f32::NEG_INFINITY; BLOCK],
            [0f32; BLOCK],
        );
        for start in (0..vocab).step_by(BLOCK) {
            let n = (vocab - start).min(BLOCK);
            let (vb, sb): (&[f32; BLOCK], &[f32; BLOCK]) = if n == BLOCK {
                let whole = start..start + BLOCK;
                let v = values[whole.clone()].try_into().expect("a whole block");
                (v, scaled[whole].try_into().expect("a whole block"))
            } else {
                xs[..n].copy_from_slice(&values[start..]);
                ss[..n].copy_from_slice(&scaled[start..]);
                (&xs, &ss)
            };
            if !live.any(vb, sb) {
                continue;
            }
            philox::fill_uniforms(p.seed, key.sequence, key.step, start as u32, &mut u[..n]);
            // Most blocks of a row cannot beat the best so far and are left after this pass.
            if live.block_top(vb, sb, &u) < bs {
                continue;
            }
            for j in 0..n {
                // score ≤ scaled + bound (f32 addition is monotonic): a token whose bound
                // cannot beat the best so far is skipped without its two logarithms. Most
                // draws lie far below the maximum, so few tokens pay for them.
                if !live.at(vb[j], sb[j]) || sb[j] + gumbel_bound(bounds, u[j]) < bs {
                    continue;
                }
                let score = sb[j] + -(-u[j].ln()).ln();
                if score > bs {
                    bs = score;
                    best = start + j;
                }
            }
        }
        // The log-prob is under the distribution drawn from: renormalised over the kept set
        // when top-k / top-p cut the row.
        (best, norm)
    };
    Sampled {
        token: token as u32,
        logprob: (f64::from(scaled[token]) - log_z) as f32,
    }
}
}

/// Group-normalised advantages: `(s − mean) / (std + eps)` per group of `group_size`
/// consecutive scores, std unbiased (N − 1) as `torch.std`; a group of equal scores gives 0.
pub fn group_advantages(
    scores: &[f32],
    group_size: usize,
    cfg: &AdvantageConfig,
) -> Result<Vec<f32>, KernelError> {
    check_groups(scores.len(), group_size)?;
    let mut out = Vec::with_capacity(scores.len());
    for g in scores.chunks(group_size) {
        let n = g.len() as f64;
        let mean = g.iter().map(|v| f64::from(*v)).sum::<f64>() / n;
        let var = g
            .iter()
            .map(|v| (f64::from(*v) - mean).powi(2))
            .sum::<f64>()
            / (n - 1.0);
        let denom = if cfg.scale_by_std {
            var.sqrt() + f64::from(cfg.eps)
        } else {
            1.0
        };
        out.extend(g.iter().map(|v| ((f64::from(*v) - mean) / denom) as f32));
    }
    Ok(out)
}

/// `sqrt(Σ g²)` over every tensor.
pub fn global_norm(grads: &[&[f32]]) -> f32 {
    grads
        .iter()
        .map(|g| g.iter().map(|v| f64::from(*v) * f64::from(*v)).sum::<f64>())
        .sum::<f64>()
        .sqrt() as f32
}

/// `torch.nn.utils.clip_grad_norm_`: scales every gradient by `max_norm / (norm + 1e-6)` when
/// that is below 1; returns the norm before clipping.
pub fn clip_grad_norm(grads: &mut [&mut [f32]], max_norm: f32) -> f32 {
    let norm = global_norm(&grads.iter().map(|g| &**g).collect::<Vec<_>>());
    let coef = max_norm / (norm + 1e-6);
    if coef < 1.0 {
        for g in grads.iter_mut() {
            for v in g.iter_mut() {
                *v *= coef;
            }
        }
    }
    norm
}

/// One AdamW step (`step` counts from 1) in place, as `torch.optim.AdamW`.
pub fn adamw_step(
    params: &mut [f32],
    grads: &[f32],
    m: &mut [f32],
    v: &mut [f32],
    step: u32,
    h: &AdamW,
) {
    let bc1 = 1.0 - f64::from(h.beta1).powi(step as i32);
    let bc2 = 1.0 - f64::from(h.beta2).powi(step as i32);
    for i in 0..params.len() {
        let g = grads[i];
        params[i] -= h.lr * h.weight_decay * params[i];
        m[i] = h.beta1 * m[i] + (1.0 - h.beta1) * g;
        v[i] = h.beta2 * v[i] + (1.0 - h.beta2) * g * g;
        let mhat = f64::from(m[i]) / bc1;
        let vhat = f64::from(v[i]) / bc2;
        params[i] -= (f64::from(h.lr) * mhat / (vhat.sqrt() + f64::from(h.eps))) as f32;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The binned nucleus keeps the set a full sort keeps (each token's mass as the sampler
    /// computes it, summed largest first in f64), and reports that set's normaliser: flat,
    /// peaked and heavy-tailed rows, rows of a few distinct values (ties at the cut), −∞
    /// entries, a top-k floor below, Qwen's vocabulary, nuclei from one token to nearly all.
    #[test]
    fn nucleus_keeps_what_a_full_sort_keeps() {
        let mut r = crate::rng::Rng::keyed(5, &[]);
        let mut cases = 0;
        for vocab in [1usize, 7, 300, 2048, 151_936] {
            for spread in [0.01f64, 1.0, 3.0, 30.0] {
                for tied in [false, true] {
                    let row: Vec<f32> = (0..vocab)
                        .map(|i| {
                            let x = spread * (r.f64() - 0.5) * 8.0;
                            match (i % 53 == 7 && vocab > 1, tied) {
                                (true, _) => f32::NEG_INFINITY,
                                (false, true) => (x * 2.0).round() as f32 / 2.0,
                                (false, false) => x as f32,
                            }
                        })
                        .collect();
                    for (t, top_k, p) in [(1.0f32, 0, 0.9f32), (0.7, 0, 0.5), (1.3, 0, 0.99)]
                        .into_iter()
                        .chain([(1.0, vocab / 3, 0.8), (1.0, 0, 0.05)])
                    {
                        let scaled: Vec<f32> = row.iter().map(|x| x / t).collect();
                        let (max, log_z) = log_normaliser(&scaled);
                        let (floor, z) = top_k_set(&row, &scaled, max, log_z, top_k);
                        let (cut, kept_z) = nucleus(&row, &scaled, floor, max, z, p);
                        // The reference: every kept token sorted, largest first.
                        let mass = |s: f32| f64::from(exp_nonpositive(s - max));
                        let mut all: Vec<(f32, f32)> = (row.iter().zip(&scaled))
                            .filter(|(x, _)| **x >= floor && **x != f32::NEG_INFINITY)
                            .map(|(x, s)| (*x, *s))
                            .collect();
                        all.sort_by(|a, b| b.0.total_cmp(&a.0));
                        let target = f64::from(p) * all.iter().map(|a| mass(a.1)).sum::<f64>();
                        let mut before = 0.0;
                        let mut want = all.last().unwrap().0;
                        for (x, s) in &all {
                            before += mass(*s);
                            if before >= target {
                                want = *x;
                                break;
                            }
                        }
                        let label =
                            format!("V {vocab} spread {spread} tied {tied} T {t} k {top_k} p {p}");
                        assert_eq!(cut, want, "{label}");
                        let kept: f64 = all.iter().filter(|a| a.0 >= want).map(|a| mass(a.1)).sum();
                        let want_z = f64::from(max) + kept.ln();
                        assert!(
                            (kept_z - want_z).abs() < 1e-9,
                            "{label}: {kept_z} vs {want_z}"
                        );
                        cases += 1;
                    }
                }
            }
        }
        assert_eq!(cases, 5 * 4 * 2 * 5);
    }

    /// The AVX2 build of the row sampler draws the same token with the same log-prob, bit for
    /// bit, as the baseline build: flat and peaked rows, −∞ entries, partial last blocks,
    /// temperatures, top-k and top-p.
    #[test]
    #[cfg(target_arch = "x86_64")]
    fn avx2_rows_equal_the_baseline_rows() {
        if !std::is_x86_feature_detected!("avx2") {
            eprintln!("SKIP: no AVX2 on this CPU, one build of the row sampler only");
            return;
        }
        let mut r = crate::rng::Rng::keyed(21, &[]);
        for (case, vocab) in [33usize, 100, 2048, 5000].into_iter().enumerate() {
            for spread in [0.05f64, 1.0, 6.0] {
                let row: Vec<f32> = (0..vocab)
                    .map(|i| {
                        if i % 97 == 5 {
                            f32::NEG_INFINITY
                        } else {
                            (spread * (r.f64() - 0.5) * 8.0) as f32
                        }
                    })
                    .collect();
                for (temperature, top_k, top_p) in [
                    (1.0, 0, 1.0),
                    (0.7, 0, 1.0),
                    (1.3, 20, 1.0),
                    (1.0, 0, 0.9),
                    (0.0, 0, 1.0),
                ] {
                    for step in 0..20 {
                        let key = RowKey {
                            sequence: case as u32,
                            step,
                        };
                        let p = SamplingParams {
                            temperature,
                            top_k,
                            top_p,
                            seed: 3,
                        };
                        let base = sample_row_baseline(&row, &key, &p);
                        let wide = sample_row(&row, &key, &p);
                        assert_eq!(base.token, wide.token, "V {vocab}, spread {spread}, {p:?}");
                        assert_eq!(base.logprob.to_bits(), wide.logprob.to_bits());
                    }
                }
            }
        }
    }
}
