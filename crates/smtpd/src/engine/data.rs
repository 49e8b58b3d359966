//! The DATA decoder: message content in, dot-unstuffed content out, until
//! the one and only terminator `<CR><LF>.<CR><LF>` (RFC 5321 4.1.1.4).
//!
//! SMTP smuggling (CVE-2023-51764 and relatives) works when two servers
//! disagree about where a message ends: one sees `<LF>.<LF>` or
//! `<CR>.<CR>` as the end and the next as content, and the bytes after it
//! become a second, forged message. This decoder accepts exactly one end
//! sequence, and a bare `<CR>` or `<LF>` anywhere in the content marks the
//! message as rejected (the caller replies after the real terminator), so
//! there is no input on which it ends early or produces two messages. A
//! line can only *start* after a real `<CR><LF>`, so a dot after a bare
//! line ending is plain content.
//!
//! With `bare_newline = normalize` a bare `<LF>` is taken as a line end
//! and passed on as `<CR><LF>` instead of failing the message, but the line
//! it starts is not a line start in the sense of the terminator: a dot
//! there is plain content, so `<LF>.<CR><LF>` and `<CR><LF>.<LF>` still
//! end nothing. A bare `<CR>` is refused in both modes: no client sends it
//! by mistake, and it has no safe reading.
//!
//! Incremental: input can be split anywhere, state carries across calls.

/// RFC 5321 4.5.3.1.6: a text line is at most 1000 octets including the
/// `<CR><LF>` (and not counting a dot added for transparency).
pub const MAX_TEXT_LINE: usize = 1000;

/// Octets of content a text line may hold before its `<CR><LF>`.
const MAX_LINE_CONTENT: usize = MAX_TEXT_LINE - 2;

/// Why a message is refused once its terminator arrives. The first error
/// wins; nothing after it is passed on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ContentError {
    BareLf,
    BareCr,
    LineTooLong,
    TooBig,
}

/// Where the decoder is within a line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum At {
    /// Just after `<CR><LF>` (or the DATA command): a dot here is special.
    LineStart,
    /// After a dot at the start of a line.
    Dot,
    /// After `.<CR>` at the start of a line: `<LF>` ends the message.
    DotCr,
    /// Just after a bare `<LF>` taken as a line end (normalize mode):
    /// a new line, but a dot here is content and ends nothing.
    LfStart,
    /// Inside a line.
    Middle,
    /// After a `<CR>` inside a line: `<LF>` ends the line.
    Cr,
}

/// What one call to [`DataReceiver::receive`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Progress {
    /// Octets of input used, the terminator included.
    pub consumed: usize,
    /// Whether the terminator was reached.
    pub finished: bool,
}

/// Decodes one message's content.
#[derive(Debug, Clone)]
pub struct DataReceiver {
    at: At,
    line_len: usize,
    size: u64,
    limit: u64,
    error: Option<ContentError>,
    /// Take a bare `<LF>` as `<CR><LF>` instead of failing.
    normalize: bool,
}

impl DataReceiver {
    /// A decoder refusing content of more than `limit` octets, and any
    /// bare line ending.
    pub fn new(limit: u64) -> Self {
        Self::with_bare_newline(limit, false)
    }

    /// As [`DataReceiver::new`], but with `normalize` a bare `<LF>` is
    /// taken as `<CR><LF>` (`bare_newline = normalize`).
    pub fn with_bare_newline(limit: u64, normalize: bool) -> Self {
        Self { at: At::LineStart, line_len: 0, size: 0, limit, error: None, normalize }
    }

    /// The first problem found so far.
    pub fn error(&self) -> Option<ContentError> {
        self.error
    }

    /// Content octets accepted so far (after unstuffing).
    pub fn size(&self) -> u64 {
        self.size
    }

    /// Decodes `input`, appending content to `out` while no error was found.
    /// Stops right after the terminator; the rest of `input` is not its.
    pub fn receive(&mut self, input: &[u8], out: &mut Vec<u8>) -> Progress {
        let mut i = 0;
        while let Some(&b) = input.get(i) {
            match self.at {
                At::Middle => i += self.middle(&input[i..], out),
                At::LineStart => match b {
                    b'.' => (self.at, i) = (At::Dot, i + 1),
                    b'\r' => (self.at, i) = (At::Cr, i + 1),
                    b'\n' => (self.at, i) = (self.bare_lf(out), i + 1),
                    _ => self.at = At::Middle,
                },
                At::LfStart => match b {
                    b'\r' => (self.at, i) = (At::Cr, i + 1),
                    b'\n' => (self.at, i) = (self.bare_lf(out), i + 1),
                    _ => self.at = At::Middle,
                },
                // RFC 5321 4.5.2: a leading dot is dropped; `..` gives `.`.
                At::Dot => match b {
                    b'\r' => (self.at, i) = (At::DotCr, i + 1),
                    // `<CR><LF>.<LF>` is not a terminator; normalized, the
                    // dot stays, so the line reads as what was sent.
                    b'\n' if self.normalize => {
                        self.text(b".", out);
                        (self.at, i) = (self.bare_lf(out), i + 1);
                    }
                    b'\n' => (self.at, i) = (self.fail(ContentError::BareLf), i + 1),
                    _ => self.at = At::Middle,
                },
                At::DotCr => match b {
                    b'\n' => return Progress { consumed: i + 1, finished: true },
                    b'\r' => (self.at, i) = (self.fail_at(ContentError::BareCr, At::Cr), i + 1),
                    _ => self.at = self.fail(ContentError::BareCr),
                },
                At::Cr => match b {
                    b'\n' => {
                        self.end_line(out);
                        i += 1;
                    }
                    b'\r' => (self.at, i) = (self.fail_at(ContentError::BareCr, At::Cr), i + 1),
                    _ => self.at = self.fail(ContentError::BareCr),
                },
            }
        }
        Progress { consumed: input.len(), finished: false }
    }

    /// Handles the run of ordinary octets at the front of `input` (or the
    /// single `<CR>`/`<LF>` that starts it) and says how many it used.
    fn middle(&mut self, input: &[u8], out: &mut Vec<u8>) -> usize {
        let lines = self.plain_lines(input);
        if lines > 0 {
            self.append(&input[..lines], out);
            self.line_len = 0;
            return lines;
        }
        let run = memchr::memchr2(b'\r', b'\n', input).unwrap_or(input.len());
        if run > 0 {
            self.text(&input[..run], out);
            return run;
        }
        self.at = if input[0] == b'\r' { At::Cr } else { self.bare_lf(out) };
        1
    }

    /// The length of the longest prefix of `input` made of whole lines
    /// that need no decision: each fits the line limit, ends in
    /// `<CR><LF>`, and is followed by an ordinary octet (not a dot, `<CR>`
    /// or `<LF>`). Such lines pass through unchanged, so they are copied
    /// in one piece instead of octet by octet; the rest goes through the
    /// state machine. The output is the same either way (the tests feed
    /// every input whole and octet by octet).
    fn plain_lines(&self, input: &[u8]) -> usize {
        let mut end = 0;
        let mut line_len = self.line_len;
        while let Some(k) = memchr::memchr2(b'\r', b'\n', &input[end..]) {
            let rest = &input[end + k..];
            let plain_end = rest.starts_with(b"\r\n") && !matches!(rest.get(2), None | Some(b'.' | b'\r' | b'\n'));
            if !plain_end || line_len.saturating_add(k) > MAX_LINE_CONTENT {
                break;
            }
            end += k + 2;
            line_len = 0;
        }
        end
    }

    /// A bare `<LF>`: a line end passed on as `<CR><LF>` when normalizing
    /// (the next line cannot hold a terminator), an error otherwise.
    fn bare_lf(&mut self, out: &mut Vec<u8>) -> At {
        if !self.normalize {
            return self.fail(ContentError::BareLf);
        }
        self.append(b"\r\n", out);
        self.line_len = 0;
        At::LfStart
    }

    /// Accepts `run` octets of line content, up to the line limit.
    fn text(&mut self, run: &[u8], out: &mut Vec<u8>) {
        let room = MAX_LINE_CONTENT.saturating_sub(self.line_len);
        self.line_len = self.line_len.saturating_add(run.len());
        if run.len() > room {
            self.append(&run[..room], out);
            self.fail(ContentError::LineTooLong);
        } else {
            self.append(run, out);
        }
    }

    /// A `<CR><LF>` ends the current line; the next may start with a dot.
    fn end_line(&mut self, out: &mut Vec<u8>) {
        self.append(b"\r\n", out);
        self.line_len = 0;
        self.at = At::LineStart;
    }

    /// Passes content on, up to the size limit. Where an error cuts the
    /// output off does not depend on how the input was split, so the
    /// decoder behaves the same whatever the packet boundaries.
    fn append(&mut self, bytes: &[u8], out: &mut Vec<u8>) {
        let room = self.limit.saturating_sub(self.size);
        self.size = self.size.saturating_add(bytes.len() as u64);
        if self.error.is_some() {
            return;
        }
        match usize::try_from(room) {
            Ok(room) if room < bytes.len() => {
                out.extend_from_slice(&bytes[..room]);
                self.fail(ContentError::TooBig);
            }
            _ => out.extend_from_slice(bytes),
        }
    }

    /// Records `e` (unless an earlier error stands) and continues inside a
    /// line: after a bare line ending no new line starts, so no dot that
    /// follows can be taken for a terminator.
    fn fail(&mut self, e: ContentError) -> At {
        self.fail_at(e, At::Middle)
    }

    fn fail_at(&mut self, e: ContentError, next: At) -> At {
        self.error.get_or_insert(e);
        next
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn decode(input: &[u8], limit: u64) -> (Vec<u8>, Progress, Option<ContentError>) {
        decode_mode(input, limit, false)
    }

    /// Feeds `input` whole and byte by byte; both must agree.
    fn decode_mode(input: &[u8], limit: u64, normalize: bool) -> (Vec<u8>, Progress, Option<ContentError>) {
        let mut whole = DataReceiver::with_bare_newline(limit, normalize);
        let mut out = Vec::new();
        let progress = whole.receive(input, &mut out);

        let mut split = DataReceiver::with_bare_newline(limit, normalize);
        let (mut out2, mut consumed, mut finished) = (Vec::new(), 0, false);
        for b in input {
            if finished {
                break;
            }
            let p = split.receive(std::slice::from_ref(b), &mut out2);
            consumed += p.consumed;
            finished = p.finished;
        }
        assert_eq!((&out2, consumed, finished), (&out, progress.consumed, progress.finished), "split {input:?}");
        assert_eq!(split.error(), whole.error(), "split error {input:?}");
        (out, progress, whole.error())
    }

    #[test]
    fn decode_table() {
        use ContentError::*;
        let fin = |consumed| Progress { consumed, finished: true };
        let more = |consumed| Progress { consumed, finished: false };
        // (input, content passed on, progress, error)
        type Case = (&'static [u8], &'static [u8], Progress, Option<ContentError>);
        let cases: Vec<Case> = vec![
            (b".\r\n", b"", fin(3), None),
            (b"hi\r\n.\r\n", b"hi\r\n", fin(7), None),
            (b"hi\r\n.\r\nQUIT\r\n", b"hi\r\n", fin(7), None),
            (b"..\r\n.\r\n", b".\r\n", fin(7), None),
            (b"..x\r\n.\r\n", b".x\r\n", fin(8), None),
            (b".x\r\n.\r\n", b"x\r\n", fin(7), None),
            (b"a\r\n.. \r\n.\r\n", b"a\r\n. \r\n", fin(11), None),
            (b"\r\n\r\n.\r\n", b"\r\n\r\n", fin(7), None),
            (b"hi\r\n", b"hi\r\n", more(4), None),
            (b"hi\r\n.", b"hi\r\n", more(5), None),
            (b"hi\r\n.\r", b"hi\r\n", more(6), None),
            // SMTP smuggling: none of these ends the message.
            (b"a\n.\nb\r\n.\r\n", b"a", fin(10), Some(BareLf)),
            (b"a\r.\rb\r\n.\r\n", b"a", fin(10), Some(BareCr)),
            (b"a\n.\r\nb\r\n.\r\n", b"a", fin(11), Some(BareLf)),
            (b"a\r.\nb\r\n.\r\n", b"a", fin(10), Some(BareCr)),
            (b"a\r\n.\nb\r\n.\r\n", b"a\r\n", fin(11), Some(BareLf)),
            (b"a\r\n.\rb\r\n.\r\n", b"a\r\n", fin(11), Some(BareCr)),
            (b"a\r\n.\r\r\nb\r\n.\r\n", b"a\r\n", fin(13), Some(BareCr)),
            (b"a\r\r\n.\r\n", b"a", fin(7), Some(BareCr)),
            (b"a\n\r\n.\r\n", b"a", fin(7), Some(BareLf)),
            (b"\n.\n", b"", more(3), Some(BareLf)),
            (b"\r\n.\n.\r\n", b"\r\n", more(7), Some(BareLf)),
        ];
        for (input, content, progress, error) in cases {
            assert_eq!(decode(input, 1000), (content.to_vec(), progress, error), "input {input:?}");
        }
    }

    /// `bare_newline = normalize`: bare `<LF>` becomes `<CR><LF>`, and no
    /// smuggling variant ends the message early or starts a second one.
    #[test]
    fn normalize_table() {
        use ContentError::*;
        let fin = |consumed| Progress { consumed, finished: true };
        let more = |consumed| Progress { consumed, finished: false };
        type Case = (&'static [u8], &'static [u8], Progress, Option<ContentError>);
        let cases: Vec<Case> = vec![
            (b"a\nb\n\r\n.\r\n", b"a\r\nb\r\n\r\n", fin(9), None),
            (b"hi\r\n.\r\n", b"hi\r\n", fin(7), None),
            (b"\n.\r\n", b"\r\n.\r\n", more(4), None),
            // <LF>.<LF>
            (b"a\n.\nb\r\n.\r\n", b"a\r\n.\r\nb\r\n", fin(10), None),
            // <LF>.<CR><LF>
            (b"a\n.\r\nb\r\n.\r\n", b"a\r\n.\r\nb\r\n", fin(11), None),
            // <CR><LF>.<LF>
            (b"a\r\n.\nb\r\n.\r\n", b"a\r\n.\r\nb\r\n", fin(11), None),
            (b"a\r\n..\nb\r\n.\r\n", b"a\r\n.\r\nb\r\n", fin(12), None),
            // <CR>.<CR> and <CR>.<LF>: bare <CR> is refused in both modes.
            (b"a\r.\rb\r\n.\r\n", b"a", fin(10), Some(BareCr)),
            (b"a\r.\nb\r\n.\r\n", b"a", fin(10), Some(BareCr)),
            (b"a\r\n.\r\r\nb\r\n.\r\n", b"a\r\n", fin(13), Some(BareCr)),
            // A real <CR><LF>.<CR><LF> after a normalized line still ends it.
            (b"a\n\r\n.\r\nQUIT\r\n", b"a\r\n\r\n", fin(7), None),
        ];
        for (input, content, progress, error) in cases {
            assert_eq!(decode_mode(input, 1000, true), (content.to_vec(), progress, error), "input {input:?}");
        }
    }

    #[test]
    fn text_line_limit_counts_content_without_stuffing_dot() {
        let fits = [b".".to_vec(), b"x".repeat(MAX_LINE_CONTENT), b"\r\n.\r\n".to_vec()].concat();
        let (out, p, err) = decode(&fits, 10_000);
        assert_eq!((out.len(), p.finished, err), (MAX_LINE_CONTENT + 2, true, None));
        let over = [b"x".repeat(MAX_LINE_CONTENT + 1), b"\r\n.\r\n".to_vec()].concat();
        let (out, p, err) = decode(&over, 10_000);
        assert_eq!((out.len(), p.finished, err), (MAX_LINE_CONTENT, true, Some(ContentError::LineTooLong)));
    }

    #[test]
    fn size_limit_counts_unstuffed_content_with_line_ends() {
        let (_, p, err) = decode(b"12345678\r\n.\r\n", 10);
        assert_eq!((p.finished, err), (true, None));
        let (out, p, err) = decode(b"123456789\r\n.\r\n", 10);
        assert_eq!((out, p.finished, err), (b"123456789\r".to_vec(), true, Some(ContentError::TooBig)));
    }

    /// Many short inputs over the octets that matter, whole and split,
    /// in both modes: the bulk path and the state machine agree.
    #[test]
    fn bulk_lines_agree_with_octet_by_octet() {
        for (input, _) in crate::engine::steering_inputs(20_000) {
            decode_mode(&input, 12, false);
            decode_mode(&input, 1000, true);
        }
        let long = [b"x".repeat(MAX_LINE_CONTENT - 1), b"\r\nab\r\n".to_vec(), b"y".repeat(MAX_LINE_CONTENT + 3)];
        let (out, _, err) = decode(&[long.concat(), b"\r\nz\r\n.\r\n".to_vec()].concat(), 100_000);
        assert_eq!(
            (out.len(), err),
            (MAX_LINE_CONTENT - 1 + 2 + 4 + MAX_LINE_CONTENT, Some(ContentError::LineTooLong))
        );
    }

    #[test]
    fn first_error_wins() {
        let (_, _, err) = decode(b"a\nb\rc\r\n.\r\n", 1000);
        assert_eq!(err, Some(ContentError::BareLf));
    }
}
