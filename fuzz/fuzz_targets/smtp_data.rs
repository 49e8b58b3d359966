//! smtpd DATA decoder: dot-unstuffing, the one terminator, split invariance.
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| mortal_fuzz::smtp_data(data));
