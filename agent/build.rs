//! Points the agent at the eBPF object to embed. `cargo xtask build` builds it (with Debian's
//! toolchain, see ../shared/TOOLCHAIN.md) and passes its path in PODWIRE_EBPF_OBJECT.

use std::{env, path::PathBuf};

fn main() {
    println!("cargo:rerun-if-env-changed=PODWIRE_EBPF_OBJECT");
    let object = env::var_os("PODWIRE_EBPF_OBJECT")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(env::var_os("CARGO_MANIFEST_DIR").unwrap())
                .join("../target/ebpf/bpfel-unknown-none/release/podwire")
        });
    if !object.exists() {
        panic!(
            "eBPF object not found at {}: build it with `cargo xtask build`",
            object.display()
        );
    }
    println!("cargo:rerun-if-changed={}", object.display());
    println!("cargo:rustc-env=PODWIRE_EBPF_OBJECT={}", object.display());
}
