//! What the agent tells its operators: readiness ([`Health`]) and Prometheus metrics
//! ([`Metrics`]), served over HTTP by [`serve`].
//!
//! Endpoints (one listener, `--http-address`):
//! - `/healthz`: 200 `ok` while the agent's runtime answers (liveness).
//! - `/readyz`: 200 `ok` once the datapath is loaded, the cluster synced at least once (when the
//!   agent follows one) and the CNI socket serves; else 503 naming what is not ready.
//! - `/metrics`: OpenMetrics text. The datapath's figures are read from its pinned maps at
//!   scrape time:
//!   - `podwire_datapath_packets_total{reason}`, `podwire_datapath_bytes_total{reason}`
//!     (counters): packets and bytes by verdict reason, summed over CPUs.
//!   - `podwire_endpoints` (gauge): pod endpoints in the endpoint map.
//!   - `podwire_node_table_entries` (gauge): entries of the node table (pod CIDRs, node
//!     addresses, the cluster range).
//!   - `podwire_cluster_nodes` (gauge): nodes in the last cluster snapshot applied.
//!   - `podwire_cluster_syncs_total` (counter): cluster snapshots applied.
//!   - `podwire_cluster_sync_errors_total` (counter): failed watches/reads of the cluster and
//!     failed applies of a snapshot.
//!   - `podwire_cluster_last_sync_timestamp_seconds` (gauge): Unix time of the last snapshot
//!     applied.
//!   - `podwire_cni_request_duration_seconds{command,request,result}` (histogram): the time
//!     the agent took to answer the plugin, by CNI command (ADD, DEL, CHECK, GC, STATUS), the
//!     agent request serving it (an ADD is an `allocate` and a `register`, a DEL a `release`)
//!     and result (`ok`, `error`).

use std::{
    net::SocketAddr,
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Arc,
    },
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use axum::{
    extract::State,
    http::{header, StatusCode},
    response::IntoResponse,
    routing::get,
    Router,
};
use podwire_core::{api::Request, pins::Pins};
use podwire_datapath::{Counters, DatapathMap as _, Endpoints, NodeTable};
use prometheus_client::{
    collector::Collector,
    encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric as _},
    metrics::{
        counter::{ConstCounter, Counter},
        family::Family,
        gauge::{ConstGauge, Gauge},
        histogram::{exponential_buckets, Histogram},
        MetricType,
    },
    registry::Registry,
};
use tokio::net::TcpListener;
use tracing::debug;

/// Default address of the health and metrics listener (Cilium's agent uses 9962 for metrics).
pub const DEFAULT_HTTP_ADDRESS: &str = "127.0.0.1:9962";

/// What readiness waits for; each set once, when it becomes true.
#[derive(Debug)]
pub struct Health {
    datapath_loaded: AtomicBool,
    cluster_synced: AtomicBool,
    cni_serving: AtomicBool,
}

impl Health {
    /// Nothing ready yet. An agent that follows no cluster (`--pod-cidr`) counts as synced, one
    /// that serves no CNI requests (only `--iface`s) as serving.
    pub fn new(follows_cluster: bool, serves_cni: bool) -> Health {
        Health {
            datapath_loaded: AtomicBool::new(false),
            cluster_synced: AtomicBool::new(!follows_cluster),
            cni_serving: AtomicBool::new(!serves_cni),
        }
    }

    pub fn set_datapath_loaded(&self) {
        self.datapath_loaded.store(true, Ordering::Relaxed);
    }

    pub fn set_cluster_synced(&self) {
        self.cluster_synced.store(true, Ordering::Relaxed);
    }

    pub fn set_cni_serving(&self) {
        self.cni_serving.store(true, Ordering::Relaxed);
    }

    pub fn datapath_loaded(&self) -> bool {
        self.datapath_loaded.load(Ordering::Relaxed)
    }

    /// What keeps the agent from being ready; empty when it is.
    pub fn not_ready(&self) -> Vec<&'static str> {
        [
            (&self.datapath_loaded, "datapath not loaded"),
            (&self.cluster_synced, "cluster not synced"),
            (&self.cni_serving, "CNI socket not serving"),
        ]
        .into_iter()
        .filter(|(flag, _)| !flag.load(Ordering::Relaxed))
        .map(|(_, what)| what)
        .collect()
    }
}

/// Labels of a CNI request's latency.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct CniLabels {
    command: &'static str,
    request: &'static str,
    result: &'static str,
}

/// The CNI command and the agent request name of `request`.
pub fn cni_command(request: &Request) -> (&'static str, &'static str) {
    match request {
        Request::Status => ("STATUS", "status"),
        Request::Allocate { .. } => ("ADD", "allocate"),
        Request::Register { .. } => ("ADD", "register"),
        Request::Release { .. } => ("DEL", "release"),
        Request::Check { .. } => ("CHECK", "check"),
        Request::Gc { .. } => ("GC", "gc"),
    }
}

type HistogramFamily = Family<CniLabels, Histogram, fn() -> Histogram>;

/// The agent's metrics registry and the metrics it updates as it goes.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    cni: HistogramFamily,
    sync_errors: Counter,
    syncs: Counter,
    last_sync: Gauge<f64, AtomicU64>,
    cluster_nodes: Gauge,
}

impl Metrics {
    /// The metrics, with the datapath's read from the maps pinned below `pins` (none without).
    pub fn new(pins: Option<Pins>, health: Arc<Health>) -> Metrics {
        fn latency() -> Histogram {
            // 100 µs to ~1.6 s: a request takes about a millisecond, a GC with many pods more.
            Histogram::new(exponential_buckets(0.0001, 2.0, 15))
        }
        let mut registry = Registry::default();
        let cni = HistogramFamily::new_with_constructor(latency);
        registry.register(
            "podwire_cni_request_duration_seconds",
            "Time the agent took to answer a CNI plugin request",
            cni.clone(),
        );
        let sync_errors = Counter::default();
        registry.register(
            "podwire_cluster_sync_errors",
            "Failed reads or watches of the cluster and failed applies of a snapshot",
            sync_errors.clone(),
        );
        let syncs = Counter::default();
        registry.register(
            "podwire_cluster_syncs",
            "Cluster snapshots applied to the node",
            syncs.clone(),
        );
        let last_sync = Gauge::<f64, AtomicU64>::default();
        registry.register(
            "podwire_cluster_last_sync_timestamp_seconds",
            "Unix time of the last cluster snapshot applied",
            last_sync.clone(),
        );
        let cluster_nodes = Gauge::default();
        registry.register(
            "podwire_cluster_nodes",
            "Nodes in the last cluster snapshot applied",
            cluster_nodes.clone(),
        );
        if let Some(pins) = pins {
            registry.register_collector(Box::new(DatapathCollector { pins, health }));
        }
        Metrics {
            registry,
            cni,
            sync_errors,
            syncs,
            last_sync,
            cluster_nodes,
        }
    }

    /// Records a CNI request (its [`cni_command`]) that took `elapsed`.
    pub fn cni_request(
        &self,
        (command, request): (&'static str, &'static str),
        ok: bool,
        elapsed: Duration,
    ) {
        let result = if ok { "ok" } else { "error" };
        self.cni
            .get_or_create(&CniLabels {
                command,
                request,
                result,
            })
            .observe(elapsed.as_secs_f64());
    }

    /// Records a cluster snapshot of `nodes` nodes applied now.
    pub fn cluster_synced(&self, nodes: usize) {
        self.syncs.inc();
        self.cluster_nodes
            .set(i64::try_from(nodes).unwrap_or(i64::MAX));
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default();
        self.last_sync.set(now.as_secs_f64());
    }

    /// Records a failed read or apply of the cluster.
    pub fn cluster_sync_failed(&self) {
        self.sync_errors.inc();
    }

    /// The registry in OpenMetrics text.
    pub fn encode(&self) -> Result<String, std::fmt::Error> {
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry)?;
        Ok(out)
    }
}

/// Reads the datapath's pinned maps at each scrape: the counters are per-CPU in the kernel and
/// the maps are the truth for endpoints and nodes, so nothing is mirrored in the agent.
#[derive(Debug)]
struct DatapathCollector {
    pins: Pins,
    health: Arc<Health>,
}

impl Collector for DatapathCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        if !self.health.datapath_loaded() {
            return Ok(());
        }
        match Counters::open(&self.pins).and_then(|c| c.all()) {
            Ok(all) => {
                let mut packets = encoder.encode_descriptor(
                    "podwire_datapath_packets",
                    "Packets the datapath handled, by verdict reason",
                    None,
                    MetricType::Counter,
                )?;
                for (reason, counter) in &all {
                    ConstCounter::new(counter.packets)
                        .encode(packets.encode_family(&[("reason", reason.name())])?)?;
                }
                let mut bytes = encoder.encode_descriptor(
                    "podwire_datapath_bytes",
                    "Bytes the datapath handled, by verdict reason",
                    None,
                    MetricType::Counter,
                )?;
                for (reason, counter) in &all {
                    ConstCounter::new(counter.bytes)
                        .encode(bytes.encode_family(&[("reason", reason.name())])?)?;
                }
            }
            Err(e) => debug!("reading the counters for metrics: {e}"),
        }
        let count = |n: usize| ConstGauge::new(i64::try_from(n).unwrap_or(i64::MAX));
        match Endpoints::open(&self.pins).and_then(|m| m.list()) {
            Ok(list) => count(list.len()).encode(encoder.encode_descriptor(
                "podwire_endpoints",
                "Pod endpoints in the endpoint map",
                None,
                MetricType::Gauge,
            )?)?,
            Err(e) => debug!("reading the endpoints for metrics: {e}"),
        }
        match NodeTable::open(&self.pins).and_then(|m| m.list()) {
            Ok(list) => count(list.len()).encode(encoder.encode_descriptor(
                "podwire_node_table_entries",
                "Entries of the node table: pod CIDRs, node addresses and the cluster range",
                None,
                MetricType::Gauge,
            )?)?,
            Err(e) => debug!("reading the node table for metrics: {e}"),
        }
        Ok(())
    }
}

#[derive(Clone)]
struct Shared {
    health: Arc<Health>,
    metrics: Arc<Metrics>,
}

/// Serves `/healthz`, `/readyz` and `/metrics` on `listener` until the task is dropped.
pub async fn serve(listener: TcpListener, health: Arc<Health>, metrics: Arc<Metrics>) {
    let app = Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics_text))
        .with_state(Shared { health, metrics });
    if let Err(e) = axum::serve(listener, app).await {
        tracing::warn!("health and metrics listener failed: {e}");
    }
}

/// Binds the health and metrics listener.
pub async fn bind(address: SocketAddr) -> std::io::Result<TcpListener> {
    TcpListener::bind(address).await
}

async fn readyz(State(shared): State<Shared>) -> impl IntoResponse {
    let not_ready = shared.health.not_ready();
    if not_ready.is_empty() {
        (StatusCode::OK, "ok\n".to_owned())
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("not ready: {}\n", not_ready.join(", ")),
        )
    }
}

async fn metrics_text(State(shared): State<Shared>) -> impl IntoResponse {
    match shared.metrics.encode() {
        Ok(text) => (
            StatusCode::OK,
            [(
                header::CONTENT_TYPE,
                "application/openmetrics-text; version=1.0.0; charset=utf-8",
            )],
            text,
        )
            .into_response(),
        Err(_) => StatusCode::INTERNAL_SERVER_ERROR.into_response(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn readiness_names_what_is_missing() {
        let health = Health::new(true, true);
        assert_eq!(
            health.not_ready(),
            [
                "datapath not loaded",
                "cluster not synced",
                "CNI socket not serving"
            ]
        );
        health.set_datapath_loaded();
        health.set_cni_serving();
        assert_eq!(health.not_ready(), ["cluster not synced"]);
        health.set_cluster_synced();
        assert!(health.not_ready().is_empty());
        // A node alone follows no cluster.
        let alone = Health::new(false, true);
        alone.set_datapath_loaded();
        assert_eq!(alone.not_ready(), ["CNI socket not serving"]);
    }

    #[test]
    fn requests_and_syncs_show_in_the_text() {
        let metrics = Metrics::new(None, Arc::new(Health::new(true, true)));
        metrics.cni_request(
            cni_command(&Request::Status),
            true,
            Duration::from_millis(2),
        );
        metrics.cluster_synced(3);
        metrics.cluster_sync_failed();
        let text = metrics.encode().unwrap();
        for line in [
            "podwire_cni_request_duration_seconds_count{command=\"STATUS\",request=\"status\",result=\"ok\"} 1",
            "podwire_cluster_syncs_total 1",
            "podwire_cluster_sync_errors_total 1",
            "podwire_cluster_nodes 3",
        ] {
            assert!(text.lines().any(|l| l == line), "no {line:?} in\n{text}");
        }
    }
}
