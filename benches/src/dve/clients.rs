//! The simulated clients: one thread inside a host's network namespace
//! (so UDP reaches the hosts' ingresses on the cluster's bridge),
//! [`SENDERS`] [`ClientSender`]s (client `c` on sender `c % SENDERS`: more
//! socket buffer for the acknowledgements of 10,000 clients when the
//! thread is late on a loaded machine). Every tick it sends each client's
//! updates that came due (to the zone it is in now: a client that crossed
//! into another zone is handed over), flushes, and takes acknowledgements
//! until the next tick; at the end it drains (waits, bounded, for every
//! update to be acknowledged).

use anyhow::{bail, Context, Result};
use bench_shared::cluster::check_stop;
use forkd::clients::{ClientSender, SenderConfig};
use std::net::SocketAddr;
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::world::World;

/// Sockets the clients are spread over.
pub const SENDERS: usize = 4;
/// An update unacknowledged this long is sent again: well above the
/// zones' tick, so that a loaded machine's delays do not turn into a
/// storm of re-sends (a redirect re-sends at once anyway).
const RETRY_AFTER: Duration = Duration::from_secs(2);

/// What the driver has done so far (read by the progress lines).
#[derive(Debug, Clone, Default)]
pub struct Progress {
    pub t_s: f64,
    pub sent: u64,
    pub acked: u64,
    pub unacked: u64,
    pub handovers: u64,
    pub redirects: u64,
    pub resent: u64,
    pub draining: bool,
}

/// The driver's end.
#[derive(Debug, Clone, Default)]
pub struct Outcome {
    pub progress: Progress,
    pub acked_duplicate: u64,
    pub p50_us: u64,
    pub p99_us: u64,
    /// Unacknowledged after the drain.
    pub lost: u64,
    pub drained: bool,
}

pub struct Shared {
    pub progress: Mutex<Progress>,
    /// Set by the main thread to stop early (an error elsewhere).
    pub abort: AtomicBool,
}

pub struct Plan {
    pub world: World,
    /// The VM id (number) of each zone, and its first host's ingress.
    pub zone_vm: Vec<u64>,
    pub zone_addr: Vec<SocketAddr>,
    pub tick: Duration,
    pub drain: Duration,
    /// The namespace to send from.
    pub netns: String,
}

fn enter(netns: &str) -> Result<()> {
    let path = format!("/run/netns/{netns}");
    let f = std::fs::File::open(&path).with_context(|| format!("cannot open {path}"))?;
    // SAFETY: setns(2) on a namespace file we opened; it moves only the
    // calling thread into that network namespace.
    if unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
        bail!("setns {netns}: {}", std::io::Error::last_os_error());
    }
    Ok(())
}

fn publish(shared: &Shared, txs: &[ClientSender], p: &mut Progress) {
    let st: Vec<_> = txs.iter().map(ClientSender::stats).collect();
    p.sent = st.iter().map(|s| s.updates).sum();
    p.acked = st.iter().map(|s| s.acked).sum();
    p.unacked = txs.iter().map(|t| t.unacked() as u64).sum();
    p.redirects = st.iter().map(|s| s.redirects).sum();
    p.resent = st.iter().map(|s| s.resent).sum();
    if let Ok(mut g) = shared.progress.lock() {
        *g = p.clone();
    }
}

/// Polls every sender in turn for `wait` in all.
fn poll_all(txs: &mut [ClientSender], wait: Duration) -> Result<()> {
    let each = (wait / txs.len().max(1) as u32).max(Duration::from_micros(500));
    for tx in txs.iter_mut() {
        tx.poll(each).context("clients: poll")?;
    }
    Ok(())
}

fn stopped(shared: &Shared) -> Result<()> {
    check_stop()?;
    if shared.abort.load(Ordering::Acquire) {
        bail!("the clients were stopped");
    }
    Ok(())
}

/// Runs the clients from `start` for the world's duration, then drains.
/// Call on a thread of its own: it enters the plan's namespace.
pub fn drive(plan: &Plan, shared: &Arc<Shared>, start: Instant) -> Result<Outcome> {
    enter(&plan.netns)?;
    let w = &plan.world;
    let n = w.config().clients;
    let mut txs = Vec::with_capacity(SENDERS);
    for _ in 0..SENDERS {
        let mut tx = ClientSender::new(SenderConfig {
            retry_after: RETRY_AFTER,
            ..SenderConfig::default()
        })
        .context("cannot open a clients' socket")?;
        for (vm, addr) in plan.zone_vm.iter().zip(&plan.zone_addr) {
            tx.set_zone(*vm, *addr);
        }
        txs.push(tx);
    }
    let mut sent_k = vec![0u64; n as usize];
    let mut zone: Vec<u32> = (0..n).map(|c| w.zone_of(c, 0.0)).collect();
    let mut p = Progress::default();
    // Wait for the start (the hosts settle after the boot).
    while Instant::now() < start {
        stopped(shared)?;
        std::thread::sleep(Duration::from_millis(20));
    }
    let duration = Duration::from_secs_f64(w.config().duration_s);
    let mut next = start;
    // Bounded: one pass per tick for the duration.
    let max_ticks = (duration.as_secs_f64() / plan.tick.as_secs_f64()).ceil() as u64 + 2;
    for _ in 0..max_ticks {
        stopped(shared)?;
        let now = Instant::now();
        if now.duration_since(start) >= duration {
            break;
        }
        let t = now.duration_since(start).as_secs_f64();
        for c in 0..n {
            let due = w.due_by(c, t);
            let k = &mut sent_k[c as usize];
            if due <= *k {
                continue;
            }
            let z = w.zone_of(c, t);
            if z != zone[c as usize] {
                p.handovers += 1;
                zone[c as usize] = z;
            }
            let vm = plan.zone_vm[z as usize];
            let tx = &mut txs[c as usize % SENDERS];
            while *k < due {
                tx.send(vm, c, &World::payload(c, *k))
                    .with_context(|| format!("client {c}: send to zone {z}"))?;
                *k += 1;
            }
        }
        for tx in txs.iter_mut() {
            tx.flush().context("clients: flush")?;
        }
        next += plan.tick;
        let wait = next.saturating_duration_since(Instant::now());
        poll_all(&mut txs, wait.max(Duration::from_millis(1)))?;
        p.t_s = start.elapsed().as_secs_f64();
        publish(shared, &txs, &mut p);
    }
    // Drain, in slices so that progress and a stop are seen.
    p.draining = true;
    let end = Instant::now() + plan.drain;
    let mut drained = false;
    while Instant::now() < end {
        stopped(shared)?;
        if txs.iter().all(|t| t.unacked() == 0) {
            drained = true;
            break;
        }
        poll_all(&mut txs, Duration::from_millis(200))?;
        p.t_s = start.elapsed().as_secs_f64();
        publish(shared, &txs, &mut p);
    }
    p.t_s = start.elapsed().as_secs_f64();
    publish(shared, &txs, &mut p);
    // The shards' clients are alike (ids spread over them): the worst
    // shard's quantile stands for all (an upper bound of the p99).
    let q = |x: f64| txs.iter().map(|t| t.latency_us(x)).max().unwrap_or(0);
    Ok(Outcome {
        acked_duplicate: txs.iter().map(|t| t.stats().acked_duplicate).sum(),
        p50_us: q(0.5),
        p99_us: q(0.99),
        lost: p.unacked,
        drained,
        progress: p,
    })
}
