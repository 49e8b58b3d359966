//! A whole smtpd session (engine only) against an accepting cleanup.
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| mortal_fuzz::smtp_session(data));
