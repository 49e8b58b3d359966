//! Entry points for the fuzz targets in `fuzz/` (one line each there) and
//! for the corpus replay test, so both exercise exactly the same code.

use crate::ipc::{Decoder, Request, RequestInPlace, RequestSequence};
use crate::queue_file::QueueFile;

/// Feeds `data` to cleanup's decoder in uneven pieces, checking order,
/// both ways cleanup can read: fed pieces with owned requests, and reads
/// straight into the decoder with content in place. Both must see the
/// same requests and stop at the same error.
pub fn ipc_stream(data: &[u8]) {
    let mut owned = Vec::new();
    let (mut decoder, mut seq) = (Decoder::new(), RequestSequence::default());
    'fed: for piece in data.chunks(7) {
        decoder.feed(piece);
        loop {
            match decoder.next_request().map(|r| r.map(|req| (seq.advance(&req), req))) {
                Ok(Some((Ok(()), req))) => owned.push(Ok(req)),
                Ok(Some((Err(e), _))) | Err(e) => {
                    owned.push(Err(e));
                    break 'fed;
                }
                Ok(None) => break,
            }
        }
    }
    let mut in_place = Vec::new();
    let (mut decoder, mut seq) = (Decoder::new(), RequestSequence::default());
    let mut source = std::io::Cursor::new(data);
    'read: while decoder.read_from(&mut source, 11).expect("reading a slice cannot fail") > 0 {
        loop {
            let outcome = match decoder.next_request_in_place() {
                Ok(Some(req)) => seq.advance_in_place(&req).map(|()| match req {
                    RequestInPlace::Data(chunk) => Request::Data(chunk.to_vec()),
                    RequestInPlace::Other(r) => r,
                }),
                Ok(None) => break,
                Err(e) => Err(e),
            };
            let stop = outcome.is_err();
            in_place.push(outcome);
            if stop {
                break 'read;
            }
        }
    }
    assert_eq!(in_place, owned, "in-place and owned decoding agree");
}

/// The queue → delivery agent protocol, both directions. The first octet
/// chooses: even, the rest is a connection's requests for the agent's
/// decoder (several in a row, each answered before the next); odd, the
/// rest is a report the queue reads, `(first >> 1) % 4` results expected.
/// Fed in uneven pieces; whatever decodes must encode back to the same
/// thing.
pub fn delivery_stream(data: &[u8]) {
    use crate::delivery::{self, Report, ReportDecoder, RequestDecoder};
    const MAX_CONTENT: u64 = 1 << 20;
    let Some((&mode, rest)) = data.split_first() else { return };
    if mode % 2 == 0 {
        let mut requests = RequestDecoder::new(MAX_CONTENT);
        for piece in rest.chunks(5) {
            match requests.feed(piece) {
                Ok(None) => {}
                Ok(Some(req)) => {
                    let mut again = RequestDecoder::new(MAX_CONTENT);
                    assert_eq!(again.feed(&delivery::hello()), Ok(None));
                    assert_eq!(again.feed(&req.encode()), Ok(Some(req)), "request encode/decode round trip");
                    requests.answered();
                }
                Err(_) => return,
            }
        }
        return;
    }
    let expected = usize::from(mode >> 1) % 4;
    let mut report = ReportDecoder::new(expected);
    for piece in rest.chunks(9) {
        match report.feed(piece) {
            Ok(false) => {}
            Ok(true) => break,
            Err(_) => return,
        }
    }
    if !report.is_complete() {
        return;
    }
    let keep = report.keep();
    let relay = report.relay().unwrap_or_default().to_owned();
    let decoded = Report { relay, results: report.into_results() };
    let mut wire = Vec::new();
    decoded.encode(keep, &mut wire);
    let mut again = ReportDecoder::new(expected);
    assert_eq!(again.feed(&wire), Ok(true), "report encode/decode round trip");
    assert_eq!((again.keep(), again.relay()), (keep, Some(decoded.relay.as_str())));
    assert_eq!(again.into_results(), decoded.results, "report encode/decode round trip");
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
                if let Some(at) = e.location {
                    assert!((1..=lines + 1).contains(&at.line), "line {at} outside a {lines}-line file");
                    assert!(at.column >= 1, "column {at} before the line");
                }
            }
        }
    }
}

/// A policy server's replies, as smtpd reads them: fed in uneven pieces,
/// one reply after another on the same connection (the decoder reset after
/// each). Whatever decodes is an action whose texts stay within bounds and
/// on one line; splitting the input differently gives the same actions.
pub fn policy_reply(data: &[u8]) {
    use crate::policy::{Action, MAX_TEXT, ReplyDecoder};
    fn run(data: &[u8], piece: usize) -> Vec<Result<Action, crate::policy::PolicyError>> {
        let mut out = Vec::new();
        let mut decoder = ReplyDecoder::new();
        let mut rest = data;
        while !rest.is_empty() {
            // One reply's bytes: up to and including its empty line.
            let end = rest.windows(2).position(|w| w == b"\n\n").map_or(rest.len(), |i| i + 2);
            let (reply, next) = rest.split_at(end);
            for chunk in reply.chunks(piece) {
                match decoder.feed(chunk) {
                    Ok(Some(action)) => out.push(Ok(action)),
                    Ok(None) => {}
                    Err(e) => {
                        out.push(Err(e));
                        return out;
                    }
                }
            }
            // Bytes after a reply in the feed that ended it are what a
            // later feed would have refused.
            if decoder.has_trailing() {
                out.push(Err(crate::policy::PolicyError::TrailingData));
                return out;
            }
            decoder.reset();
            rest = next;
        }
        out
    }
    let whole = run(data, data.len().max(1));
    assert_eq!(run(data, 3), whole, "splitting the input changes nothing");
    for action in whole.iter().flatten() {
        let text = match action {
            Action::Reject(t)
            | Action::Defer(t)
            | Action::DeferIfReject(t)
            | Action::DeferIfPermit(t)
            | Action::Hold(t)
            | Action::Discard(t) => t.clone().unwrap_or_default(),
            Action::Reply { text, .. }
            | Action::Prepend(text)
            | Action::Warn(text)
            | Action::Info(text)
            | Action::Unsupported(text) => text.clone(),
            Action::Ok | Action::Dunno => String::new(),
        };
        assert!(text.len() <= MAX_TEXT && !text.contains('\n'), "{action:?}");
    }
}

/// What a milter sends, fed to the reply decoder in uneven pieces: an
/// OPTNEG answer goes through the negotiation against Postfix's offer,
/// anything else through the reply decoder. Whatever decodes must encode
/// back to the same thing, and what is agreed never exceeds the offer.
pub fn milter_reply(data: &[u8]) {
    use crate::milter::{Decoder, MilterOptions, Offer, Reply, negotiate};
    let mut decoder = Decoder::new();
    for piece in data.chunks(7) {
        decoder.feed(piece);
        loop {
            let packet = match decoder.next_packet() {
                Ok(Some(packet)) => packet,
                Ok(None) => break,
                Err(_) => return,
            };
            let mut wire = Vec::new();
            let mut again = Decoder::new();
            if packet.command == b'O' {
                let Ok(options) = MilterOptions::decode(packet) else { return };
                options.encode(&mut wire);
                again.feed(&wire);
                assert_eq!(again.next_options(), Ok(Some(options.clone())), "OPTNEG encode/decode round trip");
                if let Ok(agreed) = negotiate(&Offer::default(), &options) {
                    assert!(Offer::default().actions.contains(agreed.actions), "agreed actions within the offer");
                    assert!(Offer::default().steps.contains(agreed.steps), "agreed steps within the offer");
                }
                continue;
            }
            let Ok(reply) = Reply::decode(packet) else { return };
            reply.encode(&mut wire);
            again.feed(&wire);
            assert_eq!(again.next_reply(), Ok(Some(reply)), "reply encode/decode round trip");
        }
    }
}

/// A table file of each kind (the first octet picks it: text, cidr,
/// regexp), then lookups of each of its lines' first words and of the
/// input itself: parsing never panics, refuses rather than truncates, and
/// a result is never longer than `MAX_RESULT` plus what a regexp's groups
/// add from the key.
pub fn table(data: &[u8]) {
    use crate::table::{MAX_RESULT, Table, TableSpec};
    let Some((&kind, rest)) = data.split_first() else { return };
    let Ok(text) = std::str::from_utf8(rest) else { return };
    let path = std::path::PathBuf::from("/fuzz/table");
    let spec = match kind % 3 {
        0 => TableSpec::Text(path),
        1 => TableSpec::Cidr(path),
        _ => TableSpec::Regexp(path),
    };
    let Ok(table) = Table::parse(&spec, text) else { return };
    let keys = text.lines().filter_map(|l| l.split_whitespace().next()).chain([text]);
    for key in keys.take(64) {
        // Local tables never fail a lookup.
        let found = table.lookup(key).expect("a file table's lookup cannot fail");
        if let Some(result) = found {
            assert!(result.len() <= MAX_RESULT + 9 * key.len(), "result of {} octets", result.len());
        }
    }
}

/// A socketmap server's answers, as a socketmap client reads them: one
/// after another in one buffer. Whatever decodes took octets inside the
/// buffer, at most the reply limit; decoding never panics.
pub fn socketmap_reply(data: &[u8]) {
    use crate::socketmap::{Answer, MAX_REPLY, MAX_TCP_LINE, decode_answer, decode_tcp_answer};
    // The same bytes as socketmap netstrings and as tcp_table lines.
    for (decode, limit) in
        [(decode_answer as fn(&[u8]) -> _, MAX_REPLY), (decode_tcp_answer as fn(&[u8]) -> _, MAX_TCP_LINE)]
    {
        let mut rest = data;
        while let Ok(Some((answer, used))) = decode(rest) {
            assert!(used > 0 && used <= rest.len(), "took {used} of {}", rest.len());
            if let Ok(Answer::Found(value)) = answer {
                assert!(value.len() <= limit);
            }
            rest = &rest[used..];
        }
    }
}

/// What Dovecot's auth service sends smtpd, fed in uneven pieces. The
/// first octet chooses: even, a handshake and then replies; odd, replies
/// only. Splitting the input differently changes nothing; every line
/// stays within `MAX_LINE`; whatever decodes encodes back to the same
/// thing, with a valid mechanism name, printable user and reason within
/// their bounds, and a challenge of base64 text.
pub fn dovecot_auth_reply(data: &[u8]) {
    use crate::dovecot_auth::{
        DecodeError, Handshake, HandshakeReader, HandshakeStep, LineReader, MAX_LINE, MAX_MECHANISMS, MAX_REASON,
        MAX_USER, MechanismName, SaslReply, ServerReply,
    };
    #[derive(Debug, PartialEq)]
    enum Event {
        Handshake(Handshake),
        Reply(ServerReply),
        Refused(DecodeError),
    }
    fn run(handshake_first: bool, data: &[u8], piece: usize) -> Vec<Event> {
        let mut out = Vec::new();
        let mut lines = LineReader::new();
        let mut handshake = handshake_first.then(HandshakeReader::new);
        for chunk in data.chunks(piece) {
            lines.feed(chunk);
            loop {
                let line = match lines.next_line() {
                    Ok(Some(line)) => line,
                    Ok(None) => break,
                    Err(e) => {
                        out.push(Event::Refused(e));
                        return out;
                    }
                };
                assert!(line.len() <= MAX_LINE, "a line of {} octets", line.len());
                let event = match handshake.take() {
                    Some(reader) => match reader.line(&line) {
                        Ok(HandshakeStep::More(reader)) => {
                            handshake = Some(reader);
                            continue;
                        }
                        Ok(HandshakeStep::Done(h)) => Ok(Event::Handshake(h)),
                        Err(e) => Err(e),
                    },
                    None => ServerReply::parse(&line).map(Event::Reply),
                };
                match event {
                    Ok(event) => out.push(event),
                    Err(e) => {
                        out.push(Event::Refused(e));
                        return out;
                    }
                }
            }
        }
        out
    }
    let Some((&mode, rest)) = data.split_first() else { return };
    let handshake_first = mode % 2 == 0;
    let whole = run(handshake_first, rest, rest.len().max(1));
    assert_eq!(run(handshake_first, rest, 7), whole, "splitting the input changes nothing");
    for event in &whole {
        match event {
            Event::Handshake(h) => {
                assert!(h.mechanisms.len() <= MAX_MECHANISMS);
                for m in &h.mechanisms {
                    assert_eq!(MechanismName::new(m.name.as_str()).as_ref(), Some(&m.name));
                }
                let again = run(true, &h.encode(), 5);
                assert_eq!(again, [Event::Handshake(h.clone())], "handshake encode/decode round trip");
            }
            Event::Reply(r) => {
                match &r.reply {
                    SaslReply::Continue { challenge } => {
                        assert!(challenge.bytes().all(|b| b.is_ascii_alphanumeric() || b"+/=".contains(&b)));
                    }
                    SaslReply::Success { user } => {
                        let user = user.as_deref().unwrap_or("-");
                        assert!(!user.is_empty() && user.len() <= MAX_USER && !user.chars().any(char::is_control));
                    }
                    SaslReply::Failure { reason, user, .. } => {
                        let reason = reason.as_deref().unwrap_or("-");
                        assert!(!reason.is_empty() && reason.len() <= MAX_REASON, "reason {reason:?}");
                        assert!(!reason.chars().any(char::is_control), "reason {reason:?}");
                        assert!(user.as_deref().is_none_or(|u| !u.is_empty() && !u.chars().any(char::is_control)));
                    }
                }
                let wire = r.encode();
                assert_eq!(wire.last(), Some(&b'\n'));
                assert_eq!(
                    ServerReply::parse(&wire[..wire.len() - 1]).as_ref(),
                    Ok(r),
                    "reply encode/decode round trip"
                );
            }
            Event::Refused(_) => {}
        }
    }
}
