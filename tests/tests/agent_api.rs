//! The agent's API socket against clients that misbehave: an endless request line, a client that
//! connects and says nothing, a flood of connections, a process out of file descriptors, a client
//! that is not root, and the window between creating the socket and restricting it. Each against
//! a real agent's socket; after each, pods are still added through it.

use std::{
    io::{BufRead as _, BufReader, Read as _, Write as _},
    net::Ipv4Addr,
    os::unix::{fs::PermissionsExt as _, net::UnixStream, process::CommandExt as _},
    path::Path,
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};

use anyhow::{ensure, Context as _, Result};
use podwire_core::api::{ApiError, Reply};
use podwire_lab::{artifacts, eventually, nodes::Node, processes::output_with_stdin};

const NODE_IP: Ipv4Addr = Ipv4Addr::new(192, 168, 77, 10);
const POD_CIDR: &str = "10.244.0.0/24";

fn node() -> Result<Node> {
    Node::start(NODE_IP, POD_CIDR)
}

/// The pid of the process serving the API socket at `socket`, as the kernel knows its peer.
fn agent_pid(socket: &Path) -> Result<i32> {
    let stream = UnixStream::connect(socket)
        .with_context(|| format!("connecting to {}", socket.display()))?;
    let cred = nix::sys::socket::getsockopt(&stream, nix::sys::socket::sockopt::PeerCredentials)?;
    Ok(cred.pid())
}

/// The one reply line the agent sends on `stream`, waiting at most `within`.
fn reply(stream: &UnixStream, within: Duration) -> Result<Result<Reply, ApiError>> {
    stream.set_read_timeout(Some(within))?;
    let mut line = String::new();
    BufReader::new(stream)
        .read_line(&mut line)
        .with_context(|| format!("no reply from the agent within {within:?}"))?;
    serde_json::from_str(&line).with_context(|| format!("reply {line:?}"))
}

/// Sockets the process `pid` holds open.
fn sockets_of(pid: i32) -> Result<usize> {
    let mut n = 0;
    for fd in std::fs::read_dir(format!("/proc/{pid}/fd"))? {
        if let Ok(target) = std::fs::read_link(fd?.path()) {
            n += usize::from(target.to_string_lossy().starts_with("socket:"));
        }
    }
    Ok(n)
}

#[test]
fn api_answers_an_overlong_request_line_with_its_limit_and_keeps_serving() -> Result<()> {
    let node = node()?;
    let stream = UnixStream::connect(node.socket())?;
    // 1 MiB and no newline, written while the answer is awaited (the agent stops reading).
    let writer = stream.try_clone()?;
    let flood = std::thread::spawn(move || {
        let _ = (&writer).write_all(&vec![b'x'; 1 << 20]);
    });
    let answer = reply(&stream, Duration::from_secs(20))?;
    let message = answer.expect_err("an error").message;
    assert!(
        message.contains("65536 bytes"),
        "the error names the limit: {message}"
    );
    drop(stream);
    flood.join().expect("the writer does not panic");
    node.add_pod("c-after-flood")?;
    Ok(())
}

#[test]
fn api_closes_a_silent_connection_after_its_read_timeout_and_serves_others_meanwhile() -> Result<()>
{
    let node = node()?;
    let silent = UnixStream::connect(node.socket())?;
    node.add_pod("c-beside-silent")?;
    let answer = reply(&silent, Duration::from_secs(30))?;
    let message = answer.expect_err("an error").message;
    assert!(
        message.contains("10s"),
        "the error names the timeout: {message}"
    );
    let mut rest = Vec::new();
    (&silent).read_to_end(&mut rest)?;
    assert!(rest.is_empty(), "the connection is closed after the answer");
    Ok(())
}

#[test]
fn api_holds_at_most_64_connections_and_serves_the_next_once_one_is_done() -> Result<()> {
    let node = node()?;
    let pid = agent_pid(&node.socket())?;
    let before = sockets_of(pid)?;
    let silent = (0..100)
        .map(|_| UnixStream::connect(node.socket()))
        .collect::<std::io::Result<Vec<_>>>()?;
    eventually(Duration::from_secs(5), || {
        Ok(sockets_of(pid)? >= before + 64)
    })?;
    std::thread::sleep(Duration::from_millis(500));
    let held = sockets_of(pid)? - before;
    eprintln!("client connections the agent holds with 100 open: {held}");
    assert!(
        held <= 64,
        "the agent holds {held} client connections at once"
    );
    // An ADD waits for a free slot: the silent ones are dropped after their read timeout.
    node.add_pod("c-after-crowd")?;
    drop(silent);
    Ok(())
}

/// CPU time (user and system, in clock ticks) the process `pid` has used.
fn cpu_ticks(pid: i32) -> Result<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .context("stat")?
        .1
        .split_whitespace()
        .collect();
    // utime and stime are fields 14 and 15, the 12th and 13th after the command.
    Ok(fields[11].parse::<u64>()? + fields[12].parse::<u64>()?)
}

/// Sets the file descriptor limits of process `pid` to `new`, if given; returns those it had.
fn set_nofile(pid: i32, new: Option<libc::rlimit>) -> Result<libc::rlimit> {
    let mut old = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    let new = new
        .as_ref()
        .map_or(std::ptr::null(), |n| n as *const libc::rlimit);
    // SAFETY: both pointers are null or to live rlimits for the duration of the call.
    let rc = unsafe { libc::prlimit(pid, libc::RLIMIT_NOFILE, new, &mut old) };
    ensure!(rc == 0, "prlimit: {}", std::io::Error::last_os_error());
    Ok(old)
}

#[test]
fn api_backs_off_instead_of_spinning_when_out_of_file_descriptors() -> Result<()> {
    let node = node()?;
    let pid = agent_pid(&node.socket())?;
    let open = std::fs::read_dir(format!("/proc/{pid}/fd"))?.count() as u64;
    let limits = set_nofile(pid, None)?;
    // The soft limit only: raising it back needs no privilege.
    set_nofile(
        pid,
        Some(libc::rlimit {
            rlim_cur: open + 8,
            ..limits
        }),
    )?;
    let result = (|| -> Result<()> {
        let silent = (0..40)
            .map(|_| UnixStream::connect(node.socket()))
            .collect::<std::io::Result<Vec<_>>>()?;
        std::thread::sleep(Duration::from_secs(1));
        let (ticks, started) = (cpu_ticks(pid)?, Instant::now());
        std::thread::sleep(Duration::from_secs(3));
        let used = (cpu_ticks(pid)? - ticks) as f64 / 100.0;
        let share = used / started.elapsed().as_secs_f64();
        eprintln!(
            "agent CPU while out of file descriptors: {:.1}% of a CPU",
            share * 100.0
        );
        assert!(
            share < 0.2,
            "the agent spent {:.0}% of a CPU failing to accept",
            share * 100.0
        );
        drop(silent);
        Ok(())
    })();
    set_nofile(pid, Some(limits))?;
    result?;
    node.add_pod("c-after-emfile")?;
    Ok(())
}

#[test]
fn api_refuses_a_client_that_is_not_root() -> Result<()> {
    let node = node()?;
    // As if the socket were reachable by others: only the peer's credentials stand in the way.
    std::fs::set_permissions(
        node.state_dir.path(),
        std::fs::Permissions::from_mode(0o755),
    )?;
    std::fs::set_permissions(node.socket(), std::fs::Permissions::from_mode(0o666))?;
    let plugin = artifacts::bin("podwire-cni")?;
    let mut cmd = std::process::Command::new(&plugin);
    cmd.uid(65534)
        .gid(65534)
        .env("CNI_COMMAND", "STATUS")
        .env("CNI_PATH", plugin.parent().context("bin dir")?);
    let out = output_with_stdin(&mut cmd, node.conf().to_string().as_bytes())?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        !out.status.success(),
        "STATUS as nobody succeeded: {stdout}"
    );
    assert!(
        stdout.contains("only root") && stdout.contains("uid 65534"),
        "the error says why: {stdout}"
    );
    // Root still is served.
    node.add_pod("c-root")?;
    Ok(())
}

/// What a watcher saw at the socket's path while the agent started.
#[derive(Debug)]
struct Seen {
    /// How it got there: created (IN_CREATE) or renamed into place (IN_MOVED_TO).
    renamed: bool,
    /// Its permission bits right after, if it was still there.
    mode: Option<u32>,
}

#[test]
fn api_socket_is_never_reachable_by_others() -> Result<()> {
    use std::ffi::CStr;
    let mut node = node()?;
    node.stop_agent()?;
    let dir = node.state_dir.path().to_path_buf();
    let socket = node.socket();
    let name = socket.file_name().context("name")?.to_owned();

    // SAFETY: plain syscalls on an fd this test owns; the buffer outlives each read.
    let fd = unsafe { libc::inotify_init1(libc::IN_NONBLOCK | libc::IN_CLOEXEC) };
    ensure!(fd >= 0, "inotify_init1");
    let path = std::ffi::CString::new(dir.as_os_str().as_encoded_bytes())?;
    let wd =
        unsafe { libc::inotify_add_watch(fd, path.as_ptr(), libc::IN_CREATE | libc::IN_MOVED_TO) };
    ensure!(wd >= 0, "inotify_add_watch");
    let stop = Arc::new(AtomicBool::new(false));
    let watcher = {
        let stop = stop.clone();
        let socket = socket.clone();
        std::thread::spawn(move || {
            let mut seen = Vec::new();
            let mut buf = [0u8; 4096];
            loop {
                // Read until stopped, and once more after: the socket was bound before the
                // agent said it serves, so its events are queued by then.
                let stopped = stop.load(Ordering::Relaxed);
                let n = unsafe { libc::read(fd, buf.as_mut_ptr().cast(), buf.len()) };
                if n <= 0 {
                    if stopped {
                        break;
                    }
                    std::thread::yield_now();
                    continue;
                }
                let mut at = 0;
                while at < n as usize {
                    // SAFETY: the kernel wrote whole events into buf up to n.
                    let event = unsafe { &*(buf.as_ptr().add(at) as *const libc::inotify_event) };
                    let header = std::mem::size_of::<libc::inotify_event>();
                    let event_name =
                        unsafe { CStr::from_ptr(buf.as_ptr().add(at + header).cast()) };
                    if event.len > 0 && event_name.to_bytes() == name.as_encoded_bytes() {
                        let mode = std::fs::symlink_metadata(&socket)
                            .ok()
                            .map(|m| m.permissions().mode() & 0o777);
                        seen.push(Seen {
                            renamed: event.mask & libc::IN_MOVED_TO != 0,
                            mode,
                        });
                    }
                    at += header + event.len as usize;
                }
            }
            seen
        })
    };
    let started = node.start_agent();
    stop.store(true, Ordering::Relaxed);
    let seen = watcher.join().expect("the watcher does not panic");
    unsafe { libc::close(fd) };
    started?;

    assert!(!seen.is_empty(), "the watcher saw the socket appear");
    for s in &seen {
        assert!(
            s.renamed && s.mode == Some(0o600),
            "the socket appeared at its path {} (it must be renamed into place, already 0600): {seen:?}",
            if s.renamed { "renamed" } else { "created by bind" }
        );
    }
    assert_eq!(
        std::fs::metadata(&socket)?.permissions().mode() & 0o777,
        0o600
    );
    node.add_pod("c-after-watch")?;
    Ok(())
}
