//! Points the agent at the eBPF object to embed: the one `cargo xtask build` built (with Debian's
//! toolchain, as the README explains) and passes in PODWIRE_EBPF_OBJECT, or where it puts it by
//! default. Without one, as in a plain `cargo check` or `cargo clippy` of a fresh clone, the agent
//! embeds an empty stub and says so: it builds, and fails when it loads the datapath.

use std::{env, path::PathBuf};

fn main() {
    println!("cargo:rerun-if-env-changed=PODWIRE_EBPF_OBJECT");
    let object = env::var_os("PODWIRE_EBPF_OBJECT")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(env::var_os("CARGO_MANIFEST_DIR").unwrap())
                .join("../target/ebpf/bpfel-unknown-none/release/podwire")
        });
    println!("cargo:rerun-if-changed={}", object.display());
    let object = if object.exists() {
        object
    } else {
        println!(
            "cargo:warning=eBPF object not found at {}: embedding an empty stub, so this \
             podwire-agent cannot load its datapath; build with `cargo xtask build`",
            object.display()
        );
        let stub = PathBuf::from(env::var_os("OUT_DIR").unwrap()).join("podwire-ebpf-stub");
        std::fs::write(&stub, []).expect("writing the stub object to OUT_DIR");
        stub
    };
    println!("cargo:rustc-env=PODWIRE_EBPF_OBJECT={}", object.display());
}
