//! Clone side: a VM built from a fork descriptor, whose memory faults in
//! from a page source.

use crate::fork::descriptor::ForkDescriptor;
use crate::fork::fault::{CloneMemory, FaultHandler, FaultHandlerConfig, FaultStatsView, Prefetch};
use crate::fork::identity::{fresh_entropy, CloneIdentity, IdentityLease};
use crate::fork::{Answer, ForkError};
use crate::vmm::builder::{PreparedVm, VmShell};
use crate::vmm::devices::Console;
use crate::vmm::dirty::PageBitmap;
use crate::vmm::memory;
use crate::vmm::memory::GuestMemory;
use crate::vmm::vm::BuildOptions;
use crate::vmm::{Vm, VmError};
use guest_agent::abi::{self, HypercallPage};
use memserver::client::{ClientOptions, PageClient};
use memserver::mcdist::host::HostReceiver;
use memserver::{FamilyKey, PageSource, PAGE_SIZE};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

#[derive(Debug, Clone)]
pub struct CloneOptions {
    pub echo: bool,
    pub name: String,
    /// Use the avoidance heuristics (zero-fill pages the guest will
    /// overwrite) instead of fetching every page.
    pub avoidance: bool,
    /// Pages per fetch at most (read-ahead window).
    pub readahead: u64,
}

/// Where a clone's memory comes from: demand faults, and optionally a
/// second source that prefetches the pages allocated at the fork.
pub struct CloneSources {
    pub demand: Arc<dyn PageSource>,
    pub prefetch: Option<Arc<dyn PageSource>>,
    /// Multicast: the family's host receiver, whose arriving pages are
    /// installed into the clone as they come.
    pub feed: Option<Arc<HostReceiver>>,
}

impl CloneSources {
    /// Pages over the network: the family's host receiver (multicast; it
    /// also feeds the clone every page that arrives, so no prefetch), or
    /// page clients of the memory server from `client` (unicast; a second
    /// one prefetches if `prefetch`).
    pub fn network(
        receiver: Option<&Arc<HostReceiver>>,
        prefetch: bool,
        client: impl Fn() -> Result<Arc<dyn PageSource>, ForkError>,
    ) -> Result<CloneSources, ForkError> {
        Ok(match receiver {
            Some(r) => CloneSources {
                demand: r.clone(),
                prefetch: None,
                feed: Some(r.clone()),
            },
            None => CloneSources {
                demand: client()?,
                prefetch: if prefetch { Some(client()?) } else { None },
                feed: None,
            },
        })
    }
}

/// A clone's SnowFlock calls: `sf_exit` ends it, `will_overwrite` maps
/// zero pages; clones do not fork again (refused).
pub struct CloneService {
    memory: Arc<CloneMemory>,
    declared: AtomicU64,
    avoidance: bool,
}

impl CloneService {
    /// The service of a clone whose memory is `memory` (with `avoidance`,
    /// declared buffers are zero-filled instead of fetched).
    pub fn new(memory: Arc<CloneMemory>, avoidance: bool) -> CloneService {
        CloneService {
            memory,
            declared: AtomicU64::new(0),
            avoidance,
        }
    }

    pub fn pages_declared(&self) -> u64 {
        self.declared.load(Ordering::Relaxed)
    }
}

impl CloneService {
    /// The guest will overwrite `[gpa, gpa + len)` before reading it: its
    /// missing whole pages are zero-filled instead of fetched.
    pub fn will_overwrite(&self, gpa: u64, len: u64) -> Result<(), u32> {
        if !self.avoidance {
            return Ok(());
        }
        let page = PAGE_SIZE as u64;
        let end = gpa.checked_add(len).ok_or(abi::STATUS_BAD_ARGS)?;
        if end > self.memory.len {
            return Err(abi::STATUS_BAD_ARGS);
        }
        // Only whole pages: a partly overwritten page still needs its data.
        let (first, last) = (gpa.div_ceil(page), end / page);
        let mut p = first;
        while p < last {
            if self.memory.presence.test(p) {
                p += 1;
                continue;
            }
            let mut n = 1;
            while p + n < last && !self.memory.presence.test(p + n) {
                n += 1;
            }
            if self.memory.zero_range(p, n).is_ok() {
                self.declared.fetch_add(n, Ordering::Relaxed);
            }
            p += n;
        }
        Ok(())
    }
}

/// The descriptor page that tells the clone who it is, answered for
/// clone `clone_id`.
fn answered_page(
    bytes: &[u8],
    answer: Answer,
    clone_id: u64,
    identity: &CloneIdentity,
) -> [u8; PAGE_SIZE] {
    let mut page = [0u8; PAGE_SIZE];
    page.copy_from_slice(&bytes[..PAGE_SIZE]);
    if let Answer::Agent { epoch } = answer {
        let mut put =
            |word: usize, v: u64| page[word * 8..word * 8 + 8].copy_from_slice(&v.to_le_bytes());
        put(abi::AGENT_WORD_EPOCH, epoch);
        put(abi::AGENT_WORD_CLONE_ID, clone_id);
        return page;
    }
    let mut head = [0u8; HypercallPage::SIZE];
    head.copy_from_slice(&page[..HypercallPage::SIZE]);
    let mut call = HypercallPage::from_bytes(&head);
    call.status = abi::STATUS_OK;
    call.ret = [
        clone_id,
        identity.mac_u64(),
        u32::from(identity.ip) as u64,
        0,
    ];
    page[..HypercallPage::SIZE].copy_from_slice(&call.to_bytes());
    page
}

/// A started clone and its parts the family keeps an eye on.
pub struct StartedClone {
    pub vm: Vm,
    pub service: Arc<CloneService>,
    /// The clone's identity, held until the clone is dropped.
    pub lease: IdentityLease,
    pub faults: FaultStatsView,
}

/// An empty clone VM, built ahead of a fork (warm pool): the VM shell
/// (KVM VM, anonymous memory registered with KVM, one vCPU) with its
/// memory registered with a userfaultfd.
pub struct CloneShell {
    shell: VmShell,
    cmem: Arc<CloneMemory>,
}

impl CloneShell {
    pub fn create(mem_bytes: u64, vcpu_id: u8) -> Result<CloneShell, ForkError> {
        let clone_err = |source| ForkError::Clone {
            clone_id: 0,
            source,
        };
        let memory = memory::anonymous(mem_bytes).map_err(|e| clone_err(e.into()))?;
        let shell = VmShell::create(memory, &[vcpu_id], false).map_err(clone_err)?;
        let cmem = Arc::new(CloneMemory::register(shell.memory())?);
        Ok(CloneShell { shell, cmem })
    }

    fn fits(&self, desc: &ForkDescriptor) -> bool {
        self.shell.fits(&desc.state)
    }
}

/// A clone whose VM is built and loaded but whose vCPU has not run yet.
pub struct PreparedClone {
    vm: PreparedVm,
    clone_id: u64,
    service: Arc<CloneService>,
    lease: IdentityLease,
    faults: FaultStatsView,
}

impl PreparedClone {
    /// Starts the clone's vCPU.
    pub fn start(self) -> Result<StartedClone, ForkError> {
        let vm = self.vm.start().map_err(|source| ForkError::Clone {
            clone_id: self.clone_id,
            source,
        })?;
        Ok(StartedClone {
            vm,
            service: self.service,
            lease: self.lease,
            faults: self.faults,
        })
    }
}

/// Builds clone `clone_id` from `desc`: a shell (from the warm pool if one
/// fits) whose memory is registered with userfaultfd, the descriptor pages
/// installed, the fault handler started, then the VM built from the
/// descriptor's state by the VMM's one builder.
pub fn prepare_clone(
    desc: &ForkDescriptor,
    lease: IdentityLease,
    sources: CloneSources,
    opts: &CloneOptions,
    shell: Option<CloneShell>,
) -> Result<PreparedClone, ForkError> {
    let identity = lease.identity;
    let clone_id = identity.clone_id;
    let started = Instant::now();
    let CloneShell { shell, cmem } = match shell {
        Some(s) if s.fits(desc) => s,
        _ => {
            let id = desc.state.vcpus.first().map(|v| v.id).unwrap_or(0);
            CloneShell::create(desc.state.mem_bytes, id)?
        }
    };
    let len = cmem.len;
    let entropy = fresh_entropy()?;
    for p in &desc.pages {
        if p.bytes.len() != PAGE_SIZE || !p.gpa.is_multiple_of(PAGE_SIZE as u64) || p.gpa >= len {
            return Err(ForkError::BadDescriptorPage(p.gpa));
        }
        let mut data = if p.gpa == desc.answer_page {
            answered_page(&p.bytes, desc.answer, clone_id, &identity)
        } else {
            let mut d = [0u8; PAGE_SIZE];
            d.copy_from_slice(&p.bytes);
            d
        };
        if Some(p.gpa) == desc.agent_page {
            identity.write_agent_words(&mut data, &entropy);
        }
        cmem.install(p.gpa / PAGE_SIZE as u64, &data)?;
    }
    let service = Arc::new(CloneService::new(cmem.clone(), opts.avoidance));
    let handler = FaultHandler::spawn(
        FaultHandlerConfig {
            known_zero: None,
            memory: cmem,
            source: sources.demand,
            avoidance: if opts.avoidance {
                desc.alloc.clone()
            } else {
                None
            },
            readahead: opts.readahead,
            // The pages the guest allocator had handed out at the fork
            // (the zone state): the guest will want them all.
            prefetch: sources.prefetch.map(|source| Prefetch {
                source,
                ranges: desc
                    .alloc
                    .as_ref()
                    .map(|a| a.allocated.clone())
                    .unwrap_or_default(),
            }),
            feed: sources.feed,
        },
        &opts.name,
    )
    .map_err(|source| ForkError::Thread {
        what: "fault handler",
        source,
    })?;
    let faults = handler.stats_view();
    let vm = shell
        .build(
            &desc.state,
            BuildOptions {
                console: Console::new(opts.echo, Some(&opts.name)),
                hypercalls: Some(service.clone()),
                memory_server: Some(Box::new(handler)),
                started,
            },
        )
        .map_err(|source: VmError| ForkError::Clone { clone_id, source })?;
    Ok(PreparedClone {
        vm,
        clone_id,
        service,
        lease,
        faults,
    })
}

/// Where a clone's missing pages come from: its family's memory server.
#[derive(Debug, Clone)]
pub struct FamilySource {
    pub server: SocketAddr,
    pub key: FamilyKey,
}

/// A clone that migrated, on its new host: the pages that came with it
/// (`have`) are present; the memory is registered with userfaultfd and
/// every other page faults in from the family's memory server, as it did
/// on the clone's first host (no zero-fill guesses: a page the clone
/// never touched is the parent's, whatever it holds). Returns the VM's
/// memory server (the fault handler), its counters and its hypercall
/// service.
pub fn rehome(
    memory: &GuestMemory,
    have: &PageBitmap,
    family: &FamilySource,
    name: &str,
) -> Result<(FaultHandler, FaultStatsView, Arc<CloneService>), ForkError> {
    let cmem = Arc::new(CloneMemory::register(memory)?);
    cmem.presence.set_all(have);
    let pages = cmem.len / PAGE_SIZE as u64;
    let client = PageClient::with_pages(
        family.server,
        family.key.clone(),
        pages,
        ClientOptions::default(),
    )
    .map_err(ForkError::PageClient)?;
    let handler = FaultHandler::spawn(
        FaultHandlerConfig {
            known_zero: None,
            memory: cmem.clone(),
            source: Arc::new(client),
            avoidance: None,
            readahead: REHOME_READAHEAD,
            prefetch: None,
            feed: None,
        },
        name,
    )
    .map_err(|source| ForkError::Thread {
        what: "fault handler",
        source,
    })?;
    let faults = handler.stats_view();
    Ok((handler, faults, Arc::new(CloneService::new(cmem, false))))
}

/// Read-ahead of a migrated clone's demand faults (pages).
const REHOME_READAHEAD: u64 = 32;
