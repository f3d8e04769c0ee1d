//! The CUDA backend: `kernels/*.cu`, compiled once per process by NVRTC and launched through
//! cudarc. Both libraries are loaded at run time (`dynamic-loading`): with no CUDA installed the
//! crate still builds, and [`Cuda::new`] returns [`KernelError::Unavailable`] instead of
//! panicking. Most entry points take and return host memory; [`Cuda::sample_device`] draws from
//! logits already on the device (the rollout engine's, written there by ONNX Runtime).

use super::{
    check_groups, check_rows, check_targets, AdamW, AdvantageConfig, KernelError, Logits, RowKey,
    Sampled, SamplingParams, TokenLogprobs,
};
use cudarc::driver::{
    CudaContext, CudaFunction, CudaSlice, CudaStream, DevicePtr, LaunchConfig, PushKernelArg,
};
use cudarc::nvrtc::Ptx;
use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};

const BLOCK: u32 = 256;

/// The kernel sources in compile order (the shared header first).
pub const SOURCES: [(&str, &str); 4] = [
    ("common.cuh", include_str!("../../kernels/common.cuh")),
    ("logprobs.cu", include_str!("../../kernels/logprobs.cu")),
    ("sample.cu", include_str!("../../kernels/sample.cu")),
    ("optim.cu", include_str!("../../kernels/optim.cu")),
];

/// One translation unit: NVRTC gets no include paths.
pub fn source() -> String {
    SOURCES
        .iter()
        .map(|(name, s)| format!("// ---- {name}\n{s}\n"))
        .collect()
}

/// Whether libnvrtc can be loaded (kernels can be compiled, even without a GPU).
pub fn nvrtc_present() -> bool {
    // SAFETY: only tries to dlopen the library; no CUDA call is made.
    unsafe { cudarc::nvrtc::sys::is_culib_present() }
}

/// Whether the CUDA driver (libcuda) can be loaded.
pub fn driver_present() -> bool {
    // SAFETY: as above.
    unsafe { cudarc::driver::sys::is_culib_present() }
}

/// Compiled kernels: PTX for any GPU, or machine code (CUBIN) for one architecture.
#[derive(Clone)]
pub enum Image {
    Ptx(String),
    Cubin(Vec<u8>),
}

impl Image {
    fn into_module_source(self) -> Ptx {
        match self {
            Image::Ptx(p) => Ptx::from_src(p),
            Image::Cubin(c) => Ptx::from_binary(c),
        }
    }
}

/// Compiles the kernels with NVRTC, once per process and target: `arch = Some((9, 0))` gives a
/// CUBIN for sm_90, `None` portable PTX. Machine code is what [`Cuda::new`] loads: PTX from a
/// newer NVRTC than the driver (a CUDA 13.5 wheel on a 13.0 driver, say) is refused by the
/// driver's JIT, a CUBIN is not.
pub fn compile(arch: Option<(i32, i32)>) -> Result<Image, KernelError> {
    type Cache = HashMap<Option<(i32, i32)>, Result<Image, String>>;
    static CACHE: OnceLock<Mutex<Cache>> = OnceLock::new();
    if !nvrtc_present() {
        return Err(KernelError::Unavailable("libnvrtc not found (install the CUDA toolkit or the nvidia-cuda-nvrtc wheel and put its lib folder on LD_LIBRARY_PATH)".into()));
    }
    let mut cache = CACHE
        .get_or_init(Default::default)
        .lock()
        .unwrap_or_else(|e| e.into_inner());
    cache
        .entry(arch)
        .or_insert_with(|| nvrtc_compile(arch))
        .clone()
        .map_err(|e| KernelError::Cuda(format!("NVRTC compile of kernels/*.cu failed: {e}")))
}

fn nvrtc_compile(arch: Option<(i32, i32)>) -> Result<Image, String> {
    use cudarc::nvrtc::{result, sys};
    let src = std::ffi::CString::new(source()).map_err(|e| e.to_string())?;
    let prog =
        result::create_program(&src, Some(c"ssrl_kernels.cu")).map_err(|e| format!("{e:?}"))?;
    let mut opts = vec!["--std=c++17".to_string()];
    if let Some((major, minor)) = arch {
        opts.push(format!("--gpu-architecture=sm_{major}{minor}"));
    }
    // SAFETY: `prog` comes from create_program above and is destroyed once, at the end.
    let out = unsafe {
        let compiled = result::compile_program(prog, &opts).map_err(|e| {
            let log = result::get_program_log(prog)
                .map(|l| {
                    std::ffi::CStr::from_ptr(l.as_ptr())
                        .to_string_lossy()
                        .into_owned()
                })
                .unwrap_or_default();
            format!("{e:?} with {opts:?}: {log}")
        });
        compiled.and_then(|()| {
            if arch.is_some() {
                let mut n = 0usize;
                sys::nvrtcGetCUBINSize(prog, &mut n)
                    .result()
                    .map_err(|e| format!("{e:?}"))?;
                let mut bin = vec![0u8; n];
                sys::nvrtcGetCUBIN(prog, bin.as_mut_ptr().cast())
                    .result()
                    .map_err(|e| format!("{e:?}"))?;
                Ok(Image::Cubin(bin))
            } else {
                let ptx = result::get_ptx(prog).map_err(|e| format!("{e:?}"))?;
                let ptx = std::ffi::CStr::from_ptr(ptx.as_ptr())
                    .to_string_lossy()
                    .into_owned();
                Ok(Image::Ptx(ptx))
            }
        })
    };
    // SAFETY: as above; the program is not used after this.
    let _ = unsafe { result::destroy_program(prog) };
    out
}

/// The driver's description of a device-to-device copy of `height` rows of `width` bytes,
/// every field spelled out (its memory-type fields are enums with no zero value, so the struct
/// cannot start zeroed).
fn device_copy_2d(
    dst: cudarc::driver::sys::CUdeviceptr,
    dst_pitch: usize,
    src: cudarc::driver::sys::CUdeviceptr,
    src_pitch: usize,
    width: usize,
    height: usize,
) -> cudarc::driver::sys::CUDA_MEMCPY2D {
    use cudarc::driver::sys::{CUmemorytype, CUDA_MEMCPY2D};
    CUDA_MEMCPY2D {
        srcXInBytes: 0,
        srcY: 0,
        srcMemoryType: CUmemorytype::CU_MEMORYTYPE_DEVICE,
        srcHost: std::ptr::null(),
        srcDevice: src,
        srcArray: std::ptr::null_mut(),
        srcPitch: src_pitch,
        dstXInBytes: 0,
        dstY: 0,
        dstMemoryType: CUmemorytype::CU_MEMORYTYPE_DEVICE,
        dstHost: std::ptr::null_mut(),
        dstDevice: dst,
        dstArray: std::ptr::null_mut(),
        dstPitch: dst_pitch,
        WidthInBytes: width,
        Height: height,
    }
}

fn cuda_err(e: impl std::fmt::Debug) -> KernelError {
    KernelError::Cuda(format!("{e:?}"))
}

/// A device with the kernels loaded.
pub struct Cuda {
    stream: Arc<CudaStream>,
    name: String,
    /// Blocks of the log-prob kernel resident on the whole device at once (one wave).
    block_slots: usize,
    logprob_partials: CudaFunction,
    logprob_finish: CudaFunction,
    sample: CudaFunction,
    mask_tokens: CudaFunction,
    advantages: CudaFunction,
    sum_squares: CudaFunction,
    scale: CudaFunction,
    adamw: CudaFunction,
}

enum DeviceLogits {
    F32(CudaSlice<f32>),
    Half(CudaSlice<u16>),
}

impl Cuda {
    /// Opens device `ordinal`, compiling the kernels on first use; work goes to the context's
    /// default stream.
    pub fn new(ordinal: usize) -> Result<Cuda, KernelError> {
        Cuda::open(ordinal, false)
    }

    /// [`Cuda::new`] with a stream of its own, to hand to ONNX Runtime's CUDA provider
    /// ([`Cuda::raw_stream`]) so that its graphs and these kernels run in one stream order.
    pub fn with_own_stream(ordinal: usize) -> Result<Cuda, KernelError> {
        Cuda::open(ordinal, true)
    }

    /// The stream as a `cudaStream_t`.
    pub fn raw_stream(&self) -> *mut () {
        self.stream.cu_stream() as *mut ()
    }

    fn open(ordinal: usize, own_stream: bool) -> Result<Cuda, KernelError> {
        if !driver_present() {
            return Err(KernelError::Unavailable(
                "libcuda.so.1 not found (no NVIDIA driver)".into(),
            ));
        }
        let ctx = CudaContext::new(ordinal)
            .map_err(|e| KernelError::Unavailable(format!("device {ordinal}: {e:?}")))?;
        let name = ctx.name().unwrap_or_else(|_| "CUDA device".into());
        let cc = ctx.compute_capability().map_err(cuda_err)?;
        let sm_count = ctx
            .attribute(
                cudarc::driver::sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT,
            )
            .map_err(cuda_err)? as usize;
        // Machine code for this GPU; PTX only when this NVRTC does not know the architecture.
        let image = compile(Some(cc)).or_else(|_| compile(None))?;
        let module = ctx
            .load_module(image.into_module_source())
            .map_err(cuda_err)?;
        let f = |n: &str| module.load_function(n).map_err(cuda_err);
        let logprob_partials = f("logprob_partials")?;
        let per_sm = logprob_partials
            .occupancy_max_active_blocks_per_multiprocessor(BLOCK, 0, None)
            .map_err(cuda_err)? as usize;
        let stream = if own_stream {
            ctx.new_stream().map_err(cuda_err)?
        } else {
            ctx.default_stream()
        };
        Ok(Cuda {
            stream,
            name,
            block_slots: sm_count * per_sm.max(1),
            logprob_partials,
            logprob_finish: f("logprob_finish")?,
            sample: f("sample_rows")?,
            mask_tokens: f("mask_tokens")?,
            advantages: f("group_advantages")?,
            sum_squares: f("sum_squares")?,
            scale: f("scale")?,
            adamw: f("adamw")?,
        })
    }

    /// Blocks of 256 threads of the log-prob kernel the device holds at once.
    pub fn block_slots(&self) -> usize {
        self.block_slots
    }

    pub fn device_name(&self) -> &str {
        &self.name
    }

    pub fn stream(&self) -> &Arc<CudaStream> {
        &self.stream
    }

    /// Copies `bytes` bytes from `src` to `dst` on this device, in stream order.
    ///
    /// # Safety
    /// Both ranges must be device memory of this context, not overlapping.
    pub unsafe fn copy_device(
        &self,
        dst: cudarc::driver::sys::CUdeviceptr,
        src: cudarc::driver::sys::CUdeviceptr,
        bytes: usize,
    ) -> Result<(), KernelError> {
        self.stream.context().bind_to_thread().map_err(cuda_err)?;
        // SAFETY: the caller vouches for both ranges.
        unsafe {
            cudarc::driver::result::memcpy_dtod_async(dst, src, bytes, self.stream.cu_stream())
        }
        .map_err(cuda_err)
    }

    /// Copies `height` rows of `width` bytes from `src`, its rows `src_pitch` bytes apart, to
    /// `dst`, its rows `dst_pitch` bytes apart, on this device in stream order: one call for a
    /// block of a cache's rows however many there are.
    ///
    /// # Safety
    /// Both regions (`height` rows at their pitch) must be device memory of this context, not
    /// overlapping; each pitch must be at least `width`.
    pub unsafe fn copy_device_2d(
        &self,
        dst: cudarc::driver::sys::CUdeviceptr,
        dst_pitch: usize,
        src: cudarc::driver::sys::CUdeviceptr,
        src_pitch: usize,
        width: usize,
        height: usize,
    ) -> Result<(), KernelError> {
        use cudarc::driver::sys;
        if width == 0 || height == 0 {
            return Ok(());
        }
        self.stream.context().bind_to_thread().map_err(cuda_err)?;
        let copy = device_copy_2d(dst, dst_pitch, src, src_pitch, width, height);
        // SAFETY: the caller vouches for both regions; `copy` outlives the call (the driver reads
        // it before returning).
        unsafe { sys::cuMemcpy2DAsync_v2(&copy, self.stream.cu_stream()).result() }
            .map_err(cuda_err)
    }

    /// Sets `bytes` bytes at `dst` to zero, in stream order.
    ///
    /// # Safety
    /// The range must be device memory of this context.
    pub unsafe fn zero_device(
        &self,
        dst: cudarc::driver::sys::CUdeviceptr,
        bytes: usize,
    ) -> Result<(), KernelError> {
        self.stream.context().bind_to_thread().map_err(cuda_err)?;
        // SAFETY: the caller vouches for the range.
        unsafe { cudarc::driver::result::memset_d8_async(dst, 0, bytes, self.stream.cu_stream()) }
            .map_err(cuda_err)
    }

    /// Reads `out.len()` values from device address `src` (after the stream's work).
    ///
    /// # Safety
    /// `src` must hold `out.len()` values of `T` in this context.
    pub unsafe fn read_device<T: Copy>(
        &self,
        src: cudarc::driver::sys::CUdeviceptr,
        out: &mut [T],
    ) -> Result<(), KernelError> {
        self.stream.synchronize().map_err(cuda_err)?;
        // SAFETY: the caller vouches for the range.
        unsafe { cudarc::driver::result::memcpy_dtoh_sync(out, src) }.map_err(cuda_err)
    }

    /// Waits for all work in the device's primary context, other libraries' streams (ONNX
    /// Runtime's) included.
    pub fn synchronize_all(&self) -> Result<(), KernelError> {
        self.stream.context().synchronize().map_err(cuda_err)
    }

    fn upload(&self, logits: Logits<'_>) -> Result<(DeviceLogits, i32), KernelError> {
        Ok(match logits {
            Logits::F32(v) => (
                DeviceLogits::F32(self.stream.clone_htod(v).map_err(cuda_err)?),
                0,
            ),
            Logits::F16(v) => {
                let bits: Vec<u16> = v.iter().map(|x| x.to_bits()).collect();
                (
                    DeviceLogits::Half(self.stream.clone_htod(&bits).map_err(cuda_err)?),
                    1,
                )
            }
            Logits::Bf16(v) => {
                let bits: Vec<u16> = v.iter().map(|x| x.to_bits()).collect();
                (
                    DeviceLogits::Half(self.stream.clone_htod(&bits).map_err(cuda_err)?),
                    2,
                )
            }
        })
    }

    fn rows_config(rows: usize) -> LaunchConfig {
        LaunchConfig {
            grid_dim: (rows as u32, 1, 1),
            block_dim: (BLOCK, 1, 1),
            shared_mem_bytes: 0,
        }
    }

    /// Slices per row for the log-prob kernel. A few rows get many slices so every SM has work;
    /// the count is the smallest that fills the last wave of blocks to 90 % (a grid of 1.2
    /// waves runs at 60 % of the bandwidth, and thin slices cost a reduction each) and gives
    /// four waves or slices of at most 16 Ki logits. Slices hold at least 1,024 logits; at most
    /// 128 per row. Measured on an H200: 81 % of copy bandwidth at 1,024 rows, 86 % at 4,096.
    pub fn logprob_splits(&self, rows: usize, vocab: usize) -> usize {
        let slots = self.block_slots.max(1);
        let rows = rows.max(1);
        let max = vocab.div_ceil(1024).clamp(1, 128);
        let fill = |s: usize| {
            let blocks = rows * s;
            blocks as f64 / (blocks.div_ceil(slots) * slots) as f64
        };
        // Several waves of slices of moderate length balance best; one long wave leaves a tail.
        let balanced = |s: usize| rows * s >= 4 * slots || vocab.div_ceil(s) <= 16_384;
        (1..=max)
            .find(|&s| fill(s) >= 0.9 && balanced(s))
            .unwrap_or_else(|| {
                (1..=max).fold(1, |best, s| if fill(s) > fill(best) { s } else { best })
            })
    }

    /// Both log-prob launches on device buffers; `partial` holds `3 · rows · splits` floats.
    #[allow(clippy::too_many_arguments)]
    fn launch_logprobs<T: cudarc::driver::DeviceRepr>(
        &self,
        logits: &CudaSlice<T>,
        dtype: i32,
        vocab: usize,
        targets: &CudaSlice<i32>,
        temperature: f32,
        partial: &mut CudaSlice<f32>,
        lp: &mut CudaSlice<f32>,
        ent: &mut CudaSlice<f32>,
    ) -> Result<(), KernelError> {
        let rows = targets.len();
        let splits = self.logprob_splits(rows, vocab);
        if partial.len() < 3 * rows * splits {
            return Err(KernelError::Shape("log-prob scratch too small".into()));
        }
        let (vocab64, splits32) = (vocab as u64, splits as i32);
        let mut b = self.stream.launch_builder(&self.logprob_partials);
        b.arg(logits)
            .arg(&dtype)
            .arg(&vocab64)
            .arg(targets)
            .arg(&temperature)
            .arg(&splits32)
            .arg(&mut *partial);
        let grid = LaunchConfig {
            grid_dim: (rows as u32, splits as u32, 1),
            block_dim: (BLOCK, 1, 1),
            shared_mem_bytes: 0,
        };
        // SAFETY: argument list matches `logprob_partials` in kernels/logprobs.cu; `partial`
        // has 3 floats per (row, split), checked above.
        unsafe { b.launch(grid) }.map_err(cuda_err)?;
        let mut b = self.stream.launch_builder(&self.logprob_finish);
        b.arg(logits)
            .arg(&dtype)
            .arg(&vocab64)
            .arg(targets)
            .arg(&temperature)
            .arg(&splits32)
            .arg(&*partial)
            .arg(lp)
            .arg(ent);
        let grid = LaunchConfig {
            grid_dim: (rows as u32, 1, 1),
            block_dim: (32, 1, 1),
            shared_mem_bytes: 0,
        };
        // SAFETY: matches `logprob_finish`; `lp` and `ent` have one slot per row.
        unsafe { b.launch(grid) }.map_err(cuda_err)?;
        Ok(())
    }

    /// Device version of [`super::cpu::token_logprobs`].
    pub fn token_logprobs(
        &self,
        logits: Logits<'_>,
        vocab: usize,
        targets: &[Option<u32>],
        temperature: f32,
    ) -> Result<TokenLogprobs, KernelError> {
        check_rows(logits.len(), vocab, targets.len())?;
        check_targets(targets, vocab)?;
        if targets.is_empty() {
            return Ok(TokenLogprobs {
                logprobs: vec![],
                entropy: vec![],
            });
        }
        let rows = targets.len();
        let (d, dtype) = self.upload(logits)?;
        let t: Vec<i32> = targets.iter().map(|t| t.map_or(-1, |v| v as i32)).collect();
        let t = self.stream.clone_htod(&t).map_err(cuda_err)?;
        let alloc = |n: usize| self.stream.alloc_zeros::<f32>(n).map_err(cuda_err);
        let mut partial = alloc(3 * rows * self.logprob_splits(rows, vocab))?;
        let (mut lp, mut ent) = (alloc(rows)?, alloc(rows)?);
        match &d {
            DeviceLogits::F32(x) => self.launch_logprobs(
                x,
                dtype,
                vocab,
                &t,
                temperature,
                &mut partial,
                &mut lp,
                &mut ent,
            ),
            DeviceLogits::Half(x) => self.launch_logprobs(
                x,
                dtype,
                vocab,
                &t,
                temperature,
                &mut partial,
                &mut lp,
                &mut ent,
            ),
        }?;
        Ok(TokenLogprobs {
            logprobs: self.stream.clone_dtoh(&lp).map_err(cuda_err)?,
            entropy: self.stream.clone_dtoh(&ent).map_err(cuda_err)?,
        })
    }

    /// Times the log-prob kernels on device-resident f32 logits `[rows, vocab]` and a
    /// device-to-device copy of the same buffer, each as the median over `reps` rounds of 20
    /// back-to-back launches (launch overhead amortised); returns
    /// `(seconds per kernel call, copy GB/s counting read + write)`.
    pub fn bench_logprobs(
        &self,
        rows: usize,
        vocab: usize,
        reps: usize,
    ) -> Result<(f64, f64), KernelError> {
        const BURST: usize = 20;
        let n = rows * vocab;
        let host: Vec<f32> = (0..n).map(|i| (i % 997) as f32 / 100.0).collect();
        let logits = self.stream.clone_htod(&host).map_err(cuda_err)?;
        let mut copy = self.stream.alloc_zeros::<f32>(n).map_err(cuda_err)?;
        let t: Vec<i32> = (0..rows).map(|r| (r * 7919 % vocab) as i32).collect();
        let t = self.stream.clone_htod(&t).map_err(cuda_err)?;
        let alloc = |n: usize| self.stream.alloc_zeros::<f32>(n).map_err(cuda_err);
        let mut partial = alloc(3 * rows * self.logprob_splits(rows, vocab))?;
        let (mut lp, mut ent) = (alloc(rows)?, alloc(rows)?);
        let mut kernel_times = Vec::new();
        let mut copy_times = Vec::new();
        for _ in 0..reps.max(1) + 1 {
            self.stream.synchronize().map_err(cuda_err)?;
            let t0 = std::time::Instant::now();
            for _ in 0..BURST {
                self.launch_logprobs(&logits, 0, vocab, &t, 1.0, &mut partial, &mut lp, &mut ent)?;
            }
            self.stream.synchronize().map_err(cuda_err)?;
            kernel_times.push(t0.elapsed().as_secs_f64() / BURST as f64);
            let t1 = std::time::Instant::now();
            for _ in 0..BURST {
                self.stream
                    .memcpy_dtod(&logits, &mut copy)
                    .map_err(cuda_err)?;
            }
            self.stream.synchronize().map_err(cuda_err)?;
            copy_times.push(t1.elapsed().as_secs_f64() / BURST as f64);
        }
        // The first round warms up (module load, clocks).
        let med = |mut v: Vec<f64>| {
            v.remove(0);
            v.sort_by(f64::total_cmp);
            v[v.len() / 2]
        };
        let copy_s = med(copy_times);
        Ok((med(kernel_times), 2.0 * (n * 4) as f64 / copy_s / 1e9))
    }

    /// Device version of [`super::cpu::sample`].
    pub fn sample(
        &self,
        logits: Logits<'_>,
        vocab: usize,
        keys: &[RowKey],
        p: &SamplingParams,
    ) -> Result<Vec<Sampled>, KernelError> {
        check_rows(logits.len(), vocab, keys.len())?;
        if keys.is_empty() {
            return Ok(vec![]);
        }
        let (d, dtype) = self.upload(logits)?;
        let (ptr, _guard) = match &d {
            DeviceLogits::F32(x) => x.device_ptr(&self.stream),
            DeviceLogits::Half(x) => x.device_ptr(&self.stream),
        };
        // SAFETY: `ptr` holds `keys.len() · vocab` values of `dtype` (checked above), owned by `d`.
        unsafe { self.sample_device(ptr, dtype, vocab, keys, p, &[]) }
    }

    /// Samples from logits already on this device, `[keys.len(), vocab]` at `ptr` (ONNX
    /// Runtime's output, say), after setting the `banned` token ids to −∞ in place; only the
    /// tokens and their log-probs come back to the host. `dtype`: 0 f32, 1 f16, 2 bf16.
    ///
    /// # Safety
    /// `ptr` must point to `keys.len() · vocab` writable values of `dtype` in this device's
    /// primary context, with no other stream using them until this returns.
    pub unsafe fn sample_device(
        &self,
        ptr: cudarc::driver::sys::CUdeviceptr,
        dtype: i32,
        vocab: usize,
        keys: &[RowKey],
        p: &SamplingParams,
        banned: &[u32],
    ) -> Result<Vec<Sampled>, KernelError> {
        if keys.is_empty() {
            return Ok(vec![]);
        }
        if !banned.is_empty() {
            let ids = self.stream.clone_htod(banned).map_err(cuda_err)?;
            let (rows, n) = (keys.len() as u32, banned.len() as u32);
            let vocab64 = vocab as u64;
            let mut b = self.stream.launch_builder(&self.mask_tokens);
            b.arg(&ptr)
                .arg(&dtype)
                .arg(&vocab64)
                .arg(&rows)
                .arg(&ids)
                .arg(&n);
            let total = rows * n;
            let cfg = LaunchConfig {
                grid_dim: (total.div_ceil(BLOCK), 1, 1),
                block_dim: (BLOCK, 1, 1),
                shared_mem_bytes: 0,
            };
            // SAFETY: matches `mask_tokens` in kernels/sample.cu; one thread per (row, id), the
            // caller vouches for `rows · vocab` values at `ptr`.
            unsafe { b.launch(cfg) }.map_err(cuda_err)?;
        }
        let seqs: Vec<u32> = keys.iter().map(|k| k.sequence).collect();
        let steps: Vec<u32> = keys.iter().map(|k| k.step).collect();
        let seqs = self.stream.clone_htod(&seqs).map_err(cuda_err)?;
        let steps = self.stream.clone_htod(&steps).map_err(cuda_err)?;
        let mut tok = self
            .stream
            .alloc_zeros::<u32>(keys.len())
            .map_err(cuda_err)?;
        let mut lp = self
            .stream
            .alloc_zeros::<f32>(keys.len())
            .map_err(cuda_err)?;
        let (vocab64, top_k, seed) = (vocab as u64, p.top_k.min(i32::MAX as usize) as i32, p.seed);
        let mut b = self.stream.launch_builder(&self.sample);
        b.arg(&ptr)
            .arg(&dtype)
            .arg(&vocab64)
            .arg(&seqs)
            .arg(&steps)
            .arg(&p.temperature)
            .arg(&top_k)
            .arg(&p.top_p)
            .arg(&seed)
            .arg(&mut tok)
            .arg(&mut lp);
        // SAFETY: argument list matches `sample_rows` in kernels/sample.cu.
        unsafe { b.launch(Self::rows_config(keys.len())) }.map_err(cuda_err)?;
        let tok = self.stream.clone_dtoh(&tok).map_err(cuda_err)?;
        let lp = self.stream.clone_dtoh(&lp).map_err(cuda_err)?;
        Ok(tok
            .into_iter()
            .zip(lp)
            .map(|(token, logprob)| Sampled { token, logprob })
            .collect())
    }

    /// Device version of [`super::cpu::group_advantages`].
    pub fn group_advantages(
        &self,
        scores: &[f32],
        group: usize,
        cfg: &AdvantageConfig,
    ) -> Result<Vec<f32>, KernelError> {
        check_groups(scores.len(), group)?;
        let groups = (scores.len() / group) as u64;
        let s = self.stream.clone_htod(scores).map_err(cuda_err)?;
        let mut out = self
            .stream
            .alloc_zeros::<f32>(scores.len())
            .map_err(cuda_err)?;
        let (g32, scale) = (group as i32, i32::from(cfg.scale_by_std));
        let mut b = self.stream.launch_builder(&self.advantages);
        b.arg(&s)
            .arg(&groups)
            .arg(&g32)
            .arg(&scale)
            .arg(&cfg.eps)
            .arg(&mut out);
        // SAFETY: matches `group_advantages` in kernels/optim.cu.
        unsafe { b.launch(LaunchConfig::for_num_elems(groups as u32)) }.map_err(cuda_err)?;
        self.stream.clone_dtoh(&out).map_err(cuda_err)
    }

    fn sum_squares_dev(&self, x: &CudaSlice<f32>, n: usize) -> Result<f64, KernelError> {
        let blocks = (n as u32).div_ceil(BLOCK).clamp(1, 1024);
        let mut partial = self
            .stream
            .alloc_zeros::<f64>(blocks as usize)
            .map_err(cuda_err)?;
        let n64 = n as u64;
        let mut b = self.stream.launch_builder(&self.sum_squares);
        b.arg(x).arg(&n64).arg(&mut partial);
        // SAFETY: matches `sum_squares`; `partial` has one slot per block.
        unsafe {
            b.launch(LaunchConfig {
                grid_dim: (blocks, 1, 1),
                block_dim: (BLOCK, 1, 1),
                shared_mem_bytes: 0,
            })
        }
        .map_err(cuda_err)?;
        Ok(self
            .stream
            .clone_dtoh(&partial)
            .map_err(cuda_err)?
            .iter()
            .sum())
    }

    /// Device version of [`super::cpu::global_norm`].
    pub fn global_norm(&self, grads: &[&[f32]]) -> Result<f32, KernelError> {
        let mut total = 0.0;
        for g in grads.iter().filter(|g| !g.is_empty()) {
            let d = self.stream.clone_htod(*g).map_err(cuda_err)?;
            total += self.sum_squares_dev(&d, g.len())?;
        }
        Ok(total.sqrt() as f32)
    }

    /// Device version of [`super::cpu::clip_grad_norm`].
    pub fn clip_grad_norm(
        &self,
        grads: &mut [&mut [f32]],
        max_norm: f32,
    ) -> Result<f32, KernelError> {
        let mut dev = Vec::new();
        let mut total = 0.0;
        for g in grads.iter().filter(|g| !g.is_empty()) {
            let d = self.stream.clone_htod(&**g).map_err(cuda_err)?;
            total += self.sum_squares_dev(&d, g.len())?;
            dev.push(d);
        }
        let norm = total.sqrt() as f32;
        let coef = max_norm / (norm + 1e-6);
        if coef < 1.0 {
            for (g, d) in grads
                .iter_mut()
                .filter(|g| !g.is_empty())
                .zip(dev.iter_mut())
            {
                let n = g.len() as u64;
                let mut b = self.stream.launch_builder(&self.scale);
                b.arg(&mut *d).arg(&n).arg(&coef);
                // SAFETY: matches `scale`.
                unsafe { b.launch(LaunchConfig::for_num_elems(n as u32)) }.map_err(cuda_err)?;
                g.copy_from_slice(&self.stream.clone_dtoh(&*d).map_err(cuda_err)?);
            }
        }
        Ok(norm)
    }

    /// Device version of [`super::cpu::adamw_step`].
    #[allow(clippy::too_many_arguments)]
    pub fn adamw_step(
        &self,
        params: &mut [f32],
        grads: &[f32],
        m: &mut [f32],
        v: &mut [f32],
        step: u32,
        h: &AdamW,
    ) -> Result<(), KernelError> {
        let n = params.len();
        if grads.len() != n || m.len() != n || v.len() != n {
            return Err(KernelError::Shape("AdamW buffers differ in length".into()));
        }
        if n == 0 {
            return Ok(());
        }
        let mut dp = self.stream.clone_htod(&*params).map_err(cuda_err)?;
        let dg = self.stream.clone_htod(grads).map_err(cuda_err)?;
        let mut dm = self.stream.clone_htod(&*m).map_err(cuda_err)?;
        let mut dv = self.stream.clone_htod(&*v).map_err(cuda_err)?;
        let bc1 = 1.0 - f64::from(h.beta1).powi(step as i32);
        let bc2 = 1.0 - f64::from(h.beta2).powi(step as i32);
        let n64 = n as u64;
        let mut b = self.stream.launch_builder(&self.adamw);
        b.arg(&mut dp).arg(&dg).arg(&mut dm).arg(&mut dv).arg(&n64);
        b.arg(&h.lr)
            .arg(&h.beta1)
            .arg(&h.beta2)
            .arg(&h.eps)
            .arg(&h.weight_decay)
            .arg(&bc1)
            .arg(&bc2);
        // SAFETY: matches `adamw` in kernels/optim.cu; all buffers have n elements.
        unsafe { b.launch(LaunchConfig::for_num_elems(n as u32)) }.map_err(cuda_err)?;
        params.copy_from_slice(&self.stream.clone_dtoh(&dp).map_err(cuda_err)?);
        m.copy_from_slice(&self.stream.clone_dtoh(&dm).map_err(cuda_err)?);
        v.copy_from_slice(&self.stream.clone_dtoh(&dv).map_err(cuda_err)?);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The 2-D copy's description is built without touching a device: both sides device
    /// memory at their own pitch.
    #[test]
    fn a_2d_device_copy_names_both_pitches() {
        let c = device_copy_2d(0x2000, 512, 0x1000, 256, 200, 7);
        use cudarc::driver::sys::CUmemorytype::CU_MEMORYTYPE_DEVICE;
        assert_eq!((c.srcDevice, c.srcPitch, c.srcXInBytes), (0x1000, 256, 0));
        assert_eq!((c.dstDevice, c.dstPitch, c.dstY), (0x2000, 512, 0));
        assert_eq!((c.WidthInBytes, c.Height), (200, 7));
        assert!(c.srcMemoryType == CU_MEMORYTYPE_DEVICE && c.dstMemoryType == CU_MEMORYTYPE_DEVICE);
    }
}
