//! Client updates driving the zones (`clients=host` guests): above `vmm`,
//! beside `fork` and `migrate`, used by `api`.
//!
//! - [`wire`]: the versioned datagram format (updates, acks, redirects,
//!   refusals, forwards);
//! - [`ring`]: the daemon's side of a guest's inbox ring and its tick load;
//! - [`ingress`]: the daemon's UDP ingress: routing, per-client order,
//!   bounded queues, ring writes (recorded for dirty tracking), acks;
//! - [`sender`]: the client library ([`ClientSender`]).

pub mod ingress;
pub mod ring;
pub mod sender;
pub mod wire;

#[cfg(test)]
mod loopback_tests;

pub use ingress::{
    Access, ClientCounters, Directory, Ingress, IngressConfig, Route, Routing, Target,
};
pub use ring::{GuestLoad, GuestView};
pub use sender::{ClientSender, SendError, SenderConfig, SenderStats};

/// The UDP port of the client ingress in a cluster (every host the same).
pub const DEFAULT_PORT: u16 = 7071;
