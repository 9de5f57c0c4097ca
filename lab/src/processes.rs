//! Child processes of the lab: commands that must succeed, and daemons (agents, captures) whose
//! stderr is followed line by line. A daemon is killed when its guard drops.

use std::{
    io::{BufRead as _, BufReader},
    os::unix::process::CommandExt as _,
    process::{Child, Command, ExitStatus, Output, Stdio},
    sync::mpsc,
    thread,
    time::{Duration, Instant},
};

use anyhow::{bail, ensure, Context as _, Result};
use nix::{sys::signal::Signal, unistd::Pid};

/// Runs `cmd`, failing with its stderr unless it succeeds.
pub fn run(cmd: &mut Command) -> Result<Output> {
    let out = cmd.output().with_context(|| format!("starting {cmd:?}"))?;
    succeeded(cmd, out)
}

/// `out` of `cmd`, or its failure with its stderr.
fn succeeded(cmd: &Command, out: Output) -> Result<Output> {
    ensure!(
        out.status.success(),
        "{cmd:?} failed ({}): {}",
        out.status,
        String::from_utf8_lossy(&out.stderr).trim()
    );
    Ok(out)
}

/// Runs `cmd` with `input` on its stdin, failing with its stderr unless it succeeds.
pub fn run_with_stdin(cmd: &mut Command, input: &[u8]) -> Result<Output> {
    let out = output_with_stdin(cmd, input)?;
    succeeded(cmd, out)
}

/// Runs `cmd` with `input` on its stdin and collects its output, whether it succeeds or not.
pub fn output_with_stdin(cmd: &mut Command, input: &[u8]) -> Result<Output> {
    use std::io::Write as _;
    let mut child = cmd
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("starting {cmd:?}"))?;
    child
        .stdin
        .take()
        .expect("stdin is piped")
        .write_all(input)
        .with_context(|| format!("writing to {cmd:?}"))?;
    child
        .wait_with_output()
        .with_context(|| format!("waiting for {cmd:?}"))
}

/// Waiting for a daemon's line is bounded only against hanging: tests never assert on time.
const LINE_TIMEOUT: Duration = Duration::from_secs(30);

/// A child process whose stderr lines are collected as they arrive; killed on drop, and by the
/// kernel when the thread that started it dies, so a lab killed before its guards run (Ctrl-C,
/// a killed test) leaves no agent running.
pub struct Daemon {
    child: Child,
    lines: mpsc::Receiver<String>,
    /// Every line read so far, for failure messages.
    pub seen: Vec<String>,
}

impl Daemon {
    /// Spawns `cmd` with stderr captured; with `echo`, each line is also printed to stderr
    /// behind that prefix as it comes.
    pub fn spawn(mut cmd: Command, echo: Option<String>) -> Result<Daemon> {
        // SAFETY: prctl is async-signal-safe, as what runs between fork and exec must be.
        unsafe {
            cmd.pre_exec(|| {
                nix::sys::prctl::set_pdeathsig(Signal::SIGKILL).map_err(std::io::Error::from)
            });
        }
        let mut child = cmd
            .stderr(Stdio::piped())
            .spawn()
            .with_context(|| format!("starting {cmd:?}"))?;
        let stderr = child.stderr.take().expect("stderr is piped");
        let (tx, lines) = mpsc::channel();
        thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if let Some(prefix) = &echo {
                    eprintln!("{prefix}{line}");
                }
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        Ok(Daemon {
            child,
            lines,
            seen: Vec::new(),
        })
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Waits until a stderr line contains `needle`, returning it.
    pub fn wait_for_line(&mut self, needle: &str) -> Result<String> {
        self.wait_for_line_within(needle, LINE_TIMEOUT)
    }

    /// [`Daemon::wait_for_line`] with a bound of its own: for a slow machine such as an emulated
    /// VM.
    pub fn wait_for_line_within(&mut self, needle: &str, within: Duration) -> Result<String> {
        let deadline = Instant::now() + within;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) => {
                    self.seen.push(line.clone());
                    if line.contains(needle) {
                        return Ok(line);
                    }
                }
                Err(_) => bail!(
                    "no line containing {needle:?}; output so far:\n{}",
                    self.seen.join("\n")
                ),
            }
        }
    }

    /// Sends `signal` and waits for the process to exit ([`Daemon::wait`]).
    pub fn stop(self, signal: Signal) -> Result<(ExitStatus, Vec<String>)> {
        let pid = Pid::from_raw(self.child.id() as i32);
        nix::sys::signal::kill(pid, signal).with_context(|| format!("sending {signal}"))?;
        self.wait()
    }

    /// Waits for the process to exit by itself, returning its status and all of its stderr.
    pub fn wait(mut self) -> Result<(ExitStatus, Vec<String>)> {
        let status = self.child.wait()?;
        let mut all = std::mem::take(&mut self.seen);
        // The reader thread ends at EOF, after the process exits.
        all.extend(self.lines.iter());
        Ok((status, all))
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
