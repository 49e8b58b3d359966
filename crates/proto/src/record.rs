//! Type-length-value framing shared by the IPC streams and the queue file.
//!
//! A record is one type octet, a big-endian `u32` payload length, and the
//! payload. Inside a payload, variable fields are a big-endian `u16` length
//! and the bytes. Readers are given a maximum payload length up front, so a
//! hostile length field is rejected before anything is allocated.

use thiserror::Error;

/// Bytes in a record header: type octet plus `u32` length.
pub const RECORD_HEADER_LEN: usize = 5;

/// A decoded record borrowing its payload from the input.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RawRecord<'a> {
    pub kind: u8,
    pub payload: &'a [u8],
}

/// Why a byte stream is not a valid sequence of records or fields.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum FrameError {
    #[error("record of type {kind:#04x} declares {len} bytes, more than the limit of {limit}")]
    Oversized { kind: u8, len: usize, limit: usize },
    #[error("input ends inside a record")]
    Truncated,
    #[error("field declares {len} bytes but only {left} remain in the record")]
    FieldOverrun { len: usize, left: usize },
    #[error("{left} unexpected bytes after the last field of the record")]
    TrailingBytes { left: usize },
    #[error("field is not valid UTF-8")]
    NotUtf8,
    #[error("field of {len} bytes exceeds the field limit of {limit}")]
    FieldTooLong { len: usize, limit: usize },
}

/// Appends one record to `out`.
///
/// # Panics
/// If the payload is longer than `u32::MAX`: callers bound their payloads far
/// below that, so reaching it is a programming error.
pub fn put_record(out: &mut Vec<u8>, kind: u8, payload: &[u8]) {
    out.extend_from_slice(&record_header(kind, payload.len()));
    out.extend_from_slice(payload);
}

/// The header of a record of `kind` with `len` octets of payload, for
/// writers that send the payload from where it is.
pub fn record_header(kind: u8, len: usize) -> [u8; RECORD_HEADER_LEN] {
    let len = u32::try_from(len).expect("record payload exceeds u32::MAX");
    let [a, b, c, d] = len.to_be_bytes();
    [kind, a, b, c, d]
}

/// Parses the record at the start of `input`.
///
/// Returns `Ok(None)` when more bytes are needed (incremental readers), the
/// record and the number of bytes it used otherwise.
pub fn take_record(input: &[u8], max_payload: usize) -> Result<Option<(RawRecord<'_>, usize)>, FrameError> {
    if input.len() < RECORD_HEADER_LEN {
        return Ok(None);
    }
    let kind = input[0];
    let len = u32::from_be_bytes([input[1], input[2], input[3], input[4]]) as usize;
    if len > max_payload {
        return Err(FrameError::Oversized { kind, len, limit: max_payload });
    }
    let end = RECORD_HEADER_LEN + len;
    if input.len() < end {
        return Ok(None);
    }
    Ok(Some((RawRecord { kind, payload: &input[RECORD_HEADER_LEN..end] }, end)))
}

/// Builds a payload out of length-prefixed fields.
#[derive(Debug, Default)]
pub struct Fields {
    buf: Vec<u8>,
}

impl Fields {
    pub fn new() -> Self {
        Self::default()
    }

    /// Appends a byte field.
    ///
    /// # Panics
    /// If the field is longer than `u16::MAX`; every field type has a
    /// documented limit far below that.
    pub fn bytes(mut self, value: &[u8]) -> Self {
        let len = u16::try_from(value.len()).expect("field exceeds u16::MAX");
        self.buf.extend_from_slice(&len.to_be_bytes());
        self.buf.extend_from_slice(value);
        self
    }

    pub fn str(self, value: &str) -> Self {
        self.bytes(value.as_bytes())
    }

    pub fn u8(mut self, value: u8) -> Self {
        self.buf.push(value);
        self
    }

    pub fn u32(mut self, value: u32) -> Self {
        self.buf.extend_from_slice(&value.to_be_bytes());
        self
    }

    pub fn u64(mut self, value: u64) -> Self {
        self.buf.extend_from_slice(&value.to_be_bytes());
        self
    }

    pub fn finish(self) -> Vec<u8> {
        self.buf
    }
}

/// Reads the fields of one payload, in order, then insists nothing is left.
#[derive(Debug)]
pub struct FieldReader<'a> {
    rest: &'a [u8],
}

impl<'a> FieldReader<'a> {
    pub fn new(payload: &'a [u8]) -> Self {
        Self { rest: payload }
    }

    fn take(&mut self, len: usize) -> Result<&'a [u8], FrameError> {
        if self.rest.len() < len {
            return Err(FrameError::FieldOverrun { len, left: self.rest.len() });
        }
        let (head, tail) = self.rest.split_at(len);
        self.rest = tail;
        Ok(head)
    }

    pub fn bytes(&mut self, limit: usize) -> Result<&'a [u8], FrameError> {
        let len_bytes = self.take(2)?;
        let len = u16::from_be_bytes([len_bytes[0], len_bytes[1]]) as usize;
        if len > limit {
            return Err(FrameError::FieldTooLong { len, limit });
        }
        self.take(len)
    }

    pub fn str(&mut self, limit: usize) -> Result<&'a str, FrameError> {
        std::str::from_utf8(self.bytes(limit)?).map_err(|_| FrameError::NotUtf8)
    }

    pub fn u8(&mut self) -> Result<u8, FrameError> {
        Ok(self.take(1)?[0])
    }

    pub fn u32(&mut self) -> Result<u32, FrameError> {
        let b = self.take(4)?;
        Ok(u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    }

    pub fn u64(&mut self) -> Result<u64, FrameError> {
        let b = self.take(8)?;
        let mut a = [0u8; 8];
        a.copy_from_slice(b);
        Ok(u64::from_be_bytes(a))
    }

    /// Ends the read: a payload with bytes beyond its last field is malformed.
    pub fn finish(self) -> Result<(), FrameError> {
        if self.rest.is_empty() { Ok(()) } else { Err(FrameError::TrailingBytes { left: self.rest.len() }) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_incremental() {
        let mut out = Vec::new();
        put_record(&mut out, b'S', b"alice@example.test");
        for cut in 0..out.len() {
            assert_eq!(take_record(&out[..cut], 64), Ok(None), "cut at {cut}");
        }
        let (rec, used) = take_record(&out, 64).unwrap().unwrap();
        assert_eq!((rec.kind, rec.payload, used), (b'S', &b"alice@example.test"[..], out.len()));
    }

    #[test]
    fn oversized_rejected_before_payload_arrives() {
        let header = [b'M', 0xff, 0xff, 0xff, 0xff];
        assert!(matches!(take_record(&header, 1024), Err(FrameError::Oversized { .. })));
    }

    #[test]
    fn fields_strict() {
        let p = Fields::new().str("a").u32(7).finish();
        let mut r = FieldReader::new(&p);
        assert_eq!(r.str(10).unwrap(), "a");
        assert_eq!(r.u32().unwrap(), 7);
        r.finish().unwrap();

        let mut r = FieldReader::new(&p);
        r.str(10).unwrap();
        assert!(matches!(r.finish(), Err(FrameError::TrailingBytes { left: 4 })));

        let mut r = FieldReader::new(&p);
        assert!(matches!(r.str(0), Err(FrameError::FieldTooLong { .. })));

        let bad = Fields::new().bytes(&[0xff, 0xfe]).finish();
        assert_eq!(FieldReader::new(&bad).str(10), Err(FrameError::NotUtf8));

        let short = [0u8, 9, b'x'];
        assert!(matches!(FieldReader::new(&short).bytes(100), Err(FrameError::FieldOverrun { .. })));
    }
}
