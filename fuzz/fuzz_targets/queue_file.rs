//! A queue file as the queue manager reads it.
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| mortal_proto::fuzz::queue_file(data));
