//! Clone side: a VM built from a fork descriptor, whose memory faults in
//! from a page source.

use crate::fork::descriptor::ForkDescriptor;
use crate::fork::fault::{CloneMemory, FaultHandler, FaultHandlerConfig, Prefetch};
use crate::fork::identity::CloneIdentity;
use crate::fork::{Answer, ForkError, ForkRequest, ForkService};
use crate::vmm::devices::{Console, Devices};
use crate::vmm::kvm::KvmContext;
use crate::vmm::memory::{self, GuestMemory};
use crate::vmm::vm::{register_memory, Vm};
use guest_agent::abi::{self, HypercallPage};
use kvm_bindings::CpuId;
use memserver::{PageSource, PAGE_SIZE};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
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
}

/// A clone's SnowFlock calls: `sf_exit` ends it, `will_overwrite` maps
/// zero pages; clones do not fork again (refused).
pub struct CloneService {
    memory: Arc<CloneMemory>,
    declared: AtomicU64,
    avoidance: bool,
}

impl CloneService {
    pub fn pages_declared(&self) -> u64 {
        self.declared.load(Ordering::Relaxed)
    }
}

impl ForkService for CloneService {
    fn ticket(&self, _: u64, _: u64) -> Result<(u64, u64), u32> {
        Err(abi::STATUS_REFUSED)
    }
    fn fork(&self, _: ForkRequest) -> Result<(), u32> {
        Err(abi::STATUS_REFUSED)
    }
    fn join(&self, _: u64) -> Result<u64, u32> {
        Err(abi::STATUS_REFUSED)
    }
    fn kill(&self, _: u64) -> Result<(), u32> {
        Err(abi::STATUS_REFUSED)
    }
    fn will_overwrite(&self, gpa: u64, len: u64) -> Result<(), u32> {
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
    fn may_exit(&self) -> bool {
        true
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
    pub identity: CloneIdentity,
}

/// An empty clone VM, built ahead of a fork (warm pool): the KVM VM, its
/// anonymous memory registered with KVM and with a userfaultfd, and its
/// vCPU. Creating one costs a few ms here, mostly the memory slot.
pub struct CloneShell {
    vm_fd: kvm_ioctls::VmFd,
    memory: GuestMemory,
    cmem: Arc<CloneMemory>,
    vcpu: kvm_ioctls::VcpuFd,
    vcpu_id: u8,
    mem_bytes: u64,
}

impl CloneShell {
    pub fn create(mem_bytes: u64, vcpu_id: u8) -> Result<CloneShell, ForkError> {
        let ctx = KvmContext::get().map_err(|e| ForkError::Clone(e.to_string()))?;
        let vm_fd = ctx
            .kvm
            .create_vm()
            .map_err(|e| ForkError::Clone(format!("KVM_CREATE_VM: {e}")))?;
        let memory = memory::anonymous(mem_bytes).map_err(|e| ForkError::Clone(e.to_string()))?;
        register_memory(&vm_fd, &memory).map_err(|e| ForkError::Clone(e.to_string()))?;
        let cmem = Arc::new(CloneMemory::register(&memory).map_err(ForkError::Uffd)?);
        let vcpu = vm_fd
            .create_vcpu(vcpu_id as u64)
            .map_err(|e| ForkError::Clone(format!("KVM_CREATE_VCPU: {e}")))?;
        Ok(CloneShell {
            vm_fd,
            memory,
            cmem,
            vcpu,
            vcpu_id,
            mem_bytes,
        })
    }
}

/// A clone whose VM is built and loaded but whose vCPU has not run yet.
pub struct PreparedClone {
    vm: Vm,
    fd: kvm_ioctls::VcpuFd,
    vcpu_id: u8,
    cpuid: CpuId,
    service: Arc<CloneService>,
    identity: CloneIdentity,
}

impl PreparedClone {
    /// Starts the clone's vCPU.
    pub fn start(self) -> Result<StartedClone, ForkError> {
        let mut vm = self.vm;
        vm.spawn_vcpu(self.vcpu_id, self.fd, self.cpuid)
            .map_err(|e| ForkError::Clone(e.to_string()))?;
        Ok(StartedClone {
            vm,
            service: self.service,
            identity: self.identity,
        })
    }
}

/// Builds clone `clone_id` from `desc` and starts its vCPU.
pub fn start_clone(
    desc: &ForkDescriptor,
    clone_id: u64,
    sources: CloneSources,
    opts: &CloneOptions,
) -> Result<StartedClone, ForkError> {
    prepare_clone(desc, clone_id, sources, opts, None)?.start()
}

/// Builds clone `clone_id` from `desc`: VM, memory registered with
/// userfaultfd, descriptor pages, devices, fault handler, vCPU state.
pub fn prepare_clone(
    desc: &ForkDescriptor,
    clone_id: u64,
    sources: CloneSources,
    opts: &CloneOptions,
    shell: Option<CloneShell>,
) -> Result<PreparedClone, ForkError> {
    let started = Instant::now();
    let ctx = KvmContext::get().map_err(|e| ForkError::Clone(e.to_string()))?;
    let shell = match shell {
        Some(s) if s.mem_bytes == desc.mem_bytes && s.vcpu_id == desc.vcpu.id => s,
        _ => CloneShell::create(desc.mem_bytes, desc.vcpu.id)?,
    };
    let CloneShell {
        vm_fd,
        memory,
        cmem,
        vcpu: fd,
        ..
    } = shell;
    let len = cmem.len;
    let identity = CloneIdentity::new(desc.family, clone_id);
    for p in &desc.pages {
        if p.bytes.len() != PAGE_SIZE || !p.gpa.is_multiple_of(PAGE_SIZE as u64) || p.gpa >= len {
            return Err(ForkError::Clone(format!(
                "bad descriptor page at {:#x}",
                p.gpa
            )));
        }
        let data = if p.gpa == desc.answer_page {
            answered_page(&p.bytes, desc.answer, clone_id, &identity)
        } else {
            let mut d = [0u8; PAGE_SIZE];
            d.copy_from_slice(&p.bytes);
            d
        };
        cmem.install(p.gpa / PAGE_SIZE as u64, &data)
            .map_err(ForkError::Uffd)?;
    }
    let service = Arc::new(CloneService {
        memory: cmem.clone(),
        declared: AtomicU64::new(0),
        avoidance: opts.avoidance,
    });
    let console = Console::new(opts.echo, Some(&opts.name));
    let devices = Arc::new(Mutex::new(Devices::restore(
        memory.clone(),
        console.clone(),
        &desc.devices,
        Some(service.clone()),
    )));
    let mut vm = Vm::assemble(
        vm_fd,
        memory,
        devices,
        console,
        false,
        format!("clone {clone_id} of family {}", desc.family),
        String::new(),
        started,
    );
    let handler = FaultHandler::spawn(
        FaultHandlerConfig {
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
        },
        &opts.name,
    )
    .map_err(|e| ForkError::Clone(format!("fault handler thread: {e}")))?;
    vm.set_clone_parts(handler, service.clone());
    desc.vcpu
        .restore(ctx, &fd)
        .map_err(|e| ForkError::Clone(e.to_string()))?;
    let cpuid = CpuId::from_entries(&desc.vcpu.cpuid)
        .map_err(|e| ForkError::Clone(format!("CPUID: {e:?}")))?;
    Ok(PreparedClone {
        vm,
        fd,
        vcpu_id: desc.vcpu.id,
        cpuid,
        service,
        identity,
    })
}
