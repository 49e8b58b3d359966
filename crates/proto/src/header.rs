//! The header section of a message as it travels (`<CR><LF>` lines):
//! where it ends, by the one rule cleanup (which spools it) and smtpd
//! (which shows it to the milters) both follow, so that a milter's header
//! indexes name the fields cleanup edits.
//!
//! The section is found line by line (RFC 5322 section 2.2): field lines
//! and their folded continuations, ended by an empty line, or by the first
//! line that is neither.

/// Where the header section of a (partial) message ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HeaderEnd {
    /// More lines are needed to decide.
    Undecided,
    /// The section is `len` bytes; an empty line follows it.
    Separator { len: usize },
    /// The section is `len` bytes and a non-header line follows without an
    /// empty line between them.
    NoSeparator { len: usize },
}

/// Scans complete lines of `buf` for the end of the header section.
/// `at_end` says no more bytes will come: the whole input is then header.
pub fn find_header_end(buf: &[u8], at_end: bool) -> HeaderEnd {
    let mut offset = 0;
    while let Some(nl) = buf[offset..].iter().position(|&b| b == b'\n') {
        let line = &buf[offset..offset + nl + 1];
        let is_continuation = offset > 0 && matches!(line[0], b' ' | b'\t');
        if line == b"\r\n" {
            return HeaderEnd::Separator { len: offset };
        }
        if !is_continuation && !is_field_line(line) {
            return HeaderEnd::NoSeparator { len: offset };
        }
        offset += nl + 1;
    }
    if at_end { HeaderEnd::NoSeparator { len: offset } } else { HeaderEnd::Undecided }
}

/// `field-name ":"`, field-name being printable ASCII except colon.
fn is_field_line(line: &[u8]) -> bool {
    match line.iter().position(|&b| b == b':') {
        Some(colon) if colon > 0 => line[..colon].iter().all(|&b| (33..=126).contains(&b)),
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_end_table() {
        let cases: &[(&[u8], bool, HeaderEnd)] = &[
            (b"Subject: a\r\n\r\nbody\r\n", false, HeaderEnd::Separator { len: 12 }),
            (b"Subject: a\r\n folded\r\n\r\n", false, HeaderEnd::Separator { len: 21 }),
            (b"Subject: a\r\nno header here\r\n", false, HeaderEnd::NoSeparator { len: 12 }),
            (b"\r\nbody only\r\n", false, HeaderEnd::Separator { len: 0 }),
            (b" leading space\r\n", false, HeaderEnd::NoSeparator { len: 0 }),
            (b"Subject: a\r\nTo: b", false, HeaderEnd::Undecided),
            (b"Subject: a\r\n", true, HeaderEnd::NoSeparator { len: 12 }),
            (b"Bad Name: x\r\n\r\n", false, HeaderEnd::NoSeparator { len: 0 }),
        ];
        for (input, at_end, want) in cases {
            assert_eq!(find_header_end(input, *at_end), *want, "{:?}", String::from_utf8_lossy(input));
        }
    }
}
