//! The agent's local API, spoken by the CNI plugin over a Unix socket: one JSON request line, one
//! JSON response line per connection.

use std::{
    io::{self, BufRead as _, BufReader, Write as _},
    net::Ipv4Addr,
    os::unix::net::UnixStream,
    path::Path,
    time::Duration,
};

use ipnet::Ipv4Net;
use serde::{Deserialize, Serialize};

use crate::{
    endpoint::{Attachment, EndpointRecord, VethPair},
    mac::Mac,
};

/// Default socket path of the agent on a node.
pub const DEFAULT_SOCKET: &str = "/run/podwire/agent.sock";

/// How long a caller waits for the agent's answer to anything but GC. The agent answers one
/// request at a time in about a millisecond (an ADD's Register, which attaches the datapath, in
/// a few), so even hundreds of pods started at once queue for about a second; ten times that
/// means the agent is stuck, and the plugin says "try again later" (CNI code 11) while the
/// runtime's own deadline (minutes for a pod sandbox) still leaves room to retry, instead of
/// holding the pod for a minute and failing it with an I/O error.
pub const CALL_TIMEOUT: Duration = Duration::from_secs(10);

/// How long GC may take: it deletes the veths of every stale pod, one netlink call each.
pub const GC_TIMEOUT: Duration = Duration::from_secs(60);

#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "kebab-case")]
pub enum Request {
    /// Is the agent ready to serve ADD?
    Status,
    /// Address for an attachment (the same one again if it already has one).
    Allocate {
        attachment: Attachment,
        netns: String,
        /// The network configuration's `name`, recorded with the endpoint so that a GC of
        /// another network using podwire leaves it alone. Absent from older plugins.
        #[serde(default)]
        network: Option<String>,
    },
    /// The plugin has wired the veth: write the endpoint map and attach the datapath.
    Register {
        attachment: Attachment,
        host_ifname: String,
        host_mac: Mac,
        pod_mac: Mac,
    },
    /// Forget an attachment: map entry, datapath attachment, address. Idempotent.
    Release { attachment: Attachment },
    /// The agent's view of an attachment, after checking its map entry and attachment.
    Check { attachment: Attachment },
    /// Remove every attachment of `network` not in `valid`, with its host-side veth.
    Gc {
        valid: Vec<Attachment>,
        /// The network being collected (see `Allocate`); absent from older plugins, whose GC
        /// then only considers endpoints recorded without a network.
        #[serde(default)]
        network: Option<String>,
    },
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "reply", rename_all = "kebab-case")]
pub enum Reply {
    Status {
        node: String,
        pod_cidr: Ipv4Net,
    },
    /// `mtu`: the pod MTU the node wants for traffic that may leave the node (underlay MTU less
    /// the tunnel's overhead). `local_mtu`: the MTU of the pod's link and of its route to the
    /// node's other pods (`pod_cidr`), which nothing encapsulates; absent from older agents,
    /// which means `mtu` everywhere. `fresh`:
    /// this request allocated `ip`, so an ADD that fails afterwards releases it; otherwise the
    /// attachment already held it (a repeated ADD) and a failure must leave it to the pod.
    /// `registered`: the veth pair the attachment was registered with, if it was, so a repeated
    /// ADD can find the pod already wired and change nothing. Both default to what an agent
    /// without them implies: nothing known, so nothing released.
    Allocated {
        ip: Ipv4Addr,
        pod_cidr: Ipv4Net,
        mtu: u32,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        local_mtu: Option<u32>,
        #[serde(default)]
        fresh: bool,
        #[serde(default)]
        registered: Option<VethPair>,
    },
    Registered,
    Released {
        ip: Option<Ipv4Addr>,
    },
    Checked {
        endpoint: EndpointRecord,
    },
    Collected {
        removed: Vec<Attachment>,
    },
}

/// What the agent answers when it cannot do what was asked.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
#[error("{message}")]
pub struct ApiError {
    pub kind: ErrorKind,
    pub message: String,
}

/// Class of an agent error; the plugin maps it to a CNI error code.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ErrorKind {
    /// The request names an attachment the agent does not know, or state that does not match.
    Invalid,
    /// Transient: retrying later may succeed (e.g. the pod CIDR is exhausted).
    TryAgain,
    /// The agent failed doing it.
    Internal,
}

/// Errors of calling the agent.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// Nothing listens on the socket: the agent is not running (yet).
    #[error("podwire agent is not reachable at {socket}: {source}")]
    Unreachable {
        socket: String,
        #[source]
        source: std::io::Error,
    },
    /// The agent took the request but did not answer in time: it is stuck or overloaded.
    #[error("podwire agent at {socket} did not answer within {} s", .waited.as_secs())]
    Timeout { socket: String, waited: Duration },
    /// The agent closed the connection without answering: it stopped or restarted meanwhile.
    #[error(
        "podwire agent at {socket} closed the connection without answering (stopped or restarted?)"
    )]
    Closed { socket: String },
    /// The connection broke or the answer was not understood.
    #[error("talking to the podwire agent at {socket}: {detail}")]
    Protocol { socket: String, detail: String },
    /// The agent answered with an error.
    #[error(transparent)]
    Agent(#[from] ApiError),
}

/// Sends one request to the agent at `socket` and waits for its reply, [`GC_TIMEOUT`] for GC
/// and [`CALL_TIMEOUT`] for anything else.
pub fn call(socket: &Path, request: &Request) -> Result<Reply, ClientError> {
    let waited = match request {
        Request::Gc { .. } => GC_TIMEOUT,
        _ => CALL_TIMEOUT,
    };
    call_within(socket, request, waited)
}

fn call_within(socket: &Path, request: &Request, waited: Duration) -> Result<Reply, ClientError> {
    let name = socket.display().to_string();
    let stream = UnixStream::connect(socket).map_err(|source| ClientError::Unreachable {
        socket: name.clone(),
        source,
    })?;
    let protocol = |detail: String| ClientError::Protocol {
        socket: name.clone(),
        detail,
    };
    let failed = |e: io::Error| match e.kind() {
        // What a socket timeout reports (EAGAIN, or ETIMEDOUT).
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => ClientError::Timeout {
            socket: name.clone(),
            waited,
        },
        io::ErrorKind::ConnectionReset | io::ErrorKind::BrokenPipe => ClientError::Closed {
            socket: name.clone(),
        },
        _ => protocol(e.to_string()),
    };
    stream
        .set_read_timeout(Some(waited))
        .and_then(|()| stream.set_write_timeout(Some(waited)))
        .map_err(|e| protocol(e.to_string()))?;
    let mut line = serde_json::to_string(request).expect("requests serialise");
    line.push('\n');
    (&stream).write_all(line.as_bytes()).map_err(failed)?;
    let mut answer = String::new();
    BufReader::new(&stream)
        .read_line(&mut answer)
        .map_err(failed)?;
    if answer.is_empty() {
        return Err(ClientError::Closed { socket: name });
    }
    let response: Result<Reply, ApiError> = serde_json::from_str(&answer)
        .map_err(|e| protocol(format!("bad answer {answer:?}: {e}")))?;
    Ok(response?)
}

#[cfg(test)]
mod tests {
    use std::{os::unix::net::UnixListener, time::Instant};

    use super::*;

    #[test]
    fn an_agent_that_never_answers_is_a_timeout_and_one_that_hangs_up_is_closed() {
        let dir = std::env::temp_dir().join(format!("podwire-api-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let socket = dir.join("agent.sock");
        let _ = std::fs::remove_file(&socket);
        let listener = UnixListener::bind(&socket).unwrap();
        // Accepted by the kernel (the backlog), never read or answered.
        let started = Instant::now();
        let e = call_within(&socket, &Request::Status, Duration::from_millis(300)).unwrap_err();
        assert!(
            matches!(e, ClientError::Timeout { .. }),
            "{e:?} after {:?}",
            started.elapsed()
        );
        assert!(started.elapsed() < Duration::from_secs(5));
        assert!(e.to_string().contains(&socket.display().to_string()), "{e}");

        // Accepted and closed without an answer.
        let closer = std::thread::spawn(move || {
            // The first connection is the one above; the second is this call's.
            for _ in 0..2 {
                drop(listener.accept().unwrap());
            }
        });
        let e = call_within(&socket, &Request::Status, Duration::from_secs(5)).unwrap_err();
        assert!(matches!(e, ClientError::Closed { .. }), "{e:?}");
        closer.join().unwrap();
        let _ = std::fs::remove_dir_all(&dir);
    }
}
