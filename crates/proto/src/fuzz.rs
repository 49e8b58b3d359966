//! Entry points for the fuzz targets in `fuzz/` (one line each there) and
//! for the corpus replay test, so both exercise exactly the same code.

use crate::ipc::{Decoder, RequestSequence};
use crate::queue_file::QueueFile;

/// Feeds `data` to cleanup's decoder in uneven pieces, checking order.
pub fn ipc_stream(data: &[u8]) {
    let mut decoder = Decoder::new();
    let mut seq = RequestSequence::default();
    for piece in data.chunks(7) {
        decoder.feed(piece);
        loop {
            match decoder.next_request() {
                Ok(Some(req)) => {
                    if seq.advance(&req).is_err() {
                        return;
                    }
                }
                Ok(None) => break,
                Err(_) => return,
            }
        }
    }
}

/// Decodes a queue file; whatever decodes must survive an encode/decode
/// round trip unchanged (content chunking may differ, the message not).
pub fn queue_file(data: &[u8]) {
    if let Ok(qf) = QueueFile::decode(data) {
        assert_eq!(QueueFile::decode(&qf.encode()).as_ref(), Ok(&qf), "encode/decode round trip");
    }
}

/// Parses the input as a path both ways; an accepted path must print back
/// to a mailbox that parses to the same thing.
pub fn address(data: &[u8]) {
    let Ok(s) = std::str::from_utf8(data) else { return };
    for utf8 in [false, true] {
        if let Ok(m) = crate::address::parse_path(s, utf8) {
            let again = crate::address::parse_mailbox(&m.to_string(), utf8).expect("printed mailbox parses");
            assert_eq!(again, m);
        }
    }
}

/// Parses the input as `mortal.toml`. Every error must point into the
/// file (a line within it, when one is given), and an accepted config
/// must parse to the same thing again (parsing is deterministic).
pub fn config(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else { return };
    let file = std::path::Path::new("/fuzz/etc/mortal.toml");
    match crate::config::Config::parse(text, file) {
        Ok(config) => {
            let again = crate::config::Config::parse(text, file).expect("an accepted config parses again");
            assert_eq!(format!("{again:?}"), format!("{config:?}"), "parsing is deterministic");
        }
        Err(errors) => {
            assert!(!errors.is_empty(), "a refusal names at least one problem");
            let lines = text.lines().count().max(1);
            for e in errors {
                assert_eq!(e.file, file);
                if let Some(line) = e.line {
                    assert!((1..=lines + 1).contains(&line), "line {line} outside a {lines}-line file");
                }
            }
        }
    }
}
