//! The delivery agents the queue manager hands a batch of recipients to,
//! one module per route type, over the shared LMTP/SMTP client.

pub mod client;
pub mod discard;
pub mod lmtp;
pub mod maildir;
pub mod pipe;
pub mod smtp;
