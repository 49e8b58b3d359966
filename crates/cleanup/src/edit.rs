//! The filters' edits of one message: collected as smtpd relays them,
//! applied at `End`, before the commit.
//!
//! smtpd's filters (milters, policy servers) decide; smtpd relays what
//! they decided as `Edit` records (`mortal_proto::ipc::Edit`); this module
//! applies it, with Postfix's and libmilter's semantics:
//!
//! - Milter header edits apply to the header section the client sent
//!   (what the milters saw), in the order received, before cleanup's own
//!   fix-ups, so cleanup's `Received:` stays on top. ADDHEADER appends
//!   `Name: value`; INSHEADER inserts at a 0-based position among all
//!   fields (past the end: appends); CHGHEADER changes the index-th
//!   (1-based, 0 taken as 1) field of that name, compared
//!   case-insensitively, deletes it when the value is empty, and adds a
//!   new field when there are fewer of that name (libmilter's
//!   `smfi_chgheader`), unless the value is empty.
//! - A policy server's PREPEND goes above everything, cleanup's
//!   `Received:` included, written `name:value` exactly, in the order
//!   received.
//! - REPLBODY's chunks, concatenated, replace everything after the header
//!   section's empty line; a bare LF becomes CRLF.
//! - ADDRCPT (with arguments), DELRCPT and CHGFROM change the envelope;
//!   HOLD parks the message in `hold/`; DISCARD drops it (and wins over
//!   HOLD).
//!
//! # Security
//! A filter is trusted by the administrator to change the message and to
//! add recipients outside `accepted_domains` (Postfix allows it); it is
//! not trusted with syntax or size. Every address is parsed as smtpd's
//! are; line breaks inside a value are always folds (the IPC decoder's
//! `HeaderValue` guarantees it) and are written as CRLF, so no edit can
//! start a header line of its own; and the result must still fit
//! `header_size_limit`, `message_size_limit` and `recipient_limit`. The
//! edits themselves are bounded as they arrive: their number by
//! `[cleanup] edit_limit`, the octets of header fields and body they carry
//! together by `message_size_limit`.

use mortal_proto::address::{self, AddressError};
use mortal_proto::config::Config;
use mortal_proto::dsn;
use mortal_proto::envelope::{Notify, RecipientInfo, SenderInfo};
use mortal_proto::ipc::Edit;
use mortal_proto::milter::{
    EsmtpArgs, HeaderName, HeaderOp, HeaderValue, MilterAddress, Modification, Placement, place_header,
};
use std::borrow::Cow;

/// The bounds the edits and their result are held to.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub edits: u32,
    pub message_size: u64,
    pub header_size: usize,
    pub recipients: usize,
}

impl Limits {
    pub fn of(config: &Config) -> Self {
        Self {
            edits: config.cleanup.edit_limit,
            message_size: config.smtpd.message_size_limit,
            header_size: config.cleanup.header_size_limit,
            recipients: config.smtpd.recipient_limit as usize,
        }
    }
}

/// Why the edits, or what they made, are refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EditReject {
    /// More edits than `edit_limit`.
    TooMany,
    /// The header fields and body the edits carry are together over
    /// `message_size_limit`.
    TooBig,
    /// ADDRCPT named an address that is not a valid mailbox.
    BadRecipient { address: String, error: AddressError },
    /// CHGFROM named an address that is not a valid mailbox.
    BadSender { address: String, error: AddressError },
}

/// A milter's envelope edit.
#[derive(Debug, Clone, PartialEq, Eq)]
enum EnvelopeEdit {
    AddRecipient { address: MilterAddress, args: EsmtpArgs },
    DeleteRecipient(MilterAddress),
    ChangeSender { address: MilterAddress, args: EsmtpArgs },
}

/// Every edit of one transaction, in the order received.
#[derive(Debug, Default)]
pub struct Edits {
    count: u32,
    /// Octets of header names, values and body the edits carry.
    carried: u64,
    prepends: Vec<(HeaderName, HeaderValue)>,
    headers: Vec<(HeaderOp, HeaderName, HeaderValue)>,
    /// The replacement body as received, chunks concatenated.
    body: Option<Vec<u8>>,
    envelope: Vec<EnvelopeEdit>,
    hold: Option<String>,
    discard: Option<String>,
}

/// The header section once the edits are applied, in its two parts.
#[derive(Debug)]
pub struct EditedHeader {
    /// The policy PREPENDs, for the very top.
    pub prepends: Vec<u8>,
    /// The client's section with the milters' edits, for
    /// `header::fix_up`.
    pub fields: Vec<u8>,
}

impl EditedHeader {
    /// The section's size as the filters left it (cleanup's own fix-ups
    /// are not counted, as they are not for an unedited message).
    pub fn len(&self) -> usize {
        self.prepends.len() + self.fields.len()
    }
}

impl Edits {
    /// Takes one edit.
    pub fn push(&mut self, edit: Edit, limits: &Limits) -> Result<(), EditReject> {
        self.count += 1;
        if self.count > limits.edits {
            return Err(EditReject::TooMany);
        }
        self.carried += carried(&edit) as u64;
        if self.carried > limits.message_size {
            return Err(EditReject::TooBig);
        }
        match edit {
            Edit::Prepend { name, value } => self.prepends.push((name, value)),
            // The first reason is the one logged: later ones change nothing.
            Edit::Hold { reason } => {
                self.hold.get_or_insert(reason);
            }
            Edit::Discard { reason } => {
                self.discard.get_or_insert(reason);
            }
            Edit::Milter(m) => match m {
                Modification::AddHeader { name, value } => self.headers.push((HeaderOp::Add, name, value)),
                Modification::InsertHeader { index, name, value } => {
                    self.headers.push((HeaderOp::Insert(index), name, value))
                }
                Modification::ChangeHeader { index, name, value } => {
                    self.headers.push((HeaderOp::Change(index), name, value))
                }
                Modification::ReplaceBody(chunk) => self.body.get_or_insert_with(Vec::new).extend_from_slice(&chunk),
                Modification::AddRecipient(address) => {
                    self.envelope.push(EnvelopeEdit::AddRecipient { address, args: EsmtpArgs::default() })
                }
                Modification::AddRecipientWithArgs { address, args } => {
                    self.envelope.push(EnvelopeEdit::AddRecipient { address, args })
                }
                Modification::DeleteRecipient(address) => self.envelope.push(EnvelopeEdit::DeleteRecipient(address)),
                Modification::ChangeSender { address, args } => {
                    self.envelope.push(EnvelopeEdit::ChangeSender { address, args })
                }
            },
        }
        Ok(())
    }

    /// Whether the queue file differs from the unedited one: then it is
    /// rebuilt at `End`. HOLD and DISCARD alone change only where the file
    /// goes.
    pub fn change_file(&self) -> bool {
        !self.prepends.is_empty() || !self.headers.is_empty() || self.body.is_some() || !self.envelope.is_empty()
    }

    pub fn hold(&self) -> Option<&str> {
        self.hold.as_deref()
    }

    pub fn discard(&self) -> Option<&str> {
        self.discard.as_deref()
    }

    /// The header section after the edits; `client` is the section the
    /// client sent, without its empty line.
    pub fn header(&self, client: &[u8]) -> EditedHeader {
        let mut fields = split_fields(client);
        for (op, name, value) in &self.headers {
            let field = Cow::Owned(field_line(name, b": ", value));
            let names: Vec<&[u8]> = fields.iter().map(|f| field_name(f)).collect();
            match place_header(*op, name, value.is_empty(), names.into_iter()) {
                Placement::Append => fields.push(field),
                Placement::Insert(i) => fields.insert(i, field),
                Placement::Replace(i) => fields[i] = field,
                Placement::Remove(i) => {
                    fields.remove(i);
                }
                Placement::Nothing => {}
            }
        }
        let mut prepends = Vec::new();
        for (name, value) in &self.prepends {
            prepends.extend_from_slice(&field_line(name, b":", value));
        }
        EditedHeader { prepends, fields: fields.concat() }
    }

    /// The replacement body with CRLF line ends, if a milter replaced it.
    pub fn body(&self) -> Option<Vec<u8>> {
        self.body.as_deref().map(to_crlf)
    }

    /// Applies the envelope edits in order. `log_id` names the message in
    /// the log lines about ignored arguments and recipients.
    pub fn envelope(
        &self,
        sender: &mut SenderInfo,
        recipients: &mut Vec<RecipientInfo>,
        log_id: &str,
    ) -> Result<(), EditReject> {
        let utf8 = sender.smtputf8;
        for edit in &self.envelope {
            match edit {
                EnvelopeEdit::AddRecipient { address, args } => {
                    let bare = unbracket(address);
                    address::parse_mailbox(bare, utf8)
                        .map_err(|error| EditReject::BadRecipient { address: bare.to_owned(), error })?;
                    // A duplicate is dropped, as smtpd drops one.
                    if recipients.iter().any(|r| same_mailbox(&r.address, bare)) {
                        continue;
                    }
                    let (notify, orcpt) = recipient_args(args, bare, log_id);
                    recipients.push(RecipientInfo { address: bare.to_owned(), notify, orcpt });
                }
                EnvelopeEdit::DeleteRecipient(address) => {
                    let bare = unbracket(address);
                    let before = recipients.len();
                    recipients.retain(|r| !same_mailbox(&r.address, bare));
                    if recipients.len() == before {
                        tracing::debug!("{log_id}: filter deleted recipient <{bare}>, which the message does not have");
                    }
                }
                EnvelopeEdit::ChangeSender { address, args } => {
                    let bare = unbracket(address);
                    if !bare.is_empty() {
                        address::parse_mailbox(bare, utf8)
                            .map_err(|error| EditReject::BadSender { address: bare.to_owned(), error })?;
                    }
                    sender.address = bare.to_owned();
                    sender_args(args, sender, log_id);
                }
            }
        }
        Ok(())
    }
}

/// The octets of message content an edit carries.
fn carried(edit: &Edit) -> usize {
    let field = |name: &HeaderName, value: &HeaderValue| name.as_str().len() + value.as_bytes().len();
    match edit {
        Edit::Prepend { name, value } => field(name, value),
        Edit::Milter(
            Modification::AddHeader { name, value }
            | Modification::InsertHeader { name, value, .. }
            | Modification::ChangeHeader { name, value, .. },
        ) => field(name, value),
        Edit::Milter(Modification::ReplaceBody(chunk)) => chunk.len(),
        _ => 0,
    }
}

/// `<a@b>` or `a@b` (filters send either) as `a@b`; `<>` as empty.
fn unbracket(address: &MilterAddress) -> &str {
    let a = address.as_str().trim();
    a.strip_prefix('<').and_then(|a| a.strip_suffix('>')).unwrap_or(a)
}

/// Local parts compare exactly, domains without regard to case.
fn same_mailbox(a: &str, b: &str) -> bool {
    match (a.rsplit_once('@'), b.rsplit_once('@')) {
        (Some((la, da)), Some((lb, db))) => la == lb && da.to_lowercase() == db.to_lowercase(),
        _ => a == b,
    }
}

/// `KEY=value` words; a word without `=` is a key without value.
fn esmtp_args(args: &EsmtpArgs) -> impl Iterator<Item = (String, Option<&str>)> {
    args.as_str().split_ascii_whitespace().map(|word| match word.split_once('=') {
        Some((key, value)) => (key.to_ascii_uppercase(), Some(value)),
        None => (word.to_ascii_uppercase(), None),
    })
}

/// NOTIFY and ORCPT, parsed as smtpd parses them; anything else, or a
/// value that does not parse, is logged and ignored.
fn recipient_args(args: &EsmtpArgs, address: &str, log_id: &str) -> (Notify, String) {
    let (mut notify, mut orcpt) = (Notify::default(), String::new());
    for (key, value) in esmtp_args(args) {
        let parsed = match key.as_str() {
            "NOTIFY" => dsn::parse_notify(value).map(|n| notify = n),
            "ORCPT" => dsn::parse_orcpt(value).map(|o| orcpt = o),
            _ => {
                tracing::warn!(
                    "warning: {log_id}: filter added recipient <{address}>: ignoring unknown argument {key}"
                );
                continue;
            }
        };
        if let Err(e) = parsed {
            tracing::warn!("warning: {log_id}: filter added recipient <{address}>: ignoring {key}: {e}");
        }
    }
    (notify, orcpt)
}

/// RET and ENVID, as smtpd parses them; anything else, or a value that
/// does not parse, is logged and ignored. Absent ones keep their values.
fn sender_args(args: &EsmtpArgs, sender: &mut SenderInfo, log_id: &str) {
    for (key, value) in esmtp_args(args) {
        let parsed = match key.as_str() {
            "RET" => dsn::parse_ret(value).map(|r| sender.ret = Some(r)),
            "ENVID" => dsn::parse_envid(value).map(|e| sender.envid = e),
            _ => {
                tracing::warn!(
                    "warning: {log_id}: filter changed sender to <{}>: ignoring unknown argument {key}",
                    sender.address
                );
                continue;
            }
        };
        if let Err(e) = parsed {
            tracing::warn!("warning: {log_id}: filter changed sender to <{}>: ignoring {key}: {e}", sender.address);
        }
    }
}

/// The fields of a header section, each with its folded lines and its line
/// end; a last line without one gets CRLF, so a field can follow it.
fn split_fields(section: &[u8]) -> Vec<Cow<'_, [u8]>> {
    let mut fields: Vec<Cow<'_, [u8]>> = Vec::new();
    let (mut start, mut pos) = (0, 0);
    while pos < section.len() {
        if pos > start && !matches!(section[pos], b' ' | b'\t') {
            fields.push(Cow::Borrowed(&section[start..pos]));
            start = pos;
        }
        pos = section[pos..].iter().position(|&b| b == b'\n').map_or(section.len(), |nl| pos + nl + 1);
    }
    if start < section.len() {
        let last = &section[start..];
        fields.push(if last.ends_with(b"\n") { Cow::Borrowed(last) } else { Cow::Owned([last, b"\r\n"].concat()) });
    }
    fields
}

/// The name of a field line: what precedes its colon.
fn field_name(field: &[u8]) -> &[u8] {
    field.iter().position(|&b| b == b':').map_or(field, |colon| &field[..colon])
}

/// `name`, `separator`, the value with CRLF line ends, CRLF.
fn field_line(name: &HeaderName, separator: &[u8], value: &HeaderValue) -> Vec<u8> {
    let mut line = Vec::with_capacity(name.as_str().len() + separator.len() + value.as_bytes().len() + 2);
    line.extend_from_slice(name.as_str().as_bytes());
    line.extend_from_slice(separator);
    line.extend_from_slice(&to_crlf(value.as_bytes()));
    line.extend_from_slice(b"\r\n");
    line
}

/// Every bare LF as CRLF; CRLF stays.
fn to_crlf(bytes: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(bytes.len() + bytes.len() / 32);
    let mut previous = 0u8;
    for &b in bytes {
        if b == b'\n' && previous != b'\r' {
            out.push(b'\r');
        }
        out.push(b);
        previous = b;
    }
    out
}

#[cfg(test)]
mod tests;
