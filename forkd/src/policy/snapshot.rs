//! What the policy sees: every host's published load and its zones'.

use serde::{Deserialize, Serialize};

/// One host's published load.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HostLoad {
    pub name: String,
    /// CPU the host can give its zones, in cores.
    pub capacity: f64,
    /// CPU its zones use, in cores (vCPU time per second, summed).
    pub cpu: f64,
    /// Memory the host has available, in bytes (`None`: not reported).
    #[serde(default)]
    pub mem_available: Option<u64>,
}

/// Memory a host keeps free beyond a zone's moved in or a clone's started.
pub const MEM_HEADROOM: u64 = 256 << 20;

impl HostLoad {
    /// A host of `capacity` cores using `cpu`, its memory not reported.
    pub fn new(name: &str, capacity: f64, cpu: f64) -> HostLoad {
        HostLoad {
            name: name.to_owned(),
            capacity,
            cpu,
            mem_available: None,
        }
    }

    /// Whether `bytes` more guest memory fit here with [`MEM_HEADROOM`]
    /// to spare (yes when either is unknown).
    pub fn holds(&self, bytes: Option<u64>) -> bool {
        match (self.mem_available, bytes) {
            (Some(avail), Some(b)) => b.saturating_add(MEM_HEADROOM) <= avail,
            _ => true,
        }
    }

    /// Load as a fraction of capacity.
    pub fn load(&self) -> f64 {
        if self.capacity > 0.0 {
            self.cpu / self.capacity
        } else {
            0.0
        }
    }
}

/// One zone: a parent VM and, if it was split, its clones.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ZoneLoad {
    /// The zone's name (its parent VM, e.g. `h1/vm-3`).
    pub zone: String,
    /// The host the parent VM runs on.
    pub host: String,
    /// The parent VM's CPU use (its vCPU's time per second), in cores:
    /// what decides whether one VM still serves the zone.
    pub cpu: f64,
    /// The host CPU that moves with the zone when it migrates (cores): its
    /// vCPU and its share of its daemon's work for it (receiving,
    /// ringing and acknowledging its clients' updates). `None`: `cpu`.
    #[serde(default)]
    pub weight: Option<f64>,
    /// The CPU use of its clones (cores), if it is split.
    #[serde(default)]
    pub clones: Vec<f64>,
    /// Being migrated now.
    #[serde(default)]
    pub migrating: bool,
    /// Distinct pages the parent VM dirtied per second in its last
    /// dirty-rate window (`None`: not measured). Migrating a zone that
    /// dirties less costs less (fewer pre-copy rounds, shorter downtime).
    #[serde(default)]
    pub dirty_pages_per_s: Option<f64>,
    /// The parent VM's resident guest memory, in bytes (`None`: not
    /// measured): what a migration's destination, or a clone's host as
    /// the clone faults it in, needs at most.
    #[serde(default)]
    pub resident_bytes: Option<u64>,
}

impl ZoneLoad {
    /// A zone not split, not migrating, its dirty rate not measured, its
    /// weight its CPU.
    pub fn new(zone: &str, host: &str, cpu: f64) -> ZoneLoad {
        ZoneLoad {
            zone: zone.to_owned(),
            host: host.to_owned(),
            cpu,
            weight: None,
            clones: Vec::new(),
            migrating: false,
            dirty_pages_per_s: None,
            resident_bytes: None,
        }
    }

    /// The zone's whole load: parent and clones.
    pub fn demand(&self) -> f64 {
        self.cpu + self.clones.iter().sum::<f64>()
    }

    /// What the balancing policies move: [`ZoneLoad::weight`], else
    /// [`ZoneLoad::cpu`].
    pub fn weight(&self) -> f64 {
        self.weight.unwrap_or(self.cpu)
    }

    pub fn is_split(&self) -> bool {
        !self.clones.is_empty()
    }
}

/// Every host and zone at one instant.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct LoadSnapshot {
    /// Controller clock, ms.
    pub at_ms: u64,
    pub hosts: Vec<HostLoad>,
    pub zones: Vec<ZoneLoad>,
}

impl LoadSnapshot {
    /// The cluster's average host load (fraction of capacity).
    pub fn average_load(&self) -> f64 {
        let (cpu, cap) = self
            .hosts
            .iter()
            .fold((0.0, 0.0), |(c, k), h| (c + h.cpu, k + h.capacity));
        if cap > 0.0 {
            cpu / cap
        } else {
            0.0
        }
    }

    pub fn host(&self, name: &str) -> Option<&HostLoad> {
        self.hosts.iter().find(|h| h.name == name)
    }

    pub fn migrations_in_flight(&self) -> usize {
        self.zones.iter().filter(|z| z.migrating).count()
    }
}
