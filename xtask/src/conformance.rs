//! `cargo xtask conformance`: Kubernetes v1.20.2's own networking conformance specs
//! (`[sig-network] ... [Conformance]`, upstream's `e2e.test`) against a real two-node cluster of
//! the lab with podwire installed by its Helm chart, or, with `--cni bridge`, with the reference
//! `bridge` and `host-local` plugins instead: the baseline, which passes all 24 on this kind of
//! machine.
//!
//! The cluster is the lab's [`KubeCluster`]: a control plane in a network namespace of its own,
//! kubelet, containerd and kube-proxy nodes in theirs. Added here: the cluster DNS the Service
//! specs reach Services by name through ([`ClusterDns`], on the control plane's address, which
//! kubelet gives pods as their nameserver), the suite's agnhost image imported into every node
//! ([`e2e_images`]; pause and busybox come with the nodes), and the CNI. The suite runs in the control plane's namespace (the API
//! server listens there only) with the v1.20.2 kubectl first in its PATH (specs exec through it).
//! The 8 DNS specs are skipped: they need upstream's dnsutils image and pod and SRV records, which
//! the lab's DNS does not serve; `Serial` and `Disruptive` specs are never selected.
//!
//! The junit report and the suite's full output stay in target/conformance/<cni>/; the table of
//! results (spec, result, seconds) is printed as Markdown, for docs/conformance.md.

use std::{
    fmt::Write as _,
    fs,
    io::{BufRead as _, BufReader, Write as _},
    net::Ipv4Addr,
    path::Path,
    process::Stdio,
    time::{Duration, Instant},
};

use anyhow::{bail, ensure, Context as _, Result};
use podwire_lab::{
    dns::{ClusterDns, CLUSTER_DOMAIN},
    kubelet::KubeCluster,
    processes::run as run_lab,
};

use crate::{
    build::{self, workspace_root, Built},
    e2e_images, helm, image, k8s, k8s_node,
    toolchain::{ensure_packages, Needs},
};

/// The specs upstream's networking conformance holds (32 in v1.20.2).
pub const FOCUS: &str = r"\[sig-network\].*\[Conformance\]";
/// Never run here: specs that disturb the cluster, and the DNS specs (see the module's comment).
const SKIP: &str = r"Serial|Disruptive|\[sig-network\] DNS";
/// Nodes of the cluster: cross-node specs need two.
const NODES: usize = 2;
/// Bounds the wait for the nodes to turn Ready after the CNI is installed.
const READY_TIMEOUT: Duration = Duration::from_secs(300);
/// The Helm release and namespace of podwire.
const RELEASE: &str = "podwire";
const RELEASE_NAMESPACE: &str = "kube-system";

/// The pod network the cluster runs on.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Cni {
    /// podwire, installed with `helm install` of helm/podwire and its image.
    Podwire,
    /// The reference `bridge` + `host-local` plugins, with routes between nodes: the baseline.
    Bridge,
}

impl Cni {
    fn name(self) -> &'static str {
        match self {
            Cni::Podwire => "podwire",
            Cni::Bridge => "bridge",
        }
    }
}

/// `cargo xtask conformance`: fails unless every selected spec passes.
pub fn run(cni: Cni, focus: &str) -> Result<()> {
    podwire_lab::require_root()?;
    let k8s_bin = k8s::ensure()?;
    k8s_node::ensure()?;
    // podwire's image, built from a release build as users get it, and Helm.
    let podwire = match cni {
        Cni::Podwire => {
            let Built { bins, .. } = build::all(true, Needs::Build)?;
            Some((image::archive(&bins)?, helm::ensure()?))
        }
        Cni::Bridge => {
            ensure_packages(&[(
                "containernetworking-plugins",
                "the reference bridge and host-local CNI plugins",
            )])?;
            None
        }
    };
    let agnhost = e2e_images::agnhost(&k8s_bin)?;
    let report = workspace_root().join("target/conformance").join(cni.name());
    if report.exists() {
        fs::remove_dir_all(&report).with_context(|| format!("removing {}", report.display()))?;
    }
    fs::create_dir_all(&report).with_context(|| format!("creating {}", report.display()))?;

    eprintln!("conformance: starting a {NODES}-node cluster");
    let started = Instant::now();
    let cluster = KubeCluster::start(NODES)?;
    let dns = ClusterDns::start(&cluster.cp.ns, cluster.cp.ip, &cluster.kubeconfig())?;
    // pause and busybox come with the nodes; podwire's image is imported as a user would.
    let mut images = vec![agnhost];
    images.extend(podwire.as_ref().map(|(archive, _)| archive.clone()));
    for node in &cluster.nodes {
        for image in &images {
            node.import_image(image)?;
        }
    }
    match &podwire {
        Some((_, helm)) => install_podwire(&cluster, helm)?,
        None => install_bridge(&cluster)?,
    }
    cluster.wait_ready(READY_TIMEOUT)?;
    eprintln!(
        "conformance: cluster ready in {} s (cluster DNS on {}); running e2e.test --ginkgo.focus='{focus}' \
         --ginkgo.skip='{SKIP}' (output in {})",
        started.elapsed().as_secs(),
        dns.addr,
        report.display()
    );

    let started = Instant::now();
    run_suite(&cluster, &k8s_bin, &report, focus)?;
    let elapsed = started.elapsed();
    let junit = report.join("junit_01.xml");
    let xml = fs::read_to_string(&junit).with_context(|| format!("reading {}", junit.display()))?;
    let results = parse_junit(&xml)?;
    let table = table(&results);
    let summary = summary(cni, &results, elapsed);
    print!("{table}");
    println!("{summary}");
    fs::write(report.join("results.md"), format!("{table}\n{summary}\n"))
        .context("writing the results table")?;
    drop(dns);
    drop(cluster);
    let failed = results.iter().filter(|r| !r.passed).count();
    ensure!(
        !results.is_empty(),
        "e2e.test ran no spec: does --focus '{focus}' select any?"
    );
    ensure!(
        failed == 0,
        "{failed} of {} conformance specs failed with {}: their failures are in {}",
        results.len(),
        cni.name(),
        report.join("e2e.log").display()
    );
    Ok(())
}

/// `helm install` of helm/podwire into kube-system; the image was imported into the nodes.
pub fn install_podwire(cluster: &KubeCluster, helm: &Path) -> Result<()> {
    let chart = workspace_root().join("helm/podwire");
    let mut install = cluster.cp.ns.command(helm);
    install
        .args(["install", RELEASE])
        .arg(&chart)
        .args(["--namespace", RELEASE_NAMESPACE])
        .arg("--kubeconfig")
        .arg(cluster.cp.kubeconfig())
        // The image is in every node already; there is no registry to ask.
        .args(["--set", "image.pullPolicy=Never"]);
    run_lab(&mut install).context("helm install of podwire")?;
    Ok(())
}

/// The reference plugins: on each node a `bridge` conflist with `host-local` addresses from the
/// node's podCIDR, and routes to every other node's podCIDR via its address (the control plane
/// has its routes from [`KubeCluster::start`]).
fn install_bridge(cluster: &KubeCluster) -> Result<()> {
    let mut cidrs = Vec::new();
    for node in &cluster.nodes {
        let cidr = cluster.pod_cidr(&node.name)?;
        node.install_reference_bridge(&cidr)?;
        cidrs.push((node.ip, cidr));
    }
    for node in &cluster.nodes {
        for (via, cidr) in routes_from(node.ip, &cidrs) {
            node.ns
                .ip(&["route", "replace", &cidr, "via", &via.to_string()])?;
        }
    }
    Ok(())
}

/// The routes the node at `own` needs to the pod CIDRs of the nodes (address, podCIDR): every
/// other node's, via its address.
fn routes_from(own: Ipv4Addr, nodes: &[(Ipv4Addr, String)]) -> Vec<(Ipv4Addr, String)> {
    nodes
        .iter()
        .filter(|(ip, _)| *ip != own)
        .map(|(ip, cidr)| (*ip, cidr.clone()))
        .collect()
}

/// Runs e2e.test in the control plane's namespace, its output in `report`/e2e.log; echoes the
/// lines that say how each spec went.
fn run_suite(cluster: &KubeCluster, k8s_bin: &Path, report: &Path, focus: &str) -> Result<()> {
    let path = std::env::var("PATH").unwrap_or_default();
    let mut e2e = cluster.cp.ns.command(k8s_bin.join("e2e.test"));
    e2e.env("PATH", format!("{}:{path}", k8s_bin.display()))
        .arg("--provider=local")
        .arg(format!(
            "--kubeconfig={}",
            cluster.cp.kubeconfig().display()
        ))
        .arg(format!("--num-nodes={NODES}"))
        .arg(format!("--report-dir={}", report.display()))
        .arg(format!("--dns-domain={CLUSTER_DOMAIN}"))
        .arg("--ginkgo.noColor")
        .arg(format!("--ginkgo.focus={focus}"))
        .arg(format!("--ginkgo.skip={SKIP}"))
        .stdin(Stdio::null())
        .stdout(Stdio::piped());
    let log_path = report.join("e2e.log");
    let mut log =
        fs::File::create(&log_path).with_context(|| format!("creating {}", log_path.display()))?;
    e2e.stderr(log.try_clone()?);
    let mut child = e2e.spawn().with_context(|| format!("starting {e2e:?}"))?;
    let stdout = child.stdout.take().context("e2e.test's stdout")?;
    for line in BufReader::new(stdout).lines() {
        let line = line.context("reading e2e.test's output")?;
        writeln!(log, "{line}")?;
        if let Some(progress) = progress(&line) {
            println!("{progress}");
        }
    }
    let status = child.wait()?;
    // A failed spec makes it exit 1; the report says which.
    if !status.success() && !report.join("junit_01.xml").exists() {
        bail!(
            "e2e.test failed ({status}) without a report; its output is in {}",
            log_path.display()
        );
    }
    Ok(())
}

/// What a line of e2e.test's output says about how the run or a spec went, if anything: the
/// suite's counts, and each spec's `{"msg":"PASSED ...","total":..,"completed":..}` record.
fn progress(line: &str) -> Option<String> {
    if line.starts_with("Will run ") || line.starts_with("Ran ") {
        return Some(line.to_owned());
    }
    let record: serde_json::Value = serde_json::from_str(&line[line.find("{\"msg\"")?..]).ok()?;
    let done = record["completed"].as_u64().unwrap_or_default()
        + record["failed"].as_u64().unwrap_or_default();
    Some(format!(
        "{} ({done}/{})",
        record["msg"].as_str()?,
        record["total"].as_u64()?
    ))
}

/// How one selected spec went.
#[derive(Debug, PartialEq)]
struct SpecResult {
    name: String,
    passed: bool,
    seconds: f64,
}

/// The specs that ran in a Ginkgo junit report (those not skipped).
fn parse_junit(xml: &str) -> Result<Vec<SpecResult>> {
    let doc = roxmltree::Document::parse(xml).context("parsing e2e.test's junit report")?;
    let mut results = Vec::new();
    for case in doc.descendants().filter(|n| n.has_tag_name("testcase")) {
        let child = |tag: &str| case.children().any(|c| c.has_tag_name(tag));
        if child("skipped") {
            continue;
        }
        results.push(SpecResult {
            name: case.attribute("name").unwrap_or_default().trim().to_owned(),
            passed: !child("failure") && !child("error"),
            seconds: case
                .attribute("time")
                .and_then(|t| t.parse().ok())
                .unwrap_or_default(),
        });
    }
    results.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(results)
}

/// The results as a Markdown table.
fn table(results: &[SpecResult]) -> String {
    let mut out = String::from("| Spec | Result | Seconds |\n|---|---|---:|\n");
    for r in results {
        let result = if r.passed { "passed" } else { "FAILED" };
        let name = r.name.replace('|', "\\|");
        let _ = writeln!(out, "| {name} | {result} | {:.0} |", r.seconds);
    }
    out
}

/// One line: how many passed, of how many, with which CNI, in how long.
fn summary(cni: Cni, results: &[SpecResult], elapsed: Duration) -> String {
    let passed = results.iter().filter(|r| r.passed).count();
    format!(
        "conformance with {}: {passed} of {} specs passed, {} failed, in {} s",
        cni.name(),
        results.len(),
        results.len() - passed,
        elapsed.as_secs()
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The shape of a Ginkgo v1 junit report as e2e.test v1.20.2 writes it.
    const JUNIT: &str = r#"<?xml version="1.0" encoding="UTF-8"?>
  <testsuite name="Kubernetes e2e suite" tests="3" failures="1" errors="0" time="40.5">
      <testcase name="[sig-storage] CSI Volumes something [Slow]" classname="Kubernetes e2e suite" time="0">
          <skipped></skipped>
      </testcase>
      <testcase name="[sig-network] Services should serve a basic endpoint from pods  [Conformance]" classname="Kubernetes e2e suite" time="12.25">
      </testcase>
      <testcase name="[sig-network] Proxy version v1 should proxy through a service and a pod  [Conformance]" classname="Kubernetes e2e suite" time="28.2">
          <failure type="Failure">/workspace/test/e2e/network/proxy.go:85&#xA;timed out</failure>
          <system-out>logs</system-out>
      </testcase>
  </testsuite>"#;

    #[test]
    fn the_report_gives_the_specs_that_ran() {
        let results = parse_junit(JUNIT).unwrap();
        assert_eq!(
            results,
            [
                SpecResult {
                    name: "[sig-network] Proxy version v1 should proxy through a service and a \
                           pod  [Conformance]"
                        .into(),
                    passed: false,
                    seconds: 28.2,
                },
                SpecResult {
                    name: "[sig-network] Services should serve a basic endpoint from pods  \
                           [Conformance]"
                        .into(),
                    passed: true,
                    seconds: 12.25,
                },
            ]
        );
        let table = table(&results);
        assert!(table.contains("| FAILED | 28 |\n"), "{table}");
        assert!(
            table.contains("from pods  [Conformance] | passed | 12 |\n"),
            "{table}"
        );
        assert_eq!(
            summary(Cni::Bridge, &results, Duration::from_secs(429)),
            "conformance with bridge: 1 of 2 specs passed, 1 failed, in 429 s"
        );
    }

    #[test]
    fn progress_is_the_counts_and_each_specs_record() {
        let record = "•{\"msg\":\"PASSED [sig-network] Services should serve a basic endpoint \
                      from pods  [Conformance]\",\"total\":24,\"completed\":2,\"skipped\":1358,\
                      \"failed\":1}";
        assert_eq!(
            progress(record).as_deref(),
            Some("PASSED [sig-network] Services should serve a basic endpoint from pods  [Conformance] (3/24)")
        );
        assert_eq!(
            progress("Will run 24 of 5667 specs").as_deref(),
            Some("Will run 24 of 5667 specs")
        );
        assert_eq!(progress("I1202 04:52:01.123 STEP: creating a pod"), None);
    }

    #[test]
    fn every_node_routes_to_the_other_nodes_pod_cidrs() {
        let node1 = Ipv4Addr::new(192, 168, 77, 1);
        let node2 = Ipv4Addr::new(192, 168, 77, 2);
        let nodes = [
            (node1, "10.244.0.0/24".into()),
            (node2, "10.244.1.0/24".into()),
        ];
        assert_eq!(
            routes_from(node1, &nodes),
            [(node2, "10.244.1.0/24".to_owned())]
        );
        assert_eq!(
            routes_from(node2, &nodes),
            [(node1, "10.244.0.0/24".to_owned())]
        );
    }
}
