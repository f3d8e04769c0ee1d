//! Qwen2.5-VL M-RoPE position ids: `[3, B, S]` (temporal, height, width) for prefill, one
//! `rope_delta` per sequence, and the decode positions that follow (transformers'
//! `get_rope_index`, as onnxruntime-genai computes it too).

/// Token ids and sizes, read from the model's `config.json` (never hard-coded).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RopeConfig {
    pub image_token_id: u32,
    pub video_token_id: u32,
    pub spatial_merge_size: u32,
    pub tokens_per_second: f32,
}

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum RopeError {
    #[error("shape: {0}")]
    Shape(String),
    #[error("sequence {seq}: more vision placeholder runs than grids given")]
    MissingGrid { seq: usize },
    #[error("sequence {seq}: a vision block needs {need} placeholder tokens, {have} follow")]
    ShortBlock {
        seq: usize,
        need: usize,
        have: usize,
    },
}

/// Prefill positions for a (left- or right-) padded batch.
///
/// `input_ids` and `attention_mask` are `[B, S]` row-major; `image_grids` / `video_grids` are
/// `[t, h, w]` in patches, consumed in order of appearance across the batch;
/// `second_per_grid` gives each video's seconds per temporal patch (1.0 when absent).
/// Returns `(position_ids [3·B·S], rope_deltas [B])`; pad positions are 0 and
/// `rope_delta = max position + 1 − non-pad tokens`.
pub fn rope_index(
    input_ids: &[u32],
    attention_mask: &[u8],
    batch: usize,
    image_grids: &[[u32; 3]],
    video_grids: &[[u32; 3]],
    second_per_grid: &[f32],
    cfg: &RopeConfig,
) -> Result<(Vec<i64>, Vec<i64>), RopeError> {
    if batch == 0 || input_ids.len() % batch != 0 || attention_mask.len() != input_ids.len() {
        return Err(RopeError::Shape(format!(
            "{} ids and {} mask values for a batch of {batch}",
            input_ids.len(),
            attention_mask.len()
        )));
    }
    let s = input_ids.len() / batch;
    let m = cfg.spatial_merge_size;
    let mut pos = vec![0i64; 3 * batch * s];
    let mut deltas = vec![0i64; batch];
    let (mut img, mut vid) = (
        image_grids.iter(),
        video_grids
            .iter()
            .zip(second_per_grid.iter().chain(std::iter::repeat(&1.0))),
    );
    for b in 0..batch {
        let cols: Vec<usize> = (0..s).filter(|&j| attention_mask[b * s + j] != 0).collect();
        let ids: Vec<u32> = cols.iter().map(|&j| input_ids[b * s + j]).collect();
        let mut out: Vec<[i64; 3]> = Vec::with_capacity(ids.len());
        let mut cur = 0i64;
        let mut i = 0;
        while i < ids.len() {
            let tok = ids[i];
            if tok == cfg.image_token_id || tok == cfg.video_token_id {
                let (grid, interval) = if tok == cfg.image_token_id {
                    (
                        *img.next().ok_or(RopeError::MissingGrid { seq: b })?,
                        1.0f32,
                    )
                } else {
                    let (g, sec) = vid.next().ok_or(RopeError::MissingGrid { seq: b })?;
                    (*g, cfg.tokens_per_second * sec)
                };
                let [t, h, w] = grid;
                let (lh, lw) = (h / m, w / m);
                let n = (t * lh * lw) as usize;
                if ids.len() - i < n {
                    return Err(RopeError::ShortBlock {
                        seq: b,
                        need: n,
                        have: ids.len() - i,
                    });
                }
                for ti in 0..t {
                    let tt = (ti as f32 * interval) as i64;
                    for hi in 0..lh {
                        for wi in 0..lw {
                            out.push([cur + tt, cur + i64::from(hi), cur + i64::from(wi)]);
                        }
                    }
                }
                cur += i64::from(h.max(w) / m);
                i += n;
            } else {
                out.push([cur; 3]);
                cur += 1;
                i += 1;
            }
        }
        let mut max = -1i64;
        for (k, &j) in cols.iter().enumerate() {
            for r in 0..3 {
                pos[(r * batch + b) * s + j] = out[k][r];
                max = max.max(out[k][r]);
            }
        }
        deltas[b] = max + 1 - ids.len() as i64;
    }
    Ok((pos, deltas))
}

/// The position of the next token of a sequence while decoding: all three rows equal
/// `(non-pad tokens already in the cache) + rope_delta`.
pub fn decode_position(tokens_in_cache: usize, rope_delta: i64) -> i64 {
    tokens_in_cache as i64 + rope_delta
}
