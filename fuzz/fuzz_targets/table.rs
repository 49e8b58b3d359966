//! Lookup-table files (texthash, cidr, regexp) as `mortal check` and the
//! daemons load them, and lookups in what they parse to.
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| mortal_proto::fuzz::table(data));
