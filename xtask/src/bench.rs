//! `cargo xtask bench`: mortal and Postfix side by side, ratios in one run.
//!
//! Installs Debian's `postfix` package when missing (as root, no system
//! configuration), then runs a private Postfix instance (own config, queue
//! and data directories under `target/bench/postfix`, listening on a free
//! loopback port, never port 25, never the system instance) and mortal's
//! release build with an equivalent config: same accepted domain, same
//! delivery target, default `process_limit` (100), queue on the same disk,
//! both `fsync` before 250. Postfix's `smtp-source` drives the load.
//!
//! Workloads (`burst`, `churn`, `big`, `rcpts`) run against mortal and
//! Postfix alternately (A B A B ...) so drift cancels; each figure is the
//! median of the rounds. Two delivery modes: receive-and-queue (both
//! discard delivered mail: the rate is the rate of 250s) and end-to-end
//! (both deliver to one `smtp-sink` in LMTP mode and the run ends when
//! the queue is empty); and receive-and-queue with one milter that
//! accepts everything (`milter_sink`, the same one for both), on `burst`,
//! with each server's milter cost per message. Also measured for mortal: CPU seconds per 1000
//! messages (and Postfix's, the same way), fsyncs per message (a short
//! run under `strace -f -c`), private memory (USS) of an idle and of a
//! busy smtpd child, the lifetime-policy overhead on `churn`
//! (`max_use = 100` against unlimited, and `max_use = 1`, a fresh process
//! per session, against unlimited), and the fork+exec-to-READY latency
//! of the children spawned in the `max_use = 100` churn run, as the master
//! measured it (`mortal_child_ready_*` in its metrics file). And, for
//! both, against the disk: its durable-create limit measured in the same
//! run (`durable_create_rate`) with the burst rows' share of it, and the
//! end-of-DATA-to-250 latency under burst from a probe beside the load
//! (`measure_latency`, p50 and p99).
//!
//! Results: `target/bench/results.md` and `results.json`. `--quick` runs
//! one round of each at a fifth of the size; `--only burst,churn` runs only
//! those workloads and `--mode queue|e2e|milter` only that mode (a partial run
//! leaves out the lifetime, READY and fsync figures). `--baseline REV` also builds
//! git revision REV (release, in a worktree under `target/bench/`) and runs
//! it as a third server in the same rounds (A C B C A B ..., four rounds,
//! the two builds taking turns to go first), so a change
//! is measured against what it replaced on the same machine at the same
//! time. Every run is bounded in
//! messages and time; only loopback is used.
//!
//! Exim and OpenSMTPD run beside them as peers (`peers.rs`), in the same
//! rounds of the receive-and-queue and end-to-end modes (mortal, Postfix,
//! Exim, OpenSMTPD, in turn): each unpacked from its Debian package (the
//! MTA packages conflict with Postfix, so none is installed), with a
//! config of our own, in namespaces of its own. The table gets a rate,
//! mortal's ratio to it and a CPU column per peer. A peer that cannot be
//! set up or fails a run is left out with a note saying why; the others
//! are still reported. `--no-peers` leaves both out.

use crate::chaos::{self, Mortal};
use crate::peers::{self, Peer};
use anyhow::{Context, Result, bail};
use mortal_proto::spool::QueueDir;
use serde_json::json;
use std::fmt::Write as _;
use std::fs;
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// Rounds per workload and server (medians of these).
const ROUNDS: usize = 3;

/// Rounds when a baseline runs too: even, so that the build and the
/// baseline each go first in half of them.
const ROUNDS_WITH_BASELINE: usize = 4;

/// Longest one smtp-source run may take.
const RUN_BOUND: Duration = Duration::from_secs(180);

/// Longest wait for a queue to empty after a run.
const DRAIN_BOUND: Duration = Duration::from_secs(180);

/// Messages in the strace'd fsync run.
const FSYNC_MESSAGES: u32 = 200;

/// The lifetime policy of the "limited" side of the overhead measurement.
const LIMITED_LIFE: &str = "max_lifetime = \"5s\"\nlifetime_jitter = 0.5";
/// Single sessions, one at a time, for the READY latency on a quiet
/// machine (each starts one smtpd and one cleanup).
const QUIET_SPAWNS: usize = 40;
/// What the READY figures of those children are called in the report.
const QUIET_READY: &str = "one session at a time on a quiet machine";
/// Pause after each of them, so that the spawns it caused are over.
const QUIET_GAP: Duration = Duration::from_millis(150);

/// The accepted domain of both servers.
const DOMAIN: &str = chaos::DOMAIN;

/// Clock ticks per second of /proc's CPU times (USER_HZ on Linux).
const TICKS_PER_SECOND: f64 = 100.0;

/// Where each mortal instance's master writes its metrics, relative to
/// the instance directory (the config says `../`, relative to `etc/`).
const METRICS_FILE: &str = "metrics.prom";

/// Longest wait for the master to rewrite its metrics file after a run:
/// it does every 5 s (`master_loop::METRICS_INTERVAL`), so two periods
/// and a margin.
const METRICS_WAIT: Duration = Duration::from_secs(12);

/// Services whose READY latency is reported, in report order.
const READY_SERVICES: &[&str] = &["smtpd", "cleanup"];

/// READY latency quantiles reported (those the master's summary has).
const READY_QUANTILES: [f64; 3] = [0.5, 0.9, 0.99];

#[derive(Debug, Clone, Copy)]
struct Workload {
    name: &'static str,
    sessions: u32,
    messages: u32,
    size: u32,
    rcpts: u32,
    /// Many messages per connection (`smtp-source -d`).
    reuse: bool,
}

const WORKLOADS: &[Workload] = &[
    Workload { name: "burst", sessions: 20, messages: 2000, size: 1024, rcpts: 1, reuse: true },
    Workload { name: "churn", sessions: 20, messages: 2000, size: 1024, rcpts: 1, reuse: false },
    Workload { name: "big", sessions: 10, messages: 500, size: 102_400, rcpts: 1, reuse: true },
    Workload { name: "rcpts", sessions: 20, messages: 400, size: 1024, rcpts: 50, reuse: true },
];

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    Queue,
    EndToEnd,
    /// Receive and queue with one milter that accepts everything
    /// ([`crate::milter_sink`]), the same for both servers, negotiating
    /// as rspamd does: every event, answered at the end of the message
    /// only.
    Milter,
    /// The same milter answering every event: the protocol's full cost.
    MilterEveryReply,
    /// Receive and queue with a 10,000-entry virtual alias table and a
    /// recipient table (texthash, the same files for both servers).
    Tables,
}

impl Mode {
    fn name(self) -> &'static str {
        match self {
            Mode::Queue => "receive-and-queue",
            Mode::EndToEnd => "end-to-end (LMTP)",
            Mode::Milter => "receive-and-queue, one milter (answers at end of message, as rspamd)",
            Mode::MilterEveryReply => "receive-and-queue, one milter (answers every event)",
            Mode::Tables => "receive-and-queue, 10,000-entry alias and recipient tables",
        }
    }
}

/// The workload of the milter rows.
const MILTER_WORKLOAD: &str = "burst";

/// The workload of the table rows: every recipient is looked up.
const TABLES_WORKLOAD: &str = "rcpts";

/// Entries of the bench's alias and recipient tables (besides those of
/// the addresses smtp-source sends to).
const TABLE_ENTRIES: usize = 10_000;

/// Who runs next in a round ([`main`] alternates the order each round).
#[derive(Debug, Clone, Copy)]
enum Turn {
    Mortal,
    /// The `--baseline` build.
    Baseline,
    Postfix,
    /// The peer at this index.
    Peer(usize),
}

/// One measured run.
#[derive(Debug, Clone, Copy)]
struct Sample {
    secs: f64,
    cpu: f64,
}

pub fn main(root: &Path, args: &[String]) -> Result<()> {
    let mut quick = false;
    let mut with_peers = true;
    let mut baseline_rev = None;
    let mut only: Option<Vec<String>> = None;
    let mut modes = vec![Mode::Queue, Mode::EndToEnd, Mode::Milter, Mode::MilterEveryReply, Mode::Tables];
    let mut lifetime_only = false;
    let mut args = args.iter();
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--quick" => quick = true,
            "--no-peers" => with_peers = false,
            "--baseline" => baseline_rev = Some(args.next().context("--baseline needs a git revision")?.clone()),
            "--only" => {
                let list = args.next().context("--only needs workload names (burst,churn,big,rcpts)")?;
                let names: Vec<String> = list.split(',').map(str::to_owned).collect();
                if let Some(bad) = names.iter().find(|n| !WORKLOADS.iter().any(|w| w.name == n.as_str())) {
                    bail!("--only: no workload {bad:?} (burst, churn, big, rcpts)");
                }
                only = Some(names);
            }
            "--mode" => {
                modes = match args.next().map(String::as_str) {
                    Some("queue") => vec![Mode::Queue],
                    Some("e2e") => vec![Mode::EndToEnd],
                    Some("milter") => vec![Mode::Milter, Mode::MilterEveryReply],
                    Some("tables") => vec![Mode::Tables],
                    Some("lifetime") => {
                        lifetime_only = true;
                        Vec::new()
                    }
                    other => bail!("--mode needs queue, e2e, milter, tables or lifetime, not {other:?}"),
                }
            }
            other => {
                bail!(
                    "unknown bench option {other:?} (--quick, --baseline REV, --only NAMES, --mode queue|e2e|milter|tables|lifetime, --no-peers)"
                )
            }
        }
    }
    // A partial run (some workloads or one mode) is for comparing a
    // change: the lifetime, READY and fsync figures are left out, unless
    // the lifetime figures are all it is for (`--mode lifetime`).
    let partial = (only.is_some() || modes.len() < 5) && !lifetime_only;
    install_postfix()?;
    let dir = root.join("target/bench");
    fs::create_dir_all(&dir)?;
    // Exim and OpenSMTPD: those that cannot be set up are left out with a
    // note, never the whole bench.
    let mut peer_notes = Vec::new();
    let unpacked = if with_peers { peers::prepare_all(&dir, &mut peer_notes) } else { Vec::new() };
    let bins = chaos::build_release(root)?;
    let baseline = baseline_rev.as_deref().map(|rev| build_baseline(root, rev)).transpose()?;
    let scale = if quick { 5 } else { 1 };
    // With a baseline, an even number of rounds so each build goes
    // first equally often.
    let rounds = match (quick, baseline_rev.is_some()) {
        (true, _) => 1,
        (false, false) => ROUNDS,
        (false, true) => ROUNDS_WITH_BASELINE,
    };
    let started = Instant::now();
    let mut report = Report { notes: peer_notes, ..Report::default() };
    // The disk's limit before any load, and again after the
    // receive-and-queue rounds (`durable_create`).
    let mut durable = DurableCreate::new(&dir);
    report.durable_create.push(durable.measure()?);

    for mode in modes {
        let sink = match mode {
            Mode::EndToEnd => Some(SmtpSink::start()?),
            Mode::Queue | Mode::Milter | Mode::MilterEveryReply | Mode::Tables => None,
        };
        let milter = match mode {
            Mode::Milter => Some(crate::milter_sink::MilterSink::start(crate::milter_sink::Replies::EndOfMessage)?),
            Mode::MilterEveryReply => Some(crate::milter_sink::MilterSink::start(crate::milter_sink::Replies::Every)?),
            Mode::Queue | Mode::EndToEnd | Mode::Tables => None,
        };
        let target = sink.as_ref().map(|s| s.port);
        let (postfix_extra, mortal_extra) = match &milter {
            Some(m) => (
                format!("smtpd_milters = inet:127.0.0.1:{}\nmilter_default_action = tempfail\n", m.port),
                format!("[[smtpd.milter]]\nendpoint = \"inet:127.0.0.1:{}\"\n", m.port),
            ),
            None => (String::new(), String::new()),
        };
        let (postfix_extra, mortal_server) = match mode {
            Mode::Tables => {
                let (virtual_map, users) = bench_tables(&dir.join("tables"))?;
                report.notes.push(lookup_cost(&virtual_map, &users)?);
                (
                    format!(
                        "{postfix_extra}virtual_alias_maps = texthash:{}\nlocal_recipient_maps = texthash:{}\n",
                        virtual_map.display(),
                        users.display()
                    ),
                    format!(
                        "virtual_alias_maps = [\"texthash:{}\"]\nrecipient_maps = [\"texthash:{}\"]\n",
                        virtual_map.display(),
                        users.display()
                    ),
                )
            }
            _ => (postfix_extra, String::new()),
        };
        let mut postfix = Postfix::start(&dir.join("postfix"), target, &postfix_extra)?;
        let (mortal_cfg, mortal_variant) =
            mortal_config_with(&dir.join("mortal"), target, 100, "", &mortal_extra, &mortal_server)?;
        let mut mortal = Mortal::start(&bins, &dir.join("mortal"), &mortal_cfg, port_of(&mortal_cfg))?;
        report.notes.push(format!("{}: mortal delivers via {mortal_variant}", mode.name()));
        // The baseline build gets the same config, on a port of its own.
        let mut old = match &baseline {
            Some((old_bins, rev)) => {
                let (cfg, _) =
                    mortal_config_with(&dir.join("mortal-baseline"), target, 100, "", &mortal_extra, &mortal_server)?;
                let old = Mortal::start(old_bins, &dir.join("mortal-baseline"), &cfg, port_of(&cfg))?;
                report.baseline = Some(rev.clone());
                Some(old)
            }
            None => None,
        };
        // The peers run in receive-and-queue and end to end only: the
        // milter and table modes have no config for them.
        let mut peers: Vec<(&peers::Unpacked, Option<Peer>)> = match mode {
            Mode::Queue | Mode::EndToEnd => {
                unpacked.iter().map(|u| (u, start_peer(u, &dir, target, mode, &mut report.notes))).collect()
            }
            Mode::Milter | Mode::MilterEveryReply | Mode::Tables => Vec::new(),
        };
        let wanted = |w: &&Workload| {
            only.as_ref().is_none_or(|o| o.iter().any(|n| n == w.name))
                && (!matches!(mode, Mode::Milter | Mode::MilterEveryReply) || w.name == MILTER_WORKLOAD)
                && (mode != Mode::Tables || w.name == TABLES_WORKLOAD)
        };
        for w in WORKLOADS.iter().filter(wanted) {
            let w = Workload { messages: w.messages / scale, ..*w };
            let (mut a, mut b, mut c) = (Vec::new(), Vec::new(), Vec::new());
            let mut d: Vec<Vec<Sample>> = vec![Vec::new(); peers.len()];
            for round in 0..rounds {
                eprintln!("==> {} {} round {}/{rounds}", mode.name(), w.name, round + 1);
                // A run measurably pays for the one just before it (the
                // disk still writing back and discarding what that run
                // deleted; OpenSMTPD's queue is all synchronous writes),
                // so mortal and Postfix (and the baseline) take turns
                // going first, right after the peers of the round before:
                // each of them follows the other once and the last peer
                // once over three rounds.
                let mut order: Vec<Turn> = vec![Turn::Mortal];
                if old.is_some() {
                    order.push(Turn::Baseline);
                }
                order.push(Turn::Postfix);
                if round % 2 == 1 {
                    order.reverse();
                }
                order.extend((0..peers.len()).map(Turn::Peer));
                for turn in order {
                    match turn {
                        Turn::Mortal => {
                            let busy = (mode == Mode::Queue && w.name == "burst" && round == 0)
                                .then(|| UssSampler::start(smtpd_pids(&mortal)));
                            a.push(measure(&w, mode, Server::Mortal(&mortal))?);
                            if let Some(s) = busy {
                                report.busy_uss_kib = s.stop();
                            }
                        }
                        Turn::Baseline => {
                            if let Some(old) = &old {
                                c.push(measure(&w, mode, Server::Mortal(old))?);
                            }
                        }
                        Turn::Postfix => b.push(measure(&w, mode, Server::Postfix(&postfix))?),
                        Turn::Peer(i) => {
                            let (u, slot) = &mut peers[i];
                            let samples = &mut d[i];
                            // A failed round leaves no samples: the peer
                            // sits out the rest of the workload.
                            let Some(peer) = slot.as_ref().filter(|_| round == 0 || !samples.is_empty()) else {
                                continue;
                            };
                            if let Err(e) = measure(&w, mode, Server::Peer(peer)).map(|sample| samples.push(sample)) {
                                let line =
                                    format!("{} not measured in {} {}: {e:#}", u.kind.name(), mode.name(), w.name);
                                eprintln!("==> {line}");
                                report.notes.push(line);
                                samples.clear();
                                // Its queue and processes are in no known
                                // state: a fresh instance for the next
                                // workload.
                                *slot = None;
                                *slot = start_peer(u, &dir, target, mode, &mut report.notes);
                            }
                        }
                    }
                }
            }
            // The latency a sender sees under burst: one more burst per
            // server, with a probe beside the load (not in the rates above).
            if mode == Mode::Queue && w.name == "burst" && !quick {
                eprintln!("==> latency under burst");
                report.latency = Some((
                    measure_latency(&w, Server::Mortal(&mortal))?,
                    measure_latency(&w, Server::Postfix(&postfix))?,
                ));
            }
            let peer_samples =
                peers.iter().zip(d).filter(|(_, s)| !s.is_empty()).map(|((u, _), s)| (u.kind, s)).collect();
            report.rows.push(Row { mode, workload: w, mortal: a, postfix: b, baseline: c, peers: peer_samples });
        }
        if mode == Mode::Queue {
            report.idle_uss_kib = idle_uss(&mortal);
        }
        // The disk's limit again, after the receive-and-queue rounds.
        if mode == Mode::Queue {
            report.durable_create.push(durable.measure()?);
        }
        mortal.stop();
        if let Some(old) = &mut old {
            old.stop();
        }
        postfix.stop();
        drop(peers);
    }

    // Lifetime policy overhead: churn with max_use 100 and a short life
    // (so it bites within the run) against no limit at all, and the
    // pattern's price at its most secure: a fresh process per session,
    // exec'd or forked from a zygote. One instance per policy, all
    // running, taking turns in every round as the servers do above.
    let churn = Workload { messages: WORKLOADS[1].messages / scale, ..WORKLOADS[1] };
    let policies = [
        (100, LIMITED_LIFE, "max_use=100, max_lifetime=5s, jitter 0.5"),
        (0, "max_lifetime = \"0s\"", "unlimited (max_use=0, max_lifetime=0s)"),
        (1, "max_lifetime = \"0s\"", "max_use=1 (a fresh process per session)"),
        (1, "max_lifetime = \"0s\"\nspawn = \"fork\"", "max_use=1, spawn=fork (forked from a zygote)"),
    ];
    if !partial {
        let mut instances = Vec::new();
        for (i, (max_use, policy, label)) in policies.into_iter().enumerate() {
            let home = dir.join(format!("lifetime-{i}"));
            let _ = fs::remove_dir_all(&home);
            let (cfg, _) = mortal_config(&home, None, max_use, policy, "")?;
            let mortal = Mortal::start(&bins, &home, &cfg, port_of(&cfg))?;
            instances.push((label, home.join(METRICS_FILE), mortal));
        }
        // The READY latencies before the load (the preforked pools), so
        // that those of the children spawned during the rounds can be
        // told apart: the limited instance spawns a child per 100
        // sessions and per 5 s of life, many READY records.
        let limited_metrics = &instances[0].1;
        let ready_start = read_metrics(limited_metrics, std::time::SystemTime::now())
            .inspect_err(|e| report.notes.push(format!("READY latency before the load unavailable: {e:#}")))
            .ok();
        let mut samples: Vec<Vec<Sample>> = vec![Vec::new(); instances.len()];
        for round in 0..rounds {
            eprintln!("==> lifetime policies, churn, round {}/{rounds}", round + 1);
            let mut order: Vec<usize> = (0..instances.len()).collect();
            order.rotate_left(round % instances.len());
            for i in order {
                samples[i].push(measure(&churn, Mode::Queue, Server::Mortal(&instances[i].2))?);
            }
        }
        for ((label, _, _), samples) in instances.iter().zip(&samples) {
            report.lifetime.push((label, median(samples.iter().map(|s| churn.messages as f64 / s.secs))));
        }
        if let Some(start) = &ready_start {
            match read_metrics(limited_metrics, std::time::SystemTime::now()) {
                Ok(end) => report.ready = ready_stats(start, &end),
                Err(e) => report.notes.push(format!("READY latency unavailable: {e:#}")),
            }
        }
        // A fresh process's start on a quiet machine: single sessions one
        // after another on the max_use = 1 instances, each retiring its
        // smtpd and cleanup, whose successors start alone.
        let single = Workload { name: "single", sessions: 1, messages: 1, ..churn };
        for (label, metrics, mortal) in &instances[2..] {
            let before = read_metrics(metrics, std::time::SystemTime::now());
            for _ in 0..QUIET_SPAWNS {
                measure(&single, Mode::Queue, Server::Mortal(mortal))?;
                std::thread::sleep(QUIET_GAP);
            }
            match (before, read_metrics(metrics, std::time::SystemTime::now())) {
                (Ok(before), Ok(after)) => {
                    for service in READY_SERVICES {
                        let spawned = ready_hist(&after, service).minus(&ready_hist(&before, service));
                        if let Some(stat) = spawned.stat(service, QUIET_READY) {
                            report.ready_quiet.push((*label, stat));
                        }
                    }
                }
                (Err(e), _) | (_, Err(e)) => report.notes.push(format!("quiet READY latency unavailable: {e:#}")),
            }
        }
        for (_, _, mut mortal) in instances {
            mortal.stop();
        }
    }

    if !partial && !lifetime_only {
        report.fsyncs = fsyncs_per_message(&bins, &dir).unwrap_or_else(|e| {
            report.notes.push(format!("fsync count unavailable: {e:#}"));
            None
        });
    }
    report.elapsed = started.elapsed();
    report.machine = machine();
    let md = report.markdown();
    fs::write(dir.join("results.md"), &md)?;
    fs::write(dir.join("results.json"), serde_json::to_string_pretty(&report.json())?)?;
    println!("{md}");
    eprintln!("==> results in {}", dir.join("results.md").display());
    Ok(())
}

/// A fresh instance of a peer for `mode` under `dir`, its setup noted
/// once; `None`, with a note saying why, if it does not start.
fn start_peer(
    unpacked: &peers::Unpacked,
    dir: &Path,
    lmtp: Option<u16>,
    mode: Mode,
    notes: &mut Vec<String>,
) -> Option<Peer> {
    match Peer::start(unpacked, &dir.join(unpacked.kind.dir_name()), lmtp) {
        Ok(peer) => {
            if !notes.contains(&peer.setup) {
                notes.push(peer.setup.clone());
            }
            Some(peer)
        }
        Err(e) => {
            let line = format!("{} not started for {}: {e:#}", unpacked.kind.name(), mode.name());
            eprintln!("==> {line}");
            notes.push(line);
            None
        }
    }
}

/// Release binaries of `rev`, built in a worktree of their own under
/// `target/bench/` so that the run compares before and after a change
/// side by side (`--baseline REV`).
fn build_baseline(root: &Path, rev: &str) -> Result<(PathBuf, String)> {
    let out = Command::new("git").args(["rev-parse", "--verify", &format!("{rev}^{{commit}}")]).output()?;
    if !out.status.success() {
        bail!("--baseline {rev}: not a commit");
    }
    let commit = String::from_utf8_lossy(&out.stdout).trim().to_owned();
    let src = root.join("target/bench/baseline-src");
    let _ = Command::new("git").args(["worktree", "remove", "--force"]).arg(&src).output();
    let _ = fs::remove_dir_all(&src);
    super::run(
        &format!("git worktree add {} {commit}", src.display()),
        Command::new("git").args(["worktree", "add", "--detach"]).arg(&src).arg(&commit),
    )?;
    let target = root.join("target/bench/baseline-target");
    super::run(
        &format!("cargo build --release (baseline {rev})"),
        super::cargo()
            .args(["build", "--release", "--workspace", "--bins"])
            .current_dir(&src)
            .env("CARGO_TARGET_DIR", &target),
    )?;
    let short = commit.get(..10).unwrap_or(&commit).to_owned();
    Ok((target.join("release"), format!("{rev} ({short})")))
}

enum Server<'a> {
    Mortal(&'a Mortal),
    Postfix(&'a Postfix),
    Peer(&'a Peer),
}

impl Server<'_> {
    fn port(&self) -> u16 {
        match self {
            Server::Mortal(m) => m.port,
            Server::Postfix(p) => p.port,
            Server::Peer(p) => p.port,
        }
    }

    /// CPU seconds used so far by the whole instance.
    fn cpu(&self) -> f64 {
        match self {
            Server::Mortal(m) => m.master_pid().map_or(0.0, tree_cpu),
            Server::Postfix(p) => p.master_pid().map_or(0.0, tree_cpu),
            Server::Peer(p) => p.root_pid().map_or(0.0, tree_cpu),
        }
    }

    fn queue_len(&self) -> usize {
        match self {
            Server::Mortal(m) => {
                let spool = m.config.parent().and_then(Path::parent).expect("instance dir").join("spool");
                m.queue_len(&spool)
            }
            Server::Postfix(p) => {
                ["incoming", "active", "deferred", "maildrop"].iter().map(|q| count_files(&p.queue.join(q))).sum()
            }
            Server::Peer(p) => p.queue_len(),
        }
    }
}

/// Writer threads of the durable-create measure (the figure in the
/// performance issue, about 6,000 files/s on this machine, was taken with
/// 20).
const DURABLE_WRITERS: usize = 20;
/// Each file's size: a small message's queue file.
const DURABLE_FILE_SIZE: usize = 1536;
/// How long the durable-create measure runs.
const DURABLE_TIME: Duration = Duration::from_secs(5);
/// The share of unlimited max_use that churn should keep with max_use = 1.
const MAX_USE_1_TARGET: f64 = 0.5;
/// The share of the durable-create limit mortal's burst should reach.
const DURABLE_TARGET: f64 = 0.5;

/// The disk's limit for what every accepted message costs, measured
/// here in the same run: files per second that `writers` threads reach
/// for `time`, each creating a file of [`DURABLE_FILE_SIZE`] octets the
/// way a queue file is committed (write a temporary file, fsync it,
/// rename it into place, fsync the directory), in the fresh directory
/// `dir` on the spool's file system. The files stay: see
/// [`DurableCreate`].
fn durable_create_rate(dir: &Path, writers: usize, time: Duration) -> Result<f64> {
    let _ = fs::remove_dir_all(dir);
    fs::create_dir_all(dir)?;
    let content = vec![b'x'; DURABLE_FILE_SIZE];
    let deadline = Instant::now() + time;
    let started = Instant::now();
    let counts: Vec<u64> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..writers)
            .map(|t| {
                let (dir, content) = (&dir, &content);
                scope.spawn(move || -> Result<u64> {
                    let directory = fs::File::open(dir)?;
                    let mut n = 0u64;
                    while Instant::now() < deadline {
                        let tmp = dir.join(format!("{t}-{n}.tmp"));
                        let mut file = fs::File::create(&tmp)?;
                        std::io::Write::write_all(&mut file, content)?;
                        file.sync_all()?;
                        fs::rename(&tmp, dir.join(format!("{t}-{n}")))?;
                        directory.sync_all()?;
                        n += 1;
                    }
                    Ok(n)
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().expect("durable-create writer")).collect::<Result<_>>()
    })?;
    let secs = started.elapsed().as_secs_f64();
    Ok(counts.iter().sum::<u64>() as f64 / secs)
}

/// Messages the latency probe sends during one burst, at most.
const PROBE_MESSAGES: u32 = 300;
/// Longest the probe waits for any reply.
const PROBE_TIMEOUT: Duration = Duration::from_secs(30);

/// One burst of `w` against `server` with a probe beside it: a client
/// that sends one message at a time (1 KiB, one recipient) and times
/// each from the end of its DATA (the `.` line) to the server's reply,
/// as long as the burst lasts. Returns the times, sorted.
fn measure_latency(w: &Workload, server: Server<'_>) -> Result<Vec<Duration>> {
    let stop = Arc::new(AtomicBool::new(false));
    let port = server.port();
    let probe = {
        let stop = Arc::clone(&stop);
        std::thread::spawn(move || probe_latency(port, &stop))
    };
    let load = measure(w, Mode::Queue, server);
    stop.store(true, Ordering::Relaxed);
    let mut times = probe.join().map_err(|_| anyhow::anyhow!("latency probe panicked"))??;
    load?;
    times.sort();
    Ok(times)
}

/// The probe's session: EHLO, then MAIL, RCPT, DATA and the content of one
/// message after the other until `stop` or [`PROBE_MESSAGES`].
fn probe_latency(port: u16, stop: &AtomicBool) -> Result<Vec<Duration>> {
    use std::io::{BufRead, BufReader, Write};
    let stream = TcpStream::connect(("127.0.0.1", port)).context("latency probe: connect")?;
    stream.set_read_timeout(Some(PROBE_TIMEOUT))?;
    let mut writer = stream.try_clone()?;
    let mut reader = BufReader::new(stream);
    let mut reply = |expect: &str| -> Result<()> {
        let mut text = String::new();
        loop {
            let mut line = String::new();
            if reader.read_line(&mut line)? == 0 {
                bail!("latency probe: connection closed after {text:?}");
            }
            text.push_str(&line);
            if line.as_bytes().get(3) != Some(&b'-') {
                break;
            }
        }
        if !text.starts_with(expect) {
            bail!("latency probe: wanted {expect}, got {text:?}");
        }
        Ok(())
    };
    reply("220")?;
    writer.write_all(b"EHLO probe.test\r\n")?;
    reply("250")?;
    // 1 KiB of body in lines of 100 octets.
    let content = format!("Subject: probe\r\n\r\n{}", format!("{}\r\n", "x".repeat(98)).repeat(10));
    let mut times = Vec::new();
    while !stop.load(Ordering::Relaxed) && times.len() < PROBE_MESSAGES as usize {
        writer.write_all(format!("MAIL FROM:<probe@{DOMAIN}>\r\n").as_bytes())?;
        reply("250")?;
        writer.write_all(format!("RCPT TO:<rcpt@{DOMAIN}>\r\n").as_bytes())?;
        reply("250")?;
        writer.write_all(b"DATA\r\n")?;
        reply("354")?;
        writer.write_all(content.as_bytes())?;
        let sent = Instant::now();
        writer.write_all(b".\r\n")?;
        reply("250")?;
        times.push(sent.elapsed());
    }
    let _ = writer.write_all(b"QUIT\r\n");
    Ok(times)
}

/// The `q` quantile of sorted `times` (nearest rank).
fn quantile(times: &[Duration], q: f64) -> Duration {
    if times.is_empty() {
        return Duration::ZERO;
    }
    let rank = ((q * times.len() as f64).ceil() as usize).clamp(1, times.len());
    times[rank - 1]
}

/// The durable-create measures of one bench run, whose files are kept
/// until the run is over. Deleting tens of thousands of files just before
/// a server's rounds made those rounds pay for it: ext4 without a journal
/// (this machine's) skips inodes deleted in the last 60 s (360 s while
/// their inode table block is dirty) when it allocates one, checking each
/// in turn, so every queue file the next rounds created cost a scan past
/// them (`recently_deleted` and `find_inode_bit` in a profile), for both
/// servers alike: the first receive-and-queue rows ran at a third of
/// their rate.
struct DurableCreate {
    /// `target/bench/durable-create`: one numbered directory per measure.
    dir: PathBuf,
    measures: usize,
}

impl DurableCreate {
    /// Removes what an interrupted earlier run left, before any load.
    fn new(bench_dir: &Path) -> Self {
        let dir = bench_dir.join("durable-create");
        let _ = fs::remove_dir_all(&dir);
        Self { dir, measures: 0 }
    }

    /// One measure on the spool's file system, once the data earlier runs
    /// left dirty is written back (`sync`): a measure that pays for the
    /// writeback of deleted files underrates the disk several times over.
    fn measure(&mut self) -> Result<f64> {
        nix::unistd::sync();
        eprintln!("==> durable-create limit ({DURABLE_WRITERS} writers, {} s)", DURABLE_TIME.as_secs());
        self.measure_with(DURABLE_WRITERS, DURABLE_TIME)
    }

    /// One measure of `writers` threads for `time`, in the next numbered
    /// directory.
    fn measure_with(&mut self, writers: usize, time: Duration) -> Result<f64> {
        self.measures += 1;
        durable_create_rate(&self.dir.join(self.measures.to_string()), writers, time)
    }
}

impl Drop for DurableCreate {
    /// The run is over: its rounds can no longer pay for the deletion.
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.dir);
    }
}

/// Runs smtp-source for one workload and, end to end, waits until the
/// queue is empty. Returns wall time and CPU used by the server.
fn measure(w: &Workload, mode: Mode, server: Server<'_>) -> Result<Sample> {
    wait_empty(&server)?;
    let cpu0 = server.cpu();
    let start = Instant::now();
    let mut cmd = Command::new("smtp-source");
    cmd.args(["-s", &w.sessions.to_string(), "-m", &w.messages.to_string(), "-l", &w.size.to_string()]);
    cmd.args(["-r", &w.rcpts.to_string(), "-f", &format!("load@{DOMAIN}"), "-t", &format!("rcpt@{DOMAIN}")]);
    if w.reuse {
        cmd.arg("-d");
    }
    cmd.arg(format!("127.0.0.1:{}", server.port())).stdin(Stdio::null()).stdout(Stdio::null());
    let mut child = cmd.stderr(Stdio::piped()).spawn().context("smtp-source (apt-get install postfix)")?;
    let status = wait_bounded(&mut child, RUN_BOUND)?;
    if !status.success() {
        let mut err = String::new();
        if let Some(mut e) = child.stderr.take() {
            let _ = std::io::Read::read_to_string(&mut e, &mut err);
        }
        bail!("smtp-source failed ({status}) for {}: {err}", w.name);
    }
    if mode == Mode::EndToEnd {
        wait_empty(&server)?;
    }
    let secs = start.elapsed().as_secs_f64();
    Ok(Sample { secs, cpu: server.cpu() - cpu0 })
}

fn wait_empty(server: &Server<'_>) -> Result<()> {
    let deadline = Instant::now() + DRAIN_BOUND;
    while server.queue_len() > 0 {
        if Instant::now() > deadline {
            bail!("queue did not empty within {DRAIN_BOUND:?}");
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    Ok(())
}

pub(crate) fn wait_bounded(child: &mut Child, bound: Duration) -> Result<std::process::ExitStatus> {
    let deadline = Instant::now() + bound;
    loop {
        if let Some(s) = child.try_wait()? {
            return Ok(s);
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            bail!("run exceeded {bound:?}");
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

pub(crate) fn count_files(dir: &Path) -> usize {
    let Ok(entries) = fs::read_dir(dir) else { return 0 };
    entries.flatten().map(|e| if e.file_type().is_ok_and(|t| t.is_dir()) { count_files(&e.path()) } else { 1 }).sum()
}

/// CPU seconds of `pid` and all its descendants: its own and its reaped
/// children's times (`utime stime cutime cstime`), plus the live
/// descendants' own times. A child that exits between two readings moves
/// from the second term to the first, so differences stay exact.
fn tree_cpu(pid: u32) -> f64 {
    let stat = |pid: u32| -> Option<(u32, [u64; 4])> {
        let s = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
        let rest: Vec<&str> = s.rsplit_once(')')?.1.split_whitespace().collect();
        // After the command: state ppid ... utime(12) stime(13) cutime(14) cstime(15).
        let ppid = rest.get(1)?.parse().ok()?;
        let t = |i: usize| rest.get(i).and_then(|v| v.parse().ok()).unwrap_or(0);
        Some((ppid, [t(11), t(12), t(13), t(14)]))
    };
    let all: Vec<(u32, u32, [u64; 4])> = fs::read_dir("/proc")
        .map(|d| {
            d.flatten()
                .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
                .filter_map(|p| stat(p).map(|(pp, t)| (p, pp, t)))
                .collect()
        })
        .unwrap_or_default();
    let mut total = 0u64;
    let mut frontier = vec![pid];
    if let Some((_, _, t)) = all.iter().find(|(p, _, _)| *p == pid) {
        total += t.iter().sum::<u64>();
    }
    let mut guard = 0;
    while let Some(parent) = frontier.pop() {
        guard += 1;
        if guard > 100_000 {
            break;
        }
        for (p, pp, t) in &all {
            if *pp == parent {
                total += t[0] + t[1] + t[2] + t[3];
                frontier.push(*p);
            }
        }
    }
    total as f64 / TICKS_PER_SECOND
}

/// Private memory of a process in KiB (smaps_rollup).
fn uss_kib(pid: u32) -> Option<u64> {
    let text = fs::read_to_string(format!("/proc/{pid}/smaps_rollup")).ok()?;
    let field = |name: &str| -> u64 {
        text.lines().find_map(|l| l.strip_prefix(name)?.trim().strip_suffix("kB")?.trim().parse().ok()).unwrap_or(0)
    };
    Some(field("Private_Clean:") + field("Private_Dirty:"))
}

fn smtpd_pids(m: &Mortal) -> Vec<u32> {
    m.processes().into_iter().filter(|(_, n)| n == "mortal-smtpd").map(|(p, _)| p).collect()
}

fn idle_uss(m: &Mortal) -> Option<u64> {
    std::thread::sleep(Duration::from_millis(500));
    let mut v: Vec<u64> = smtpd_pids(m).into_iter().filter_map(uss_kib).collect();
    v.sort_unstable();
    v.get(v.len() / 2).copied()
}

/// Samples the largest smtpd USS while a workload runs.
struct UssSampler {
    stop: Arc<AtomicBool>,
    max: Arc<AtomicU64>,
    thread: std::thread::JoinHandle<()>,
}

impl UssSampler {
    fn start(pids: Vec<u32>) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let max = Arc::new(AtomicU64::new(0));
        let (s, m) = (stop.clone(), max.clone());
        let thread = std::thread::spawn(move || {
            while !s.load(Ordering::Relaxed) {
                for pid in &pids {
                    if let Some(k) = uss_kib(*pid) {
                        m.fetch_max(k, Ordering::Relaxed);
                    }
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        });
        UssSampler { stop, max, thread }
    }

    fn stop(self) -> Option<u64> {
        self.stop.store(true, Ordering::Relaxed);
        let _ = self.thread.join();
        let v = self.max.load(Ordering::Relaxed);
        (v > 0).then_some(v)
    }
}

/// Rounds over the addresses in [`lookup_cost`].
const LOOKUP_ROUNDS: u32 = 100;

/// What one lookup costs on its own, in this process, with the bench's
/// tables: a recipient-table lookup in Postfix's address order (what
/// smtpd does per RCPT) and a virtual alias expansion (what cleanup does
/// per recipient), over 10,000 listed and 1,000 unlisted addresses.
fn lookup_cost(virtual_map: &Path, users: &Path) -> Result<String> {
    use mortal_proto::table::{Aliases, Table, TableSpec, lookup_address};
    let users = Table::load(&TableSpec::Text(users.to_owned()))?;
    let aliases = Aliases::new(vec![Table::load(&TableSpec::Text(virtual_map.to_owned()))?], None);
    let listed = (0..TABLE_ENTRIES).map(|i| format!("user{i}@{DOMAIN}"));
    let addresses: Vec<String> = listed.chain((0..TABLE_ENTRIES / 10).map(|i| format!("nobody{i}@{DOMAIN}"))).collect();
    let count = LOOKUP_ROUNDS * u32::try_from(addresses.len())?;
    let started = Instant::now();
    let mut found = 0usize;
    for _ in 0..LOOKUP_ROUNDS {
        for address in &addresses {
            found += usize::from(std::hint::black_box(lookup_address(&users, address, Some('+'))?).is_some());
        }
    }
    let per_lookup = started.elapsed() / count;
    let started = Instant::now();
    let mut targets = 0usize;
    for _ in 0..LOOKUP_ROUNDS {
        for address in &addresses {
            targets += std::hint::black_box(aliases.expand(address)?).len();
        }
    }
    let per_expansion = started.elapsed() / count;
    anyhow::ensure!(found == TABLE_ENTRIES * LOOKUP_ROUNDS as usize, "lookup found {found}");
    anyhow::ensure!(targets == addresses.len() * LOOKUP_ROUNDS as usize, "expansion gave {targets}");
    Ok(format!(
        "table cost in-process ({} addresses × {LOOKUP_ROUNDS}, 10,000-entry texthash; xtask's unoptimized build, \
         an upper bound for the release daemons): recipient table {per_lookup:?} per RCPT lookup, virtual alias \
         expansion {per_expansion:?} per recipient",
        addresses.len()
    ))
}

/// The bench's alias and recipient tables, for both servers: aliases of
/// [`TABLE_ENTRIES`] users and of the addresses smtp-source sends to
/// (`rcpt@`, `0rcpt@`... `50rcpt@`), each to a mailbox of its own, and the
/// recipient table of the addresses clients may use.
fn bench_tables(dir: &Path) -> Result<(PathBuf, PathBuf)> {
    fs::create_dir_all(dir)?;
    let dir = std::path::absolute(dir)?;
    let (mut aliases, mut users) = (String::new(), String::new());
    // smtp-source sends to `rcpt@` alone, or to `0rcpt@`, `1rcpt@`...
    let most = WORKLOADS.iter().map(|w| w.rcpts).max().unwrap_or(1);
    let sent = std::iter::once("rcpt".to_owned()).chain((0..=most).map(|n| format!("{n}rcpt")));
    for user in (0..TABLE_ENTRIES).map(|i| format!("user{i}")).chain(sent) {
        let _ = writeln!(aliases, "{user}@{DOMAIN} {user}-box@{DOMAIN}");
        let _ = writeln!(users, "{user}@{DOMAIN} ok");
    }
    let (virtual_map, users_map) = (dir.join("virtual"), dir.join("users"));
    fs::write(&virtual_map, aliases)?;
    fs::write(&users_map, users)?;
    Ok((virtual_map, users_map))
}

/// mortal's config: same domain and target as Postfix's, default limits.
/// `policy` is appended to both `[process.*]` tables (lifetime keys),
/// `extra` to the file (a milter).
fn mortal_config(
    dir: &Path,
    lmtp: Option<u16>,
    max_use: u32,
    policy: &str,
    extra: &str,
) -> Result<(String, &'static str)> {
    mortal_config_with(dir, lmtp, max_use, policy, extra, "")
}

/// [`mortal_config`] with `server` keys added to `[server]` (tables).
fn mortal_config_with(
    dir: &Path,
    lmtp: Option<u16>,
    max_use: u32,
    policy: &str,
    extra: &str,
    server: &str,
) -> Result<(String, &'static str)> {
    let port = chaos::free_port()?;
    let user = chaos::user_line();
    let text = |transport: &str| {
        format!(
            r#"[server]
hostname = "mortal.bench.test"
spool_dir = "../spool"
metrics_file = "../{METRICS_FILE}"
accepted_domains = ["{DOMAIN}"]
{user}
{server}

[log]
format = "postfix"
level = "warn"

[smtpd]
listen = ["127.0.0.1:{port}"]
recipient_limit = 1000

[queue]
scan_interval = "1s"

[delivery]
transport = "{transport}"

[process.smtpd]
process_limit = 100
prefork = 20
min_spare = 5
max_spare = 25
max_use = {max_use}
{policy}

[process.cleanup]
process_limit = 100
prefork = 4
min_spare = 2
max_spare = 20
max_use = {max_use}
{policy}

{extra}
"#
        )
    };
    let candidates = match lmtp {
        Some(p) => vec![(text(&format!("lmtp:inet:127.0.0.1:{p}")), "LMTP to smtp-sink")],
        None => vec![(text("discard"), "discard"), (text("maildir"), "Maildir (discard route not available)")],
    };
    chaos::first_valid_config(&std::path::absolute(dir.join("etc/mortal.toml"))?, &candidates)
}

fn port_of(config: &str) -> u16 {
    config
        .lines()
        .find_map(|l| l.strip_prefix("listen = [\"127.0.0.1:")?.split('"').next()?.parse().ok())
        .expect("generated config has a listen port")
}

/// `apt-get install postfix` with "No configuration", when missing.
fn install_postfix() -> Result<()> {
    if Path::new("/usr/sbin/smtp-source").exists() && Path::new("/usr/sbin/postfix").exists() {
        return Ok(());
    }
    if !super::is_root() {
        bail!("the bench needs Debian's postfix package: run as root, or apt-get install postfix");
    }
    let mut preseed = Command::new("debconf-set-selections").stdin(Stdio::piped()).spawn()?;
    std::io::Write::write_all(
        preseed.stdin.as_mut().expect("piped"),
        b"postfix postfix/main_mailer_type select No configuration\n",
    )?;
    drop(preseed.stdin.take());
    preseed.wait()?;
    super::run(
        "apt-get install postfix",
        Command::new("apt-get")
            .args(["install", "-y", "-qq", "--no-install-recommends", "postfix"])
            .env("DEBIAN_FRONTEND", "noninteractive"),
    )
}

/// A private Postfix instance; stopped on drop.
struct Postfix {
    etc: PathBuf,
    queue: PathBuf,
    port: u16,
    running: bool,
}

impl Postfix {
    /// Delivery: `discard:` or, given a port, LMTP to that sink;
    /// `extra` is appended to main.cf (a milter).
    fn start(dir: &Path, lmtp: Option<u16>, extra: &str) -> Result<Self> {
        let dir = std::path::absolute(dir)?;
        let _ = Command::new("postfix").arg("-c").arg(dir.join("etc")).arg("stop").output();
        let _ = fs::remove_dir_all(&dir);
        let (etc, queue, data) = (dir.join("etc"), dir.join("queue"), dir.join("data"));
        for d in [&etc, &queue, &data] {
            fs::create_dir_all(d)?;
        }
        let chown = Command::new("chown").arg("postfix").arg(&data).status()?;
        if !chown.success() {
            bail!("chown postfix {}: is the postfix package installed?", data.display());
        }
        let port = chaos::free_port()?;
        let transport = lmtp.map_or("discard:".to_owned(), |p| format!("lmtp:inet:127.0.0.1:{p}"));
        let main_cf = format!(
            "compatibility_level = 3.6\nqueue_directory = {q}\ndata_directory = {d}\nmail_owner = postfix\n\
             setgid_group = postdrop\ninet_interfaces = 127.0.0.1\ninet_protocols = ipv4\n\
             myhostname = postfix.bench.test\nmydestination = {DOMAIN}\nmynetworks = 127.0.0.0/8\n\
             local_recipient_maps =\nalias_maps =\nalias_database =\nlocal_transport = {transport}\n\
             default_process_limit = 100\nsmtpd_recipient_limit = 1000\nmaillog_file = {log}\n\
             maillog_file_prefixes = {dir}\nbiff = no\nappend_dot_mydomain = no\n\
             lmtp_destination_concurrency_limit = 20\nsmtpd_client_connection_count_limit = 0\n\
             smtpd_client_message_rate_limit = 0\nsmtpd_client_connection_rate_limit = 0\n{extra}",
            q = queue.display(),
            d = data.display(),
            log = dir.join("postfix.log").display(),
            dir = dir.display(),
        );
        fs::write(etc.join("main.cf"), main_cf)?;
        let mut master_cf = format!("127.0.0.1:{port} inet n - n - - smtpd\n");
        for line in POSTFIX_SERVICES {
            master_cf.push_str(line);
            master_cf.push('\n');
        }
        fs::write(etc.join("master.cf"), master_cf)?;
        let mut pf = Postfix { etc, queue, port, running: false };
        pf.postfix("check")?;
        pf.postfix("start")?;
        pf.running = true;
        let deadline = Instant::now() + Duration::from_secs(20);
        while TcpStream::connect(("127.0.0.1", port)).is_err() {
            if Instant::now() > deadline {
                bail!("private Postfix did not listen on {port}; see {}", dir.join("postfix.log").display());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(pf)
    }

    fn postfix(&self, what: &str) -> Result<()> {
        let out = Command::new("postfix").arg("-c").arg(&self.etc).arg(what).output()?;
        if !out.status.success() {
            bail!("postfix -c {} {what}: {}", self.etc.display(), String::from_utf8_lossy(&out.stderr));
        }
        Ok(())
    }

    fn master_pid(&self) -> Option<u32> {
        fs::read_to_string(self.queue.join("pid/master.pid")).ok()?.trim().parse().ok()
    }

    fn stop(&mut self) {
        if std::mem::take(&mut self.running) {
            let _ = self.postfix("stop");
            let deadline = Instant::now() + Duration::from_secs(10);
            while self.master_pid().is_some_and(|p| Path::new(&format!("/proc/{p}")).exists())
                && Instant::now() < deadline
            {
                std::thread::sleep(Duration::from_millis(50));
            }
        }
    }
}

impl Drop for Postfix {
    fn drop(&mut self) {
        self.stop();
    }
}

/// master.cf services besides smtpd: Debian's defaults, chroot off (the
/// private instance has no chroot tree).
const POSTFIX_SERVICES: &[&str] = &[
    "pickup unix n - n 60 1 pickup",
    "cleanup unix n - n - 0 cleanup",
    "qmgr unix n - n 300 1 qmgr",
    "rewrite unix - - n - - trivial-rewrite",
    "bounce unix - - n - 0 bounce",
    "defer unix - - n - 0 bounce",
    "trace unix - - n - 0 bounce",
    "verify unix - - n - 1 verify",
    "flush unix n - n 1000? 0 flush",
    "proxymap unix - - n - - proxymap",
    "proxywrite unix - - n - 1 proxymap",
    "smtp unix - - n - - smtp",
    "relay unix - - n - - smtp",
    "showq unix n - n - - showq",
    "error unix - - n - - error",
    "retry unix - - n - - error",
    "discard unix - - n - - discard",
    "local unix - n n - - local",
    "lmtp unix - - n - - lmtp",
    "anvil unix - - n - 1 anvil",
    "scache unix - - n - 1 scache",
    "postlog unix-dgram n - n - 1 postlogd",
];

/// `smtp-sink` in LMTP mode: the shared end-to-end target.
struct SmtpSink {
    port: u16,
    child: Child,
}

impl SmtpSink {
    fn start() -> Result<Self> {
        let port = chaos::free_port()?;
        let child = Command::new("smtp-sink")
            .args(["-L", "-u", "nobody", "-m", "1000", &format!("127.0.0.1:{port}"), "1000"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("smtp-sink")?;
        let deadline = Instant::now() + Duration::from_secs(10);
        while TcpStream::connect(("127.0.0.1", port)).is_err() {
            if Instant::now() > deadline {
                bail!("smtp-sink did not listen on {port}");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(SmtpSink { port, child })
    }
}

impl Drop for SmtpSink {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// fsync-family calls per message: a separate short mortal run under
/// `strace -f -c` (strace slows it; only the counts matter).
fn fsyncs_per_message(bins: &Path, dir: &Path) -> Result<Option<f64>> {
    if Command::new("strace").arg("-V").output().is_err() {
        return Ok(None);
    }
    let (cfg, _) = mortal_config(&dir.join("mortal-strace"), None, 100, "", "")?;
    let port = port_of(&cfg);
    let inst = dir.join("mortal-strace");
    let _ = fs::remove_dir_all(&inst);
    fs::create_dir_all(inst.join("etc"))?;
    let config = std::path::absolute(inst.join("etc/mortal.toml"))?;
    fs::write(&config, &cfg)?;
    let out = inst.join("strace.txt");
    let mut strace = Command::new("strace")
        .args(["-f", "-c", "-e", "trace=fsync,fdatasync,sync_file_range,syncfs", "-o"])
        .arg(&out)
        .arg(bins.join("mortal-master"))
        .arg("--config")
        .arg(&config)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()?;
    let result = (|| -> Result<()> {
        let deadline = Instant::now() + Duration::from_secs(30);
        while TcpStream::connect(("127.0.0.1", port)).is_err() {
            if Instant::now() > deadline {
                bail!("traced mortal did not listen");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let status = Command::new("smtp-source")
            .args(["-s", "5", "-m", &FSYNC_MESSAGES.to_string(), "-l", "1024", "-d"])
            .args(["-f", &format!("load@{DOMAIN}"), "-t", &format!("rcpt@{DOMAIN}")])
            .arg(format!("127.0.0.1:{port}"))
            .stdout(Stdio::null())
            .status()?;
        if !status.success() {
            bail!("smtp-source under strace failed");
        }
        let spool = mortal_proto::spool::Spool::new(inst.join("spool"));
        let deadline = Instant::now() + DRAIN_BOUND;
        while [QueueDir::Incoming, QueueDir::Active, QueueDir::Deferred]
            .into_iter()
            .map(|q| count_files(&spool.dir(q)))
            .sum::<usize>()
            > 0
            && Instant::now() < deadline
        {
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(())
    })();
    // strace's own pid is the master's: SIGTERM reaches mortal-master
    // through strace, which then writes its summary.
    let master =
        fs::read_dir("/proc")?.flatten().filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok()).find(|p| {
            fs::read_to_string(format!("/proc/{p}/stat"))
                .ok()
                .and_then(|s| s.rsplit_once(')')?.1.split_whitespace().nth(1)?.parse::<u32>().ok())
                == Some(strace.id())
        });
    if let Some(m) = master {
        let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(m as i32), nix::sys::signal::Signal::SIGTERM);
    }
    if wait_bounded(&mut strace, Duration::from_secs(20)).is_err() {
        bail!("strace'd mortal did not stop");
    }
    result?;
    let text = fs::read_to_string(&out)?;
    let calls: u64 = text
        .lines()
        .filter(|l| ["fsync", "fdatasync", "sync_file_range", "syncfs"].iter().any(|s| l.trim_end().ends_with(s)))
        .filter_map(|l| l.split_whitespace().nth(3)?.parse::<u64>().ok())
        .sum();
    Ok(Some(calls as f64 / f64::from(FSYNC_MESSAGES)))
}

fn median(values: impl Iterator<Item = f64>) -> f64 {
    let mut v: Vec<f64> = values.collect();
    v.sort_by(f64::total_cmp);
    match v.len() {
        0 => 0.0,
        n if n % 2 == 1 => v[n / 2],
        n => (v[n / 2 - 1] + v[n / 2]) / 2.0,
    }
}

fn machine() -> String {
    let cpu = fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|c| {
            c.lines().find_map(|l| l.strip_prefix("model name")?.split(':').nth(1).map(|s| s.trim().to_owned()))
        })
        .unwrap_or_else(|| "unknown CPU".into());
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let kernel = fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let postfix = Command::new("postconf")
        .args(["-d", "-h", "mail_version"])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .unwrap_or_default();
    format!("{cpu}, {cores} cores, Linux {}, Postfix {postfix}", kernel.trim())
}

struct Row {
    mode: Mode,
    workload: Workload,
    mortal: Vec<Sample>,
    postfix: Vec<Sample>,
    /// The `--baseline` build's samples (empty without one).
    baseline: Vec<Sample>,
    /// Each peer measured in this row, with its samples.
    peers: Vec<(peers::Kind, Vec<Sample>)>,
}

impl Row {
    fn peer(&self, kind: peers::Kind) -> Option<&[Sample]> {
        self.peers.iter().find(|(k, _)| *k == kind).map(|(_, s)| s.as_slice())
    }

    fn rate(&self, s: &[Sample]) -> f64 {
        median(s.iter().map(|x| f64::from(self.workload.messages) / x.secs))
    }

    fn cpu_per_1000(&self, s: &[Sample]) -> f64 {
        median(s.iter().map(|x| x.cpu * 1000.0 / f64::from(self.workload.messages)))
    }
}

#[derive(Default)]
struct Report {
    rows: Vec<Row>,
    lifetime: Vec<(&'static str, f64)>,
    fsyncs: Option<f64>,
    idle_uss_kib: Option<u64>,
    busy_uss_kib: Option<u64>,
    /// fork+exec-to-READY latency per service, from the churn run.
    ready: Vec<ReadyStat>,
    /// The same of `max_use = 1` children started one at a time on a
    /// quiet machine, per policy.
    ready_quiet: Vec<(&'static str, ReadyStat)>,
    notes: Vec<String>,
    elapsed: Duration,
    machine: String,
    /// The revision the `baseline` samples were built from.
    baseline: Option<String>,
    /// Files/s the spool's file system commits durably, each time it was
    /// measured ([`durable_create_rate`]).
    durable_create: Vec<f64>,
    /// End of DATA to the reply under burst, sorted: mortal's, Postfix's.
    latency: Option<(Vec<Duration>, Vec<Duration>)>,
}

impl Report {
    /// The peers measured in any row, in report order.
    fn peer_kinds(&self) -> Vec<peers::Kind> {
        peers::KINDS.into_iter().filter(|k| self.rows.iter().any(|r| r.peer(*k).is_some())).collect()
    }

    fn markdown(&self) -> String {
        let mut s = String::new();
        let kinds = self.peer_kinds();
        let names: Vec<&str> = std::iter::once("Postfix").chain(kinds.iter().map(|k| k.name())).collect();
        let _ = writeln!(
            s,
            "# mortal vs {}\n\nMachine: {}. Medians of the rounds, the servers taking turns in each.\n",
            names.join(", "),
            self.machine
        );
        // One column pair (rate, mortal's ratio to it) and one CPU column
        // per peer, after Postfix's; "–" where a peer was not measured.
        let (mut head, mut rule) = (
            "| mode | workload | mortal msgs/s | Postfix msgs/s | ratio |".to_owned(),
            "|---|---|---:|---:|---:|".to_owned(),
        );
        for k in &kinds {
            let _ = write!(head, " {} msgs/s | mortal/{} |", k.name(), k.name());
            rule.push_str("---:|---:|");
        }
        head.push_str(" mortal CPU s/1000 | Postfix CPU s/1000 |");
        rule.push_str("---:|---:|");
        for k in &kinds {
            let _ = write!(head, " {} CPU s/1000 |", k.name());
            rule.push_str("---:|");
        }
        let _ = writeln!(s, "{head}\n{rule}");
        for r in &self.rows {
            let (a, b) = (r.rate(&r.mortal), r.rate(&r.postfix));
            let w = &r.workload;
            let _ = write!(
                s,
                "| {} | {} ({} msgs × {} B, {} rcpt, {} sessions{}) | {a:.0} | {b:.0} | {:.2}× |",
                r.mode.name(),
                w.name,
                w.messages,
                w.size,
                w.rcpts,
                w.sessions,
                if w.reuse { "" } else { ", 1 msg/conn" },
                a / b,
            );
            for k in &kinds {
                match r.peer(*k) {
                    Some(p) => {
                        let _ = write!(s, " {:.0} | {:.2}× |", r.rate(p), a / r.rate(p));
                    }
                    None => s.push_str(" – | – |"),
                }
            }
            let _ = write!(s, " {:.2} | {:.2} |", r.cpu_per_1000(&r.mortal), r.cpu_per_1000(&r.postfix));
            for k in &kinds {
                match r.peer(*k) {
                    Some(p) => {
                        let _ = write!(s, " {:.2} |", r.cpu_per_1000(p));
                    }
                    None => s.push_str(" – |"),
                }
            }
            s.push('\n');
        }
        // Burst against what the disk can commit at all.
        let burst = self.rows.iter().find(|r| r.mode == Mode::Queue && r.workload.name == "burst");
        // The limit is the best the disk did: the measure only ever
        // underrates it (writeback, other load).
        let limit = self.durable_create.iter().copied().fold(None, |m: Option<f64>, v| Some(m.map_or(v, |m| m.max(v))));
        if let (Some(limit), Some(burst)) = (limit, burst) {
            let rate = burst.rate(&burst.mortal);
            let each: Vec<String> = self.durable_create.iter().map(|v| format!("{v:.0}")).collect();
            let _ = writeln!(
                s,
                "\nDurable-create limit of the spool's file system ({DURABLE_WRITERS} writers, {DURABLE_FILE_SIZE} B \
                 files: write, fsync, rename, directory fsync): {limit:.0} files/s (measured {} files/s). \
                 mortal's burst reaches {:.0}% of it (target {:.0}%), Postfix's {:.0}%{}.",
                each.join(" and "),
                rate / limit * 100.0,
                DURABLE_TARGET * 100.0,
                burst.rate(&burst.postfix) / limit * 100.0,
                kinds
                    .iter()
                    .filter_map(|k| Some(format!(
                        ", {}'s {:.0}%",
                        k.name(),
                        burst.rate(burst.peer(*k)?) / limit * 100.0
                    )))
                    .collect::<String>()
            );
        }
        if let Some((mortal, postfix)) = &self.latency {
            let ms = |t: &[Duration], q: f64| quantile(t, q).as_secs_f64() * 1000.0;
            let _ = writeln!(
                s,
                "\nEnd of DATA to 250 under burst (a probe sending one message at a time beside the load): \
                 mortal p50 {:.1} ms, p99 {:.1} ms ({} messages); Postfix p50 {:.1} ms, p99 {:.1} ms ({}).",
                ms(mortal, 0.5),
                ms(mortal, 0.99),
                mortal.len(),
                ms(postfix, 0.5),
                ms(postfix, 0.99),
                postfix.len()
            );
        }
        // What one milter costs each server per message: the milter row
        // against the plain receive-and-queue row of the same workload.
        let row = |mode: Mode| self.rows.iter().find(|r| r.mode == mode && r.workload.name == MILTER_WORKLOAD);
        for (mode, what) in
            [(Mode::Milter, "answering at the end of message"), (Mode::MilterEveryReply, "answering every event")]
        {
            if let (Some(plain), Some(milter)) = (row(Mode::Queue), row(mode)) {
                // Both rows are medians of noisy rounds: a milter row that
                // ran faster than the plain one says so rather than 0 µs.
                let cost = |a: f64, b: f64| match 1e6 / b - 1e6 / a {
                    us if us >= 0.0 => format!("{us:.0} µs"),
                    _ => "none measurable (its row ran faster than the plain one)".to_owned(),
                };
                let _ = writeln!(
                    s,
                    "\nOne accept-all milter {what} costs per message ({MILTER_WORKLOAD}): mortal {}, Postfix {}.",
                    cost(plain.rate(&plain.mortal), milter.rate(&milter.mortal)),
                    cost(plain.rate(&plain.postfix), milter.rate(&milter.postfix))
                );
            }
        }
        let _ = writeln!(s, "\nmortal only:\n");
        let fmt_kib = |v: Option<u64>| v.map_or("n/a".to_owned(), |k| format!("{k} KiB"));
        let _ = writeln!(s, "- fsyncs per message: {}", self.fsyncs.map_or("n/a".into(), |f| format!("{f:.2}")));
        let _ = writeln!(
            s,
            "- smtpd child USS: idle {}, busy (max during burst) {}",
            fmt_kib(self.idle_uss_kib),
            fmt_kib(self.busy_uss_kib)
        );
        for (label, rate) in &self.lifetime {
            let _ = writeln!(s, "- churn with {label}: {rate:.0} msgs/s");
        }
        if let [(_, limited), (_, unlimited), rest @ ..] = self.lifetime.as_slice() {
            let _ = writeln!(s, "- lifetime-policy overhead on churn: {:.1}%", (1.0 - limited / unlimited) * 100.0);
            for (label, one) in rest {
                let _ = writeln!(
                    s,
                    "- {label} on churn: {:.0}% of unlimited (target {:.0}%)",
                    one / unlimited * 100.0,
                    MAX_USE_1_TARGET * 100.0
                );
            }
        }
        if self.ready.is_empty() {
            let _ = writeln!(s, "- fork+exec-to-READY latency: not measured (no metrics from the master)");
        }
        for r in &self.ready {
            let _ = writeln!(
                s,
                "- fork+exec-to-READY latency, {} on churn with max_use=100, {} ({}): {}",
                r.service,
                r.what,
                r.count,
                r.summary()
            );
        }
        for (policy, r) in &self.ready_quiet {
            let _ = writeln!(
                s,
                "- start-to-READY latency, {} with {policy}, {} ({}): {}",
                r.service,
                r.what,
                r.count,
                r.summary()
            );
        }
        if let Some(rev) = &self.baseline {
            let _ = writeln!(s, "\nThis build against the baseline {rev}, in the same rounds:\n");
            let _ = writeln!(
                s,
                "| mode | workload | this msgs/s | baseline msgs/s | change | this CPU s/1000 | baseline CPU s/1000 |"
            );
            let _ = writeln!(s, "|---|---|---:|---:|---:|---:|---:|");
            for r in self.rows.iter().filter(|r| !r.baseline.is_empty()) {
                let (a, c) = (r.rate(&r.mortal), r.rate(&r.baseline));
                let _ = writeln!(
                    s,
                    "| {} | {} | {a:.0} | {c:.0} | {:+.1}% | {:.2} | {:.2} |",
                    r.mode.name(),
                    r.workload.name,
                    (a / c - 1.0) * 100.0,
                    r.cpu_per_1000(&r.mortal),
                    r.cpu_per_1000(&r.baseline)
                );
            }
        }
        for n in &self.notes {
            let _ = writeln!(s, "- note: {n}");
        }
        let _ = writeln!(s, "\nBench time: {:.0} s.", self.elapsed.as_secs_f64());
        s
    }

    fn json(&self) -> serde_json::Value {
        let rows: Vec<_> = self
            .rows
            .iter()
            .map(|r| {
                json!({
                    "mode": r.mode.name(), "workload": r.workload.name, "messages": r.workload.messages,
                    "size": r.workload.size, "rcpts": r.workload.rcpts, "sessions": r.workload.sessions,
                    "mortal_msgs_per_s": r.rate(&r.mortal), "postfix_msgs_per_s": r.rate(&r.postfix),
                    "ratio": r.rate(&r.mortal) / r.rate(&r.postfix),
                    "mortal_cpu_s_per_1000": r.cpu_per_1000(&r.mortal),
                    "postfix_cpu_s_per_1000": r.cpu_per_1000(&r.postfix),
                    "mortal_secs": r.mortal.iter().map(|x| x.secs).collect::<Vec<_>>(),
                    "postfix_secs": r.postfix.iter().map(|x| x.secs).collect::<Vec<_>>(),
                    "baseline_msgs_per_s": (!r.baseline.is_empty()).then(|| r.rate(&r.baseline)),
                    "baseline_secs": r.baseline.iter().map(|x| x.secs).collect::<Vec<_>>(),
                    "peers": r.peers.iter().map(|(k, p)| (k.name().to_owned(), json!({
                        "msgs_per_s": r.rate(p), "mortal_ratio": r.rate(&r.mortal) / r.rate(p),
                        "cpu_s_per_1000": r.cpu_per_1000(p), "secs": p.iter().map(|x| x.secs).collect::<Vec<_>>(),
                    }))).collect::<serde_json::Map<_, _>>(),
                })
            })
            .collect();
        json!({
            "machine": self.machine, "rows": rows, "fsyncs_per_message": self.fsyncs,
            "smtpd_uss_kib": {"idle": self.idle_uss_kib, "busy": self.busy_uss_kib},
            "churn_lifetime": self.lifetime.iter().map(|(l, r)| json!({"policy": l, "msgs_per_s": r})).collect::<Vec<_>>(),
            "ready_latency": self.ready.iter().map(ReadyStat::json).collect::<Vec<_>>(),
            "ready_latency_quiet": self.ready_quiet.iter().map(|(policy, r)| {
                let mut stat = r.json();
                stat["policy"] = json!(policy);
                stat
            }).collect::<Vec<_>>(),
            "notes": self.notes, "elapsed_s": self.elapsed.as_secs_f64(), "baseline": self.baseline,
            "durable_create_files_per_s": self.durable_create,
            "latency_under_burst_ms": self.latency.as_ref().map(|(m, p)| {
                let q = |t: &[Duration]| json!({
                    "p50": quantile(t, 0.5).as_secs_f64() * 1000.0, "p99": quantile(t, 0.99).as_secs_f64() * 1000.0,
                    "messages": t.len(),
                });
                json!({"mortal": q(m), "postfix": q(p)})
            }),
        })
    }
}

/// One service's fork+exec-to-READY latency, in seconds.
#[derive(Debug, Clone, PartialEq)]
struct ReadyStat {
    service: &'static str,
    /// Which children: all, or those spawned under load.
    what: &'static str,
    /// Children that reported READY.
    count: u64,
    mean: f64,
    /// `(q, seconds)` for each of [`READY_QUANTILES`].
    quantiles: Vec<(f64, f64)>,
    /// How the quantiles were obtained.
    method: String,
}

impl ReadyStat {
    /// `p50 1.00 ms, p90 ..., mean ... (method)`, for the report.
    fn summary(&self) -> String {
        let ms = |v: f64| format!("{:.2} ms", v * 1000.0);
        let q: Vec<String> = self.quantiles.iter().map(|(q, v)| format!("p{:.0} {}", q * 100.0, ms(*v))).collect();
        format!("{}, mean {} ({})", q.join(", "), ms(self.mean), self.method)
    }

    fn json(&self) -> serde_json::Value {
        json!({
            "service": self.service, "children": self.what, "count": self.count, "mean_s": self.mean,
            "method": self.method,
            "quantiles_s": self.quantiles.iter().map(|(q, v)| (format!("p{:.0}", q * 100.0), json!(v)))
                .collect::<serde_json::Map<_, _>>(),
        })
    }
}

/// What the master's metrics file says about one service's READY
/// latency, summed over its endpoints.
#[derive(Debug, Clone, Default, PartialEq)]
struct ReadyHist {
    /// Cumulative `(upper bound in seconds, count)`, `+Inf` last.
    buckets: Vec<(f64, f64)>,
    count: f64,
    sum: f64,
    /// The master's exact quantiles of its latest children, and how many
    /// children they cover (one endpoint only: they cannot be summed).
    exact: Vec<(f64, f64)>,
    window: f64,
    endpoints: u32,
}

/// Waits until the master has rewritten its metrics file after `after`
/// (so every READY before `after` is in it), then reads it.
fn read_metrics(path: &Path, after: std::time::SystemTime) -> Result<String> {
    let deadline = Instant::now() + METRICS_WAIT;
    loop {
        let modified = fs::metadata(path).and_then(|m| m.modified());
        if modified.as_ref().is_ok_and(|m| *m > after) {
            break;
        }
        if Instant::now() > deadline {
            bail!("{} not rewritten within {METRICS_WAIT:?} ({modified:?})", path.display());
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    fs::read_to_string(path).with_context(|| format!("read {}", path.display()))
}

/// The READY latency of every [`READY_SERVICES`] entry: of all children
/// (`end`, exact when the master's window holds them all), and of those
/// spawned between the two readings (`end` minus `start`, from the
/// buckets), which leaves out the preforked pool started all at once.
fn ready_stats(start: &str, end: &str) -> Vec<ReadyStat> {
    let mut out = Vec::new();
    for service in READY_SERVICES {
        let (base, last) = (ready_hist(start, service), ready_hist(end, service));
        if let Some(all) = last.stat(service, "all children") {
            out.push(all);
        }
        if let Some(load) = last.minus(&base).stat(service, "spawned under load") {
            out.push(load);
        }
    }
    out
}

/// One sample line of the exposition format: name, labels, value.
type PromSample<'a> = (&'a str, Vec<(&'a str, &'a str)>, f64);

/// Splits one sample line; `None` for comments and other lines.
fn sample(line: &str) -> Option<PromSample<'_>> {
    if line.starts_with('#') {
        return None;
    }
    let (head, value) = line.rsplit_once(' ')?;
    let value = value.parse().ok()?;
    let (name, labels) = match head.split_once('{') {
        Some((name, rest)) => {
            // Label values here never hold `",` (endpoints are addresses
            // and paths), so splitting on it is exact.
            let body = rest.strip_suffix('}')?;
            let labels = body
                .split("\",")
                .filter(|kv| !kv.is_empty())
                .filter_map(|kv| {
                    let (k, v) = kv.split_once("=\"")?;
                    Some((k, v.strip_suffix('"').unwrap_or(v)))
                })
                .collect();
            (name, labels)
        }
        None => (head, Vec::new()),
    };
    Some((name, labels, value))
}

/// `service`'s `mortal_child_ready_*` samples from the metrics text.
fn ready_hist(text: &str, service: &str) -> ReadyHist {
    let mut h = ReadyHist::default();
    for (name, labels, value) in text.lines().filter_map(sample) {
        let label = |k: &str| labels.iter().find(|(n, _)| *n == k).map(|(_, v)| *v);
        if label("service") != Some(service) {
            continue;
        }
        match name {
            "mortal_child_ready_seconds_bucket" => {
                let Some(le) =
                    label("le").and_then(|le| if le == "+Inf" { Some(f64::INFINITY) } else { le.parse().ok() })
                else {
                    continue;
                };
                match h.buckets.iter_mut().find(|(b, _)| *b == le) {
                    Some((_, n)) => *n += value,
                    None => h.buckets.push((le, value)),
                }
            }
            "mortal_child_ready_seconds_count" => {
                h.count += value;
                h.endpoints += 1;
            }
            "mortal_child_ready_seconds_sum" => h.sum += value,
            "mortal_child_ready_recent_seconds" => {
                if let Some(q) = label("quantile").and_then(|q| q.parse().ok()) {
                    h.exact.push((q, value));
                }
            }
            "mortal_child_ready_recent_seconds_count" => h.window += value,
            _ => {}
        }
    }
    h.buckets.sort_by(|a, b| a.0.total_cmp(&b.0));
    h
}

impl ReadyHist {
    /// The children counted here but not in `base` (an earlier reading):
    /// buckets, count and sum subtract; exact quantiles do not.
    fn minus(&self, base: &ReadyHist) -> ReadyHist {
        let before = |le: f64| base.buckets.iter().find(|(b, _)| *b == le).map_or(0.0, |(_, n)| *n);
        ReadyHist {
            buckets: self.buckets.iter().map(|&(le, n)| (le, n - before(le))).collect(),
            count: self.count - base.count,
            sum: self.sum - base.sum,
            exact: Vec::new(),
            window: 0.0,
            endpoints: self.endpoints,
        }
    }

    /// Quantiles, exact when one endpoint's window holds every child
    /// counted, else estimated from the buckets; `None` without children.
    fn stat(&self, service: &'static str, what: &'static str) -> Option<ReadyStat> {
        if self.count < 1.0 {
            return None;
        }
        let exact = self.endpoints == 1 && self.window == self.count && self.exact.len() == READY_QUANTILES.len();
        let (quantiles, method) = if exact {
            (self.exact.clone(), "exact".to_owned())
        } else {
            let q = READY_QUANTILES.iter().map(|q| (*q, bucket_quantile(*q, &self.buckets))).collect();
            (q, "estimated from the histogram buckets".to_owned())
        };
        Some(ReadyStat { service, what, count: self.count as u64, mean: self.sum / self.count, quantiles, method })
    }
}

/// The `q` quantile from cumulative `(upper bound, count)` buckets,
/// interpolated linearly inside its bucket as Prometheus'
/// `histogram_quantile` does; in the `+Inf` bucket, the highest finite
/// bound (a lower bound of the truth).
fn bucket_quantile(q: f64, buckets: &[(f64, f64)]) -> f64 {
    let Some(&(_, total)) = buckets.last() else { return f64::NAN };
    let rank = q * total;
    let mut lower = (0.0, 0.0);
    for &(le, n) in buckets {
        if n >= rank {
            if le.is_infinite() {
                return lower.0;
            }
            let inside = n - lower.1;
            return if inside > 0.0 { lower.0 + (le - lower.0) * (rank - lower.1) / inside } else { le };
        }
        lower = (le, n);
    }
    lower.0
}

#[cfg(test)]
mod tests {
    /// Nearest-rank quantiles.
    #[test]
    fn quantiles_by_nearest_rank() {
        use std::time::Duration;
        let times: Vec<Duration> = (1..=100).map(Duration::from_millis).collect();
        assert_eq!(super::quantile(&times, 0.5), Duration::from_millis(50));
        assert_eq!(super::quantile(&times, 0.99), Duration::from_millis(99));
        assert_eq!(super::quantile(&times[..1], 0.99), Duration::from_millis(1));
        assert_eq!(super::quantile(&[], 0.5), Duration::ZERO);
    }

    /// Each committed file is counted and kept, under its own directory,
    /// until the run's [`DurableCreate`] goes.
    #[test]
    fn durable_create_counts_commits_and_keeps_them_until_the_run_ends() {
        let bench = tempfile::tempdir().unwrap();
        let mut durable = super::DurableCreate::new(bench.path());
        for _ in 0..2 {
            let rate = durable.measure_with(2, std::time::Duration::from_millis(200)).unwrap();
            assert!(rate > 0.0, "{rate}");
        }
        let dir = durable.dir.clone();
        for n in ["1", "2"] {
            assert!(std::fs::read_dir(dir.join(n)).unwrap().count() > 0, "the files of measure {n} are kept");
        }
        drop(durable);
        assert!(!dir.exists());
    }

    use super::*;

    const METRICS: &str = "\
# TYPE mortal_child_ready_seconds histogram
mortal_child_ready_seconds_bucket{service=\"smtpd\",endpoint=\"127.0.0.1:2525\",le=\"0.001\"} 0
mortal_child_ready_seconds_bucket{service=\"smtpd\",endpoint=\"127.0.0.1:2525\",le=\"0.002\"} 40
mortal_child_ready_seconds_bucket{service=\"smtpd\",endpoint=\"127.0.0.1:2525\",le=\"0.004\"} 90
mortal_child_ready_seconds_bucket{service=\"smtpd\",endpoint=\"127.0.0.1:2525\",le=\"+Inf\"} 100
mortal_child_ready_seconds_sum{service=\"smtpd\",endpoint=\"127.0.0.1:2525\"} 0.300000
mortal_child_ready_seconds_count{service=\"smtpd\",endpoint=\"127.0.0.1:2525\"} 100
mortal_child_ready_seconds_bucket{service=\"cleanup\",endpoint=\"/x/cleanup\",le=\"0.001\"} 1
mortal_child_ready_seconds_bucket{service=\"cleanup\",endpoint=\"/x/cleanup\",le=\"+Inf\"} 2
mortal_child_ready_seconds_sum{service=\"cleanup\",endpoint=\"/x/cleanup\"} 0.004
mortal_child_ready_seconds_count{service=\"cleanup\",endpoint=\"/x/cleanup\"} 2
# TYPE mortal_child_ready_recent_seconds summary
mortal_child_ready_recent_seconds{service=\"smtpd\",endpoint=\"127.0.0.1:2525\",quantile=\"0.5\"} 0.002100
mortal_child_ready_recent_seconds{service=\"smtpd\",endpoint=\"127.0.0.1:2525\",quantile=\"0.9\"} 0.003900
mortal_child_ready_recent_seconds{service=\"smtpd\",endpoint=\"127.0.0.1:2525\",quantile=\"0.99\"} 0.031000
mortal_child_ready_recent_seconds_count{service=\"smtpd\",endpoint=\"127.0.0.1:2525\"} 100
mortal_child_ready_recent_seconds{service=\"cleanup\",endpoint=\"/x/cleanup\",quantile=\"0.5\"} 0.000500
mortal_child_ready_recent_seconds{service=\"cleanup\",endpoint=\"/x/cleanup\",quantile=\"0.9\"} 0.003500
mortal_child_ready_recent_seconds{service=\"cleanup\",endpoint=\"/x/cleanup\",quantile=\"0.99\"} 0.003500
mortal_child_ready_recent_seconds_count{service=\"cleanup\",endpoint=\"/x/cleanup\"} 1
mortal_config_generation 0
";

    #[test]
    fn ready_quantiles_are_exact_when_the_window_holds_every_child() {
        let smtpd = ready_hist(METRICS, "smtpd").stat("smtpd", "all").unwrap();
        assert_eq!(smtpd.count, 100);
        assert!((smtpd.mean - 0.003).abs() < 1e-12);
        assert_eq!(smtpd.quantiles, vec![(0.5, 0.0021), (0.9, 0.0039), (0.99, 0.031)]);
        assert_eq!(smtpd.method, "exact");
        assert_eq!(ready_hist(METRICS, "queue").stat("queue", "all"), None);
    }

    #[test]
    fn ready_quantiles_fall_back_to_the_buckets() {
        // cleanup's window (1) lost a sample the histogram (2) has.
        let cleanup = ready_hist(METRICS, "cleanup").stat("cleanup", "all").unwrap();
        assert_eq!(cleanup.count, 2);
        assert!(cleanup.method.starts_with("estimated"), "{}", cleanup.method);
        assert_eq!(cleanup.quantiles[0], (0.5, 0.001));
        assert_eq!(cleanup.quantiles[1], (0.9, 0.001), "in +Inf: the last finite bound");
    }

    #[test]
    fn children_spawned_under_load_are_the_difference_of_two_readings() {
        let before =
            METRICS.replace("le=\"0.002\"} 40", "le=\"0.002\"} 20").replace("le=\"0.004\"} 90", "le=\"0.004\"} 20");
        let before = before.replace("le=\"+Inf\"} 100", "le=\"+Inf\"} 20").replace("0.300000", "0.040000");
        let before = before.replace(
            "_count{service=\"smtpd\",endpoint=\"127.0.0.1:2525\"} 100",
            "_count{service=\"smtpd\",endpoint=\"127.0.0.1:2525\"} 20",
        );
        let stats = ready_stats(&before, METRICS);
        let load = stats.iter().find(|s| s.service == "smtpd" && s.what == "spawned under load").unwrap();
        assert_eq!(load.count, 80);
        assert!((load.mean - 0.26 / 80.0).abs() < 1e-12, "{}", load.mean);
        assert!(load.method.starts_with("estimated"));
        // 20 in (1, 2] ms, 50 in (2, 4] ms, 10 above: the median is in (2, 4].
        assert!((load.quantiles[0].1 - 0.0028).abs() < 1e-12, "{:?}", load.quantiles);
        let all = stats.iter().find(|s| s.service == "smtpd" && s.what == "all children").unwrap();
        assert_eq!(all.count, 100);
        // cleanup: nothing new under load, so no line for it.
        assert!(!stats.iter().any(|s| s.service == "cleanup" && s.what == "spawned under load"));
    }

    #[test]
    fn bucket_quantile_interpolates_like_histogram_quantile() {
        let b = [(0.001, 0.0), (0.002, 40.0), (0.004, 90.0), (f64::INFINITY, 100.0)];
        assert!((bucket_quantile(0.5, &b) - 0.0024).abs() < 1e-12, "{}", bucket_quantile(0.5, &b));
        assert!((bucket_quantile(0.2, &b) - 0.0015).abs() < 1e-12);
        assert!((bucket_quantile(0.9, &b) - 0.004).abs() < 1e-12);
        assert_eq!(bucket_quantile(0.99, &b), 0.004);
        assert!(bucket_quantile(0.5, &[]).is_nan());
    }

    #[test]
    fn sample_lines_split_into_name_labels_value() {
        let (name, labels, v) = sample("a_b{x=\"1\",le=\"+Inf\"} 7").unwrap();
        assert_eq!((name, v), ("a_b", 7.0));
        assert_eq!(labels, vec![("x", "1"), ("le", "+Inf")]);
        assert_eq!(sample("up 1").unwrap().0, "up");
        assert_eq!(sample("# HELP up x"), None);
    }
}
