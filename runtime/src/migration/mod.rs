//! Moving a running VM to another host: the authenticated channel between hosts (also
//! used by remote control) and, on top of it, the live-migration protocol.

pub mod channel;

pub use channel::{ChannelError, PeerKey, SecureChannel};
