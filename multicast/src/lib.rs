//! Block distribution over IP multicast, after SnowFlock's mcdist.
//!
//! A [`Sender`] serves numbered *blocks* (index → bytes, e.g. 4 KiB pages)
//! from a [`BlockSource`]; any number of [`Receiver`]s join the session's
//! group, ask for blocks, and get every block that crosses the group —
//! their own and the ones other receivers asked for (that is the point: one
//! request pre-fetches the block for everyone). The crate knows nothing of
//! what the blocks are.
//!
//! ```text
//!  receiver ──request(blocks, rate)──▶ sender (unicast socket)
//!  receiver ◀──data(block fragments)── sender → group:port (multicast)
//!                                            or → requester (end game)
//! ```
//!
//! # Frames
//! One frame per datagram, sized to the path MTU (default 1500: 28 bytes IP
//! and UDP, a 28-byte header, the payload, a 16-byte MAC — 1428 payload
//! bytes, 1408 bytes of block per data frame, so a 4 KiB block takes three
//! frames). The header holds magic, version, kind, the 64-bit session id,
//! a random origin id and that origin's sequence number; the MAC is the
//! BLAKE3 keyed hash (the session key) of header and payload, truncated to
//! 16 bytes and compared in constant time. Frames of another session,
//! frames with a bad MAC, and replayed frames (a sequence number seen
//! before or older than a 4096-number window: deeper than a socket
//! buffer, as one origin's frames reach a receiver by two sockets, group
//! and unicast) are rejected and counted on
//! both sides, and never delivered. See [`frame`] for the layout.
//!
//! # Loss: re-requests
//! The protocol is unreliable by design: a data frame is sent once. A
//! receiver that asked for a block and has not got it within
//! `retry_timeout` asks again (flagged as a retry), doubling the timeout
//! up to `max_retry_timeout`, and gives up after `max_attempts`
//! ([`Event::GaveUp`]). Only the requester re-asks; everyone else keeps
//! whatever arrives.
//!
//! # Lockstep suppression
//! Receivers that run the same code ask for the same blocks at about the
//! same time. The sender answers a block once: a request for a block that
//! is queued, being sent, or was multicast less than `lockstep_window` ago
//! is dropped (`lockstep_suppressed`); the one multicast answers all. A
//! first request (not a retry) is dropped for longer, `first_request_window`:
//! every receiver keeps what arrives, so a first request for a block just
//! multicast crossed it on the way; if that receiver really lost it, its
//! retry (after `retry_timeout`) is answered.
//!
//! # Flow control
//! Each receiver measures its receive rate (bytes of valid data frames per
//! second, over intervals in which it was waiting for blocks) and, while it
//! is losing frames (it re-asked for a block within the last second), puts
//! it in every request; a receiver that keeps up reports nothing, so it
//! never holds the sender to the rate it happens to be sent at. The sender smooths each receiver's reports and paces
//! with a token bucket at `growth ×` their freshness-weighted average,
//! within `[min_rate, max_rate]` (see [`rate`]).
//!
//! # End game
//! When most recently requested blocks are retries (at least
//! `retry_fraction` of the last `window`), the few receivers still missing
//! blocks are the ones losing frames: the sender answers retries by
//! unicast to the requester, sparing everyone else; fresh requests still
//! go to the group. It switches back when retries fall below the fraction.
//!
//! # Push
//! [`Sender::push`] queues blocks to stream to the group before anyone
//! asks; requested blocks always go first, and a pushed block the group
//! has had already (multicast on request, remembered up to
//! `max_lockstep` blocks) is skipped: a receiver that lost it asks.
//!
//! # Bounds
//! Every queue and table has a cap (requests queued, pushes, lockstep
//! memory, replay windows, outstanding and partial blocks); every thread
//! loop does bounded work per round and waits at most a few tens of
//! milliseconds; dropping a [`Sender`] or [`Receiver`] stops its thread.

pub mod frame;
pub mod group;
pub mod rate;
pub mod receiver;
pub mod sender;
mod stats;

pub use frame::{Session, SessionId, SessionKey};
pub use group::{interface_mtu, GroupConfig, GroupError};
pub use rate::RateConfig;
pub use receiver::{
    Block, Event, LossInjection, Receiver, ReceiverConfig, ReceiverError, ReceiverStats,
    RequestError,
};
pub use sender::{BlockSource, EndGame, PushError, Sender, SenderConfig, SenderError, SenderStats};
