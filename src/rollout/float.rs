//! The graphs' floating-point types: fp32 for this project's packages; fp16 or bf16 for
//! onnxruntime-genai's half-precision builds (its builder's `-p fp16` / `-p bf16`). The engine
//! works in f32 on the host — pixels, image features, embeddings and logits are converted where
//! they enter or leave a graph — and moves cache values as bytes, whatever their type.

use super::types::{run_err, EngineError};
use half::{bf16, f16};
use ort::memory::MemoryInfo;
use ort::session::{Session, SessionInputValue};
use ort::value::{
    DynTensor, Tensor, TensorElementType as T, TensorRefMut, TensorValueTypeMarker, Value,
};
use std::borrow::Cow;

/// A floating-point tensor type the engine feeds and reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Float {
    F32,
    F16,
    Bf16,
}

impl Float {
    pub(crate) fn of(t: T) -> Option<Float> {
        match t {
            T::Float32 => Some(Float::F32),
            T::Float16 => Some(Float::F16),
            T::Bfloat16 => Some(Float::Bf16),
            _ => None,
        }
    }

    /// The type of `session`'s input `name`; fp32 where it has none of the three.
    pub(crate) fn of_input(session: &Session, name: &str) -> Float {
        session
            .inputs()
            .iter()
            .find(|i| i.name() == name)
            .and_then(|i| i.dtype().tensor_type())
            .and_then(Float::of)
            .unwrap_or(Float::F32)
    }

    /// Bytes per value.
    pub(crate) fn bytes(self) -> usize {
        match self {
            Float::F32 => 4,
            Float::F16 | Float::Bf16 => 2,
        }
    }

    /// A host tensor of `shape`, all zero.
    pub(super) fn zeros(self, shape: &[usize]) -> Result<DynTensor, EngineError> {
        let n = shape.iter().product();
        let dims = dims(shape);
        let t = match self {
            Float::F32 => Tensor::from_array((dims, vec![0f32; n])).map(|t| t.upcast()),
            Float::F16 => Tensor::from_array((dims, vec![f16::ZERO; n])).map(|t| t.upcast()),
            Float::Bf16 => Tensor::from_array((dims, vec![bf16::ZERO; n])).map(|t| t.upcast()),
        };
        t.map_err(run_err("decoder"))
    }

    /// A host tensor of `shape` holding `values` in this type (rounded to the nearest), as an
    /// input of `graph`.
    pub(crate) fn tensor(
        self,
        graph: &'static str,
        shape: &[usize],
        values: Vec<f32>,
    ) -> Result<DynTensor, EngineError> {
        let dims = dims(shape);
        let t = match self {
            Float::F32 => Tensor::from_array((dims, values)).map(|t| t.upcast()),
            Float::F16 => {
                let v: Vec<f16> = values.into_iter().map(f16::from_f32).collect();
                Tensor::from_array((dims, v)).map(|t| t.upcast())
            }
            Float::Bf16 => {
                let v: Vec<bf16> = values.into_iter().map(bf16::from_f32).collect();
                Tensor::from_array((dims, v)).map(|t| t.upcast())
            }
        };
        t.map_err(run_err(graph))
    }

    /// An input of `shape` over the buffer at `data` (host, or a device's with `info`), read
    /// and written in place.
    ///
    /// # Safety
    /// `data` must hold `shape`'s values of this type, and stay alive and unaliased for as
    /// long as the view is used.
    pub(super) unsafe fn view<'a>(
        self,
        info: MemoryInfo,
        data: *mut std::ffi::c_void,
        shape: &[usize],
    ) -> Result<SessionInputValue<'a>, EngineError> {
        let shape = ort::value::Shape::new(shape.iter().map(|&d| d as i64));
        // SAFETY: the caller vouches for the buffer.
        let v: SessionInputValue<'a> = unsafe {
            match self {
                Float::F32 => TensorRefMut::<f32>::from_raw(info, data.cast(), shape)
                    .map(SessionInputValue::from),
                Float::F16 => TensorRefMut::<f16>::from_raw(info, data.cast(), shape)
                    .map(SessionInputValue::from),
                Float::Bf16 => TensorRefMut::<bf16>::from_raw(info, data.cast(), shape)
                    .map(SessionInputValue::from),
            }
        }
        .map_err(run_err("decoder"))?;
        Ok(v)
    }
}

fn dims(shape: &[usize]) -> Vec<i64> {
    shape.iter().map(|&d| d as i64).collect()
}

/// The type of a tensor's values.
pub(super) fn float_of<M: TensorValueTypeMarker + ?Sized>(
    v: &Value<M>,
    graph: &'static str,
) -> Result<Float, EngineError> {
    let ty = v.dtype().tensor_type();
    ty.and_then(Float::of).ok_or_else(|| EngineError::Run {
        graph,
        msg: format!("a tensor of {ty:?}, not fp32, fp16 or bf16"),
    })
}

/// A host tensor's values as f32: borrowed when they are, widened from half precision.
pub(super) fn values_f32<'v, M: TensorValueTypeMarker + ?Sized>(
    v: &'v Value<M>,
    graph: &'static str,
) -> Result<Cow<'v, [f32]>, EngineError> {
    Ok(match float_of(v, graph)? {
        Float::F32 => Cow::Borrowed(v.try_extract_tensor::<f32>().map_err(run_err(graph))?.1),
        Float::F16 => {
            let (_, h) = v.try_extract_tensor::<f16>().map_err(run_err(graph))?;
            Cow::Owned(h.iter().map(|x| x.to_f32()).collect())
        }
        Float::Bf16 => {
            let (_, h) = v.try_extract_tensor::<bf16>().map_err(run_err(graph))?;
            Cow::Owned(h.iter().map(|x| x.to_f32()).collect())
        }
    })
}

/// Values whose bytes may be read and written as such: no padding, and every bit pattern is a
/// value.
trait Plain: Copy {}
impl Plain for f32 {}
impl Plain for f16 {}
impl Plain for bf16 {}

fn as_bytes<P: Plain>(s: &[P]) -> &[u8] {
    // SAFETY: `P` is plain (no padding), so its values are `size_of_val(s)` initialised bytes.
    unsafe { std::slice::from_raw_parts(s.as_ptr().cast(), std::mem::size_of_val(s)) }
}

fn as_bytes_mut<P: Plain>(s: &mut [P]) -> &mut [u8] {
    // SAFETY: as in `as_bytes`; any bytes written make valid values of a plain type.
    unsafe { std::slice::from_raw_parts_mut(s.as_mut_ptr().cast(), std::mem::size_of_val(s)) }
}

/// A host tensor's values as bytes.
pub(super) fn bytes(v: &DynTensor) -> Result<&[u8], EngineError> {
    let e = run_err("decoder");
    Ok(match float_of(v, "decoder")? {
        Float::F32 => as_bytes(v.try_extract_tensor::<f32>().map_err(e)?.1),
        Float::F16 => as_bytes(v.try_extract_tensor::<f16>().map_err(e)?.1),
        Float::Bf16 => as_bytes(v.try_extract_tensor::<bf16>().map_err(e)?.1),
    })
}

/// A host tensor's values as bytes, to write.
pub(super) fn bytes_mut(v: &mut DynTensor) -> Result<&mut [u8], EngineError> {
    let e = run_err("decoder");
    Ok(match float_of(v, "decoder")? {
        Float::F32 => as_bytes_mut(v.try_extract_tensor_mut::<f32>().map_err(e)?.1),
        Float::F16 => as_bytes_mut(v.try_extract_tensor_mut::<f16>().map_err(e)?.1),
        Float::Bf16 => as_bytes_mut(v.try_extract_tensor_mut::<bf16>().map_err(e)?.1),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Values round-trip through each type within its precision, zeros are zero, and the
    /// bytes are the values' own.
    #[test]
    fn tensors_convert_at_the_boundary_and_move_as_bytes() {
        let v = vec![1.0f32, -2.5, 0.1, 65504.0];
        for (ty, tol) in [(Float::F32, 0.0), (Float::F16, 1e-3), (Float::Bf16, 8e-3)] {
            let t = ty.tensor("decoder", &[2, 2], v.clone()).unwrap();
            assert_eq!(float_of(&t, "decoder").unwrap(), ty);
            let back = values_f32(&t, "decoder").unwrap();
            for (a, b) in v.iter().zip(back.iter()) {
                assert!((a - b).abs() <= tol * a.abs(), "{ty:?}: {a} → {b}");
            }
            assert_eq!(bytes(&t).unwrap().len(), 4 * ty.bytes());
            let mut z = ty.zeros(&[2, 2]).unwrap();
            assert!(bytes(&z).unwrap().iter().all(|&b| b == 0));
            bytes_mut(&mut z)
                .unwrap()
                .copy_from_slice(bytes(&t).unwrap());
            assert_eq!(values_f32(&z, "decoder").unwrap(), back);
        }
        let f16_bytes = bytes(&Float::F16.tensor("decoder", &[1], vec![1.0]).unwrap())
            .unwrap()
            .to_vec();
        assert_eq!(f16_bytes, f16::ONE.to_bits().to_ne_bytes());
    }
}
