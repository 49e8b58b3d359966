//! The config loader: `mortal.toml` parsing and validation.
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| mortal_proto::fuzz::config(data));
