//! A policy server's replies (Postfix policy delegation), as smtpd will
//! read them.
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| mortal_proto::fuzz::policy_reply(data));
