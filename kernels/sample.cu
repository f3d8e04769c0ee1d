// Sampling with temperature, top-k and top-p by the Gumbel-max trick over the filtered set;
// Philox keyed by (seed; token, step, sequence) so the CPU twin draws the same numbers.
// Thresholds come from an 8-bit radix select on order-preserving float keys (by count for
// top-k, by probability mass for top-p). One block per row; only (token, log-prob over the
// kept set) leave the device. Mirrors cpu::sample.

// Largest key K such that the weight of {x : key(x) >= K, x >= floor} reaches `target`.
// by_mass = 0 counts elements, 1 sums exp(x/t - m).
__device__ u32 radix_select(const void* logits, int dtype, u64 base, u64 vocab, float floor_v, float t,
                            float m, int by_mass, float target) {
    __shared__ float hist[256];
    __shared__ u32 prefix_s;
    __shared__ float above_s;
    u32 prefix = 0, mask = 0;
    float above = 0.0f;
    for (int shift = 24; shift >= 0; shift -= 8) {
        for (int b = threadIdx.x; b < 256; b += BLOCK) hist[b] = 0.0f;
        __syncthreads();
        for (u64 i = threadIdx.x; i < vocab; i += BLOCK) {
            float x = load_logit(logits, base + i, dtype);
            if (x < floor_v || x == -INFINITY) continue;
            u32 k = float_key(x);
            if ((k & mask) != prefix) continue;
            atomicAdd(&hist[(k >> shift) & 0xffu], by_mass ? __expf(x / t - m) : 1.0f);
        }
        __syncthreads();
        if (threadIdx.x == 0) {
            int b = 255;
            for (; b > 0; --b) {
                if (above + hist[b] >= target) break;
                above += hist[b];
            }
            prefix_s = prefix | ((u32)b << shift);
            above_s = above;
        }
        __syncthreads();
        prefix = prefix_s;
        above = above_s;
        mask |= 0xffu << shift;
        __syncthreads();
    }
    return prefix;
}

extern "C" __global__ void sample_rows(const void* logits, int dtype, u64 vocab, const u32* sequences,
                                       const u32* steps, float temperature, int top_k, float top_p,
                                       u64 seed, u32* tokens, float* logprobs) {
    const u64 row = blockIdx.x, base = row * vocab;
    const int greedy = temperature <= 0.0f;
    const float t = greedy ? 1.0f : temperature;
    Stats s = {-INFINITY, 0.0f, 0.0f};
    float best = -INFINITY;
    u32 arg = 0xffffffffu;
    for (u64 i = threadIdx.x; i < vocab; i += BLOCK) {
        float x = load_logit(logits, base + i, dtype);
        s = stats_push(s, x / t);
        if (x > best) { best = x; arg = (u32)i; }
    }
    s = block_stats(s);
    if (!greedy) {
        float floor_v = -INFINITY;
        if (top_k > 0 && (u64)top_k < vocab)
            floor_v = key_float(radix_select(logits, dtype, base, vocab, -INFINITY, t, s.m, 0, (float)top_k));
        if (top_p < 1.0f) {
            float z = 0.0f;
            for (u64 i = threadIdx.x; i < vocab; i += BLOCK) {
                float x = load_logit(logits, base + i, dtype);
                if (x >= floor_v && x != -INFINITY) z += __expf(x / t - s.m);
            }
            z = block_sum(z);
            float p_floor = key_float(radix_select(logits, dtype, base, vocab, floor_v, t, s.m, 1, top_p * z));
            floor_v = fmaxf(floor_v, p_floor);
        }
        best = -INFINITY;
        arg = 0xffffffffu;
        float kept = 0.0f;
        for (u64 i = threadIdx.x; i < vocab; i += BLOCK) {
            float x = load_logit(logits, base + i, dtype);
            if (x < floor_v || x == -INFINITY) continue;
            kept += __expf(x / t - s.m);
            float u = token_uniform(seed, sequences[row], steps[row], (u32)i);
            float score = x / t - logf(-logf(u));
            if (score > best) { best = score; arg = (u32)i; }
        }
        // The log-prob is under the distribution drawn from: renormalised over the kept set
        // when top-k / top-p cut the row.
        kept = block_sum(kept);
        if (floor_v != -INFINITY) s.s = kept;
    }
    block_argmax(best, arg);
    if (threadIdx.x == 0) {
        tokens[row] = arg;
        logprobs[row] = load_logit(logits, base + arg, dtype) / t - (s.m + logf(s.s));
    }
}

// Sets logits[r, ids[j]] to -inf for every row r (tokens that must never be drawn, such as the
// image placeholders); one thread per (row, id). Ids outside the vocabulary are ignored.
extern "C" __global__ void mask_tokens(void* logits, int dtype, u64 vocab, u32 rows, const u32* ids, u32 n) {
    const u64 i = (u64)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= (u64)rows * n) return;
    const u32 id = ids[i % n];
    if ((u64)id >= vocab) return;
    const u64 at = (i / n) * vocab + id;
    if (dtype == 0) ((float*)logits)[at] = -INFINITY;
    else ((unsigned short*)logits)[at] = dtype == 1 ? 0xFC00u : 0xFF80u;  // f16 / bf16 -inf
}
