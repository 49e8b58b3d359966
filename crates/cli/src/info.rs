//! info: `mortal version` and `mortal completions SHELL`.

use clap::CommandFactory;
use clap_complete::Shell;
use std::io::Write;
use std::process::ExitCode;

/// The version of this build and the formats it reads and writes, so an
/// operator can tell whether a spool from another build is readable.
pub fn version(out: &mut impl Write) -> anyhow::Result<ExitCode> {
    writeln!(out, "mortal {}", env!("CARGO_PKG_VERSION"))?;
    writeln!(out, "queue file format version {}", mortal_proto::queue_file::VERSION)?;
    Ok(ExitCode::SUCCESS)
}

/// Writes the completion script for `shell` (install paths in docs/install.md).
pub fn completions<C: CommandFactory>(shell: Shell, out: &mut impl Write) -> anyhow::Result<ExitCode> {
    clap_complete::generate(shell, &mut C::command(), "mortal", out);
    Ok(ExitCode::SUCCESS)
}
