//! The Mortal Daemon lifetime policy (issue 3), end to end: the real master
//! and smtpd processes with limits of a second or two, observed through
//! `mortal status --json` (real pids, states, ages, drawn lifetimes,
//! retirement reasons) and the log.

use mortal_proto::service::Service;
use mortal_proto::status::{BoardState, RetireReason, StatusDoc};
use mortal_tests::lifetime::{children_of_service, retired, service, start_with_policy};
use mortal_tests::{Instance, Options, Smtp, WAIT, process_exists, wait_for};
use std::collections::{BTreeMap, BTreeSet};
use std::io::{Read, Write};
use std::net::TcpStream;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

/// How often the tests look at `mortal status`.
const POLL: Duration = Duration::from_millis(25);
/// The master's SIGTERM-to-SIGKILL grace (`term_grace`, left at its default).
const TERM_GRACE: Duration = mortal_proto::config::DEFAULT_TERM_GRACE;

fn pids(status: &StatusDoc, service: Service) -> BTreeSet<u64> {
    children_of_service(status, service).iter().map(|c| u64::from(c.pid)).collect()
}

fn ms(v: u64) -> Duration {
    Duration::from_millis(v)
}

/// `mortal status` with the instants just before and just after it ran:
/// the master took its snapshot somewhere in between.
fn timed_status(mortal: &Instance) -> (Instant, StatusDoc, Instant) {
    let before = Instant::now();
    let status = mortal.status();
    (before, status, Instant::now())
}

/// When a child left the scoreboard: after `alive` (a snapshot taken no
/// earlier still had it) and before `gone` (a snapshot taken no later did
/// not).
#[derive(Debug, Clone, Copy)]
struct Exit {
    alive: Instant,
    gone: Instant,
}

/// Polls `mortal status` until `want` pids of `watched` are gone (or
/// `WAIT` passes).
fn watch_exits(mortal: &Instance, watched: &BTreeSet<u64>, want: usize) -> BTreeMap<u64, Exit> {
    let mut last_alive: BTreeMap<u64, Instant> = BTreeMap::new();
    let mut exits = BTreeMap::new();
    let deadline = Instant::now() + WAIT;
    while exits.len() < want && Instant::now() < deadline {
        let (before, status, after) = timed_status(mortal);
        let alive = pids(&status, Service::Smtpd);
        for pid in watched {
            if alive.contains(pid) {
                last_alive.insert(*pid, before);
            } else if !exits.contains_key(pid) {
                let alive = last_alive.get(pid).copied().expect("watched pids were alive at first");
                exits.insert(*pid, Exit { alive, gone: after });
            }
        }
        std::thread::sleep(POLL);
    }
    exits
}

#[test]
fn max_idle_retires_idle_children_down_to_min_spare() {
    let max_idle = Duration::from_secs(1);
    let mortal = start_with_policy(
        Options {
            smtpd_process_limit: 6,
            smtpd_prefork: 4,
            smtpd_min_spare: 1,
            smtpd_max_spare: 4,
            ..Options::default()
        },
        "max_idle = \"1s\"\nmax_lifetime = \"0s\"",
        "info",
    );
    // The scoreboard lags the children by the records in flight.
    let (before, first, after) = wait_for("4 idle smtpd", || {
        let (before, status, after) = timed_status(&mortal);
        (service(&status, Service::Smtpd).children.idle == 4).then_some((before, status, after))
    })
    .expect("prefork 4");
    // When each child became idle, by the master's clock: between these.
    let idle_since: BTreeMap<u64, (Instant, Instant)> = children_of_service(&first, Service::Smtpd)
        .iter()
        .map(|c| (u64::from(c.pid), (before - ms(c.since_ms), after - ms(c.since_ms))))
        .collect();
    let watched = idle_since.keys().copied().collect();
    let gone = watch_exits(&mortal, &watched, 3);
    assert_eq!(gone.len(), 3, "3 of 4 idle children retire, min_spare keeps one: {gone:?}\n{}", mortal.log_text());
    for (pid, exit) in &gone {
        let (earliest, latest) = idle_since[pid];
        let (shortest, longest) = (exit.alive.saturating_duration_since(latest), exit.gone.duration_since(earliest));
        assert!(longest >= max_idle, "pid {pid} retired after at most {longest:?} idle");
        assert!(shortest <= max_idle + Duration::from_secs(1), "pid {pid} retired only after {shortest:?} idle");
    }
    // The survivor is min_spare: it stays, however long it idles. The
    // master's own clock says when it has idled past max_idle twice over.
    let survivor = *watched.iter().find(|p| !gone.contains_key(p)).unwrap();
    let now = wait_for("the survivor idle for 2 x max_idle", || {
        let status = mortal.status();
        let idle = children_of_service(&status, Service::Smtpd)
            .iter()
            .find(|c| u64::from(c.pid) == survivor)
            .is_some_and(|c| c.state == BoardState::Idle && ms(c.since_ms) >= max_idle * 2);
        idle.then_some(status)
    })
    .unwrap_or_else(|| panic!("survivor {survivor} did not stay idle: {:?}", mortal.status()));
    assert_eq!(retired(&now, Service::Smtpd, RetireReason::Idle), 3, "{now:?}");
}

#[test]
fn lifetimes_are_jittered_so_a_batch_never_dies_together() {
    // Eight children spawned together, max_lifetime 4 s, jitter 0.5: each
    // draws its life from [2 s, 4 s].
    let (max, min) = (Duration::from_secs(4), Duration::from_secs(2));
    let mortal = start_with_policy(
        Options {
            smtpd_process_limit: 20,
            smtpd_prefork: 8,
            smtpd_min_spare: 1,
            smtpd_max_spare: 8,
            ..Options::default()
        },
        "max_lifetime = \"4s\"\nlifetime_jitter = 0.5\nmax_idle = \"0s\"",
        "info",
    );
    let (before, first, after) = timed_status(&mortal);
    // Spawned between these instants, with this drawn life.
    let batch: BTreeMap<u64, (Instant, Instant, Duration)> = children_of_service(&first, Service::Smtpd)
        .iter()
        .map(|c| {
            let age = ms(c.age_ms);
            (u64::from(c.pid), (before - age, after - age, ms(c.lifetime_ms.expect("a drawn lifetime"))))
        })
        .collect();
    assert_eq!(batch.len(), 8, "{first:?}");
    for (pid, (_, _, life)) in &batch {
        assert!(*life >= min && *life <= max, "pid {pid} drew {life:?}");
    }
    let watched = batch.keys().copied().collect();
    let gone = watch_exits(&mortal, &watched, batch.len());
    assert_eq!(gone.len(), batch.len(), "{gone:?}\n{}", mortal.log_text());
    for (pid, exit) in &gone {
        let (earliest, latest, life) = batch[pid];
        let (youngest, oldest) = (exit.alive.saturating_duration_since(latest), exit.gone.duration_since(earliest));
        // Exits at its own drawn life: not before, and promptly after
        // (polling, reaping, a loaded machine).
        assert!(oldest >= life, "pid {pid} gone at {oldest:?} at most, life {life:?}");
        assert!(youngest <= life + Duration::from_millis(700), "pid {pid} gone only at {youngest:?}, life {life:?}");
    }
    // Spread over the window: eight uniform draws over 2 s all within
    // 0.5 s of each other has a probability of about 1e-3.
    let first_exit = gone.values().map(|e| e.gone).min().unwrap();
    let last_exit = gone.values().map(|e| e.alive).max().unwrap();
    assert!(last_exit.saturating_duration_since(first_exit) >= Duration::from_millis(500), "exits bunched: {gone:?}");
    assert!(retired(&mortal.status(), Service::Smtpd, RetireReason::Lifetime) >= 8);
}

#[test]
fn a_stalled_session_is_killed_at_its_deadline_and_the_child_replaced() {
    let deadline = Duration::from_secs(1);
    let mortal = start_with_policy(Options::default(), "session_deadline = \"1s\"\nmax_lifetime = \"0s\"", "info");
    let mut s = Smtp::connect(mortal.port).unwrap();
    let started = Instant::now();
    assert!(s.cmd("EHLO stall.test").unwrap().starts_with("250"));
    let pid = wait_for("a busy smtpd", || {
        children_of_service(&mortal.status(), Service::Smtpd)
            .iter()
            .find(|c| c.state == BoardState::Busy)
            .map(|c| u64::from(c.pid))
    })
    .expect("the stalled session's child is busy");
    // The client stalls; the server speaks once more, then hangs up.
    let reply = s.read_reply().expect("a reply before the connection closes");
    let waited = started.elapsed();
    assert_eq!(reply, "421 4.3.2 mortal.test Service shutting down\r\n");
    assert!(waited >= deadline - Duration::from_millis(50), "killed after {waited:?}");
    assert!(waited < deadline + TERM_GRACE, "smtpd obeys SIGTERM at once, not at the SIGKILL: {waited:?}");
    assert!(s.closed());
    assert!(wait_for("stalled child gone", || (!process_exists(pid as u32)).then_some(())).is_some());
    mortal.wait_for_log(&format!("pid {pid}: session deadline exceeded, killing"));
    // The scoreboard follows once the master has reaped it.
    let status = wait_for("stalled child off the scoreboard", || {
        let status = mortal.status();
        (!pids(&status, Service::Smtpd).contains(&pid)).then_some(status)
    })
    .expect("reaped");
    assert_eq!(retired(&status, Service::Smtpd, RetireReason::Deadline), 1, "{status:?}");
    let mut next = Smtp::connect(mortal.port).expect("a replacement serves the next client");
    assert!(next.greeting.starts_with("220 "));
    assert!(next.cmd("QUIT").unwrap().starts_with("221"));
}

#[test]
fn under_sustained_full_load_no_child_outlives_lifetime_plus_overdue_grace() {
    // Two children, both kept busy all the time by clients that never
    // end their sessions: only the overdue kill can recycle them.
    let (lifetime, grace) = (Duration::from_secs(2), Duration::from_secs(1));
    // Slack: the master's timer fires at the deadline itself (no tick),
    // smtpd exits on SIGTERM at once; what remains is reaping and
    // scheduling on a loaded 2-core machine.
    let slack = Duration::from_millis(500);
    let run_for = Duration::from_secs(7);
    let mortal = start_with_policy(
        Options {
            smtpd_process_limit: 2,
            smtpd_prefork: 2,
            smtpd_min_spare: 1,
            smtpd_max_spare: 2,
            ..Options::default()
        },
        "max_lifetime = \"2s\"\nlifetime_jitter = 0.0\noverdue_grace = \"1s\"\nsession_deadline = \"0s\"",
        "info",
    );
    let stop = Arc::new(AtomicBool::new(false));
    let port = mortal.port;
    let clients: Vec<_> = (0..2)
        .map(|_| {
            let stop = Arc::clone(&stop);
            std::thread::spawn(move || {
                let mut shut_down_421 = 0;
                let end = Instant::now() + run_for + WAIT;
                while !stop.load(Ordering::Relaxed) && Instant::now() < end {
                    let Ok(mut s) = Smtp::connect(port) else { continue };
                    if s.cmd("EHLO busy.test").is_err() {
                        continue;
                    }
                    // Hold the session: a NOOP every 100 ms, never QUIT.
                    while !stop.load(Ordering::Relaxed) && Instant::now() < end {
                        match s.cmd("NOOP") {
                            Ok(r) if r.starts_with("250") => std::thread::sleep(Duration::from_millis(100)),
                            Ok(r) => {
                                if r.starts_with("421 4.3.2 mortal.test Service shutting down") {
                                    shut_down_421 += 1;
                                }
                                break;
                            }
                            Err(_) => break,
                        }
                    }
                }
                shut_down_421
            })
        })
        .collect();
    let started = Instant::now();
    let mut oldest = Duration::ZERO;
    let mut saw_overdue = false;
    while started.elapsed() < run_for {
        let status = mortal.status();
        for c in children_of_service(&status, Service::Smtpd) {
            oldest = oldest.max(ms(c.age_ms));
            saw_overdue |= c.state == BoardState::Overdue;
        }
        std::thread::sleep(POLL);
    }
    stop.store(true, Ordering::Relaxed);
    let told: u32 = clients.into_iter().map(|c| c.join().unwrap()).sum();
    let status = mortal.status();
    assert!(oldest <= lifetime + grace + slack, "a child lived {oldest:?}\n{}", mortal.log_text());
    assert!(saw_overdue, "busy children past their lifetime show as overdue");
    assert!(retired(&status, Service::Smtpd, RetireReason::Overdue) >= 2, "{status:?}");
    assert!(told >= 1, "clients of killed children are told 421 where possible");
    assert!(mortal.log_text().contains(": still running 1s after its lifetime, killing"));
}

#[test]
fn reload_lets_sessions_in_flight_finish_with_250_and_refuses_nobody() {
    let mortal = start_with_policy(Options::default(), "max_lifetime = \"0s\"", "info");
    let port = mortal.port;
    // Three transactions in the middle of their DATA.
    let mut in_flight: Vec<Smtp> = (0..3)
        .map(|i| {
            let mut s = Smtp::connect(port).unwrap();
            assert!(s.cmd("EHLO reload.test").unwrap().starts_with("250"));
            assert!(s.cmd("MAIL FROM:<a@example.test>").unwrap().starts_with("250"));
            assert!(s.cmd(&format!("RCPT TO:<r{i}@example.test>")).unwrap().starts_with("250"));
            assert!(s.cmd("DATA").unwrap().starts_with("354"));
            s.send_raw(b"Subject: reload\r\n\r\nfirst half\r\n").unwrap();
            s
        })
        .collect();
    // New clients all through the reload.
    let stop = Arc::new(AtomicBool::new(false));
    let probes = Arc::new(AtomicUsize::new(0));
    let prober = {
        let (stop, probes) = (Arc::clone(&stop), Arc::clone(&probes));
        std::thread::spawn(move || {
            let (mut served, mut failures) = (0, Vec::new());
            while !stop.load(Ordering::Relaxed) && served + failures.len() < 500 {
                match Smtp::connect(port) {
                    Ok(mut s) if s.greeting.starts_with("220 ") => {
                        let _ = s.cmd("QUIT");
                        served += 1;
                        probes.fetch_add(1, Ordering::Relaxed);
                    }
                    Ok(s) => failures.push(s.greeting),
                    Err(e) => failures.push(e.to_string()),
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            (served, failures)
        })
    };
    // Probes served before the reload too.
    let before = wait_for("probes before the reload", || (probes.load(Ordering::Relaxed) >= 5).then_some(()));
    assert!(before.is_some(), "no probe served\n{}", mortal.log_text());
    let out = mortal.mortal(&["reload"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stdout).starts_with("mortal reloaded"));
    assert_eq!(mortal.status().master.generation, 1);
    // The new generation serves and probes reach it while the old one
    // still holds the sessions in flight.
    let at_reload = probes.load(Ordering::Relaxed);
    let new_serving = wait_for("the new generation serving probes", || {
        let status = mortal.status();
        let new = children_of_service(&status, Service::Smtpd).iter().any(|c| c.generation == 1);
        (new && probes.load(Ordering::Relaxed) >= at_reload + 5).then_some(())
    });
    assert!(new_serving.is_some(), "{:?}\n{}", mortal.status(), mortal.log_text());
    for (i, s) in in_flight.iter_mut().enumerate() {
        s.send_raw(b"second half\r\n.\r\n").unwrap();
        let reply = s.read_reply().unwrap();
        assert!(reply.starts_with("250 2.0.0 Ok: queued as "), "session {i}: {reply}");
        assert!(s.cmd("QUIT").unwrap().starts_with("221"));
    }
    stop.store(true, Ordering::Relaxed);
    let (served, failures) = prober.join().unwrap();
    assert!(failures.is_empty(), "refused during reload: {failures:?}");
    assert!(served >= 10, "only {served} probes");
    // The old generation leaves once its sessions are over.
    let gone = wait_for("old generation gone", || {
        let status = mortal.status();
        children_of_service(&status, Service::Smtpd).iter().all(|c| c.generation == 1).then_some(status)
    });
    let status = gone.expect("generation 0 children retired");
    assert!(retired(&status, Service::Smtpd, RetireReason::Reload) >= 3, "{status:?}");
    for i in 0..3 {
        mortal.wait_for_delivery(&format!("r{i}@example.test"), 1);
    }
}

fn control_socket(mortal: &Instance) -> PathBuf {
    mortal.spool().join("run/master.sock")
}

fn control(mortal: &Instance, request: &str) -> String {
    let mut sock = UnixStream::connect(control_socket(mortal)).expect("control socket");
    sock.set_read_timeout(Some(WAIT)).unwrap();
    sock.write_all(request.as_bytes()).unwrap();
    let mut reply = String::new();
    sock.read_to_string(&mut reply).unwrap();
    reply
}

#[test]
fn an_invalid_configuration_is_refused_on_reload_and_the_old_one_stays() {
    let mortal = start_with_policy(Options::default(), "max_lifetime = \"0s\"", "info");
    let good = std::fs::read_to_string(&mortal.config).unwrap();
    let bad = good.replacen("[process.smtpd]\n", "[process.smtpd]\nlifetime_jitter = 1.5\n", 1);
    std::fs::write(&mortal.config, &bad).unwrap();
    let line = bad.lines().position(|l| l.starts_with("lifetime_jitter")).unwrap() + 1;
    let error = format!("mortal.toml:{line}:1: process.smtpd.lifetime_jitter: must be at least 0 and below 1");
    // The CLI checks first ...
    let out = mortal.mortal(&["reload"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains(&error), "{}", String::from_utf8_lossy(&out.stderr));
    // ... and the master checks again, for a file changed behind the
    // CLI's back: on the control socket it says why ...
    let reply = control(&mortal, "reload\n");
    assert!(reply.starts_with("error: ") && reply.contains(&error), "{reply}");
    // ... and on SIGHUP it logs it.
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(mortal.master_pid() as i32), nix::sys::signal::Signal::SIGHUP)
        .unwrap();
    mortal.wait_for_log("warning: reload failed: keeping the current configuration");
    assert!(mortal.log_text().contains(&format!("warning: reload: {}", mortal.config.display())));
    // (`mortal status` checks the file too, so ask the socket directly.)
    let status: StatusDoc = serde_json::from_str(&control(&mortal, "status\n")).unwrap();
    assert_eq!(status.master.generation, 0, "{status:?}");
    let mut s = Smtp::connect(mortal.port).unwrap();
    assert!(s.cmd("EHLO still.test").unwrap().starts_with("250"));
    // Fixed, the reload goes through.
    std::fs::write(&mortal.config, &good).unwrap();
    assert_eq!(control(&mortal, "reload\n"), "ok\n");
    assert_eq!(mortal.status().master.generation, 1);
}

#[test]
fn clients_waiting_beyond_overload_wait_get_421_busy() {
    let overload_wait = Duration::from_secs(1);
    let mortal = start_with_policy(
        Options {
            smtpd_process_limit: 1,
            smtpd_prefork: 1,
            smtpd_min_spare: 1,
            smtpd_max_spare: 1,
            server_extra: "metrics_file = \"../mortal.prom\"".into(),
            ..Options::default()
        },
        "overload_wait = \"1s\"\nmax_lifetime = \"0s\"",
        "info",
    );
    let mut holder = Smtp::connect(mortal.port).unwrap();
    assert!(holder.cmd("EHLO holder.test").unwrap().starts_with("250"));
    let busy = wait_for("the only child busy", || {
        (service(&mortal.status(), Service::Smtpd).children.busy == 1).then_some(())
    });
    assert!(busy.is_some());
    let started = Instant::now();
    let mut waiting = TcpStream::connect(("127.0.0.1", mortal.port)).unwrap();
    waiting.set_read_timeout(Some(WAIT)).unwrap();
    let mut got = String::new();
    waiting.read_to_string(&mut got).unwrap();
    let waited = started.elapsed();
    assert_eq!(got, "421 4.3.2 mortal.test Service busy, try again later\r\n");
    assert!(waited >= overload_wait - Duration::from_millis(50), "answered after {waited:?}");
    assert!(waited <= overload_wait + Duration::from_millis(1500), "answered only after {waited:?}");
    mortal.wait_for_log(": every process busy for 1s: answering waiting clients 421 4.3.2 Service busy");
    assert_eq!(service(&mortal.status(), Service::Smtpd).overload_rejects, 1);
    // The Prometheus text file says so too, within its rewrite period.
    let endpoint = format!("service=\"smtpd\",endpoint=\"127.0.0.1:{}\"", mortal.port);
    let metrics = wait_for("metrics file with the 421", || {
        let text = std::fs::read_to_string(mortal.dir.join("mortal.prom")).ok()?;
        text.contains(&format!("mortal_overload_rejects_total{{{endpoint}}} 1\n")).then_some(text)
    })
    .expect("metrics_file rewritten");
    assert!(metrics.contains(&format!("mortal_children{{{endpoint},state=\"busy\"}} 1\n")), "{metrics}");
    assert!(metrics.contains(&format!("mortal_spawns_total{{{endpoint}}} 1\n")), "{metrics}");
    assert!(metrics.contains("# TYPE mortal_retirements_total counter\n"), "{metrics}");
    // The busy child was never disturbed, and once free it serves again.
    assert!(holder.cmd("NOOP").unwrap().starts_with("250"));
    assert!(holder.cmd("QUIT").unwrap().starts_with("221"));
    let next = Smtp::connect(mortal.port).unwrap();
    assert!(next.greeting.starts_with("220 "));
}

#[test]
fn control_socket_is_private_to_root_and_the_masters_user() {
    let mortal = start_with_policy(Options::default(), "", "info");
    let path = control_socket(&mortal);
    let meta = std::fs::metadata(&path).unwrap();
    assert_eq!(meta.permissions().mode() & 0o777, 0o600);
    assert_eq!(meta.uid(), nix::unistd::geteuid().as_raw());
    assert!(control(&mortal, "status\n").starts_with('{'));
    assert!(control(&mortal, "shutdown now\n").starts_with("error: unknown request"));
}

/// Even with the file opened up, SO_PEERCRED keeps other users out: the
/// master closes on them before reading a byte. Only root can be another
/// user here; unprivileged, the mode is what protects (above).
#[test]
#[ignore = "needs root (another uid); cargo xtask ci runs the root_ tests as root"]
fn root_control_socket_refuses_other_users_even_when_opened_up() {
    let mortal = start_with_policy(Options::default(), "", "info");
    let path = control_socket(&mortal);
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o666)).unwrap();
    let reply = mortal_tests::python(&format!(
        r#"
import os, socket
os.setgid(65534); os.setuid(65534)
s = socket.socket(socket.AF_UNIX)
s.settimeout(10)
s.connect({path:?})
try:
    s.sendall(b"status\n")
    print(repr(s.recv(100)))
except OSError as e:
    print("closed", e)
"#,
        path = path.display().to_string()
    ));
    assert!(reply.trim() == "b''" || reply.starts_with("closed"), "{reply}");
    mortal.wait_for_log("warning: control socket: refused uid 65534");
}

/// Context switches of `pid` so far (each wake-up from a wait is one).
fn context_switches(pid: u64) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let field = |name: &str| -> Option<u64> { status.lines().find_map(|l| l.strip_prefix(name))?.trim().parse().ok() };
    Some(field("voluntary_ctxt_switches:")? + field("nonvoluntary_ctxt_switches:")?)
}

#[test]
fn one_connection_wakes_one_idle_child() {
    // Eight idle children wait on one listener; connections come one
    // after the other, each once the whole pool is idle again. A busy
    // child takes its listener out of its epoll set, so the idle ones are
    // woken in turn (the kernel's exclusive waiters are a queue) and every
    // child serves some. Two measures:
    //
    // - the kernel's: every wake-up of a process is a context switch, even
    //   one after which epoll finds the listener empty again and goes back
    //   to sleep unseen. For each connection, the children that served
    //   neither it nor the one before (whose server may still be going to
    //   sleep when the pool reads idle) should not have woken at all: with
    //   EPOLLEXCLUSIVE the kernel wakes one waiting child per connection.
    //   Bound: CONNECTIONS / 10 for all of them together. Without it every
    //   bystander wakes for every connection (6 x 200 = 1,200 wake-ups).
    // - the children's own: wake-ups that reached user space and found
    //   nothing to accept (logged at exit, `spurious_wakeups=`). Same bound.
    //   A busy child left in the set used to collect the event of a
    //   connection another child was woken for, and raced it afterwards.
    const CONNECTIONS: u64 = 200;
    const POOL: usize = 8;
    let mut mortal = start_with_policy(
        // min_spare 1, max_spare 8, no max_use: the pool stays exactly
        // these eight.
        Options {
            smtpd_process_limit: 12,
            smtpd_prefork: POOL as u32,
            smtpd_min_spare: 1,
            smtpd_max_spare: POOL as u32,
            smtpd_max_use: 0,
            ..Options::default()
        },
        "max_lifetime = \"0s\"\nmax_idle = \"0s\"",
        "info,mortal_libmaster::child=debug",
    );
    // The pool, all idle, having served `sessions` in all: each child's
    // sessions and context switches. The session count is the positive
    // event: the master may read the pool idle before the notice that a
    // child went busy for the last connection has reached it.
    let snapshot = |mortal: &Instance, sessions: u64| -> BTreeMap<u64, (u64, u64)> {
        wait_for("8 idle smtpd", || {
            let status = mortal.status();
            (service(&status, Service::Smtpd).children.idle >= POOL as u64).then_some(())?;
            let children = children_of_service(&status, Service::Smtpd);
            (children.iter().map(|c| u64::from(c.sessions)).sum::<u64>() >= sessions).then_some(())?;
            Some(
                children
                    .iter()
                    .map(|c| {
                        let pid = u64::from(c.pid);
                        (pid, (u64::from(c.sessions), context_switches(pid).expect("/proc/<pid>/status")))
                    })
                    .collect(),
            )
        })
        .expect("the pool idle again")
    };
    let first = snapshot(&mortal, 0);
    assert_eq!(first.len(), POOL, "{first:?}");
    let (mut before, mut previous_server, mut woken) = (first.clone(), None::<u64>, 0u64);
    let served_before: u64 = first.values().map(|(sessions, _)| sessions).sum();
    for i in 0..CONNECTIONS {
        let mut s = Smtp::connect(mortal.port).unwrap_or_else(|e| panic!("connection {i}: {e}"));
        assert!(s.cmd("QUIT").unwrap().starts_with("221"));
        drop(s);
        let after = snapshot(&mortal, served_before + i + 1);
        assert_eq!(before.keys().collect::<Vec<_>>(), after.keys().collect::<Vec<_>>(), "the pool stayed the same");
        let servers: Vec<u64> = after.keys().copied().filter(|pid| after[pid].0 != before[pid].0).collect();
        assert_eq!(servers.len(), 1, "connection {i} was served by one child: {before:?} -> {after:?}");
        woken += after
            .keys()
            .filter(|pid| **pid != servers[0] && Some(**pid) != previous_server)
            .map(|pid| after[pid].1 - before[pid].1)
            .sum::<u64>();
        previous_server = Some(servers[0]);
        before = after;
    }
    let served = first.keys().filter(|pid| before[pid].0 > first[pid].0).count();
    eprintln!("{served} of {POOL} children served; bystanders woke {woken} times for {CONNECTIONS} connections");
    assert!(woken <= CONNECTIONS / 10, "idle bystanders woke {woken} times");

    assert!(mortal.stop(WAIT), "master stops");
    let log = mortal.log_text();
    let (mut sessions, mut spurious) = (0u64, 0u64);
    for line in log.lines().filter(|l| l.contains("/smtpd[") && l.contains(" spurious_wakeups=")) {
        let field = |name: &str| -> u64 {
            let start = line.find(name).unwrap() + name.len();
            line[start..].split(|c: char| !c.is_ascii_digit()).next().unwrap().parse().unwrap()
        };
        sessions += field(" sessions=");
        spurious += field(" spurious_wakeups=");
    }
    // The start-up probe was one more session.
    assert!(sessions > CONNECTIONS, "exit lines count {sessions} sessions\n{log}");
    eprintln!("{sessions} sessions, {spurious} spurious wake-ups");
    assert!(spurious <= CONNECTIONS / 10, "{spurious} wake-ups found nothing to accept");
}

/// Issue 11: the single-process services are mortal too. The queue
/// manager and anvil live `[process.queue]` / `[process.anvil]`
/// `max_lifetime` (drawn, shown by `mortal status`), are retired at its
/// end and replaced once gone (never two queue managers at once), and the
/// mail system keeps delivering across the replacement.
#[test]
fn queue_and_anvil_have_a_lifetime_and_are_replaced() {
    let opts = Options {
        extra: "[process.queue]\nmax_lifetime = \"2s\"\nlifetime_jitter = 0.0\n[process.anvil]\nmax_lifetime = \"2s\"\nlifetime_jitter = 0.0\n".into(),
        ..Options::default()
    };
    let mortal = Instance::start_with(opts);
    let status = mortal.status();
    for service in [Service::Queue, Service::Anvil] {
        let children = children_of_service(&status, service);
        assert_eq!(children.len(), 1, "{status:?}");
        assert_eq!(children[0].lifetime_ms.map(ms), Some(Duration::from_secs(2)), "{status:?}");
    }
    let first = (pids(&status, Service::Queue), pids(&status, Service::Anvil));
    let replaced = wait_for("queue and anvil replaced for their lifetime", || {
        let now = mortal.status();
        let done = retired(&now, Service::Queue, RetireReason::Lifetime) >= 1
            && retired(&now, Service::Anvil, RetireReason::Lifetime) >= 1;
        let (queue, anvil) = (pids(&now, Service::Queue), pids(&now, Service::Anvil));
        let fresh = queue.len() == 1 && anvil.len() == 1;
        (done && fresh && queue != first.0 && anvil != first.1).then_some(now)
    });
    let now = replaced.unwrap_or_else(|| panic!("not replaced\n{:?}\n{}", mortal.status(), mortal.log_text()));
    assert_eq!(retired(&now, Service::Queue, RetireReason::Crash), 0, "{now:?}");
    let mut s = Smtp::connect(mortal.port).unwrap();
    let reply = s.mail("a@example.test", "life@example.test", "replaced");
    assert!(reply.starts_with("250"), "{reply}");
    mortal.wait_for_delivery("life@example.test", 1);
}

/// The parent pid of `pid`, from /proc.
fn parent(pid: u64) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    stat.rsplit(')').next()?.split_whitespace().nth(1)?.parse().ok()
}

/// The zygote pids the master logged (`<service>: zygote pid N`, debug).
fn zygotes(mortal: &Instance, service: Service) -> Vec<u64> {
    let needle = format!("{}: zygote pid ", service.name());
    mortal
        .log_text()
        .lines()
        .filter_map(|l| l.split_once(&needle).and_then(|(_, pid)| pid.trim().parse().ok()))
        .collect()
}

/// `spawn = "fork"` (smtpd and cleanup, a fresh process per session and
/// per message): the children come from a zygote but are the master's own
/// (it supervises, counts and reaps them), each serves one session and
/// logs under its own pid; mail is delivered. A zygote killed under the
/// master is noticed at the next spawn, children are exec'd meanwhile,
/// and nothing is refused.
#[test]
fn spawn_fork_children_are_the_masters_and_a_dead_zygote_falls_back_to_exec() {
    let mortal = Instance::start_edited(Options { smtpd_max_use: 1, ..Options::default() }, |text| {
        let text = text.replacen("[process.smtpd]\n", "[process.smtpd]\nspawn = \"fork\"\n", 1);
        let text = text.replacen("[process.cleanup]\n", "[process.cleanup]\nspawn = \"fork\"\n", 1);
        text.replacen("level = \"info\"\n", "level = \"debug\"\n", 1)
    });
    let master = u64::from(mortal.master_pid());
    let zygote = wait_for("the smtpd zygote logged", || zygotes(&mortal, Service::Smtpd).first().copied())
        .unwrap_or_else(|| panic!("no zygote\n{}", mortal.log_text()));
    assert_eq!(parent(zygote), Some(master), "the zygote is the master's child");
    for i in 0..5 {
        let mut s = Smtp::connect(mortal.port).unwrap();
        let reply = s.mail("a@example.test", "fork@example.test", &format!("message {i}"));
        assert!(reply.starts_with("250"), "{reply}");
    }
    mortal.wait_for_delivery("fork@example.test", 5);
    let status = mortal.status();
    let children = pids(&status, Service::Smtpd);
    assert!(!children.is_empty(), "{status:?}");
    for pid in &children {
        assert_ne!(*pid, zygote, "the zygote is not on the scoreboard");
        assert_eq!(parent(*pid), Some(master), "smtpd {pid} is the master's child, not the zygote's");
    }
    // max_use = 1: five sessions, five smtpd processes that served, each
    // logging under its own pid (the log's pid is refreshed in each fork).
    let served = mortal.session_pids("smtpd");
    assert!(served.len() >= 5, "{served:?}\n{}", mortal.log_text());
    assert!(!served.contains(&(zygote as u32)), "the zygote never serves: {served:?}");
    assert_eq!(retired(&status, Service::Smtpd, RetireReason::Crash), 0, "{status:?}");
    let cleanup_zygote = *zygotes(&mortal, Service::Cleanup).first().expect("cleanup forks too");
    // A zygote enters its children's sandbox before it forks: seccomp in
    // filter mode, no_new_privs and (as root) the mail user's identity.
    // smtpd's children stack one filter more than their zygote (the tail
    // that takes back the zygote's fork and its own start-up calls);
    // cleanup's deny-list lets a process be created, so its children hold
    // exactly their zygote's filters.
    let field_of = |pid: u64, name: &str| {
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
        status.lines().find_map(|l| l.strip_prefix(name)).map(str::trim).unwrap_or_default().to_owned()
    };
    let filters = |pid: u64| field_of(pid, "Seccomp_filters:").parse::<u32>().unwrap();
    let root = nix::unistd::geteuid().is_root();
    let nobody = nix::unistd::User::from_name("nobody").unwrap().expect("user nobody").uid.as_raw();
    for zygote in [zygote, cleanup_zygote] {
        assert_eq!(field_of(zygote, "Seccomp:"), "2", "zygote {zygote}");
        assert_eq!(field_of(zygote, "NoNewPrivs:"), "1", "zygote {zygote}");
        if root {
            let uids: Vec<u32> = field_of(zygote, "Uid:").split_whitespace().map(|u| u.parse().unwrap()).collect();
            assert_eq!(uids, vec![nobody; 4], "zygote {zygote} runs as the mail user");
        }
    }
    for pid in pids(&status, Service::Cleanup) {
        assert_eq!(field_of(pid, "Seccomp:"), "2", "cleanup {pid}");
        assert_eq!(parent(pid), Some(master), "cleanup {pid}");
        assert_eq!(filters(pid), filters(cleanup_zygote), "cleanup {pid}");
    }
    let child = *children.iter().next().expect("an smtpd child");
    assert_eq!(filters(child), filters(zygote) + 1, "smtpd {child} sealed its sandbox");
    let proc_status = std::fs::read_to_string(format!("/proc/{child}/status")).unwrap();
    let field = |name: &str| {
        proc_status.lines().find_map(|l| l.strip_prefix(name)).map(str::trim).unwrap_or_default().to_owned()
    };
    assert_eq!(field("Seccomp:"), "2", "{proc_status}");
    // No child holds the zygote's request socket (its fd 1): the fork
    // replaced it with the child's own status socket.
    let socket_of = |pid: u64, fd: &str| std::fs::read_link(format!("/proc/{pid}/fd/{fd}")).ok();
    let request = socket_of(zygote, "1").expect("the zygote's fd 1");
    for pid in &children {
        let held: Vec<_> = std::fs::read_dir(format!("/proc/{pid}/fd"))
            .unwrap()
            .flatten()
            .filter_map(|e| std::fs::read_link(e.path()).ok())
            .collect();
        assert!(!held.contains(&request), "smtpd {pid} holds the zygote's {request:?}: {held:?}");
        assert_ne!(socket_of(*pid, "1"), Some(request.clone()));
    }
    assert_eq!(field("NoNewPrivs:"), "1", "{proc_status}");
    if root {
        let uids: Vec<u32> = field("Uid:").split_whitespace().map(|u| u.parse().unwrap()).collect();
        assert_eq!(uids, vec![nobody; 4], "{proc_status}");
    }

    // Killed under the master: the next spawn notices, falls back to exec.
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(zygote as i32), nix::sys::signal::Signal::SIGKILL).unwrap();
    for i in 0..3 {
        let mut s = Smtp::connect(mortal.port).unwrap();
        let reply = s.mail("a@example.test", "fork@example.test", &format!("after {i}"));
        assert!(reply.starts_with("250"), "{reply}");
    }
    mortal.wait_for_log(&format!("warning: service \"smtpd\": zygote pid {zygote}: "));
    mortal.wait_for_delivery("fork@example.test", 8);
    assert!(!process_exists(zygote as u32), "the dead zygote was reaped");

    // A reload retires cleanup's zygote (its children would read the old
    // configuration); the next cleanup comes from a new one, and the old
    // one has exited.
    let old = zygotes(&mortal, Service::Cleanup);
    let reply = control(&mortal, "reload\n");
    assert!(reply.starts_with("ok"), "{reply}");
    let mut s = Smtp::connect(mortal.port).unwrap();
    let reply = s.mail("a@example.test", "fork@example.test", "after reload");
    assert!(reply.starts_with("250"), "{reply}");
    let now = wait_for("a new cleanup zygote after the reload", || {
        let now = zygotes(&mortal, Service::Cleanup);
        (now.len() > old.len()).then_some(now)
    })
    .unwrap_or_else(|| panic!("no new zygote\n{}", mortal.log_text()));
    mortal.wait_for_delivery("fork@example.test", 9);
    let first = old[0];
    assert!(wait_for("the old cleanup zygote gone", || (!process_exists(first as u32)).then_some(())).is_some());
    assert_ne!(now.last(), Some(&first));
}
