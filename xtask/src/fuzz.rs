//! `cargo xtask fuzz`: seed corpora and timed runs of every fuzz target.
//!
//! - `cargo xtask fuzz seed` writes the committed seed corpora under
//!   `fuzz/corpus/<target>/`: client input taken from smtpd's golden
//!   transcripts, IPC streams and queue files made with the proto
//!   encoders, the configs under `etc/`, and the SMTP smuggling variants.
//!   The files are deterministic, so re-running changes nothing.
//! - `cargo xtask fuzz [--time N]` runs every target for N seconds with
//!   cargo-fuzz (libFuzzer) and reports the executions of each. New inputs
//!   the fuzzer finds go to `target/fuzz-corpus/<target>/`, never into the
//!   committed seeds; crashes land in `fuzz/artifacts/<target>/` and fail
//!   the task.
//!
//! Only stable Rust is installed: cargo-fuzz passes nightly-only flags
//! (`-Zsanitizer`), which `RUSTC_BOOTSTRAP=1` unlocks on the stable
//! compiler.

use anyhow::{Context, Result, bail};
use mortal_proto::ipc::{BodyType, ClientInfo, DsnRet, Notify, RecipientInfo, Request, SenderInfo};
use mortal_proto::queue_file::{QueueFile, QueuedRecipient, RecipientState};
use std::fmt::Write as _;
use std::fs;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant, UNIX_EPOCH};

/// Every target in `fuzz/Cargo.toml`.
pub const TARGETS: &[&str] = &[
    "smtp_command",
    "smtp_data",
    "smtp_bdat",
    "smtp_session",
    "proxy_header",
    "ipc_decoder",
    "queue_file",
    "address",
    "config",
];

/// Seconds per target when `--time` is not given.
const DEFAULT_SECONDS: u64 = 30;

/// Longest input the fuzzer generates: enough for several SMTP commands,
/// a message with long lines, or a small queue file.
const MAX_INPUT_LEN: usize = 8192;

/// Time allowed on top of `--time` for building the target (the first
/// build compiles the workspace with sanitizers) and libFuzzer's exit.
const BUILD_ALLOWANCE: Duration = Duration::from_secs(900);

/// libFuzzer's memory cap per target process.
const RSS_LIMIT_MB: u32 = 2048;

/// Result of one target's run.
#[derive(Debug)]
pub struct FuzzRun {
    pub target: String,
    pub executions: u64,
    pub crashed: bool,
}

pub fn main(root: &Path, args: &[String]) -> Result<()> {
    if args.first().map(String::as_str) == Some("seed") {
        let n = write_seeds(root)?;
        eprintln!("==> wrote {n} seed files under fuzz/corpus/");
        return Ok(());
    }
    let mut seconds = DEFAULT_SECONDS;
    let mut only: Vec<String> = Vec::new();
    let mut it = args.iter();
    while let Some(a) = it.next() {
        match a.as_str() {
            "--time" => seconds = it.next().context("--time needs seconds")?.parse().context("--time N")?,
            "--target" => only.push(it.next().context("--target needs a name")?.clone()),
            other => bail!("unknown fuzz option {other:?} (use --time N, --target NAME, or `seed`)"),
        }
    }
    let runs = run_all(root, seconds, &only)?;
    let crashed: Vec<&str> = runs.iter().filter(|r| r.crashed).map(|r| r.target.as_str()).collect();
    if !crashed.is_empty() {
        bail!("fuzz targets crashed: {} (inputs under fuzz/artifacts/)", crashed.join(", "));
    }
    Ok(())
}

/// Runs each target (or those in `only`) for `seconds`; prints a table.
pub fn run_all(root: &Path, seconds: u64, only: &[String]) -> Result<Vec<FuzzRun>> {
    if !has_cargo_fuzz() {
        bail!("cargo-fuzz is not installed: cargo install cargo-fuzz --locked");
    }
    write_seeds(root)?;
    let mut runs = Vec::new();
    for target in TARGETS.iter().filter(|t| only.is_empty() || only.iter().any(|o| o == *t)) {
        let run = run_target(root, target, seconds)?;
        eprintln!(
            "==> fuzz {target}: {} executions in {seconds} s{}",
            run.executions,
            if run.crashed { ", CRASHED" } else { "" }
        );
        runs.push(run);
    }
    let mut table = String::from("| target | executions | result |\n|---|---:|---|\n");
    for r in &runs {
        let _ = writeln!(table, "| {} | {} | {} |", r.target, r.executions, if r.crashed { "CRASH" } else { "ok" });
    }
    let total: u64 = runs.iter().map(|r| r.executions).sum();
    let _ = writeln!(table, "\ntotal executions: {total} ({seconds} s per target)");
    println!("{table}");
    let out = root.join("target/fuzz-results.md");
    fs::create_dir_all(root.join("target"))?;
    fs::write(&out, &table).with_context(|| format!("write {}", out.display()))?;
    Ok(runs)
}

pub fn has_cargo_fuzz() -> bool {
    super::cargo().args(["fuzz", "--version"]).output().is_ok_and(|o| o.status.success())
}

fn run_target(root: &Path, target: &str, seconds: u64) -> Result<FuzzRun> {
    let work = root.join("target/fuzz-corpus").join(target);
    fs::create_dir_all(&work)?;
    let seeds = root.join("fuzz/corpus").join(target);
    let log_path = root.join("target/fuzz-corpus").join(format!("{target}.log"));
    let log = fs::File::create(&log_path)?;
    eprintln!("==> cargo fuzz run {target} ({seconds} s)");
    let mut child = super::cargo()
        .current_dir(root.join("fuzz"))
        .env("RUSTC_BOOTSTRAP", "1")
        .args(["fuzz", "run", target])
        .arg(&work)
        .arg(&seeds)
        .arg("--")
        .arg(format!("-max_total_time={seconds}"))
        .arg(format!("-max_len={MAX_INPUT_LEN}"))
        .arg(format!("-rss_limit_mb={RSS_LIMIT_MB}"))
        .arg("-print_final_stats=1")
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log)
        .spawn()
        .context("cannot run cargo fuzz")?;
    let deadline = Instant::now() + Duration::from_secs(seconds) + BUILD_ALLOWANCE;
    let status = loop {
        if let Some(status) = child.try_wait()? {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            bail!("fuzz {target} ran past its time bound; log in {}", log_path.display());
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    let mut text = String::new();
    fs::File::open(&log_path)?.read_to_string(&mut text)?;
    let executions = executions_in(&text);
    let crashed = !status.success();
    if crashed {
        let tail: Vec<&str> = text.lines().rev().take(40).collect();
        eprintln!("{}", tail.into_iter().rev().collect::<Vec<_>>().join("\n"));
        if executions.is_none() {
            bail!("fuzz {target} failed before fuzzing (build error?); log in {}", log_path.display());
        }
    }
    Ok(FuzzRun { target: target.to_owned(), executions: executions.unwrap_or(0), crashed })
}

/// Total executions from libFuzzer's output: the final stats line
/// (`stat::number_of_executed_units: N`), else the last `#N` status line.
fn executions_in(log: &str) -> Option<u64> {
    let stat = log
        .lines()
        .filter_map(|l| l.strip_prefix("stat::number_of_executed_units:"))
        .filter_map(|v| v.trim().parse().ok())
        .next_back();
    stat.or_else(|| {
        log.lines().filter_map(|l| l.strip_prefix('#')?.split_whitespace().next()?.parse().ok()).next_back()
    })
}

/// Writes every seed file; returns how many.
pub fn write_seeds(root: &Path) -> Result<usize> {
    let mut n = 0;
    for (target, name, bytes) in seeds(root)? {
        let dir = root.join("fuzz/corpus").join(target);
        fs::create_dir_all(&dir)?;
        fs::write(dir.join(name), bytes)?;
        n += 1;
    }
    Ok(n)
}

type Seed = (&'static str, String, Vec<u8>);

/// PROXY headers as HAProxy sends them: v1 TCP4/TCP6/UNKNOWN, v2 PROXY
/// over IPv4 and LOCAL, each followed by the start of an SMTP session.
const PROXY_SEEDS: &[(&str, &[u8])] = &[
    ("v1-tcp4", b"PROXY TCP4 192.0.2.1 192.0.2.2 40000 25\r\nEHLO a\r\n"),
    ("v1-tcp6", b"PROXY TCP6 2001:db8::1 2001:db8::2 40000 25\r\n"),
    ("v1-unknown", b"PROXY UNKNOWN\r\n"),
    ("v2-tcp4", b"\r\n\r\n\0\r\nQUIT\n\x21\x11\x00\x0c\xc0\x00\x02\x01\xc0\x00\x02\x02\x9c\x40\x00\x19EHLO a\r\n"),
    ("v2-local", b"\r\n\r\n\0\r\nQUIT\n\x20\x00\x00\x00"),
];

fn seeds(root: &Path) -> Result<Vec<Seed>> {
    let mut out = Vec::new();
    transcript_seeds(root, &mut out)?;
    for (name, body) in DATA_SEEDS {
        out.push(("smtp_data", format!("seed-{name}"), body.to_vec()));
        out.push(("smtp_bdat", format!("seed-{name}"), body.to_vec()));
    }
    for (name, header) in PROXY_SEEDS {
        out.push(("proxy_header", format!("seed-{name}"), header.to_vec()));
    }
    out.push(("ipc_decoder", "seed-conversation".into(), ipc_conversation()));
    for (name, qf) in queue_files() {
        out.push(("queue_file", format!("seed-{name}"), qf.encode()));
    }
    for (i, a) in ADDRESS_SEEDS.iter().enumerate() {
        out.push(("address", format!("seed-{i}"), a.as_bytes().to_vec()));
    }
    for entry in fs::read_dir(root.join("etc")).context("read etc/")? {
        let path = entry?.path();
        if path.extension().is_some_and(|e| e == "toml") {
            let name = path.file_name().expect("file").to_string_lossy().into_owned();
            out.push(("config", format!("seed-{name}"), fs::read(&path)?));
        }
    }
    Ok(out)
}

/// Client input from each golden transcript: all of it for the session
/// target, the command lines alone for the command target.
fn transcript_seeds(root: &Path, out: &mut Vec<Seed>) -> Result<()> {
    let dir = root.join("crates/smtpd/tests/transcripts");
    let mut files: Vec<PathBuf> = fs::read_dir(&dir)
        .with_context(|| format!("read {}", dir.display()))?
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|e| e == "smtp"))
        .collect();
    files.sort();
    for path in files {
        let stem = path.file_stem().expect("file").to_string_lossy().into_owned();
        let (mut session, mut commands) = (Vec::new(), Vec::new());
        for line in fs::read_to_string(&path)?.lines() {
            if let Some(text) = line.strip_prefix("C: ") {
                let bytes = [unescape(text), b"\r\n".to_vec()].concat();
                commands.extend_from_slice(&bytes);
                session.extend(bytes);
            } else if let Some(raw) = line.strip_prefix("C| ") {
                session.extend(unescape(raw));
            }
        }
        if !session.is_empty() {
            out.push(("smtp_session", format!("transcript-{stem}"), session));
        }
        if !commands.is_empty() {
            out.push(("smtp_command", format!("transcript-{stem}"), commands));
        }
    }
    Ok(())
}

/// The transcript escapes: `\r`, `\n`, `\t`, `\\`, `\xHH`, `\{c*N}`.
fn unescape(s: &str) -> Vec<u8> {
    let mut out = Vec::new();
    let mut rest = s;
    while let Some(i) = rest.find('\\') {
        out.extend_from_slice(&rest.as_bytes()[..i]);
        let esc = &rest[i + 1..];
        // An escape that does not parse is kept as a literal backslash.
        let (bytes, used): (Vec<u8>, usize) = match esc.as_bytes().first() {
            Some(b'r') => (vec![b'\r'], 1),
            Some(b'n') => (vec![b'\n'], 1),
            Some(b't') => (vec![b'\t'], 1),
            Some(b'\\') => (vec![b'\\'], 1),
            Some(b'x') => {
                esc.get(1..3).and_then(|h| u8::from_str_radix(h, 16).ok()).map_or((vec![b'\\'], 0), |b| (vec![b], 3))
            }
            Some(b'{') => esc
                .find('}')
                .and_then(|end| {
                    let (c, n) = esc[1..end].split_once('*')?;
                    Some((c.as_bytes().repeat(n.parse().ok()?), end + 1))
                })
                .unwrap_or((vec![b'\\'], 0)),
            _ => (vec![b'\\'], 0),
        };
        out.extend(bytes);
        rest = &esc[used..];
    }
    out.extend_from_slice(rest.as_bytes());
    out
}

/// DATA content: plain, dot-stuffed, the SMTP smuggling end sequences
/// (CVE-2023-51764 class), and a line at the RFC limit.
const DATA_SEEDS: &[(&str, &[u8])] = &[
    ("plain", b"Subject: x\r\n\r\nhello\r\n.\r\n"),
    ("stuffed", b"..leading\r\n.\r\n..\r\nx.\r\n.\r\n"),
    ("smuggle-lf-dot-lf", b"a\r\n\n.\nMAIL FROM:<x@y>\r\n.\r\n"),
    ("smuggle-cr-dot-cr", b"a\r.\rMAIL FROM:<x@y>\r\n.\r\n"),
    ("smuggle-lf-dot-crlf", b"a\n.\r\nMAIL FROM:<x@y>\r\n.\r\n"),
    ("smuggle-crlf-dot-lf", b"a\r\n.\nMAIL FROM:<x@y>\r\n.\r\n"),
    ("smuggle-crlf-dot-cr", b"a\r\n.\rMAIL FROM:<x@y>\r\n.\r\n"),
    ("smuggle-dot-crcrlf", b"a\r\n.\r\r\nb\r\n.\r\n"),
    ("nul-and-8bit", b"Subject: \xc3\xa4\r\n\r\n\x00\xff\xfe\r\n.\r\n"),
];

const ADDRESS_SEEDS: &[&str] = &[
    "<alice@example.test>",
    "<>",
    "<\"quoted local\"@example.test>",
    "<@relay.test,@other.test:bob@example.test>",
    "<user@[127.0.0.1]>",
    "<user@[IPv6:::1]>",
    "<grüße@bücher.test>",
    "<a.b+tag@sub.example.test>",
];

fn sample_client() -> ClientInfo {
    ClientInfo {
        addr: "127.0.0.1".into(),
        name: "unknown".into(),
        helo: "client.test".into(),
        protocol: "ESMTP".into(),
        tls: String::new(),
    }
}

fn sample_sender(body: BodyType) -> SenderInfo {
    SenderInfo {
        address: "a@example.test".into(),
        body,
        smtputf8: false,
        ret: Some(DsnRet::Headers),
        envid: "E1".into(),
    }
}

fn ipc_conversation() -> Vec<u8> {
    let mut wire = Vec::new();
    let requests = [
        Request::Hello { version: 1 },
        Request::Client(sample_client()),
        Request::Sender(sample_sender(BodyType::EightBitMime)),
        Request::Recipient(RecipientInfo {
            address: "b@example.test".into(),
            notify: Notify { failure: true, delay: true, ..Notify::default() },
            orcpt: "rfc822;b@example.test".into(),
        }),
        Request::Recipient(RecipientInfo {
            address: "c@example.test".into(),
            notify: Notify::default(),
            orcpt: String::new(),
        }),
        Request::Data(b"Subject: x\r\n\r\nhi\r\n".to_vec()),
        Request::Data(b"more \xc3\xa4\r\n".to_vec()),
        Request::End,
    ];
    for r in &requests {
        r.encode(&mut wire);
    }
    wire
}

fn queue_files() -> Vec<(&'static str, QueueFile)> {
    let recipient = |address: &str, state| QueuedRecipient {
        address: address.into(),
        state,
        notify: Notify::default(),
        orcpt: String::new(),
        status: String::new(),
    };
    let small = QueueFile {
        id: "0000000010000100000A".into(),
        arrival: UNIX_EPOCH + Duration::from_secs(1_800_000_000),
        client: sample_client(),
        sender: sample_sender(BodyType::SevenBit),
        recipients: vec![recipient("b@example.test", RecipientState::Pending)],
        content: b"Subject: x\r\n\r\nhello\r\n".to_vec(),
    };
    let mut partial = small.clone();
    partial.recipients = vec![
        recipient("b@example.test", RecipientState::Delivered),
        QueuedRecipient {
            status: "4.4.1 connect to 127.0.0.1:24: Connection refused".into(),
            ..recipient("c@example.test", RecipientState::Pending)
        },
        recipient("d@example.test", RecipientState::Failed),
    ];
    partial.content = (0..3000u32).map(|i| (i % 251) as u8).collect();
    vec![("small", small), ("partial", partial)]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn executions_from_final_stats_or_status_lines() {
        let log = "#2\tINITED cov: 3\n#1024\tpulse  cov: 9\nDone 5000 runs in 1 second(s)\nstat::number_of_executed_units: 5012\n";
        assert_eq!(executions_in(log), Some(5012));
        assert_eq!(executions_in("#2\tINITED\n#4096\tpulse cov: 4\n"), Some(4096));
        assert_eq!(executions_in("error: could not compile"), None);
    }

    #[test]
    fn unescape_matches_the_transcript_syntax() {
        assert_eq!(unescape(r"a\r\n\x00\{x*3}\\"), b"a\r\n\x00xxx\\".to_vec());
    }
}
