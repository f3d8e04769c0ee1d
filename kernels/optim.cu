// GRPO group advantages, global gradient norm, clipping and AdamW. Mirror the CPU twins.

// One thread per group of `group` consecutive scores: (s - mean) / (std_unbiased + eps), or
// s - mean when scale == 0.
extern "C" __global__ void group_advantages(const float* scores, u64 groups, int group, int scale, float eps,
                                            float* out) {
    u64 g = (u64)blockIdx.x * blockDim.x + threadIdx.x;
    if (g >= groups) return;
    const float* s = scores + g * group;
    double mean = 0.0, var = 0.0;
    for (int i = 0; i < group; ++i) mean += s[i];
    mean /= group;
    for (int i = 0; i < group; ++i) var += (s[i] - mean) * (s[i] - mean);
    var /= (group - 1);
    double denom = scale ? sqrt(var) + (double)eps : 1.0;
    for (int i = 0; i < group; ++i) out[g * group + i] = (float)((s[i] - mean) / denom);
}

// Per-block partial sums of squares (f64); the host adds the partials.
extern "C" __global__ void sum_squares(const float* x, u64 n, double* partial) {
    __shared__ double sh[BLOCK];
    double v = 0.0;
    for (u64 i = (u64)blockIdx.x * BLOCK + threadIdx.x; i < n; i += (u64)gridDim.x * BLOCK) v += (double)x[i] * x[i];
    sh[threadIdx.x] = v;
    __syncthreads();
    for (int o = BLOCK / 2; o > 0; o >>= 1) {
        if (threadIdx.x < o) sh[threadIdx.x] += sh[threadIdx.x + o];
        __syncthreads();
    }
    if (threadIdx.x == 0) partial[blockIdx.x] = sh[0];
}

extern "C" __global__ void scale(float* x, u64 n, float c) {
    u64 i = (u64)blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) x[i] *= c;
}

// torch.optim.AdamW: decoupled decay, bias-corrected moments; bc1 = 1 - beta1^t, bc2 = 1 - beta2^t.
extern "C" __global__ void adamw(float* p, const float* g, float* m, float* v, u64 n, float lr, float beta1,
                                 float beta2, float eps, float wd, double bc1, double bc2) {
    u64 i = (u64)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    float gi = g[i];
    float pi = p[i] - lr * wd * p[i];
    float mi = beta1 * m[i] + (1.0f - beta1) * gi;
    float vi = beta2 * v[i] + (1.0f - beta2) * gi * gi;
    m[i] = mi;
    v[i] = vi;
    double mhat = (double)mi / bc1, vhat = (double)vi / bc2;
    p[i] = pi - (float)((double)lr * mhat / (sqrt(vhat) + (double)eps));
}
