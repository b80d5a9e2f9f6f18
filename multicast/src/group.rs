//! Group membership and the crate's sockets (socket2).
//!
//! A receiver's group socket is bound to `group:port` (so it sees only that
//! group's datagrams, never unicast to the port), with `SO_REUSEADDR` so
//! several receivers on one host can share the port, and joined on the
//! configured interface; dropping a [`GroupSocket`] leaves the group. The
//! sender's socket is a unicast socket (requests arrive there) with the
//! multicast interface, TTL and loop options set for the data it sends to
//! the group. [`wait_readable`] waits for one of a few sockets with
//! `poll(2)`, so one thread can serve a group socket and a unicast socket.

use std::io;
use std::net::{Ipv4Addr, SocketAddrV4, UdpSocket};
use std::os::fd::AsRawFd;
use std::time::Duration;

use socket2::{Domain, Protocol, SockAddr, Socket, Type};

/// Where a session's multicast traffic goes and how it leaves the host.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GroupConfig {
    /// The group address (224.0.0.0/4).
    pub group: Ipv4Addr,
    /// The UDP port data frames are sent to.
    pub port: u16,
    /// The local address of the interface to join and send on
    /// (`0.0.0.0`: the kernel's choice by route).
    pub interface: Ipv4Addr,
    /// The multicast TTL (1: the local link only).
    pub ttl: u32,
    /// Whether the sending host's own group members see its frames.
    pub loopback: bool,
    /// Socket receive buffer to ask for, bytes (0: the system default).
    pub recv_buffer: usize,
}

impl GroupConfig {
    /// A link-local-TTL group on the kernel's default interface, loop on.
    pub fn new(group: Ipv4Addr, port: u16) -> GroupConfig {
        GroupConfig {
            group,
            port,
            interface: Ipv4Addr::UNSPECIFIED,
            ttl: 1,
            loopback: true,
            recv_buffer: 32 << 20,
        }
    }

    /// The group's socket address.
    pub fn addr(&self) -> SocketAddrV4 {
        SocketAddrV4::new(self.group, self.port)
    }
}

/// Setting up a socket or a membership failed.
#[derive(Debug, thiserror::Error)]
pub enum GroupError {
    /// The address is not an IPv4 multicast group.
    #[error("{0} is not an IPv4 multicast group (224.0.0.0/4)")]
    NotAGroup(Ipv4Addr),
    /// Creating the socket failed.
    #[error("creating a UDP socket failed: {0}")]
    Socket(#[source] io::Error),
    /// Setting a socket option failed.
    #[error("setting {what} failed: {source}")]
    Option {
        /// The option.
        what: &'static str,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// Binding failed.
    #[error("binding {addr} failed: {source}")]
    Bind {
        /// The address.
        addr: SocketAddrV4,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// Joining the group failed (no multicast route or interface?).
    #[error("joining {group} on {interface} failed: {source}")]
    Join {
        /// The group.
        group: Ipv4Addr,
        /// The interface address.
        interface: Ipv4Addr,
        /// The OS error.
        #[source]
        source: io::Error,
    },
}

fn opt(what: &'static str) -> impl FnOnce(io::Error) -> GroupError {
    move |source| GroupError::Option { what, source }
}

fn udp() -> Result<Socket, GroupError> {
    Socket::new(Domain::IPV4, Type::DGRAM, Some(Protocol::UDP)).map_err(GroupError::Socket)
}

fn bind(s: &Socket, addr: SocketAddrV4) -> Result<(), GroupError> {
    s.bind(&SockAddr::from(addr))
        .map_err(|source| GroupError::Bind { addr, source })
}

fn buffers(s: &Socket, recv: usize) -> Result<(), GroupError> {
    if recv == 0 {
        return Ok(());
    }
    // Past net.core.rmem_max where allowed (CAP_NET_ADMIN: the daemons run
    // as root): a receiver that is not scheduled for a few ms must not
    // lose what arrives meanwhile. Otherwise the capped size.
    let n = libc::c_int::try_from(recv).unwrap_or(libc::c_int::MAX);
    // SAFETY: setsockopt on a socket this function borrows, with a pointer
    // to a c_int that lives across the call and its exact size.
    let forced = unsafe {
        libc::setsockopt(
            s.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVBUFFORCE,
            (&n as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    } == 0;
    if !forced {
        s.set_recv_buffer_size(recv).map_err(opt("SO_RCVBUF"))?;
    }
    Ok(())
}

/// A socket joined to a group; leaves the group when dropped.
#[derive(Debug)]
pub struct GroupSocket {
    socket: UdpSocket,
    group: Ipv4Addr,
    interface: Ipv4Addr,
}

impl GroupSocket {
    /// Binds `group:port` (shared with other receivers on the host) and
    /// joins the group on the configured interface.
    pub fn join(cfg: &GroupConfig) -> Result<GroupSocket, GroupError> {
        if !cfg.group.is_multicast() {
            return Err(GroupError::NotAGroup(cfg.group));
        }
        let s = udp()?;
        s.set_reuse_address(true).map_err(opt("SO_REUSEADDR"))?;
        buffers(&s, cfg.recv_buffer)?;
        bind(&s, cfg.addr())?;
        s.join_multicast_v4(&cfg.group, &cfg.interface)
            .map_err(|source| GroupError::Join {
                group: cfg.group,
                interface: cfg.interface,
                source,
            })?;
        Ok(GroupSocket {
            socket: s.into(),
            group: cfg.group,
            interface: cfg.interface,
        })
    }

    /// The joined socket.
    pub fn socket(&self) -> &UdpSocket {
        &self.socket
    }

    /// Leaves the group explicitly (also done on drop).
    pub fn leave(&self) -> Result<(), GroupError> {
        self.socket
            .leave_multicast_v4(&self.group, &self.interface)
            .map_err(opt("IP_DROP_MEMBERSHIP"))
    }
}

impl Drop for GroupSocket {
    fn drop(&mut self) {
        // Closing the socket drops the membership too; this is explicit.
        if let Err(e) = self.leave() {
            tracing::debug!(group = %self.group, error = %e, "leaving the group");
        }
    }
}

/// A unicast socket bound to `bind` that sends to `cfg`'s group with its
/// interface, TTL and loop options.
pub fn sender_socket(bind_addr: SocketAddrV4, cfg: &GroupConfig) -> Result<UdpSocket, GroupError> {
    if !cfg.group.is_multicast() {
        return Err(GroupError::NotAGroup(cfg.group));
    }
    let s = udp()?;
    buffers(&s, cfg.recv_buffer)?;
    s.set_multicast_if_v4(&cfg.interface)
        .map_err(opt("IP_MULTICAST_IF"))?;
    s.set_multicast_ttl_v4(cfg.ttl)
        .map_err(opt("IP_MULTICAST_TTL"))?;
    s.set_multicast_loop_v4(cfg.loopback)
        .map_err(opt("IP_MULTICAST_LOOP"))?;
    bind(&s, bind_addr)?;
    Ok(s.into())
}

/// A plain unicast socket bound to `bind` (a receiver's request socket).
pub fn unicast_socket(
    bind_addr: SocketAddrV4,
    recv_buffer: usize,
) -> Result<UdpSocket, GroupError> {
    let s = udp()?;
    buffers(&s, recv_buffer)?;
    bind(&s, bind_addr)?;
    Ok(s.into())
}

/// Waits up to `timeout` until one of `sockets` is readable; returns which.
/// An interrupted wait returns all false.
pub fn wait_readable<const N: usize>(
    sockets: [&UdpSocket; N],
    timeout: Duration,
) -> io::Result<[bool; N]> {
    let mut fds = sockets.map(|s| libc::pollfd {
        fd: s.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    });
    let ms = timeout.as_millis().min(i32::MAX as u128) as libc::c_int;
    // SAFETY: `fds` is a valid, writable array of N pollfd structs that
    // lives across the call, and N is passed as its length; the fds are
    // open (borrowed from live sockets).
    let n = unsafe { libc::poll(fds.as_mut_ptr(), N as libc::nfds_t, ms) };
    if n < 0 {
        let e = io::Error::last_os_error();
        if e.kind() == io::ErrorKind::Interrupted {
            return Ok([false; N]);
        }
        return Err(e);
    }
    Ok(fds.map(|f| f.revents & (libc::POLLIN | libc::POLLERR) != 0))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rejects_non_group() {
        let cfg = GroupConfig::new(Ipv4Addr::new(10, 0, 0, 1), 1);
        assert!(matches!(
            GroupSocket::join(&cfg),
            Err(GroupError::NotAGroup(_))
        ));
        assert!(matches!(
            sender_socket(SocketAddrV4::new(Ipv4Addr::LOCALHOST, 0), &cfg),
            Err(GroupError::NotAGroup(_))
        ));
    }

    #[test]
    fn wait_readable_times_out_and_sees_data() {
        let a = unicast_socket(SocketAddrV4::new(Ipv4Addr::LOCALHOST, 0), 0).expect("bind");
        let b = unicast_socket(SocketAddrV4::new(Ipv4Addr::LOCALHOST, 0), 0).expect("bind");
        let r = wait_readable([&a, &b], Duration::from_millis(10)).expect("poll");
        assert_eq!(r, [false, false]);
        a.send_to(b"x", b.local_addr().expect("addr"))
            .expect("send");
        let r = wait_readable([&a, &b], Duration::from_secs(2)).expect("poll");
        assert_eq!(r, [false, true]);
    }
}

/// The MTU of the interface that has local address `addr` (from
/// `getifaddrs(3)` and `/sys/class/net/NAME/mtu`), if there is one: what
/// frames sent from that address may fill (the path MTU on one link).
pub fn interface_mtu(addr: Ipv4Addr) -> Option<usize> {
    let name = interface_name(addr)?;
    let text = std::fs::read_to_string(format!("/sys/class/net/{name}/mtu")).ok()?;
    text.trim().parse().ok()
}

/// The name of the interface with local address `addr`.
fn interface_name(addr: Ipv4Addr) -> Option<String> {
    let mut list: *mut libc::ifaddrs = std::ptr::null_mut();
    // SAFETY: getifaddrs writes a pointer to a list it allocates into
    // `list`; on success we own it until freeifaddrs below.
    if unsafe { libc::getifaddrs(&mut list) } != 0 {
        return None;
    }
    let mut found = None;
    let mut cur = list;
    while !cur.is_null() {
        // SAFETY: `cur` is a node of the list getifaddrs returned, not yet
        // freed; its `ifa_addr` is null or points to a sockaddr whose
        // family says its type, and `ifa_name` to a NUL-terminated name.
        unsafe {
            let ifa = &*cur;
            if !ifa.ifa_addr.is_null() && i32::from((*ifa.ifa_addr).sa_family) == libc::AF_INET {
                let sin = &*(ifa.ifa_addr as *const libc::sockaddr_in);
                if Ipv4Addr::from(u32::from_be(sin.sin_addr.s_addr)) == addr {
                    found = std::ffi::CStr::from_ptr(ifa.ifa_name)
                        .to_str()
                        .ok()
                        .map(str::to_owned);
                    break;
                }
            }
            cur = ifa.ifa_next;
        }
    }
    // SAFETY: `list` came from a successful getifaddrs and is freed once.
    unsafe { libc::freeifaddrs(list) };
    // A name from the kernel, but it becomes a path: no separators.
    found.filter(|n| !n.is_empty() && !n.contains('/') && n != "." && n != "..")
}

#[cfg(test)]
mod mtu_tests {
    use super::*;

    #[test]
    fn loopback_has_an_mtu_and_strangers_none() {
        let lo = interface_mtu(Ipv4Addr::LOCALHOST).expect("lo has 127.0.0.1");
        assert!(lo >= 1280, "{lo}");
        assert_eq!(interface_mtu(Ipv4Addr::new(192, 0, 2, 77)), None);
    }
}
