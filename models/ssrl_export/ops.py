"""Autograd building blocks of the graphs: PEFT's LoRA branch, RMSNorm, activation recomputation,
the chunked vocabulary head and chunked attention."""
import torch
import torch.nn.functional as F

from . import settings


def lora_add(y, x, A, B, scale):
    """y + scale · (x Aᵀ) Bᵀ as PEFT computes it: the input in the adapter's type (fp32 factors in
    a half-precision model), the sum in the wider type, the result in y's."""
    d = F.linear(F.linear(x.to(A.dtype), A), B) * scale
    if d.dtype == y.dtype:
        return y + d
    return (y.to(d.dtype) + d).to(y.dtype)


def rms_norm(norm, x):
    """Qwen2RMSNorm as x / √(mean x² + ε) · w: with a division (transformers multiplies by rsqrt)
    ONNX Runtime fuses the six nodes into one SimplifiedLayerNormalization."""
    var = x.float().pow(2).mean(-1, keepdim=True)
    return norm.weight * (x.float() / torch.sqrt(var + norm.variance_epsilon)).to(x.dtype)


def layer_norm(norm, x):
    """`norm` (an nn.LayerNorm) on x; a half-precision x goes through fp32 and back, as torch
    computes a half-precision LayerNorm (fp32 statistics and affine, one rounding): the same
    values, and a backward that exports with consistent types (the half-precision
    decomposition divides an fp16 tensor by an fp32 scalar, which ONNX Runtime refuses to load)."""
    if x.dtype == torch.float32:
        return norm(x)
    return F.layer_norm(x.float(), norm.normalized_shape, norm.weight.float(),
                        None if norm.bias is None else norm.bias.float(), norm.eps).to(x.dtype)


class _Recompute(torch.autograd.Function):
    """Activation checkpointing that graph optimisers and schedulers cannot undo: the forward
    keeps only the block's inputs; the backward recomputes the block from them plus a zero taken
    from the gradient arriving at the block. That zero makes the recomputation (a) not the
    forward's values to a common-subexpression pass (onnxscript's, ONNX Runtime's), so the
    forward's intermediates die with the forward, and (b) wait for the backward pass to reach the
    block: ONNX Runtime runs a node as soon as its inputs exist, and a recomputation that needed
    only the block's inputs ran during the forward pass, its outputs alive until the backward."""

    @staticmethod
    def forward(ctx, fn, *args):
        ctx.fn = fn
        ctx.save_for_backward(*args)
        with torch.no_grad():
            return fn(*args)

    @staticmethod
    def backward(ctx, grad):
        args = ctx.saved_tensors
        zero = (grad.reshape(-1)[:1] * 0.0).sum()
        inputs = [(a + zero.to(a.dtype)).detach().requires_grad_(True) for a in args]
        with torch.enable_grad():
            out = ctx.fn(*inputs)
        grads = torch.autograd.grad(out, inputs, grad, allow_unused=True)
        return (None, *grads)


class _TargetLogProbs(torch.autograd.Function):
    """log softmax(logits / T) at the targets and the distributions' entropies, for [N, V]
    logits, keeping only the logits (and the N log-normalisers) for the backward pass, which
    rebuilds the softmax from them: grad logits = (onehot(target) − softmax) · g / T. Autograd of
    the plain expression keeps about six full-vocabulary tensors per position alive until the
    backward pass; this keeps one and makes two at a time."""

    @staticmethod
    def forward(ctx, logits, targets, temperature):
        m = logits.amax(-1, keepdim=True)
        e = torch.exp((logits - m) / temperature)
        total = e.sum(-1)
        lse = m.squeeze(-1) / temperature + torch.log(total)
        picked = torch.gather(logits, -1, targets.unsqueeze(-1)).squeeze(-1) / temperature
        # H = lse − Σ p·z with p = e / Σe, z = logits / T.
        entropy = lse - (e * logits).sum(-1) / (total * temperature)
        hit = (logits.argmax(-1) == targets).to(logits.dtype)
        ctx.save_for_backward(logits, targets, temperature, lse)
        ctx.mark_non_differentiable(entropy, hit)
        return picked - lse, entropy, hit

    @staticmethod
    def backward(ctx, g, _g_entropy, _g_hit):
        logits, targets, temperature, lse = ctx.saved_tensors
        p = torch.exp(logits / temperature - lse.unsqueeze(-1))
        grad = (-p * g.unsqueeze(-1)).scatter_add(-1, targets.unsqueeze(-1), g.unsqueeze(-1))
        return grad / temperature, None, None


def pad_chunks(x, k):
    """x [N, …] as [k, ⌈N/k⌉, …]: dimension 0 padded with zeros to a multiple of k, in k chunks."""
    n = (x.shape[0] + k - 1) // k
    pad = [0, 0] * (x.dim() - 1) + [0, n * k - x.shape[0]]
    return F.pad(x, pad).reshape(k, n, *x.shape[1:])


class _ChunkedHead(torch.autograd.Function):
    """log softmax(h·Wᵀ / T) at the targets and each distribution's entropy, for [N, D] hidden
    states and the [V, D] head, with no full [N, V] tensor: the positions go through the head in
    settings.HEAD_CHUNKS chunks, each chunk's logits reduced to its log-normalisers and entropies before
    the next chunk starts (each chunk's input carries a zero taken from the previous chunk's
    result, so ONNX Runtime cannot run the chunks' products side by side), and the backward pass
    rebuilds each chunk's softmax from h and the log-normalisers the same way:
    grad h = (g/T)·W[target] − (softmax · g/T) W. Only h and the N log-normalisers are kept."""

    @staticmethod
    def forward(ctx, h, weight, targets, temperature):
        K, N = settings.HEAD_CHUNKS, h.shape[0]
        hp, tp = pad_chunks(h, K), pad_chunks(targets, K)
        lse, ent, hits, link = [], [], [], None
        for k in range(K):
            hk = hp[k] if link is None else hp[k] + link
            z = (hk @ weight.t()).float() / temperature
            # (whether the target is the most likely token: the SFT graph's token accuracy)
            hits.append((z.argmax(-1) == tp[k]).to(z.dtype))
            m = z.amax(-1, keepdim=True)
            e = torch.exp(z - m)
            total = e.sum(-1)
            lk = m.squeeze(-1) + torch.log(total)
            # H = lse − Σ p·z with p = e / Σe.
            ent.append(lk - (e * z).sum(-1) / total)
            lse.append(lk)
            # From the entropy as well: ONNX Runtime runs a node whose result is wanted only
            # at the end (the entropies feed the statistics) as late as it can, keeping this
            # chunk's logits alive until then.
            link = ((lk[:1] + ent[-1][:1]) * 0.0).sum().to(h.dtype)
        lse = torch.cat(lse)[:N]
        entropy = torch.cat(ent)[:N]
        hit = torch.cat(hits)[:N]
        # (the target's logit rounded to h's type, as the products' logits are)
        picked = (h.float() * weight[targets].float()).sum(-1).to(h.dtype).float() / temperature
        ctx.save_for_backward(h, weight, targets, temperature, lse)
        ctx.mark_non_differentiable(entropy, hit)
        return picked - lse, entropy, hit

    @staticmethod
    def backward(ctx, g, _g_entropy, _g_hit):
        h, weight, targets, temperature, lse = ctx.saved_tensors
        K, N = settings.HEAD_CHUNKS, h.shape[0]
        gs = g / temperature
        hp, lp, gp = (pad_chunks(x, K) for x in (h, lse, gs))
        grads, link = [], (gs[:1] * 0.0).sum().to(h.dtype)
        for k in range(K):
            p = torch.exp(((hp[k] + link) @ weight.t()).float() / temperature - lp[k].unsqueeze(-1))
            dk = -(p * gp[k].unsqueeze(-1)).to(h.dtype) @ weight
            grads.append(dk)
            link = (dk.reshape(-1)[:1] * 0.0).sum()
        grad = torch.cat(grads)[:N] + gs.unsqueeze(-1).to(h.dtype) * weight[targets]
        return grad, None, None, None


class _ChunkedAttention(torch.autograd.Function):
    """Causal GQA attention softmax(q·kᵀ·scaling + mask) · v for the graphs without a cache (the
    log-prob and training graphs), with no [heads, S, S] tensor larger than a chunk of queries:
    the queries go through in settings.ATTENTION_CHUNKS chunks, one after another (each chunk's queries
    carry a zero from the previous chunk's output, so ONNX Runtime cannot run them side by side),
    each chunk's mask built from the positions and the padding mask. Only the output and the
    per-row log-normalisers are kept; the backward pass rebuilds each chunk's probabilities
    from them, as flash attention does: with D = rowsum(dO ⊙ O), dS = P ⊙ (dO·vᵀ − D),
    dq = dS·k·scaling, dk = dSᵀ·q·scaling, dv = Pᵀ·dO.

    q is [B, kv_heads, g, S, d] (the g query heads of a KV head together), k and v
    [B, kv_heads, T, d] with T = S, mask [B, T] (1: a token). Scores, softmax and the
    log-normalisers are fp32 whatever the inputs' type."""

    @staticmethod
    def _chunk_scores(qc, k, c, n, keep, scaling):
        """fp32 scores of the n queries of chunk c ([B, h, g, n, d]) against every key, masked."""
        B, h, g, _, d = qc.shape
        T = k.shape[2]
        s = torch.matmul(qc.reshape(B, h, g * n, d), k.transpose(2, 3)).float().view(B, h, g, n, T) * scaling
        q_pos = torch.arange(n) + c * n
        allowed = (torch.arange(T)[None, :] <= q_pos[:, None])[None] & keep  # [B, n, T]
        return s + torch.where(allowed, 0.0, torch.finfo(torch.float32).min)[:, None, None]

    @staticmethod
    def forward(ctx, q, k, v, mask, scaling):
        K, (B, h, g, S, d) = settings.ATTENTION_CHUNKS, q.shape
        qp = pad_chunks(q.transpose(0, 3), K)  # [K, n, h, g, B, d]
        n = qp.shape[1]
        keep = mask.bool()[:, None, :]
        outs, lses, link = [], [], None
        for c in range(K):
            qc = qp[c].transpose(0, 3)
            if link is not None:
                qc = qc + link
            s = _ChunkedAttention._chunk_scores(qc, k, c, n, keep, scaling)
            m = s.amax(-1, keepdim=True)
            e = torch.exp(s - m)
            total = e.sum(-1, keepdim=True)
            p = (e / total).to(v.dtype).reshape(B, h, g * n, -1)
            o = torch.matmul(p, v).view(B, h, g, n, d)
            outs.append(o)
            lses.append((m + torch.log(total)).squeeze(-1))
            link = (o.reshape(-1)[:1] * 0.0).sum()
        o = torch.cat(outs, 3)[:, :, :, :S]
        lse = torch.cat(lses, 3)[:, :, :, :S]
        ctx.save_for_backward(q, k, v, mask, o, lse)
        ctx.scaling = scaling
        return o

    @staticmethod
    def backward(ctx, do):
        q, k, v, mask, o, lse = ctx.saved_tensors
        scaling, K, (B, h, g, S, d) = ctx.scaling, settings.ATTENTION_CHUNKS, q.shape
        D = (do.float() * o.float()).sum(-1)  # [B, h, g, S]
        qp, dop = (pad_chunks(x.transpose(0, 3), K) for x in (q, do))
        lp, Dp = (pad_chunks(x.transpose(0, 3), K) for x in (lse, D))  # [K, n, h, g, B]
        n = qp.shape[1]
        keep = mask.bool()[:, None, :]
        dqs, dk, dv = [], None, None
        link = (do.reshape(-1)[:1] * 0.0).sum()
        for c in range(K):
            qc, doc = (x[c].transpose(0, 3) + link for x in (qp, dop))
            lc, Dc = (x[c].transpose(0, 3) for x in (lp, Dp))
            p = torch.exp(_ChunkedAttention._chunk_scores(qc, k, c, n, keep, scaling) - lc.unsqueeze(-1))
            dp = torch.matmul(doc.reshape(B, h, g * n, d), v.transpose(2, 3)).float().view(B, h, g, n, -1)
            ds = (p * (dp - Dc.unsqueeze(-1)) * scaling).to(q.dtype).reshape(B, h, g * n, -1)
            dqs.append(torch.matmul(ds, k).view(B, h, g, n, d))
            dkc = torch.matmul(ds.transpose(2, 3), qc.reshape(B, h, g * n, d))
            dvc = torch.matmul(p.to(v.dtype).reshape(B, h, g * n, -1).transpose(2, 3), doc.reshape(B, h, g * n, d))
            dk = dkc if dk is None else dk + dkc
            dv = dvc if dv is None else dv + dvc
            # From all three products: one that the chain did not wait for would run when its
            # sum is wanted, after the last chunk, keeping every chunk's probabilities alive.
            link = ((dqs[-1].reshape(-1)[:1] + dk.reshape(-1)[:1] + dv.reshape(-1)[:1]) * 0.0).sum()
        return torch.cat(dqs, 3)[:, :, :, :S], dk, dv, None, None
