//! Hitless restart: the agent is killed with SIGKILL and started again, several times, while pods
//! on one node and across nodes carry continuous TCP streams and pings. No connection may be lost
//! or stall, at most 0.1% of pings may go unanswered, and every restarted agent must adopt the
//! pinned state as it is (the same maps and links, every pod's endpoint entry, the node table)
//! and serve new pods.

use std::{
    thread,
    time::{Duration, Instant},
};

use anyhow::{ensure, Context as _, Result};
use podwire_lab::{
    cni::Pod,
    eventually,
    load::{self, Pace, Pinger, Stream},
    nodes::{Cluster, ClusterSpec},
    traffic::{ping, tcp_echo},
};

/// How many times an agent is killed, alternating between the two nodes.
const RESTARTS: usize = 5;
/// How long an agent stays dead before it is started again: traffic must flow without it.
const DOWN: Duration = Duration::from_millis(500);
const PING_INTERVAL: Duration = Duration::from_millis(10);
/// The share of pings that may go unanswered over the whole run.
const MAX_PING_LOSS: f64 = 0.001;
/// A stream that receives nothing for this long while its sender sends has stalled: TCP backs off
/// this far only after losing segments for about a second.
const STALL: Duration = Duration::from_secs(5);
/// How long a stream may take to show progress after a restart; bounds the wait only.
const PROGRESS: Duration = Duration::from_secs(20);

#[test]
fn agents_killed_under_load_lose_no_connection_and_restart_on_the_pinned_state() -> Result<()> {
    let mut c = Cluster::start(ClusterSpec {
        nodes: 2,
        ..ClusterSpec::default()
    })?;
    // pods[node][n]
    let pods: Vec<Vec<Pod>> = (0..2)
        .map(|i| {
            (0..2)
                .map(|n| c.nodes[i].add_pod(&format!("c-hitless-{i}-{n}")))
                .collect::<Result<_>>()
        })
        .collect::<Result<_>>()?;
    let ns = |i: usize, n: usize| load::netns(&pods[i][n].ns);
    let ip = |i: usize, n: usize| pods[i][n].ip;

    // Same node on each node, and across nodes both ways.
    let flows = [
        ("node1 same-node", (0, 0), (0, 1)),
        ("node2 same-node", (1, 1), (1, 0)),
        ("node1->node2", (0, 0), (1, 0)),
        ("node2->node1", (1, 1), (0, 1)),
    ];
    let mut streams = Vec::new();
    let mut pingers = Vec::new();
    for (name, (ci, cn), (si, sn)) in flows {
        streams.push(Stream::start(
            name,
            &ns(ci, cn)?,
            &ns(si, sn)?,
            ip(si, sn),
            Pace::default(),
        )?);
        pingers.push(Pinger::start(
            name,
            &ns(si, sn)?,
            ip(ci, cn),
            PING_INTERVAL,
        )?);
    }
    let progressed = |streams: &[Stream], since: &[u64]| {
        streams
            .iter()
            .zip(since)
            .all(|(s, &before)| s.received() > before)
    };
    let none: Vec<u64> = vec![0; streams.len()];
    ensure!(
        eventually(PROGRESS, || Ok(progressed(&streams, &none)))?,
        "the streams carry nothing before any restart"
    );

    let endpoints = |c: &Cluster, i: usize| -> Result<_> {
        let mut e = c.nodes[i].endpoints()?;
        e.sort_by_key(|(ip, _)| *ip);
        Ok(e)
    };
    let node_table = |c: &Cluster, i: usize| c.nodes[i].podwire(&["nodes", "-o", "json"]);
    let mut restart_times = Vec::new();
    for r in 0..RESTARTS {
        let i = r % 2;
        let node = Cluster::node_name(i);
        let ids = c.nodes[i].pinned_ids()?;
        ensure!(
            ids.links.len() >= 3 && ids.filters.len() == 4,
            "{node}: pinned links of the tunnel and the underlay, filters of 2 pods: {ids:?}"
        );
        let entries = endpoints(&c, i)?;
        ensure!(entries.len() == 2, "{node}: {entries:?}");
        let table = node_table(&c, i)?.stdout;

        let killed = Instant::now();
        c.nodes[i].kill_agent()?;
        let sent_while_down: Vec<u64> = streams.iter().map(Stream::sent).collect();
        thread::sleep(DOWN);
        let received_while_down: Vec<u64> = streams.iter().map(Stream::received).collect();
        ensure!(
            progressed(&streams, &sent_while_down),
            "restart {r}: with {node}'s agent dead, not every stream made progress: {:?}",
            streams
                .iter()
                .map(|s| (s.name(), s.received()))
                .collect::<Vec<_>>()
        );
        let started = Instant::now();
        c.nodes[i].start_agent()?;
        let startup = started.elapsed();
        restart_times.push((startup, killed.elapsed()));

        // Adopted, not rebuilt: the same maps and links, with the new agent's programs in them.
        let after = c.nodes[i].pinned_ids()?;
        let differences = ids.not_adopted(&after);
        ensure!(
            differences.is_empty(),
            "restart {r} of {node}'s agent did not adopt the pinned state: {differences:#?}"
        );
        for (name, (_, program)) in &ids.links {
            let (_, now) = after.links[name];
            ensure!(
                now != *program,
                "restart {r}: the link {name} still runs the killed agent's program {program}"
            );
        }
        for (name, program) in &ids.filters {
            ensure!(
                after.filters[name] != *program,
                "restart {r}: the filter {name} still runs the killed agent's program {program}"
            );
        }
        assert_eq!(
            endpoints(&c, i)?,
            entries,
            "restart {r}: {node}'s endpoint entries"
        );
        assert_eq!(
            node_table(&c, i)?.stdout,
            table,
            "restart {r}: {node}'s node table"
        );

        // A new pod on the restarted node works, across nodes too, and leaves no entry behind.
        let late = c.nodes[i].add_pod(&format!("c-hitless-late-{r}"))?;
        let far = &pods[1 - i][0];
        ensure!(
            ping(&late.ns, far.ip)? && ping(&far.ns, late.ip)?,
            "restart {r}: a pod added on {node} after the restart reaches {}",
            far.ip
        );
        tcp_echo(&late.ns, &far.ns, far.ip, 256 * 1024)
            .with_context(|| format!("restart {r}: TCP from the pod added on {node}"))?;
        c.nodes[i].del_pod(&late)?;
        assert_eq!(endpoints(&c, i)?, entries, "restart {r}: after DEL");

        ensure!(
            eventually(PROGRESS, || Ok(progressed(&streams, &received_while_down)))?,
            "restart {r}: not every stream made progress after {node}'s agent came back"
        );
        let (startup, outage) = restart_times[r];
        println!(
            "restart {r}: {node}'s agent killed; serving CNI again {:.0} ms later ({:.0} ms from \
             its start); adopted {} maps, {} links and {} filters",
            outage.as_secs_f64() * 1e3,
            startup.as_secs_f64() * 1e3,
            after.maps.len(),
            after.links.len(),
            after.filters.len()
        );
    }

    let mut failures = Vec::new();
    for stream in streams {
        let report = stream.finish()?;
        println!(
            "stream {}: {} bytes complete and in order, longest gap {:.0} ms, {} retransmits",
            report.name,
            report.bytes,
            report.longest_gap.as_secs_f64() * 1e3,
            report.retransmits
        );
        if report.longest_gap > STALL {
            failures.push(format!(
                "stream {} stalled for {:?}",
                report.name, report.longest_gap
            ));
        }
    }
    for pinger in pingers {
        let report = pinger.finish()?;
        println!(
            "ping {}: {} sent, {} lost ({:.3}%), longest run lost {} (every {:?})",
            report.name,
            report.sent,
            report.lost(),
            report.loss() * 100.0,
            report.longest_loss_run,
            report.interval
        );
        if report.loss() > MAX_PING_LOSS {
            failures.push(format!(
                "ping {} lost {} of {}",
                report.name,
                report.lost(),
                report.sent
            ));
        }
    }
    let times: Vec<String> = restart_times
        .iter()
        .map(|(start, _)| format!("{:.0}", start.as_secs_f64() * 1e3))
        .collect();
    println!(
        "{RESTARTS} restarts, each agent dead {:?} before its start; start to serving CNI (ms): {}",
        DOWN,
        times.join(", ")
    );
    ensure!(failures.is_empty(), "{failures:#?}");
    Ok(())
}

/// While the agent is down the endpoint map drifts from its state (an entry lost, one it never
/// made appears): the restarted agent removes the stale one and writes the missing one, in the
/// same map, without taking away the entries that were right, so pods whose entries were right
/// keep talking throughout.
#[test]
fn a_restarted_agent_reconciles_the_endpoint_map_with_its_state_by_difference() -> Result<()> {
    use podwire_datapath::{DatapathMap as _, Endpoints};
    let mut node = podwire_lab::nodes::Node::start(
        std::net::Ipv4Addr::new(192, 168, 77, 10),
        "10.244.0.0/24",
    )?;
    let pods = (0..3)
        .map(|n| node.add_pod(&format!("c-reconcile-{n}")))
        .collect::<Result<Vec<Pod>>>()?;
    let sorted = |mut entries: Vec<_>| {
        entries.sort_by_key(|(ip, _): &(std::net::Ipv4Addr, _)| *ip);
        entries
    };
    let want = sorted(node.endpoints()?);
    let ids = node.pinned_ids()?;
    // Pods 1 and 2 keep their entries throughout: their pings must not lose one.
    let pinger = Pinger::start(
        "pod 1 -> pod 2",
        &load::netns(&pods[1].ns)?,
        pods[2].ip,
        PING_INTERVAL,
    )?;

    node.kill_agent()?;
    let mut endpoints = Endpoints::open(&node.pins())?;
    endpoints.remove(pods[0].ip)?;
    let stale = std::net::Ipv4Addr::new(10, 244, 0, 200);
    let (_, template) = want[0];
    endpoints.set(stale, template)?;
    thread::sleep(DOWN);
    node.start_agent()?;

    // The agent serves only once it has reconciled.
    let got = sorted(node.endpoints()?);
    ensure!(got == want, "endpoint map {got:?}, want {want:?}");
    let after = node.pinned_ids()?;
    ensure!(
        after.maps == ids.maps,
        "the agent re-created a pinned map: {:?} -> {:?}",
        ids.maps,
        after.maps
    );
    ensure!(
        ping(&pods[2].ns, pods[0].ip)?,
        "the restored pod is reachable"
    );
    let report = pinger.finish()?;
    println!("{report:?}");
    ensure!(
        report.lost() == 0,
        "pods whose entries were right lost pings: {report:?}"
    );
    Ok(())
}
