//! The daemon's links to the cluster's control plane, beside the registry
//! (which knows neither): its etcd link (`--etcd`) and its policy
//! controller candidate (`--policy`).

use std::sync::Arc;

use super::controller::Controller;
use super::etcd::EtcdLink;

#[derive(Default)]
pub struct ClusterLinks {
    pub etcd: Option<Arc<EtcdLink>>,
    pub controller: Option<Arc<Controller>>,
}
