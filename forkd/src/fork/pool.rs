//! The warm pool: clone VMs built ahead of a fork.

use crate::errors::chain;
use crate::fork::clone::CloneShell;
use crate::sync::lock;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Instant;

/// Clone VMs built ahead of the fork, from `sf_request_ticket` on, by a
/// background thread (a shell costs a few ms, mostly the memory slot).
pub struct ShellPool {
    shells: Mutex<Vec<CloneShell>>,
    stop: AtomicBool,
    builder: Mutex<Option<JoinHandle<()>>>,
    pub(super) created: Instant,
}

impl ShellPool {
    pub(super) fn start(count: u64, mem_bytes: u64) -> Arc<ShellPool> {
        let pool = Arc::new(ShellPool {
            shells: Mutex::new(Vec::new()),
            stop: AtomicBool::new(false),
            builder: Mutex::new(None),
            created: Instant::now(),
        });
        let p = pool.clone();
        let builder = std::thread::Builder::new()
            .name("clone-pool".into())
            .spawn(move || {
                for _ in 0..count {
                    if p.stop.load(Ordering::Acquire) {
                        return;
                    }
                    match CloneShell::create(mem_bytes, 0) {
                        Ok(s) => lock(&p.shells).push(s),
                        Err(e) => {
                            tracing::warn!("warm pool: {}", chain(&e));
                            return;
                        }
                    }
                }
            });
        // Without the thread the clones are simply built at the fork.
        *lock(&pool.builder) = builder.ok();
        pool
    }

    /// Stops building and hands over what is built.
    pub(super) fn take(&self) -> Vec<CloneShell> {
        self.stop.store(true, Ordering::Release);
        if let Some(t) = lock(&self.builder).take() {
            let _ = t.join();
        }
        std::mem::take(&mut *lock(&self.shells))
    }
}
