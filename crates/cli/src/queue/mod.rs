//! `mortal queue`: what `mailq`, `postqueue`, `postcat` and `postsuper`
//! do for Postfix, one module per concern.

pub mod cmd;
pub mod fmt;
pub mod list;
pub mod perm;
pub mod relocate;
pub mod show;
pub mod spool;
