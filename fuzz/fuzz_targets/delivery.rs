//! The queue → delivery agent stream: the request decoder the lmtp, smtp
//! and pipe agents run on the queue's bytes, and the report decoder the
//! queue runs on the agents' answers.
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| mortal_proto::fuzz::delivery_stream(data));
