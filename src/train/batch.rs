//! Training rows: prompt + completion sequences laid out for `train.onnx` / `logprobs.onnx`.
//!
//! Row r of a micro-batch is `[left pad | prompt | completion | right pad]` with every prompt
//! ending at column P − 1 (P = longest prompt), so completion token j of every row is predicted
//! at column P − 1 + j. The graphs see the first P + C − 1 tokens (C = longest completion): the
//! last token is only ever a target. `target_ids[t]` is the token at t + 1.

use crate::model::rope::{rope_index, RopeConfig, RopeError};

/// One sequence: its prompt (placeholders expanded), sampled completion and the prompt's images.
#[derive(Debug, Clone, Copy)]
pub struct Row<'a> {
    pub prompt: &'a [u32],
    pub completion: &'a [u32],
    pub grids: &'a [[u32; 3]],
    /// `[image tokens, out_hidden_size]` flattened.
    pub features: &'a [f32],
    /// A DeepStack package's `[K, image tokens, out_hidden_size]` (empty otherwise).
    pub deepstack: &'a [f32],
}

#[derive(Debug, Clone, PartialEq)]
pub struct MicroBatch {
    pub rows: usize,
    /// Columns fed to the graphs.
    pub len: usize,
    /// Column of the first completion token's prediction (P − 1).
    pub first: usize,
    /// Completion tokens per row.
    pub completion_len: Vec<usize>,
    pub ids: Vec<i64>,
    pub attention_mask: Vec<i64>,
    /// `[3, rows, len]` (M-RoPE: temporal, height, width).
    pub position_ids: Vec<i64>,
    /// Columns of the per-token tensors (`target_ids`, `completion_mask`, log-probs): `len`, or
    /// `len − first` once [`MicroBatch::completion_columns`] narrowed them to the completion.
    pub cols: usize,
    /// Column of the first completion prediction within them (`first`, or 0 once narrowed).
    pub at: usize,
    /// `[rows, cols]`.
    pub target_ids: Vec<i64>,
    pub completion_mask: Vec<f32>,
    /// Image features of all rows, in row order.
    pub features: Vec<f32>,
    /// Each row's share of `features` (values, not tokens).
    pub row_features: Vec<usize>,
    /// DeepStack features `[K, all rows' image tokens, D]`: layer by layer, the rows in order
    /// (empty without DeepStack).
    pub deepstack: Vec<f32>,
}

impl MicroBatch {
    /// The completion tokens' values of a `[rows, cols]` output (log-probs), row by row.
    pub fn completion_values(&self, per_column: &[f32]) -> Vec<Vec<f32>> {
        (0..self.rows)
            .map(|r| {
                let start = r * self.cols + self.at;
                per_column[start..start + self.completion_len[r]].to_vec()
            })
            .collect()
    }

    /// Lays per-token values (one list per row, completion order) out as `[rows, cols]`, zero
    /// elsewhere.
    pub fn scatter(&self, values: &[&[f32]]) -> Vec<f32> {
        let mut out = vec![0f32; self.rows * self.cols];
        for (r, v) in values.iter().enumerate() {
            let start = r * self.cols + self.at;
            out[start..start + v.len()].copy_from_slice(v);
        }
        out
    }

    /// Narrows the per-token tensors to the completion's columns — the last `len − first` of
    /// every row, where the graphs of a package whose `train.positions` is `completion` take
    /// their targets and give their log-probs (the prompt never reaches the vocabulary
    /// projection there).
    pub fn completion_columns(&mut self) {
        if self.at == 0 {
            return;
        }
        let (len, first) = (self.len, self.first);
        self.target_ids = completion_part(&self.target_ids, len, first);
        self.completion_mask = completion_part(&self.completion_mask, len, first);
        self.cols = len - first;
        self.at = 0;
    }

    pub fn tokens(&self) -> usize {
        self.completion_len.iter().sum()
    }

    /// The positions (flat, in `ids`) of image or video placeholder ids (`placeholders`) that
    /// a completion sampled: the model's own tokens there, not images. The embedding graph
    /// gives the features to the placeholders in row-major order, so such a token in an
    /// earlier row would take a later row's image features; the trainer embeds these
    /// positions apart ([`MicroBatch::embedding_ids`]).
    pub fn sampled_placeholders(&self, placeholders: [i64; 2]) -> Vec<usize> {
        (0..self.ids.len())
            .filter(|&pos| pos % self.len > self.first && placeholders.contains(&self.ids[pos]))
            .collect()
    }

    /// `ids` with the sampled placeholders (`at`, from [`MicroBatch::sampled_placeholders`])
    /// replaced by `pad`, so that the embedding graph gives the image features to the prompts'
    /// placeholders only.
    pub fn embedding_ids(&self, at: &[usize], pad: i64) -> Vec<i64> {
        let mut ids = self.ids.clone();
        for &pos in at {
            ids[pos] = pad;
        }
        ids
    }

    /// The positions that take image features (and DeepStack features): the prompts'
    /// placeholders, as `[rows, len]` 0 / 1 (the decoder's and training graphs' `visual_mask`).
    pub fn visual_mask(&self, placeholders: [i64; 2]) -> Vec<i64> {
        (0..self.ids.len())
            .map(|pos| i64::from(self.prompt_placeholder(pos, placeholders)))
            .collect()
    }

    /// Whether flat position `pos` holds one of the `placeholders` within its row's prompt
    /// (the completion's columns are those after `first`).
    fn prompt_placeholder(&self, pos: usize, placeholders: [i64; 2]) -> bool {
        pos % self.len <= self.first && placeholders.contains(&self.ids[pos])
    }

    /// The rows of a per-position `[rows, len, hidden]` tensor (the loss's gradient at the
    /// input embeddings) where the embedding graph put the image features: the prompts'
    /// placeholder positions (`placeholders`: the image and video token ids) in row-major
    /// order, as many as there are features — `[feature rows, hidden]`, in the features' order.
    pub fn feature_rows(
        &self,
        per_position: &[f32],
        hidden: usize,
        placeholders: [i64; 2],
    ) -> Vec<f32> {
        let n = self.features.len() / hidden.max(1);
        let mut out = Vec::with_capacity(n * hidden);
        for pos in 0..self.ids.len() {
            if out.len() == n * hidden {
                break;
            }
            if self.prompt_placeholder(pos, placeholders) {
                out.extend_from_slice(&per_position[pos * hidden..(pos + 1) * hidden]);
            }
        }
        out
    }
}

/// The loss's gradient at a micro-batch's image features (`main`: `[tokens, d]`, the rows'
/// one after another) and at its DeepStack features (`deep`: `[k, tokens, d]`, layer by layer)
/// regrouped by row (`tokens`: each row's image tokens): each row's features' gradient, then
/// its `k` DeepStack layers' — `[1 + k, row tokens, d]` per row, the rows in order.
pub fn rows_with_deepstack(
    main: &[f32],
    deep: &[f32],
    k: usize,
    tokens: &[usize],
    d: usize,
) -> Vec<f32> {
    let all: usize = tokens.iter().sum();
    let mut out = Vec::with_capacity(main.len() + deep.len());
    let mut at = 0;
    for &n in tokens {
        out.extend_from_slice(&main[at * d..(at + n) * d]);
        for j in 0..k {
            let layer = j * all + at;
            out.extend_from_slice(&deep[layer * d..(layer + n) * d]);
        }
        at += n;
    }
    out
}

/// Columns `first..len` of every `len`-column row of `v`.
fn completion_part<T: Copy>(v: &[T], len: usize, first: usize) -> Vec<T> {
    v.chunks(len)
        .flat_map(|row| row[first..].iter().copied())
        .collect()
}

/// Builds one micro-batch. Every row needs at least one prompt and one completion token.
pub fn build(rows: &[Row<'_>], pad: u32, rope: &RopeConfig) -> Result<MicroBatch, RopeError> {
    let p = rows.iter().map(|r| r.prompt.len()).max().unwrap_or(0);
    let c = rows.iter().map(|r| r.completion.len()).max().unwrap_or(0);
    if rows.is_empty() || p == 0 || c == 0 || rows.iter().any(|r| r.completion.is_empty()) {
        return Err(RopeError::Shape(
            "a training row needs a prompt and at least one completion token".into(),
        ));
    }
    let len = p + c - 1;
    let n = rows.len();
    let mut ids = Vec::with_capacity(n * len);
    let mut ids_u32 = Vec::with_capacity(n * len);
    let mut mask = Vec::with_capacity(n * len);
    let mut target_ids = Vec::with_capacity(n * len);
    let mut completion_mask = Vec::with_capacity(n * len);
    let mut grids = Vec::new();
    let mut features = Vec::new();
    for r in rows {
        let left = p - r.prompt.len();
        let full: Vec<(u32, bool)> = std::iter::repeat_n((pad, false), left)
            .chain(r.prompt.iter().map(|&t| (t, true)))
            .chain(r.completion.iter().map(|&t| (t, true)))
            .chain(std::iter::repeat_n((pad, false), c - r.completion.len()))
            .collect();
        for t in 0..len {
            ids.push(i64::from(full[t].0));
            // A placeholder id a completion sampled is a text position (the sampler gave it
            // one), not the start of an image block.
            let sampled = t >= p && [rope.image_token_id, rope.video_token_id].contains(&full[t].0);
            ids_u32.push(if sampled { pad } else { full[t].0 });
            mask.push(i64::from(full[t].1));
            target_ids.push(i64::from(full[t + 1].0));
            let in_completion = t + 1 >= p && t + 1 < p + r.completion.len();
            completion_mask.push(if in_completion { 1.0 } else { 0.0 });
        }
        grids.extend_from_slice(r.grids);
        features.extend_from_slice(r.features);
    }
    // K DeepStack layers per image token: each row's [K, n, D] regrouped layer by layer.
    let k = rows
        .iter()
        .find(|r| !r.features.is_empty() && !r.deepstack.is_empty())
        .map_or(0, |r| r.deepstack.len() / r.features.len());
    let mut deepstack = Vec::with_capacity(k * features.len());
    for j in 0..k {
        for r in rows {
            let per = r.deepstack.len() / k;
            deepstack.extend_from_slice(&r.deepstack[j * per..(j + 1) * per]);
        }
    }
    let mask_u8: Vec<u8> = mask.iter().map(|&m| m as u8).collect();
    let (position_ids, _) = rope_index(&ids_u32, &mask_u8, n, &grids, &[], &[], rope)?;
    Ok(MicroBatch {
        rows: n,
        len,
        first: p - 1,
        completion_len: rows.iter().map(|r| r.completion.len()).collect(),
        ids,
        attention_mask: mask,
        position_ids,
        cols: len,
        at: p - 1,
        target_ids,
        completion_mask,
        features,
        row_features: rows.iter().map(|r| r.features.len()).collect(),
        deepstack,
    })
}

/// Splits rows (in order) into micro-batches of at most `max_rows` rows whose padded size —
/// rows × (longest prompt + longest completion − 1) — stays within `max_tokens` (0: no token
/// limit; a row longer than the limit goes alone). Like EasyR1's dynamic batching, this bounds
/// the memory of one graph call when prompts with many image tokens meet short ones.
pub fn split(rows: &[Row<'_>], max_rows: usize, max_tokens: usize) -> Vec<std::ops::Range<usize>> {
    let mut out = Vec::new();
    let (mut start, mut p, mut c) = (0usize, 0usize, 0usize);
    for (i, r) in rows.iter().enumerate() {
        let (np, nc) = (p.max(r.prompt.len()), c.max(r.completion.len()));
        let n = i - start + 1;
        let over_rows = n > max_rows.max(1);
        let over_tokens = max_tokens > 0 && n > 1 && n * (np + nc).saturating_sub(1) > max_tokens;
        if over_rows || over_tokens {
            out.push(start..i);
            start = i;
            p = r.prompt.len();
            c = r.completion.len();
        } else {
            p = np;
            c = nc;
        }
    }
    if start < rows.len() {
        out.push(start..rows.len());
    }
    out
}
