//! The command-line reader: splits client input into command lines, with a
//! hard bound on what it keeps and strict line endings.

/// RFC 5321 4.5.3.1.4: a command line is at most 512 octets, `<CR><LF>`
/// included.
pub const RFC_COMMAND_LINE: usize = 512;

/// Room for the ESMTP parameters we offer, which RFC 5321 4.5.3.1.4 lets
/// extensions add to the line. The longest is RCPT with DSN: `ORCPT=`
/// may add 500 octets (RFC 3461 4.2) and `NOTIFY=` 29; MAIL adds at most
/// `SIZE=` (26, RFC 1870 3), `BODY=BINARYMIME` (16), `RET=HDRS` (9),
/// `SMTPUTF8` (9) and `ENVID=` (RFC 3461 4.4: 100 characters, up to 300
/// xtext-encoded). With margin for separators.
pub const COMMAND_LINE_ALLOWANCE: usize = 640;

/// Longest command line accepted, `<CR><LF>` included. Longer lines are
/// discarded as they arrive, never buffered.
pub const MAX_COMMAND_LINE: usize = RFC_COMMAND_LINE + COMMAND_LINE_ALLOWANCE;

/// One unit of client input in the command phase.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Line {
    /// A line that ended in `<CR><LF>`, without it.
    Text(Vec<u8>),
    /// A line that ended in a bare `<LF>`.
    BareLf,
    /// A line with a `<CR>` not followed by `<LF>`.
    BareCr,
    /// A line longer than [`MAX_COMMAND_LINE`].
    TooLong,
}

/// Splits command lines off the input; remembers only whether it is in
/// the middle of discarding an overlong line.
#[derive(Debug, Default)]
pub struct LineReader {
    discarding: bool,
}

impl LineReader {
    /// Takes the next line from the front of `input`. Returns the line, if
    /// one is complete, and how many octets were used (an overlong line is
    /// consumed as it arrives, so the caller can drop those octets).
    pub fn next(&mut self, input: &[u8]) -> (Option<Line>, usize) {
        self.next_within(input, MAX_COMMAND_LINE)
    }

    /// [`LineReader::next`] for lines of up to `limit` octets, `<CR><LF>`
    /// included (an AUTH response may be longer than a command).
    pub fn next_within(&mut self, input: &[u8], limit: usize) -> (Option<Line>, usize) {
        let Some(lf) = input.iter().position(|&b| b == b'\n') else {
            if self.discarding || input.len() >= limit {
                self.discarding = true;
                return (None, input.len());
            }
            return (None, 0);
        };
        let used = lf + 1;
        if std::mem::take(&mut self.discarding) || used > limit {
            return (Some(Line::TooLong), used);
        }
        let line = match input[..lf].split_last() {
            Some((b'\r', text)) if !text.contains(&b'\r') => Line::Text(text.to_vec()),
            Some((b'\r', _)) => Line::BareCr,
            _ => Line::BareLf,
        };
        (Some(line), used)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Reads every line of `input` fed in one piece.
    fn lines(input: &[u8]) -> (Vec<Line>, usize) {
        let mut reader = LineReader::default();
        let (mut out, mut pos) = (Vec::new(), 0);
        loop {
            let (line, used) = reader.next(&input[pos..]);
            pos += used;
            match line {
                Some(l) => out.push(l),
                None => return (out, pos),
            }
        }
    }

    #[test]
    fn line_table() {
        use Line::*;
        let text = |s: &str| Text(s.as_bytes().to_vec());
        let long = "x".repeat(MAX_COMMAND_LINE - 2);
        let too_long = "x".repeat(MAX_COMMAND_LINE - 1);
        let cases: Vec<(Vec<u8>, Vec<Line>, usize)> = vec![
            (b"NOOP\r\n".to_vec(), vec![text("NOOP")], 6),
            (b"NOOP\r\nQUIT\r\n".to_vec(), vec![text("NOOP"), text("QUIT")], 12),
            (b"NOOP\r\nQU".to_vec(), vec![text("NOOP")], 6),
            (b"NOOP\r".to_vec(), vec![], 0),
            (b"\r\n".to_vec(), vec![text("")], 2),
            (b"NOOP\n".to_vec(), vec![BareLf], 5),
            (b"\n".to_vec(), vec![BareLf], 1),
            (b"NO\rOP\r\n".to_vec(), vec![BareCr], 7),
            (b"NOOP\r\r\n".to_vec(), vec![BareCr], 7),
            (format!("{long}\r\n").into_bytes(), vec![text(&long)], MAX_COMMAND_LINE),
            (format!("{too_long}\r\nNOOP\r\n").into_bytes(), vec![TooLong, text("NOOP")], MAX_COMMAND_LINE + 7),
        ];
        for (input, expected, used) in cases {
            assert_eq!(lines(&input), (expected, used), "input {:?}", String::from_utf8_lossy(&input));
        }
    }

    /// An endless line is dropped as it arrives and reported once, at its end.
    #[test]
    fn overlong_line_is_never_buffered() {
        let mut reader = LineReader::default();
        let chunk = vec![b'x'; MAX_COMMAND_LINE];
        for _ in 0..100 {
            assert_eq!(reader.next(&chunk), (None, chunk.len()));
        }
        assert_eq!(reader.next(b"x\r\nNOOP\r\n"), (Some(Line::TooLong), 3));
        assert_eq!(reader.next(b"NOOP\r\n"), (Some(Line::Text(b"NOOP".to_vec())), 6));
    }
}
