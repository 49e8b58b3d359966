//! Envelope address syntax, with and without SMTPUTF8.
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| mortal_proto::fuzz::address(data));
