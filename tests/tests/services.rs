//! Kubernetes Services through a podwire node's host stack, as in a cluster: the real kube-proxy
//! (v1.20.2, iptables mode, its default settings: no --masquerade-all) against a real API server
//! writes the rules; and rules in the shape today's kube-proxy writes in its nftables mode, loaded
//! with nft. Every case sends TCP and UDP through the Service and checks the answer, where it
//! came from (a UDP answer from the Service's address, as a DNS client requires), and which
//! client address the backend saw.
//!
//! The nodes forward IP, as kube-proxy's Services need and kubeadm nodes do.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};

use anyhow::{Context as _, Result};
use podwire_common::Reason;
use podwire_lab::{
    cni::Pod,
    k8s::{Backend, ControlPlane, KubeProxy, Service, ServicePort, ServiceType, CONTROL_PLANE_IP},
    namespaces::NetNs,
    nodes::{Cluster, ClusterSpec},
    processes::{run, run_with_stdin},
    traffic::{seen_from, tcp_request, udp_request, EchoServers},
};

/// The backends' port, TCP and UDP.
const BACKEND_PORT: u16 = 8080;
const TCP_PORT: u16 = 80;
const UDP_PORT: u16 = 53;
const OUTSIDE: Ipv4Addr = Ipv4Addr::new(192, 168, 77, 100);

/// Two forwarding nodes with a default route via a host outside the cluster on the underlay; on
/// node1 a client pod and a backend, on node2 a backend; every pod runs echo servers.
struct Lab {
    cluster: Cluster,
    client: Pod,
    same_node: Pod,
    other_node: Pod,
    outside: NetNs,
    _servers: Vec<EchoServers>,
}

impl Lab {
    fn start() -> Result<Lab> {
        let cluster = Cluster::start(ClusterSpec {
            nodes: 2,
            ..ClusterSpec::default()
        })?;
        let outside = cluster.underlay.plug("outside", OUTSIDE, false)?;
        for node in &cluster.nodes {
            node.ns.sysctl_ipv4("ip_forward", "1")?;
            // A node's own connections to a Service address need a route for it before
            // kube-proxy's DNAT picks the backend; real nodes have their default route.
            node.ns
                .ip(&["route", "add", "default", "via", &OUTSIDE.to_string()])?;
        }
        let client = cluster.nodes[0].add_pod("svc-client")?;
        let same_node = cluster.nodes[0].add_pod("svc-same-node")?;
        let other_node = cluster.nodes[1].add_pod("svc-other-node")?;
        let servers = [&client, &same_node, &other_node]
            .into_iter()
            .map(|pod| EchoServers::start(&pod.ns, pod.ip, BACKEND_PORT))
            .collect::<Result<_>>()?;
        Ok(Lab {
            cluster,
            client,
            same_node,
            other_node,
            outside,
            _servers: servers,
        })
    }

    /// A Service at `cluster_ip` (TCP 80 and UDP 53) with `backend`, a pod on node `node` (from
    /// 0), behind it.
    fn service(name: &str, cluster_ip: Ipv4Addr, (backend, node): (&Pod, usize)) -> Service {
        Service {
            name: name.into(),
            kind: ServiceType::ClusterIp,
            cluster_ip,
            ports: vec![
                ServicePort::tcp("http", TCP_PORT, BACKEND_PORT),
                ServicePort::udp("dns", UDP_PORT, BACKEND_PORT),
            ],
            backends: vec![Backend {
                ip: backend.ip,
                node: Cluster::node_name(node),
            }],
        }
    }
}

/// Who the backend must see as the client: the client itself, or an address that masquerading
/// put in its place.
#[derive(Clone, Copy, Debug)]
enum Seen {
    Client(Ipv4Addr),
    Masqueraded,
}

/// TCP and UDP from `client` to `tcp` and `udp` (a Service's address and ports), which the
/// backend `backend` answers: the answers arrive intact, the UDP one from `udp` itself, and the
/// backend saw the client as `seen`.
fn check(
    what: &str,
    client: &NetNs,
    (tcp, udp): (SocketAddr, SocketAddr),
    backend: &Pod,
    seen: Seen,
) -> Result<()> {
    let request = format!("{what} over TCP");
    let answer = tcp_request(client, tcp, request.as_bytes())
        .with_context(|| format!("{what}: TCP to {tcp}"))?;
    let (echoed, tcp_peer) = seen_from(&answer)?;
    assert_eq!(echoed, request.as_bytes(), "{what}: the TCP answer");

    let request = format!("{what} over UDP");
    let (answer, from) = udp_request(client, udp, request.as_bytes())
        .with_context(|| format!("{what}: UDP to {udp}"))?;
    assert_eq!(
        from, udp,
        "{what}: the UDP answer comes from the address asked, not the backend {}",
        backend.ip
    );
    let (echoed, udp_peer) = seen_from(&answer)?;
    assert_eq!(echoed, request.as_bytes(), "{what}: the UDP answer");

    for peer in [tcp_peer, udp_peer] {
        match seen {
            Seen::Client(ip) => assert_eq!(
                peer.ip(),
                IpAddr::V4(ip),
                "{what}: the backend sees the client's own address"
            ),
            Seen::Masqueraded => assert_ne!(peer.ip(), IpAddr::V4(backend.ip), "{what}"),
        }
    }
    Ok(())
}

impl Lab {
    /// The Services of the cases, at consecutive ClusterIPs from 10.96.0.`first`: backends on
    /// the client's node, on the other node, the client itself, and a NodePort Service (ports
    /// 30080 and 30053) with its backend on the other node.
    fn services(&self, first: u8) -> [Service; 4] {
        let ip = |i: u8| Ipv4Addr::new(10, 96, 0, first + i);
        let mut node_port = Lab::service("node-port", ip(3), (&self.other_node, 1));
        node_port.kind = ServiceType::NodePort;
        node_port.ports[0].node_port = Some(30080);
        node_port.ports[1].node_port = Some(30053);
        [
            Lab::service("same-node", ip(0), (&self.same_node, 0)),
            Lab::service("other-node", ip(1), (&self.other_node, 1)),
            Lab::service("hairpin", ip(2), (&self.client, 0)),
            node_port,
        ]
    }

    /// Every case: the client pod to the ClusterIPs of Services whose backend is on its node
    /// (`same`), on the other node (`other`) and itself (`hairpin`, which kube-proxy
    /// masquerades); the host outside the cluster to `node_port` on node1, its backend on node2;
    /// node1 itself to `same` and `other`.
    fn check_all(
        &self,
        same: &Service,
        other: &Service,
        hairpin: &Service,
        node_port: &Service,
    ) -> Result<()> {
        let client = &self.client;
        check(
            "a pod to a ClusterIP, backend on its node",
            &client.ns,
            cluster_ip(same),
            &self.same_node,
            Seen::Client(client.ip),
        )?;
        check(
            "a pod to a ClusterIP, backend on another node",
            &client.ns,
            cluster_ip(other),
            &self.other_node,
            Seen::Client(client.ip),
        )?;
        check(
            "a pod to a ClusterIP whose backend is itself (hairpin)",
            &client.ns,
            cluster_ip(hairpin),
            client,
            Seen::Masqueraded,
        )?;
        let node1 = &self.cluster.nodes[0];
        let (tcp, udp) = (&node_port.ports[0], &node_port.ports[1]);
        check(
            "a host outside the cluster to a NodePort, backend on another node",
            &self.outside,
            (
                SocketAddr::from((node1.ip, tcp.node_port.context("a TCP node port")?)),
                SocketAddr::from((node1.ip, udp.node_port.context("a UDP node port")?)),
            ),
            &self.other_node,
            Seen::Masqueraded,
        )?;
        for (what, svc, backend) in [
            (
                "the node itself to a ClusterIP, backend on it",
                same,
                &self.same_node,
            ),
            (
                "the node itself to a ClusterIP, backend on another node",
                other,
                &self.other_node,
            ),
        ] {
            check(what, &node1.ns, cluster_ip(svc), backend, Seen::Masqueraded)?;
        }
        Ok(())
    }
}

fn cluster_ip(svc: &Service) -> (SocketAddr, SocketAddr) {
    (
        SocketAddr::from((svc.cluster_ip, TCP_PORT)),
        SocketAddr::from((svc.cluster_ip, UDP_PORT)),
    )
}

#[test]
fn services_through_kube_proxy_in_iptables_mode() -> Result<()> {
    let lab = Lab::start()?;
    let cp = ControlPlane::start(&lab.cluster.underlay, CONTROL_PLANE_IP)?;
    let proxies = lab
        .cluster
        .nodes
        .iter()
        .enumerate()
        .map(|(i, node)| KubeProxy::start(node, &Cluster::node_name(i), &cp))
        .collect::<Result<Vec<_>>>()?;

    let [same, other, hairpin, node_port] = lab.services(10);
    for svc in [&same, &other, &hairpin, &node_port] {
        cp.apply_service(svc)?;
        for proxy in &proxies {
            proxy.wait_for_service(svc)?;
        }
    }

    let node1 = &lab.cluster.nodes[0];
    let stack_flows_before = node1.counter(Reason::PassStackFlow)?.packets;
    let client = &lab.client;
    lab.check_all(&same, &other, &hairpin, &node_port)?;
    // The replies to the pod's own requests went back through node1's stack, where its
    // conntrack reversed kube-proxy's DNAT.
    assert!(
        node1.counter(Reason::PassStackFlow)?.packets > stack_flows_before,
        "replies took the stack's path"
    );

    // Plain pod-to-pod traffic keeps podwire's shortcut.
    let redirected = node1.counter(Reason::RedirectLocal)?.packets;
    let answer = tcp_request(
        &client.ns,
        SocketAddr::from((lab.same_node.ip, BACKEND_PORT)),
        b"direct",
    )?;
    assert_eq!(seen_from(&answer)?.1.ip(), IpAddr::V4(client.ip));
    assert!(node1.counter(Reason::RedirectLocal)?.packets > redirected);
    Ok(())
}

/// nft rules for `services`, in the shape kube-proxy's nftables mode (Kubernetes 1.29 and later)
/// writes them: table `ip kube-proxy`; a `service-ips` map from address, protocol and port to a
/// chain per Service port; that chain marks traffic from outside the cluster range for
/// masquerade and picks an endpoint chain; the endpoint chain marks hairpin traffic and DNATs;
/// a `service-nodeports` map sends a node's own address and a node port to an external chain,
/// which marks for masquerade and goes on to the Service's chain; a postrouting chain
/// masquerades what was marked (mark 0x4000). Only the parts these tests exercise: Services
/// with one endpoint each.
fn nft_ruleset(services: &[&Service]) -> String {
    let mut chains = String::new();
    let mut elements = Vec::new();
    let mut node_ports = Vec::new();
    for svc in services {
        for port in &svc.ports {
            let backend = &svc.backends[0];
            let proto = port.protocol.iptables();
            let service_chain = format!("service-{}-{proto}-{}", svc.name, port.name);
            let endpoint_chain = format!("endpoint-{}-{proto}-{}", svc.name, port.name);
            elements.push(format!(
                "{} . {proto} . {} : goto {service_chain}",
                svc.cluster_ip, port.port
            ));
            chains.push_str(&format!(
                "  chain {service_chain} {{\n\
                 \x20   ip saddr != 10.244.0.0/16 jump mark-for-masquerade\n\
                 \x20   numgen random mod 1 vmap {{ 0 : goto {endpoint_chain} }}\n\
                 \x20 }}\n\
                 \x20 chain {endpoint_chain} {{\n\
                 \x20   ip saddr {backend} jump mark-for-masquerade\n\
                 \x20   meta l4proto {proto} dnat to {backend}:{target}\n\
                 \x20 }}\n",
                backend = backend.ip,
                target = port.target_port,
            ));
            if let Some(node_port) = port.node_port {
                let external_chain = format!("external-{}-{proto}-{}", svc.name, port.name);
                node_ports.push(format!("{proto} . {node_port} : goto {external_chain}"));
                chains.push_str(&format!(
                    "  chain {external_chain} {{\n\
                     \x20   jump mark-for-masquerade\n\
                     \x20   goto {service_chain}\n\
                     \x20 }}\n"
                ));
            }
        }
    }
    // nft refuses an empty set of elements.
    let node_ports = match node_ports.is_empty() {
        true => String::new(),
        false => format!("elements = {{ {} }}", node_ports.join(", ")),
    };
    format!(
        "table ip kube-proxy\n\
         delete table ip kube-proxy\n\
         table ip kube-proxy {{\n\
         \x20 map service-ips {{\n\
         \x20   type ipv4_addr . inet_proto . inet_service : verdict\n\
         \x20   elements = {{ {elements} }}\n\
         \x20 }}\n\
         \x20 map service-nodeports {{\n\
         \x20   type inet_proto . inet_service : verdict\n\
         \x20   {node_ports}\n\
         \x20 }}\n\
         \x20 chain mark-for-masquerade {{\n\
         \x20   mark set mark or 0x4000\n\
         \x20 }}\n\
         \x20 chain masquerading {{\n\
         \x20   type nat hook postrouting priority srcnat; policy accept;\n\
         \x20   mark and 0x4000 == 0 return\n\
         \x20   mark set mark xor 0x4000\n\
         \x20   masquerade fully-random\n\
         \x20 }}\n\
         \x20 chain services {{\n\
         \x20   ip daddr . meta l4proto . th dport vmap @service-ips\n\
         \x20   fib daddr type local ip daddr != 127.0.0.0/8 meta l4proto . th dport vmap @service-nodeports\n\
         \x20 }}\n\
         \x20 chain nat-prerouting {{\n\
         \x20   type nat hook prerouting priority dstnat; policy accept;\n\
         \x20   jump services\n\
         \x20 }}\n\
         \x20 chain nat-output {{\n\
         \x20   type nat hook output priority -100; policy accept;\n\
         \x20   jump services\n\
         \x20 }}\n\
         {chains}}}\n",
        elements = elements.join(", ")
    )
}

#[test]
fn services_through_rules_in_kube_proxys_nftables_shape() -> Result<()> {
    let lab = Lab::start()?;
    let [same, other, hairpin, node_port] = lab.services(20);
    let ruleset = nft_ruleset(&[&same, &other, &hairpin, &node_port]);
    for node in &lab.cluster.nodes {
        run_with_stdin(node.command("nft").args(["-f", "-"]), ruleset.as_bytes())
            .with_context(|| format!("loading the rules:\n{ruleset}"))?;
    }

    lab.check_all(&same, &other, &hairpin, &node_port)?;
    // What the node's nftables hold, for a failing run's reader.
    let listed =
        run(lab.cluster.nodes[0]
            .command("nft")
            .args(["list", "table", "ip", "kube-proxy"]))?;
    assert!(String::from_utf8(listed.stdout)?.contains("service-ips"));
    Ok(())
}
