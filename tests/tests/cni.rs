//! Same-node pod networking through the real CNI plugin, exec'd as a runtime does, against a
//! running agent in a node namespace: addressing, pod-to-pod delivery by the eBPF datapath,
//! anti-spoofing, the CNI verbs' lifecycle, and the spec's errors for bad input.

use std::{
    net::{IpAddr, Ipv4Addr, TcpListener, TcpStream, UdpSocket},
    process::{Command, Output},
    time::Duration,
};

use anyhow::{Context as _, Result};
use podwire_common::Reason;
use podwire_lab::{
    artifacts,
    cni::{pod_ip, Pod},
    namespaces::NetNs,
    nodes::{Cluster, ClusterSpec, Node},
    processes::{run, Daemon},
    traffic::{ping, receive, tcp_echo, udp_listener},
};
use serde_json::Value;

const NODE_IP: Ipv4Addr = Ipv4Addr::new(192, 168, 77, 10);
const POD_CIDR: &str = "10.244.0.0/24";

fn node() -> Result<Node> {
    Node::start(NODE_IP, POD_CIDR)
}

/// CNI_NETNS of `ns`, as a runtime passes it.
fn cni_netns(ns: &NetNs) -> String {
    ns.path().display().to_string()
}

#[test]
fn add_result_follows_the_spec_and_the_pod_is_addressed_as_it_says() -> Result<()> {
    let node = node()?;
    let pod = node.add_pod("c-result")?;
    let r = &pod.result;
    assert_eq!(r["cniVersion"], "1.1.0");
    assert_eq!(
        pod.ip,
        Ipv4Addr::new(10, 244, 0, 2),
        "first pod address (.1 is the node's)"
    );
    assert_eq!(r["ips"][0]["address"], "10.244.0.2/32");
    assert_eq!(r["ips"][0]["gateway"], "169.254.1.1");
    assert_eq!(
        r["ips"][0]["interface"], 1,
        "the IP belongs to the pod's interface"
    );
    assert_eq!(r["interfaces"][1]["name"], "eth0");
    assert_eq!(r["interfaces"][1]["sandbox"], cni_netns(&pod.ns));
    assert_eq!(
        r["interfaces"][1]["mtu"], 1500,
        "a node without overlay gives pods 1500"
    );
    assert_eq!(r["routes"][0]["dst"], "0.0.0.0/0");
    assert_eq!(r["routes"][0]["gw"], "169.254.1.1");
    // The plugin configuration's MTU wins over the node's.
    let mut conf = node.conf();
    conf["mtu"] = 1400.into();
    let small = NetNs::new("pod")?;
    let netns = cni_netns(&small);
    let env = [
        ("CNI_CONTAINERID", "c-mtu"),
        ("CNI_IFNAME", "eth0"),
        ("CNI_NETNS", netns.as_str()),
    ];
    let out = node.cni("ADD", &env, conf.to_string().as_bytes())?;
    assert!(out.success, "{out:?}");
    assert_eq!(out.json()?["interfaces"][1]["mtu"], 1400);
    let link: Value =
        serde_json::from_slice(&small.ip(&["-j", "link", "show", "dev", "eth0"])?.stdout)?;
    assert_eq!(link[0]["mtu"], 1400, "the pod's interface has it");
    assert!(node.cni("DEL", &env, conf.to_string().as_bytes())?.success);

    let host_veth = pod.host_veth()?;
    assert_eq!(node.host_veths()?, [host_veth]);

    // What the result claims is what the pod has.
    let addr: Value =
        serde_json::from_slice(&pod.ns.ip(&["-j", "addr", "show", "dev", "eth0"])?.stdout)?;
    assert_eq!(addr[0]["address"], r["interfaces"][1]["mac"]);
    assert_eq!(addr[0]["mtu"], 1500);
    assert!(addr[0]["addr_info"]
        .as_array()
        .context("addr_info")?
        .iter()
        .any(|a| a["local"] == "10.244.0.2" && a["prefixlen"] == 32));
    let neigh = String::from_utf8(pod.ns.ip(&["neigh", "show", "169.254.1.1"])?.stdout)?;
    let host_mac = r["interfaces"][0]["mac"]
        .as_str()
        .context("host veth MAC")?;
    assert!(
        neigh.contains(host_mac) && neigh.contains("PERMANENT"),
        "gateway resolves to the host veth's MAC without ARP: {neigh}"
    );

    // The endpoint map holds it, pinned in bpffs.
    let endpoints = node.endpoints()?;
    assert_eq!(endpoints.len(), 1);
    assert_eq!(endpoints[0].0, pod.ip);
    Ok(())
}

/// With a tunnel, a pod's link and its route to the pods of its own node get the underlay's full
/// MTU (nothing encapsulates that traffic), its default route what the tunnel leaves: TCP to a
/// same-node pod uses full-size segments, TCP to another node's pods fits the tunnel.
#[test]
fn pods_get_the_full_mtu_to_their_own_node_and_the_tunnels_beyond_it() -> Result<()> {
    let c = Cluster::start(ClusterSpec {
        nodes: 2,
        agent_args: vec!["--vni".into(), "7".into()],
        echo_agents: false,
    })?;
    let a = c.nodes[0].add_pod("c-mtu-a")?;
    let near = c.nodes[0].add_pod("c-mtu-near")?;
    let far = c.nodes[1].add_pod("c-mtu-far")?;
    let r = &a.result;
    assert_eq!(r["interfaces"][0]["mtu"], 1500, "host side: {r}");
    assert_eq!(r["interfaces"][1]["mtu"], 1500, "pod side: {r}");
    let own_cidr = Cluster::pod_cidr(0);
    assert_eq!(
        r["routes"],
        serde_json::json!([
            { "dst": "0.0.0.0/0", "gw": "169.254.1.1", "mtu": 1450 },
            { "dst": own_cidr, "gw": "169.254.1.1", "mtu": 1500 },
        ]),
        "{r}"
    );
    // What the result claims is what the pod has.
    let link: Value =
        serde_json::from_slice(&a.ns.ip(&["-j", "link", "show", "dev", "eth0"])?.stdout)?;
    assert_eq!(link[0]["mtu"], 1500);
    let host: Value = serde_json::from_slice(
        &c.nodes[0]
            .ns
            .ip(&["-j", "link", "show", "dev", a.host_veth()?])?
            .stdout,
    )?;
    assert_eq!(host[0]["mtu"], 1500);
    let routes: Value = serde_json::from_slice(&a.ns.ip(&["-j", "route", "show"])?.stdout)?;
    let via_gateway = |dst: &str| {
        routes
            .as_array()
            .into_iter()
            .flatten()
            .find(|r| r["dst"] == dst && r["gateway"] == "169.254.1.1" && r["dev"] == "eth0")
            .map(|r| r["metrics"].clone())
    };
    assert_eq!(
        via_gateway("default"),
        Some(serde_json::json!([{ "mtu": 1450 }])),
        "{routes}"
    );
    assert_eq!(
        via_gateway(&own_cidr),
        Some(serde_json::json!([{ "mtu": 1500 }])),
        "{routes}"
    );
    // CHECK finds it as ADD made it, and a route that lost its MTU.
    let check = || -> Result<podwire_lab::cni::CniOutput> {
        let mut conf = c.nodes[0].conf();
        conf["prevResult"] = a.result.clone();
        let netns = cni_netns(&a.ns);
        let env = [
            ("CNI_CONTAINERID", a.container_id.as_str()),
            ("CNI_IFNAME", "eth0"),
            ("CNI_NETNS", netns.as_str()),
        ];
        c.nodes[0].cni("CHECK", &env, conf.to_string().as_bytes())
    };
    let ok = check()?;
    assert!(ok.success, "{ok:?}");
    a.ns.ip(&[
        "route",
        "change",
        "default",
        "via",
        "169.254.1.1",
        "dev",
        "eth0",
    ])?;
    let msg = check()?.expect_error(100)?;
    assert!(msg.contains("0.0.0.0/0 via 169.254.1.1 mtu 1450"), "{msg}");
    a.ns.ip(&[
        "route",
        "change",
        "default",
        "via",
        "169.254.1.1",
        "dev",
        "eth0",
        "mtu",
        "1450",
    ])?;

    // The MSS each end of a connection offers: 1500 - 40 to a pod of the node, 1450 - 40
    // across the tunnel.
    assert_eq!(syn_mss(&a, &near)?, 1460);
    assert_eq!(syn_mss(&a, &far)?, 1410);
    Ok(())
}

/// The MSS option of the SYN `from` sends to `to` (port 7000), as tcpdump in `from` reads it.
fn syn_mss(from: &Pod, to: &Pod) -> Result<u64> {
    let listener = to.ns.run(|| TcpListener::bind((to.ip, 7000)))??;
    let capture = tempfile::NamedTempFile::new()?;
    let mut cmd = from.ns.command("tcpdump");
    cmd.args(["-i", "eth0", "-nn", "-U", "-c", "1", "-w"])
        .arg(capture.path())
        .arg(format!(
            "tcp[tcpflags] == tcp-syn and dst host {} and dst port 7000",
            to.ip
        ));
    let mut tcpdump = Daemon::spawn(cmd, None)?;
    tcpdump.wait_for_line("listening on")?;
    // A pod of another node is reachable once its node's agent has the cluster.
    let connected = podwire_lab::eventually(Duration::from_secs(10), || {
        let stream = from
            .ns
            .run(|| TcpStream::connect_timeout(&(to.ip, 7000).into(), Duration::from_secs(1)))?;
        Ok(stream.is_ok())
    })?;
    assert!(connected, "TCP {} -> {}", from.ip, to.ip);
    drop(listener);
    // It exits with its one packet.
    tcpdump.wait()?;
    let read = run(Command::new("tcpdump")
        .args(["-nn", "-r"])
        .arg(capture.path()))?;
    let syn = String::from_utf8(read.stdout)?;
    let mss = syn
        .split("options [mss ")
        .nth(1)
        .and_then(|rest| rest.split([',', ']']).next())
        .with_context(|| format!("no MSS in {syn}"))?;
    mss.parse().with_context(|| format!("MSS {mss:?} in {syn}"))
}

/// Three pods by exec'ing the plugin, two through cnitool in a conflist; with forwarding off in
/// the node, so only podwire's eBPF path can carry pod-to-pod traffic.
#[test]
fn pods_reach_each_other_with_forwarding_off_through_the_ebpf_path() -> Result<()> {
    let node = node()?;
    node.ns.sysctl_ipv4("ip_forward", "0")?;
    let mut pods = (0..3)
        .map(|i| node.add_pod(&format!("c-pair-{i}")))
        .collect::<Result<Vec<Pod>>>()?;
    let cnitool = Cnitool::new(&node)?;
    for _ in 0..2 {
        pods.push(cnitool.add(&node)?);
    }
    let redirected_before = node.counter(Reason::RedirectLocal)?.packets;

    for a in &pods {
        for b in &pods {
            if a.ip != b.ip {
                assert!(ping(&a.ns, b.ip)?, "ping {} -> {}", a.ip, b.ip);
                tcp_echo(&a.ns, &b.ns, b.ip, 128 * 1024)?;
            }
        }
    }
    let redirected = node.counter(Reason::RedirectLocal)?.packets - redirected_before;
    // 20 ordered pairs, each with an ICMP exchange and a TCP echo of 128 KiB both ways.
    assert!(
        redirected >= 20 * 2 * 10,
        "redirect-local counted {redirected} packets"
    );
    assert_eq!(node.counter(Reason::DropSpoofedIp)?.packets, 0);
    assert_eq!(node.counter(Reason::DropSpoofedMac)?.packets, 0);

    // cnitool's DEL goes through the chain too (and clears its cache in /var/lib/cni).
    for pod in &pods[3..] {
        cnitool.run(&node, "del", &pod.ns)?;
        let veth = pod.host_veth()?;
        assert!(
            !node.host_veths()?.iter().any(|v| v == veth),
            "cnitool del removed {veth}"
        );
        assert!(
            node.endpoints()?.iter().all(|(ip, _)| *ip != pod.ip),
            "and its map entry"
        );
    }
    Ok(())
}

#[test]
fn the_node_reaches_its_pods_and_the_pods_reach_the_node() -> Result<()> {
    let node = node()?;
    let pods = (0..2)
        .map(|i| node.add_pod(&format!("c-node-{i}")))
        .collect::<Result<Vec<Pod>>>()?;
    for pod in &pods {
        assert!(ping(&node.ns, pod.ip)?, "node -> {}", pod.ip);
        tcp_echo(&node.ns, &pod.ns, pod.ip, 64 * 1024)?;
        assert!(ping(&pod.ns, NODE_IP)?, "{} -> node", pod.ip);
        tcp_echo(&pod.ns, &node.ns, NODE_IP, 64 * 1024)?;
    }
    assert!(
        node.counter(Reason::PassToStack)?.packets > 0,
        "pod -> node went up the host stack"
    );
    Ok(())
}

#[test]
fn a_pod_sending_with_another_pods_address_is_dropped_and_counted() -> Result<()> {
    let node = node()?;
    let a = node.add_pod("c-spoof-a")?;
    let b = node.add_pod("c-spoof-b")?;
    let c = node.add_pod("c-spoof-c")?;
    let listener = udp_listener(&c.ns, c.ip)?;
    let target = listener.local_addr()?;

    // a takes b's address on top of its own and sends from it.
    a.ns.ip(&["addr", "add", &format!("{}/32", b.ip), "dev", "eth0"])?;
    let spoofer = a.ns.run(|| UdpSocket::bind((b.ip, 0)))??;
    let before = node.counter(Reason::DropSpoofedIp)?;
    for _ in 0..3 {
        spoofer.send_to(b"not from b", target)?;
    }
    assert_eq!(
        receive(&listener)?,
        None,
        "spoofed datagram must not arrive"
    );
    let after = node.counter(Reason::DropSpoofedIp)?;
    assert_eq!(
        after.packets - before.packets,
        3,
        "each spoofed datagram dropped and counted"
    );

    // Each drop is on the event ring, with its reason and addresses: `podwire events`.
    let out = node.podwire(&["events", "-o", "json", "--idle", "2"])?;
    let events: Vec<Value> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).context("one JSON object per line"))
        .collect::<Result<Vec<Value>>>()?
        .into_iter()
        .filter(|e| e["reason"] == "drop-spoofed-ip")
        .collect();
    assert_eq!(events.len(), 3, "{events:?}");
    for e in &events {
        assert_eq!(
            (e["src"].as_str(), e["dst"].as_str()),
            (Some(&*b.ip.to_string()), Some(&*c.ip.to_string()))
        );
        assert_eq!(e["proto"], 17);
    }

    // a's own address still works.
    let honest = a.ns.run(|| UdpSocket::bind((a.ip, 0)))??;
    honest.send_to(b"from a", target)?;
    let (payload, from) = receive(&listener)?.context("a's own datagram arrives")?;
    assert_eq!(
        (&payload[..], from.ip()),
        (&b"from a"[..], IpAddr::V4(a.ip))
    );
    Ok(())
}

#[test]
fn del_then_add_again_reuses_no_stale_state() -> Result<()> {
    let node = node()?;
    let peer = node.add_pod("c-peer")?;
    let first = node.add_pod("c-cycle")?;
    let first_veth = first.host_veth()?.to_owned();
    assert!(ping(&first.ns, peer.ip)?);

    let del = node.cni_pod("DEL", "c-cycle", Some(&first.ns))?;
    assert!(del.success && del.stdout.is_empty(), "DEL: {del:?}");
    // Gone from the node and the pod as DEL answers, though the kernel may still be freeing it.
    assert!(!node.host_veths()?.contains(&first_veth), "veth removed");
    assert_eq!(
        first.ns.link_names(&[])?,
        ["lo"],
        "the pod's eth0 went with it"
    );
    assert!(
        node.endpoints()?.iter().all(|(ip, _)| *ip != first.ip),
        "map entry removed"
    );
    assert!(
        !node.state()?.to_string().contains("c-cycle"),
        "address released"
    );
    // DEL again, and DEL without a netns, are fine.
    assert!(node.cni_pod("DEL", "c-cycle", Some(&first.ns))?.success);
    assert!(node.cni_pod("DEL", "c-cycle", None)?.success);

    // ADD of the same container again: fresh state, working connectivity.
    let again = node.cni_pod("ADD", "c-cycle", Some(&first.ns))?;
    assert!(again.success, "ADD after DEL: {again:?}");
    let ip = pod_ip(&again.json()?)?;
    assert_ne!(
        ip, first.ip,
        "a released address is not handed out again straight away"
    );
    assert!(ping(&first.ns, peer.ip)?, "re-added pod reaches its peer");
    assert!(ping(&peer.ns, ip)?, "peer reaches the re-added pod");

    // DEL and ADD of one attachment in one netns in quick succession.
    for _ in 0..10 {
        node.del_pod(&first)?;
        let again = node.cni_pod("ADD", "c-cycle", Some(&first.ns))?;
        assert!(again.success, "ADD right after DEL: {again:?}");
    }
    let ip = pod_ip(
        &node
            .cni_pod("ADD", "c-cycle", Some(&first.ns))?
            .expect_success()?,
    )?;
    assert!(ping(&peer.ns, ip)?, "peer reaches the pod added last");

    // A second container after the first's DEL.
    node.del_pod(&first)?;
    let second = node.add_pod("c-second")?;
    assert!(ping(&second.ns, peer.ip)?);
    let ips: Vec<Ipv4Addr> = node.endpoints()?.into_iter().map(|(ip, _)| ip).collect();
    assert_eq!(ips, [peer.ip, second.ip], "only live endpoints in the map");
    Ok(())
}

#[test]
fn check_passes_on_a_wired_pod_and_fails_once_its_interface_is_gone() -> Result<()> {
    let node = node()?;
    let pod = node.add_pod("c-check")?;
    let mut conf = node.conf();
    conf["prevResult"] = pod.result.clone();
    let netns = cni_netns(&pod.ns);
    let env = [
        ("CNI_CONTAINERID", "c-check"),
        ("CNI_IFNAME", "eth0"),
        ("CNI_NETNS", netns.as_str()),
    ];
    let ok = node.cni("CHECK", &env, conf.to_string().as_bytes())?;
    assert!(
        ok.success && ok.stdout.is_empty(),
        "CHECK of a wired pod: {ok:?}"
    );

    pod.ns.ip(&["link", "del", "eth0"])?;
    let msg = node
        .cni("CHECK", &env, conf.to_string().as_bytes())?
        .expect_error(100)?;
    assert!(
        msg.contains("veth") || msg.contains("eth0"),
        "message names what is missing: {msg}"
    );
    Ok(())
}

#[test]
fn gc_removes_attachments_the_runtime_no_longer_has() -> Result<()> {
    let node = node()?;
    let keep = node.add_pod("c-keep")?;
    let stale = node.add_pod("c-stale")?;
    let stale_veth = stale.host_veth()?.to_owned();
    let mut conf = node.conf();
    conf["cni.dev/valid-attachments"] =
        serde_json::json!([{ "containerID": "c-keep", "ifname": "eth0" }]);
    let gc = node.cni("GC", &[], conf.to_string().as_bytes())?;
    assert!(gc.success && gc.stdout.is_empty(), "GC: {gc:?}");
    assert!(
        !node.host_veths()?.contains(&stale_veth),
        "stale veth deleted"
    );
    let ips: Vec<Ipv4Addr> = node.endpoints()?.into_iter().map(|(ip, _)| ip).collect();
    assert_eq!(ips, [keep.ip], "stale map entry removed");
    assert!(
        !node.state()?.to_string().contains("c-stale"),
        "stale address released"
    );
    assert!(ping(&node.ns, keep.ip)?, "the kept pod still works");
    Ok(())
}

#[test]
fn status_and_version() -> Result<()> {
    use std::os::unix::fs::PermissionsExt as _;
    let mut node = node()?;
    let status = node.cni("STATUS", &[], node.conf().to_string().as_bytes())?;
    assert!(
        status.success && status.stdout.is_empty(),
        "STATUS with the agent up: {status:?}"
    );
    let mode = std::fs::metadata(node.socket())?.permissions().mode();
    assert_eq!(mode & 0o777, 0o600, "only root may talk to the agent");
    let version = node.cni("VERSION", &[], br#"{"cniVersion":"1.1.0"}"#)?;
    assert!(version.success);
    let v = version.json()?;
    assert_eq!(
        v["supportedVersions"],
        serde_json::json!(["0.4.0", "1.0.0", "1.1.0"])
    );

    node.stop_agent()?;
    let msg = node
        .cni("STATUS", &[], node.conf().to_string().as_bytes())?
        .expect_error(50)?;
    assert!(msg.contains("not reachable"), "{msg}");
    Ok(())
}

/// Pods keep their connectivity while the agent is down, and a restarted agent neither loses
/// nor hands out again the addresses it gave.
#[test]
fn the_datapath_and_the_addresses_survive_an_agent_restart() -> Result<()> {
    let mut node = node()?;
    let a = node.add_pod("c-restart-a")?;
    let b = node.add_pod("c-restart-b")?;
    node.stop_agent()?;
    assert!(ping(&a.ns, b.ip)?, "pod-to-pod with the agent down");
    node.start_agent()?;
    let c = node.add_pod("c-restart-c")?;
    assert!(c.ip != a.ip && c.ip != b.ip, "no address handed out twice");
    for (x, y) in [(&a, &b), (&b, &c), (&c, &a)] {
        assert!(ping(&x.ns, y.ip)?, "{} -> {} after restart", x.ip, y.ip);
    }
    Ok(())
}

#[test]
fn bad_input_gets_the_specs_errors_and_leaves_nothing_behind() -> Result<()> {
    let mut node = node()?;
    let pod = NetNs::new("pod")?;
    let netns = cni_netns(&pod);
    let env = [
        ("CNI_CONTAINERID", "c-bad"),
        ("CNI_IFNAME", "eth0"),
        ("CNI_NETNS", netns.as_str()),
    ];

    let msg = node
        .cni("ADD", &env, b"{\"cniVersion\": \"1.1.0\", \"name\": ")?
        .expect_error(6)?;
    assert!(msg.contains("not valid JSON"), "{msg}");

    let mut old = node.conf();
    old["cniVersion"] = "0.2.0".into();
    let msg = node
        .cni("ADD", &env, old.to_string().as_bytes())?
        .expect_error(1)?;
    assert!(
        msg.contains("0.2.0") && msg.contains("1.1.0"),
        "names the version and what is supported: {msg}"
    );

    let msg = node
        .cni("ADD", &env[..2], node.conf().to_string().as_bytes())?
        .expect_error(4)?;
    assert!(msg.contains("CNI_NETNS"), "{msg}");

    let mut ipam = node.conf();
    ipam["ipam"] = serde_json::json!({ "type": "host-local" });
    let msg = node
        .cni("ADD", &env, ipam.to_string().as_bytes())?
        .expect_error(2)?;
    assert!(msg.contains("ipam"), "{msg}");

    let mut tiny_mtu = node.conf();
    tiny_mtu["mtu"] = 100.into();
    let msg = node
        .cni("ADD", &env, tiny_mtu.to_string().as_bytes())?
        .expect_error(7)?;
    assert!(msg.contains("mtu 100"), "{msg}");

    let mut nameless = node.conf();
    nameless
        .as_object_mut()
        .context("the configuration is an object")?
        .remove("name");
    let msg = node
        .cni("ADD", &env, nameless.to_string().as_bytes())?
        .expect_error(7)?;
    assert!(msg.contains("name"), "{msg}");

    node.stop_agent()?;
    let msg = node
        .cni("ADD", &env, node.conf().to_string().as_bytes())?
        .expect_error(11)?;
    assert!(msg.contains("not reachable"), "{msg}");

    // Nothing was left: no veth on the node, no interface in the pod, no map entry, no address.
    let veths = node.host_veths()?;
    assert!(veths.is_empty(), "veths: {veths:?}");
    let links = String::from_utf8(pod.ip(&["-o", "link"])?.stdout)?;
    assert!(!links.contains("eth0"), "pod interfaces: {links}");
    assert!(node.endpoints()?.is_empty());
    assert_eq!(node.state()?["endpoints"], serde_json::json!({}));
    Ok(())
}

/// cnitool, a real CNI runtime client, with podwire first in a conflist and the reference
/// `tuning` plugin after it (which must understand podwire's result).
struct Cnitool {
    netconf: tempfile::TempDir,
    cni_path: String,
}

impl Cnitool {
    fn new(node: &Node) -> Result<Cnitool> {
        let netconf = tempfile::tempdir()?;
        let mut podwire = node.conf();
        let fields = podwire
            .as_object_mut()
            .context("the configuration is an object")?;
        fields.remove("cniVersion");
        fields.remove("name");
        let conflist = serde_json::json!({
            // cnitool's library (libcni 1.1.2) speaks up to 1.0.0.
            "cniVersion": "1.0.0",
            "name": "podwire",
            "plugins": [podwire, { "type": "tuning", "sysctl": { "net.ipv4.conf.eth0.accept_local": "1" } }],
        });
        std::fs::write(
            netconf.path().join("10-podwire.conflist"),
            conflist.to_string(),
        )?;
        let plugin = artifacts::bin("podwire-cni")?;
        let cni_path = format!(
            "{}:/usr/lib/cni",
            plugin
                .parent()
                .expect("a binary lives in a directory")
                .display()
        );
        Ok(Cnitool { netconf, cni_path })
    }

    fn run(&self, node: &Node, verb: &str, pod: &NetNs) -> Result<Output> {
        run(node
            .command(artifacts::cnitool()?)
            .args([verb, "podwire"])
            .arg(pod.path())
            .env("NETCONFPATH", self.netconf.path())
            .env("CNI_PATH", &self.cni_path))
    }

    /// A pod added with `cnitool add`.
    fn add(&self, node: &Node) -> Result<Pod> {
        let ns = NetNs::new("pod")?;
        let out = self.run(node, "add", &ns)?;
        let result: Value =
            serde_json::from_slice(&out.stdout).context("cnitool prints the result")?;
        assert_eq!(result["cniVersion"], "1.0.0");
        let sysctl = String::from_utf8(
            run(ns
                .command("sysctl")
                .args(["-n", "net.ipv4.conf.eth0.accept_local"]))?
            .stdout,
        )?;
        assert_eq!(sysctl.trim(), "1", "tuning ran after podwire on its result");
        let ip = pod_ip(&result)?;
        Ok(Pod {
            container_id: container_of(node, ip)?,
            ns,
            ip,
            result,
        })
    }
}

/// The container ID of the pod at `ip`, as the agent recorded it: cnitool makes one up (from
/// the netns path) and does not print it.
fn container_of(node: &Node, ip: Ipv4Addr) -> Result<String> {
    let state = node.state()?;
    state["endpoints"]
        .as_object()
        .into_iter()
        .flat_map(|records| records.values())
        .find(|record| record["ip"] == ip.to_string())
        .and_then(|record| record["container_id"].as_str())
        .map(str::to_owned)
        .with_context(|| format!("no endpoint of {ip} in the agent's state: {state}"))
}
