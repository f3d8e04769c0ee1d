// Temperature-scaled token log-probs and row entropy in one pass over each row (online max /
// sum / weighted sum), no [rows, vocab] output. Mirrors cpu::token_logprobs.
//
// Two launches: `logprob_partials` gives each row `splits` blocks (grid = rows x splits) so a
// few rows still fill every SM; each block folds its slice of the row into one Stats. Then
// `logprob_finish` (one warp per row) merges the slices and reads the target logit.

template <int DT>
__device__ __forceinline__ float ld(const void* p, u64 i) {
    return DT == 0 ? load_f32(p, i) : (DT == 1 ? load_f16(p, i) : load_bf16(p, i));
}

// x / t exactly as the CPU twin divides (a reciprocal multiply differs by an ulp, which matters at
// t near 0); t == 1 skips the division.
template <bool SCALE>
__device__ __forceinline__ float scaled(float x, float t) { return SCALE ? x / t : x; }

// The 16-byte word `q` holds 4 f32 or 8 f16/bf16 logits; lane j of it goes to accumulator j % 4.
template <int DT, bool SCALE>
__device__ __forceinline__ void push_word(Stats acc[4], uint4 q, float t) {
    const u32 w[4] = {q.x, q.y, q.z, q.w};
    if (DT == 0) {
#pragma unroll
        for (int j = 0; j < 4; ++j) acc[j] = stats_push(acc[j], scaled<SCALE>(__uint_as_float(w[j]), t));
    } else {
#pragma unroll
        for (int j = 0; j < 4; ++j) {
            float lo, hi;
            if (DT == 1) {
                asm("{ .reg .b16 l, h; mov.b32 {l, h}, %2; cvt.f32.f16 %0, l; cvt.f32.f16 %1, h; }"
                    : "=f"(lo), "=f"(hi) : "r"(w[j]));
            } else {
                lo = __uint_as_float(w[j] << 16);
                hi = __uint_as_float(w[j] & 0xffff0000u);
            }
            acc[(2 * j) & 3] = stats_push(acc[(2 * j) & 3], scaled<SCALE>(lo, t));
            acc[(2 * j + 1) & 3] = stats_push(acc[(2 * j + 1) & 3], scaled<SCALE>(hi, t));
        }
    }
}

// One slice [lo, hi) of the flat logits. The aligned middle is read in 16-byte words, four per
// thread in flight, into four independent accumulators (enough bytes in flight to keep HBM
// busy); the unaligned ends, or everything when the buffer itself is not 16-byte aligned, one
// logit at a time.
template <int DT, bool SCALE>
__device__ Stats slice_stats(const void* logits, u64 lo, u64 hi, float t) {
    constexpr u64 PER = DT == 0 ? 4 : 8;
    Stats acc[4];
#pragma unroll
    for (int j = 0; j < 4; ++j) acc[j] = Stats{-INFINITY, 0.0f, 0.0f};
    u64 v0 = (lo + PER - 1) / PER, v1 = hi / PER;
    if (((unsigned long long)logits & 15) != 0 || v0 >= v1) v0 = v1 = (hi + PER - 1) / PER;
    const uint4* words = (const uint4*)logits;
    u64 v = v0 + threadIdx.x;
    for (; v + 3 * BLOCK < v1; v += 4 * BLOCK) {
        uint4 q0 = words[v], q1 = words[v + BLOCK], q2 = words[v + 2 * BLOCK], q3 = words[v + 3 * BLOCK];
        push_word<DT, SCALE>(acc, q0, t);
        push_word<DT, SCALE>(acc, q1, t);
        push_word<DT, SCALE>(acc, q2, t);
        push_word<DT, SCALE>(acc, q3, t);
    }
    for (; v < v1; v += BLOCK) push_word<DT, SCALE>(acc, words[v], t);
    for (u64 i = lo + threadIdx.x; i < min(hi, v0 * PER); i += BLOCK)
        acc[0] = stats_push(acc[0], scaled<SCALE>(ld<DT>(logits, i), t));
    for (u64 i = max(lo, v1 * PER) + threadIdx.x; i < hi; i += BLOCK)
        acc[1] = stats_push(acc[1], scaled<SCALE>(ld<DT>(logits, i), t));
    return stats_merge(stats_merge(acc[0], acc[1]), stats_merge(acc[2], acc[3]));
}

extern "C" __global__ void __launch_bounds__(BLOCK, 8) logprob_partials(const void* logits, int dtype, u64 vocab, const int* targets,
                                            float temperature, int splits, float* partial) {
    const u64 row = blockIdx.x, split = blockIdx.y;
    Stats s = {-INFINITY, 0.0f, 0.0f};
    if (targets[row] >= 0) {
        const u64 chunk = (vocab + splits - 1) / splits;
        const u64 lo = row * vocab + split * chunk;
        const u64 hi = row * vocab + min(vocab, (split + 1) * chunk);
        const float t = temperature;
        if (lo < hi && t == 1.0f) {
            if (dtype == 0) s = slice_stats<0, false>(logits, lo, hi, t);
            else if (dtype == 1) s = slice_stats<1, false>(logits, lo, hi, t);
            else s = slice_stats<2, false>(logits, lo, hi, t);
        } else if (lo < hi) {
            if (dtype == 0) s = slice_stats<0, true>(logits, lo, hi, t);
            else if (dtype == 1) s = slice_stats<1, true>(logits, lo, hi, t);
            else s = slice_stats<2, true>(logits, lo, hi, t);
        }
    }
    s = block_stats(s);
    if (threadIdx.x == 0) {
        float* o = partial + 3 * (row * splits + split);
        o[0] = s.m; o[1] = s.s; o[2] = s.t;
    }
}

// Launched with 32 threads per block, one block per row.
extern "C" __global__ void logprob_finish(const void* logits, int dtype, u64 vocab, const int* targets,
                                          float temperature, int splits, const float* partial,
                                          float* logprob, float* entropy) {
    const u64 row = blockIdx.x;
    const int target = targets[row];
    if (target < 0) {
        if (threadIdx.x == 0) { logprob[row] = 0.0f; entropy[row] = 0.0f; }
        return;
    }
    Stats s = {-INFINITY, 0.0f, 0.0f};
    for (int k = threadIdx.x; k < splits; k += 32) {
        const float* p = partial + 3 * (row * splits + k);
        Stats w = {p[0], p[1], p[2]};
        s = stats_merge(s, w);
    }
    for (int o = 16; o > 0; o >>= 1) {
        Stats w = {__shfl_down_sync(0xffffffffu, s.m, o), __shfl_down_sync(0xffffffffu, s.s, o),
                   __shfl_down_sync(0xffffffffu, s.t, o)};
        s = stats_merge(s, w);
    }
    if (threadIdx.x == 0) {
        const float lz = s.m + logf(s.s);
        logprob[row] = load_logit(logits, row * vocab + target, dtype) / temperature - lz;
        entropy[row] = logf(s.s) - s.t / s.s;
    }
}
