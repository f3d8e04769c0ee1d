// Shared device helpers: dtype loads, Philox4x32-10 (identical to src/kernels/philox.rs),
// and block reductions. Concatenated before each kernel source at NVRTC compile time.

typedef unsigned int u32;
typedef unsigned long long u64;

#ifndef INFINITY
#define INFINITY __int_as_float(0x7f800000)
#endif

#define BLOCK 256
#define WARPS (BLOCK / 32)

__device__ __forceinline__ float load_f32(const void* p, u64 i) { return ((const float*)p)[i]; }
__device__ __forceinline__ float load_f16(const void* p, u64 i) {
    unsigned short h = ((const unsigned short*)p)[i];
    float f;
    asm("{ .reg .b16 t; mov.b16 t, %1; cvt.f32.f16 %0, t; }" : "=f"(f) : "h"(h));
    return f;
}
__device__ __forceinline__ float load_bf16(const void* p, u64 i) {
    return __uint_as_float(((u32)((const unsigned short*)p)[i]) << 16);
}
// dtype: 0 = f32, 1 = f16, 2 = bf16
__device__ __forceinline__ float load_logit(const void* p, u64 i, int dtype) {
    return dtype == 0 ? load_f32(p, i) : (dtype == 1 ? load_f16(p, i) : load_bf16(p, i));
}

__device__ __forceinline__ void philox4x32(u32 c[4], u32 k0, u32 k1) {
    for (int r = 0; r < 10; ++r) {
        u32 hi0 = __umulhi(0xD2511F53u, c[0]), lo0 = 0xD2511F53u * c[0];
        u32 hi1 = __umulhi(0xCD9E8D57u, c[2]), lo1 = 0xCD9E8D57u * c[2];
        u32 n0 = hi1 ^ c[1] ^ k0, n2 = hi0 ^ c[3] ^ k1;
        c[0] = n0; c[1] = lo1; c[2] = n2; c[3] = lo0;
        k0 += 0x9E3779B9u; k1 += 0xBB67AE85u;
    }
}
// Uniform in (0, 1): ((x >> 9) + 0.5) / 2^23, exact in f32, from word token % 4 of the block at
// counter (token / 4, step, sequence, "SSRL") — one block serves four consecutive tokens.
__device__ __forceinline__ float token_uniform(u64 seed, u32 sequence, u32 step, u32 token) {
    u32 c[4] = {token >> 2, step, sequence, 0x5353524Cu};
    philox4x32(c, (u32)seed, (u32)(seed >> 32));
    // Selects rather than c[token & 3], which would put c in local memory.
    const u32 w = (token & 2) ? ((token & 1) ? c[3] : c[2]) : ((token & 1) ? c[1] : c[0]);
    return ((float)(w >> 9) + 0.5f) * (1.0f / 8388608.0f);
}

// Online softmax state: max m, s = sum exp(x - m), t = sum exp(x - m) * (x - m). Keeping t
// relative to the max makes the entropy log(s) - t / s a sum of two non-negative terms, free
// of the cancellation that m + log(s) - E[x] suffers when logits are large.
struct Stats { float m, s, t; };
// Re-bases a state onto a larger max m2 (scaled by e = exp(m - m2)).
__device__ __forceinline__ float rebased_t(Stats a, float m2, float e) { return e * (a.t + (a.m - m2) * a.s); }
__device__ __forceinline__ Stats stats_merge(Stats a, Stats b) {
    if (b.m == -INFINITY) return a;
    if (a.m == -INFINITY) return b;
    float m = fmaxf(a.m, b.m);
    float ea = __expf(a.m - m), eb = __expf(b.m - m);
    Stats r = {m, a.s * ea + b.s * eb, rebased_t(a, m, ea) + rebased_t(b, m, eb)};
    return r;
}
__device__ __forceinline__ Stats stats_push(Stats a, float x) {
    if (x == -INFINITY) return a;
    if (a.m == -INFINITY) {
        Stats o = {x, 1.0f, 0.0f};
        return o;
    }
    if (x > a.m) {
        float r = __expf(a.m - x);
        Stats o = {x, a.s * r + 1.0f, rebased_t(a, x, r)};
        return o;
    }
    float d = x - a.m, e = __expf(d);
    Stats o = {a.m, a.s + e, a.t + e * d};
    return o;
}
__device__ Stats block_stats(Stats v) {
    __shared__ float sm[WARPS], ss[WARPS], st[WARPS];
    for (int o = 16; o > 0; o >>= 1) {
        Stats w = {__shfl_down_sync(0xffffffffu, v.m, o), __shfl_down_sync(0xffffffffu, v.s, o),
                   __shfl_down_sync(0xffffffffu, v.t, o)};
        v = stats_merge(v, w);
    }
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    if (lane == 0) { sm[warp] = v.m; ss[warp] = v.s; st[warp] = v.t; }
    __syncthreads();
    if (warp == 0) {
        Stats w = {-INFINITY, 0.0f, 0.0f};
        if (lane < WARPS) { w.m = sm[lane]; w.s = ss[lane]; w.t = st[lane]; }
        for (int o = 16; o > 0; o >>= 1) {
            Stats z = {__shfl_down_sync(0xffffffffu, w.m, o), __shfl_down_sync(0xffffffffu, w.s, o),
                       __shfl_down_sync(0xffffffffu, w.t, o)};
            w = stats_merge(w, z);
        }
        if (lane == 0) { sm[0] = w.m; ss[0] = w.s; st[0] = w.t; }
    }
    __syncthreads();
    Stats r = {sm[0], ss[0], st[0]};
    __syncthreads();
    return r;
}
__device__ float block_sum(float v) {
    __shared__ float sh[WARPS];
    for (int o = 16; o > 0; o >>= 1) v += __shfl_down_sync(0xffffffffu, v, o);
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    if (lane == 0) sh[warp] = v;
    __syncthreads();
    if (warp == 0) {
        v = lane < WARPS ? sh[lane] : 0.0f;
        for (int o = 16; o > 0; o >>= 1) v += __shfl_down_sync(0xffffffffu, v, o);
        if (lane == 0) sh[0] = v;
    }
    __syncthreads();
    float r = sh[0];
    __syncthreads();
    return r;
}
// Arg-max with the lowest index on ties.
__device__ void block_argmax(float& v, u32& i) {
    __shared__ float sv[WARPS];
    __shared__ u32 si[WARPS];
    for (int o = 16; o > 0; o >>= 1) {
        float w = __shfl_down_sync(0xffffffffu, v, o);
        u32 j = __shfl_down_sync(0xffffffffu, i, o);
        if (w > v || (w == v && j < i)) { v = w; i = j; }
    }
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    if (lane == 0) { sv[warp] = v; si[warp] = i; }
    __syncthreads();
    if (warp == 0) {
        v = lane < WARPS ? sv[lane] : -INFINITY;
        i = lane < WARPS ? si[lane] : 0xffffffffu;
        for (int o = 16; o > 0; o >>= 1) {
            float w = __shfl_down_sync(0xffffffffu, v, o);
            u32 j = __shfl_down_sync(0xffffffffu, i, o);
            if (w > v || (w == v && j < i)) { v = w; i = j; }
        }
        if (lane == 0) { sv[0] = v; si[0] = i; }
    }
    __syncthreads();
    v = sv[0]; i = si[0];
    __syncthreads();
}
// Order-preserving map of floats to unsigned keys.
__device__ __forceinline__ u32 float_key(float x) {
    u32 u = __float_as_uint(x);
    return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}
__device__ __forceinline__ float key_float(u32 k) {
    return __uint_as_float((k & 0x80000000u) ? (k & 0x7fffffffu) : ~k);
}
