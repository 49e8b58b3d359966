//! The smtpd → cleanup stream as cleanup reads it: decoder plus order rule.
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| mortal_proto::fuzz::ipc_stream(data));
