//! NumPy `.npy` files, float32 only, for `lbw quantize-tensor`.
//!
//! Only what `numpy.save` writes for a C-order little-endian float32 array is accepted: format
//! version 1.0, `'descr': '<f4'`, `'fortran_order': False`. Anything else is refused with a message
//! saying what to convert, rather than read wrongly.

use std::path::Path;

use crate::error::{Error, Result, read_file};
use crate::model::Tensor;

const MAGIC: &[u8; 6] = b"\x93NUMPY";

/// Parses a `.npy` file's bytes into a tensor.
pub fn read_npy(bytes: &[u8]) -> Result<Tensor> {
    let bad = |msg: String| Error::Input(format!(".npy: {msg}"));
    if bytes.len() < 10 || &bytes[..6] != MAGIC {
        return Err(bad("not a NumPy .npy file (bad magic)".into()));
    }
    if (bytes[6], bytes[7]) != (1, 0) {
        return Err(bad(format!(
            "format version {}.{} is not supported; save with numpy's default version 1.0",
            bytes[6], bytes[7]
        )));
    }
    let header_len = usize::from(u16::from_le_bytes([bytes[8], bytes[9]]));
    let data_start = 10 + header_len;
    let header = bytes
        .get(10..data_start)
        .ok_or_else(|| bad("header runs past the end of the file".into()))?;
    let header = std::str::from_utf8(header).map_err(|_| bad("header is not ASCII text".into()))?;
    let descr = dict_value(header, "descr").ok_or_else(|| bad("header has no 'descr'".into()))?;
    if descr != "'<f4'" && descr != "\"<f4\"" {
        return Err(bad(format!(
            "dtype {descr} is not supported: only little-endian float32 ('<f4'); \
             convert with a.astype('<f4')"
        )));
    }
    let fortran = dict_value(header, "fortran_order")
        .ok_or_else(|| bad("header has no 'fortran_order'".into()))?;
    if fortran != "False" {
        return Err(bad(
            "Fortran-order arrays are not supported; save np.ascontiguousarray(a)".into(),
        ));
    }
    let shape_text =
        dict_value(header, "shape").ok_or_else(|| bad("header has no 'shape'".into()))?;
    let shape = parse_shape(shape_text).ok_or_else(|| bad(format!("bad shape {shape_text}")))?;
    let count = shape
        .iter()
        .try_fold(1usize, |acc, &d| acc.checked_mul(d))
        .ok_or_else(|| bad(format!("shape {shape:?} is too large")))?;
    let data = &bytes[data_start..];
    if count.checked_mul(4) != Some(data.len()) {
        return Err(bad(format!(
            "shape {shape:?} needs {count} float32 values but the file holds {} bytes of data",
            data.len()
        )));
    }
    let values = data
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect();
    Tensor::new(shape, values)
}

pub fn read_npy_file(path: &Path) -> Result<Tensor> {
    let bytes = read_file(path)?;
    read_npy(&bytes).map_err(|e| match e {
        Error::Input(m) => Error::Input(format!("{}: {m}", path.display())),
        other => other,
    })
}

/// Serialises a C-order float32 array as a version 1.0 `.npy`.
pub fn write_npy(shape: &[usize], values: &[f32]) -> Result<Vec<u8>> {
    if shape.iter().try_fold(1usize, |a, &d| a.checked_mul(d)) != Some(values.len()) {
        return Err(Error::Input(format!(
            "shape {shape:?} does not hold {} values",
            values.len()
        )));
    }
    let dims: Vec<String> = shape.iter().map(usize::to_string).collect();
    let shape_text = match dims.len() {
        1 => format!("({},)", dims[0]),
        _ => format!("({})", dims.join(", ")),
    };
    let mut header = format!("{{'descr': '<f4', 'fortran_order': False, 'shape': {shape_text}, }}");
    // Pad with spaces and a final newline so the data starts on a 64-byte boundary, as numpy does.
    let total = (10 + header.len() + 1).next_multiple_of(64);
    while 10 + header.len() + 1 < total {
        header.push(' ');
    }
    header.push('\n');
    let header_len = u16::try_from(header.len())
        .map_err(|_| Error::Input(format!("shape {shape:?} is too long for a .npy header")))?;
    let mut out = Vec::with_capacity(total + 4 * values.len());
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&[1, 0]);
    out.extend_from_slice(&header_len.to_le_bytes());
    out.extend_from_slice(header.as_bytes());
    for v in values {
        out.extend_from_slice(&v.to_le_bytes());
    }
    Ok(out)
}

pub fn write_npy_file(path: &Path, shape: &[usize], values: &[f32]) -> Result<()> {
    let bytes = write_npy(shape, values)?;
    std::fs::write(path, bytes).map_err(|e| Error::io(path, e))
}

/// The raw text of a key's value in numpy's header dict: up to the next top-level comma or brace.
fn dict_value<'a>(header: &'a str, key: &str) -> Option<&'a str> {
    let (_, rest) = header
        .split_once(&format!("'{key}'"))
        .or_else(|| header.split_once(&format!("\"{key}\"")))?;
    let rest = rest.trim_start().strip_prefix(':')?.trim_start();
    let mut depth = 0i32;
    for (i, ch) in rest.char_indices() {
        match ch {
            '(' => depth += 1,
            ')' => {
                depth -= 1;
                if depth == 0 {
                    return Some(rest[..=i].trim());
                }
            }
            ',' | '}' if depth == 0 => return Some(rest[..i].trim()),
            _ => {}
        }
    }
    None
}

/// `()`, `(3,)`, `(2, 3)` -> dimensions.
fn parse_shape(text: &str) -> Option<Vec<usize>> {
    let inner = text.strip_prefix('(')?.strip_suffix(')')?;
    inner
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(|s| s.trim_end_matches('L').parse().ok())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_shapes() {
        for shape in [vec![], vec![3], vec![2, 3], vec![4, 1, 3, 3], vec![0, 5]] {
            let n: usize = shape.iter().product();
            let values: Vec<f32> = (0..n).map(|i| i as f32 * 0.5 - 1.0).collect();
            let bytes = write_npy(&shape, &values).unwrap();
            let header_len = u16::from_le_bytes([bytes[8], bytes[9]]) as usize;
            assert_eq!((10 + header_len) % 64, 0);
            let t = read_npy(&bytes).unwrap();
            assert_eq!(t.shape, shape);
            assert_eq!(t.data, values);
        }
    }

    #[test]
    fn reads_numpy_written_header() {
        // Bytes as numpy 1.26 writes np.array([[1, 2, 3]], dtype='<f4').
        let mut header = "{'descr': '<f4', 'fortran_order': False, 'shape': (1, 3), }".to_string();
        while !(10 + header.len() + 1).is_multiple_of(64) {
            header.push(' ');
        }
        header.push('\n');
        let mut bytes = b"\x93NUMPY\x01\x00".to_vec();
        bytes.extend_from_slice(&(header.len() as u16).to_le_bytes());
        bytes.extend_from_slice(header.as_bytes());
        for v in [1f32, 2.0, 3.0] {
            bytes.extend_from_slice(&v.to_le_bytes());
        }
        let t = read_npy(&bytes).unwrap();
        assert_eq!(t.shape, vec![1, 3]);
        assert_eq!(t.data, vec![1.0, 2.0, 3.0]);
    }

    #[test]
    fn rejects_other_dtypes_orders_and_versions() {
        let good = write_npy(&[2], &[1.0, 2.0]).unwrap();
        for (from, to) in [
            (&b"'<f4'"[..], &b"'<f8'"[..]),
            (b"'<f4'", b"'>f4'"),
            (b"False", b"True "),
        ] {
            let mut bytes = good.clone();
            let at = bytes.windows(from.len()).position(|w| w == from).unwrap();
            bytes[at..at + from.len()].copy_from_slice(to);
            assert!(
                matches!(read_npy(&bytes), Err(Error::Input(_))),
                "{from:?} -> {to:?}"
            );
        }
        let mut v2 = good.clone();
        v2[6] = 2;
        assert!(read_npy(&v2).is_err());
        assert!(read_npy(&good[..good.len() - 1]).is_err());
        assert!(read_npy(&good[..9]).is_err());
        assert!(read_npy(b"PK\x03\x04not npy").is_err());
    }
}
