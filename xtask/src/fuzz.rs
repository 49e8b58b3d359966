//! `cargo xtask fuzz`: seed corpora and timed runs of every fuzz target.
//!
//! - `cargo xtask fuzz seed` writes the committed seed corpora under
//!   `fuzz/corpus/<target>/`: client input taken from smtpd's golden
//!   transcripts, IPC streams and queue files made with the proto
//!   encoders, the configs under `etc/`, and the SMTP smuggling variants.
//!   The files are deterministic, so re-running changes nothing.
//! - `cargo xtask fuzz [--time N] [--target T] [--asan]` builds the
//!   libFuzzer binaries and runs each target for N seconds, one after the
//!   other. New inputs the fuzzer finds go to `target/fuzz-corpus/<target>/`
//!   (which starts as a copy of the committed seeds and keeps growing over
//!   runs), never into `fuzz/corpus/`; crashes land in
//!   `fuzz/artifacts/<target>/` and fail the task.
//! - `cargo xtask fuzz --ci` is the step `cargo xtask ci` runs: every
//!   target for [`CI_SECONDS`] on a fresh copy of the committed corpus
//!   (`target/fuzz-ci/<target>/`), so CI never grows or depends on anything
//!   but the committed seeds.
//!
//! Each run ends with a table (target, executions, executions per second,
//! coverage, result) printed and written to `target/fuzz-summary.md`; a
//! crash prints its reproducer and the command that replays it.
//!
//! The binaries are built here with cargo-fuzz's own compiler flags
//! (cargo-fuzz 0.13.2, `cargo fuzz build --sanitizer none
//! --debug-assertions`), so neither cargo-fuzz nor a nightly compiler is
//! needed: without a sanitizer every flag is stable. Debug assertions and
//! overflow checks stay on. AddressSanitizer is off by default: every
//! crate forbids `unsafe`, so it would find little, and it costs build
//! time; `--asan` turns it on (`-Zsanitizer=address`, unlocked on the
//! stable compiler by `RUSTC_BOOTSTRAP=1`). `cargo fuzz run <target>` in
//! `fuzz/` keeps working by hand for whoever has cargo-fuzz.

use anyhow::{Context, Result, bail};
use mortal_proto::envelope::{BodyType, ClientInfo, DsnRet, Notify, RecipientInfo, SenderInfo};
use mortal_proto::ipc::{Edit, Request};
use mortal_proto::queue_file::{DeliveryStatus, QueueFile, QueuedRecipient, RecipientState};
use mortal_proto::smtp_status::{DsnAction, EnhancedStatus, StatusClass};
use std::fmt::Write as _;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant, UNIX_EPOCH};

/// Every target in `fuzz/Cargo.toml`.
pub const TARGETS: &[&str] = &[
    "smtp_command",
    "smtp_data",
    "smtp_bdat",
    "smtp_session",
    "proxy_header",
    "ipc_decoder",
    "delivery",
    "policy_reply",
    "queue_file",
    "address",
    "config",
    "milter_reply",
    "table",
    "socketmap_reply",
    "dovecot_auth_reply",
];

/// Seconds per target when `--time` is not given.
const DEFAULT_SECONDS: u64 = 30;

/// Seconds per target in `cargo xtask ci`: enough for libFuzzer to load
/// the seeds and run each target some hundred thousand times, short
/// enough that all of them add under two minutes to CI.
pub const CI_SECONDS: u64 = 10;

/// Longest input the fuzzer generates: enough for several SMTP commands,
/// a message with long lines, or a small queue file.
const MAX_INPUT_LEN: usize = 8192;

/// libFuzzer's per-input time limit (`-timeout`), in seconds: every
/// target is a parser over at most [`MAX_INPUT_LEN`] octets, which takes
/// microseconds; one input this slow is a hang, reported like a crash.
const INPUT_TIMEOUT_SECONDS: u64 = 10;

/// libFuzzer's memory cap per target process (`-rss_limit_mb`).
const RSS_LIMIT_MB: u32 = 2048;

/// Longest the build of every target may take (a cold build compiles the
/// whole dependency tree with coverage instrumentation).
const BUILD_BOUND: Duration = Duration::from_secs(1800);

/// Time allowed on top of `--time` for one target's run: loading the
/// corpus, and the exit (libFuzzer's own `-timeout` catches a hang first).
const RUN_SLACK: Duration = Duration::from_secs(60);

/// Where the libFuzzer binaries are built, inside the workspace's target/
/// (so `cargo clean` removes them) and apart from the ordinary builds,
/// whose compiler flags differ.
const BUILD_DIR: &str = "target/fuzz";

/// The coverage instrumentation cargo-fuzz 0.13.2 passes (its
/// `project.rs`), for a release build with `--sanitizer none
/// --debug-assertions`.
const COVERAGE_FLAGS: &[&str] = &[
    "-Cpasses=sancov-module",
    "-Cllvm-args=-sanitizer-coverage-level=4",
    "-Cllvm-args=-sanitizer-coverage-inline-8bit-counters",
    "-Cllvm-args=-sanitizer-coverage-pc-table",
    "-Cllvm-args=-sanitizer-coverage-trace-compares",
    "--cfg",
    "fuzzing",
    "-Cllvm-args=-simplifycfg-branch-fold-threshold=0",
    "-Cllvm-args=-sanitizer-coverage-stack-depth",
    // Also turns on overflow checks: the fuzzer finds arithmetic bugs.
    "-Cdebug-assertions",
];

/// Codegen units of the fuzz build. cargo-fuzz forces 1 (best inlining
/// across the instrumented code); 16 let the last, largest crates (smtpd,
/// the targets) compile on both cores. Measured here on a cold build:
/// 10% more CPU time, less wall time, executions per second the same
/// within noise. (Dependencies at opt-level 1 cost more CPU, not less.)
const CODEGEN_UNITS: u32 = 16;

/// How a run is set up.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Plan {
    pub seconds: u64,
    /// Only these targets (all when empty).
    pub only: Vec<String>,
    /// Build with AddressSanitizer.
    pub asan: bool,
    /// CI: a fresh copy of the committed corpus per target, seeds not
    /// rewritten.
    pub ci: bool,
}

/// Result of one target's run.
#[derive(Debug, Clone, PartialEq)]
pub struct FuzzRun {
    pub target: String,
    pub executions: u64,
    pub execs_per_sec: u64,
    /// Coverage counters (`cov:`) and corpus size at the end.
    pub coverage: Option<u64>,
    pub corpus: Option<u64>,
    pub seconds: f64,
    /// The input that crashed (or hung, or ran out of memory) the target,
    /// when it failed.
    pub failure: Option<Failure>,
}

/// A target that did not end cleanly.
#[derive(Debug, Clone, PartialEq)]
pub struct Failure {
    /// libFuzzer's words for it (`deadly signal`, `timeout`, ...).
    pub what: String,
    pub reproducer: Option<PathBuf>,
    pub log: PathBuf,
}

pub fn main(root: &Path, args: &[String]) -> Result<()> {
    if args.first().map(String::as_str) == Some("seed") {
        let n = write_seeds(root)?;
        eprintln!("==> wrote {n} seed files under fuzz/corpus/");
        return Ok(());
    }
    let mut plan = Plan { seconds: DEFAULT_SECONDS, only: Vec::new(), asan: false, ci: false };
    let mut seconds = None;
    let mut it = args.iter();
    while let Some(a) = it.next() {
        match a.as_str() {
            "--time" => seconds = Some(it.next().context("--time needs seconds")?.parse().context("--time N")?),
            "--target" => plan.only.push(it.next().context("--target needs a name")?.clone()),
            "--asan" => plan.asan = true,
            "--ci" => plan.ci = true,
            other => bail!("unknown fuzz option {other:?} (use --time N, --target NAME, --asan, --ci, or `seed`)"),
        }
    }
    plan.seconds = seconds.unwrap_or(if plan.ci { CI_SECONDS } else { DEFAULT_SECONDS });
    if plan.seconds == 0 {
        // libFuzzer reads -max_total_time=0 as "no limit".
        bail!("--time must be at least 1 second");
    }
    if let Some(unknown) = plan.only.iter().find(|t| !TARGETS.contains(&t.as_str())) {
        bail!("no fuzz target {unknown:?} (targets: {})", TARGETS.join(", "));
    }
    run(root, &plan)
}

/// The fuzz step of `cargo xtask ci`.
pub fn ci(root: &Path) -> Result<()> {
    run(root, &Plan { seconds: CI_SECONDS, only: Vec::new(), asan: false, ci: true })
}

/// Builds, runs every planned target, writes the summary, and fails if
/// any target failed.
fn run(root: &Path, plan: &Plan) -> Result<()> {
    if !plan.ci {
        write_seeds(root)?;
    }
    let started = Instant::now();
    let bins = build(root, plan.asan)?;
    let build_time = started.elapsed();
    let mut runs = Vec::new();
    for target in TARGETS.iter().filter(|t| plan.only.is_empty() || plan.only.iter().any(|o| o == *t)) {
        let run = run_target(root, &bins, target, plan)?;
        eprintln!(
            "==> fuzz {target}: {} executions in {:.0} s ({}/s){}",
            run.executions,
            run.seconds,
            run.execs_per_sec,
            run.failure.as_ref().map_or(String::new(), |f| format!(", FAILED: {}", f.what))
        );
        runs.push(run);
    }
    let summary = summary(&runs, plan, build_time, started.elapsed());
    println!("{summary}");
    let out = root.join("target/fuzz-summary.md");
    fs::write(&out, &summary).with_context(|| format!("write {}", out.display()))?;
    let failed: Vec<&FuzzRun> = runs.iter().filter(|r| r.failure.is_some()).collect();
    if failed.is_empty() {
        return Ok(());
    }
    for r in &failed {
        let f = r.failure.as_ref().expect("failed");
        eprintln!("{}", reproduce(root, &bins, &r.target, f));
    }
    bail!("fuzz targets failed: {}", failed.iter().map(|r| r.target.as_str()).collect::<Vec<_>>().join(", "))
}

/// Builds every target; returns the directory holding the binaries.
fn build(root: &Path, asan: bool) -> Result<PathBuf> {
    let triple = host_triple()?;
    let mut flags: Vec<String> = COVERAGE_FLAGS.iter().map(|f| (*f).to_owned()).collect();
    flags.push(format!("-Ccodegen-units={CODEGEN_UNITS}"));
    if asan {
        flags.push("-Zsanitizer=address".into());
    }
    // As cargo-fuzz does, the caller's RUSTFLAGS come last and win.
    if let Ok(extra) = std::env::var("RUSTFLAGS") {
        flags.push(extra);
    }
    // ASan objects must not be mixed with plain ones: own directory.
    let target_dir = root.join(BUILD_DIR).join(if asan { "asan" } else { "plain" });
    let mut cmd = super::cargo();
    cmd.args(["build", "--release", "--bins", "--manifest-path"])
        .arg(root.join("fuzz/Cargo.toml"))
        // With an explicit --target the flags reach neither build scripts
        // nor proc macros, which must not be instrumented.
        .args(["--target", &triple, "--target-dir"])
        .arg(&target_dir)
        .args(["--config", "profile.release.debug=\"line-tables-only\""])
        .env("RUSTFLAGS", flags.join(" "));
    if asan {
        cmd.env("RUSTC_BOOTSTRAP", "1");
    }
    eprintln!("==> build fuzz targets ({}, {triple})", if asan { "AddressSanitizer" } else { "no sanitizer" });
    let started = Instant::now();
    let mut child = cmd.stdin(Stdio::null()).spawn().context("cannot run cargo build for fuzz/")?;
    let status = wait_bounded(&mut child, BUILD_BOUND)?.context("fuzz build ran past its time bound")?;
    if !status.success() {
        bail!("fuzz build failed ({status})");
    }
    eprintln!("==> fuzz targets built in {:.0} s", started.elapsed().as_secs_f64());
    Ok(target_dir.join(triple).join("release"))
}

fn host_triple() -> Result<String> {
    let out = Command::new(std::env::var("RUSTC").unwrap_or_else(|_| "rustc".into()))
        .arg("-vV")
        .output()
        .context("rustc -vV")?;
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .find_map(|l| l.strip_prefix("host: "))
        .map(str::to_owned)
        .context("rustc -vV names no host")
}

/// Waits for `child` at most `bound`; kills it past that (`None`).
fn wait_bounded(child: &mut Child, bound: Duration) -> Result<Option<ExitStatus>> {
    let deadline = Instant::now() + bound;
    loop {
        if let Some(status) = child.try_wait()? {
            return Ok(Some(status));
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            return Ok(None);
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The corpus directory a target runs on: in CI a fresh copy of the
/// committed seeds, otherwise the growing one, topped up with the seeds.
fn work_corpus(root: &Path, target: &str, ci: bool) -> Result<PathBuf> {
    let work = root.join(if ci { "target/fuzz-ci" } else { "target/fuzz-corpus" }).join(target);
    if ci && work.exists() {
        fs::remove_dir_all(&work).with_context(|| format!("remove {}", work.display()))?;
    }
    fs::create_dir_all(&work)?;
    let seeds = root.join("fuzz/corpus").join(target);
    for entry in fs::read_dir(&seeds).with_context(|| format!("read {}", seeds.display()))? {
        let path = entry?.path();
        if path.is_file() {
            fs::copy(&path, work.join(path.file_name().expect("file")))?;
        }
    }
    Ok(work)
}

fn run_target(root: &Path, bins: &Path, target: &str, plan: &Plan) -> Result<FuzzRun> {
    let work = work_corpus(root, target, plan.ci)?;
    let artifacts = root.join("fuzz/artifacts").join(target);
    fs::create_dir_all(&artifacts)?;
    let log_path = work.with_extension("log");
    let log = fs::File::create(&log_path)?;
    eprintln!("==> fuzz {target} ({} s)", plan.seconds);
    let started = Instant::now();
    let mut cmd = Command::new(bins.join(target));
    cmd.arg(&work)
        .arg(format!("-max_total_time={}", plan.seconds))
        .arg(format!("-max_len={MAX_INPUT_LEN}"))
        .arg(format!("-timeout={INPUT_TIMEOUT_SECONDS}"))
        .arg(format!("-rss_limit_mb={RSS_LIMIT_MB}"))
        .arg(format!("-artifact_prefix={}/", artifacts.display()))
        .arg("-print_final_stats=1")
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log);
    if plan.asan {
        // cargo-fuzz's default: Rust's std trips the ODR check.
        cmd.env("ASAN_OPTIONS", "detect_odr_violation=0");
    }
    let mut child = cmd.spawn().with_context(|| format!("cannot run {}", bins.join(target).display()))?;
    let status = wait_bounded(&mut child, Duration::from_secs(plan.seconds) + RUN_SLACK)?;
    let seconds = started.elapsed().as_secs_f64();
    let text = String::from_utf8_lossy(&fs::read(&log_path)?).into_owned();
    let stats = Stats::parse(&text);
    let failure = match status {
        Some(s) if s.success() => None,
        Some(s) => Some(Failure {
            what: failure_kind(&text).unwrap_or_else(|| format!("exit {s}")),
            reproducer: reproducer_in(&text),
            log: log_path.clone(),
        }),
        None => Some(Failure { what: "ran past its time bound".into(), reproducer: None, log: log_path.clone() }),
    };
    if let Some(f) = &failure {
        let tail: Vec<&str> = text.lines().rev().take(40).collect();
        eprintln!("{}", tail.into_iter().rev().collect::<Vec<_>>().join("\n"));
        if stats.executions.is_none() && f.reproducer.is_none() {
            bail!("fuzz {target} failed before fuzzing ({}); log in {}", f.what, log_path.display());
        }
    }
    let executions = stats.executions.unwrap_or(0);
    Ok(FuzzRun {
        target: target.to_owned(),
        executions,
        execs_per_sec: stats.execs_per_sec.unwrap_or_else(|| (executions as f64 / seconds.max(1e-3)) as u64),
        coverage: stats.coverage,
        corpus: stats.corpus,
        seconds,
        failure,
    })
}

/// What libFuzzer's output says about a run.
#[derive(Debug, Default, PartialEq, Eq)]
struct Stats {
    executions: Option<u64>,
    execs_per_sec: Option<u64>,
    coverage: Option<u64>,
    corpus: Option<u64>,
}

impl Stats {
    /// Executions from the final stats (`stat::number_of_executed_units`),
    /// else the last `#N` status line (`#N DONE` at a clean end); coverage
    /// and corpus size from the last status line that has them.
    fn parse(log: &str) -> Stats {
        let stat = |name: &str| {
            log.lines().filter_map(|l| l.strip_prefix(name)).filter_map(|v| v.trim().parse().ok()).next_back()
        };
        let status: Vec<&str> = log.lines().filter(|l| l.starts_with('#')).collect();
        let field = |name: &str| {
            status.iter().rev().find_map(|l| {
                let mut words = l.split_whitespace();
                words.find(|w| *w == name)?;
                // `corp: 12/345b`: the count before the slash.
                words.next()?.split('/').next()?.parse().ok()
            })
        };
        Stats {
            executions: stat("stat::number_of_executed_units:")
                .or_else(|| status.iter().filter_map(|l| l[1..].split_whitespace().next()?.parse().ok()).next_back()),
            execs_per_sec: stat("stat::average_exec_per_sec:"),
            coverage: field("cov:"),
            corpus: field("corp:"),
        }
    }
}

/// libFuzzer's name for a failure: `deadly signal`, `timeout after 10
/// seconds`, `out-of-memory (used: ...)`, from its `==N== ERROR:` line.
fn failure_kind(log: &str) -> Option<String> {
    log.lines().find_map(|l| l.split_once("ERROR: libFuzzer: ").map(|(_, what)| what.trim().to_owned())).or_else(|| {
        log.lines().find_map(|l| l.split_once("ERROR: AddressSanitizer: ").map(|(_, w)| format!("ASan: {}", w.trim())))
    })
}

/// The input libFuzzer saved (`Test unit written to <path>`).
fn reproducer_in(log: &str) -> Option<PathBuf> {
    log.lines().find_map(|l| l.split_once("Test unit written to ").map(|(_, p)| PathBuf::from(p.trim())))
}

/// How to replay a failure, for the CI log.
fn reproduce(root: &Path, bins: &Path, target: &str, f: &Failure) -> String {
    let rel = |p: &Path| p.strip_prefix(root).unwrap_or(p).display().to_string();
    let mut s = format!("==> fuzz {target} FAILED: {}\n    log: {}\n", f.what, rel(&f.log));
    match &f.reproducer {
        Some(input) => {
            let _ = writeln!(s, "    reproducer: {}", rel(input));
            let _ = writeln!(s, "    replay: {} {}", rel(&bins.join(target)), rel(input));
            let _ = writeln!(s, "    or:     cd fuzz && cargo fuzz run {target} ../{}", rel(input));
            let _ = writeln!(
                s,
                "    once fixed, keep it as a regression test: cp {} fuzz/corpus/{target}/ (tests/fuzz_corpus.rs replays it)",
                rel(input)
            );
        }
        None => {
            let _ = writeln!(s, "    no input saved; see the log");
        }
    }
    s
}

/// The table printed and written to `target/fuzz-summary.md`.
fn summary(runs: &[FuzzRun], plan: &Plan, build: Duration, total: Duration) -> String {
    let opt = |v: Option<u64>| v.map_or("-".to_owned(), |n| n.to_string());
    let mut s = format!(
        "# Fuzz run\n\n{} s per target, {}, {}.\n\n| target | executions | exec/s | coverage | corpus | result |\n|---|---:|---:|---:|---:|---|\n",
        plan.seconds,
        if plan.asan { "AddressSanitizer" } else { "no sanitizer, debug assertions" },
        if plan.ci { "fresh copy of the committed corpus (CI)" } else { "corpus in target/fuzz-corpus" },
    );
    for r in runs {
        let result = match &r.failure {
            None => "ok".to_owned(),
            Some(f) => format!(
                "FAILED: {}{}",
                f.what,
                f.reproducer.as_ref().map_or(String::new(), |p| format!(" ({})", p.display()))
            ),
        };
        let _ = writeln!(
            s,
            "| {} | {} | {} | {} | {} | {result} |",
            r.target,
            r.executions,
            r.execs_per_sec,
            opt(r.coverage),
            opt(r.corpus)
        );
    }
    let executions: u64 = runs.iter().map(|r| r.executions).sum();
    let fuzzing: f64 = runs.iter().map(|r| r.seconds).sum();
    let failed = runs.iter().filter(|r| r.failure.is_some()).count();
    let _ = writeln!(
        s,
        "| **total** | **{executions}** | {} | | | {} |\n\nBuild {:.0} s, fuzzing {fuzzing:.0} s, whole step {:.0} s.",
        (executions as f64 / fuzzing.max(1e-3)) as u64,
        if failed == 0 { "ok".to_owned() } else { format!("**{failed} failed**") },
        build.as_secs_f64(),
        total.as_secs_f64()
    );
    s
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

/// Policy server replies: postgrey's greylisting and pass, the access(5)
/// actions, and two replies on one connection.
const POLICY_SEEDS: &[(&str, &[u8])] = &[
    (
        "postgrey-defer",
        b"action=DEFER_IF_PERMIT Greylisted, see http://postgrey.schweikert.ch/help/example.test.html\n\n",
    ),
    (
        "postgrey-prepend",
        b"action=PREPEND X-Greylist: delayed 61 seconds by postgrey-1.37 at mx; Thu, 03 Dec 2026 13:00:00 UTC\n\n",
    ),
    ("dunno", b"action=DUNNO\n\n"),
    ("reply", b"action=450 4.7.1 Try again later\nextra=1\n\n"),
    ("reject-crlf", b"action=REJECT go away\r\n\r\n"),
    ("two", b"action=OK\n\naction=554 5.7.1 no\n\n"),
    ("filter", b"action=FILTER smtp:[127.0.0.1]:10025\n\n"),
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
    let (request, report) = pipe_conversation();
    out.push(("delivery", "seed-pipe-request".into(), request));
    out.push(("delivery", "seed-pipe-report".into(), report));
    let (requests, report) = delivery_conversation();
    out.push(("delivery", "seed-requests".into(), requests));
    out.push(("delivery", "seed-report".into(), report));
    for (name, reply) in POLICY_SEEDS {
        out.push(("policy_reply", format!("seed-{name}"), reply.to_vec()));
    }
    for (name, qf) in queue_files() {
        out.push(("queue_file", format!("seed-{name}"), qf.encode()));
    }
    for (name, bytes) in milter_replies() {
        out.push(("milter_reply", format!("seed-{name}"), bytes));
    }
    for (name, reply) in SOCKETMAP_SEEDS {
        out.push(("socketmap_reply", format!("seed-{name}"), reply.to_vec()));
    }
    for (name, bytes) in DOVECOT_AUTH_SEEDS {
        out.push(("dovecot_auth_reply", format!("seed-{name}"), bytes.to_vec()));
    }
    for (name, kind, text) in TABLE_SEEDS {
        let mut bytes = vec![*kind];
        bytes.extend_from_slice(text.as_bytes());
        out.push(("table", format!("seed-{name}"), bytes));
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
        addr: std::net::Ipv4Addr::LOCALHOST.into(),
        name: "unknown".into(),
        helo: "client.test".into(),
        protocol: "ESMTP".into(),
        tls: String::new(),
        auth: None,
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

/// A request to the pipe agent (route `pipe`, a BINARYMIME body) with
/// two recipients, and the report that answers it as the pipe agent
/// does, each behind the mode octet `delivery_stream` reads first.
fn pipe_conversation() -> (Vec<u8>, Vec<u8>) {
    use mortal_proto::config::Route;
    use mortal_proto::delivery::{self, Envelope, RcptResult, Recipient, Report, Request, Status};
    let request = Request {
        envelope: Envelope {
            queue_id: "0000000010000100000A".parse().expect("queue id"),
            route: Route::Pipe,
            sender: "a@example.test".into(),
            body: BodyType::BinaryMime,
            smtputf8: false,
            ret: None,
            envid: String::new(),
        },
        recipients: vec![
            Recipient { address: "b@pipe.test".into(), notify: Notify::default(), orcpt: "rfc822;B@pipe.test".into() },
            Recipient { address: "c@pipe.test".into(), notify: Notify::default(), orcpt: String::new() },
        ],
        content: b"Subject: x\r\n\r\n\x00hi\r\n".to_vec(),
    };
    let mut requests = vec![0];
    requests.extend(delivery::hello());
    requests.extend(request.encode());
    // Odd: a report; 2 << 1 | 1: two results expected.
    let mut report = vec![5];
    Report {
        relay: "pipe".into(),
        results: vec![
            RcptResult::delivered("delivered via pipe service"),
            RcptResult {
                diagnostic: Some("x-unix; no such user".into()),
                ..RcptResult::new(
                    Status::Bounced,
                    EnhancedStatus::new(StatusClass::Permanent, 1, 1),
                    "Command died with status 67: \"/usr/bin/deliver\". Command output: no such user",
                )
            },
        ],
    }
    .encode(false, &mut report);
    (requests, report)
}

/// Two delivery requests on one connection (LMTP, then SMTP relay with
/// DSN parameters), and a report of two results, each behind the mode
/// octet `delivery_stream` reads first.
fn delivery_conversation() -> (Vec<u8>, Vec<u8>) {
    use mortal_proto::config::{NextHop, Route};
    use mortal_proto::delivery::{self, Envelope, RcptResult, Recipient, Report, Request, Status};
    let envelope = |route: Route| Envelope {
        queue_id: "0000000010000100000A".parse().expect("queue id"),
        route,
        sender: "a@example.test".into(),
        body: BodyType::EightBitMime,
        smtputf8: false,
        ret: Some(DsnRet::Headers),
        envid: "E1".into(),
    };
    let recipients = vec![
        Recipient {
            address: "b@example.test".into(),
            notify: Notify { success: true, ..Notify::default() },
            orcpt: "rfc822;B@example.test".into(),
        },
        Recipient { address: "c@example.test".into(), notify: Notify::default(), orcpt: String::new() },
    ];
    let lmtp = Request {
        envelope: envelope(Route::Lmtp(NextHop::Unix("/run/dovecot/lmtp".into()))),
        recipients: recipients.clone(),
        content: b"Subject: x\r\n\r\nhi\r\n".to_vec(),
    };
    let smtp = Request {
        envelope: envelope(Route::Smtp("127.0.0.1:25".parse().expect("address"))),
        recipients,
        content: b"Subject: y\r\n\r\n.dot\r\n".to_vec(),
    };
    let mut requests = vec![0];
    requests.extend(delivery::hello());
    requests.extend(lmtp.encode());
    requests.extend(smtp.encode());
    // Odd: a report; 2 << 1 | 1: two results expected.
    let mut report = vec![5];
    Report {
        relay: "127.0.0.1[127.0.0.1]:25".into(),
        results: vec![
            RcptResult {
                remote_mta: Some("dns; 127.0.0.1".into()),
                success_action: Some(DsnAction::Relayed),
                ..RcptResult::new(Status::Sent, EnhancedStatus::undefined(StatusClass::Success), "250 2.0.0 Ok: queued")
            },
            RcptResult {
                diagnostic: Some("smtp; 550 5.1.1 no such user".into()),
                remote_mta: Some("dns; 127.0.0.1".into()),
                ..RcptResult::new(
                    Status::Bounced,
                    EnhancedStatus::new(StatusClass::Permanent, 1, 1),
                    "host 127.0.0.1[127.0.0.1]:25 said: 550 5.1.1 no such user (in reply to RCPT TO command)",
                )
            },
        ],
    }
    .encode(true, &mut report);
    (requests, report)
}

/// A filter's answers, one seed per reply type: the OPTNEG answer with
/// macro lists, every decision, a custom multi-line reply, quarantine,
/// and every end-of-message modification; `conversation` strings a
/// negotiation, modifications and the final reply together as a filter
/// sends them at the end of a message.
fn milter_replies() -> Vec<(&'static str, Vec<u8>)> {
    use mortal_proto::milter::{
        Actions, CustomReply, EsmtpArgs, HeaderName, HeaderValue, MacroName, MilterAddress, MilterOptions,
        Modification, ProtocolSteps, Reply, Stage,
    };
    use mortal_proto::smtp_status::ReplyCode;
    let name = |n: &str| HeaderName::new(n).expect("header name");
    let value = |v: &str| HeaderValue::new(v.as_bytes()).expect("header value");
    let addr = |a: &str| MilterAddress::new(a).expect("address");
    let args = |a: &str| EsmtpArgs::new(a).expect("ESMTP args");
    let options = MilterOptions {
        version: 6,
        actions: (Actions::ADDHDRS | Actions::CHGHDRS | Actions::SETSYMLIST).bits(),
        steps: (ProtocolSteps::NOUNKNOWN | ProtocolSteps::NR_HDR | ProtocolSteps::HDR_LEADSPC).bits(),
        macro_lists: vec![
            (Stage::Mail, vec![MacroName::new("{auth_authen}").expect("macro"), MacroName::new("i").expect("macro")]),
            (Stage::EndOfMessage, vec![MacroName::new("{msg_id}").expect("macro")]),
        ],
    };
    let multi = CustomReply::new(
        ReplyCode::of(451),
        Some(EnhancedStatus::new(StatusClass::Persistent, 7, 1)),
        vec!["Greylisted, see".into(), "https://example.test/ 100% sure".into()],
    )
    .expect("custom reply");
    let single = CustomReply::new(
        ReplyCode::of(554),
        Some(EnhancedStatus::new(StatusClass::Permanent, 7, 1)),
        vec!["Gtube pattern".into()],
    )
    .expect("custom reply");
    let replies = vec![
        ("continue", Reply::Continue),
        ("accept", Reply::Accept),
        ("reject", Reply::Reject),
        ("tempfail", Reply::Tempfail),
        ("discard", Reply::Discard),
        ("shutdown", Reply::Shutdown),
        ("progress", Reply::Progress),
        ("skip", Reply::Skip),
        ("replycode", Reply::ReplyCode(single)),
        ("replycode-multiline", Reply::ReplyCode(multi)),
        ("quarantine", Reply::Quarantine("suspicious attachment".into())),
        (
            "addheader",
            Reply::Modify(Modification::AddHeader { name: name("X-Spam-Status"), value: value("No, score=-0.1") }),
        ),
        (
            "insheader",
            Reply::Modify(Modification::InsertHeader {
                index: 0,
                name: name("DKIM-Signature"),
                value: value("v=1; a=rsa-sha256; d=example.test;\r\n\tb=AbC"),
            }),
        ),
        (
            "chgheader",
            Reply::Modify(Modification::ChangeHeader { index: 1, name: name("Subject"), value: value("[SPAM] hi") }),
        ),
        ("delheader", Reply::Modify(Modification::ChangeHeader { index: 2, name: name("Received"), value: value("") })),
        ("replbody", Reply::Modify(Modification::ReplaceBody(b"replaced\r\nbody\r\n".to_vec()))),
        ("addrcpt", Reply::Modify(Modification::AddRecipient(addr("<copy@example.test>")))),
        (
            "addrcpt-par",
            Reply::Modify(Modification::AddRecipientWithArgs {
                address: addr("<audit@example.test>"),
                args: args("NOTIFY=NEVER ORCPT=rfc822;audit@example.test"),
            }),
        ),
        ("delrcpt", Reply::Modify(Modification::DeleteRecipient(addr("<b@example.test>")))),
        (
            "chgfrom",
            Reply::Modify(Modification::ChangeSender { address: addr("<srs@example.test>"), args: args("SIZE=1000") }),
        ),
    ];
    let mut out = Vec::new();
    let mut optneg = Vec::new();
    options.encode(&mut optneg);
    out.push(("optneg", optneg.clone()));
    let mut conversation = optneg;
    for (name, reply) in replies {
        let mut wire = Vec::new();
        reply.encode(&mut wire);
        if matches!(reply, Reply::Modify(_) | Reply::Progress | Reply::Quarantine(_)) {
            conversation.extend_from_slice(&wire);
        }
        out.push((name, wire));
    }
    Reply::Accept.encode(&mut conversation);
    out.push(("conversation", conversation));
    out
}

/// What Dovecot's auth service sends smtpd. The first octet is the mode
/// `mortal_proto::fuzz::dovecot_auth_reply` reads: 0, a handshake and
/// then replies (Dovecot 2.3.19.1's, recorded); 1, replies only.
const DOVECOT_AUTH_SEEDS: &[(&str, &[u8])] = &[
    (
        "handshake-2.3",
        b"\x00VERSION\t1\t2\nMECH\tPLAIN\tplaintext\nMECH\tLOGIN\tplaintext\nSPID\t20123\nCUID\t1\nCOOKIE\tfc2a5c272549db3f6564695e25d50b54\nDONE\nOK\t1\tuser=alice\n",
    ),
    (
        "handshake-flags",
        b"\x00VERSION\t1\t3\nMECH\tAPOP\tprivate\nMECH\tSCRAM-SHA-256\tmutual-auth\tdictionary\nMECH\tANONYMOUS\tanonymous\nNEWTHING\tx\nSPID\t7\nDONE\nCONT\t1\t\n",
    ),
    ("wrong-socket", b"\x00VERSION\t1\t1\nSPID\t1234\n"),
    ("login", b"\x01CONT\t3\tVXNlcm5hbWU6\nCONT\t3\tUGFzc3dvcmQ6\nOK\t3\tuser=alice\n"),
    (
        "fail",
        b"\x01FAIL\t2\tuser=alice\nFAIL\t7\tcode=invalid_base64\treason=Invalid base64 data in initial response\nFAIL\t8\tuser=bob\tcode=temp_fail\treason=Internal error occurred\nFAIL\t9\ttemp\n",
    ),
    ("escaped", b"\x01FAIL\t9\treason=db\x01tdown\x01n\nOK\t10\tuser=a\x01tb\n"),
];

/// Table files for the `table` target: name, kind octet (0 text, 1 cidr,
/// 2 regexp, as `mortal_proto::fuzz::table` reads it), contents.
/// Answers of a socketmap server, one or several per buffer.
const SOCKETMAP_SEEDS: &[(&str, &[u8])] = &[
    ("found", b"22:OK alice@dovecot.test,"),
    ("notfound", b"9:NOTFOUND ,"),
    ("temp", b"12:TEMP db down,"),
    ("timeout-perm", b"7:TIMEOUT,4:PERM,"),
    ("several", b"5:OK a,9:NOTFOUND ,6:OK b c,"),
    ("tcp-table", b"200 alice%40dovecot.test\n500 not found\r\n400 try later\n"),
];

const TABLE_SEEDS: &[(&str, u8, &str)] = &[
    (
        "virtual",
        0,
        "# aliases\nalice@example.test alice@dovecot.test\nlist@example.test a@example.test,\n  b@example.test\n@example.org catchall@example.test\n",
    ),
    ("access", 0, "spammer@example.net REJECT go away\nexample.com OK\n192.0.2 DUNNO\n"),
    ("clients", 1, "192.0.2.0/24 REJECT listed\n192.0.2.7 OK\n2001:db8::/32 DUNNO\n0.0.0.0/0 DUNNO\n"),
    (
        "header_checks",
        2,
        "/^Subject: .*viagra/ REJECT spam\nif /^From:/\n!/@example\\.test/ WARN foreign\nendif\n/^(.*)\\+(.*)@example\\.test$/i $1@example.test ${2}\n",
    ),
];

fn ipc_conversation() -> Vec<u8> {
    use mortal_proto::milter::{EsmtpArgs, HeaderName, HeaderValue, MilterAddress, Modification};
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
        Request::Edit(Edit::Prepend {
            name: HeaderName::new("X-Greylist").expect("a field name"),
            value: HeaderValue::new(b" delayed 300 seconds").expect("a value"),
        }),
        Request::Edit(Edit::Milter(Modification::InsertHeader {
            index: 0,
            name: HeaderName::new("Authentication-Results").expect("a field name"),
            value: HeaderValue::new(b"mx.example.test;\n\tdkim=pass").expect("a value"),
        })),
        Request::Edit(Edit::Milter(Modification::AddRecipientWithArgs {
            address: MilterAddress::new("<d@example.test>").expect("an address"),
            args: EsmtpArgs::new("NOTIFY=NEVER").expect("arguments"),
        })),
        Request::Edit(Edit::Hold { reason: "milter quarantine".into() }),
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
        status: None,
    };
    let small = QueueFile {
        id: "0000000010000100000A".parse().expect("a queue id"),
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
            status: Some(DeliveryStatus {
                code: EnhancedStatus::new(StatusClass::Persistent, 4, 1),
                text: "connect to 127.0.0.1:24: Connection refused".into(),
            }),
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

    const CLEAN: &str = "INFO: Seed: 1234567
INFO:        9 files found in target/fuzz-ci/smtp_data
#10\tINITED cov: 345 ft: 400 corp: 9/250b exec/s: 0 rss: 31Mb
#1024\tpulse  cov: 350 ft: 420 corp: 12/300b lim: 4 exec/s: 512 rss: 32Mb
#123456\tDONE   cov: 400 ft: 500 corp: 40/1000b lim: 100 exec/s: 12345 rss: 40Mb
Done 123456 runs in 11 second(s)
stat::number_of_executed_units: 123456
stat::average_exec_per_sec:     11223
stat::new_units_added:          31
";

    const CRASH: &str = "#2\tINITED cov: 3 ft: 3 corp: 1/1b exec/s: 0 rss: 30Mb
thread '<unnamed>' panicked at src/lib.rs:40:9:
overlong line passed as text
==4242== ERROR: libFuzzer: deadly signal
    #0 0x55d0 in __sanitizer_print_stack_trace
SUMMARY: libFuzzer: deadly signal
artifact_prefix='/w/fuzz/artifacts/smtp_command/'; Test unit written to /w/fuzz/artifacts/smtp_command/crash-0a1b
Base64: QQ==
stat::number_of_executed_units: 77
";

    #[test]
    fn stats_from_final_stats_or_status_lines() {
        let s = Stats::parse(CLEAN);
        assert_eq!(
            s,
            Stats { executions: Some(123_456), execs_per_sec: Some(11_223), coverage: Some(400), corpus: Some(40) }
        );
        // Killed before the final stats: the last status line counts.
        let s = Stats::parse("#2\tINITED cov: 3 corp: 1/1b\n#4096\tpulse cov: 4 ft: 5 corp: 2/9b\n");
        assert_eq!(s, Stats { executions: Some(4096), execs_per_sec: None, coverage: Some(4), corpus: Some(2) });
        // A stack frame (`    #0 ...`) is not a status line.
        assert_eq!(Stats::parse(CRASH).executions, Some(77));
        assert_eq!(Stats::parse("error: could not compile"), Stats::default());
    }

    #[test]
    fn a_crash_names_its_kind_and_reproducer() {
        assert_eq!(failure_kind(CRASH).as_deref(), Some("deadly signal"));
        assert_eq!(reproducer_in(CRASH), Some(PathBuf::from("/w/fuzz/artifacts/smtp_command/crash-0a1b")));
        assert_eq!(failure_kind(CLEAN), None);
        assert_eq!(reproducer_in(CLEAN), None);
        let f = Failure {
            what: "deadly signal".into(),
            reproducer: reproducer_in(CRASH),
            log: PathBuf::from("/w/target/fuzz-ci/smtp_command.log"),
        };
        let text = reproduce(Path::new("/w"), Path::new("/w/target/fuzz/x/release"), "smtp_command", &f);
        assert!(text.contains("reproducer: fuzz/artifacts/smtp_command/crash-0a1b"), "{text}");
        assert!(text.contains("replay: target/fuzz/x/release/smtp_command fuzz/artifacts/smtp_command/crash-0a1b"));
        assert!(text.contains("log: target/fuzz-ci/smtp_command.log"), "{text}");
    }

    #[test]
    fn summary_totals_every_target() {
        let run = |target: &str, executions, failure| FuzzRun {
            target: target.into(),
            executions,
            execs_per_sec: executions / 10,
            coverage: Some(7),
            corpus: None,
            seconds: 10.0,
            failure,
        };
        let failed = Failure { what: "timeout after 10 seconds".into(), reproducer: None, log: PathBuf::from("l") };
        let runs = [run("address", 1000, None), run("config", 300, Some(failed))];
        let plan = Plan { seconds: 10, only: Vec::new(), asan: false, ci: true };
        let s = summary(&runs, &plan, Duration::from_secs(200), Duration::from_secs(221));
        assert!(s.contains("| address | 1000 | 100 | 7 | - | ok |"), "{s}");
        assert!(s.contains("| config | 300 | 30 | 7 | - | FAILED: timeout after 10 seconds |"), "{s}");
        assert!(s.contains("| **total** | **1300** | 65 | | | **1 failed** |"), "{s}");
        assert!(s.contains("Build 200 s, fuzzing 20 s, whole step 221 s."), "{s}");
    }

    #[test]
    fn unescape_matches_the_transcript_syntax() {
        assert_eq!(unescape(r"a\r\n\x00\{x*3}\\"), b"a\r\n\x00xxx\\".to_vec());
    }
}
