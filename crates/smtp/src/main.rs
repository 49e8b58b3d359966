//! mortal-smtp: the `smtp` delivery agent (Postfix's smtp(8)); see the
//! `mortal_smtp` library for the whole manual.
#![forbid(unsafe_code)]

fn main() -> std::process::ExitCode {
    mortal_smtp::run(mortal_libmaster::sandbox::Service::Smtp)
}
