//! podwire-verify: loads every podwire eBPF program through the running kernel's verifier, attaches
//! nothing, and says whether they passed. It exists so `cargo xtask vm-verify` can run it (built
//! static, as a VM's only program) on Debian 12's 6.1 kernel, which users run, and not only on the
//! build machine's kernel. On failure the error chain, verifier log included, goes to stderr and the
//! exit code is 1.

use anyhow::{Context as _, Result};
use podwire_agent::datapath::{programs, Datapath, LogLevel, Overlay};

fn main() -> Result<()> {
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .context("reading the kernel release from /proc (is procfs mounted?)")?;
    // An overlay makes the programs' tunnel path live; its ifindex is only a constant to them here,
    // as nothing is attached.
    let _datapath = Datapath::load(LogLevel::Off, None, Some(Overlay { ifindex: 1, vni: 1 }))
        .context("loading podwire's eBPF programs")?;
    for name in programs::ALL {
        println!("verified {name}");
    }
    println!(
        "podwire-verify: all {} programs passed the verifier on kernel {}",
        programs::ALL.len(),
        kernel.trim()
    );
    Ok(())
}
