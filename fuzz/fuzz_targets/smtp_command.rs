//! smtpd command phase: line splitting and the command parser.
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| mortal_fuzz::smtp_command(data));
