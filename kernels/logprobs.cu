// Temperature-scaled token log-probs and row entropy: one block per row, one pass over the
// row (online max / sum / weighted sum), no [rows, vocab] output. Mirrors cpu::token_logprobs.
extern "C" __global__ void token_logprobs(const void* logits, int dtype, u64 vocab, const int* targets,
                                          float temperature, float* logprob, float* entropy) {
    u64 row = blockIdx.x;
    int target = targets[row];
    if (target < 0) {
        if (threadIdx.x == 0) { logprob[row] = 0.0f; entropy[row] = 0.0f; }
        return;
    }
    const u64 base = row * vocab;
    Stats s = {-INFINITY, 0.0f, 0.0f};
    for (u64 i = threadIdx.x; i < vocab; i += BLOCK) s = stats_push(s, load_logit(logits, base + i, dtype) / temperature);
    s = block_stats(s);
    if (threadIdx.x == 0) {
        float lz = s.m + logf(s.s);
        logprob[row] = load_logit(logits, base + target, dtype) / temperature - lz;
        entropy[row] = lz - s.t / s.s;
    }
}
