//! The queue → pipe service stream: the request decoder the pipe service
//! runs on the queue's bytes, and the result decoder the queue runs on the
//! service's answers.
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| mortal_proto::fuzz::pipe_stream(data));
