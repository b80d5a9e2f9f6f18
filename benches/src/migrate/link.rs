//! The link's bandwidth: one TCP stream, as fast as it goes, from h1's
//! network namespace to h2's address on the cluster's bridge (forkd's
//! migration path), and over loopback in this namespace (QEMU's path).
//! Threads enter a namespace with setns(2), which moves only the calling
//! thread; they end with the measurement.

use anyhow::{bail, Context, Result};
use std::io::{Read, Write};
use std::net::{IpAddr, SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::time::{Duration, Instant};

/// Bytes per measurement, and the bound on it.
const BYTES: u64 = 1 << 30;
const LIMIT: Duration = Duration::from_secs(10);

/// Moves this thread into the named network namespace (`/run/netns/NAME`).
fn enter(netns: &str) -> Result<()> {
    let f = std::fs::File::open(format!("/run/netns/{netns}"))
        .with_context(|| format!("network namespace {netns}"))?;
    // SAFETY: setns(2) on an open namespace file descriptor; it changes
    // only this thread's network namespace and touches no memory.
    if unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
        bail!("setns {netns}: {}", std::io::Error::last_os_error());
    }
    Ok(())
}

/// MiB/s of one TCP stream from `from` (a namespace, or this one) to
/// `to_ip` in `to` (likewise), measured at the receiver.
pub fn measure(from: Option<String>, to: Option<String>, to_ip: IpAddr) -> Result<f64> {
    let (tx, rx) = std::sync::mpsc::channel::<Result<u16>>();
    let receiver = std::thread::spawn(move || -> Result<f64> {
        let bound = (|| {
            if let Some(ns) = &to {
                enter(ns)?;
            }
            Ok(TcpListener::bind(SocketAddr::new(to_ip, 0))?)
        })();
        let l = match bound {
            Ok(l) => l,
            Err(e) => {
                let _ = tx.send(Err(anyhow::anyhow!("{e:#}")));
                return Err(e);
            }
        };
        let _ = tx.send(Ok(l.local_addr()?.port()));
        l.set_nonblocking(true)?;
        let t = Instant::now();
        let mut s = loop {
            match l.accept() {
                Ok((s, _)) => break s,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock && t.elapsed() < LIMIT => {
                    std::thread::sleep(Duration::from_millis(5))
                }
                Err(e) => bail!("accept: {e}"),
            }
        };
        s.set_nonblocking(false)?;
        s.set_read_timeout(Some(LIMIT))?;
        let mut buf = vec![0u8; 1 << 20];
        let mut got = 0u64;
        let mut t0 = None;
        loop {
            let n = s.read(&mut buf)?;
            if n == 0 {
                break;
            }
            t0.get_or_insert_with(Instant::now);
            got += n as u64;
        }
        let secs = t0.map(|t| t.elapsed().as_secs_f64()).unwrap_or(0.0);
        if secs <= 0.0 || got < BYTES / 2 {
            bail!("{got} bytes arrived");
        }
        Ok(got as f64 / 1048576.0 / secs)
    });
    let port = rx
        .recv_timeout(LIMIT)
        .context("the receiver did not start")??;
    let sender = std::thread::spawn(move || -> Result<()> {
        if let Some(ns) = &from {
            enter(ns)?;
        }
        let mut s = TcpStream::connect_timeout(&SocketAddr::new(to_ip, port), LIMIT)?;
        s.set_write_timeout(Some(LIMIT))?;
        let buf = vec![0x5au8; 1 << 20];
        let t = Instant::now();
        let mut sent = 0u64;
        while sent < BYTES && t.elapsed() < LIMIT {
            s.write_all(&buf)?;
            sent += buf.len() as u64;
        }
        Ok(())
    });
    let sent = sender
        .join()
        .map_err(|_| anyhow::anyhow!("the sender panicked"))?;
    let got = receiver
        .join()
        .map_err(|_| anyhow::anyhow!("the receiver panicked"))?;
    sent.context("sending")?;
    got.context("receiving")
}
