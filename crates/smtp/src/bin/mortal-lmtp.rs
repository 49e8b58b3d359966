//! mortal-lmtp: the `lmtp` delivery agent (Postfix's lmtp(8)); the same
//! program as mortal-smtp under the other service name, so that each pool
//! has its own binary name in `ps`, its own sandbox and its own lifetime.
#![forbid(unsafe_code)]

fn main() -> std::process::ExitCode {
    mortal_smtp::run(mortal_libmaster::sandbox::Service::Lmtp)
}
