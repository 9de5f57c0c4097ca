//! Building the eBPF object with Debian's toolchain and the userspace with the default one.

use std::{
    env,
    ffi::OsString,
    io::{BufRead as _, BufReader},
    path::{Path, PathBuf},
    process::{Command, Stdio},
};

use anyhow::{bail, Context as _, Result};

use crate::{
    cmd::run,
    toolchain::{self, Needs},
    workspace_root,
};

/// Environment variable through which the agent's build script finds the eBPF object to embed.
pub const OBJECT_ENV: &str = "PODWIRE_EBPF_OBJECT";
/// Environment variable through which the integration tests find the built binaries.
pub const BIN_DIR_ENV: &str = "PODWIRE_BIN_DIR";
/// Environment variable through which the integration tests find cnitool.
pub const CNITOOL_ENV: &str = "PODWIRE_CNITOOL";
const BPF_TARGET: &str = "bpfel-unknown-none";

/// Builds the eBPF object, returning its path.
pub fn ebpf(linker_dir: &Path) -> Result<PathBuf> {
    let root = workspace_root();
    let target_dir = root.join("target/ebpf");
    let mut cmd = Command::new(toolchain::CARGO);
    cmd.current_dir(&root)
        .args([
            "build",
            "--release",
            "--package",
            "podwire-ebpf",
            "--target",
            BPF_TARGET,
        ])
        .arg("--target-dir")
        .arg(&target_dir)
        .env("RUSTC", toolchain::RUSTC)
        // aya-ebpf uses unstable features; Debian's rustc is a stable release.
        .env("RUSTC_BOOTSTRAP", "1")
        // Full debug info so bpf-linker can emit BTF: the verifier log and bpftool then show
        // source lines, and aya relocates map definitions from it.
        .env(
            "CARGO_ENCODED_RUSTFLAGS",
            "-Cdebuginfo=2\x1f-Clink-arg=--btf",
        )
        .env("PATH", prepend_path(linker_dir))
        // Whatever the rustup proxy or an outer cargo set must not leak into Debian's cargo.
        .env_remove("RUSTUP_TOOLCHAIN")
        .env_remove("RUSTFLAGS")
        .env_remove("RUSTC_WRAPPER")
        .env_remove("RUSTC_WORKSPACE_WRAPPER")
        .env_remove("CARGO_TARGET_DIR")
        .env_remove("CARGO_BUILD_TARGET");
    run(cmd).context("building the eBPF object")?;
    Ok(target_dir.join(BPF_TARGET).join("release/podwire"))
}

/// What a build produced.
pub struct Built {
    /// The userspace binaries' directory.
    pub bins: PathBuf,
    /// The eBPF object they embed.
    pub object: PathBuf,
}

/// Installs what `needs` calls for and builds everything.
pub fn all(release: bool, needs: Needs) -> Result<Built> {
    let linker_dir = toolchain::ensure(needs)?;
    let object = ebpf(&linker_dir)?;
    let mut cmd = userspace_cargo(&object, "build");
    cmd.args(["--bins"]);
    if release {
        cmd.arg("--release");
    }
    run(cmd).context("building the userspace binaries")?;
    let bins = workspace_root()
        .join("target")
        .join(if release { "release" } else { "debug" });
    Ok(Built { bins, object })
}

/// Builds everything, then runs unit and kernel integration tests.
pub fn test(args: &[String]) -> Result<()> {
    let Built { bins, object } = all(false, Needs::Run)?;
    let cnitool = crate::cnitool::ensure()?;
    let mut cmd = userspace_cargo(&object, "test");
    cmd.env(BIN_DIR_ENV, &bins).env(CNITOOL_ENV, &cnitool);
    if !args.is_empty() {
        cmd.arg("--").args(args);
    }
    let (mut passed, mut failed) = run_counting_tests(cmd)?;
    // The same programs through the verifier of Debian 12's 6.1 kernel, which users run (skipped
    // with a test filter, which asks for a subset).
    let vm = if args.is_empty() {
        Some(crate::vm::verify())
    } else {
        None
    };
    match vm {
        None => {}
        Some(Ok(())) => {
            println!("test vm_verify_on_debian_12_kernel_6_1 ... ok");
            passed += 1;
        }
        Some(Err(e)) => {
            println!("test vm_verify_on_debian_12_kernel_6_1 ... FAILED\n{e:#}");
            failed += 1;
        }
    }
    // One closing line over all test binaries, so the last line is never a binary with 0 tests.
    println!("podwire: {passed} passed, {failed} failed");
    if failed > 0 || passed == 0 {
        bail!("{failed} tests failed, {passed} passed");
    }
    Ok(())
}

/// Runs `cargo test`, echoing its output, and adds up the `test result:` lines.
fn run_counting_tests(mut cmd: Command) -> Result<(u64, u64)> {
    let mut child = cmd
        .stdout(Stdio::piped())
        .spawn()
        .with_context(|| format!("starting {cmd:?}"))?;
    let (mut passed, mut failed) = (0, 0);
    for line in BufReader::new(child.stdout.take().expect("piped")).lines() {
        let line = line?;
        println!("{line}");
        if let Some((p, f)) = test_result(&line) {
            passed += p;
            failed += f;
        }
    }
    let status = child.wait()?;
    if !status.success() && failed == 0 {
        bail!("{cmd:?} failed: {status}");
    }
    Ok((passed, failed))
}

fn userspace_cargo(object: &Path, verb: &str) -> Command {
    let mut cmd = Command::new(env::var_os("CARGO").unwrap_or_else(|| "cargo".into()));
    cmd.current_dir(workspace_root())
        .args([verb, "--workspace", "--exclude", "podwire-ebpf"])
        .env(OBJECT_ENV, object);
    cmd
}

fn prepend_path(dir: &Path) -> OsString {
    let mut paths = vec![dir.to_path_buf()];
    if let Some(path) = env::var_os("PATH") {
        paths.extend(env::split_paths(&path));
    }
    env::join_paths(paths).expect("PATH entries contain no ':'")
}

/// Passed and failed counts of a libtest summary line:
/// "test result: ok. 3 passed; 0 failed; 0 ignored; 0 measured; 0 filtered out; finished in 0.2s".
fn test_result(line: &str) -> Option<(u64, u64)> {
    let rest = line.strip_prefix("test result: ")?;
    let (mut passed, mut failed) = (0, 0);
    for part in rest.split(['.', ';']) {
        let mut words = part.split_whitespace();
        match (words.next().map(str::parse::<u64>), words.next()) {
            (Some(Ok(n)), Some("passed")) => passed = n,
            (Some(Ok(n)), Some("failed")) => failed = n,
            _ => {}
        }
    }
    Some((passed, failed))
}

#[cfg(test)]
mod tests {
    use super::test_result;

    #[test]
    fn reads_libtest_summary_lines() {
        let ok = "test result: ok. 3 passed; 0 failed; 0 ignored; 0 measured; 0 filtered out; \
                  finished in 0.28s";
        assert_eq!(test_result(ok), Some((3, 0)));
        let failed =
            "test result: FAILED. 2 passed; 1 failed; 0 ignored; 0 measured; 0 filtered out; \
                      finished in 0.32s";
        assert_eq!(test_result(failed), Some((2, 1)));
        assert_eq!(
            test_result("test from_pod_verdicts_on_crafted_packets ... ok"),
            None
        );
    }
}
