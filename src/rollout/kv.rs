//! The decoder's cache between steps: the rows' cache as ONNX Runtime returned it ([`Kv`]), a
//! shared-prefix decoder's prompt cache ([`Prefix`]), the buffer of the rows' own tokens that
//! the decoder reads in place ([`OwnBuf`]), and the row moves when rows finish — on the host,
//! or on the GPU through [`OnGpu`].

use super::float::{bytes, bytes_mut, float_of, Float};
use super::gpu::{gpu_err, OnGpu};
pub(super) use super::types::kv_name;
use super::types::EngineError;
use crate::model::package::{KvLayout, Manifest, OwnCache, TextSpec};
use ort::session::SessionInputValue;
use ort::value::DynTensor;

/// The decoder's cache between steps.
pub(super) struct Kv {
    /// Per layer and k/v: `[capacity, kv_heads, cap, head_dim]` as ONNX Runtime returned them
    /// (on the host, or on the GPU with [`OnGpu`]); rows `0..rows` are live and are fed back
    /// without a copy (a view of the leading rows once some have finished).
    pub(super) data: Vec<DynTensor>,
    pub(super) rows: usize,
    /// Positions in use.
    pub(super) len: usize,
    /// Positions the tensors hold: `len`, or more for a GroupQueryAttention decoder that writes
    /// each step's token into the past it reads ([`Kv::shares_present`]).
    pub(super) cap: usize,
    /// The values' type (the decoder's).
    pub(super) ty: Float,
}

impl Kv {
    /// `rows` rows with no tokens yet (empty host tensors of type `ty`).
    pub(super) fn empty(t: &TextSpec, rows: usize, ty: Float) -> Result<Kv, EngineError> {
        let data = (0..2 * t.num_hidden_layers)
            .map(|_| ty.zeros(&[rows, t.num_key_value_heads, 0, t.head_dim]))
            .collect::<Result<_, _>>()?;
        Ok(Kv {
            data,
            rows,
            len: 0,
            cap: 0,
            ty,
        })
    }

    /// Room left for the step: GroupQueryAttention's past and present are then one buffer
    /// (ONNX Runtime's share-buffer mode), written in place instead of copied into a new
    /// present. Only `Runner::generate` makes such caches (host, exactly `rows` rows).
    pub(super) fn shares_present(&self) -> bool {
        self.cap > self.len
    }
}

/// The prompts' cache of a shared-prefix decoder ([`KvLayout::Shared`]), read in place by their
/// samples every step.
pub(super) struct Prefix {
    /// The prefill's cache, one row per prompt: rows `0..cache.rows` have live samples
    /// (finished prompts leave like finished rows, `Runner::keep_rows`).
    pub(super) cache: Kv,
    /// Each prompt's padding mask (left-padded, `cache.len` wide).
    pub(super) mask: Vec<Vec<i64>>,
}

/// A row's newest own tokens stay in the decoder's `past` until there are this many; then they
/// move into the [`OwnBuf`] in one copy. So a step copies at most this many tokens per row
/// (`present` is past + new), however long the generation.
pub(super) const OWN_CHUNK: usize = 64;

/// The rows' older own tokens, for a decoder that reads them in place ([`OwnCache::InPlace`]):
/// per layer and k/v a buffer `[rows.., kv_heads, cap, head_dim]` (on the host, or on the GPU
/// with [`OnGpu`]) whose leading `rows` rows are fed as they are every step, with `own_mask`
/// marking the `len` slots written. The newest tokens (fewer than [`OWN_CHUNK`]) are the
/// decoder's `past`; a full chunk of them moves in at once. The buffer grows by about an eighth
/// when full (one copy of the live rows), so no step copies the tokens so far.
pub(super) struct OwnBuf {
    /// Empty until the first chunk comes.
    pub(super) data: Vec<DynTensor>,
    /// `[rows, cap]`: 1 for the written slots, every row alike (a host input: it changes only
    /// with a chunk).
    pub(super) mask: Vec<i64>,
    pub(super) rows: usize,
    pub(super) len: usize,
    pub(super) cap: usize,
    /// The most tokens a row will hold (the buffer never grows past it).
    limit: usize,
    tensors: usize,
    kvh: usize,
    hd: usize,
    ty: Float,
}

impl OwnBuf {
    pub(super) fn new(t: &TextSpec, rows: usize, limit: usize, ty: Float) -> OwnBuf {
        OwnBuf {
            data: Vec::new(),
            mask: Vec::new(),
            rows,
            len: 0,
            cap: 0,
            limit,
            tensors: 2 * t.num_hidden_layers,
            kvh: t.num_key_value_heads,
            hd: t.head_dim,
            ty,
        }
    }

    /// Slots for `n` tokens: an eighth more (whole chunks), within the limit.
    fn capacity_for(n: usize, limit: usize) -> usize {
        (n + n / 8 / OWN_CHUNK * OWN_CHUNK).min(limit).max(n)
    }

    /// Moves the tokens of `past` (per layer and k/v `[rows.., kv_heads, n, head_dim]`, its
    /// leading `self.rows` rows live; on the GPU where `gpu` is given) into slots
    /// `len..len + n`, growing the buffers first when they are short.
    pub(super) fn absorb(&mut self, past: &mut Kv, gpu: Option<&OnGpu>) -> Result<(), EngineError> {
        let n = past.len;
        if self.len + n > self.cap {
            self.grow(self.len + n, gpu)?;
        }
        let (kvh, hd, cap, len) = (self.kvh, self.hd, self.cap, self.len);
        let blocks = self.rows * kvh;
        for (buf, v) in self.data.iter_mut().zip(past.data.iter_mut()) {
            match gpu {
                None => {
                    // Bytes: hd values of the cache's type per position.
                    let (src, dst) = (bytes(v)?, bytes_mut(buf)?);
                    let e = self.ty.bytes();
                    for (rh, s) in src.chunks_exact(n * hd * e).take(blocks).enumerate() {
                        let at = (rh * cap + len) * hd * e;
                        dst[at..at + n * hd * e].copy_from_slice(s);
                    }
                }
                Some(g) => {
                    let (dst, src) = (buf.data_ptr_mut() as u64, v.data_ptr_mut() as u64);
                    // SAFETY: `blocks` blocks of n·hd values from `past` (live rows of its
                    // buffer) into slots len..len + n of each block of this buffer (len + n ≤
                    // cap, checked above); two distinct GPU buffers.
                    unsafe {
                        g.cuda.copy_device_2d(
                            dst + (len * hd * 4) as u64,
                            cap * hd * 4,
                            src,
                            n * hd * 4,
                            n * hd * 4,
                            blocks,
                        )
                    }
                    .map_err(gpu_err)?;
                }
            }
        }
        if let Some(g) = gpu {
            // `past` is dropped by the caller.
            g.cuda.synchronize_all().map_err(gpu_err)?;
        }
        for r in 0..self.rows {
            self.mask[r * cap + len..r * cap + len + n].fill(1);
        }
        self.len += n;
        Ok(())
    }

    /// Moves the live rows into buffers with room for `n` tokens (the new slots zero: the
    /// decoder weighs them by zero, and zero times a stray NaN would not be zero).
    fn grow(&mut self, n: usize, gpu: Option<&OnGpu>) -> Result<(), EngineError> {
        let (old, len) = (self.cap, self.len);
        let cap = OwnBuf::capacity_for(n, self.limit.max(n));
        let shape = [self.rows, self.kvh, cap, self.hd];
        let next = (0..self.tensors)
            .map(|i| widened_tensor(self.data.get_mut(i), shape, old, len, self.ty, gpu))
            .collect::<Result<Vec<_>, _>>()?;
        if let Some(g) = gpu {
            // The old buffers are dropped below.
            g.cuda.synchronize_all().map_err(gpu_err)?;
        }
        self.data = next;
        self.mask = (0..self.rows * cap)
            .map(|j| i64::from(j % cap < len))
            .collect();
        self.cap = cap;
        Ok(())
    }

    /// Applies [`compaction`]'s moves: rows `from` into the freed rows `to`. (Every row of
    /// the mask is the same — all rows hold `len` tokens — so the mask stays as it is.)
    pub(super) fn keep(
        &mut self,
        moves: &[(usize, usize)],
        rows: usize,
        gpu: Option<&OnGpu>,
    ) -> Result<(), EngineError> {
        move_rows(&mut self.data, self.kvh * self.cap * self.hd, moves, gpu)?;
        self.rows = rows;
        Ok(())
    }
}

/// Into `out` (blocks of `to` values, zero), `blocks` blocks of `from` values each (`src`),
/// each keeping its first `used` values: a cache's rows given room for more positions.
fn widen_into<V: Copy>(
    out: &mut [V],
    src: &[V],
    blocks: usize,
    from: usize,
    to: usize,
    used: usize,
) {
    for b in 0..blocks {
        out[b * to..b * to + used].copy_from_slice(&src[b * from..b * from + used]);
    }
}

/// A new cache tensor of `shape` (`[rows, kv_heads, cap, head_dim]`, values of type `ty`)
/// holding, in each block of `cap` positions, the first `len` positions of the same block of
/// `prev` (blocks of `old` positions; `None`: nothing yet), the rest zero: on the host, or on
/// the GPU with `gpu`, where the copy is queued on the stream (synchronise before `prev` is
/// dropped).
pub(super) fn widened_tensor(
    prev: Option<&mut DynTensor>,
    shape: [usize; 4],
    old: usize,
    len: usize,
    ty: Float,
    gpu: Option<&OnGpu>,
) -> Result<DynTensor, EngineError> {
    let [rows, kvh, cap, hd] = shape;
    let blocks = rows * kvh;
    let Some(g) = gpu else {
        let mut t = ty.zeros(&shape)?;
        if let Some(p) = prev {
            let e = ty.bytes();
            let (src, dst) = (bytes(p)?, bytes_mut(&mut t)?);
            widen_into(dst, src, blocks, old * hd * e, cap * hd * e, len * hd * e);
        }
        return Ok(t);
    };
    let mut t = g.tensor_of(&shape, ty)?;
    let dst = t.data_ptr_mut() as u64;
    let e = ty.bytes();
    // SAFETY: the whole of the new buffer; then the used positions of the first `blocks` blocks
    // of the old one (`old` ≥ len positions each) into the first `len` positions of each new
    // block; two distinct GPU buffers.
    unsafe { g.cuda.zero_device(dst, blocks * cap * hd * e) }.map_err(gpu_err)?;
    if let Some(p) = prev {
        let src = p.data_ptr_mut() as u64;
        let copy = unsafe {
            g.cuda
                .copy_device_2d(dst, cap * hd * e, src, old * hd * e, len * hd * e, blocks)
        };
        copy.map_err(gpu_err)?;
    }
    Ok(t)
}

/// Applies row moves `(to, from)` to every tensor of `data` (rows of `row` values): on the host,
/// or on the GPU with `gpu` (synchronised after).
pub(super) fn move_rows(
    data: &mut [DynTensor],
    row: usize,
    moves: &[(usize, usize)],
    gpu: Option<&OnGpu>,
) -> Result<(), EngineError> {
    for v in data {
        let row = row * float_of(v, "decoder")?.bytes();
        match gpu {
            None => {
                let d = bytes_mut(v)?;
                for &(to, from) in moves {
                    d.copy_within(from * row..(from + 1) * row, to * row);
                }
            }
            Some(g) => {
                let base = v.data_ptr_mut() as u64;
                // SAFETY: both rows of each move are rows of the buffer, and distinct.
                unsafe { g.copy_rows(base, base, row, moves.iter().copied()) }?;
            }
        }
    }
    if let Some(g) = gpu {
        g.cuda.synchronize_all().map_err(gpu_err)?;
    }
    Ok(())
}

/// Whether the rows' own tokens can stay where the decoder reads them on `provider`: with a
/// buffer the decoder reads in place ([`OwnCache::InPlace`]; CPU, or CUDA, where the buffer is on
/// the GPU with the rest of the cache, or on the host with
/// [`super::Engine::set_host_cache`]), or with GroupQueryAttention writing each token into the
/// past it reads ([`KvLayout::Packed`], CPU only: its share-buffer mode needs past and present
/// to be one buffer ONNX Runtime is given). Not on TensorRT, whose profiles cover the buffer's
/// empty default only.
pub(super) fn own_cache_in_place(m: &Manifest, provider: &str) -> bool {
    match m.kv_layout {
        KvLayout::Shared => {
            m.own_cache == OwnCache::InPlace
                && (provider.starts_with("cpu") || provider.starts_with("cuda"))
        }
        KvLayout::Packed => provider.starts_with("cpu"),
        KvLayout::Append => false,
    }
}

/// Positions for `n` tokens in a cache that grows: an eighth more, in steps of 64, within
/// `limit`.
pub(super) fn room_for(n: usize, limit: usize) -> usize {
    (n + n / 8).next_multiple_of(64).min(limit).max(n)
}

/// How the live rows `keep` (ascending) of `rows` stay where they are: rows from beyond the new
/// end move into the gaps, `(to, from)` each. Also returns, for each new row, the old row it
/// holds.
pub(super) fn compaction(rows: usize, keep: &[usize]) -> (Vec<usize>, Vec<(usize, usize)>) {
    let n = keep.len();
    let mut kept = vec![false; rows];
    for &k in keep {
        kept[k] = true;
    }
    let moves: Vec<(usize, usize)> = (0..n)
        .filter(|&p| !kept[p])
        .zip(keep.iter().copied().filter(|&k| k >= n))
        .collect();
    let mut order: Vec<usize> = (0..n).collect();
    for &(to, from) in &moves {
        order[to] = from;
    }
    (order, moves)
}

/// The decoder's slot tables for rows on `prompts` prompts (`row_prompt[r]`: row r's prompt):
/// `slot_rows` `[prompts · Gs]` (slot j of prompt p is served by row `slot_rows[p·Gs + j]`; free
/// slots name row 0) and `row_slots` `[rows]`, with Gs the most rows on one prompt.
pub(super) fn slot_tables(row_prompt: &[usize], prompts: usize) -> (Vec<i64>, Vec<i64>) {
    let mut count = vec![0usize; prompts];
    for &p in row_prompt {
        count[p] += 1;
    }
    let gs = count.iter().copied().max().unwrap_or(0).max(1);
    let mut slot_rows = vec![0i64; prompts * gs];
    let mut row_slots = vec![0i64; row_prompt.len()];
    count.fill(0);
    for (r, &p) in row_prompt.iter().enumerate() {
        let slot = p * gs + count[p];
        count[p] += 1;
        slot_rows[slot] = r as i64;
        row_slots[r] = slot as i64;
    }
    (slot_rows, row_slots)
}

/// The leading `shape[0]` rows of `v` (`[capacity, ..shape[1..]]`, contiguous) as an input fed in
/// place: `v` itself when it has no more rows.
pub(super) fn leading_rows<'a>(
    v: &'a mut DynTensor,
    shape: [usize; 4],
) -> Result<SessionInputValue<'a>, EngineError> {
    if v.shape()[0] as usize == shape[0] {
        return Ok(SessionInputValue::from(&*v));
    }
    let (info, ty) = (v.memory_info().to_owned(), float_of(v, "decoder")?);
    // SAFETY: the shape's elements ≤ the buffer's (same trailing dimensions and type, fewer
    // rows), and the view borrows `v` mutably for its lifetime, so `v` is neither dropped nor
    // written meanwhile.
    unsafe { ty.view(info, v.data_ptr_mut(), &shape) }
}

/// Rows `src` of `d` (rows of `row` values), in that order; a row may repeat.
pub(super) fn gather_host(d: &[f32], row: usize, src: &[usize]) -> Vec<f32> {
    let mut out = Vec::with_capacity(src.len() * row);
    for &r in src {
        out.extend_from_slice(&d[r * row..(r + 1) * row]);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Each block keeps its used values at its start, zeros after; the unused tail of the old
    /// blocks is left behind.
    #[test]
    fn widened_blocks_keep_their_used_values() {
        let src = [1.0, 2.0, 9.0, 3.0, 4.0, 9.0];
        let mut out = [0.0; 8];
        widen_into(&mut out, &src, 2, 3, 4, 2);
        assert_eq!(out, [1.0, 2.0, 0.0, 0.0, 3.0, 4.0, 0.0, 0.0]);
        // Host tensors of each type, moved as bytes: [1, 2 heads, 3 → 4 positions, 1].
        for ty in [Float::F32, Float::F16, Float::Bf16] {
            let mut prev = ty.tensor("decoder", &[1, 2, 3, 1], src.to_vec()).unwrap();
            let t = widened_tensor(Some(&mut prev), [1, 2, 4, 1], 3, 2, ty, None).unwrap();
            let v = crate::rollout::float::values_f32(&t, "decoder").unwrap();
            assert_eq!(*v, [1.0, 2.0, 0.0, 0.0, 3.0, 4.0, 0.0, 0.0], "{ty:?}");
            let empty = widened_tensor(None, [1, 3, 2, 1], 0, 0, ty, None).unwrap();
            assert_eq!(float_of(&empty, "decoder").unwrap(), ty);
            assert!(bytes(&empty).unwrap().iter().all(|&b| b == 0));
        }
    }

    /// Room grows by an eighth in steps of 64, never past the limit nor short of the need.
    #[test]
    fn room_grows_by_an_eighth_within_the_limit() {
        assert_eq!(room_for(1, 1000), 64);
        assert_eq!(room_for(64, 1000), 128);
        assert_eq!(room_for(600, 1000), 704);
        assert_eq!(room_for(600, 650), 650);
        assert_eq!(room_for(700, 650), 700);
    }

    /// Every row sits on one slot of its own prompt and that slot names it back; free slots name
    /// row 0; the slot width is the most rows on one prompt.
    #[test]
    fn slot_tables_map_rows_to_their_prompts() {
        let row_prompt = [2, 0, 2, 1, 2, 0];
        let (slot_rows, row_slots) = slot_tables(&row_prompt, 3);
        assert_eq!(slot_rows.len(), 3 * 3);
        for (r, &p) in row_prompt.iter().enumerate() {
            let slot = row_slots[r] as usize;
            assert_eq!(slot / 3, p, "row {r}");
            assert_eq!(slot_rows[slot], r as i64);
        }
        let used: std::collections::BTreeSet<i64> = row_slots.iter().copied().collect();
        assert_eq!(used.len(), row_prompt.len());
        assert_eq!(
            slot_rows[3 + 1],
            0,
            "prompt 1 has one row: its second slot is free"
        );
        assert_eq!(slot_tables(&[0, 1], 2), (vec![0, 1], vec![0, 1]));
    }
}
