//! One worker of the engine ([`Runner`]): a set of sessions and the decode loop on them —
//! vision, prefill, batched decode steps with per-sequence stop, the cache's rows kept, moved
//! and dropped (`kv.rs`), tokens drawn on the host or on the GPU.

use super::float::{bytes, bytes_mut, values_f32, Float};
use super::gpu::{gpu_err, OnGpu};
use super::kv::{
    compaction, gather_host, kv_name, leading_rows, move_rows, room_for, slot_tables,
    widened_tensor, Kv, OwnBuf, Prefix, OWN_CHUNK,
};
use super::request::{GenerationConfig, Prepared};
use super::share::length_groups;
use super::types::{input, run_err, Completion, EngineError, EngineStats, Finish, Trace};
use crate::kernels::{cpu, Logits, RowKey, Sampled, SamplingParams};
use crate::model::package::{is_vision_name, KvLayout, Manifest};
use crate::model::processor::{preprocess_into, PreprocessorConfig};
use crate::model::rope::rope_index;
use image::RgbImage;
use ort::session::{OutputSelector, RunOptions, Session, SessionInputValue};
use ort::value::{DynTensor, DynTensorValueType, Tensor, TensorElementType, TensorRef};
use std::time::Instant;

/// A LoRA tensor: name, shape and the value fed to the decoder.
pub(super) type LoraInput = (String, Vec<usize>, Tensor<f32>);

/// The sessions one worker runs, and its buffer for one image's pixel rows (kept, so that
/// every round does not fault fresh pages in for it).
pub(super) struct Graphs {
    vision: Session,
    embedding: Session,
    decoder: Session,
    pixels: Vec<f32>,
    floats: Floats,
}

impl Graphs {
    /// Ends profiling of the three sessions (see [`Engine::end_profiling`]); the files written.
    ///
    /// [`Engine::end_profiling`]: super::Engine::end_profiling
    pub(super) fn end_profiling(&mut self) -> Result<Vec<std::path::PathBuf>, EngineError> {
        [&mut self.vision, &mut self.embedding, &mut self.decoder]
            .into_iter()
            .map(|s| Ok(s.end_profiling().map_err(run_err("profile"))?.into()))
            .collect()
    }

    pub(super) fn new(vision: Session, embedding: Session, decoder: Session) -> Graphs {
        let floats = Floats {
            pixels: Float::of_input(&vision, "pixel_values"),
            features: Float::of_input(&embedding, "image_features"),
            embeds: Float::of_input(&decoder, "inputs_embeds"),
            cache: Float::of_input(&decoder, "past_key_values.0.key"),
        };
        Graphs {
            vision,
            embedding,
            decoder,
            pixels: Vec::new(),
            floats,
        }
    }
}

/// The floating-point types the graphs take: fp32 throughout for this project's packages; an
/// onnxruntime-genai folder's half-precision builds take fp16 or bf16. Outputs are read in
/// whatever type they come.
#[derive(Debug, Clone, Copy)]
struct Floats {
    pixels: Float,
    features: Float,
    embeds: Float,
    cache: Float,
}

/// One worker of the engine: its sessions and what every worker shares. The engine runs one on
/// its own sessions, or one per CPU slice on a thread each.
pub(super) struct Runner<'e> {
    pub(super) g: &'e mut Graphs,
    pub(super) m: &'e Manifest,
    pub(super) lora: &'e [LoraInput],
    pub(super) gpu: Option<&'e OnGpu>,
    /// The rows' own tokens stay where the decoder reads them: an [`OwnBuf`], or for
    /// GroupQueryAttention a past with room that is also the present (see
    /// [`Engine::set_own_cache`]).
    pub(super) own_in_place: bool,
    pub(super) stats: EngineStats,
    /// The next decoder call's DeepStack inputs (a prefill's: the features `[K, N, D]`, N,
    /// and the visual mask `[rows, cols]`); without them a package with DeepStack layers gets
    /// none (decode steps: no image tokens).
    pub(super) deepstack: Option<(Vec<f32>, usize, Vec<i64>)>,
}

/// The vision tower's outputs for one image: its features `[tokens, D]` and a DeepStack
/// package's `[K, tokens, D]` (empty for others).
pub(super) type VisionOut = (Vec<f32>, Vec<f32>);

/// One decoder step's logits at each row's last position: `[rows, vocab]`.
enum StepLogits {
    Host(HostLogits),
    /// ONNX Runtime's output buffer on the GPU, `[rows, 1, vocab]`.
    Gpu(DynTensor),
}

/// `[rows, vocab]` logits on the host: ONNX Runtime's own output where it is exactly that (this
/// project's packages return the last position only), else the rows' last positions copied out.
enum HostLogits {
    Output(DynTensor),
    Picked(Vec<f32>),
}

impl HostLogits {
    fn values(&mut self) -> Result<&mut [f32], EngineError> {
        match self {
            HostLogits::Output(t) => Ok(t
                .try_extract_tensor_mut::<f32>()
                .map_err(run_err("decoder"))?
                .1),
            HostLogits::Picked(v) => Ok(v),
        }
    }
}

/// The prompts as one padded batch: ids `[b, s]` row-major, each row's attention mask, and the
/// width `s` (the longest prompt). Left padding, except for decoders that keep each row's cache
/// packed from position 0 (GroupQueryAttention, `packed`): those get right padding and write
/// each new token at the row's own length.
fn padded_batch(prompts: &[Vec<u32>], pad: u32, packed: bool) -> (Vec<u32>, Vec<Vec<i64>>, usize) {
    let s = prompts.iter().map(Vec::len).max().unwrap_or(0);
    let mut ids = Vec::with_capacity(prompts.len() * s);
    let mut mask = Vec::with_capacity(prompts.len());
    for p in prompts {
        let n = s - p.len();
        let (pads, tokens) = (std::iter::repeat_n(pad, n), p.iter().copied());
        let (zeros, ones) = (std::iter::repeat_n(0, n), std::iter::repeat_n(1, p.len()));
        if packed {
            ids.extend(tokens.chain(pads));
            mask.push(ones.chain(zeros).collect());
        } else {
            ids.extend(pads.chain(tokens));
            mask.push(zeros.chain(ones).collect());
        }
    }
    (ids, mask, s)
}

/// The random stream of a sample's draw at a step: keyed by its request id and sample index
/// only, so a sample draws the same numbers in any batch, on any worker.
fn row_key(request_id: u64, sample: usize, step: usize) -> RowKey {
    RowKey {
        sequence: crate::rng::mix64(request_id.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ sample as u64)
            as u32,
        step: step as u32,
    }
}

/// A decode step's M-RoPE positions `[3, n]` for the `n` live rows (`active[k]`: row k's index
/// among all B·G, `seen[k]`: the tokens it holds): text positions, the same on all three axes,
/// shifted by the row's prompt's rope delta (`deltas`, one per prompt; G rows per prompt).
fn step_positions(active: &[usize], seen: &[usize], deltas: &[i64], g: usize) -> Vec<i64> {
    let n = active.len();
    let mut pos = vec![0i64; 3 * n];
    for (k, &i) in active.iter().enumerate() {
        let p = seen[k] as i64 + deltas[i / g];
        for r in 0..3 {
            pos[r * n + k] = p;
        }
    }
    pos
}

impl Runner<'_> {
    pub(super) fn embed(
        &mut self,
        ids: Vec<i64>,
        rows: usize,
        cols: usize,
        features: (Vec<f32>, usize),
    ) -> Result<Vec<f32>, EngineError> {
        let d = self.m.vision.out_hidden_size;
        let features =
            (self.g.floats.features).tensor("embedding", &[features.1, d], features.0)?;
        let inputs: Vec<(String, SessionInputValue<'static>)> = vec![
            ("input_ids".into(), input("embedding", &[rows, cols], ids)?),
            ("image_features".into(), features.into()),
        ];
        let t = Instant::now();
        let out = self.g.embedding.run(inputs).map_err(run_err("embedding"))?;
        self.stats.ort_s += t.elapsed().as_secs_f64();
        let e = values_f32(&out["inputs_embeds"], "embedding")?;
        Ok(e.into_owned())
    }

    /// Runs the decoder on the live rows of `kv`; returns the logits of column `last[r]` of each
    /// row `r` and the new cache. With the cache on the GPU the new cache stays there, and so do
    /// the logits of one-token steps.
    #[allow(clippy::too_many_arguments)]
    fn decode(
        &mut self,
        embeds: Vec<f32>,
        rows: usize,
        cols: usize,
        mask: &[Vec<i64>],
        pos: Vec<i64>,
        kv: &mut Kv,
        prefix: Option<(&mut Prefix, &[usize])>,
        own: Option<&mut OwnBuf>,
        last: &[usize],
    ) -> Result<(StepLogits, Kv), EngineError> {
        let t = &self.m.text;
        let (layers, hidden, vocab) = (t.num_hidden_layers, t.hidden_size, t.vocab_size);
        let (kvh, hd) = (t.num_key_value_heads, t.head_dim);
        let total = kv.len + cols;
        let flat_mask: Vec<i64> = mask.iter().flatten().copied().collect();
        let floats = self.g.floats;
        let mut inputs: Vec<(String, SessionInputValue<'_>)> = vec![
            (
                "inputs_embeds".into(),
                (floats.embeds)
                    .tensor("decoder", &[rows, cols, hidden], embeds)?
                    .into(),
            ),
            (
                "attention_mask".into(),
                input("decoder", &[rows, total], flat_mask)?,
            ),
            (
                "position_ids".into(),
                input("decoder", &[3, rows, cols], pos)?,
            ),
        ];
        let k = self.m.vision.deepstack_layers;
        if k > 0 {
            let d = self.m.vision.out_hidden_size;
            let (feats, n, vmask) = self
                .deepstack
                .take()
                .unwrap_or_else(|| (Vec::new(), 0, vec![0; rows * cols]));
            inputs.push((
                "deepstack_features".into(),
                (floats.embeds).tensor("decoder", &[k, n, d], feats)?.into(),
            ));
            inputs.push((
                "visual_mask".into(),
                input("decoder", &[rows, cols], vmask)?,
            ));
        }
        // A cache with room: each buffer is both the past fed and the present ONNX Runtime
        // writes (preallocated below), so the step only writes its token.
        let share = kv.shares_present();
        let mut shared_present = Vec::new();
        if share {
            for (i, mut v) in std::mem::take(&mut kv.data).into_iter().enumerate() {
                let info = v.memory_info().to_owned();
                // SAFETY: `v` is a host tensor of exactly this shape and type; it moves into
                // the run's preallocated outputs, which keep it alive until the run is over,
                // and ONNX Runtime's share-buffer mode reads and writes it as one buffer.
                let view = unsafe { kv.ty.view(info, v.data_ptr_mut(), &[rows, kvh, kv.cap, hd]) }?;
                inputs.push((kv_name("past_key_values", i), view));
                shared_present.push(v);
            }
        } else {
            for (i, v) in kv.data.iter_mut().enumerate() {
                let view = leading_rows(v, [kv.rows, kvh, kv.len, hd])?;
                inputs.push((kv_name("past_key_values", i), view));
            }
        }
        if let Some((p, row_prompt)) = prefix {
            let (prompts, len) = (p.cache.rows, p.cache.len);
            let (slot_rows, row_slots) = slot_tables(row_prompt, prompts);
            let mask: Vec<i64> = p.mask[..prompts].iter().flatten().copied().collect();
            inputs.push((
                "prefix_mask".into(),
                input("decoder", &[prompts, len], mask)?,
            ));
            inputs.push((
                "slot_rows".into(),
                input("decoder", &[slot_rows.len()], slot_rows)?,
            ));
            inputs.push((
                "row_slots".into(),
                input("decoder", &[row_slots.len()], row_slots)?,
            ));
            for (i, v) in p.cache.data.iter_mut().enumerate() {
                let view = leading_rows(v, [prompts, kvh, len, hd])?;
                inputs.push((kv_name("prefix_key_values", i), view));
            }
        }
        if let Some(o) = own {
            let (orows, cap) = (o.rows, o.cap);
            for (i, v) in o.data.iter_mut().enumerate() {
                let view = leading_rows(v, [orows, kvh, cap, hd])?;
                inputs.push((kv_name("own_key_values", i), view));
            }
            let mask = &o.mask[..o.rows * o.cap];
            let view =
                TensorRef::from_array_view(([o.rows, o.cap], mask)).map_err(run_err("decoder"))?;
            inputs.push(("own_mask".into(), view.into()));
        }
        inputs.extend(
            self.lora
                .iter()
                .filter(|(n, _, _)| !is_vision_name(n))
                .map(|(n, _, t)| (n.clone(), SessionInputValue::from(t))),
        );
        // On the GPU: the cache (and one-token logits) into GPU buffers; the rest to the host.
        let opts = match &self.gpu {
            None if share => {
                let mut sel = OutputSelector::default();
                for (i, v) in shared_present.into_iter().enumerate() {
                    sel = sel.preallocate(kv_name("present", i), v);
                }
                Some(
                    RunOptions::new()
                        .map_err(run_err("decoder"))?
                        .with_outputs(sel),
                )
            }
            None => None,
            Some(g) => {
                let mut sel = OutputSelector::default();
                for i in 0..2 * layers {
                    sel = sel.preallocate(
                        kv_name("present", i),
                        g.cache_tensor(&[rows, kvh, total, hd])?,
                    );
                }
                if cols == 1 || g.last_only {
                    sel = sel.preallocate("logits", g.tensor(&[rows, 1, vocab])?);
                }
                Some(
                    RunOptions::new()
                        .map_err(run_err("decoder"))?
                        .with_outputs(sel),
                )
            }
        };
        let t0 = Instant::now();
        let mut out = match &opts {
            None => self.g.decoder.run(inputs),
            Some(o) => self.g.decoder.run_with_options(inputs, o),
        }
        .map_err(run_err("decoder"))?;
        if let Some(g) = &self.gpu {
            g.cuda.synchronize_all().map_err(gpu_err)?;
        }
        self.stats.ort_s += t0.elapsed().as_secs_f64();
        let take = |out: &mut ort::session::SessionOutputs<'_>,
                    name: &str|
         -> Result<DynTensor, EngineError> {
            out.remove(name)
                .ok_or_else(|| EngineError::Run {
                    graph: "decoder",
                    msg: format!("no output {name}"),
                })?
                .downcast::<DynTensorValueType>()
                .map_err(run_err("decoder"))
        };
        let logits = if self.gpu.as_ref().is_some_and(|g| cols == 1 || g.last_only) {
            StepLogits::Gpu(take(&mut out, "logits")?)
        } else {
            let shape = out["logits"].shape().to_vec();
            // Packages from models/export.py return the last position only ([rows, 1, vocab]);
            // other decoders every position.
            let width = shape.get(1).copied().unwrap_or(1) as usize;
            for (r, &c) in last.iter().enumerate().take(rows) {
                if width != cols && !(width == 1 && c + 1 == cols) {
                    return Err(EngineError::Run {
                        graph: "decoder",
                        msg: format!(
                            "logits for {width} of {cols} positions, and row {r} ends at position {c}"
                        ),
                    });
                }
            }
            let f32_out = out["logits"].dtype().tensor_type() == Some(TensorElementType::Float32);
            if width == 1 && shape.first() == Some(&(rows as i64)) && f32_out {
                StepLogits::Host(HostLogits::Output(take(&mut out, "logits")?))
            } else {
                // Half-precision logits are widened here.
                let logits = values_f32(&out["logits"], "decoder")?;
                let mut picked = Vec::with_capacity(rows * vocab);
                for (r, &c) in last.iter().enumerate().take(rows) {
                    let c = if width == 1 { 0 } else { c };
                    let start = (r * width + c) * vocab;
                    picked.extend_from_slice(&logits[start..start + vocab]);
                }
                StepLogits::Host(HostLogits::Picked(picked))
            }
        };
        let mut data = Vec::with_capacity(2 * layers);
        for i in 0..2 * layers {
            data.push(take(&mut out, &kv_name("present", i))?);
        }
        Ok((
            logits,
            Kv {
                data,
                rows,
                len: total,
                cap: if share { kv.cap } else { total },
                ty: floats.cache,
            },
        ))
    }

    /// A new cache of the rows `src` of `kv` (in that order; a row may repeat, which fans
    /// prompts out to their samples).
    fn gather_rows(&mut self, kv: &mut Kv, src: &[usize]) -> Result<Kv, EngineError> {
        let t0 = Instant::now();
        let t = &self.m.text;
        let shape = [src.len(), t.num_key_value_heads, kv.cap, t.head_dim];
        let row = shape[1] * shape[2] * shape[3];
        let mut data = Vec::with_capacity(kv.data.len());
        for v in &mut kv.data {
            match &self.gpu {
                None => {
                    let mut t = kv.ty.zeros(&shape)?;
                    let (from, to) = (bytes(v)?, bytes_mut(&mut t)?);
                    // Rows of rb bytes (at least one: an empty cache has nothing to copy).
                    let rb = (row * kv.ty.bytes()).max(1);
                    for (dst, &r) in to.chunks_exact_mut(rb).zip(src) {
                        dst.copy_from_slice(&from[r * rb..(r + 1) * rb]);
                    }
                    data.push(t);
                }
                Some(g) => data.push(g.gather(v, &shape, src)?),
            }
        }
        if let Some(g) = &self.gpu {
            g.cuda.synchronize_all().map_err(gpu_err)?;
        }
        self.stats.cache_s += t0.elapsed().as_secs_f64();
        Ok(Kv {
            data,
            rows: src.len(),
            len: kv.len,
            cap: kv.cap,
            ty: kv.ty,
        })
    }

    /// Host cache `kv` moved into tensors of `cap` positions (the used ones copied).
    fn with_room(&mut self, kv: &mut Kv, cap: usize) -> Result<(), EngineError> {
        let t0 = Instant::now();
        let t = &self.m.text;
        let shape = [kv.rows, t.num_key_value_heads, cap, t.head_dim];
        for v in &mut kv.data {
            *v = widened_tensor(Some(v), shape, kv.cap, kv.len, kv.ty, None)?;
        }
        kv.cap = cap;
        self.stats.cache_s += t0.elapsed().as_secs_f64();
        Ok(())
    }

    /// Keeps the live rows `keep` (ascending) of `kv` in place: rows from beyond the new end
    /// move into the gaps, one row copy per finished row below it, and the buffers keep their
    /// size. Returns, for each new row, the old row it holds.
    fn keep_rows(&mut self, kv: &mut Kv, keep: &[usize]) -> Result<Vec<usize>, EngineError> {
        let t0 = Instant::now();
        let n = keep.len();
        let (order, moves) = compaction(kv.rows, keep);
        let t = &self.m.text;
        let row = t.num_key_value_heads * kv.cap * t.head_dim;
        move_rows(&mut kv.data, row, &moves, self.gpu)?;
        kv.rows = n;
        self.stats.cache_s += t0.elapsed().as_secs_f64();
        Ok(order)
    }

    /// Compacts the prompts of `p` that no row of `row_prompt` continues away (with
    /// [`Runner::keep_rows`], as rows) and renumbers `row_prompt` to match.
    fn drop_finished_prompts(
        &mut self,
        p: &mut Prefix,
        row_prompt: &mut [usize],
    ) -> Result<(), EngineError> {
        let prompts = p.cache.rows;
        let mut live = vec![false; prompts];
        for &q in row_prompt.iter() {
            live[q] = true;
        }
        if live.iter().all(|&l| l) {
            return Ok(());
        }
        let keep: Vec<usize> = (0..prompts).filter(|&q| live[q]).collect();
        let order = self.keep_rows(&mut p.cache, &keep)?;
        let mut now = vec![0; prompts];
        for (k, &o) in order.iter().enumerate() {
            now[o] = k;
            p.mask.swap(k, o);
        }
        for q in row_prompt.iter_mut() {
            *q = now[*q];
        }
        Ok(())
    }

    /// A step's logits on the host (`[rows, vocab]`), copied back from the GPU if there.
    fn host_logits(&self, l: StepLogits) -> Result<Vec<f32>, EngineError> {
        match (l, &self.gpu) {
            (StepLogits::Host(HostLogits::Picked(v)), _) => Ok(v),
            (StepLogits::Host(mut v), _) => Ok(v.values()?.to_vec()),
            (StepLogits::Gpu(mut t), Some(g)) => {
                let n = t.shape().iter().product::<i64>() as usize;
                let mut v = vec![0f32; n];
                // SAFETY: `t` holds n f32 values on this GPU.
                unsafe { g.cuda.read_device(t.data_ptr_mut() as u64, &mut v) }.map_err(gpu_err)?;
                Ok(v)
            }
            (StepLogits::Gpu(_), None) => unreachable!("GPU logits without a GPU cache"),
        }
    }

    /// Preprocesses `img` into the worker's image buffer, then runs the vision tower on it
    /// (see [`Runner::vision_features`]).
    pub(super) fn image_features(
        &mut self,
        img: &RgbImage,
        cfg: &PreprocessorConfig,
    ) -> Result<VisionOut, EngineError> {
        let t = Instant::now();
        let mut pixels = std::mem::take(&mut self.g.pixels);
        let grid = preprocess_into(img, cfg, &mut pixels);
        self.stats.preprocess_s += t.elapsed().as_secs_f64();
        let features = grid
            .map_err(EngineError::from)
            .and_then(|g| self.vision_features(&pixels, g, true));
        self.g.pixels = pixels;
        features
    }

    /// The vision tower on one preprocessed image (its pixel rows and patch grid), with the
    /// vision-tower LoRA (`lora`; without it, the base tower: the inputs' zero defaults):
    /// `[tokens, out_hidden_size]` flattened, and a DeepStack package's `[K, tokens,
    /// out_hidden_size]` (empty for others).
    pub(super) fn vision_features(
        &mut self,
        pixels: &[f32],
        grid: [u32; 3],
        lora: bool,
    ) -> Result<VisionOut, EngineError> {
        let rows = (grid[0] * grid[1] * grid[2]) as usize;
        let g: Vec<i64> = grid.iter().map(|v| i64::from(*v)).collect();
        let shape = [rows, pixels.len() / rows.max(1)];
        let pixels: SessionInputValue<'_> = match self.g.floats.pixels {
            Float::F32 => TensorRef::from_array_view((shape, pixels))
                .map_err(run_err("vision"))?
                .into(),
            half => half.tensor("vision", &shape, pixels.to_vec())?.into(),
        };
        let mut inputs: Vec<(String, SessionInputValue<'_>)> = vec![
            ("pixel_values".into(), pixels),
            ("image_grid_thw".into(), input("vision", &[1, 3], g)?),
        ];
        if lora {
            inputs.extend(
                self.lora
                    .iter()
                    .filter(|(n, _, _)| is_vision_name(n))
                    .map(|(n, _, t)| (n.clone(), SessionInputValue::from(t))),
            );
        }
        let t = Instant::now();
        let out = self.g.vision.run(inputs).map_err(run_err("vision"))?;
        let dt = t.elapsed().as_secs_f64();
        self.stats.ort_s += dt;
        self.stats.vision_s += dt;
        let deep = match self.m.vision.deepstack_layers {
            0 => Vec::new(),
            _ => values_f32(&out["deepstack_features"], "vision")?.into_owned(),
        };
        Ok((
            values_f32(&out["image_features"], "vision")?.into_owned(),
            deep,
        ))
    }

    /// One prefill call on prompts of `lengths` tokens padded to `width` positions (padding at
    /// the start for `left`, else at the end), with nothing before them (for a shared-prefix
    /// decoder, every prompt on its own slot of an empty prefix); logits at each prompt's last
    /// position.
    #[allow(clippy::too_many_arguments)]
    fn prefill_call(
        &mut self,
        embeds: Vec<f32>,
        mask: &[Vec<i64>],
        pos: Vec<i64>,
        lengths: &[usize],
        width: usize,
        shared: bool,
        left: bool,
    ) -> Result<(StepLogits, Kv), EngineError> {
        let t = &self.m.text;
        let rows = lengths.len();
        let last: Vec<usize> = match left {
            true => vec![width.max(1) - 1; rows],
            false => lengths.iter().map(|&n| n.max(1) - 1).collect(),
        };
        let own: Vec<usize> = (0..rows).collect();
        let ty = self.g.floats.cache;
        let mut none = match shared {
            true => Some(Prefix {
                cache: Kv::empty(t, rows, ty)?,
                mask: vec![Vec::new(); rows],
            }),
            false => None,
        };
        let mut start = Kv::empty(t, rows, ty)?;
        let prefix = none.as_mut().map(|p| (p, &own[..]));
        self.decode(
            embeds, rows, width, mask, pos, &mut start, prefix, None, &last,
        )
    }

    /// The prefill of padded prompts of several lengths, on the host: one decoder call per
    /// group of [`length_groups`], each on just its prompts padded to its own longest (a batch
    /// of many-image and one-image prompts would otherwise run every short prompt at the
    /// longest one's length), their caches then placed in each row of the padded `[prompts, ..,
    /// longest, ..]` cache at the end (`left`-padded prompts) or the start (right-padded), zero
    /// in the slots no group wrote. `mask` is the batch's padding mask. Logits `[prompts, vocab]`
    /// at the prompts' last positions.
    #[allow(clippy::too_many_arguments)]
    fn prefill_apart(
        &mut self,
        embeds: &[f32],
        pos: &[i64],
        mask: &[Vec<i64>],
        lengths: &[usize],
        groups: &[Vec<usize>],
        shared: bool,
        left: bool,
    ) -> Result<(StepLogits, Kv), EngineError> {
        let t = &self.m.text;
        let (b, s) = (lengths.len(), lengths.iter().copied().max().unwrap_or(0));
        let (hidden, vocab) = (t.hidden_size, t.vocab_size);
        let (kvh, hd) = (t.num_key_value_heads, t.head_dim);
        let ty = self.g.floats.cache;
        let vb = ty.bytes();
        let mut logits = vec![0f32; b * vocab];
        let mut cache = (0..2 * t.num_hidden_layers)
            .map(|_| ty.zeros(&[b, kvh, s, hd]))
            .collect::<Result<Vec<_>, _>>()?;
        for rows in groups {
            let g = rows.len();
            let w = rows.iter().map(|&i| lengths[i]).max().unwrap_or(0);
            let from = if left { s - w } else { 0 };
            let mut e = Vec::with_capacity(g * w * hidden);
            for &i in rows {
                e.extend_from_slice(&embeds[(i * s + from) * hidden..(i * s + from + w) * hidden]);
            }
            let mut p = Vec::with_capacity(3 * g * w);
            for axis in 0..3 {
                for &i in rows {
                    let at = (axis * b + i) * s + from;
                    p.extend_from_slice(&pos[at..at + w]);
                }
            }
            let m: Vec<Vec<i64>> = rows
                .iter()
                .map(|&i| mask[i][from..from + w].to_vec())
                .collect();
            let n: Vec<usize> = rows.iter().map(|&i| lengths[i]).collect();
            let (mut l, kv) = self.prefill_call(e, &m, p, &n, w, shared, left)?;
            let StepLogits::Host(l) = &mut l else {
                unreachable!("GPU logits from a host prefill")
            };
            let l = l.values()?;
            for (j, &i) in rows.iter().enumerate() {
                logits[i * vocab..(i + 1) * vocab].copy_from_slice(&l[j * vocab..(j + 1) * vocab]);
            }
            for (dst, v) in cache.iter_mut().zip(&kv.data) {
                let (src, dst) = (bytes(v)?, bytes_mut(dst)?);
                // `[g, kvh, w, hd]` into rows `rows` of `[b, kvh, s, hd]`, positions `from..`
                // (bytes: e per value).
                let block = w * hd * vb;
                for (j, &i) in rows.iter().enumerate() {
                    for h in 0..kvh {
                        let at = ((i * kvh + h) * s + from) * hd * vb;
                        let src = &src[(j * kvh + h) * block..(j * kvh + h + 1) * block];
                        dst[at..at + block].copy_from_slice(src);
                    }
                }
            }
        }
        let kv = Kv {
            data: cache,
            rows: b,
            len: s,
            cap: s,
            ty,
        };
        Ok((StepLogits::Host(HostLogits::Picked(logits)), kv))
    }

    /// One token per row from a step's logits, with its log-prob: on the host by the CPU
    /// sampler, or on the GPU by the CUDA kernel where the logits are there. Image and video
    /// placeholders are never drawn: the embedding graph would look for vision features behind
    /// them (vLLM likewise never emits them).
    fn draw(
        &self,
        logits: StepLogits,
        keys: &[RowKey],
        sampling: &SamplingParams,
    ) -> Result<Vec<Sampled>, EngineError> {
        let vocab = self.m.text.vocab_size;
        let banned = [self.m.tokens.image, self.m.tokens.video];
        match (logits, self.gpu) {
            (StepLogits::Host(mut l), _) => {
                let l = l.values()?;
                for row in l.chunks_exact_mut(vocab) {
                    for id in banned {
                        if let Some(x) = row.get_mut(id as usize) {
                            *x = f32::NEG_INFINITY;
                        }
                    }
                }
                cpu::sample(Logits::F32(l), vocab, keys, sampling)
                    .map_err(|e| EngineError::Config(e.to_string()))
            }
            (StepLogits::Gpu(mut l), Some(g)) => {
                // SAFETY: `l` is ONNX Runtime's [rows, 1, vocab] f32 output on this GPU,
                // finished (the run was synchronised) and used by nothing else.
                unsafe {
                    g.cuda
                        .sample_device(l.data_ptr_mut() as u64, 0, vocab, keys, sampling, &banned)
                }
                .map_err(gpu_err)
            }
            (StepLogits::Gpu(_), None) => unreachable!("GPU logits without a GPU cache"),
        }
    }

    /// [`Engine::generate_prepared`] on this worker's sessions.
    pub(super) fn generate(
        &mut self,
        request_ids: &[u64],
        prepared: &Prepared,
        cfg: &GenerationConfig,
        mut trace: Option<&mut Trace>,
    ) -> Result<Vec<Completion>, EngineError> {
        let m = self.m.clone();
        let prompts = &prepared.prompts;
        let grids: Vec<[u32; 3]> = prepared.grids.iter().flatten().copied().collect();
        let features = {
            let f: Vec<f32> = prepared.features.concat();
            let n = f.len() / m.vision.out_hidden_size;
            (f, n)
        };
        // Padded prompt batch, M-RoPE positions.
        let b = request_ids.len();
        let packed = m.kv_layout == KvLayout::Packed;
        let (ids, mask, s) = padded_batch(prompts, m.tokens.pad, packed);
        let mask_u8: Vec<u8> = mask.iter().flatten().map(|&v| v as u8).collect();
        let rope_cfg = m.rope();
        let (pos, deltas) = rope_index(&ids, &mask_u8, b, &grids, &[], &[], &rope_cfg)?;
        if let Some(t) = trace.as_deref_mut() {
            t.prompt_ids = prompts.clone();
            t.position_ids = pos.clone();
            t.rope_deltas = deltas.clone();
        }
        let t = &m.text;
        let shared = m.kv_layout == KvLayout::Shared;
        let k = m.vision.deepstack_layers;
        if k > 0 {
            // DeepStack: layer j's features of every request in request order (as the
            // embedding takes the image features), at the prompts' placeholders.
            let d = m.vision.out_hidden_size;
            let mut deep = Vec::with_capacity(k * features.0.len());
            for j in 0..k {
                for r in &prepared.deepstack {
                    let n = r.len() / (k * d).max(1);
                    deep.extend_from_slice(&r[j * n * d..(j + 1) * n * d]);
                }
            }
            let placeholders = [m.tokens.image, m.tokens.video];
            let vmask = ids
                .iter()
                .map(|t| i64::from(placeholders.contains(t)))
                .collect();
            self.deepstack = Some((deep, features.1, vmask));
        }
        let embeds = self.embed(ids.iter().map(|v| i64::from(*v)).collect(), b, s, features)?;
        let t_prefill = Instant::now();
        let lengths: Vec<usize> = prompts.iter().map(Vec::len).collect();
        let groups = length_groups(&lengths);
        // (a DeepStack prefill runs as one call: its features follow the whole batch's order)
        let (prefill_logits, mut kv) = if self.gpu.is_none() && groups.len() > 1 && k == 0 {
            self.prefill_apart(&embeds, &pos, &mask, &lengths, &groups, shared, !packed)?
        } else {
            self.prefill_call(embeds, &mask, pos, &lengths, s, shared, !packed)?
        };
        self.stats.prefill_s += t_prefill.elapsed().as_secs_f64();
        self.stats.prefill_tokens += prompts.iter().map(Vec::len).sum::<usize>();
        let t_decode = Instant::now();
        // Row i = prompt i / G, sample i % G. A shared prefix: the prefill's cache becomes the
        // prompts' cache as it is and the rows start with none of their own; otherwise the
        // cache is fanned out to the rows.
        let g = cfg.group;
        let fan: Vec<usize> = (0..b * g).map(|i| i / g).collect();
        let (mut kv, mut prefix, mut masks) = if shared {
            let ty = kv.ty;
            let prefix = Prefix { cache: kv, mask };
            (
                Kv::empty(t, b * g, ty)?,
                Some(prefix),
                vec![Vec::new(); b * g],
            )
        } else {
            let rows = self.gather_rows(&mut kv, &fan)?;
            (rows, None, fan.iter().map(|&p| mask[p].clone()).collect())
        };
        // The rows' older own tokens in a buffer read in place, the newest in `kv` (the
        // decoder's past); without the buffer, all of them in `kv`.
        let mut own_buf = (shared && self.own_in_place)
            .then(|| OwnBuf::new(t, b * g, cfg.max_new_tokens.saturating_sub(1), kv.ty));
        // Each live row's prompt, as a row of the prefix.
        let mut row_prompt = fan.clone();
        let vocab = t.vocab_size;
        let mut logits = match (prefill_logits, &self.gpu) {
            (StepLogits::Host(mut l), _) => {
                StepLogits::Host(HostLogits::Picked(gather_host(l.values()?, vocab, &fan)))
            }
            (StepLogits::Gpu(mut l), Some(g)) => {
                let out = g.gather(&mut l, &[fan.len(), 1, vocab], &fan)?;
                g.cuda.synchronize_all().map_err(gpu_err)?;
                StepLogits::Gpu(out)
            }
            (StepLogits::Gpu(_), None) => unreachable!("GPU logits without a GPU cache"),
        };
        let mut active: Vec<usize> = (0..b * g).collect();
        let mut seen: Vec<usize> = fan.iter().map(|&p| prompts[p].len()).collect();
        let mut out: Vec<Completion> = (0..b * g)
            .map(|i| Completion {
                prompt_index: i / g,
                sample_index: i % g,
                tokens: vec![],
                logprobs: vec![],
                finish: Finish::Length,
            })
            .collect();
        for step in 0..cfg.max_new_tokens {
            if trace.is_some() {
                let host = self.host_logits(logits)?;
                if let Some(t) = trace.as_deref_mut() {
                    t.steps.push((active.clone(), host.clone()));
                }
                logits = StepLogits::Host(HostLogits::Picked(host));
            }
            let keys: Vec<RowKey> = active
                .iter()
                .map(|&i| row_key(request_ids[i / g], i % g, step))
                .collect();
            let t_sample = Instant::now();
            let drawn = self.draw(logits, &keys, &cfg.sampling)?;
            self.stats.sample_s += t_sample.elapsed().as_secs_f64();
            let mut keep = Vec::new();
            for (k, (&i, s)) in active.iter().zip(&drawn).enumerate() {
                out[i].tokens.push(s.token);
                out[i].logprobs.push(s.logprob);
                if m.tokens.eos.contains(&s.token) {
                    out[i].finish = Finish::Stop;
                } else if out[i].tokens.len() < cfg.max_new_tokens {
                    keep.push(k);
                }
            }
            if keep.is_empty() {
                break;
            }
            if keep.len() != active.len() {
                let order = if kv.shares_present() {
                    // Shared past/present buffers must be exactly the batch: the kept rows
                    // move into new ones.
                    kv = self.gather_rows(&mut kv, &keep)?;
                    keep.clone()
                } else {
                    self.keep_rows(&mut kv, &keep)?
                };
                if let Some(o) = own_buf.as_mut() {
                    let t0 = Instant::now();
                    o.keep(&compaction(o.rows, &keep).1, keep.len(), self.gpu)?;
                    self.stats.cache_s += t0.elapsed().as_secs_f64();
                }
                masks = order
                    .iter()
                    .map(|&o| std::mem::take(&mut masks[o]))
                    .collect();
                seen = order.iter().map(|&o| seen[o]).collect();
                active = order.iter().map(|&o| active[o]).collect();
                row_prompt = order.iter().map(|&o| row_prompt[o]).collect();
                if let Some(p) = prefix.as_mut() {
                    self.drop_finished_prompts(p, &mut row_prompt)?;
                }
            }
            let n = active.len();
            let next: Vec<i64> = active
                .iter()
                .map(|&i| i64::from(*out[i].tokens.last().expect("one token")))
                .collect();
            self.stats.decode_steps += 1;
            let embeds = self.embed(next, n, 1, (Vec::new(), 0))?;
            let pos = step_positions(&active, &seen, &deltas, g);
            if let Some(o) = own_buf.as_mut().filter(|_| kv.len == OWN_CHUNK) {
                // A full chunk of past moves into the own buffer.
                let t0 = Instant::now();
                o.absorb(&mut kv, self.gpu)?;
                kv = Kv::empty(t, n, kv.ty)?;
                for mrow in masks.iter_mut() {
                    mrow.clear();
                }
                self.stats.cache_s += t0.elapsed().as_secs_f64();
            }
            if packed && self.own_in_place && kv.cap < kv.len + 1 {
                let cap = room_for(kv.len + 1, s + cfg.max_new_tokens);
                self.with_room(&mut kv, cap)?;
            }
            if packed {
                // Row k holds seen[k] tokens from position 0; the new one goes right after.
                let width = kv.len + 1;
                for (mrow, &sk) in masks.iter_mut().zip(&seen) {
                    mrow.clear();
                    mrow.extend((0..width).map(|j| i64::from(j <= sk)));
                }
            } else {
                for mrow in masks.iter_mut() {
                    mrow.push(1);
                }
            }
            let (l, new_kv) = self.decode(
                embeds,
                n,
                1,
                &masks,
                pos,
                &mut kv,
                prefix.as_mut().map(|p| (p, &row_prompt[..])),
                own_buf.as_mut().filter(|o| o.len > 0),
                &vec![0; n],
            )?;
            kv = new_kv;
            logits = l;
            for s in seen.iter_mut() {
                *s += 1;
            }
        }
        self.stats.decode_s += t_decode.elapsed().as_secs_f64();
        self.stats.generated_tokens += out.iter().map(|c| c.tokens.len()).sum::<usize>();
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Left padding puts each prompt at the end of its row, right padding (packed caches) at
    /// the start; the masks mark the prompt's tokens.
    #[test]
    fn prompts_are_padded_left_or_right_to_the_longest() {
        let prompts = vec![vec![5, 6, 7], vec![8]];
        let (ids, mask, s) = padded_batch(&prompts, 0, false);
        assert_eq!(s, 3);
        assert_eq!(ids, [5, 6, 7, 0, 0, 8]);
        assert_eq!(mask, [vec![1, 1, 1], vec![0, 0, 1]]);
        let (ids, mask, _) = padded_batch(&prompts, 0, true);
        assert_eq!(ids, [5, 6, 7, 8, 0, 0]);
        assert_eq!(mask, [vec![1, 1, 1], vec![1, 0, 0]]);
        assert_eq!(padded_batch(&[], 0, false), (vec![], vec![], 0));
    }

    /// A sample's stream is its request's and its own: neighbouring samples, requests and steps
    /// draw from different streams, and the same triple from the same one.
    #[test]
    fn row_keys_depend_on_request_sample_and_step_only() {
        let k = row_key(7, 1, 3);
        assert_eq!(k, row_key(7, 1, 3));
        assert_eq!(k.step, 3);
        let streams = [row_key(7, 0, 3), k, row_key(8, 1, 3), row_key(6, 1, 3)];
        for (a, x) in streams.iter().enumerate() {
            for y in &streams[a + 1..] {
                assert_ne!(x.sequence, y.sequence);
            }
        }
        assert_eq!(row_key(7, 1, 4).sequence, k.sequence);
    }

    /// Each live row's position is the tokens it holds plus its prompt's rope delta, the same on
    /// all three axes.
    #[test]
    fn step_positions_follow_each_rows_tokens_and_prompt_delta() {
        // Two prompts × 2 samples; rows 1 (prompt 0) and 2 (prompt 1) live.
        let pos = step_positions(&[1, 2], &[10, 7], &[-3, 4], 2);
        assert_eq!(pos, [7, 11, 7, 11, 7, 11]);
    }
}
