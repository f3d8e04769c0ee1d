//! The GPU side of the decode loop ([`OnGpu`]: ONNX Runtime's CUDA allocator and the CUDA
//! kernels that move rows on it), and TensorRT's optimisation profiles for the engine's graphs.

use super::float::Float;
use super::types::kv_name;
use super::types::{run_err, EngineError};
use crate::kernels::cuda::Cuda;
use crate::model::package::{KvLayout, Manifest, OwnCache};
use crate::model::session::{TrtProfile, TrtShapes};
use ort::memory::{AllocationDevice, Allocator, AllocatorType, MemoryInfo, MemoryType};
use ort::session::Session;
use ort::value::{DynTensor, Tensor};

/// The GPU side of the decode loop: ONNX Runtime writes the cache and logits into buffers from
/// its own CUDA allocator; rows are moved and tokens drawn by the CUDA kernels on them.
pub(super) struct OnGpu {
    pub(super) cuda: Cuda,
    alloc: Allocator,
    /// The decoder returns the last position's logits only (`[rows, 1, vocab]`, packages from
    /// models/export.py), so the prefill's logits can stay on the GPU too.
    pub(super) last_only: bool,
    /// The cache's type: fp32, or half for a package that computes in fp16 / bf16.
    cache: Float,
}

impl OnGpu {
    /// The GPU side for `decoder`, whose cache may be of any float type (rows are moved as
    /// bytes) but whose logits must be fp32, as this project's packages return them in every
    /// dtype (the sampling kernels read them in place): an onnxruntime-genai half-precision
    /// decoder's cache stays on the host.
    pub(super) fn new(cuda: Cuda, decoder: &Session, device_id: i32) -> Result<OnGpu, String> {
        let cache = Float::of_input(decoder, "past_key_values.0.key");
        let logits = decoder
            .outputs()
            .iter()
            .find(|o| o.name() == "logits")
            .and_then(|o| o.dtype().tensor_type())
            .and_then(Float::of);
        if logits != Some(Float::F32) {
            return Err(format!(
                "the decoder's logits are {logits:?}; the GPU-resident path samples fp32 logits"
            ));
        }
        let info = MemoryInfo::new(
            AllocationDevice::CUDA,
            device_id,
            AllocatorType::Device,
            MemoryType::Default,
        )
        .map_err(|e| e.to_string())?;
        let alloc = Allocator::new(decoder, info).map_err(|e| e.to_string())?;
        let last_only = decoder
            .outputs()
            .iter()
            .find(|o| o.name() == "logits")
            .and_then(|o| o.dtype().tensor_shape())
            .is_some_and(|s| s.len() == 3 && s[1] == 1);
        Ok(OnGpu {
            cuda,
            alloc,
            last_only,
            cache,
        })
    }

    /// Copies rows of `bytes` bytes: row `from` at `src` to row `to` at `dst`, per pair.
    ///
    /// # Safety
    /// Every row named must lie within its buffer on this GPU; no two copies may overlap.
    pub(super) unsafe fn copy_rows(
        &self,
        dst: u64,
        src: u64,
        bytes: usize,
        pairs: impl Iterator<Item = (usize, usize)>,
    ) -> Result<(), EngineError> {
        for (to, from) in pairs {
            // SAFETY: the caller vouches for both rows.
            unsafe {
                self.cuda.copy_device(
                    dst + (to * bytes) as u64,
                    src + (from * bytes) as u64,
                    bytes,
                )
            }
            .map_err(gpu_err)?;
        }
        Ok(())
    }

    /// A new GPU tensor of `shape` whose row `k` (`shape[1..]` values) is row `src[k]` of `v`.
    pub(super) fn gather(
        &self,
        v: &mut DynTensor,
        shape: &[usize],
        src: &[usize],
    ) -> Result<DynTensor, EngineError> {
        let ty = super::float::float_of(v, "decoder")?;
        let row = shape[1..].iter().product::<usize>() * ty.bytes();
        let mut out = self.tensor_of(shape, ty)?;
        let (from, to) = (v.data_ptr_mut() as u64, out.data_ptr_mut() as u64);
        // SAFETY: every src[k] is a row of `v` (the callers' indices), k < shape[0]; distinct
        // buffers.
        unsafe { self.copy_rows(to, from, row, src.iter().copied().enumerate()) }?;
        Ok(out)
    }

    /// An uninitialised f32 tensor on the GPU (for logits).
    pub(super) fn tensor(&self, shape: &[usize]) -> Result<DynTensor, EngineError> {
        self.tensor_of(shape, Float::F32)
    }

    /// An uninitialised cache tensor on the GPU, of the decoder's cache type.
    pub(super) fn cache_tensor(&self, shape: &[usize]) -> Result<DynTensor, EngineError> {
        self.tensor_of(shape, self.cache)
    }

    /// An uninitialised tensor of `ty` on the GPU.
    pub(super) fn tensor_of(&self, shape: &[usize], ty: Float) -> Result<DynTensor, EngineError> {
        let shape: Vec<i64> = shape.iter().map(|d| *d as i64).collect();
        let t = match ty {
            Float::F32 => Tensor::<f32>::new(&self.alloc, shape).map(|t| t.upcast()),
            Float::F16 => Tensor::<half::f16>::new(&self.alloc, shape).map(|t| t.upcast()),
            Float::Bf16 => Tensor::<half::bf16>::new(&self.alloc, shape).map(|t| t.upcast()),
        };
        t.map_err(run_err("decoder"))
    }
}

pub(super) fn gpu_err(e: crate::kernels::KernelError) -> EngineError {
    EngineError::GpuCache(e)
}

/// TensorRT optimisation profiles of the vision, embedding and decoder graphs (in that order)
/// for rollouts within `l`: batch dimensions from 1 to `max_rows` (optimised for the full
/// batch), token dimensions from 1 to `max_total` (optimised for one-token decode steps, the
/// cache at half length), patches from 4 (one merge block) to `max_patches`.
pub(super) fn trt_profiles(m: &Manifest, l: &TrtShapes) -> [TrtProfile; 3] {
    let (t, v) = (&m.text, &m.vision);
    let fixed = |d: usize| (d, d, d);
    let rows = (1, l.max_rows, l.max_rows);
    let tokens = (1, 1, l.max_total);
    let merge = (v.spatial_merge_size * v.spatial_merge_size) as usize;
    let patch_row = (3 * v.temporal_patch_size * v.patch_size * v.patch_size) as usize;
    let vision = TrtProfile::new(&[
        (
            "pixel_values".into(),
            vec![(merge, l.max_patches, l.max_patches), fixed(patch_row)],
        ),
        ("image_grid_thw".into(), vec![fixed(1), fixed(3)]),
    ]);
    let features = l.max_rows * l.max_patches / merge;
    let embedding = TrtProfile::new(&[
        ("input_ids".into(), vec![rows, tokens]),
        (
            "image_features".into(),
            vec![(0, 0, features), fixed(v.out_hidden_size)],
        ),
    ]);
    let mut dec = vec![
        (
            "inputs_embeds".to_string(),
            vec![rows, tokens, fixed(t.hidden_size)],
        ),
        (
            "attention_mask".into(),
            vec![rows, (1, l.max_total / 2, l.max_total)],
        ),
        ("position_ids".into(), vec![fixed(3), rows, tokens]),
    ];
    let past = (0, l.max_total / 2, l.max_total.saturating_sub(1));
    for i in 0..2 * t.num_hidden_layers {
        dec.push((
            kv_name("past_key_values", i),
            vec![rows, fixed(t.num_key_value_heads), past, fixed(t.head_dim)],
        ));
    }
    if m.kv_layout == KvLayout::Shared {
        // Prompts and slots never outnumber rows (prompts ≤ B, slots ≤ B · G); the prompts'
        // cache is empty in the prefill.
        let prefix = (0, l.max_total / 2, l.max_total);
        for i in 0..2 * t.num_hidden_layers {
            dec.push((
                kv_name("prefix_key_values", i),
                vec![
                    rows,
                    fixed(t.num_key_value_heads),
                    prefix,
                    fixed(t.head_dim),
                ],
            ));
        }
        dec.push(("prefix_mask".into(), vec![rows, prefix]));
        dec.push(("slot_rows".into(), vec![rows]));
        dec.push(("row_slots".into(), vec![rows]));
        if m.own_cache == OwnCache::InPlace {
            // Not fed on the GPU (each step's present holds the row's own tokens): the default
            // buffer, one row with no slots.
            let none = (1, 1, 1);
            for i in 0..2 * t.num_hidden_layers {
                dec.push((
                    kv_name("own_key_values", i),
                    vec![
                        none,
                        fixed(t.num_key_value_heads),
                        (0, 0, 0),
                        fixed(t.head_dim),
                    ],
                ));
            }
            dec.push(("own_mask".into(), vec![none, (0, 0, 0)]));
        }
    }
    [vision, embedding, TrtProfile::new(&dec)]
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::package::Package;
    use std::path::Path;

    /// Every input of the vision, embedding and decoder graphs except the fixed-shape LoRA
    /// tensors gets a range in each of min / opt / max, with min ≤ opt ≤ max per dimension.
    #[test]
    fn trt_profiles_cover_every_dynamic_input() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("models/tiny");
        let pkg = Package::open(&dir).unwrap();
        let t = &pkg.manifest.text;
        let limits = crate::model::session::TrtLimits::rollout(40, Some(4096), 64, None);
        let profiles = trt_profiles(&pkg.manifest, &limits.shapes(14, 2, 14 * 14 * 16_384));
        let parse = |s: &str| -> Vec<(String, Vec<usize>)> {
            s.split(',')
                .map(|e| {
                    let (name, dims) = e.split_once(':').unwrap();
                    let dims = dims.split('x').map(|d| d.parse().unwrap()).collect();
                    (name.to_string(), dims)
                })
                .collect()
        };
        for (p, (_, sig)) in profiles.iter().zip(pkg.signatures()) {
            let want: Vec<&String> = sig
                .inputs
                .iter()
                .map(|(n, _)| n)
                .filter(|n| !n.starts_with("lora."))
                .collect();
            let (min, opt, max) = (parse(&p.min), parse(&p.opt), parse(&p.max));
            assert_eq!(min.iter().map(|(n, _)| n).collect::<Vec<_>>(), want);
            for ((a, b), c) in min.iter().zip(&opt).zip(&max) {
                assert_eq!((&a.0, a.1.len()), (&c.0, c.1.len()));
                for ((x, y), z) in a.1.iter().zip(&b.1).zip(&c.1) {
                    assert!(x <= y && y <= z, "{}: {:?} {:?} {:?}", a.0, a.1, b.1, c.1);
                }
            }
        }
        let kv = format!(
            "past_key_values.1.value:40x{}x4159x{}",
            t.num_key_value_heads, t.head_dim
        );
        assert!(profiles[2].max.contains(&kv), "{}", profiles[2].max);
        let embeds = format!("inputs_embeds:40x1x{}", t.hidden_size);
        assert!(profiles[2].opt.contains(&embeds), "{}", profiles[2].opt);
        assert!(
            profiles[0].min.starts_with("pixel_values:4x1176,"),
            "{}",
            profiles[0].min
        );
    }
}
