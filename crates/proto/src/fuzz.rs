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
