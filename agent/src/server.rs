//! The agent's side of its local API: a Unix socket, one JSON request line and one JSON reply
//! line per connection (see `podwire_core::api`), each request handled under the agent's lock
//! and timed (waiting for the lock included: that is what the plugin waits) for the metrics.

use std::{path::Path, sync::Arc, time::Instant};

use podwire_core::{
    api::{ApiError, ErrorKind, Reply, Request},
    endpoint::VethPair,
};
use tokio::{
    io::{AsyncBufReadExt as _, AsyncWriteExt as _, BufReader},
    net::{UnixListener, UnixStream},
    sync::Mutex,
};
use tracing::{debug, warn};

use crate::{metrics::Metrics, Agent};

/// Binds the API socket at `path`, replacing a stale one left by a previous run. Only root may
/// connect: the API hands out addresses and deletes interfaces.
pub fn bind(path: &Path) -> std::io::Result<UnixListener> {
    use std::os::unix::fs::PermissionsExt as _;
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    match std::fs::remove_file(path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e),
        _ => {}
    }
    let listener = UnixListener::bind(path)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    Ok(listener)
}

/// Serves requests on `listener` until the task is dropped.
pub async fn serve(agent: Arc<Mutex<Agent>>, listener: UnixListener, metrics: Arc<Metrics>) {
    loop {
        match listener.accept().await {
            Ok((stream, _)) => {
                let agent = agent.clone();
                let metrics = metrics.clone();
                tokio::spawn(async move {
                    if let Err(e) = connection(agent, stream, &metrics).await {
                        warn!("API connection: {e}");
                    }
                });
            }
            Err(e) => warn!("accepting on the API socket: {e}"),
        }
    }
}

async fn connection(
    agent: Arc<Mutex<Agent>>,
    stream: UnixStream,
    metrics: &Metrics,
) -> std::io::Result<()> {
    let (read, mut write) = stream.into_split();
    let mut line = String::new();
    BufReader::new(read).read_line(&mut line).await?;
    let response: Result<Reply, ApiError> = match serde_json::from_str::<Request>(&line) {
        Ok(request) => {
            debug!(?request, "API request");
            let started = Instant::now();
            let timed = crate::metrics::cni_command(&request);
            let answer = handle(&mut *agent.lock().await, request).await;
            metrics.cni_request(timed, answer.is_ok(), started.elapsed());
            if let Err(e) = &answer {
                warn!(kind = ?e.kind, "API request failed: {}", e.message);
            }
            answer
        }
        Err(e) => Err(ApiError {
            kind: ErrorKind::Invalid,
            message: format!("malformed request: {e}"),
        }),
    };
    let mut out = serde_json::to_string(&response).expect("responses serialise");
    out.push('\n');
    write.write_all(out.as_bytes()).await
}

/// Does what `request` asks of the endpoint lifecycle.
async fn handle(agent: &mut Agent, request: Request) -> Result<Reply, ApiError> {
    Ok(match request {
        Request::Status => Reply::Status {
            node: agent.node().to_owned(),
            pod_cidr: agent.pod_cidr(),
        },
        Request::Allocate { attachment, netns } => {
            let allocation = agent.allocate(&attachment, &netns)?;
            Reply::Allocated {
                ip: allocation.ip,
                pod_cidr: agent.pod_cidr(),
                mtu: allocation.mtu,
                fresh: allocation.fresh,
                registered: allocation.registered,
            }
        }
        Request::Register {
            attachment,
            host_ifname,
            host_mac,
            pod_mac,
        } => {
            let veth = VethPair {
                host_ifname,
                host_mac,
                pod_mac,
            };
            agent.register(&attachment, veth)?;
            Reply::Registered
        }
        Request::Release { attachment } => Reply::Released {
            ip: agent.release(&attachment)?,
        },
        Request::Check { attachment } => Reply::Checked {
            endpoint: agent.check(&attachment)?,
        },
        Request::Gc { valid } => Reply::Collected {
            removed: agent.gc(valid).await?,
        },
    })
}
