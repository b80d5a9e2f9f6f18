//! The cluster's daemon processes, seen through `/proc`: alive (and the
//! same process: its start time matches), in which network namespace, and
//! stopped with SIGTERM, then SIGKILL after a bound.

use std::os::unix::fs::MetadataExt;
use std::time::{Duration, Instant};

/// `/proc/PID/stat`: the state letter and the start time (field 22, clock
/// ticks since boot). The command name may hold spaces and parentheses, so
/// fields are counted from the last `)`.
fn stat(pid: u32) -> Option<(char, u64)> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = &text[text.rfind(')')? + 1..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // rest starts at field 3 (state); field 22 is index 19.
    let state = fields.first()?.chars().next()?;
    let start = fields.get(19)?.parse().ok()?;
    Some((state, start))
}

/// The start time of a live (not zombie) process.
pub fn start_time(pid: u32) -> Option<u64> {
    match stat(pid)? {
        ('Z' | 'X', _) => None,
        (_, start) => Some(start),
    }
}

/// Whether `pid` is alive and is the process that started at `start`.
pub fn alive(pid: u32, start: Option<u64>) -> bool {
    match (start_time(pid), start) {
        (Some(now), Some(then)) => now == then,
        (Some(_), None) => true,
        (None, _) => false,
    }
}

/// The inode of the network namespace `pid` lives in.
pub fn netns_inode(pid: u32) -> Option<u64> {
    std::fs::metadata(format!("/proc/{pid}/ns/net"))
        .ok()
        .map(|m| m.ino())
}

fn signal(pid: u32, sig: i32) {
    let Ok(p) = libc::pid_t::try_from(pid) else {
        return;
    };
    if p <= 1 {
        return;
    }
    // SAFETY: kill(2) with a positive pid only sends a signal; it touches
    // no memory of ours. A pid that has gone away gives ESRCH, ignored.
    unsafe {
        libc::kill(p, sig);
    }
}

/// Waits until none of `procs` is alive, up to `limit`; the survivors.
fn wait_gone(procs: &[(u32, u64)], limit: Duration) -> Vec<(u32, u64)> {
    let t = Instant::now();
    loop {
        let left: Vec<_> = procs
            .iter()
            .copied()
            .filter(|(p, s)| alive(*p, Some(*s)))
            .collect();
        if left.is_empty() || t.elapsed() >= limit {
            return left;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Stops processes (pid, start time): SIGTERM, then SIGKILL those still
/// there after `grace`. Returns the pids that survived even SIGKILL.
pub fn stop(procs: &[(u32, u64)], grace: Duration) -> Vec<u32> {
    let live: Vec<_> = procs
        .iter()
        .copied()
        .filter(|(p, s)| alive(*p, Some(*s)))
        .collect();
    for (p, _) in &live {
        signal(*p, libc::SIGTERM);
    }
    let stubborn = wait_gone(&live, grace);
    for (p, _) in &stubborn {
        signal(*p, libc::SIGKILL);
    }
    wait_gone(&stubborn, Duration::from_secs(5))
        .into_iter()
        .map(|(p, _)| p)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sees_itself_and_stops_a_child() {
        let me = std::process::id();
        let start = start_time(me).expect("own stat");
        assert!(alive(me, Some(start)));
        assert!(!alive(me, Some(start + 1)));
        assert!(netns_inode(me).is_some());
        let mut child = std::process::Command::new("sleep")
            .arg("30")
            .spawn()
            .expect("sleep");
        let pid = child.id();
        let s = start_time(pid).expect("child stat");
        // The child is reaped by a thread so it does not stay a zombie.
        let reaper = std::thread::spawn(move || child.wait());
        assert!(stop(&[(pid, s)], Duration::from_secs(5)).is_empty());
        reaper.join().expect("reaper").expect("wait");
        assert!(!alive(pid, Some(s)));
    }
}
