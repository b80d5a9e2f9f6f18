//! A clone's network identity, derived from its fork family and clone id
//! (for the networking that comes later): a locally administered MAC and an
//! address in 10.200.0.0/16.

use std::net::Ipv4Addr;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CloneIdentity {
    pub clone_id: u64,
    pub mac: [u8; 6],
    pub ip: Ipv4Addr,
}

impl CloneIdentity {
    pub fn new(family: u64, clone_id: u64) -> Self {
        let f = (family & 0xff) as u8;
        let id = (clone_id & 0xffff) as u16;
        CloneIdentity {
            clone_id,
            // 0x02: locally administered, unicast.
            mac: [0x02, 0xfd, 0x00, f, (id >> 8) as u8, id as u8],
            ip: Ipv4Addr::new(10, 200, (id >> 8) as u8, (id & 0xff) as u8),
        }
    }

    /// The MAC in the low 48 bits, as `sf_clone` returns it.
    pub fn mac_u64(&self) -> u64 {
        self.mac.iter().fold(0u64, |acc, b| (acc << 8) | *b as u64)
    }

    pub fn mac_string(&self) -> String {
        self.mac
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect::<Vec<_>>()
            .join(":")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identities_are_distinct() {
        let a = CloneIdentity::new(1, 1);
        let b = CloneIdentity::new(1, 2);
        assert_ne!(a.mac, b.mac);
        assert_ne!(a.ip, b.ip);
        assert_eq!(a.mac_string(), "02:fd:00:01:00:01");
        assert_eq!(a.mac_u64(), 0x02fd_0001_0001);
        assert_eq!(CloneIdentity::new(1, 258).ip, Ipv4Addr::new(10, 200, 1, 2));
    }
}
