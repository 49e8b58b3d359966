//! smtpd BDAT chunk decoder: line rules across chunk boundaries, split invariance.
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| mortal_fuzz::smtp_bdat(data));
