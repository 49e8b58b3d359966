//! What a mail filter sends to the milter client: its OPTNEG answer and
//! its replies, modifications included.
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| mortal_proto::fuzz::milter_reply(data));
