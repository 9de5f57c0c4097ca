//! The agent's side of its local API: a Unix socket, one JSON request line and one JSON reply
//! line per connection (see `podwire_core::api`), each request handled under the agent's lock
//! and timed (waiting for the lock included: that is what the plugin waits) for the metrics.
//!
//! The API hands out addresses and deletes interfaces, so it trusts nobody but root and bounds
//! what a client may hold: the socket is never reachable by others (0600 before it appears at
//! its path), a peer that is not uid 0 is refused, a request line may be [`MAX_REQUEST`] bytes
//! and must arrive within [`READ_TIMEOUT`], and [`MAX_CONNECTIONS`] are served at once while
//! further ones wait in the listen backlog.

use std::{
    io,
    os::unix::fs::{DirBuilderExt as _, PermissionsExt as _},
    path::Path,
    sync::Arc,
    time::{Duration, Instant},
};

use nix::sys::socket::{self, AddressFamily, Backlog, SockFlag, SockType, UnixAddr};
use podwire_core::{
    api::{ApiError, ErrorKind, Reply, Request},
    endpoint::VethPair,
};
use tokio::{
    io::{AsyncBufReadExt as _, AsyncRead, AsyncReadExt as _, AsyncWriteExt as _, BufReader},
    net::{UnixListener, UnixStream},
    sync::{Mutex, Semaphore},
};
use tracing::{debug, warn};

use crate::{metrics::Metrics, Agent};

/// The longest request line, newline included. The largest request, GC's list of valid
/// attachments, is about 100 bytes per pod: hundreds of pods fit.
pub const MAX_REQUEST: usize = 64 * 1024;

/// How long a client has to send its whole request line once connected. The plugin writes it
/// at once; a client that sends nothing must not hold a connection.
pub const READ_TIMEOUT: Duration = Duration::from_secs(10);

/// Connections served at once. Every request takes the agent's one lock anyway; this only
/// bounds the memory and file descriptors clients can make the agent hold.
pub const MAX_CONNECTIONS: usize = 64;

/// Connections that wait to be accepted, beyond those served: a burst of pods starting on the
/// node at once (hundreds) waits here instead of being refused. The kernel caps it at
/// `net.core.somaxconn`.
const BACKLOG: i32 = 1024;

/// The pause after a failed `accept` (out of file descriptors, say): it would fail again at
/// once, and retrying without a pause would spin a CPU.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);

/// Binds the API socket at `path`, replacing a stale one left by a previous run (the state
/// directory's lock, taken before, says no other agent serves it). Only root may connect: the
/// socket is bound in a directory of its own with mode 0700, made 0600, and only then renamed to
/// `path`, so at no moment can anyone else reach it.
pub fn bind(path: &Path) -> io::Result<UnixListener> {
    let dir = match path.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => dir,
        _ => Path::new("."),
    };
    std::fs::create_dir_all(dir)?;
    let name = path
        .file_name()
        .ok_or_else(|| io::Error::other(format!("{} names no file", path.display())))?;
    let mut private_name = std::ffi::OsString::from(".");
    private_name.push(name);
    private_name.push(".new");
    let private = dir.join(private_name);
    match std::fs::remove_dir_all(&private) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(e),
        _ => {}
    }
    std::fs::DirBuilder::new().mode(0o700).create(&private)?;
    let staged = private.join("s");
    let bound = listen(&staged).and_then(|listener| {
        std::fs::set_permissions(&staged, std::fs::Permissions::from_mode(0o600))?;
        std::fs::rename(&staged, path)?;
        Ok(listener)
    });
    let _ = std::fs::remove_dir_all(&private);
    bound
}

/// A listening, non-blocking Unix socket bound at `path`, with [`BACKLOG`].
fn listen(path: &Path) -> io::Result<UnixListener> {
    let fd = socket::socket(
        AddressFamily::Unix,
        SockType::Stream,
        SockFlag::SOCK_CLOEXEC | SockFlag::SOCK_NONBLOCK,
        None,
    )?;
    socket::bind(std::os::fd::AsRawFd::as_raw_fd(&fd), &UnixAddr::new(path)?)?;
    socket::listen(&fd, Backlog::new(BACKLOG)?)?;
    UnixListener::from_std(std::os::unix::net::UnixListener::from(fd))
}

/// Serves requests on `listener` until the task is dropped.
pub async fn serve(agent: Arc<Mutex<Agent>>, listener: UnixListener, metrics: Arc<Metrics>) {
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    loop {
        // A slot first: past the limit, connections wait in the backlog, holding nothing here.
        let slot = slots
            .clone()
            .acquire_owned()
            .await
            .expect("the semaphore is never closed");
        match listener.accept().await {
            Ok((stream, _)) => {
                let agent = agent.clone();
                let metrics = metrics.clone();
                tokio::spawn(async move {
                    if let Err(e) = connection(agent, stream, &metrics).await {
                        warn!("API connection: {e}");
                    }
                    drop(slot);
                });
            }
            Err(e) => {
                warn!(
                    "accepting on the API socket: {e}; retrying in {}ms",
                    ACCEPT_BACKOFF.as_millis()
                );
                tokio::time::sleep(ACCEPT_BACKOFF).await;
            }
        }
    }
}

async fn connection(
    agent: Arc<Mutex<Agent>>,
    stream: UnixStream,
    metrics: &Metrics,
) -> io::Result<()> {
    let peer = stream.peer_cred()?;
    let (read, mut write) = stream.into_split();
    // Read before answering, also to refuse: a client whose request was never read would find
    // the connection reset when writing it and never see the answer.
    let request = read_request(read).await;
    let response: Result<Reply, ApiError> = if peer.uid() != 0 {
        warn!(
            uid = peer.uid(),
            pid = peer.pid(),
            "refused an API client that is not root"
        );
        Err(not_root(peer.uid()))
    } else {
        match request {
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
            Err(e) => {
                warn!("API request refused: {}", e.message);
                Err(e)
            }
        }
    };
    let mut out = serde_json::to_string(&response).expect("responses serialise");
    out.push('\n');
    // A client that does not read its answer must not hold the connection either.
    match tokio::time::timeout(READ_TIMEOUT, write.write_all(out.as_bytes())).await {
        Ok(written) => written,
        Err(_) => Err(io::Error::new(
            io::ErrorKind::TimedOut,
            "the client did not take its answer",
        )),
    }
}

/// The answer to a peer that is not root.
fn not_root(uid: u32) -> ApiError {
    ApiError {
        kind: ErrorKind::Invalid,
        message: format!(
            "permission denied: only root may use the podwire agent's API (this client runs as \
             uid {uid})"
        ),
    }
}

/// The request a client sends: one line of at most [`MAX_REQUEST`] bytes (or the whole stream,
/// if it ends without a newline) within [`READ_TIMEOUT`].
async fn read_request(read: impl AsyncRead + Unpin) -> Result<Request, ApiError> {
    let mut line = Vec::new();
    let mut reader = BufReader::new(read.take(MAX_REQUEST as u64 + 1));
    match tokio::time::timeout(READ_TIMEOUT, reader.read_until(b'\n', &mut line)).await {
        Err(_) => Err(invalid(format!(
            "no complete request line within {}s: closing the connection",
            READ_TIMEOUT.as_secs()
        ))),
        Ok(Err(e)) => Err(invalid(format!("reading the request: {e}"))),
        Ok(Ok(_)) => parse_request(&line),
    }
}

/// The request in `line`, as read with at most one byte more than [`MAX_REQUEST`].
fn parse_request(line: &[u8]) -> Result<Request, ApiError> {
    if line.len() > MAX_REQUEST {
        return Err(invalid(format!(
            "request line longer than the limit of {MAX_REQUEST} bytes"
        )));
    }
    serde_json::from_slice(line).map_err(|e| invalid(format!("malformed request: {e}")))
}

fn invalid(message: String) -> ApiError {
    ApiError {
        kind: ErrorKind::Invalid,
        message,
    }
}

/// Does what `request` asks of the endpoint lifecycle.
async fn handle(agent: &mut Agent, request: Request) -> Result<Reply, ApiError> {
    Ok(match request {
        Request::Status => Reply::Status {
            node: agent.node().to_owned(),
            pod_cidr: agent.pod_cidr(),
        },
        Request::Allocate {
            attachment,
            netns,
            network,
        } => {
            let allocation = agent.allocate(&attachment, &netns, network.as_deref())?;
            Reply::Allocated {
                ip: allocation.ip,
                pod_cidr: agent.pod_cidr(),
                mtu: allocation.mtu,
                local_mtu: Some(allocation.local_mtu),
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
            agent.register(&attachment, veth).await?;
            Reply::Registered
        }
        Request::Release { attachment } => Reply::Released {
            ip: agent.release(&attachment)?,
        },
        Request::Check { attachment } => Reply::Checked {
            endpoint: agent.check(&attachment)?,
        },
        Request::Gc { valid, network } => Reply::Collected {
            removed: agent.gc(valid, network.as_deref()).await?,
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn read(input: Vec<u8>) -> Result<Request, ApiError> {
        read_request(&input[..]).await
    }

    #[tokio::test]
    async fn a_request_line_up_to_the_limit_is_read() {
        let mut line = br#"{"op":"status"}"#.to_vec();
        line.resize(MAX_REQUEST - 1, b' ');
        line.push(b'\n');
        assert!(matches!(read(line).await, Ok(Request::Status)));
        // Without a newline, the stream's end ends it.
        assert!(matches!(
            read(br#"{"op":"status"}"#.to_vec()).await,
            Ok(Request::Status)
        ));
    }

    #[tokio::test]
    async fn a_longer_line_is_refused_naming_the_limit() {
        let mut line = br#"{"op":"status"}"#.to_vec();
        line.resize(MAX_REQUEST, b' ');
        line.push(b'\n');
        let err = read(line).await.unwrap_err();
        assert_eq!(
            err.message,
            "request line longer than the limit of 65536 bytes"
        );
        let err = read(vec![b'x'; 1 << 20]).await.unwrap_err();
        assert_eq!(err.kind, ErrorKind::Invalid);
        assert!(err.message.contains("65536 bytes"), "{}", err.message);
    }

    #[test]
    fn a_peer_that_is_not_root_is_told_why() {
        assert_eq!(
            not_root(65534).message,
            "permission denied: only root may use the podwire agent's API (this client runs as \
             uid 65534)"
        );
    }

    #[tokio::test]
    async fn the_socket_is_0600_and_replaces_a_stale_one() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("agent.sock");
        std::fs::write(&path, b"stale").unwrap();
        let _listener = bind(&path).unwrap();
        let meta = std::fs::symlink_metadata(&path).unwrap();
        assert!(std::os::unix::fs::FileTypeExt::is_socket(&meta.file_type()));
        assert_eq!(meta.permissions().mode() & 0o777, 0o600);
        tokio::net::UnixStream::connect(&path)
            .await
            .expect("connectable at its path");
        let entries: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(entries, ["agent.sock"], "the private directory is gone");
    }
}
