//! A socketmap server's answers, as the socketmap table client decodes
//! them.
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| mortal_proto::fuzz::socketmap_reply(data));
