//! Delivery status notification parameters (RFC 3461): the parsers live
//! in [`mortal_proto::dsn`] (cleanup parses a milter's arguments with the
//! same ones); this module adds the SMTP reply that refuses each.

use super::reply::Reply;
pub use mortal_proto::dsn::{DsnError, parse_envid, parse_notify, parse_orcpt, parse_ret};

/// The reply refusing a command whose DSN parameter is bad (all are
/// `501 5.5.4`).
pub trait DsnReply {
    fn reply(self) -> Reply;
}

impl DsnReply for DsnError {
    fn reply(self) -> Reply {
        match self {
            DsnError::BadRet => const { Reply::new(501, 5, 4, "Bad RET parameter syntax") },
            DsnError::BadEnvid => const { Reply::new(501, 5, 4, "Bad ENVID parameter syntax") },
            DsnError::BadNotify => const { Reply::new(501, 5, 4, "Error: Bad NOTIFY parameter syntax") },
            DsnError::BadOrcpt => const { Reply::new(501, 5, 4, "Error: Bad ORCPT parameter syntax") },
        }
    }
}
