//! Lookup tables: Postfix's one idea behind aliases, recipient lists,
//! access lists and header checks. A table maps a key to a result; every
//! restriction that needs a list looks it up the same way, whatever kind
//! of table the operator chose.
//!
//! This module is the part that needs no I/O beyond reading a file when a
//! table is loaded (a socketmap table talks to its server at each lookup,
//! through [`crate::socketmap`], and is the only kind whose lookup can
//! fail: [`Table::lookup`]): the table kinds whose contents live in mortal's own
//! configuration or files, their parsers (strict, with the file and line
//! of any problem) and their lookups, and Postfix's lookup order for
//! addresses ([`address_keys`]).
//!
//! | kind | written | like Postfix's |
//! |---|---|---|
//! | inline | `inline:{ key = value, key2 = value2 }` | `inline:` |
//! | text | `texthash:/path` | `texthash:` (and `hash:` once `postmap`ed) |
//! | cidr | `cidr:/path` | `cidr:` |
//! | regexp | `regexp:/path` | `regexp:`/`pcre:` |
//! | socketmap | `socketmap:unix:/path:name`, `socketmap:inet:IP:PORT:name` | `socketmap:` (an external server: SQL, LDAP...) |
//! | tcp | `tcp:IP:PORT` | `tcp:` (tcp_table(5)) |
//!
//! Keys of inline and text tables are matched case-insensitively, as
//! Postfix's hash tables are (it folds keys to lower case); results keep
//! their case. A cidr table is searched in file order and the first
//! matching network wins; a regexp table likewise, with `$1`...`$9` in a
//! result replaced by the match's groups, `!/pattern/` matching when the
//! pattern does not, and `if /pattern/` ... `endif` blocks. Every table is
//! bounded: [`MAX_ENTRIES`] entries, keys up to [`MAX_KEY`] octets, results
//! up to [`MAX_RESULT`].

pub use crate::socketmap::LookupError;
use crate::socketmap::{self, Client, SocketmapSpec};
use ipnet::IpNet;
use regex::{Regex, RegexBuilder};
use std::collections::HashMap;
use std::fmt;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use thiserror::Error;

/// Most entries in one table.
pub const MAX_ENTRIES: usize = 1_000_000;
/// Longest key, in octets (a whole RFC 5321 path is 256).
pub const MAX_KEY: usize = 1024;
/// Longest result, in octets: room for a long alias list or an access(5)
/// action with its text.
pub const MAX_RESULT: usize = 8192;
/// Deepest nesting of `if` blocks in a regexp table.
pub const MAX_IF_DEPTH: usize = 32;
/// Largest compiled regular expression, in octets of the regex crate's
/// size limit: a pattern that would take more is refused when loading.
pub const MAX_REGEX_SIZE: usize = 1 << 20;

/// Where a table comes from, as the configuration names it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TableSpec {
    /// `inline:{ key = value, ... }`.
    Inline(Vec<(String, String)>),
    /// `texthash:/path`.
    Text(PathBuf),
    /// `cidr:/path`.
    Cidr(PathBuf),
    /// `regexp:/path` (or `pcre:/path`, the same syntax).
    Regexp(PathBuf),
    /// `socketmap:unix:/path:name` or `socketmap:inet:IP:PORT:name`: an
    /// external server answers ([`crate::socketmap`]).
    Socketmap(SocketmapSpec),
    /// `tcp:IP:PORT`: a tcp_table(5) server answers.
    Tcp(std::net::SocketAddr),
}

impl TableSpec {
    /// The file a table is read from, if any.
    pub fn path(&self) -> Option<&Path> {
        match self {
            TableSpec::Inline(_) | TableSpec::Socketmap(_) | TableSpec::Tcp(_) => None,
            TableSpec::Text(p) | TableSpec::Cidr(p) | TableSpec::Regexp(p) => Some(p),
        }
    }

    /// The TCP port a socketmap table on `inet:` is asked on: the process
    /// that looks it up must be let through to it.
    pub fn inet_port(&self) -> Option<u16> {
        match self {
            TableSpec::Socketmap(SocketmapSpec { endpoint: crate::config::NextHop::Inet(addr), .. })
            | TableSpec::Tcp(addr) => Some(addr.port()),
            _ => None,
        }
    }

    /// The same table with a relative path taken from `base`.
    pub fn relative_to(self, base: &Path) -> TableSpec {
        match self {
            TableSpec::Text(p) => TableSpec::Text(base.join(p)),
            TableSpec::Cidr(p) => TableSpec::Cidr(base.join(p)),
            TableSpec::Regexp(p) => TableSpec::Regexp(base.join(p)),
            inline => inline,
        }
    }
}

impl std::str::FromStr for TableSpec {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        const KINDS: &str = "inline:{...}, texthash:/path, cidr:/path, regexp:/path, pcre:/path, socketmap:unix:/path:name or tcp:IP:PORT";
        let (kind, rest) = s.split_once(':').ok_or_else(|| format!("{s:?} is not a table ({KINDS})"))?;
        let path = || {
            if rest.is_empty() { Err(format!("{s:?} names no file")) } else { Ok(PathBuf::from(rest)) }
        };
        match kind {
            "inline" => parse_inline(rest).map(TableSpec::Inline),
            "texthash" | "hash" => path().map(TableSpec::Text),
            "cidr" => path().map(TableSpec::Cidr),
            "regexp" | "pcre" => path().map(TableSpec::Regexp),
            "socketmap" => SocketmapSpec::parse(rest).map(TableSpec::Socketmap),
            "tcp" => rest
                .parse()
                .map(TableSpec::Tcp)
                .map_err(|_| format!("{s:?}: a tcp table is tcp:IP:PORT (a literal address, [::1]:PORT for IPv6)")),
            other => Err(format!("unknown table kind {other:?} ({KINDS})")),
        }
    }
}

impl fmt::Display for TableSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            TableSpec::Inline(pairs) => {
                f.write_str("inline:{ ")?;
                for (i, (k, v)) in pairs.iter().enumerate() {
                    write!(f, "{}{k} = {v}", if i > 0 { ", " } else { "" })?;
                }
                f.write_str(" }")
            }
            TableSpec::Text(p) => write!(f, "texthash:{}", p.display()),
            TableSpec::Cidr(p) => write!(f, "cidr:{}", p.display()),
            TableSpec::Regexp(p) => write!(f, "regexp:{}", p.display()),
            TableSpec::Socketmap(spec) => spec.fmt(f),
            TableSpec::Tcp(addr) => write!(f, "tcp:{addr}"),
        }
    }
}

/// `{ key = value, key2 = value2 }` (Postfix's inline: syntax, with `=`
/// or white space between key and value).
fn parse_inline(text: &str) -> Result<Vec<(String, String)>, String> {
    let body = text
        .trim()
        .strip_prefix('{')
        .and_then(|t| t.strip_suffix('}'))
        .ok_or_else(|| format!("inline table {text:?} is not {{ key = value, ... }}"))?;
    let mut pairs = Vec::new();
    for item in body.split(',').map(str::trim).filter(|i| !i.is_empty()) {
        let (key, value) = item
            .split_once('=')
            .or_else(|| item.split_once(char::is_whitespace))
            .ok_or_else(|| format!("inline table entry {item:?} has no value"))?;
        let (key, value) = (key.trim(), value.trim());
        if key.is_empty() || value.is_empty() {
            return Err(format!("inline table entry {item:?} has no key or no value"));
        }
        pairs.push((key.to_owned(), value.to_owned()));
    }
    Ok(pairs)
}

/// A problem in a table's source, with its place.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[error("{}{}: {message}", file.display(), line.map(|l| format!(":{l}")).unwrap_or_default())]
pub struct TableError {
    pub file: PathBuf,
    /// 1-based; `None` for problems of the whole table (unreadable, too big).
    pub line: Option<usize>,
    pub message: String,
}

/// A loaded table.
#[derive(Debug)]
pub enum Table {
    /// inline and texthash: keys folded to lower case.
    Hash(HashMap<String, String>),
    Cidr(Vec<(IpNet, String)>),
    Regexp(Vec<RegexpRule>),
    /// socketmap and tcp_table: asked at each lookup; it can fail
    /// ([`Table::lookup`]).
    Socketmap(Client),
}

/// One line of a regexp table.
#[derive(Debug)]
pub enum RegexpRule {
    /// `/pattern/flags result` (or `!/pattern/flags result`).
    Match {
        pattern: Regex,
        negated: bool,
        result: String,
    },
    /// `if /pattern/` (or `if !/pattern/`): the rules up to the matching
    /// `endif` apply only when it matches.
    If {
        pattern: Regex,
        negated: bool,
        end: usize,
    },
    EndIf,
}

impl Table {
    /// Loads `spec`, reading its file if it has one; a remote table waits
    /// [`socketmap::TIMEOUT`] for its server.
    pub fn load(spec: &TableSpec) -> Result<Table, TableError> {
        Table::load_with(spec, socketmap::TIMEOUT)
    }

    /// [`Table::load`] with the daemons' `[server] table_timeout`: the
    /// longest wait for a remote table's server (connect, write, answer).
    pub fn load_with(spec: &TableSpec, timeout: std::time::Duration) -> Result<Table, TableError> {
        let read = |path: &Path| {
            std::fs::read_to_string(path).map_err(|e| TableError {
                file: path.to_owned(),
                line: None,
                message: format!("cannot read: {e}"),
            })
        };
        match spec {
            TableSpec::Inline(pairs) => {
                let file = PathBuf::from("inline");
                let mut map = HashMap::new();
                for (key, value) in pairs {
                    check_entry(&file, None, key, value)?;
                    map.entry(key.to_lowercase()).or_insert_with(|| value.clone());
                }
                Ok(Table::Hash(map))
            }
            TableSpec::Text(path) => parse_text(path, &read(path)?),
            TableSpec::Cidr(path) => parse_cidr(path, &read(path)?),
            TableSpec::Regexp(path) => parse_regexp(path, &read(path)?),
            TableSpec::Socketmap(spec) => Ok(Table::Socketmap(Client::new(spec.clone(), timeout))),
            TableSpec::Tcp(addr) => Ok(Table::Socketmap(Client::tcp(*addr, timeout))),
        }
    }

    /// A table of file kind `spec` (text, cidr or regexp) parsed from
    /// `text` as if read from its file; an inline spec ignores `text`.
    pub fn parse(spec: &TableSpec, text: &str) -> Result<Table, TableError> {
        match spec {
            TableSpec::Inline(_) | TableSpec::Socketmap(_) | TableSpec::Tcp(_) => Table::load(spec),
            TableSpec::Text(path) => parse_text(path, text),
            TableSpec::Cidr(path) => parse_cidr(path, text),
            TableSpec::Regexp(path) => parse_regexp(path, text),
        }
    }

    /// The result for `key`, if any, or why there is no answer (only a
    /// socketmap table can fail: TEMP, TIMEOUT, no server). A cidr table
    /// takes the key as an IP address (anything else finds nothing).
    pub fn lookup(&self, key: &str) -> Result<Option<String>, LookupError> {
        match self {
            Table::Socketmap(client) => client.lookup(key),
            local => Ok(local.get(key)),
        }
    }

    /// The result for `key` in a table that cannot fail; a socketmap
    /// table is asked through [`Table::lookup`] only.
    fn get(&self, key: &str) -> Option<String> {
        match self {
            Table::Socketmap(_) => unreachable!("socketmap tables are asked through Table::lookup"),
            Table::Hash(map) => map.get(&key.to_lowercase()).cloned(),
            Table::Cidr(entries) => {
                let addr: IpAddr = key.parse().ok()?;
                let addr = addr.to_canonical();
                entries.iter().find(|(net, _)| net.contains(&addr)).map(|(_, result)| result.clone())
            }
            Table::Regexp(rules) => regexp_lookup(rules, key),
        }
    }

    /// Entries (rules, for a regexp table).
    pub fn len(&self) -> usize {
        match self {
            Table::Hash(m) => m.len(),
            Table::Cidr(e) => e.len(),
            Table::Regexp(r) => r.len(),
            Table::Socketmap(_) => 0,
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

fn check_entry(file: &Path, line: Option<usize>, key: &str, value: &str) -> Result<(), TableError> {
    let err = |message: String| TableError { file: file.to_owned(), line, message };
    if key.len() > MAX_KEY {
        return Err(err(format!("key longer than {MAX_KEY} octets")));
    }
    if value.len() > MAX_RESULT {
        return Err(err(format!("result longer than {MAX_RESULT} octets")));
    }
    if key.chars().chain(value.chars()).any(|c| c.is_control() && c != '\t') {
        return Err(err("control character in key or result".into()));
    }
    Ok(())
}

/// The logical lines of a table file: comments and empty lines dropped,
/// a line starting with white space continuing the one before (Postfix's
/// rule for every table file), each with the number of its first line.
fn logical_lines(text: &str) -> Vec<(usize, String)> {
    let mut out: Vec<(usize, String)> = Vec::new();
    for (i, raw) in text.lines().enumerate() {
        let line = raw.trim_end();
        if line.trim_start().starts_with('#') || line.trim().is_empty() {
            continue;
        }
        match out.last_mut() {
            Some((_, prev)) if line.starts_with([' ', '\t']) => {
                prev.push(' ');
                prev.push_str(line.trim_start());
            }
            _ => out.push((i + 1, line.to_owned())),
        }
    }
    out
}

fn too_many(path: &Path) -> TableError {
    TableError { file: path.to_owned(), line: None, message: format!("more than {MAX_ENTRIES} entries") }
}

/// `key value` lines (value: the rest of the line).
fn parse_text(path: &Path, text: &str) -> Result<Table, TableError> {
    let mut map = HashMap::new();
    for (line, content) in logical_lines(text) {
        let err = |message: String| TableError { file: path.to_owned(), line: Some(line), message };
        if content.starts_with([' ', '\t']) {
            return Err(err("continuation line with nothing to continue".into()));
        }
        let (key, value) =
            content.split_once([' ', '\t']).ok_or_else(|| err(format!("{content:?} has a key and no value")))?;
        let value = value.trim();
        check_entry(path, Some(line), key, value)?;
        // As postmap: the first of duplicate keys counts.
        map.entry(key.to_lowercase()).or_insert_with(|| value.to_owned());
        if map.len() > MAX_ENTRIES {
            return Err(too_many(path));
        }
    }
    Ok(Table::Hash(map))
}

/// `network/prefix result` or `address result` lines, in order.
fn parse_cidr(path: &Path, text: &str) -> Result<Table, TableError> {
    let mut entries = Vec::new();
    for (line, content) in logical_lines(text) {
        let err = |message: String| TableError { file: path.to_owned(), line: Some(line), message };
        let (net, value) =
            content.split_once([' ', '\t']).ok_or_else(|| err(format!("{content:?} has a network and no result")))?;
        let value = value.trim();
        let parsed = if net.contains('/') {
            net.parse::<IpNet>().map_err(|e| err(format!("{net:?}: {e}")))?
        } else {
            let addr: IpAddr = net.parse().map_err(|e| err(format!("{net:?}: {e}")))?;
            IpNet::from(addr)
        };
        // Postfix refuses a network with host bits set: it is a typo more
        // often than not.
        if parsed != parsed.trunc() {
            return Err(err(format!("{net:?} has host bits set (did you mean {}?)", parsed.trunc())));
        }
        check_entry(path, Some(line), net, value)?;
        entries.push((parsed, value.to_owned()));
        if entries.len() > MAX_ENTRIES {
            return Err(too_many(path));
        }
    }
    Ok(Table::Cidr(entries))
}

/// `[!]/pattern/flags result`, `if [!]/pattern/flags`, `endif`.
fn parse_regexp(path: &Path, text: &str) -> Result<Table, TableError> {
    let mut rules = Vec::new();
    let mut open: Vec<(usize, usize)> = Vec::new();
    for (line, content) in logical_lines(text) {
        let err = |message: String| TableError { file: path.to_owned(), line: Some(line), message };
        let content = content.trim();
        if content.eq_ignore_ascii_case("endif") {
            let (at, _) = open.pop().ok_or_else(|| err("endif without if".into()))?;
            let end = rules.len();
            if let Some(RegexpRule::If { end: e, .. }) = rules.get_mut(at) {
                *e = end;
            }
            rules.push(RegexpRule::EndIf);
            continue;
        }
        let (is_if, rest) = match content.split_once(char::is_whitespace) {
            Some((word, rest)) if word.eq_ignore_ascii_case("if") => (true, rest.trim_start()),
            _ => (false, content),
        };
        let (pattern, negated, after) = parse_pattern(rest).map_err(&err)?;
        if is_if {
            if !after.trim().is_empty() {
                return Err(err(format!("if takes a pattern only, not {:?}", after.trim())));
            }
            if open.len() >= MAX_IF_DEPTH {
                return Err(err(format!("if blocks nested deeper than {MAX_IF_DEPTH}")));
            }
            open.push((rules.len(), line));
            rules.push(RegexpRule::If { pattern, negated, end: usize::MAX });
            continue;
        }
        let result = after.trim();
        if result.is_empty() {
            return Err(err("pattern without a result".into()));
        }
        if negated && result.contains('$') && (1..=9).any(|n| result.contains(&format!("${n}"))) {
            return Err(err("$N in the result of a !/pattern/, which has no groups".into()));
        }
        check_entry(path, Some(line), "", result)?;
        rules.push(RegexpRule::Match { pattern, negated, result: result.to_owned() });
        if rules.len() > MAX_ENTRIES {
            return Err(too_many(path));
        }
    }
    if let Some((_, line)) = open.pop() {
        return Err(TableError { file: path.to_owned(), line: Some(line), message: "if without endif".into() });
    }
    Ok(Table::Regexp(rules))
}

/// `[!]/pattern/flags` at the start of `text`, any non-space delimiter;
/// returns the compiled pattern, the negation and what follows.
fn parse_pattern(text: &str) -> Result<(Regex, bool, &str), String> {
    let (negated, text) = match text.strip_prefix('!') {
        Some(rest) => (true, rest),
        None => (false, text),
    };
    let mut chars = text.char_indices();
    let (_, delim) = chars.next().ok_or("missing pattern")?;
    if delim.is_whitespace() || delim.is_alphanumeric() || delim == '\\' {
        return Err(format!("{text:?} does not start with a pattern delimiter such as /"));
    }
    let mut escaped = false;
    let mut end = None;
    for (i, c) in chars.by_ref() {
        if escaped {
            escaped = false;
        } else if c == '\\' {
            escaped = true;
        } else if c == delim {
            end = Some(i);
            break;
        }
    }
    let end = end.ok_or_else(|| format!("pattern {text:?} has no closing {delim}"))?;
    let pattern = &text[delim.len_utf8()..end];
    let after = &text[end + delim.len_utf8()..];
    let flags_len = after.find(char::is_whitespace).unwrap_or(after.len());
    let (flags, rest) = after.split_at(flags_len);
    // Postfix's default is case-insensitive; `i` toggles it.
    let mut builder = RegexBuilder::new(pattern);
    let mut insensitive = true;
    for f in flags.chars() {
        match f {
            'i' => insensitive = !insensitive,
            'x' => {
                builder.ignore_whitespace(true);
            }
            'm' => {
                builder.multi_line(true);
            }
            's' => {
                builder.dot_matches_new_line(true);
            }
            other => return Err(format!("unknown pattern flag {other:?} (i, x, m, s)")),
        }
    }
    let regex = builder
        .case_insensitive(insensitive)
        .size_limit(MAX_REGEX_SIZE)
        .build()
        .map_err(|e| format!("pattern {pattern:?}: {e}"))?;
    Ok((regex, negated, rest))
}

fn regexp_lookup(rules: &[RegexpRule], key: &str) -> Option<String> {
    let mut i = 0;
    while i < rules.len() {
        match &rules[i] {
            RegexpRule::If { pattern, negated, end } => {
                if pattern.is_match(key) == *negated {
                    // Skip the block (to its endif).
                    i = *end;
                }
            }
            RegexpRule::EndIf => {}
            RegexpRule::Match { pattern, negated: true, result } => {
                if !pattern.is_match(key) {
                    return Some(result.clone());
                }
            }
            RegexpRule::Match { pattern, negated: false, result } => {
                if let Some(caps) = pattern.captures(key) {
                    return Some(expand(result, &caps));
                }
            }
        }
        i += 1;
    }
    None
}

/// A regexp result with Postfix's substitutions: `$1`...`$9` and `${1}`...
/// `${9}` are the groups of the match (empty when a group did not take
/// part), `$$` is a `$`; any other `$` stays as it is.
fn expand(result: &str, caps: &regex::Captures<'_>) -> String {
    let group = |d: u8| caps.get(usize::from(d - b'0')).map_or("", |m| m.as_str());
    let bytes = result.as_bytes();
    let mut out = String::with_capacity(result.len());
    let mut i = 0;
    while i < bytes.len() {
        match (bytes[i], bytes.get(i + 1), bytes.get(i + 2), bytes.get(i + 3)) {
            (b'$', Some(b'$'), _, _) => {
                out.push('$');
                i += 2;
            }
            (b'$', Some(&d @ b'1'..=b'9'), _, _) => {
                out.push_str(group(d));
                i += 2;
            }
            (b'$', Some(b'{'), Some(&d @ b'1'..=b'9'), Some(b'}')) => {
                out.push_str(group(d));
                i += 4;
            }
            _ => {
                let c = result[i..].chars().next().expect("a character at a char boundary");
                out.push(c);
                i += c.len_utf8();
            }
        }
    }
    out
}

/// The keys Postfix tries for an address, in order (virtual(5), access(5)
/// for recipients): `user+ext@domain`, `user@domain`, `user+ext`, `user`,
/// `@domain`; without an extension (no `delimiter`, or none in the local
/// part) the `+ext` forms are left out. The domain is as given (tables
/// fold case themselves).
pub fn address_keys(address: &str, delimiter: Option<char>) -> Vec<String> {
    let (local, domain) = match address.rsplit_once('@') {
        Some((l, d)) => (l, Some(d)),
        None => (address, None),
    };
    let bare = delimiter.and_then(|d| local.split_once(d)).map(|(user, _)| user).filter(|u| !u.is_empty());
    let mut keys = Vec::with_capacity(5);
    match domain {
        Some(domain) => {
            keys.push(format!("{local}@{domain}"));
            if let Some(user) = bare {
                keys.push(format!("{user}@{domain}"));
            }
            keys.push(local.to_owned());
            if let Some(user) = bare {
                keys.push(user.to_owned());
            }
            keys.push(format!("@{domain}"));
        }
        None => {
            keys.push(local.to_owned());
            if let Some(user) = bare {
                keys.push(user.to_owned());
            }
        }
    }
    keys
}

/// The first result for `address` in Postfix's address order, or why
/// the table could not answer.
pub fn lookup_address(table: &Table, address: &str, delimiter: Option<char>) -> Result<Option<String>, LookupError> {
    for key in address_keys(address, delimiter) {
        if let Some(result) = table.lookup(&key)? {
            return Ok(Some(result));
        }
    }
    Ok(None)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file(text: &str) -> tempfile::NamedTempFile {
        let mut f = tempfile::NamedTempFile::new().unwrap();
        std::io::Write::write_all(&mut f, text.as_bytes()).unwrap();
        f
    }

    fn load(kind: &str, text: &str) -> Result<Table, TableError> {
        let f = file(text);
        let spec: TableSpec = format!("{kind}:{}", f.path().display()).parse().unwrap();
        Table::load(&spec)
    }

    #[test]
    fn specs_parse_and_print() {
        for (text, want) in [
            ("texthash:/etc/mortal/virtual", TableSpec::Text("/etc/mortal/virtual".into())),
            ("hash:/etc/postfix/access", TableSpec::Text("/etc/postfix/access".into())),
            ("cidr:/etc/mortal/clients.cidr", TableSpec::Cidr("/etc/mortal/clients.cidr".into())),
            ("pcre:/etc/mortal/header_checks", TableSpec::Regexp("/etc/mortal/header_checks".into())),
            (
                "inline:{ a@example.test = b@example.test, postmaster root }",
                TableSpec::Inline(vec![
                    ("a@example.test".into(), "b@example.test".into()),
                    ("postmaster".into(), "root".into()),
                ]),
            ),
        ] {
            assert_eq!(text.parse::<TableSpec>().unwrap(), want, "{text}");
        }
        for bad in ["btree:/x", "texthash:", "inline:{ a }", "inline:a = b", "/etc/aliases"] {
            assert!(bad.parse::<TableSpec>().is_err(), "{bad}");
        }
        assert_eq!(TableSpec::Text("/x".into()).to_string(), "texthash:/x");
    }

    /// Keys fold case, values keep theirs; continuation lines join; the
    /// first of duplicate keys counts, as postmap keeps it.
    #[test]
    fn text_tables() {
        let t = load(
            "texthash",
            "# aliases\nAlice@Example.TEST  alice@dovecot.test\n\nlist@example.test a@example.test,\n  b@example.test\nalice@example.test ignored\n",
        )
        .unwrap();
        assert_eq!(t.get("alice@example.test").as_deref(), Some("alice@dovecot.test"));
        assert_eq!(t.get("LIST@example.test").as_deref(), Some("a@example.test, b@example.test"));
        assert_eq!(t.get("bob@example.test"), None);
        let e = load("texthash", "ok value\nlonely\n").unwrap_err();
        assert_eq!((e.line, e.message.as_str()), (Some(2), "\"lonely\" has a key and no value"));
    }

    #[test]
    fn cidr_tables_match_in_order() {
        let t =
            load("cidr", "192.0.2.0/24 REJECT listed\n192.0.2.7 OK\n2001:db8::/32 DUNNO\n0.0.0.0/0 DUNNO\n").unwrap();
        assert_eq!(t.get("192.0.2.7").as_deref(), Some("REJECT listed"));
        assert_eq!(t.get("::ffff:192.0.2.9").as_deref(), Some("REJECT listed"));
        assert_eq!(t.get("2001:db8::1").as_deref(), Some("DUNNO"));
        assert_eq!(t.get("not an address"), None);
        let e = load("cidr", "192.0.2.1/24 REJECT\n").unwrap_err();
        assert!(e.message.contains("host bits") && e.line == Some(1), "{e}");
        assert!(load("cidr", "192.0.2.0/33 REJECT\n").is_err());
    }

    #[test]
    fn regexp_tables() {
        let t = load(
            "regexp",
            "/^(.*)\\+spam@example\\.test$/ $1@example.test\nif /@example\\.net$/\n!/^postmaster@/ REJECT not here\nendif\n/^Subject: .*viagra/ REJECT spam\n#i toggles: this one is case-sensitive\n/^X-Exact: Yes$/i WARN exact\n",
        )
        .unwrap();
        assert_eq!(t.get("bob+spam@example.test").as_deref(), Some("bob@example.test"));
        let t2 = load("regexp", "/^(a)(b)?_(.*)$/ $1_${3}x $2 $$5 $x\n").unwrap();
        assert_eq!(t2.get("a_zz").as_deref(), Some("a_zzx  $5 $x"));
        assert_eq!(t.get("bob@example.net").as_deref(), Some("REJECT not here"));
        assert_eq!(t.get("postmaster@example.net"), None);
        assert_eq!(t.get("subject: Buy VIAGRA now").as_deref(), Some("REJECT spam"));
        assert_eq!(t.get("X-Exact: Yes").as_deref(), Some("WARN exact"));
        assert_eq!(t.get("x-exact: yes"), None);
        for (text, want) in [
            ("/a/ \n", "pattern without a result"),
            ("/a OK\n", "has no closing /"),
            ("if /a/\n/b/ OK\n", "if without endif"),
            ("endif\n", "endif without if"),
            ("/a/q OK\n", "unknown pattern flag"),
            ("!/(a)/ $1\n", "$N in the result"),
            ("/(/ OK\n", "pattern \"(\""),
        ] {
            let e = load("regexp", text).unwrap_err();
            assert!(e.message.contains(want), "{text:?}: {e}");
        }
    }

    /// virtual(5)'s order, with and without a delimiter and an extension.
    #[test]
    fn address_lookup_order() {
        assert_eq!(
            address_keys("user+ext@example.test", Some('+')),
            ["user+ext@example.test", "user@example.test", "user+ext", "user", "@example.test"]
        );
        assert_eq!(address_keys("user@example.test", Some('+')), ["user@example.test", "user", "@example.test"]);
        assert_eq!(address_keys("user+ext@example.test", None), ["user+ext@example.test", "user+ext", "@example.test"]);
        assert_eq!(address_keys("+only@example.test", Some('+')), ["+only@example.test", "+only", "@example.test"]);
        let t = Table::load(
            &"inline:{ @example.test = catchall@example.test, bob@example.test = robert@example.test }"
                .parse()
                .unwrap(),
        )
        .unwrap();
        assert_eq!(
            lookup_address(&t, "bob+news@example.test", Some('+')).unwrap().as_deref(),
            Some("robert@example.test")
        );
        assert_eq!(
            lookup_address(&t, "carol@example.test", Some('+')).unwrap().as_deref(),
            Some("catchall@example.test")
        );
        assert_eq!(lookup_address(&t, "carol@example.org", Some('+')), Ok(None));
    }

    #[test]
    fn limits_and_bad_characters_are_refused() {
        let long = format!("k {}\n", "v".repeat(MAX_RESULT + 1));
        assert!(load("texthash", &long).unwrap_err().message.contains("result longer"));
        assert!(load("texthash", "k v\u{7}\n").unwrap_err().message.contains("control character"));
        let unreadable = Table::load(&TableSpec::Text("/nonexistent/mortal/table".into())).unwrap_err();
        assert_eq!((unreadable.line, unreadable.message.starts_with("cannot read")), (None, true));
    }
}

/// Deepest chain of aliases (an alias of an alias of ...), Postfix's
/// virtual_alias_recursion_limit.
pub const MAX_ALIAS_DEPTH: usize = 1000;
/// Most addresses one recipient may expand to, Postfix's
/// virtual_alias_expansion_limit.
pub const MAX_ALIAS_EXPANSION: usize = 1000;

/// Why an address could not be expanded: the message must not be taken
/// (or is deferred), as Postfix's cleanup does.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum AliasError {
    #[error("virtual alias loop: <{0}> expands to itself through other aliases")]
    Loop(String),
    #[error("virtual alias chain deeper than {MAX_ALIAS_DEPTH} at <{0}>")]
    TooDeep(String),
    #[error("<{0}> expands to more than {MAX_ALIAS_EXPANSION} addresses")]
    TooMany(String),
    /// A table could not answer (a socketmap server down or in trouble).
    #[error("{0}")]
    Lookup(LookupError),
}

/// Virtual aliases (Postfix's `virtual_alias_maps`): the tables in order,
/// the first that has a result for an address wins.
#[derive(Debug, Default)]
pub struct Aliases {
    tables: Vec<Table>,
    delimiter: Option<char>,
}

impl Aliases {
    pub fn new(tables: Vec<Table>, delimiter: Option<char>) -> Self {
        Self { tables, delimiter }
    }

    /// `[server] virtual_alias_maps` and `recipient_delimiter`, loaded (at
    /// process start: `mortal reload` reloads them).
    pub fn load(config: &crate::config::Config) -> Result<Self, TableError> {
        let timeout = config.server.table_timeout;
        let tables =
            config.server.virtual_alias_maps.iter().map(|s| Table::load_with(s, timeout)).collect::<Result<_, _>>()?;
        Ok(Self::new(tables, config.server.recipient_delimiter))
    }

    pub fn is_empty(&self) -> bool {
        self.tables.is_empty()
    }

    /// The result for `address` and whether it matched without the
    /// address's extension: virtual(5)'s keys `user+ext@domain`,
    /// `user@domain`, `@domain` (the bare `user` forms are for local
    /// domains in Postfix, which mortal does not distinguish).
    fn result(&self, address: &str) -> Result<Option<(String, Option<String>)>, LookupError> {
        let Some((local, domain)) = address.rsplit_once('@') else { return Ok(None) };
        let extension = self.delimiter.and_then(|d| local.split_once(d)).filter(|(user, _)| !user.is_empty());
        let mut keys = vec![(address.to_owned(), None)];
        if let Some((user, ext)) = extension {
            keys.push((format!("{user}@{domain}"), Some(ext.to_owned())));
        }
        keys.push((format!("@{domain}"), None));
        for (key, ext) in keys {
            for table in &self.tables {
                if let Some(result) = table.lookup(&key)? {
                    return Ok(Some((result, ext)));
                }
            }
        }
        Ok(None)
    }

    /// Whether some table has an entry for `address`, or why a table
    /// could not say.
    pub fn has(&self, address: &str) -> Result<bool, LookupError> {
        Ok(self.result(address)?.is_some())
    }

    /// The addresses `address` is delivered to: itself when no table has
    /// it; else every address of the result (commas or white space
    /// between them), each expanded again, except one equal to the address
    /// it came from (`a@x  a@x, b@x` keeps a copy for `a`). A result
    /// `@domain` keeps the local part; an extension that the match did not
    /// need is put back on the results' local parts (Postfix's
    /// propagate_unmatched_extensions). Duplicates are dropped.
    pub fn expand(&self, address: &str) -> Result<Vec<String>, AliasError> {
        let mut out: Vec<String> = Vec::new();
        let mut chain = Vec::new();
        self.expand_into(address, &mut chain, &mut out, address)?;
        Ok(out)
    }

    fn expand_into(
        &self,
        address: &str,
        chain: &mut Vec<String>,
        out: &mut Vec<String>,
        root: &str,
    ) -> Result<(), AliasError> {
        let folded = address.to_lowercase();
        if chain.contains(&folded) {
            return Err(AliasError::Loop(address.to_owned()));
        }
        if chain.len() >= MAX_ALIAS_DEPTH {
            return Err(AliasError::TooDeep(address.to_owned()));
        }
        let Some((result, extension)) = self.result(address).map_err(AliasError::Lookup)? else {
            return push_unique(out, address, root);
        };
        chain.push(folded.clone());
        let local = address.rsplit_once('@').map_or(address, |(l, _)| l);
        for item in result.split([',', ' ', '\t']).map(|i| i.trim().trim_matches(['<', '>'])).filter(|i| !i.is_empty())
        {
            let mut target = match item.strip_prefix('@') {
                Some(domain) => format!("{local}@{domain}"),
                None => item.to_owned(),
            };
            if let (Some(ext), Some(d)) = (&extension, self.delimiter)
                && let Some((l, dom)) = target.rsplit_once('@')
                && !l.contains(d)
            {
                target = format!("{l}{d}{ext}@{dom}");
            }
            if target.to_lowercase() == folded {
                push_unique(out, &target, root)?;
            } else {
                self.expand_into(&target, chain, out, root)?;
            }
        }
        chain.pop();
        Ok(())
    }
}

fn push_unique(out: &mut Vec<String>, address: &str, root: &str) -> Result<(), AliasError> {
    if !out.iter().any(|a| a.eq_ignore_ascii_case(address)) {
        if out.len() >= MAX_ALIAS_EXPANSION {
            return Err(AliasError::TooMany(root.to_owned()));
        }
        out.push(address.to_owned());
    }
    Ok(())
}

#[cfg(test)]
mod alias_tests {
    use super::*;

    fn aliases(inline: &str) -> Aliases {
        let table = Table::load(&format!("inline:{{ {inline} }}").parse().unwrap()).unwrap();
        Aliases::new(vec![table], Some('+'))
    }

    #[test]
    fn expansion_follows_postfix() {
        let a = aliases(
            "list@example.test = alice@example.test bob@example.test, \
             alice@example.test = alice@dovecot.test, \
             keep@example.test = keep@example.test carol@example.test, \
             @example.org = @example.test, \
             bob@example.test = bob@dovecot.test",
        );
        assert_eq!(a.expand("list@example.test").unwrap(), ["alice@dovecot.test", "bob@dovecot.test"]);
        assert_eq!(a.expand("keep@example.test").unwrap(), ["keep@example.test", "carol@example.test"]);
        assert_eq!(a.expand("nobody@example.test").unwrap(), ["nobody@example.test"]);
        // Catch-all domain rewrite keeps the local part, then expands again.
        assert_eq!(a.expand("alice@example.org").unwrap(), ["alice@dovecot.test"]);
        assert_eq!(a.expand("zed@example.org").unwrap(), ["zed@example.test"]);
        // An unmatched extension goes along; a matched one does not.
        assert_eq!(a.expand("alice+news@example.test").unwrap(), ["alice+news@dovecot.test"]);
        assert!(a.has("LIST@example.test").unwrap() && !a.has("carol@example.test").unwrap());
    }

    #[test]
    fn loops_and_limits_are_errors() {
        let a = aliases(
            "a@example.test = b@example.test, b@example.test = c@example.test, c@example.test = a@example.test",
        );
        assert_eq!(a.expand("a@example.test"), Err(AliasError::Loop("a@example.test".into())));
        // Ten groups of 101: more than the limit in all, each within MAX_RESULT.
        let groups: Vec<String> = (0..10)
            .map(|g| {
                let members: Vec<String> = (0..101).map(|i| format!("u{g}x{i}@example.net")).collect();
                format!("g{g}@example.test = {}", members.join(" "))
            })
            .collect();
        let names: Vec<String> = (0..10).map(|g| format!("g{g}@example.test")).collect();
        let big = aliases(&format!("big@example.test = {}, {}", names.join(" "), groups.join(", ")));
        assert_eq!(big.expand("big@example.test"), Err(AliasError::TooMany("big@example.test".into())));
    }
}
