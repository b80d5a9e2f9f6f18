//! Routes and handlers. Bodies are parsed here (so every rejection is a
//! JSON error); the work that blocks (boot, fork, kill) runs on tokio's
//! blocking pool.

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::rejection::{BytesRejection, PathRejection};
use axum::extract::{Path, State};
use axum::http::{header, HeaderValue, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};

use super::cluster_links::ClusterLinks;
use super::error::ApiError;
use super::extract::{blocking, parse_body, vm_path};
use super::migration;
use super::registry::Registry;
use super::types::{vm_id, CreateVm, Created, ForkVm, MemServerInfo, PostFamily, VmList, VmState};

type Reg = State<Arc<Registry>>;

/// The router's state: the registry, and beside it the control-plane
/// links (handlers take either, `axum::extract::FromRef`).
#[derive(Clone)]
struct AppState {
    reg: Arc<Registry>,
    links: Arc<ClusterLinks>,
}

impl axum::extract::FromRef<AppState> for Arc<Registry> {
    fn from_ref(s: &AppState) -> Self {
        s.reg.clone()
    }
}

impl axum::extract::FromRef<AppState> for Arc<ClusterLinks> {
    fn from_ref(s: &AppState) -> Self {
        s.links.clone()
    }
}

type Links = State<Arc<ClusterLinks>>;

pub fn router(registry: Arc<Registry>, links: Arc<ClusterLinks>) -> Router {
    Router::new()
        .route("/v1/vms", get(list).post(create))
        .route("/v1/vms/{id}", get(show).delete(remove))
        .route("/v1/vms/{id}/fork", axum::routing::post(fork))
        .route("/v1/vms/{id}/join", axum::routing::post(join))
        .route("/v1/vms/{id}/console", get(console))
        .route(
            "/v1/vms/{id}/migrate",
            axum::routing::post(migration::post_migrate),
        )
        .route(
            "/v1/vms/{id}/migration",
            get(migration::get_migration).delete(migration::delete_migration),
        )
        .route(
            "/v1/migrations",
            axum::routing::post(migration::post_incoming),
        )
        .route(
            "/v1/migrations/{id}",
            get(migration::get_incoming).delete(migration::delete_incoming),
        )
        .route("/v1/families", axum::routing::post(post_family))
        .route(
            "/v1/families/{family}",
            get(show_family).delete(remove_family),
        )
        .route("/v1/memserver", get(memserver))
        .route("/v1/host", get(host))
        .route("/v1/clients", get(clients))
        .route("/v1/cluster", get(cluster))
        .route("/v1/policy", get(policy))
        .route("/v1/policy/decisions", get(decisions))
        .route("/metrics", get(metrics))
        .route("/v1/openapi.json", get(openapi))
        .fallback(no_route)
        .method_not_allowed_fallback(method_not_allowed)
        .with_state(AppState {
            reg: registry,
            links,
        })
}

/// The API's description, `forkd/api/openapi.json`.
pub const OPENAPI: &str = include_str!("../../api/openapi.json");

async fn openapi() -> impl IntoResponse {
    ([(header::CONTENT_TYPE, "application/json")], OPENAPI)
}

async fn memserver(State(reg): Reg) -> Json<MemServerInfo> {
    Json(reg.memserver_info())
}

async fn cluster(State(links): Links) -> Result<Json<super::etcd::ClusterView>, ApiError> {
    let link = etcd_link(&links)?;
    super::etcd::read_cluster(&link)
        .await
        .map(Json)
        .map_err(|e| ApiError::BadGateway(e.to_string()))
}

fn etcd_link(links: &ClusterLinks) -> Result<Arc<super::etcd::EtcdLink>, ApiError> {
    links
        .etcd
        .clone()
        .ok_or_else(|| ApiError::Conflict("this daemon has no cluster state (--etcd)".into()))
}

async fn policy(
    State(links): Links,
) -> Result<Json<super::controller::ControllerStatus>, ApiError> {
    links
        .controller
        .as_ref()
        .map(|c| Json(c.status()))
        .ok_or_else(|| {
            ApiError::Conflict("this daemon runs no policy controller (--policy)".into())
        })
}

async fn decisions(
    State(links): Links,
) -> Result<Json<Vec<super::controller::DecisionRecord>>, ApiError> {
    let link = etcd_link(&links)?;
    super::controller::read_decisions(&link)
        .await
        .map(Json)
        .map_err(|e| ApiError::BadGateway(e.to_string()))
}

async fn host(State(reg): Reg) -> Json<super::load::HostLoadInfo> {
    Json(reg.host_info())
}

/// The client ingress (404 when this daemon runs none).
async fn clients(State(reg): Reg) -> Result<Json<super::updates::ClientsInfo>, ApiError> {
    reg.clients_info().map(Json).ok_or(ApiError::NoRoute {
        method: "GET".into(),
        path: "/v1/clients (this daemon runs no client ingress: --clients-udp off)".into(),
    })
}

/// Prometheus text exposition.
async fn metrics(State(reg): Reg) -> impl IntoResponse {
    (
        [(
            axum::http::header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        reg.metrics_text(),
    )
}

async fn list(State(reg): Reg) -> Json<VmList> {
    Json(VmList { vms: reg.list() })
}

async fn create(
    State(reg): Reg,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let req: CreateVm = parse_body(body)?;
    let id = blocking(move || reg.create(req)).await?;
    let id = vm_id(id);
    let location = HeaderValue::from_str(&format!("/v1/vms/{id}"))
        .map_err(|e| ApiError::Internal(e.to_string()))?;
    let created = Created {
        id,
        state: VmState::Running,
    };
    Ok((
        StatusCode::CREATED,
        [(header::LOCATION, location)],
        Json(created),
    )
        .into_response())
}

async fn show(
    State(reg): Reg,
    path: Result<Path<String>, PathRejection>,
) -> Result<Response, ApiError> {
    let id = vm_path(path)?;
    Ok(Json(reg.detail(id)?).into_response())
}

async fn console(
    State(reg): Reg,
    path: Result<Path<String>, PathRejection>,
) -> Result<Response, ApiError> {
    let id = vm_path(path)?;
    Ok(Json(reg.console(id)?).into_response())
}

async fn fork(
    State(reg): Reg,
    path: Result<Path<String>, PathRejection>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let id = vm_path(path)?;
    let req: ForkVm = parse_body(body)?;
    let forked = blocking(move || reg.fork(id, req)).await?;
    Ok(Json(forked).into_response())
}

async fn join(
    State(reg): Reg,
    path: Result<Path<String>, PathRejection>,
) -> Result<Response, ApiError> {
    let id = vm_path(path)?;
    let joined = blocking(move || reg.join(id)).await?;
    Ok(Json(joined).into_response())
}

fn family_path(path: Result<Path<String>, PathRejection>) -> Result<u64, ApiError> {
    let Path(id) = path.map_err(|e| ApiError::BadRequest(e.body_text()))?;
    id.parse()
        .map_err(|_| ApiError::BadRequest(format!("family id '{id}': expected an integer")))
}

/// Daemon to daemon: a family envelope from a parent's host.
async fn post_family(
    State(reg): Reg,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let req: PostFamily = parse_body(body)?;
    let st = blocking(move || reg.host_family(req)).await?;
    Ok((StatusCode::CREATED, Json(st)).into_response())
}

async fn show_family(
    State(reg): Reg,
    path: Result<Path<String>, PathRejection>,
) -> Result<Response, ApiError> {
    let id = family_path(path)?;
    Ok(Json(reg.family_status(id)?).into_response())
}

async fn remove_family(
    State(reg): Reg,
    path: Result<Path<String>, PathRejection>,
) -> Result<StatusCode, ApiError> {
    let id = family_path(path)?;
    blocking(move || reg.kill_family(id)).await?;
    Ok(StatusCode::NO_CONTENT)
}

async fn remove(
    State(reg): Reg,
    path: Result<Path<String>, PathRejection>,
) -> Result<StatusCode, ApiError> {
    let id = vm_path(path)?;
    blocking(move || reg.remove(id)).await?;
    Ok(StatusCode::NO_CONTENT)
}

async fn no_route(method: Method, uri: Uri) -> ApiError {
    ApiError::NoRoute {
        method: method.to_string(),
        path: uri.path().to_string(),
    }
}

async fn method_not_allowed(method: Method, uri: Uri) -> ApiError {
    ApiError::MethodNotAllowed {
        method: method.to_string(),
        path: uri.path().to_string(),
    }
}
