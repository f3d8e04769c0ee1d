//! Minimal reader for NumPy `.npy` files (format versions 1–3): the numeric dtypes depth and
//! mask files use, C or Fortran order, returned as `f32` with the shape.

use std::path::Path;

#[derive(Debug, thiserror::Error)]
pub enum NpyError {
    #[error("not a .npy file (bad magic)")]
    Magic,
    #[error("malformed .npy header: {0}")]
    Header(String),
    #[error("unsupported dtype {0:?}")]
    Dtype(String),
    #[error("truncated data: expected {expected} bytes, found {found}")]
    Truncated { expected: usize, found: usize },
    #[error(transparent)]
    Io(#[from] std::io::Error),
}

#[derive(Debug, Clone)]
pub struct NpyArray {
    pub shape: Vec<usize>,
    /// Values in C (row-major) order.
    pub data: Vec<f32>,
}

fn header_value<'a>(h: &'a str, key: &str) -> Option<&'a str> {
    let k = format!("'{key}':");
    let i = h.find(&k)? + k.len();
    Some(h[i..].trim_start())
}

pub fn read(path: &Path) -> Result<NpyArray, NpyError> {
    parse(&std::fs::read(path)?)
}

pub fn parse(bytes: &[u8]) -> Result<NpyArray, NpyError> {
    if bytes.len() < 10 || &bytes[..6] != b"\x93NUMPY" {
        return Err(NpyError::Magic);
    }
    let major = bytes[6];
    let (hlen, off) = if major == 1 {
        (usize::from(u16::from_le_bytes([bytes[8], bytes[9]])), 10)
    } else {
        if bytes.len() < 12 {
            return Err(NpyError::Magic);
        }
        (
            u32::from_le_bytes([bytes[8], bytes[9], bytes[10], bytes[11]]) as usize,
            12,
        )
    };
    let header = bytes
        .get(off..off + hlen)
        .ok_or_else(|| NpyError::Header("header runs past end of file".into()))?;
    let h = std::str::from_utf8(header).map_err(|e| NpyError::Header(e.to_string()))?;
    let descr = header_value(h, "descr").ok_or_else(|| NpyError::Header("no descr".into()))?;
    let descr = descr
        .strip_prefix('\'')
        .and_then(|s| s.split('\'').next())
        .ok_or_else(|| NpyError::Header("bad descr".into()))?
        .to_string();
    let fortran = header_value(h, "fortran_order")
        .map(|v| v.starts_with("True"))
        .unwrap_or(false);
    let shape_s = header_value(h, "shape").ok_or_else(|| NpyError::Header("no shape".into()))?;
    let inner = shape_s
        .strip_prefix('(')
        .and_then(|s| s.split(')').next())
        .ok_or_else(|| NpyError::Header("bad shape".into()))?;
    let shape: Vec<usize> = inner
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(|s| {
            s.parse::<usize>()
                .map_err(|e| NpyError::Header(format!("shape: {e}")))
        })
        .collect::<Result<_, _>>()?;
    let n: usize = shape.iter().product();
    let body = &bytes[off + hlen..];
    let (size, little) = match descr.as_bytes().first() {
        Some(b'<') | Some(b'|') | Some(b'=') => (&descr[1..], true),
        Some(b'>') => (&descr[1..], false),
        _ => (descr.as_str(), true),
    };
    let width = match size {
        "f4" | "i4" | "u4" => 4,
        "f8" | "i8" | "u8" => 8,
        "f2" | "i2" | "u2" => 2,
        "b1" | "u1" | "i1" => 1,
        _ => return Err(NpyError::Dtype(descr.clone())),
    };
    if body.len() < n * width {
        return Err(NpyError::Truncated {
            expected: n * width,
            found: body.len(),
        });
    }
    // One loop per element type and byte order, each monomorphised (the conversion inlined
    // into the loop: a little-endian `f4` body becomes a copy).
    fn elems<const W: usize>(body: &[u8], little: bool, f: impl Fn([u8; W]) -> f32) -> Vec<f32> {
        let chunks = body.chunks_exact(W);
        let word = |c: &[u8]| -> [u8; W] { c.try_into().expect("chunks of W bytes") };
        if little {
            chunks.map(|c| f(word(c))).collect()
        } else {
            chunks
                .map(|c| {
                    let mut b = word(c);
                    b.reverse();
                    f(b)
                })
                .collect()
        }
    }
    let body = &body[..n * width];
    let mut data: Vec<f32> = match size {
        "f4" => elems::<4>(body, little, f32::from_le_bytes),
        "f8" => elems::<8>(body, little, |b| f64::from_le_bytes(b) as f32),
        "f2" => elems::<2>(body, little, |b| half_to_f32(u16::from_le_bytes(b))),
        "i4" => elems::<4>(body, little, |b| i32::from_le_bytes(b) as f32),
        "u4" => elems::<4>(body, little, |b| u32::from_le_bytes(b) as f32),
        "i8" => elems::<8>(body, little, |b| i64::from_le_bytes(b) as f32),
        "u8" => elems::<8>(body, little, |b| u64::from_le_bytes(b) as f32),
        "i2" => elems::<2>(body, little, |b| f32::from(i16::from_le_bytes(b))),
        "u2" => elems::<2>(body, little, |b| f32::from(u16::from_le_bytes(b))),
        "i1" => elems::<1>(body, little, |b| f32::from(b[0] as i8)),
        _ => elems::<1>(body, little, |b| f32::from(b[0])),
    };
    if fortran && shape.len() > 1 {
        // Reorder column-major to row-major.
        let mut out = vec![0f32; n];
        let nd = shape.len();
        let mut idx = vec![0usize; nd];
        for (i, v) in data.iter().enumerate() {
            // i is the Fortran linear index; idx its multi-index.
            let mut c = 0;
            for d in 0..nd {
                c = c * shape[d] + idx[d];
            }
            out[c] = *v;
            let _ = i;
            for d in 0..nd {
                idx[d] += 1;
                if idx[d] < shape[d] {
                    break;
                }
                idx[d] = 0;
            }
        }
        data = out;
    }
    Ok(NpyArray { shape, data })
}

fn half_to_f32(h: u16) -> f32 {
    let s = u32::from(h >> 15) << 31;
    let e = (h >> 10) & 0x1f;
    let m = u32::from(h & 0x3ff);
    let bits = match e {
        0 if m == 0 => s,
        0 => {
            // subnormal
            let mut e = 127 - 15 + 1;
            let mut m = m;
            while m & 0x400 == 0 {
                m <<= 1;
                e -= 1;
            }
            s | ((e as u32) << 23) | ((m & 0x3ff) << 13)
        }
        31 => s | 0x7f80_0000 | (m << 13),
        _ => s | ((u32::from(e) + 127 - 15) << 23) | (m << 13),
    };
    f32::from_bits(bits)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn npy(descr: &str, shape: &str, fortran: bool, body: &[u8]) -> Vec<u8> {
        let mut h = format!(
            "{{'descr': '{descr}', 'fortran_order': {}, 'shape': {shape}, }}",
            if fortran { "True" } else { "False" }
        );
        while (10 + h.len() + 1) % 64 != 0 {
            h.push(' ');
        }
        h.push('\n');
        let mut v = b"\x93NUMPY\x01\x00".to_vec();
        v.extend_from_slice(&(h.len() as u16).to_le_bytes());
        v.extend_from_slice(h.as_bytes());
        v.extend_from_slice(body);
        v
    }

    #[test]
    fn reads_f4_u2_bool_and_fortran() {
        let body: Vec<u8> = [1.5f32, -2.0, 3.25]
            .iter()
            .flat_map(|f| f.to_le_bytes())
            .collect();
        let a = parse(&npy("<f4", "(3,)", false, &body)).unwrap();
        assert_eq!(a.data, vec![1.5, -2.0, 3.25]);
        let body: Vec<u8> = [1000u16, 0, 65535]
            .iter()
            .flat_map(|f| f.to_le_bytes())
            .collect();
        assert_eq!(
            parse(&npy("<u2", "(1, 3)", false, &body)).unwrap().data,
            vec![1000.0, 0.0, 65535.0]
        );
        assert_eq!(
            parse(&npy("|b1", "(2,)", false, &[1, 0])).unwrap().data,
            vec![1.0, 0.0]
        );
        // Fortran 2x3 [[1,2,3],[4,5,6]] is stored column-major 1,4,2,5,3,6.
        let body: Vec<u8> = [1f32, 4., 2., 5., 3., 6.]
            .iter()
            .flat_map(|f| f.to_le_bytes())
            .collect();
        let a = parse(&npy("<f4", "(2, 3)", true, &body)).unwrap();
        assert_eq!(a.data, vec![1., 2., 3., 4., 5., 6.]);
        let body: Vec<u8> = [1.0f64].iter().flat_map(|f| f.to_be_bytes()).collect();
        assert_eq!(
            parse(&npy(">f8", "(1,)", false, &body)).unwrap().data,
            vec![1.0]
        );
    }

    #[test]
    fn reads_every_width_in_both_byte_orders() {
        let be: Vec<u8> = [2.5f32, -0.125]
            .iter()
            .flat_map(|f| f.to_be_bytes())
            .collect();
        assert_eq!(
            parse(&npy(">f4", "(2,)", false, &be)).unwrap().data,
            vec![2.5, -0.125]
        );
        let le: Vec<u8> = [-300i16, 7].iter().flat_map(|f| f.to_le_bytes()).collect();
        assert_eq!(
            parse(&npy("<i2", "(2,)", false, &le)).unwrap().data,
            vec![-300.0, 7.0]
        );
        let be: Vec<u8> = [40000u16, 1].iter().flat_map(|f| f.to_be_bytes()).collect();
        assert_eq!(
            parse(&npy(">u2", "(2,)", false, &be)).unwrap().data,
            vec![40000.0, 1.0]
        );
        assert_eq!(
            parse(&npy("|i1", "(2,)", false, &[0xFF, 5])).unwrap().data,
            vec![-1.0, 5.0]
        );
        // f16 1.5 = 0x3E00, -2 = 0xC000.
        let le: Vec<u8> = [0x3E00u16, 0xC000]
            .iter()
            .flat_map(|f| f.to_le_bytes())
            .collect();
        assert_eq!(
            parse(&npy("<f2", "(2,)", false, &le)).unwrap().data,
            vec![1.5, -2.0]
        );
        let le: Vec<u8> = [-5i64, 1 << 40]
            .iter()
            .flat_map(|f| f.to_le_bytes())
            .collect();
        assert_eq!(
            parse(&npy("<i8", "(2,)", false, &le)).unwrap().data,
            vec![-5.0, (1u64 << 40) as f32]
        );
    }

    #[test]
    fn rejects_truncated_and_garbage() {
        assert!(matches!(parse(b"PNG....garbage"), Err(NpyError::Magic)));
        let body = [0u8; 4];
        assert!(matches!(
            parse(&npy("<f4", "(3,)", false, &body)),
            Err(NpyError::Truncated { .. })
        ));
        assert!(matches!(
            parse(&npy("<c8", "(1,)", false, &[0; 8])),
            Err(NpyError::Dtype(_))
        ));
    }
}
