//! Bit packing of codes at `b` bits per weight.
//!
//! Weight `k`'s field ([`Code::to_field`]) occupies bits `k*b .. k*b + b` of the stream, where bit `i`
//! of the stream is bit `i % 8` (least significant first) of byte `i / 8`. Bits past the last field
//! in the final byte are zero.

use super::{Bits, Code};
use crate::error::{Error, Result};

/// Bytes needed for `count` codes at `bits` bits each.
pub fn packed_len(count: usize, bits: Bits) -> usize {
    // count * b / 8 rounded up, without overflowing for any count that fits in memory.
    let b = usize::from(bits.get());
    (count / 8) * b + ((count % 8) * b).div_ceil(8)
}

pub fn pack_codes(codes: &[Code], bits: Bits) -> Vec<u8> {
    let b = u32::from(bits.get());
    let mut out = Vec::with_capacity(packed_len(codes.len(), bits));
    // A 64-bit accumulator: at most 7 pending bits plus one 8-bit field never overflow it.
    let mut acc: u64 = 0;
    let mut pending: u32 = 0;
    for &c in codes {
        acc |= u64::from(c.to_field(bits)) << pending;
        pending += b;
        while pending >= 8 {
            out.push(acc as u8);
            acc >>= 8;
            pending -= 8;
        }
    }
    if pending > 0 {
        out.push(acc as u8);
    }
    out
}

/// Unpacks `count` codes. `bytes` must be exactly [`packed_len`] long, every field must be a code of
/// the set and the padding bits zero; anything else is an [`Error::Model`] (a corrupt file).
pub fn unpack_codes(bytes: &[u8], count: usize, bits: Bits) -> Result<Vec<Code>> {
    let need = packed_len(count, bits);
    if bytes.len() != need {
        return Err(Error::Model(format!(
            "{count} codes at {bits} bits need {need} bytes, got {}",
            bytes.len()
        )));
    }
    let b = u32::from(bits.get());
    let mask = (1u64 << b) - 1;
    let mut out = Vec::with_capacity(count);
    let mut acc: u64 = 0;
    let mut have: u32 = 0;
    let mut next = bytes.iter();
    for k in 0..count {
        while have < b {
            // The length check above guarantees the bytes are there.
            let byte = next.next().copied().unwrap_or(0);
            acc |= u64::from(byte) << have;
            have += 8;
        }
        let field = (acc & mask) as u32;
        acc >>= b;
        have -= b;
        out.push(Code::from_field(field, bits).ok_or_else(|| {
            Error::Model(format!(
                "code {k} has the field {field:#x}, which is not in the {bits}-bit set"
            ))
        })?);
    }
    if acc != 0 || next.next().is_some() {
        return Err(Error::Model("non-zero padding after the last code".into()));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lengths() {
        let b3 = Bits::new(3).unwrap();
        assert_eq!(packed_len(0, b3), 0);
        assert_eq!(packed_len(1, b3), 1);
        assert_eq!(packed_len(8, b3), 3);
        assert_eq!(packed_len(9, b3), 4);
        assert_eq!(
            packed_len(usize::MAX / 4, Bits::new(8).unwrap()),
            usize::MAX / 4
        );
    }

    #[test]
    fn known_layout() {
        let b2 = Bits::new(2).unwrap();
        // +1 = 01, -1 = 11, 0 = 00, +1 = 01 -> 0b01_00_11_01
        let codes = [
            Code::new(false, 0),
            Code::new(true, 0),
            Code::ZERO,
            Code::new(false, 0),
        ];
        assert_eq!(pack_codes(&codes, b2), vec![0b0100_1101]);
        assert_eq!(unpack_codes(&[0b0100_1101], 4, b2).unwrap(), codes);
        // Negative zero (10) is rejected, as is non-zero padding.
        assert!(unpack_codes(&[0b0000_0010], 1, b2).is_err());
        assert!(unpack_codes(&[0b0100_0001], 1, b2).is_err());
        assert!(unpack_codes(&[0b01], 1, b2).is_ok());
        assert!(unpack_codes(&[0b01, 0], 1, b2).is_err());
    }
}
