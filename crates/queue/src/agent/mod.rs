//! The delivery agents the queue manager hands a batch of recipients to:
//! the local ones (Maildir, discard) run here, the others in their own
//! services under the master (`transport`: lmtp, smtp and pipe).

pub mod discard;
pub mod maildir;
pub mod transport;
