//! `cargo xtask`: podwire's developer entry point, one module per command. Every command installs
//! what it needs first ([`toolchain`], [`cnitool`], [`k8s`]) and builds what it runs ([`build`]).

mod apt;
mod bench;
mod bench_control;
mod build;
mod cmd;
mod cnitool;
mod conformance;
mod demo;
mod demo_kubernetes;
mod e2e_images;
mod helm;
mod image;
mod k8s;
mod k8s_node;
mod run;
mod test;
mod toolchain;
mod vm_verify;

use anyhow::Result;
use clap::{Parser, Subcommand};

use crate::toolchain::Needs;

#[derive(Parser)]
#[command(about = "Build, load, demo and test podwire")]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Build the eBPF object and the userspace binaries that embed it.
    Build {
        /// Build userspace in release mode (the eBPF object is always optimised).
        #[arg(long)]
        release: bool,
    },
    /// Build, then run the agent with the given arguments, e.g. `-- --iface veth0`:
    /// loads and attaches the programs and streams their logs until Ctrl-C or SIGTERM.
    Run {
        #[arg(long)]
        release: bool,
        /// Arguments for podwire-agent.
        #[arg(last = true)]
        args: Vec<String>,
    },
    /// Bring up a two-node cluster running the agent and pods wired through the CNI plugin, show
    /// pod-to-pod traffic carried by the eBPF datapath and its counters, and tear everything down.
    Demo {
        /// Instead: a real Kubernetes v1.20.2 cluster (kubelet and containerd nodes) with podwire
        /// installed by `helm install` of its chart, a Deployment and a Service on it, left running
        /// for kubectl until Ctrl-C.
        #[arg(long)]
        kubernetes: bool,
    },
    /// Measure podwire against the kernel's classic datapaths (Linux bridge, kernel VXLAN) in
    /// one run: TCP throughput and request/response, medians and ratios.
    Bench {
        /// Repetitions of every measurement (modes interleaved).
        #[arg(long, default_value_t = 3)]
        reps: usize,
        /// Seconds per measurement.
        #[arg(long, default_value_t = 5)]
        seconds: u64,
        /// Only the data plane (traffic) or only the control plane (CNI, agent, node table).
        #[arg(long, value_enum)]
        only: Option<bench::Part>,
        /// More arguments for podwire's agents, e.g. `-- --underlay-xdp native`, to measure a
        /// configuration other than the defaults.
        #[arg(last = true)]
        agent_args: Vec<String>,
    },
    /// Run the unit tests and the kernel integration tests (needs root).
    Test {
        /// Arguments passed to `cargo test` after `--`, e.g. a test name filter.
        #[arg(last = true)]
        args: Vec<String>,
    },
    /// Boot Debian 12's 6.1 LTS kernel in qemu and check every program passes its verifier.
    VmVerify,
    /// Run Kubernetes v1.20.2's networking conformance specs (upstream e2e.test, `[sig-network]
    /// [Conformance]` without the DNS ones) against a real two-node cluster with podwire
    /// installed by its Helm chart (needs root); prints the results and fails unless all pass.
    Conformance {
        /// The pod network: podwire, or the reference bridge plugin as the baseline.
        #[arg(long, value_enum, default_value = "podwire")]
        cni: conformance::Cni,
        /// The Ginkgo focus regex selecting the specs.
        #[arg(long, default_value = conformance::FOCUS)]
        focus: String,
    },
    /// Build podwire's container image (localhost/podwire:<version>) on a Debian 12 base made
    /// with mmdebstrap, save it as an OCI archive in target/image, and package the Helm chart.
    Image,
}

fn main() -> Result<()> {
    match Cli::parse().command {
        Cmd::Build { release } => build::run(release),
        Cmd::Run { release, args } => run::run(release, &args),
        Cmd::Demo { kubernetes: false } => demo::run(),
        Cmd::Demo { kubernetes: true } => demo_kubernetes::run(),
        Cmd::Bench {
            reps,
            seconds,
            only,
            agent_args,
        } => bench::run(reps, seconds, only, agent_args),
        Cmd::Test { args } => test::run(&args),
        Cmd::VmVerify => vm_verify::run(&build::ebpf(&toolchain::ensure(Needs::Build)?)?),
        Cmd::Conformance { cni, focus } => conformance::run(cni, &focus),
        Cmd::Image => image::run(),
    }
}
