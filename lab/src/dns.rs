//! Cluster DNS for the lab's Kubernetes: pods reach Services by name, as upstream's conformance
//! specs do (`nc -zv -t -w 2 <service> <port>`), and no CoreDNS image can be pulled here. A
//! small authoritative server for the cluster domain, from the Services and Endpoints API:
//!
//! - `<service>.<namespace>.svc.cluster.local` A: the ClusterIP; for a headless Service the
//!   ready addresses of its Endpoints; CNAME to `spec.externalName` for an ExternalName
//!   Service, followed while the target is a Service of the cluster (as CoreDNS does), so
//!   `nslookup` of such a Service ends at addresses.
//! - NOERROR without records for other types of a known name (AAAA: the lab is IPv4 only), and
//!   NXDOMAIN for every other name; nothing is forwarded (the lab reaches no outside resolver).
//!
//! It serves UDP and TCP on port 53 of an address in a namespace of the lab (kubelet's
//! `--cluster-dns`), on a thread of its own that has entered the namespace, so its sockets and
//! its connections to the API server (a watch of each kind, relisted after errors) belong there.
//! Dropping the [`ClusterDns`] stops it.

use std::{
    fs::File,
    net::{Ipv4Addr, SocketAddr},
    path::Path,
    sync::mpsc,
    thread,
    time::Duration,
};

use anyhow::{anyhow, Context as _, Result};
use futures::StreamExt as _;
use hickory_proto::{
    op::{Message, MessageType, OpCode, ResponseCode},
    rr::{
        rdata::{A, CNAME},
        Name, RData, Record, RecordType,
    },
};
use k8s_openapi::api::core::v1::{Endpoints, Service};
use kube::{
    config::{KubeConfigOptions, Kubeconfig},
    runtime::{
        reflector::{self, ObjectRef, Store},
        watcher, WatchStreamExt as _,
    },
    Api, Client, Config,
};
use nix::sched::{setns, CloneFlags};
use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    net::{TcpListener, TcpStream, UdpSocket},
    sync::oneshot,
};

use crate::namespaces::NetNs;

/// The cluster domain kubelet is given (`--cluster-domain`).
pub const CLUSTER_DOMAIN: &str = "cluster.local";
/// The DNS port; kubelet's `--cluster-dns` names only an address.
pub const PORT: u16 = 53;
/// Seconds resolvers may keep an answer: short, as Services come and go within a spec.
const TTL: u32 = 5;
/// How many ExternalName aliases one answer follows.
const MAX_CNAMES: usize = 8;
/// The largest UDP answer to a query without EDNS (RFC 1035); longer ones are truncated, and
/// the resolver asks again over TCP.
const UDP_PAYLOAD: usize = 512;
/// Bounds the first listing of Services and Endpoints against hanging.
const SYNC_TIMEOUT: Duration = Duration::from_secs(60);

/// What a Service name resolves to, from the Service and its Endpoints.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Target {
    /// A Service with a ClusterIP.
    ClusterIp(Ipv4Addr),
    /// A headless Service: the ready addresses of its endpoints.
    Headless(Vec<Ipv4Addr>),
    /// An ExternalName Service: an alias.
    ExternalName(String),
}

impl Target {
    /// What `svc` resolves to, with `endpoints` for a headless one; `None` for a Service that
    /// has no address yet (or an IPv6 one, which the lab does not serve).
    pub fn of(svc: &Service, endpoints: Option<&Endpoints>) -> Option<Target> {
        let spec = svc.spec.as_ref()?;
        if spec.type_.as_deref() == Some("ExternalName") {
            return Some(Target::ExternalName(spec.external_name.clone()?));
        }
        match spec.cluster_ip.as_deref()? {
            "None" => {
                let mut ips: Vec<Ipv4Addr> = endpoints
                    .and_then(|e| e.subsets.as_ref())
                    .into_iter()
                    .flatten()
                    .flat_map(|subset| subset.addresses.iter().flatten())
                    .filter_map(|address| address.ip.parse().ok())
                    .collect();
                ips.sort_unstable();
                ips.dedup();
                Some(Target::Headless(ips))
            }
            ip => ip.parse().ok().map(Target::ClusterIp),
        }
    }
}

/// The Service (name, namespace) that `name` is the DNS name of in `domain`, if any.
fn service_of(name: &Name, domain: &Name) -> Option<(String, String)> {
    let name = name.to_lowercase();
    let suffix = Name::from_ascii("svc")
        .ok()?
        .append_domain(domain)
        .ok()?
        .to_lowercase();
    if !suffix.zone_of(&name) {
        return None;
    }
    let labels: Vec<String> = name
        .iter()
        .take(usize::from(name.num_labels() - suffix.num_labels()))
        .map(|label| String::from_utf8_lossy(label).into_owned())
        .collect();
    match labels.as_slice() {
        [service, namespace] => Some((service.clone(), namespace.clone())),
        _ => None,
    }
}

/// The response code and answer records for a query of `qtype` about `qname` in `domain`,
/// where `lookup` finds a Service's [`Target`] by (name, namespace).
fn resolve(
    qname: &Name,
    qtype: RecordType,
    domain: &Name,
    lookup: impl Fn(&str, &str) -> Option<Target>,
) -> (ResponseCode, Vec<Record>) {
    let mut answers = Vec::new();
    let mut name = qname.clone();
    for _ in 0..MAX_CNAMES {
        let target = service_of(&name, domain).and_then(|(svc, ns)| lookup(&svc, &ns));
        let Some(target) = target else {
            // The first name is unknown; an alias's target outside the cluster is for the
            // resolver to follow elsewhere.
            let code = match answers.is_empty() {
                true => ResponseCode::NXDomain,
                false => ResponseCode::NoError,
            };
            return (code, answers);
        };
        match target {
            Target::ExternalName(alias) => {
                let Ok(alias) = Name::from_ascii(&alias).map(|mut n| {
                    n.set_fqdn(true);
                    n
                }) else {
                    return (ResponseCode::ServFail, answers);
                };
                answers.push(Record::from_rdata(
                    name.clone(),
                    TTL,
                    RData::CNAME(CNAME(alias.clone())),
                ));
                if qtype == RecordType::CNAME {
                    break;
                }
                name = alias;
            }
            Target::ClusterIp(ip) => {
                answers.extend(address(&name, qtype, ip));
                break;
            }
            Target::Headless(ips) => {
                answers.extend(ips.into_iter().filter_map(|ip| address(&name, qtype, ip)));
                break;
            }
        }
    }
    (ResponseCode::NoError, answers)
}

/// The A record `name` -> `ip` if the query asks for it.
fn address(name: &Name, qtype: RecordType, ip: Ipv4Addr) -> Option<Record> {
    matches!(qtype, RecordType::A | RecordType::ANY)
        .then(|| Record::from_rdata(name.clone(), TTL, RData::A(A(ip))))
}

/// The response to the DNS message `query`, at most `limit` bytes long (truncated otherwise),
/// or `None` if it is no query (dropped, as a server does with garbage).
fn respond(
    query: &[u8],
    domain: &Name,
    limit: Option<usize>,
    lookup: impl Fn(&str, &str) -> Option<Target>,
) -> Option<Vec<u8>> {
    let query = Message::from_vec(query).ok()?;
    if query.metadata.message_type != MessageType::Query {
        return None;
    }
    let mut response = Message::response(query.metadata.id, query.metadata.op_code);
    response.metadata.recursion_desired = query.metadata.recursion_desired;
    response.metadata.authoritative = true;
    response.queries = query.queries.clone();
    match (query.metadata.op_code, query.queries.as_slice()) {
        (OpCode::Query, [question]) => {
            let (code, answers) = resolve(question.name(), question.query_type(), domain, lookup);
            response.metadata.response_code = code;
            response.answers = answers;
        }
        (OpCode::Query, _) => response.metadata.response_code = ResponseCode::FormErr,
        _ => response.metadata.response_code = ResponseCode::NotImp,
    }
    let bytes = response.to_vec().ok()?;
    let limit = limit.map(|udp| udp.max(usize::from(query.max_payload())));
    match limit {
        Some(limit) if bytes.len() > limit => response.truncate().to_vec().ok(),
        _ => Some(bytes),
    }
}

/// The Services and Endpoints of the cluster, as the watches last saw them.
#[derive(Clone)]
struct Cluster {
    services: Store<Service>,
    endpoints: Store<Endpoints>,
}

impl Cluster {
    fn lookup(&self, name: &str, namespace: &str) -> Option<Target> {
        let svc = self.services.get(&ObjectRef::new(name).within(namespace))?;
        let endpoints = self.endpoints.get(&ObjectRef::new(name).within(namespace));
        Target::of(&svc, endpoints.as_deref())
    }
}

/// The lab's cluster DNS server, serving until dropped.
pub struct ClusterDns {
    stop: Option<oneshot::Sender<()>>,
    thread: Option<thread::JoinHandle<()>>,
    /// Where it answers, UDP and TCP.
    pub addr: SocketAddr,
}

impl ClusterDns {
    /// Starts a server on `ip`:53 in `ns`, answering from the API server of `kubeconfig` (which
    /// must be reachable from `ns`); returns once it has listed Services and Endpoints.
    pub fn start(ns: &NetNs, ip: Ipv4Addr, kubeconfig: &Path) -> Result<ClusterDns> {
        let path = ns.path();
        let netns = File::open(&path).with_context(|| format!("opening {}", path.display()))?;
        let kubeconfig = Kubeconfig::read_from(kubeconfig)
            .with_context(|| format!("reading the kubeconfig {}", kubeconfig.display()))?;
        let addr = SocketAddr::from((ip, PORT));
        let domain = Name::from_ascii(CLUSTER_DOMAIN)?;
        let (ready_tx, ready_rx) = mpsc::channel();
        let (stop, stopped) = oneshot::channel();
        let thread = thread::Builder::new()
            .name("cluster-dns".into())
            .spawn(move || {
                // Everything below, the runtime's threads included, is in the namespace.
                let result = setns(&netns, CloneFlags::CLONE_NEWNET)
                    .context("entering the namespace of the cluster DNS")
                    .and_then(|()| {
                        Ok(tokio::runtime::Builder::new_current_thread()
                            .enable_all()
                            .build()?)
                    });
                match result {
                    Ok(runtime) => {
                        runtime.block_on(serve(addr, domain, kubeconfig, ready_tx, stopped))
                    }
                    Err(e) => {
                        let _ = ready_tx.send(Err(e));
                    }
                }
            })
            .context("spawning the cluster DNS thread")?;
        let mut dns = ClusterDns {
            stop: Some(stop),
            thread: Some(thread),
            addr,
        };
        match ready_rx.recv_timeout(SYNC_TIMEOUT + Duration::from_secs(10)) {
            Ok(Ok(())) => Ok(dns),
            Ok(Err(e)) => Err(e.context(format!("starting the cluster DNS on {addr}"))),
            Err(_) => {
                dns.stop();
                Err(anyhow!(
                    "the cluster DNS on {addr} did not come up: its thread ended or hung"
                ))
            }
        }
    }

    fn stop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

impl Drop for ClusterDns {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Binds, syncs, reports readiness on `ready`, then answers until `stop` fires.
async fn serve(
    addr: SocketAddr,
    domain: Name,
    kubeconfig: Kubeconfig,
    ready: mpsc::Sender<Result<()>>,
    stop: oneshot::Receiver<()>,
) {
    let started = async {
        let udp = UdpSocket::bind(addr)
            .await
            .with_context(|| format!("binding UDP {addr}"))?;
        let tcp = TcpListener::bind(addr)
            .await
            .with_context(|| format!("binding TCP {addr}"))?;
        let config = Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default())
            .await
            .context("configuring the API client")?;
        let client = Client::try_from(config).context("creating the API client")?;
        let (services, services_writer) = reflector::store();
        let (endpoints, endpoints_writer) = reflector::store();
        // Watches restart with a relist after errors, with backoff: the cluster DNS outlives an
        // API server restart.
        let watch_services = reflector::reflector(
            services_writer,
            watcher(Api::<Service>::all(client.clone()), Default::default()),
        )
        .default_backoff()
        .for_each(|_| async {});
        let watch_endpoints = reflector::reflector(
            endpoints_writer,
            watcher(Api::<Endpoints>::all(client), Default::default()),
        )
        .default_backoff()
        .for_each(|_| async {});
        tokio::spawn(watch_services);
        tokio::spawn(watch_endpoints);
        let cluster = Cluster {
            services,
            endpoints,
        };
        tokio::time::timeout(SYNC_TIMEOUT, async {
            cluster.services.wait_until_ready().await?;
            cluster.endpoints.wait_until_ready().await
        })
        .await
        .map_err(|_| anyhow!("no list of Services and Endpoints after {SYNC_TIMEOUT:?}"))??;
        anyhow::Ok((udp, tcp, cluster))
    };
    let (udp, tcp, cluster) = match started.await {
        Ok(started) => started,
        Err(e) => {
            let _ = ready.send(Err(e));
            return;
        }
    };
    let _ = ready.send(Ok(()));
    tokio::select! {
        () = serve_udp(udp, domain.clone(), cluster.clone()) => {}
        () = serve_tcp(tcp, domain, cluster) => {}
        _ = stop => {}
    }
}

async fn serve_udp(socket: UdpSocket, domain: Name, cluster: Cluster) {
    let mut buf = vec![0u8; 4096];
    loop {
        // A failed receive or send concerns one datagram; the server goes on.
        let Ok((len, peer)) = socket.recv_from(&mut buf).await else {
            continue;
        };
        let lookup = |name: &str, ns: &str| cluster.lookup(name, ns);
        if let Some(reply) = respond(&buf[..len], &domain, Some(UDP_PAYLOAD), lookup) {
            let _ = socket.send_to(&reply, peer).await;
        }
    }
}

async fn serve_tcp(listener: TcpListener, domain: Name, cluster: Cluster) {
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        tokio::spawn(serve_connection(stream, domain.clone(), cluster.clone()));
    }
}

/// Answers the length-prefixed queries of one TCP connection until the client closes it.
async fn serve_connection(mut stream: TcpStream, domain: Name, cluster: Cluster) {
    loop {
        let Ok(len) = stream.read_u16().await else {
            return;
        };
        let mut query = vec![0u8; usize::from(len)];
        if stream.read_exact(&mut query).await.is_err() {
            return;
        }
        let lookup = |name: &str, ns: &str| cluster.lookup(name, ns);
        let Some(reply) = respond(&query, &domain, None, lookup) else {
            return;
        };
        let Ok(len) = u16::try_from(reply.len()) else {
            return;
        };
        if stream.write_u16(len).await.is_err() || stream.write_all(&reply).await.is_err() {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use std::{
        io::{Read as _, Write as _},
        net::{TcpStream, UdpSocket},
    };

    use hickory_proto::op::Query;
    use k8s_openapi::api::core::v1::{EndpointAddress, EndpointSubset, ServiceSpec};
    use serde_json::json;

    use super::*;
    use crate::{
        eventually,
        k8s::{ControlPlane, CONTROL_PLANE_IP},
        nodes::Underlay,
    };

    fn name(text: &str) -> Name {
        Name::from_ascii(text).unwrap()
    }

    fn domain() -> Name {
        name(CLUSTER_DOMAIN)
    }

    fn service(type_: &str, cluster_ip: Option<&str>, external: Option<&str>) -> Service {
        Service {
            spec: Some(ServiceSpec {
                type_: Some(type_.into()),
                cluster_ip: cluster_ip.map(Into::into),
                external_name: external.map(Into::into),
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    fn endpoints(ready: &[&str], not_ready: &[&str]) -> Endpoints {
        let addresses = |ips: &[&str]| {
            Some(
                ips.iter()
                    .map(|ip| EndpointAddress {
                        ip: (*ip).into(),
                        ..Default::default()
                    })
                    .collect(),
            )
        };
        Endpoints {
            subsets: Some(vec![EndpointSubset {
                addresses: addresses(ready),
                not_ready_addresses: addresses(not_ready),
                ..Default::default()
            }]),
            ..Default::default()
        }
    }

    #[test]
    fn targets_follow_the_service_type() {
        assert_eq!(
            Target::of(&service("ClusterIP", Some("10.96.0.7"), None), None),
            Some(Target::ClusterIp(Ipv4Addr::new(10, 96, 0, 7)))
        );
        // NodePort Services have a ClusterIP too.
        assert_eq!(
            Target::of(&service("NodePort", Some("10.96.0.8"), None), None),
            Some(Target::ClusterIp(Ipv4Addr::new(10, 96, 0, 8)))
        );
        let headless = service("ClusterIP", Some("None"), None);
        assert_eq!(
            Target::of(
                &headless,
                Some(&endpoints(&["10.244.1.3", "10.244.0.2"], &["10.244.0.9"]))
            ),
            Some(Target::Headless(vec![
                Ipv4Addr::new(10, 244, 0, 2),
                Ipv4Addr::new(10, 244, 1, 3)
            ])),
            "ready addresses only, in order"
        );
        assert_eq!(Target::of(&headless, None), Some(Target::Headless(vec![])));
        assert_eq!(
            Target::of(
                &service("ExternalName", None, Some("foo.example.com")),
                None
            ),
            Some(Target::ExternalName("foo.example.com".into()))
        );
        // Not allocated yet.
        assert_eq!(Target::of(&service("ClusterIP", None, None), None), None);
    }

    #[test]
    fn only_service_names_of_the_domain_are_services() {
        let svc = |text| service_of(&name(text), &domain());
        assert_eq!(
            svc("web.default.svc.cluster.local."),
            Some(("web".into(), "default".into()))
        );
        assert_eq!(
            svc("Web.Default.SVC.cluster.LOCAL"),
            Some(("web".into(), "default".into())),
            "names are case-insensitive"
        );
        assert_eq!(svc("default.svc.cluster.local."), None);
        assert_eq!(svc("pod.web.default.svc.cluster.local."), None);
        assert_eq!(
            svc("web.default.svc.cluster.local.default.svc.cluster.local."),
            None
        );
        assert_eq!(svc("web.default.svc.example.com."), None);
        assert_eq!(svc("example.com."), None);
    }

    /// A cluster with a ClusterIP Service `web`, a headless `db`, an ExternalName `alias` to
    /// `web`'s name and an ExternalName `out` to a name outside the cluster, all in `ns1`.
    fn lookup(svc: &str, ns: &str) -> Option<Target> {
        match (svc, ns) {
            ("web", "ns1") => Some(Target::ClusterIp(Ipv4Addr::new(10, 96, 0, 10))),
            ("db", "ns1") => Some(Target::Headless(vec![
                Ipv4Addr::new(10, 244, 0, 5),
                Ipv4Addr::new(10, 244, 1, 5),
            ])),
            ("alias", "ns1") => Some(Target::ExternalName("web.ns1.svc.cluster.local".into())),
            ("out", "ns1") => Some(Target::ExternalName("foo.example.com".into())),
            _ => None,
        }
    }

    /// What the answers say, one line each.
    fn lines(answers: &[Record]) -> Vec<String> {
        answers
            .iter()
            .map(|r| format!("{} {}", r.name, r.data))
            .collect()
    }

    #[test]
    fn answers_follow_the_services() {
        let ask = |qname: &str, qtype| resolve(&name(qname), qtype, &domain(), lookup);
        let (code, answers) = ask("web.ns1.svc.cluster.local.", RecordType::A);
        assert_eq!(code, ResponseCode::NoError);
        assert_eq!(lines(&answers), ["web.ns1.svc.cluster.local. 10.96.0.10"]);

        let (code, answers) = ask("db.ns1.svc.cluster.local.", RecordType::A);
        assert_eq!(code, ResponseCode::NoError);
        assert_eq!(
            lines(&answers),
            [
                "db.ns1.svc.cluster.local. 10.244.0.5",
                "db.ns1.svc.cluster.local. 10.244.1.5"
            ]
        );

        let (code, answers) = ask("alias.ns1.svc.cluster.local.", RecordType::A);
        assert_eq!(code, ResponseCode::NoError);
        assert_eq!(
            lines(&answers),
            [
                "alias.ns1.svc.cluster.local. web.ns1.svc.cluster.local.",
                "web.ns1.svc.cluster.local. 10.96.0.10"
            ],
            "an alias within the cluster is followed"
        );
        let (code, answers) = ask("out.ns1.svc.cluster.local.", RecordType::A);
        assert_eq!(code, ResponseCode::NoError);
        assert_eq!(
            lines(&answers),
            ["out.ns1.svc.cluster.local. foo.example.com."]
        );

        // A known name without records of the type: no error, no records.
        let (code, answers) = ask("web.ns1.svc.cluster.local.", RecordType::AAAA);
        assert_eq!((code, answers.len()), (ResponseCode::NoError, 0));
        for unknown in [
            "web.ns2.svc.cluster.local.",
            "nope.ns1.svc.cluster.local.",
            "web.ns1.svc.cluster.local.ns1.svc.cluster.local.",
            "example.com.",
        ] {
            let (code, answers) = ask(unknown, RecordType::A);
            assert_eq!(
                (code, answers.len()),
                (ResponseCode::NXDomain, 0),
                "{unknown}"
            );
        }
    }

    fn query(qname: &str, qtype: RecordType) -> Message {
        let mut query = Message::query();
        query.metadata.recursion_desired = true;
        query.add_query(Query::query(name(qname), qtype));
        query
    }

    #[test]
    fn responses_answer_the_query() {
        let q = query("web.ns1.svc.cluster.local.", RecordType::A);
        let bytes = respond(&q.to_vec().unwrap(), &domain(), Some(UDP_PAYLOAD), lookup).unwrap();
        let response = Message::from_vec(&bytes).unwrap();
        assert_eq!(response.metadata.id, q.metadata.id);
        assert_eq!(response.metadata.message_type, MessageType::Response);
        assert!(response.metadata.authoritative && response.metadata.recursion_desired);
        assert_eq!(response.queries, q.queries);
        assert_eq!(
            lines(&response.answers),
            ["web.ns1.svc.cluster.local. 10.96.0.10"]
        );

        // A response is no query, and garbage is no message: both are dropped.
        assert_eq!(respond(&bytes, &domain(), None, lookup), None);
        assert_eq!(respond(b"\x01\x02", &domain(), None, lookup), None);
    }

    #[test]
    fn long_udp_responses_are_truncated() {
        let many = |_: &str, _: &str| {
            Some(Target::Headless(
                (0..100).map(|i| Ipv4Addr::new(10, 244, 0, i)).collect(),
            ))
        };
        let q = query("db.ns1.svc.cluster.local.", RecordType::A)
            .to_vec()
            .unwrap();
        let udp =
            Message::from_vec(&respond(&q, &domain(), Some(UDP_PAYLOAD), many).unwrap()).unwrap();
        assert!(udp.metadata.truncation && udp.answers.is_empty());
        let tcp = Message::from_vec(&respond(&q, &domain(), None, many).unwrap()).unwrap();
        assert!(!tcp.metadata.truncation);
        assert_eq!(tcp.answers.len(), 100);
    }

    /// Asks the server at `addr` over UDP from `ns`; the response code and answer lines.
    fn ask_udp(ns: &NetNs, addr: SocketAddr, qname: &str) -> Result<(ResponseCode, Vec<String>)> {
        let q = query(qname, RecordType::A).to_vec()?;
        let bytes = ns.run(|| -> Result<Vec<u8>> {
            let socket = UdpSocket::bind("0.0.0.0:0")?;
            socket.set_read_timeout(Some(Duration::from_secs(5)))?;
            socket.send_to(&q, addr)?;
            let mut buf = vec![0u8; 4096];
            let len = socket.recv(&mut buf)?;
            buf.truncate(len);
            Ok(buf)
        })??;
        let response = Message::from_vec(&bytes)?;
        Ok((response.metadata.response_code, lines(&response.answers)))
    }

    /// The same over TCP.
    fn ask_tcp(ns: &NetNs, addr: SocketAddr, qname: &str) -> Result<(ResponseCode, Vec<String>)> {
        let q = query(qname, RecordType::A).to_vec()?;
        let bytes = ns.run(|| -> Result<Vec<u8>> {
            let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
            stream.set_read_timeout(Some(Duration::from_secs(5)))?;
            stream.write_all(&u16::try_from(q.len())?.to_be_bytes())?;
            stream.write_all(&q)?;
            let mut len = [0u8; 2];
            stream.read_exact(&mut len)?;
            let mut buf = vec![0u8; usize::from(u16::from_be_bytes(len))];
            stream.read_exact(&mut buf)?;
            Ok(buf)
        })??;
        let response = Message::from_vec(&bytes)?;
        Ok((response.metadata.response_code, lines(&response.answers)))
    }

    /// Against the real kube-apiserver: Services of each kind and an Endpoints object made with
    /// kubectl are answered over UDP and TCP, and changes and deletions show.
    #[test]
    fn answers_from_the_api_server() -> Result<()> {
        crate::require_root()?;
        let underlay = Underlay::new()?;
        let cp = ControlPlane::start(&underlay, CONTROL_PLANE_IP)?;
        let dns = ClusterDns::start(&cp.ns, cp.ip, &cp.kubeconfig())?;
        let ask = |qname: &str| ask_udp(&cp.ns, dns.addr, qname);

        // The API server's own Service exists from the start.
        assert_eq!(
            ask("kubernetes.default.svc.cluster.local.")?,
            (
                ResponseCode::NoError,
                vec!["kubernetes.default.svc.cluster.local. 10.96.0.1".to_owned()]
            )
        );
        assert_eq!(
            ask_tcp(&cp.ns, dns.addr, "kubernetes.default.svc.cluster.local.")?,
            ask("kubernetes.default.svc.cluster.local.")?
        );
        assert_eq!(
            ask("web.default.svc.cluster.local.")?,
            (ResponseCode::NXDomain, vec![])
        );

        let port = json!([{ "port": 80, "protocol": "TCP" }]);
        cp.apply(&json!({
            "apiVersion": "v1", "kind": "Service",
            "metadata": { "name": "web", "namespace": "default" },
            "spec": { "clusterIP": "10.96.0.80", "ports": port },
        }))?;
        cp.apply(&json!({
            "apiVersion": "v1", "kind": "Service",
            "metadata": { "name": "db", "namespace": "default" },
            "spec": { "clusterIP": "None", "ports": port },
        }))?;
        cp.apply(&json!({
            "apiVersion": "v1", "kind": "Endpoints",
            "metadata": { "name": "db", "namespace": "default" },
            "subsets": [{
                "addresses": [{ "ip": "10.244.1.7" }, { "ip": "10.244.0.7" }],
                "notReadyAddresses": [{ "ip": "10.244.0.99" }],
                "ports": [{ "port": 80, "protocol": "TCP" }],
            }],
        }))?;
        cp.apply(&json!({
            "apiVersion": "v1", "kind": "Service",
            "metadata": { "name": "alias", "namespace": "default" },
            "spec": { "type": "ExternalName", "externalName": "web.default.svc.cluster.local" },
        }))?;
        let expect = |qname: &str, want: &[&str]| -> Result<()> {
            let want = (
                ResponseCode::NoError,
                want.iter().map(|s| (*s).to_owned()).collect::<Vec<_>>(),
            );
            let mut last = None;
            let seen = eventually(Duration::from_secs(30), || {
                let got = ask(qname)?;
                let done = got == want;
                last = Some(got);
                Ok(done)
            })?;
            anyhow::ensure!(seen, "{qname}: want {want:?}, last answer {last:?}");
            Ok(())
        };
        expect(
            "web.default.svc.cluster.local.",
            &["web.default.svc.cluster.local. 10.96.0.80"],
        )?;
        expect(
            "db.default.svc.cluster.local.",
            &[
                "db.default.svc.cluster.local. 10.244.0.7",
                "db.default.svc.cluster.local. 10.244.1.7",
            ],
        )?;
        expect(
            "alias.default.svc.cluster.local.",
            &[
                "alias.default.svc.cluster.local. web.default.svc.cluster.local.",
                "web.default.svc.cluster.local. 10.96.0.80",
            ],
        )?;

        // An endpoint gone, a Service deleted.
        cp.apply(&json!({
            "apiVersion": "v1", "kind": "Endpoints",
            "metadata": { "name": "db", "namespace": "default" },
            "subsets": [{
                "addresses": [{ "ip": "10.244.1.7" }],
                "ports": [{ "port": 80, "protocol": "TCP" }],
            }],
        }))?;
        expect(
            "db.default.svc.cluster.local.",
            &["db.default.svc.cluster.local. 10.244.1.7"],
        )?;
        crate::processes::run(&mut cp.kubectl(["delete", "service", "web"]))?;
        let gone = eventually(Duration::from_secs(30), || {
            Ok(ask("web.default.svc.cluster.local.")?.0 == ResponseCode::NXDomain)
        })?;
        assert!(gone, "web still resolves after its deletion");
        Ok(())
    }
}
