//! `GET /v1/host` (this host's load, JSON) and `GET /metrics` (Prometheus
//! text exposition 0.0.4): the loads of [`super::load`], and the fork,
//! fault, memory-server and migration counters.

use std::fmt::Write;
use std::sync::atomic::Ordering;

use super::load::HostLoadInfo;
use super::registry::Registry;
use super::types::vm_id;
use crate::fork::fault::FaultCounts;
use crate::migrate::Phase;
use crate::sync::lock;

/// Prometheus text: `# HELP`, `# TYPE`, then the samples.
struct Text(String);

impl Text {
    fn family(&mut self, name: &str, kind: &str, help: &str) {
        let _ = writeln!(self.0, "# HELP {name} {help}");
        let _ = writeln!(self.0, "# TYPE {name} {kind}");
    }

    fn sample(&mut self, name: &str, labels: &[(&str, &str)], v: f64) {
        self.0.push_str(name);
        if !labels.is_empty() {
            self.0.push('{');
            for (i, (k, val)) in labels.iter().enumerate() {
                if i > 0 {
                    self.0.push(',');
                }
                let esc = val
                    .replace('\\', "\\\\")
                    .replace('"', "\\\"")
                    .replace('\n', "\\n");
                let _ = write!(self.0, "{k}=\"{esc}\"");
            }
            self.0.push('}');
        }
        let _ = writeln!(self.0, " {v}");
    }

    fn one(&mut self, name: &str, kind: &str, help: &str, v: f64) {
        self.family(name, kind, help);
        self.sample(name, &[], v);
    }
}

impl Registry {
    /// `GET /v1/host`.
    pub fn host_info(&self) -> HostLoadInfo {
        let mut h = self.host_load.get();
        h.name = self.host_name();
        if let Some(c) = self.capacity_cores.get() {
            h.capacity_cores = *c;
        }
        h.vms = self.list_entries().len() as u64;
        h.hosted_clones = lock(&self.hosted)
            .values()
            .map(|f| f.running() as u64)
            .sum();
        h
    }

    /// `GET /metrics`.
    pub fn metrics_text(&self) -> String {
        let mut t = Text(String::new());
        let h = self.host_info();
        t.one(
            "forkd_host_capacity_cores",
            "gauge",
            "CPU this host offers, cores",
            h.capacity_cores,
        );
        t.one(
            "forkd_host_cpu_cores",
            "gauge",
            "CPU the daemon used per second over the last sample",
            h.cpu_cores,
        );
        t.one(
            "forkd_host_cpu_seconds_total",
            "counter",
            "CPU the daemon has used",
            h.cpu_seconds,
        );
        t.one(
            "forkd_host_resident_bytes",
            "gauge",
            "The daemon's resident memory",
            h.resident_bytes as f64,
        );
        t.one(
            "forkd_host_memory_available_bytes",
            "gauge",
            "The machine's available memory",
            h.mem_available_bytes as f64,
        );
        t.one("forkd_vms", "gauge", "VMs registered here", h.vms as f64);
        t.one(
            "forkd_hosted_clones",
            "gauge",
            "Clones running here for parents on other hosts",
            h.hosted_clones as f64,
        );
        let entries = self.list_entries();
        let loads: Vec<_> = entries
            .iter()
            .filter_map(|e| e.load.get().map(|l| (vm_id(e.id), l)))
            .collect();
        t.family(
            "forkd_vm_cpu_cores",
            "gauge",
            "vCPU time per second over the last sample",
        );
        for (id, l) in &loads {
            t.sample("forkd_vm_cpu_cores", &[("vm", id)], l.cpu_cores);
        }
        t.family("forkd_vm_cpu_seconds_total", "counter", "vCPU time used");
        for (id, l) in &loads {
            t.sample("forkd_vm_cpu_seconds_total", &[("vm", id)], l.cpu_seconds);
        }
        t.family(
            "forkd_vm_resident_bytes",
            "gauge",
            "Guest memory resident on this host",
        );
        for (id, l) in &loads {
            t.sample(
                "forkd_vm_resident_bytes",
                &[("vm", id)],
                l.resident_bytes as f64,
            );
        }
        t.family(
            "forkd_vm_dirty_pages_per_second",
            "gauge",
            "Distinct pages dirtied per second over the last dirty-rate window",
        );
        for (id, l) in &loads {
            if let Some(d) = l.dirty_pages_per_s {
                t.sample("forkd_vm_dirty_pages_per_second", &[("vm", id)], d);
            }
        }
        t.family(
            "forkd_vm_faults_per_second",
            "gauge",
            "userfaultfd faults per second: the VM's own (post-copy arrival), or its clones'",
        );
        for (id, l) in &loads {
            for (whose, v) in [("own", l.faults_per_s), ("clones", l.clone_faults_per_s)] {
                t.sample(
                    "forkd_vm_faults_per_second",
                    &[("vm", id), ("of", whose)],
                    v,
                );
            }
        }
        t.family(
            "forkd_clone_faults_per_second",
            "gauge",
            "userfaultfd faults per second of each clone of a VM's families",
        );
        for e in &entries {
            let vm = vm_id(e.id);
            for ((family, clone), r) in e.load.clone_rates() {
                let (family, clone) = (family.to_string(), clone.to_string());
                t.sample(
                    "forkd_clone_faults_per_second",
                    &[("vm", &vm), ("family", &family), ("clone", &clone)],
                    r,
                );
            }
        }
        let fc = &self.fork_counters;
        t.one(
            "forkd_forks_total",
            "counter",
            "Fork families made here (host- and guest-initiated)",
            fc.families.load(Ordering::Relaxed) as f64,
        );
        t.one(
            "forkd_fork_clones_total",
            "counter",
            "Clones those forks granted",
            fc.clones.load(Ordering::Relaxed) as f64,
        );
        let faults = self.fault_counts(&entries);
        t.family(
            "forkd_clone_faults",
            "gauge",
            "Fault counters of the clones of the families known here (local clones)",
        );
        for (kind, v) in [
            ("faults", faults.faults),
            ("pages_fetched", faults.pages_fetched),
            ("pages_avoided", faults.pages_avoided),
            ("pages_declared", faults.pages_declared),
            ("pages_prefetched", faults.pages_prefetched),
            ("fetch_requests", faults.fetch_requests),
        ] {
            t.sample("forkd_clone_faults", &[("kind", kind)], v as f64);
        }
        let m = self.memserver_info();
        t.one(
            "forkd_memserver_requests_total",
            "counter",
            "Page requests the memory server accepted",
            m.requests as f64,
        );
        t.one(
            "forkd_memserver_pages_sent_total",
            "counter",
            "Pages the memory server sent",
            m.pages_sent as f64,
        );
        t.one(
            "forkd_memserver_bytes_sent_total",
            "counter",
            "Bytes the memory server sent, unicast and multicast",
            m.bytes_sent as f64,
        );
        t.one(
            "forkd_memserver_families",
            "gauge",
            "Families the memory server serves",
            m.families as f64,
        );
        let c = &self.counters;
        t.family(
            "forkd_migrations_total",
            "counter",
            "Migrations out of this host, by outcome",
        );
        for (outcome, v) in [
            ("committed", &c.migrations_committed),
            ("aborted", &c.migrations_aborted),
            ("in_doubt", &c.migrations_in_doubt),
        ] {
            t.sample(
                "forkd_migrations_total",
                &[("outcome", outcome)],
                v.load(Ordering::Relaxed) as f64,
            );
        }
        t.one(
            "forkd_migration_bytes_sent_total",
            "counter",
            "Bytes migrations out of this host sent",
            c.migration_bytes.load(Ordering::Relaxed) as f64,
        );
        let running = lock(&self.migrations.out)
            .values()
            .filter(|r| !r.progress.phase().is_final())
            .count();
        t.one(
            "forkd_migrations_running",
            "gauge",
            "Migrations out of this host not finished",
            running as f64,
        );
        self.clients_metrics(&mut t, &entries);
        t.0
    }

    /// The client ingress's counters per VM and the guests' tick loads.
    fn clients_metrics(&self, t: &mut Text, entries: &[std::sync::Arc<super::registry::Entry>]) {
        let guests: Vec<_> = entries
            .iter()
            .filter_map(|e| lock(&e.guest_load).map(|g| (vm_id(e.id), g)))
            .collect();
        t.family(
            "forkd_vm_guest_tick_load",
            "gauge",
            "The guest's busy time of its last tick over its tick budget (0: unpaced)",
        );
        for (id, g) in &guests {
            t.sample("forkd_vm_guest_tick_load", &[("vm", id)], g.load);
        }
        t.family(
            "forkd_vm_guest_busy_seconds_total",
            "counter",
            "Time the guest's ticks were busy, by its own TSC",
        );
        for (id, g) in &guests {
            t.sample(
                "forkd_vm_guest_busy_seconds_total",
                &[("vm", id)],
                g.busy_us_total / 1e6,
            );
        }
        t.family(
            "forkd_vm_guest_ticks_total",
            "counter",
            "Ticks the guest ran",
        );
        for (id, g) in &guests {
            t.sample("forkd_vm_guest_ticks_total", &[("vm", id)], g.ticks as f64);
        }
        let Some(ingress) = self.ingress() else {
            return;
        };
        let s = ingress.stats();
        t.one(
            "forkd_client_datagrams_total",
            "counter",
            "Datagrams the client ingress received",
            s.datagrams as f64,
        );
        t.one(
            "forkd_client_bad_datagrams_total",
            "counter",
            "Datagrams the client ingress dropped as malformed",
            s.bad_datagrams as f64,
        );
        t.one(
            "forkd_client_forwarded_total",
            "counter",
            "Client updates forwarded to a clone's host",
            s.forwarded as f64,
        );
        t.one(
            "forkd_client_redirects_total",
            "counter",
            "Redirects sent for zones that migrated away",
            s.redirected as f64,
        );
        let per_vm: Vec<_> = s
            .targets
            .iter()
            .filter_map(|(k, c)| match k {
                crate::clients::Target::Vm(id) => Some((vm_id(*id), *c)),
                _ => None,
            })
            .collect();
        type Get = fn(&crate::clients::ClientCounters) -> u64;
        let series: [(&str, &str, Get); 5] = [
            ("received", "Client updates received", |c| c.received),
            ("applied", "Client updates the guest applied", |c| c.applied),
            (
                "duplicates",
                "Client updates the guest skipped as applied before",
                |c| c.duplicates,
            ),
            ("acked", "Client updates acknowledged", |c| c.acked),
            (
                "dropped",
                "Client updates dropped unacknowledged (re-sent by the client)",
                |c| c.dropped,
            ),
        ];
        for (what, help, get) in series {
            let name = format!("forkd_vm_client_updates_{what}_total");
            t.family(&name, "counter", help);
            for (id, c) in &per_vm {
                t.sample(&name, &[("vm", id)], get(c) as f64);
            }
        }
    }

    /// The fault counters of every local clone of the families known here.
    fn fault_counts(&self, entries: &[std::sync::Arc<super::registry::Entry>]) -> FaultCounts {
        let mut sum = FaultCounts::default();
        for e in entries {
            for f in e.hub.families() {
                for c in f.report().clones {
                    let k = c.faults.counts();
                    sum.faults += k.faults;
                    sum.pages_fetched += k.pages_fetched;
                    sum.pages_avoided += k.pages_avoided;
                    sum.pages_declared += k.pages_declared;
                    sum.pages_prefetched += k.pages_prefetched;
                    sum.fetch_requests += k.fetch_requests;
                }
            }
        }
        sum
    }

    /// Counts a migration's outcome once its final phase is published.
    pub(super) fn count_migration(&self, phase: Phase, bytes: u64) {
        let c = &self.counters;
        let counter = match phase {
            Phase::Committed => &c.migrations_committed,
            Phase::Aborted => &c.migrations_aborted,
            _ => &c.migrations_in_doubt,
        };
        counter.fetch_add(1, Ordering::Relaxed);
        c.migration_bytes.fetch_add(bytes, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::Text;

    #[test]
    fn exposition_format() {
        let mut t = Text(String::new());
        t.family("x_total", "counter", "an x");
        t.sample("x_total", &[("vm", "a\"b")], 3.0);
        t.one("y", "gauge", "a y", 0.5);
        assert_eq!(
            t.0,
            "# HELP x_total an x\n# TYPE x_total counter\nx_total{vm=\"a\\\"b\"} 3\n# HELP y a y\n# TYPE y gauge\ny 0.5\n"
        );
    }
}
