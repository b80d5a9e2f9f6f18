//! Live migration through the API.
//!
//! Source: `POST /v1/vms/{id}/migrate` takes the VM out of its registry
//! entry (fork and DELETE answer 409 meanwhile), asks the destination
//! daemon to open an incoming migration (`POST /v1/migrations`, daemon to
//! daemon with the cluster's bearer token: a port on its address and a
//! one-time secret), answers 202 and hands the VM to a worker thread that
//! runs [`sender::migrate`] — no registry lock is held while it runs.
//! Committed: the VM is destroyed and forgotten here. Aborted: the VM,
//! running again, goes back into its entry. In doubt (commit sent, no
//! answer): the worker asks the destination to abort
//! (`DELETE /v1/migrations/{id}`), which answers with its one decision
//! (see [`crate::migrate::receiver::CommitGate`]); the VM resumes here only
//! if the destination aborted or its daemon is gone (connection refused).
//! `GET /v1/vms/{id}/migration` shows the progress and the report, also
//! after the VM has left.
//!
//! Destination: `POST /v1/migrations` binds a listener, starts a receiver
//! thread ([`receiver::receive`]) and answers with the port and secret; at
//! commit the VM is registered under an id reserved at open time, with a
//! fork hub of its own. `GET /v1/migrations/{id}` shows what arrived.

use std::io::Read;
use std::net::{SocketAddr, TcpListener};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::body::Bytes;
use axum::extract::rejection::{BytesRejection, PathRejection};
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::{Deserialize, Serialize};

use super::error::ApiError;
use super::extract::{blocking, parse_body, vm_path};
use super::migration_clone::Subject;
pub use super::migration_open::{OpenIncoming, PendingTicket};
use super::migration_table::{trim, InRecord, OutRecord};
use super::registry::{Adopted, Registry};
use super::types::{parse_vm_id, vm_id};
use crate::fork::envelope::{from_hex, to_hex};
use crate::fork::parent::ForkTuning;
use crate::guest::default_guest;
use crate::migrate::receiver::{self, CommitGate, GateState, Incoming, ReceiveProgress};
use crate::migrate::sender::{self, MigrateError, Outgoing};
use crate::migrate::{MigrateOptions, Mode, Phase, Progress, ProgressView};
use crate::sync::lock;
use crate::vmm::devices::Console;
use crate::vmm::memory::check_size;
use crate::vmm::vm::{BuildOptions, MAX_VCPUS};

const OPEN_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a destination waits for its source to connect.
const ACCEPT_TIMEOUT: Duration = Duration::from_secs(10);
const MAX_DOWNTIME_MS: u64 = 60_000;
const MAX_BANDWIDTH_MIB_S: u64 = 1 << 20;
/// Incoming migrations open (not yet committed or aborted) at once.
const MAX_INCOMING: usize = 8;
/// Pending fork tickets a migrating VM takes along, at most.
const MAX_TICKETS: usize = 64;

fn default_downtime() -> u64 {
    30
}

fn default_mode() -> String {
    "precopy".into()
}

/// `POST /v1/vms/{id}/migrate`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MigrateVm {
    pub destination: String,
    #[serde(default = "default_downtime")]
    pub downtime_ms: u64,
    #[serde(default)]
    pub bandwidth_mib_s: u64,
    #[serde(default = "default_mode")]
    pub mode: String,
}

#[derive(Debug, Serialize)]
pub struct MigrationStarted {
    pub vm: String,
    pub destination: String,
    pub phase: Phase,
}

/// `GET /v1/vms/{id}/migration`.
#[derive(Debug, Serialize)]
pub struct MigrationStatus {
    pub vm: String,
    pub destination: String,
    pub mode: String,
    pub downtime_ms: u64,
    pub bandwidth_mib_s: u64,
    /// Guest memory populated when the migration began: what round 0
    /// carries at most (the CLI's progress bar measures against it).
    pub populated_bytes: u64,
    #[serde(flatten)]
    pub progress: ProgressView,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct IncomingOpened {
    pub id: u64,
    pub port: u16,
    /// 32 bytes, hex.
    pub secret: String,
    /// The id the VM will have here once committed: its own.
    pub vm: String,
}

/// `GET|DELETE /v1/migrations/{id}`.
#[derive(Debug, Serialize, Deserialize)]
pub struct IncomingStatus {
    pub id: u64,
    pub source: String,
    /// `open`, `committed` or `aborted`.
    pub state: String,
    pub vm: String,
    pub pages_received: u64,
    pub bytes_received: u64,
    pub rounds: u32,
    pub rejected: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub last_rejection: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// Post-copy: pages fetched from the source after resuming, those
    /// still missing, and commit until the last one was here.
    #[serde(default)]
    pub postcopy_pages_needed: u64,
    #[serde(default)]
    pub postcopy_pages_left: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub postcopy_window_us: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub postcopy_error: Option<String>,
}

/// How an in-doubt commit was resolved.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Resolution {
    /// The destination committed: the guest runs there.
    Committed,
    /// The destination aborted (or is gone): the guest was resumed here.
    Resumed,
    /// No answer: the guest stays paused here.
    Unknown,
}

fn random_secret() -> Result<[u8; 32], ApiError> {
    let mut s = [0u8; 32];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut s))
        .map_err(|e| ApiError::Internal(format!("random secret: {e}")))?;
    Ok(s)
}

fn gate_name(s: GateState) -> &'static str {
    match s {
        GateState::Open => "open",
        GateState::Committed => "committed",
        GateState::Aborted => "aborted",
    }
}

fn in_status(r: &InRecord, state: GateState) -> IncomingStatus {
    let v = r.progress.view();
    IncomingStatus {
        id: r.id,
        source: r.source.clone(),
        state: gate_name(state).into(),
        vm: r.vm.clone(),
        pages_received: v.pages_received,
        bytes_received: v.bytes_received,
        rounds: v.rounds,
        rejected: v.rejected,
        last_rejection: v.last_rejection,
        error: lock(&r.error).clone(),
        postcopy_pages_needed: v.postcopy_pages_needed,
        postcopy_pages_left: v.postcopy_pages_left,
        postcopy_window_us: v.postcopy_window_us,
        postcopy_error: v.postcopy_error,
    }
}

/// The guest memory populated now (0 if pagemap cannot say).
fn populated_bytes(vm: &crate::vmm::Vm) -> u64 {
    crate::vmm::dirty::populated_pages(vm.memory())
        .map(|p| p.count_ones() as u64 * crate::vmm::page_bitmap::PAGE_SIZE)
        .unwrap_or(0)
}

fn status(r: &OutRecord) -> MigrationStatus {
    MigrationStatus {
        vm: r.vm.clone(),
        destination: r.destination.clone(),
        mode: r.mode.clone(),
        downtime_ms: r.downtime_ms,
        bandwidth_mib_s: r.bandwidth_mib_s,
        populated_bytes: r.populated_bytes,
        progress: r.progress.view(),
    }
}

impl Registry {
    /// `POST /v1/vms/{id}/migrate`: checks, opens the destination, starts
    /// the worker; the migration runs on after this returns.
    pub fn migrate(
        self: &Arc<Self>,
        id: u64,
        req: MigrateVm,
    ) -> Result<MigrationStarted, ApiError> {
        let mode = Mode::parse(&req.mode).ok_or_else(|| {
            ApiError::BadRequest(format!(
                "mode '{}': expected \"precopy\", \"postcopy\" or \"auto\"",
                req.mode
            ))
        })?;
        if req.downtime_ms == 0 || req.downtime_ms > MAX_DOWNTIME_MS {
            return Err(ApiError::BadRequest(format!(
                "downtime_ms: 1..={MAX_DOWNTIME_MS}"
            )));
        }
        if req.bandwidth_mib_s > MAX_BANDWIDTH_MIB_S {
            return Err(ApiError::BadRequest(format!(
                "bandwidth_mib_s: 0 (no cap) ..={MAX_BANDWIDTH_MIB_S}"
            )));
        }
        let peers = self
            .peers()
            .cloned()
            .ok_or(ApiError::NoCluster("migrate VMs"))?;
        if req.destination == peers.name() {
            return Err(ApiError::Unprocessable(format!(
                "destination '{}' is this host",
                req.destination
            )));
        }
        let dest_addr = peers
            .addr(&req.destination)
            .map_err(|_| ApiError::Unprocessable(format!("unknown host '{}'", req.destination)))?;
        let fetching = lock(&self.migrations.incoming)
            .values()
            .any(|r| r.vm == vm_id(id) && r.progress.view().postcopy_pending());
        if fetching {
            return Err(ApiError::Conflict(format!(
                "{} arrived by post-copy and still fetches its memory from its source; migrate it once that is done",
                vm_id(id)
            )));
        }
        let (subject, vm, open) = self.take_subject(id, &req.destination, mode)?;
        let populated_bytes = populated_bytes(&vm);
        let opened = serde_json::to_vec(&open)
            .map_err(|e| ApiError::Internal(e.to_string()))
            .and_then(|body| {
                let (status, resp) = peers
                    .call(
                        &req.destination,
                        "POST",
                        "/v1/migrations",
                        Some(&body),
                        OPEN_TIMEOUT,
                    )
                    .map_err(|e| ApiError::BadGateway(e.to_string()))?;
                if status != 201 {
                    let why =
                        super::peers::Peers::refused(&req.destination, status, &resp).to_string();
                    // The id is taken there: the same conflict here.
                    return Err(if status == 409 {
                        ApiError::Conflict(why)
                    } else {
                        ApiError::BadGateway(why)
                    });
                }
                serde_json::from_slice::<IncomingOpened>(&resp)
                    .map_err(|e| ApiError::BadGateway(format!("the destination's answer: {e}")))
            });
        let opened = match opened {
            Ok(o) => o,
            Err(e) => {
                subject.give_back(self, vm);
                return Err(e);
            }
        };
        let mut secret = [0u8; 32];
        match from_hex(&opened.secret) {
            Some(s) if s.len() == 32 => secret.copy_from_slice(&s),
            _ => {
                subject.give_back(self, vm);
                return Err(ApiError::BadGateway(
                    "the destination's secret is malformed".into(),
                ));
            }
        }
        let record = Arc::new(OutRecord {
            vm: vm_id(id),
            destination: req.destination.clone(),
            mode: req.mode.clone(),
            downtime_ms: req.downtime_ms,
            bandwidth_mib_s: req.bandwidth_mib_s,
            populated_bytes,
            progress: Progress::default(),
        });
        {
            let mut out = lock(&self.migrations.out);
            out.insert(id, record.clone());
            trim(&mut out, |r| r.progress.phase().is_final());
        }
        let out = Outgoing {
            addr: SocketAddr::new(dest_addr.ip(), opened.port),
            secret,
            source: open.source,
            memserver: Some(self.memserver.clone()),
        };
        let opts = MigrateOptions {
            mode,
            downtime: Duration::from_millis(req.downtime_ms),
            bandwidth_mib_s: req.bandwidth_mib_s,
            family_backed: subject.is_clone(),
            ..MigrateOptions::default()
        };
        let reg = self.clone();
        let dest = req.destination.clone();
        // The VM goes to the worker once it runs: if it cannot start, the
        // VM is still here to be given back.
        let (handover, vm_rx) = std::sync::mpsc::sync_channel::<(Subject, crate::vmm::Vm)>(1);
        let worker_record = record.clone();
        let worker = std::thread::Builder::new()
            .name(format!("migrate-{}", vm_id(id)))
            .spawn(move || {
                let record = worker_record;
                let Ok((subject, mut vm)) = vm_rx.recv() else {
                    return;
                };
                let result = sender::migrate(&mut vm, &out, &opts, &record.progress);
                let doubt = match &result {
                    Err(MigrateError::InDoubt(why)) => {
                        Some(reg.resolve_in_doubt(&dest, opened.id, why, &mut vm))
                    }
                    _ => None,
                };
                if let Err(e) = &result {
                    tracing::warn!("migration of {} did not commit: {e}", vm_id(id));
                }
                let committed = result.is_ok() || doubt == Some(Resolution::Committed);
                // The VM where it belongs first, then the final phase.
                if committed {
                    subject.committed(&reg, id, vm, &dest);
                } else {
                    subject.give_back(&reg, vm);
                }
                let p = &record.progress;
                // Post-copy: serve the rest until the destination has it.
                let result = result.map(|m| {
                    let mut report = m.report;
                    if let Some(tail) = m.postcopy {
                        report.postcopy = Some(tail.finish(p));
                    }
                    report
                });
                let why = result.as_ref().err().map(|e| e.to_string()).unwrap_or_default();
                let counted = p.bytes_sent();
                match doubt {
                    None => sender::conclude(p, result.as_ref()),
                    Some(Resolution::Committed) => p.finish(
                        Phase::Committed,
                        None,
                        Some(format!("{why}; the destination confirmed the commit")),
                    ),
                    Some(Resolution::Resumed) => p.finish(
                        Phase::Aborted,
                        None,
                        Some(format!("{why}; the destination aborted: the guest runs here again")),
                    ),
                    Some(Resolution::Unknown) => p.finish(
                        Phase::InDoubt,
                        None,
                        Some(format!("{why}; the destination cannot say whether it committed: the guest stays paused here")),
                    ),
                }
                reg.count_migration(p.phase(), counted);
            });
        if let Err(e) = worker {
            subject.give_back(self, vm);
            let why = format!("migration worker: {e}");
            record
                .progress
                .finish(Phase::Aborted, None, Some(why.clone()));
            return Err(ApiError::Internal(why));
        }
        if let Err(std::sync::mpsc::SendError((subject, vm))) = handover.send((subject, vm)) {
            subject.give_back(self, vm);
            return Err(ApiError::Internal(
                "the migration worker ended at once".into(),
            ));
        }
        Ok(MigrationStarted {
            vm: vm_id(id),
            destination: req.destination,
            phase: Phase::Connecting,
        })
    }

    /// Commit sent, no answer: the destination decides (it aborts unless
    /// it committed). Whether the guest now runs there; if the destination
    /// aborted (or its daemon is gone), the guest is resumed here.
    fn resolve_in_doubt(
        &self,
        dest: &str,
        mig: u64,
        why: &str,
        vm: &mut crate::vmm::Vm,
    ) -> Resolution {
        let Some(peers) = self.peers() else {
            return Resolution::Unknown;
        };
        let path = format!("/v1/migrations/{mig}");
        let answer = peers.call(dest, "DELETE", &path, None, OPEN_TIMEOUT);
        let state = match &answer {
            Ok((200, body)) => serde_json::from_slice::<IncomingStatus>(body)
                .map(|s| s.state)
                .unwrap_or_default(),
            // No daemon there any more: nothing of the guest runs there.
            Err(e) if e.to_string().contains("refused") => "aborted".into(),
            _ => String::new(),
        };
        tracing::warn!("migration in doubt ({why}): the destination says '{state}'");
        match state.as_str() {
            "committed" => Resolution::Committed,
            "aborted" => {
                if let Err(e) = vm.stop_dirty_log() {
                    tracing::warn!("stopping the dirty log after an aborted commit: {e}");
                }
                if let Err(e) = vm.resume() {
                    tracing::warn!("resuming after an aborted commit: {e}");
                }
                Resolution::Resumed
            }
            _ => Resolution::Unknown,
        }
    }

    /// `DELETE /v1/vms/{id}/migration`: cancels a migration that has not
    /// sent its commit (the guest then runs on here).
    pub fn cancel_migration(&self, id: u64) -> Result<MigrationStatus, ApiError> {
        let r = self.out_record(id)?;
        let phase = r.progress.phase();
        if phase.is_final() || phase == Phase::Committing {
            return Err(ApiError::Conflict(format!(
                "the migration of {} cannot be cancelled: it is {}",
                vm_id(id),
                serde_json::to_value(phase)
                    .ok()
                    .and_then(|v| v.as_str().map(str::to_owned))
                    .unwrap_or_default()
            )));
        }
        r.progress.cancel();
        Ok(status(&r))
    }

    /// Cancels the migration of `id` if one is under way (its VM is
    /// being killed); a commit already sent goes on.
    pub(super) fn cancel_out(&self, id: u64) {
        if let Some(r) = lock(&self.migrations.out).get(&id) {
            if !r.progress.phase().is_final() {
                r.progress.cancel();
            }
        }
    }

    fn out_record(&self, id: u64) -> Result<Arc<OutRecord>, ApiError> {
        lock(&self.migrations.out)
            .get(&id)
            .cloned()
            .ok_or_else(|| ApiError::NoSuchMigration(vm_id(id)))
    }

    pub fn migration_status(&self, id: u64) -> Result<MigrationStatus, ApiError> {
        Ok(status(&*self.out_record(id)?))
    }

    /// `POST /v1/migrations`: a VM is coming; listen for it.
    pub fn open_incoming(self: &Arc<Self>, req: OpenIncoming) -> Result<IncomingOpened, ApiError> {
        if self.peers().is_none() {
            return Err(ApiError::NoCluster("receive migrations"));
        }
        if self.is_closed() {
            return Err(ApiError::ShuttingDown);
        }
        let mem_bytes =
            check_size(req.mem_mib).map_err(|e| ApiError::BadRequest(format!("mem_mib: {e}")))?;
        if req.vcpus == 0 || req.vcpus > MAX_VCPUS as u64 {
            return Err(ApiError::BadRequest(format!("vcpus: 1..={MAX_VCPUS}")));
        }
        if req.source.len() > 256 || req.name.as_ref().is_some_and(|n| n.len() > 256) {
            return Err(ApiError::BadRequest("source or name too long".into()));
        }
        let vm_num = parse_vm_id(&req.vm)
            .ok_or_else(|| ApiError::BadRequest(format!("vm '{}': expected vm-N", req.vm)))?;
        if req.tickets.len() > MAX_TICKETS {
            return Err(ApiError::BadRequest(format!(
                "tickets: at most {MAX_TICKETS}"
            )));
        }
        let open = lock(&self.migrations.incoming)
            .values()
            .filter(|r| r.gate.state().0 == GateState::Open && lock(&r.error).is_none())
            .count();
        if open >= MAX_INCOMING {
            return Err(ApiError::Conflict(format!(
                "{open} incoming migrations are open already (at most {MAX_INCOMING})"
            )));
        }
        // A clone joins its family's share here; any other VM is one of
        // this host's booted VMs.
        let family = match &req.clone {
            Some(o) if !req.tickets.is_empty() => {
                return Err(ApiError::BadRequest(format!(
                    "clone {}: clones hold no fork tickets",
                    o.clone_id
                )))
            }
            Some(o) => Some(self.check_origin(o)?),
            None => {
                self.check_room()?;
                None
            }
        };
        let mig = self.migrations.next_in.fetch_add(1, Ordering::Relaxed) + 1;
        // Held until the receiver ends (the VM registered, or gone).
        let id_hold = self.reserve_incoming_id(vm_num, mig)?;
        let listener = TcpListener::bind(SocketAddr::new(self.memserver_ip(), 0))
            .map_err(|e| ApiError::Internal(format!("migration listener: {e}")))?;
        let port = listener
            .local_addr()
            .map_err(|e| ApiError::Internal(e.to_string()))?
            .port();
        let secret = random_secret()?;
        let record = Arc::new(InRecord {
            id: mig,
            source: req.source.clone(),
            vm: vm_id(vm_num),
            gate: CommitGate::default(),
            progress: ReceiveProgress::default(),
            error: Mutex::new(None),
        });
        {
            let mut all = lock(&self.migrations.incoming);
            all.insert(mig, record.clone());
            trim(&mut all, |r| r.gate.state().0 != GateState::Open);
        }
        // A clone's hypercalls are its own (the receiver makes them with
        // its memory); a booted VM gets a fork hub with its tickets.
        let hub = req.clone.is_none().then(|| {
            let hub = self.new_hub(
                vm_num,
                ForkTuning {
                    distribution: Default::default(),
                    heuristics: true,
                },
            );
            let tickets: Vec<_> = req.tickets.iter().map(|t| (t.id, t.clones)).collect();
            hub.adopt_tickets(&tickets);
            hub
        });
        let inc = Incoming {
            secret,
            mem_bytes,
            accept_timeout: ACCEPT_TIMEOUT,
            io_timeout: MigrateOptions::default().io_timeout,
            family,
        };
        let build = BuildOptions {
            console: Console::new(false, req.name.as_deref()),
            hypercalls: hub
                .clone()
                .map(|h| h as Arc<dyn crate::vmm::services::HypercallService>),
            memory_server: None,
            started: Instant::now(),
        };
        let origin = req.clone.clone();
        let meta = Adopted {
            id: vm_num,
            name: req.name.clone(),
            cmdline: req.cmdline.clone(),
            mem_mib: req.mem_mib,
            vcpus: req.vcpus,
            guest: req.guest.clone().unwrap_or_else(default_guest),
        };
        let reg = self.clone();
        let rec = record.clone();
        std::thread::Builder::new()
            .name(format!("migrate-in-{mig}"))
            .spawn(move || {
                let r = receiver::receive(listener, &inc, build, &rec.gate, &rec.progress, |vm| {
                    let adopted = match (origin, hub) {
                        (Some(o), _) => reg.adopt_clone(&o, vm_num, vm, rec.progress.faults()),
                        (None, Some(hub)) => reg.adopt(vm, hub, meta),
                        (None, None) => Err(ApiError::Internal("no fork hub".into())),
                    };
                    adopted.map(|()| vm_id(vm_num)).map_err(|e| e.to_string())
                });
                if let Err(e) = r {
                    tracing::warn!("incoming migration {mig} from {}: {e}", rec.source);
                    *lock(&rec.error) = Some(e.to_string());
                }
                drop(id_hold);
            })
            .map_err(|e| ApiError::Internal(format!("migration receiver: {e}")))?;
        Ok(IncomingOpened {
            id: mig,
            port,
            secret: to_hex(&secret),
            vm: vm_id(vm_num),
        })
    }

    fn incoming(&self, mig: u64) -> Result<Arc<InRecord>, ApiError> {
        lock(&self.migrations.incoming)
            .get(&mig)
            .cloned()
            .ok_or_else(|| ApiError::NoSuchMigration(mig.to_string()))
    }

    pub fn incoming_status(&self, mig: u64) -> Result<IncomingStatus, ApiError> {
        let r = self.incoming(mig)?;
        Ok(in_status(&r, r.gate.state().0))
    }

    /// Aborts an incoming migration unless it committed; the decision.
    pub fn abort_incoming(&self, mig: u64) -> Result<IncomingStatus, ApiError> {
        let r = self.incoming(mig)?;
        let (state, _) = r.gate.abort();
        if state == GateState::Aborted {
            // Nothing of it will be registered: the id is free again.
            if let Some(n) = parse_vm_id(&r.vm) {
                self.release_incoming_id(n, mig);
            }
        }
        Ok(in_status(&r, state))
    }
}

pub(super) async fn delete_migration(
    State(reg): State<Arc<Registry>>,
    path: Result<Path<String>, PathRejection>,
) -> Result<Response, ApiError> {
    let id = vm_path(path)?;
    Ok((StatusCode::ACCEPTED, Json(reg.cancel_migration(id)?)).into_response())
}

pub(super) async fn post_migrate(
    State(reg): State<Arc<Registry>>,
    path: Result<Path<String>, PathRejection>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let id = vm_path(path)?;
    let req: MigrateVm = parse_body(body)?;
    let started = blocking(move || reg.migrate(id, req)).await?;
    Ok((StatusCode::ACCEPTED, Json(started)).into_response())
}

pub(super) async fn get_migration(
    State(reg): State<Arc<Registry>>,
    path: Result<Path<String>, PathRejection>,
) -> Result<Response, ApiError> {
    let id = vm_path(path)?;
    Ok(Json(reg.migration_status(id)?).into_response())
}

fn mig_path(path: Result<Path<String>, PathRejection>) -> Result<u64, ApiError> {
    let Path(id) = path.map_err(|e| ApiError::BadRequest(e.body_text()))?;
    id.parse()
        .map_err(|_| ApiError::BadRequest(format!("migration id '{id}': expected an integer")))
}

pub(super) async fn post_incoming(
    State(reg): State<Arc<Registry>>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let req: OpenIncoming = parse_body(body)?;
    let opened = blocking(move || reg.open_incoming(req)).await?;
    Ok((StatusCode::CREATED, Json(opened)).into_response())
}

pub(super) async fn get_incoming(
    State(reg): State<Arc<Registry>>,
    path: Result<Path<String>, PathRejection>,
) -> Result<Response, ApiError> {
    let id = mig_path(path)?;
    Ok(Json(reg.incoming_status(id)?).into_response())
}

pub(super) async fn delete_incoming(
    State(reg): State<Arc<Registry>>,
    path: Result<Path<String>, PathRejection>,
) -> Result<Response, ApiError> {
    let id = mig_path(path)?;
    Ok(Json(reg.abort_incoming(id)?).into_response())
}
