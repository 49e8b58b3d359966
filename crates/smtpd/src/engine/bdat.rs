//! The BDAT chunk decoder (RFC 3030): chunk octets in, content out.
//!
//! A chunk is exactly as long as its BDAT command says and is never
//! dot-unstuffed, so there is no terminator to confuse and no smuggling
//! through the chunk boundaries themselves. What remains is what the
//! content would do further down the line: a message with bare line
//! endings that a later hop relays with DATA could be cut there. So for a
//! `7BIT` or `8BITMIME` body the DATA rules hold across the whole message
//! (all chunks, boundaries anywhere): a bare `<CR>` is refused, a bare
//! `<LF>` is refused or, with `bare_newline = normalize`, passed on as
//! `<CR><LF>`, and a text line is at most [`MAX_TEXT_LINE`] octets. A
//! `BINARYMIME` body is opaque octets by definition (RFC 3030 3) and is
//! passed on untouched.
//!
//! Size is not this decoder's business: the session checks each chunk's
//! declared size against `message_size_limit` before reading it.

use super::data::{ContentError, MAX_TEXT_LINE};

/// Octets of content a text line may hold before its `<CR><LF>`.
const MAX_LINE_CONTENT: usize = MAX_TEXT_LINE - 2;

/// How chunk content is treated.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChunkPolicy {
    /// `BODY=BINARYMIME`: any octets.
    Binary,
    /// Text lines ending in `<CR><LF>`; `normalize` takes a bare `<LF>`
    /// as one.
    Text { normalize: bool },
}

/// Checks (and, when normalizing, rewrites) the content of all chunks of
/// one message.
#[derive(Debug, Clone)]
pub struct ChunkDecoder {
    policy: ChunkPolicy,
    /// The previous octet was a `<CR>` (held back until its `<LF>` comes).
    cr: bool,
    line_len: usize,
    error: Option<ContentError>,
}

impl ChunkDecoder {
    pub fn new(policy: ChunkPolicy) -> Self {
        Self { policy, cr: false, line_len: 0, error: None }
    }

    /// The first problem found so far.
    pub fn error(&self) -> Option<ContentError> {
        self.error
    }

    /// Decodes the next piece of chunk content, appending what is passed
    /// on to `out`; nothing is passed on once an error was found.
    pub fn decode(&mut self, input: &[u8], out: &mut Vec<u8>) {
        let ChunkPolicy::Text { normalize } = self.policy else {
            return out.extend_from_slice(input);
        };
        let mut i = 0;
        while let Some(&b) = input.get(i) {
            if self.error.is_some() {
                return;
            }
            // Ordinary octets up to the next <CR> or <LF> are copied in one
            // piece, as far as the line limit allows.
            if !self.cr {
                let run = memchr::memchr2(b'\r', b'\n', &input[i..]).unwrap_or(input.len() - i);
                let room = MAX_LINE_CONTENT.saturating_sub(self.line_len);
                if run > 0 {
                    let take = run.min(room);
                    out.extend_from_slice(&input[i..i + take]);
                    self.line_len += take;
                    i += take;
                    if take < run {
                        self.error = Some(ContentError::LineTooLong);
                    }
                    continue;
                }
            }
            i += 1;
            match (self.cr, b) {
                (true, b'\n') => self.line_end(out),
                (true, _) => self.error = Some(ContentError::BareCr),
                (false, b'\r') => self.cr = true,
                (false, b'\n') if normalize => self.line_end(out),
                (false, b'\n') => self.error = Some(ContentError::BareLf),
                (false, _) if self.line_len >= MAX_LINE_CONTENT => self.error = Some(ContentError::LineTooLong),
                (false, _) => {
                    self.line_len += 1;
                    out.push(b);
                }
            }
        }
    }

    /// The message is complete (after `BDAT ... LAST`): a `<CR>` still held
    /// back ends the content bare.
    pub fn finish(&mut self) -> Option<ContentError> {
        if self.cr {
            self.error.get_or_insert(ContentError::BareCr);
        }
        self.error
    }

    fn line_end(&mut self, out: &mut Vec<u8>) {
        out.extend_from_slice(b"\r\n");
        self.cr = false;
        self.line_len = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Decodes `chunks` in order, and again octet by octet; both must agree.
    fn decode(policy: ChunkPolicy, chunks: &[&[u8]]) -> (Vec<u8>, Option<ContentError>) {
        let mut whole = ChunkDecoder::new(policy);
        let mut out = Vec::new();
        for c in chunks {
            whole.decode(c, &mut out);
        }
        let mut split = ChunkDecoder::new(policy);
        let mut out2 = Vec::new();
        for b in chunks.concat() {
            split.decode(&[b], &mut out2);
        }
        assert_eq!((&out2, split.finish()), (&out, whole.clone().finish()), "split {chunks:?}");
        (out, whole.finish())
    }

    #[test]
    fn chunk_table() {
        use ContentError::*;
        let reject = ChunkPolicy::Text { normalize: false };
        let normalize = ChunkPolicy::Text { normalize: true };
        type Case = (ChunkPolicy, &'static [&'static [u8]], &'static [u8], Option<ContentError>);
        let cases: Vec<Case> = vec![
            (reject, &[b"a\r\nb\r\n"], b"a\r\nb\r\n", None),
            (reject, &[b"a\r", b"\nb\r\n"], b"a\r\nb\r\n", None),
            (reject, &[b".\r\n.\r\n"], b".\r\n.\r\n", None),
            (reject, &[b"no final line end"], b"no final line end", None),
            (reject, &[b"a\nb\r\n"], b"a", Some(BareLf)),
            (reject, &[b"a\r.\rb\r\n"], b"a", Some(BareCr)),
            (reject, &[b"a\r"], b"a", Some(BareCr)),
            (reject, &[b"a\r\r\n"], b"a", Some(BareCr)),
            (normalize, &[b"a\nb\n"], b"a\r\nb\r\n", None),
            (normalize, &[b"a\n.\n"], b"a\r\n.\r\n", None),
            (normalize, &[b"a\r.\n"], b"a", Some(BareCr)),
            (ChunkPolicy::Binary, &[b"\x00\r\r\n\n.\n\xff"], b"\x00\r\r\n\n.\n\xff", None),
            (ChunkPolicy::Binary, &[b"a\r"], b"a\r", None),
        ];
        for (policy, chunks, content, error) in cases {
            assert_eq!(decode(policy, chunks), (content.to_vec(), error), "{policy:?} {chunks:?}");
        }
    }

    /// Many short inputs over the octets that matter, in two chunks: the bulk
    /// copy and the octet-by-octet path agree in both text modes.
    #[test]
    fn bulk_copy_agrees_with_octet_by_octet() {
        for (input, seed) in crate::engine::steering_inputs(20_000) {
            let cut = (seed >> 40) as usize % (input.len() + 1);
            for normalize in [false, true] {
                decode(ChunkPolicy::Text { normalize }, &[&input[..cut], &input[cut..]]);
            }
        }
    }

    #[test]
    fn text_lines_are_bounded() {
        let policy = ChunkPolicy::Text { normalize: false };
        let fits = [b"x".repeat(MAX_LINE_CONTENT), b"\r\n".to_vec()].concat();
        assert_eq!(decode(policy, &[&fits]).1, None);
        let over = [b"x".repeat(MAX_LINE_CONTENT + 1), b"\r\n".to_vec()].concat();
        assert_eq!(decode(policy, &[&over]).1, Some(ContentError::LineTooLong));
    }
}
