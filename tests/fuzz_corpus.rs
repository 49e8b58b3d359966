//! Replays every committed fuzz input (`fuzz/corpus/<target>/*`) through
//! the same entry point the fuzz target calls, so each seed and each
//! crash found and fixed stays a regression test in the ordinary
//! `cargo test` run, without cargo-fuzz or a nightly compiler.

#[path = "../fuzz/src/lib.rs"]
mod mortal_fuzz;

use std::fs;
use std::path::{Path, PathBuf};

/// A fuzz entry point: arbitrary bytes in, a panic on a broken invariant.
type Entry = fn(&[u8]);

/// Each target of `fuzz/Cargo.toml` and the function it calls.
const TARGETS: &[(&str, Entry)] = &[
    ("smtp_command", mortal_fuzz::smtp_command),
    ("smtp_data", mortal_fuzz::smtp_data),
    ("smtp_bdat", mortal_fuzz::smtp_bdat),
    ("proxy_header", mortal_fuzz::proxy_header),
    ("smtp_session", mortal_fuzz::smtp_session),
    ("ipc_decoder", mortal_proto::fuzz::ipc_stream),
    ("delivery", mortal_proto::fuzz::delivery_stream),
    ("policy_reply", mortal_proto::fuzz::policy_reply),
    ("queue_file", mortal_proto::fuzz::queue_file),
    ("address", mortal_proto::fuzz::address),
    ("config", mortal_proto::fuzz::config),
    ("milter_reply", mortal_proto::fuzz::milter_reply),
    ("table", mortal_proto::fuzz::table),
    ("socketmap_reply", mortal_proto::fuzz::socketmap_reply),
    ("dovecot_auth_reply", mortal_proto::fuzz::dovecot_auth_reply),
];

fn corpus(target: &str) -> Vec<PathBuf> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz/corpus").join(target);
    let mut files: Vec<PathBuf> = fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e} (seed corpora are committed; `cargo xtask fuzz seed`)", dir.display()))
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.is_file() && !p.file_name().is_some_and(|n| n.to_string_lossy().starts_with('.')))
        .collect();
    files.sort();
    files
}

#[test]
fn every_committed_input_runs_clean_through_its_target() {
    for (target, run) in TARGETS {
        let files = corpus(target);
        assert!(!files.is_empty(), "fuzz/corpus/{target}/ has no inputs");
        for file in files {
            let data = fs::read(&file).expect("read corpus file");
            let outcome = std::panic::catch_unwind(|| run(&data));
            assert!(outcome.is_ok(), "{target}: {} panics", file.display());
        }
    }
}

#[test]
fn every_fuzz_target_is_replayed() {
    let manifest = fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz/Cargo.toml")).unwrap();
    for line in manifest.lines() {
        if let Some(name) = line.strip_prefix("name = \"").and_then(|n| n.strip_suffix('"')) {
            if name == "mortal-fuzz" || name == "mortal_fuzz" {
                continue;
            }
            assert!(TARGETS.iter().any(|(t, _)| *t == name), "fuzz target {name} has no corpus replay");
        }
    }
}
