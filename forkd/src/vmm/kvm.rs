//! The process-wide KVM handle and what this KVM can do: capabilities,
//! supported CPUID, and the MSRs a vCPU's state must carry.

use kvm_bindings::{kvm_msr_entry, CpuId, Msrs, KVM_MAX_CPUID_ENTRIES};
use kvm_ioctls::{Cap, Kvm, VcpuFd};
use std::sync::OnceLock;

#[derive(Debug, thiserror::Error)]
pub enum KvmError {
    #[error(
        "cannot open /dev/kvm (forkd needs KVM: is the kvm module loaded and /dev/kvm accessible?)"
    )]
    Open(#[source] vmm_sys_util::errno::Error),
    #[error("KVM lacks a capability forkd needs: {0}")]
    Missing(&'static str),
    #[error("KVM_GET_SUPPORTED_CPUID failed")]
    Cpuid(#[source] vmm_sys_util::errno::Error),
    #[error("KVM_GET_MSR_INDEX_LIST failed")]
    MsrList(#[source] vmm_sys_util::errno::Error),
}

/// Optional capabilities: state is saved only for what exists.
#[derive(Debug, Clone, Copy)]
pub struct Caps {
    pub xsave: bool,
    pub xcrs: bool,
    pub debugregs: bool,
    pub vcpu_events: bool,
    pub adjust_clock: bool,
    pub immediate_exit: bool,
}

pub struct KvmContext {
    pub kvm: Kvm,
    pub caps: Caps,
    pub cpuid: CpuId,
    msr_candidates: Vec<u32>,
    msrs: OnceLock<Vec<u32>>,
}

static CONTEXT: OnceLock<KvmContext> = OnceLock::new();

impl KvmContext {
    /// The shared context; opened on first use.
    pub fn get() -> Result<&'static KvmContext, KvmError> {
        if let Some(c) = CONTEXT.get() {
            return Ok(c);
        }
        let ctx = Self::open()?;
        Ok(CONTEXT.get_or_init(|| ctx))
    }

    fn open() -> Result<KvmContext, KvmError> {
        let kvm = Kvm::new().map_err(KvmError::Open)?;
        for (cap, name) in [
            (Cap::UserMemory, "KVM_CAP_USER_MEMORY"),
            (Cap::ExtCpuid, "KVM_CAP_EXT_CPUID"),
        ] {
            if !kvm.check_extension(cap) {
                return Err(KvmError::Missing(name));
            }
        }
        let caps = Caps {
            xsave: kvm.check_extension(Cap::Xsave),
            xcrs: kvm.check_extension(Cap::Xcrs),
            debugregs: kvm.check_extension(Cap::Debugregs),
            vcpu_events: kvm.check_extension(Cap::VcpuEvents),
            adjust_clock: kvm.check_extension(Cap::AdjustClock),
            immediate_exit: kvm.check_extension(Cap::ImmediateExit),
        };
        if !caps.immediate_exit {
            return Err(KvmError::Missing("KVM_CAP_IMMEDIATE_EXIT"));
        }
        let cpuid = kvm
            .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
            .map_err(KvmError::Cpuid)?;
        let msr_candidates = kvm
            .get_msr_index_list()
            .map_err(KvmError::MsrList)?
            .as_slice()
            .to_vec();
        Ok(KvmContext {
            kvm,
            caps,
            cpuid,
            msr_candidates,
            msrs: OnceLock::new(),
        })
    }

    /// The MSRs of KVM_GET_MSR_INDEX_LIST that a vCPU can both read and
    /// write back, probed once on the first (not yet run) vCPU. KVM_GET_MSRS
    /// stops at the first MSR it refuses, so refused ones are dropped one by
    /// one; then each is written back with its own value, and MSRs KVM will
    /// not take even so (here: MSR_KVM_ASYNC_PF_INT, 0x4b564d06) are left
    /// out of snapshots, since no restore could load them.
    pub fn saved_msrs(&self, vcpu: &VcpuFd) -> &[u32] {
        self.msrs.get_or_init(|| {
            let mut list = self.msr_candidates.clone();
            let readable = loop {
                let entries: Vec<kvm_msr_entry> = list
                    .iter()
                    .map(|&index| kvm_msr_entry {
                        index,
                        ..Default::default()
                    })
                    .collect();
                let Ok(mut msrs) = Msrs::from_entries(&entries) else {
                    return Vec::new();
                };
                match vcpu.get_msrs(&mut msrs) {
                    Ok(n) if n == list.len() => break msrs,
                    Ok(n) => {
                        list.remove(n);
                    }
                    Err(_) => return Vec::new(),
                }
            };
            readable
                .as_slice()
                .iter()
                .filter(|e| {
                    Msrs::from_entries(&[**e])
                        .ok()
                        .and_then(|one| vcpu.set_msrs(&one).ok())
                        == Some(1)
                })
                .map(|e| e.index)
                .collect()
        })
    }
}
