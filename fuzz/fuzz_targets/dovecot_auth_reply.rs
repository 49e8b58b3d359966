//! What Dovecot's auth service sends smtpd (handshake and replies), as
//! smtpd's SASL client decodes it.
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| mortal_proto::fuzz::dovecot_auth_reply(data));
