//! A vCPU's whole architectural state, as KVM exposes it: general and
//! segment registers, FPU/XSAVE, XCRs, MSRs, pending events, debug
//! registers, MP state, CPUID and (with an in-kernel irqchip) the LAPIC.
//! Only what this KVM supports is saved (see `Caps`).

use crate::vmm::kvm::KvmContext;
use kvm_bindings::{
    kvm_cpuid_entry2, kvm_debugregs, kvm_fpu, kvm_lapic_state, kvm_mp_state, kvm_msr_entry,
    kvm_regs, kvm_sregs, kvm_vcpu_events, kvm_xcrs, kvm_xsave, CpuId, Msrs,
};
use kvm_ioctls::VcpuFd;
use serde::{Deserialize, Serialize};

#[derive(Debug, thiserror::Error)]
pub enum CpuStateError {
    #[error("{op} failed: {source}")]
    Ioctl {
        op: &'static str,
        source: vmm_sys_util::errno::Error,
    },
    #[error("KVM accepted only {set} of {total} MSRs")]
    PartialMsrs { set: usize, total: usize },
    #[error("saved state does not fit this KVM: {0}")]
    Incompatible(String),
}

fn ioctl<T>(
    op: &'static str,
    r: Result<T, vmm_sys_util::errno::Error>,
) -> Result<T, CpuStateError> {
    r.map_err(|source| CpuStateError::Ioctl { op, source })
}

/// x87/SSE state for KVMs without XSAVE (kvm_fpu has no serde support).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct FpuState {
    pub fpr: Vec<[u8; 16]>,
    pub fcw: u16,
    pub fsw: u16,
    pub ftwx: u8,
    pub last_opcode: u16,
    pub last_ip: u64,
    pub last_dp: u64,
    pub xmm: Vec<[u8; 16]>,
    pub mxcsr: u32,
}

impl From<&kvm_fpu> for FpuState {
    fn from(f: &kvm_fpu) -> Self {
        FpuState {
            fpr: f.fpr.to_vec(),
            fcw: f.fcw,
            fsw: f.fsw,
            ftwx: f.ftwx,
            last_opcode: f.last_opcode,
            last_ip: f.last_ip,
            last_dp: f.last_dp,
            xmm: f.xmm.to_vec(),
            mxcsr: f.mxcsr,
        }
    }
}

impl FpuState {
    fn to_kvm(&self) -> kvm_fpu {
        let mut f = kvm_fpu {
            fcw: self.fcw,
            fsw: self.fsw,
            ftwx: self.ftwx,
            last_opcode: self.last_opcode,
            last_ip: self.last_ip,
            last_dp: self.last_dp,
            mxcsr: self.mxcsr,
            ..Default::default()
        };
        for (d, s) in f.fpr.iter_mut().zip(&self.fpr) {
            *d = *s;
        }
        for (d, s) in f.xmm.iter_mut().zip(&self.xmm) {
            *d = *s;
        }
        f
    }
}

#[derive(Debug, Serialize, Deserialize)]
pub struct VcpuState {
    pub id: u8,
    pub cpuid: Vec<kvm_cpuid_entry2>,
    pub regs: kvm_regs,
    pub sregs: kvm_sregs,
    pub fpu: FpuState,
    pub xsave: Option<kvm_xsave>,
    pub xcrs: Option<kvm_xcrs>,
    pub msrs: Vec<kvm_msr_entry>,
    pub events: Option<kvm_vcpu_events>,
    pub debug_regs: Option<kvm_debugregs>,
    pub mp_state: kvm_mp_state,
    pub lapic: Option<kvm_lapic_state>,
}

impl VcpuState {
    /// Reads the state of a vCPU that is not running (KVM_RUN has returned
    /// and any pending I/O was completed by re-entering with immediate_exit).
    pub fn save(
        ctx: &KvmContext,
        vcpu: &VcpuFd,
        id: u8,
        cpuid: &CpuId,
        irqchip: bool,
    ) -> Result<Self, CpuStateError> {
        let caps = ctx.caps;
        let msr_list = ctx.saved_msrs(vcpu);
        let entries: Vec<kvm_msr_entry> = msr_list
            .iter()
            .map(|&index| kvm_msr_entry {
                index,
                ..Default::default()
            })
            .collect();
        let mut msrs = Msrs::from_entries(&entries)
            .map_err(|e| CpuStateError::Incompatible(format!("MSR list: {e:?}")))?;
        let n = ioctl("KVM_GET_MSRS", vcpu.get_msrs(&mut msrs))?;
        if n != entries.len() {
            return Err(CpuStateError::PartialMsrs {
                set: n,
                total: entries.len(),
            });
        }
        Ok(VcpuState {
            id,
            cpuid: cpuid.as_slice().to_vec(),
            regs: ioctl("KVM_GET_REGS", vcpu.get_regs())?,
            sregs: ioctl("KVM_GET_SREGS", vcpu.get_sregs())?,
            fpu: FpuState::from(&ioctl("KVM_GET_FPU", vcpu.get_fpu())?),
            xsave: if caps.xsave {
                Some(ioctl("KVM_GET_XSAVE", vcpu.get_xsave())?)
            } else {
                None
            },
            xcrs: if caps.xcrs {
                Some(ioctl("KVM_GET_XCRS", vcpu.get_xcrs())?)
            } else {
                None
            },
            msrs: msrs.as_slice().to_vec(),
            events: if caps.vcpu_events {
                Some(ioctl("KVM_GET_VCPU_EVENTS", vcpu.get_vcpu_events())?)
            } else {
                None
            },
            debug_regs: if caps.debugregs {
                Some(ioctl("KVM_GET_DEBUGREGS", vcpu.get_debug_regs())?)
            } else {
                None
            },
            mp_state: ioctl("KVM_GET_MP_STATE", vcpu.get_mp_state())?,
            lapic: if irqchip {
                Some(ioctl("KVM_GET_LAPIC", vcpu.get_lapic())?)
            } else {
                None
            },
        })
    }

    /// Loads this state into a fresh vCPU. Order matters: CPUID first (it
    /// decides which MSRs and XSAVE features exist), then special registers,
    /// then the rest; events after registers so pending ones apply to them.
    pub fn restore(&self, ctx: &KvmContext, vcpu: &VcpuFd) -> Result<(), CpuStateError> {
        let cpuid = CpuId::from_entries(&self.cpuid)
            .map_err(|e| CpuStateError::Incompatible(format!("CPUID: {e:?}")))?;
        ioctl("KVM_SET_CPUID2", vcpu.set_cpuid2(&cpuid))?;
        ioctl("KVM_SET_SREGS", vcpu.set_sregs(&self.sregs))?;
        ioctl("KVM_SET_REGS", vcpu.set_regs(&self.regs))?;
        match (&self.xsave, ctx.caps.xsave) {
            // SAFETY: the kvm_xsave was produced by KVM_GET_XSAVE on a vCPU
            // with the same CPUID, so its size and layout are what the
            // kernel expects.
            (Some(x), true) => ioctl("KVM_SET_XSAVE", unsafe { vcpu.set_xsave(x) })?,
            (Some(_), false) => {
                return Err(CpuStateError::Incompatible(
                    "XSAVE state but no KVM_CAP_XSAVE".into(),
                ))
            }
            (None, _) => ioctl("KVM_SET_FPU", vcpu.set_fpu(&self.fpu.to_kvm()))?,
        }
        if let Some(x) = &self.xcrs {
            ioctl("KVM_SET_XCRS", vcpu.set_xcrs(x))?;
        }
        let msrs = Msrs::from_entries(&self.msrs)
            .map_err(|e| CpuStateError::Incompatible(format!("MSRs: {e:?}")))?;
        let n = ioctl("KVM_SET_MSRS", vcpu.set_msrs(&msrs))?;
        if n != self.msrs.len() {
            return Err(CpuStateError::PartialMsrs {
                set: n,
                total: self.msrs.len(),
            });
        }
        if let Some(l) = &self.lapic {
            ioctl("KVM_SET_LAPIC", vcpu.set_lapic(l))?;
        }
        ioctl("KVM_SET_MP_STATE", vcpu.set_mp_state(self.mp_state))?;
        if let Some(e) = &self.events {
            ioctl("KVM_SET_VCPU_EVENTS", vcpu.set_vcpu_events(e))?;
        }
        if let Some(d) = &self.debug_regs {
            ioctl("KVM_SET_DEBUGREGS", vcpu.set_debug_regs(d))?;
        }
        Ok(())
    }
}
