//! `cargo xtask test [-- <filter>]`: builds everything, runs the unit tests and the kernel
//! integration tests with the built artifacts named in their environment, and, without a filter,
//! `vm-verify` too; one closing line counts everything.

use std::{
    io::{BufRead as _, BufReader},
    process::{Command, Stdio},
};

use anyhow::{bail, Context as _, Result};
use podwire_lab::artifacts::{
    BIN_DIR_ENV, CNITOOL_ENV, HELM_ENV, IMAGE_ARCHIVE_ENV, K8S_BIN_DIR_ENV, K8S_NODE_DIR_ENV,
};

use crate::{
    build::{self, Built},
    cnitool, helm, image, k8s, k8s_node,
    toolchain::Needs,
    vm_verify,
};

/// Runs the tests, `args` going to `cargo test` after `--`; fails unless all pass.
pub fn run(args: &[String]) -> Result<()> {
    let Built { bins, object } = build::all(false, Needs::Run)?;
    let cnitool = cnitool::ensure()?;
    let k8s = k8s::ensure()?;
    let k8s_node = k8s_node::ensure()?;
    // The image the tests install with helm holds this very build (debug: no second compile).
    let image = image::archive(&bins)?;
    let helm = helm::ensure()?;
    let mut cargo = build::userspace_cargo(&object);
    cargo
        // Every test binary runs even after one fails: the count below reports all failures.
        .args([
            "test",
            "--workspace",
            "--exclude",
            "podwire-ebpf",
            "--no-fail-fast",
        ])
        .env(BIN_DIR_ENV, &bins)
        .env(CNITOOL_ENV, &cnitool)
        .env(K8S_BIN_DIR_ENV, &k8s)
        .env(K8S_NODE_DIR_ENV, &k8s_node)
        .env(IMAGE_ARCHIVE_ENV, &image)
        .env(HELM_ENV, &helm);
    if !args.is_empty() {
        cargo.arg("--").args(args);
    }
    let (mut passed, mut failed) = run_counting_tests(cargo)?;
    // The same programs through the verifier of Debian 12's 6.1 kernel, which users run (skipped
    // with a test filter, which asks for a subset).
    if args.is_empty() {
        match vm_verify::run(&object) {
            Ok(()) => {
                println!("test vm_verify_on_debian_12_kernel_6_1 ... ok");
                passed += 1;
            }
            Err(e) => {
                println!("test vm_verify_on_debian_12_kernel_6_1 ... FAILED\n{e:#}");
                failed += 1;
            }
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
fn run_counting_tests(mut cargo: Command) -> Result<(u64, u64)> {
    let mut child = cargo
        .stdout(Stdio::piped())
        .spawn()
        .with_context(|| format!("starting {cargo:?}"))?;
    let (mut passed, mut failed) = (0, 0);
    for line in BufReader::new(child.stdout.take().expect("piped")).lines() {
        let line = line.context("reading cargo test's output")?;
        println!("{line}");
        if let Some((p, f)) = test_result(&line) {
            passed += p;
            failed += f;
        }
    }
    let status = child.wait().context("waiting for cargo test")?;
    // A failing test makes cargo exit non-zero too; that is counted, not an error of its own.
    if !status.success() && failed == 0 {
        bail!("{cargo:?} failed: {status}");
    }
    Ok((passed, failed))
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
