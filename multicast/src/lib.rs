//! Block distribution over IP multicast, after SnowFlock's mcdist.
//! (Protocol overview: written with the sender and receiver.)

pub mod frame;
pub mod group;
pub mod rate;
