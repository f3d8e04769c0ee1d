//! One copy of a package's weights per process. Packages from `models/export.py` keep every
//! graph's weights in one file, `weights.data`, each tensor once, under one name and in one
//! layout, whichever graphs use it. [`SharedWeights`] maps such files once and hands each
//! session the same tensors through ONNX Runtime's shared initializers (`AddInitializer`), so
//! the decoder, the log-prob graph, the training graph and the embedding read one copy, where
//! each session would otherwise load (or map, and count) its own.
//!
//! ONNX Runtime uses a shared initializer only where it lives on the device the session planned
//! for it (and loads its own copy otherwise): on the CPU the tensors are the mapped file itself;
//! for the CUDA provider ([`SharedWeights::on_cuda`]) each is copied to the GPU once and every
//! session reads that copy.

use crate::model::onnx_edit::{external_initializers, ExternalTensor, ProtoError};
use ort::session::builder::SessionBuilder;
use ort::value::DynValue;
use ort::AsPointer;
use std::collections::HashMap;
use std::path::{Component, Path, PathBuf};
use std::sync::{Arc, Mutex};

/// Where a tensor's bytes lie and what they hold: one value per key, whatever its name.
type Key = (String, u64, u64, u64, Vec<usize>);

/// Memory-mapped weight files and the tensors made over them, shared by every session given
/// them with [`SharedWeights::attach`]. Each session keeps the tensors it was given alive; the
/// mappings live as long as this store, which its owners drop after their sessions.
pub struct SharedWeights {
    /// Before `home` and `maps`: the values point into them.
    values: HashMap<Key, Arc<DynValue>>,
    home: Home,
    maps: HashMap<String, Arc<memmap2::Mmap>>,
    dir: PathBuf,
    bytes: u64,
}

/// Where the tensors live.
enum Home {
    /// The mapped file itself.
    Cpu,
    /// One copy of each tensor on GPU `id`, made through `cuda`'s stream.
    Cuda {
        cuda: crate::kernels::cuda::Cuda,
        id: i32,
        buffers: Vec<cudarc::driver::CudaSlice<u8>>,
    },
}

/// ONNX's element type code and its size in bytes, for the types a weight file holds.
fn element(data_type: u64) -> Option<(ort::sys::ONNXTensorElementDataType, usize)> {
    use ort::sys::ONNXTensorElementDataType as T;
    Some(match data_type {
        1 => (T::ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT, 4),
        2 => (T::ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT8, 1),
        3 => (T::ONNX_TENSOR_ELEMENT_DATA_TYPE_INT8, 1),
        6 => (T::ONNX_TENSOR_ELEMENT_DATA_TYPE_INT32, 4),
        7 => (T::ONNX_TENSOR_ELEMENT_DATA_TYPE_INT64, 8),
        10 => (T::ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT16, 2),
        11 => (T::ONNX_TENSOR_ELEMENT_DATA_TYPE_DOUBLE, 8),
        16 => (T::ONNX_TENSOR_ELEMENT_DATA_TYPE_BFLOAT16, 2),
        _ => return None,
    })
}

/// Why the store could not serve a graph's weights, with the error underneath as its source.
#[derive(Debug, thiserror::Error)]
pub enum WeightsError {
    #[error("{}: cannot read the graph", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{}: cannot list its external weights", path.display())]
    Graph {
        path: PathBuf,
        #[source]
        source: ProtoError,
    },
    /// A weight file a graph names that cannot be opened as a file.
    #[error("{}: cannot open the weights {} reads", path.display(), graph.display())]
    Missing {
        path: PathBuf,
        graph: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// A weight file shorter than the tensors a graph reads from it.
    #[error(
        "{}: {len} bytes, but {} reads its weights up to byte {end}: the file is cut short (an \
         interrupted copy or download? export or copy the package again)",
        path.display(),
        graph.display()
    )]
    Short {
        path: PathBuf,
        graph: PathBuf,
        len: u64,
        end: u64,
    },
    #[error("{}: cannot map it", path.display())]
    Map {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{}: shared initializer {name}", graph.display())]
    Initializer {
        graph: PathBuf,
        name: String,
        #[source]
        source: ort::Error,
    },
    #[error("{name}: copy to the GPU")]
    ToGpu {
        name: String,
        #[source]
        source: cudarc::driver::DriverError,
    },
    /// ONNX Runtime's C API refused to make the tensor (its message: the API gives text).
    #[error("{name}: {msg}")]
    Tensor { name: String, msg: String },
    #[error("shared weights: ONNX Runtime")]
    Ort(#[source] ort::Error),
    #[error("shared weights: the GPU")]
    Gpu(#[source] crate::kernels::KernelError),
}

/// Checks that every weight file the graph at `graph` names is a file that holds each of its
/// tensors (what an interrupted copy breaks), before ONNX Runtime reads them: its own report
/// names a tensor and an offset, not the file, nor that the file is short. A graph that cannot
/// be read or parsed is left to ONNX Runtime, whose error says why. ([`SharedWeights::attach`]
/// checks the same on the tensors it lists.)
pub fn check_external_data(graph: &Path) -> Result<(), WeightsError> {
    let Ok(bytes) = std::fs::read(graph) else {
        return Ok(());
    };
    let Ok(tensors) = external_initializers(&bytes) else {
        return Ok(());
    };
    check_files(graph, &tensors)
}

/// [`check_external_data`] on the external tensors of the graph at `graph`.
fn check_files(graph: &Path, tensors: &[ExternalTensor]) -> Result<(), WeightsError> {
    // The end of the last tensor each file must hold.
    let mut ends: Vec<(&str, u64)> = Vec::new();
    for t in tensors {
        let size = element(t.data_type).map_or(0, |(_, size)| size as u64);
        let length = t
            .length
            .unwrap_or(t.dims.iter().product::<usize>() as u64 * size);
        let end = t.offset.saturating_add(length);
        match ends.iter_mut().find(|(l, _)| *l == t.location) {
            Some((_, e)) => *e = (*e).max(end),
            None => ends.push((&t.location, end)),
        }
    }
    let dir = graph.parent().unwrap_or(Path::new(""));
    for (location, end) in ends {
        let path = dir.join(location);
        let missing = |source| WeightsError::Missing {
            path: path.clone(),
            graph: graph.to_path_buf(),
            source,
        };
        let meta = std::fs::metadata(&path).map_err(missing)?;
        if !meta.is_file() {
            return Err(missing(std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                "not a file",
            )));
        }
        if meta.len() < end {
            return Err(WeightsError::Short {
                path,
                graph: graph.to_path_buf(),
                len: meta.len(),
                end,
            });
        }
    }
    Ok(())
}

/// An error from ONNX Runtime's C API as text (and the status released).
fn status(st: ort::sys::OrtStatusPtr) -> Result<(), String> {
    if st.0.is_null() {
        return Ok(());
    }
    let api = ort::api();
    // SAFETY: a non-null status from the API; its message is a C string owned by it.
    let msg = unsafe {
        let m = (api.GetErrorMessage)(st.0);
        let s = std::ffi::CStr::from_ptr(m).to_string_lossy().into_owned();
        (api.ReleaseStatus)(st.0);
        s
    };
    Err(msg)
}

/// The distinct tensors and bytes `store` has handed to sessions so far; `None` without a
/// store (each session loads its own weights).
pub fn store_size(store: Option<&Arc<Mutex<SharedWeights>>>) -> Option<(usize, u64)> {
    let w = store?.lock().unwrap_or_else(|e| e.into_inner());
    Some((w.tensors(), w.bytes()))
}

impl SharedWeights {
    /// A store for the package in `dir` (the folder its graphs name their data files from).
    pub fn new(dir: &Path) -> SharedWeights {
        SharedWeights {
            values: HashMap::new(),
            home: Home::Cpu,
            maps: HashMap::new(),
            dir: dir.to_path_buf(),
            bytes: 0,
        }
    }

    /// A store whose tensors live on CUDA device `id`, for sessions of the CUDA provider on it:
    /// each tensor copied there once, whichever sessions read it.
    pub fn on_cuda(dir: &Path, id: i32) -> Result<SharedWeights, WeightsError> {
        let cuda =
            crate::kernels::cuda::Cuda::new(id.max(0) as usize).map_err(WeightsError::Gpu)?;
        Ok(SharedWeights {
            home: Home::Cuda {
                cuda,
                id,
                buffers: Vec::new(),
            },
            ..SharedWeights::new(dir)
        })
    }

    /// Distinct bytes handed to sessions so far (each tensor once).
    pub fn bytes(&self) -> u64 {
        self.bytes
    }

    /// Tensors made so far.
    pub fn tensors(&self) -> usize {
        self.values.len()
    }

    /// `b` with every external initializer of the graph at `graph` supplied from the store:
    /// mapped and made into a tensor the first time any graph names it, the same tensor for
    /// every graph after. An initializer the store cannot serve (a file outside the package, a
    /// size that disagrees with its shape, an odd type or alignment) is left to ONNX Runtime,
    /// which reads it itself and reports what is wrong with it. The graph's data files are
    /// checked first, as [`check_external_data`] checks them.
    pub fn attach(
        &mut self,
        mut b: SessionBuilder,
        graph: &Path,
    ) -> Result<SessionBuilder, WeightsError> {
        let bytes = std::fs::read(graph).map_err(|source| WeightsError::Read {
            path: graph.to_path_buf(),
            source,
        })?;
        let tensors = external_initializers(&bytes).map_err(|source| WeightsError::Graph {
            path: graph.to_path_buf(),
            source,
        })?;
        check_files(graph, &tensors)?;
        for t in &tensors {
            let Some(value) = self.value(t)? else {
                continue;
            };
            b = b
                .with_initializer(&t.name, value)
                .map_err(|e| WeightsError::Initializer {
                    graph: graph.to_path_buf(),
                    name: t.name.clone(),
                    source: e.into(),
                })?;
        }
        Ok(b)
    }

    /// The tensor for `t` (made the first time it is asked for), or `None` where the store
    /// cannot serve it.
    fn value(&mut self, t: &ExternalTensor) -> Result<Option<Arc<DynValue>>, WeightsError> {
        let Some((ty, size)) = element(t.data_type) else {
            return Ok(None);
        };
        let rel = Path::new(&t.location);
        if rel.is_absolute() || rel.components().any(|c| c == Component::ParentDir) {
            return Ok(None);
        }
        let map = match self.maps.get(&t.location) {
            Some(m) => m.clone(),
            None => {
                let path = self.dir.join(rel);
                let Ok(file) = std::fs::File::open(&path) else {
                    return Ok(None);
                };
                // SAFETY: the package's weight file is opened read-only and not changed while
                // the process runs (a package is replaced by moving new files in, never by
                // writing into an open one).
                let mut options = memmap2::MmapOptions::new();
                if matches!(self.home, Home::Cpu) {
                    // Read in now: the sessions' first calls then find it resident, and the
                    // memory it takes shows once they are open.
                    options.populate();
                }
                let m = unsafe { options.map(&file) }
                    .map_err(|source| WeightsError::Map { path, source })?;
                let m = Arc::new(m);
                self.maps.insert(t.location.clone(), m.clone());
                m
            }
        };
        let count: usize = t.dims.iter().product();
        let want = (count * size) as u64;
        let length = t
            .length
            .unwrap_or((map.len() as u64).saturating_sub(t.offset));
        let fits = t
            .offset
            .checked_add(length)
            .is_some_and(|end| end <= map.len() as u64);
        if length != want || !fits || t.offset % size as u64 != 0 || count == 0 {
            return Ok(None);
        }
        let key: Key = (
            t.location.clone(),
            t.offset,
            length,
            t.data_type,
            t.dims.clone(),
        );
        if let Some(v) = self.values.get(&key) {
            return Ok(Some(v.clone()));
        }
        use ort::memory::{AllocationDevice, AllocatorType, MemoryInfo, MemoryType};
        let at = t.offset as usize;
        let (data, device) = match &mut self.home {
            // SAFETY: within the mapping (checked above).
            Home::Cpu => (unsafe { map.as_ptr().add(at) } as usize, None),
            Home::Cuda { cuda, id, buffers } => {
                use cudarc::driver::DevicePtr;
                let fail = |source| WeightsError::ToGpu {
                    name: t.name.clone(),
                    source,
                };
                let s = cuda.stream();
                let buf = s.clone_htod(&map[at..at + length as usize]).map_err(fail)?;
                s.synchronize().map_err(fail)?;
                let ptr = buf.device_ptr(s).0 as usize;
                buffers.push(buf);
                (ptr, Some(*id))
            }
        };
        let info = match device {
            None => MemoryInfo::new(
                AllocationDevice::CPU,
                0,
                AllocatorType::Device,
                MemoryType::Default,
            ),
            Some(id) => MemoryInfo::new(
                AllocationDevice::CUDA,
                id,
                AllocatorType::Device,
                MemoryType::Default,
            ),
        }
        .map_err(WeightsError::Ort)?;
        let shape: Vec<i64> = t.dims.iter().map(|d| *d as i64).collect();
        let mut out: *mut ort::sys::OrtValue = std::ptr::null_mut();
        // SAFETY: `data` holds the tensor's bytes (the mapping, checked above, or the device copy
        // of them), which outlive every value made over them (field order); ONNX Runtime only
        // reads initializers.
        let st = unsafe {
            (ort::api().CreateTensorWithDataAsOrtValue)(
                info.ptr(),
                data as *mut std::ffi::c_void,
                length as usize,
                shape.as_ptr(),
                shape.len(),
                ty,
                &mut out,
            )
        };
        let tensor_err = |msg| WeightsError::Tensor {
            name: t.name.clone(),
            msg,
        };
        status(st).map_err(tensor_err)?;
        let ptr = std::ptr::NonNull::new(out).ok_or_else(|| tensor_err("no value".into()))?;
        // SAFETY: a tensor value just created (over host or device memory), owned from here on.
        let value = unsafe { DynValue::from_ptr(ptr, Some(&ort::memory::Allocator::default())) };
        let value = Arc::new(value);
        self.values.insert(key, value.clone());
        self.bytes += length;
        Ok(Some(value))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A weight file that opens but cannot be mapped (here a folder, which Linux opens
    /// read-only) is an error naming it, not a tensor the store leaves out.
    #[test]
    fn a_weight_file_that_cannot_be_mapped_is_named() {
        let dir = std::env::temp_dir().join(format!("ssrl-weights-map-{}", std::process::id()));
        std::fs::create_dir_all(dir.join("weights.data")).unwrap();
        let mut store = SharedWeights::new(&dir);
        let t = ExternalTensor {
            name: "w".into(),
            dims: vec![2, 2],
            data_type: 1,
            location: "weights.data".into(),
            offset: 0,
            length: Some(16),
        };
        let e = store.value(&t).expect_err("a folder cannot be mapped");
        assert!(matches!(e, WeightsError::Map { .. }), "{e:?}");
        assert!(e.to_string().contains("weights.data"), "{e}");
        assert!(std::error::Error::source(&e).is_some(), "{e}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
