//! PROXY protocol v1/v2 header parser (what a balancer, or anyone, sends first).
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| mortal_fuzz::proxy_header(data));
