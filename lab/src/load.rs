//! Continuous traffic that runs while a test breaks something underneath it (the agent killed and
//! restarted): long-lived TCP streams whose every byte is counted and checked, and pings at a
//! fixed interval counted one by one. Each starts at once and runs on threads of its own until
//! `finish`, which says what arrived.
//!
//! Namespaces are given as open files (a bind mount such as [`crate::namespaces::NetNs::path`],
//! or `/proc/<pid>/fd/<n>`), so the same helpers serve the lab and `podwire-verify` in the VM,
//! which has no `ip netns`.

use std::{
    fs::File,
    io::{Read as _, Write as _},
    net::{Ipv4Addr, Shutdown, TcpListener, TcpStream},
    os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd},
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Arc, Mutex,
    },
    thread::{self, JoinHandle},
    time::{Duration, Instant},
};

use anyhow::{bail, ensure, Context as _, Result};

use crate::namespaces::{enter, NetNs};

/// Bounds every blocking step against hanging: a stream or a ping that gets nothing for this long
/// has failed, and says so instead of hanging the test.
const TIMEOUT: Duration = Duration::from_secs(30);

/// The namespace `ns` as an open file, for the helpers here.
pub fn netns(ns: &NetNs) -> Result<File> {
    let path = ns.path();
    File::open(&path).with_context(|| format!("opening {}", path.display()))
}

/// The byte at offset `i` of a stream: a pattern that no dropped, repeated or shifted segment
/// keeps, so the receiver knows each byte is the next one.
fn pattern(i: u64) -> u8 {
    (i.wrapping_mul(7).wrapping_add(i / 251)) as u8
}

/// How fast a [`Stream`] sends: `chunk` bytes every `interval`. Paced, so that a stall shows as
/// a gap in what arrives rather than hiding behind full buffers, and so that several streams
/// leave the machine's CPUs to what is being tested.
#[derive(Clone, Copy, Debug)]
pub struct Pace {
    pub chunk: usize,
    pub interval: Duration,
}

impl Default for Pace {
    /// 16 KiB every 10 ms: 1.6 MB/s.
    fn default() -> Pace {
        Pace {
            chunk: 16 * 1024,
            interval: Duration::from_millis(10),
        }
    }
}

/// One long-lived TCP connection carrying a counted byte pattern from a client to a server, each
/// in its namespace. The receiver checks every byte as it arrives and notes the longest time
/// nothing did.
pub struct Stream {
    name: String,
    stop: Arc<AtomicBool>,
    sent: Arc<AtomicU64>,
    received: Arc<AtomicU64>,
    /// The client's socket, for its TCP_INFO (retransmissions).
    client: TcpStream,
    sender: JoinHandle<std::io::Result<u64>>,
    receiver: JoinHandle<std::io::Result<(u64, Duration)>>,
}

/// What a [`Stream`] carried, once finished: every byte sent arrived, in order.
#[derive(Clone, Debug)]
pub struct StreamReport {
    pub name: String,
    pub bytes: u64,
    /// The longest time between two reads that returned data, while the sender was sending.
    pub longest_gap: Duration,
    /// Segments the client's TCP retransmitted (TCP_INFO tcpi_total_retrans).
    pub retransmits: u32,
}

impl Stream {
    /// Connects `client` to a listener on `server_ip` in `server` and starts sending at `pace`;
    /// `name` is for reports and errors.
    pub fn start(
        name: &str,
        client: &File,
        server: &File,
        server_ip: Ipv4Addr,
        pace: Pace,
    ) -> Result<Stream> {
        let listener = enter(server, || TcpListener::bind((server_ip, 0)))?
            .with_context(|| format!("{name}: listening on {server_ip}"))?;
        let addr = listener.local_addr()?;
        let conn = enter(client, || TcpStream::connect_timeout(&addr, TIMEOUT))?
            .with_context(|| format!("{name}: connecting to {addr}"))?;
        let (accepted, _) = listener
            .accept()
            .with_context(|| format!("{name}: accepting on {addr}"))?;
        accepted.set_read_timeout(Some(TIMEOUT))?;
        conn.set_write_timeout(Some(TIMEOUT))?;
        conn.set_nodelay(true)?;
        let stop = Arc::new(AtomicBool::new(false));
        let sent = Arc::new(AtomicU64::new(0));
        let received = Arc::new(AtomicU64::new(0));
        let sender = {
            let (stop, sent, mut conn) = (stop.clone(), sent.clone(), conn.try_clone()?);
            thread::spawn(move || -> std::io::Result<u64> {
                let mut offset = 0u64;
                let mut buf = vec![0u8; pace.chunk];
                let mut next = Instant::now();
                while !stop.load(Ordering::Relaxed) {
                    for (j, b) in buf.iter_mut().enumerate() {
                        *b = pattern(offset + j as u64);
                    }
                    conn.write_all(&buf)?;
                    offset += buf.len() as u64;
                    sent.store(offset, Ordering::Relaxed);
                    next += pace.interval;
                    thread::sleep(next.saturating_duration_since(Instant::now()));
                }
                conn.shutdown(Shutdown::Write)?;
                Ok(offset)
            })
        };
        let receiver = {
            let (stop, received, mut conn) = (stop.clone(), received.clone(), accepted);
            thread::spawn(move || -> std::io::Result<(u64, Duration)> {
                let mut buf = vec![0u8; 64 * 1024];
                let mut total = 0u64;
                let mut last = Instant::now();
                let mut longest = Duration::ZERO;
                loop {
                    let n = conn.read(&mut buf)?;
                    if n == 0 {
                        return Ok((total, longest));
                    }
                    if let Some(bad) = (0..n).find(|&j| buf[j] != pattern(total + j as u64)) {
                        return Err(std::io::Error::other(format!(
                            "byte {} is not the next of the stream (lost, repeated or corrupted \
                             data)",
                            total + bad as u64
                        )));
                    }
                    total += n as u64;
                    received.store(total, Ordering::Relaxed);
                    if !stop.load(Ordering::Relaxed) {
                        longest = longest.max(last.elapsed());
                    }
                    last = Instant::now();
                }
            })
        };
        Ok(Stream {
            name: name.to_owned(),
            stop,
            sent,
            received,
            client: conn,
            sender,
            receiver,
        })
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// Bytes written so far.
    pub fn sent(&self) -> u64 {
        self.sent.load(Ordering::Relaxed)
    }

    /// Bytes received and checked so far.
    pub fn received(&self) -> u64 {
        self.received.load(Ordering::Relaxed)
    }

    /// Stops sending, closes the client's side and waits for the server to read everything up
    /// to the end; fails unless every byte sent arrived, in order.
    pub fn finish(self) -> Result<StreamReport> {
        let name = self.name;
        self.stop.store(true, Ordering::Relaxed);
        let retransmits =
            total_retransmits(&self.client).with_context(|| format!("{name}: reading TCP_INFO"))?;
        let sent = self
            .sender
            .join()
            .expect("the sender does not panic")
            .with_context(|| format!("{name}: sending (connection lost?)"))?;
        let (received, longest_gap) = self
            .receiver
            .join()
            .expect("the receiver does not panic")
            .with_context(|| format!("{name}: receiving"))?;
        ensure!(
            received == sent,
            "{name}: {received} of {sent} bytes arrived"
        );
        Ok(StreamReport {
            name,
            bytes: received,
            longest_gap,
            retransmits,
        })
    }
}

/// The segments `conn`'s TCP retransmitted over its life.
fn total_retransmits(conn: &TcpStream) -> Result<u32> {
    // SAFETY: getsockopt writes at most `len` bytes into the zeroed struct it is given.
    unsafe {
        let mut info: libc::tcp_info = std::mem::zeroed();
        let mut len = std::mem::size_of::<libc::tcp_info>() as libc::socklen_t;
        let rc = libc::getsockopt(
            conn.as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_INFO,
            (&raw mut info).cast(),
            &mut len,
        );
        ensure!(rc == 0, "{}", std::io::Error::last_os_error());
        Ok(info.tcpi_total_retrans)
    }
}

/// Echo requests sent from one namespace to an address at a fixed interval, each reply counted
/// by its sequence number (a raw ICMP socket, as `ping` uses; replies to other pingers are told
/// apart by the identifier).
pub struct Pinger {
    name: String,
    interval: Duration,
    stop: Arc<AtomicBool>,
    sent: Arc<AtomicU64>,
    replies: Arc<Mutex<Vec<bool>>>,
    sender: JoinHandle<std::io::Result<()>>,
    receiver: JoinHandle<std::io::Result<()>>,
}

/// What a [`Pinger`] counted, once finished.
#[derive(Clone, Debug)]
pub struct PingReport {
    pub name: String,
    pub sent: u64,
    pub received: u64,
    /// The longest run of consecutive requests without a reply.
    pub longest_loss_run: u64,
    pub interval: Duration,
}

impl PingReport {
    pub fn lost(&self) -> u64 {
        self.sent - self.received
    }

    /// The share of requests lost, 0 to 1.
    pub fn loss(&self) -> f64 {
        if self.sent == 0 {
            return 0.0;
        }
        self.lost() as f64 / self.sent as f64
    }
}

/// ICMP echo request and reply types.
const ECHO_REQUEST: u8 = 8;
const ECHO_REPLY: u8 = 0;
/// Sequence numbers are 16 bits; more requests than this would be ambiguous.
const MAX_PINGS: u64 = 1 << 16;
/// How long [`Pinger::finish`] waits for the replies to the last requests.
const LAST_REPLY: Duration = Duration::from_secs(1);

impl Pinger {
    /// Starts pinging `to` from the namespace `from` every `interval`; `name` is for reports.
    pub fn start(name: &str, from: &File, to: Ipv4Addr, interval: Duration) -> Result<Pinger> {
        let socket = enter(from, icmp_socket)?.with_context(|| format!("{name}: ICMP socket"))?;
        let receive = socket.try_clone()?;
        // SAFETY: a plain setsockopt on a socket this function owns.
        unsafe {
            let timeout = libc::timeval {
                tv_sec: 0,
                tv_usec: 100_000,
            };
            let rc = libc::setsockopt(
                receive.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_RCVTIMEO,
                (&raw const timeout).cast(),
                std::mem::size_of::<libc::timeval>() as libc::socklen_t,
            );
            ensure!(
                rc == 0,
                "{name}: SO_RCVTIMEO: {}",
                std::io::Error::last_os_error()
            );
        }
        static NEXT: AtomicU64 = AtomicU64::new(0);
        let id = (std::process::id() as u16)
            .wrapping_mul(31)
            .wrapping_add(NEXT.fetch_add(1, Ordering::Relaxed) as u16);
        let stop = Arc::new(AtomicBool::new(false));
        let sent = Arc::new(AtomicU64::new(0));
        let replies = Arc::new(Mutex::new(Vec::new()));
        let sender = {
            let (stop, sent, replies) = (stop.clone(), sent.clone(), replies.clone());
            thread::spawn(move || -> std::io::Result<()> {
                let mut next = Instant::now();
                let mut seq = 0u64;
                while !stop.load(Ordering::Relaxed) && seq < MAX_PINGS {
                    replies.lock().expect("not poisoned").push(false);
                    send_echo(&socket, to, id, seq as u16)?;
                    seq += 1;
                    sent.store(seq, Ordering::Relaxed);
                    next += interval;
                    thread::sleep(next.saturating_duration_since(Instant::now()));
                }
                Ok(())
            })
        };
        let receiver = {
            let (stop, replies) = (stop.clone(), replies.clone());
            thread::spawn(move || -> std::io::Result<()> {
                let mut buf = [0u8; 2048];
                let mut stopped_at: Option<Instant> = None;
                loop {
                    if stop.load(Ordering::Relaxed) {
                        let at = *stopped_at.get_or_insert_with(Instant::now);
                        if at.elapsed() > LAST_REPLY {
                            return Ok(());
                        }
                    }
                    // SAFETY: recv writes at most buf.len() bytes into buf.
                    let n = unsafe {
                        libc::recv(receive.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0)
                    };
                    if n < 0 {
                        let err = std::io::Error::last_os_error();
                        match err.kind() {
                            std::io::ErrorKind::WouldBlock
                            | std::io::ErrorKind::TimedOut
                            | std::io::ErrorKind::Interrupted => continue,
                            _ => return Err(err),
                        }
                    }
                    if let Some(seq) = echo_reply(&buf[..n as usize], to, id) {
                        let mut replies = replies.lock().expect("not poisoned");
                        if let Some(r) = replies.get_mut(usize::from(seq)) {
                            *r = true;
                        }
                    }
                }
            })
        };
        Ok(Pinger {
            name: name.to_owned(),
            interval,
            stop,
            sent,
            replies,
            sender,
            receiver,
        })
    }

    /// Requests sent so far.
    pub fn sent(&self) -> u64 {
        self.sent.load(Ordering::Relaxed)
    }

    /// Replies received so far.
    pub fn received(&self) -> u64 {
        let replies = self.replies.lock().expect("not poisoned");
        replies.iter().filter(|&&r| r).count() as u64
    }

    /// Stops sending, waits a moment for the last replies and counts.
    pub fn finish(self) -> Result<PingReport> {
        let name = self.name;
        self.stop.store(true, Ordering::Relaxed);
        self.sender
            .join()
            .expect("the sender does not panic")
            .with_context(|| format!("{name}: sending echo requests"))?;
        self.receiver
            .join()
            .expect("the receiver does not panic")
            .with_context(|| format!("{name}: receiving echo replies"))?;
        let replies = self.replies.lock().expect("not poisoned");
        if replies.len() as u64 >= MAX_PINGS {
            bail!("{name}: more than {MAX_PINGS} pings: use a longer interval");
        }
        Ok(PingReport {
            name,
            sent: replies.len() as u64,
            received: replies.iter().filter(|&&r| r).count() as u64,
            longest_loss_run: longest_run_lost(&replies),
            interval: self.interval,
        })
    }
}

/// The longest run of `false` in `replies`.
fn longest_run_lost(replies: &[bool]) -> u64 {
    replies
        .split(|&r| r)
        .map(|run| run.len() as u64)
        .max()
        .unwrap_or(0)
}

/// A raw ICMP socket in the calling thread's namespace.
fn icmp_socket() -> std::io::Result<OwnedFd> {
    // SAFETY: socket returns a new descriptor, owned from here on, or -1.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_RAW, libc::IPPROTO_ICMP) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: fd is a valid descriptor nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// The echo request `id`/`seq` as it goes on the wire, with 56 bytes of payload as `ping` sends.
fn echo_request(id: u16, seq: u16) -> Vec<u8> {
    let mut packet = vec![ECHO_REQUEST, 0, 0, 0];
    packet.extend_from_slice(&id.to_be_bytes());
    packet.extend_from_slice(&seq.to_be_bytes());
    packet.extend((0..56u8).map(|i| i.wrapping_mul(3)));
    let sum = checksum(&packet);
    packet[2..4].copy_from_slice(&sum.to_be_bytes());
    packet
}

/// The Internet checksum (RFC 1071) of `data`.
fn checksum(data: &[u8]) -> u16 {
    let mut sum: u32 = data
        .chunks(2)
        .map(|c| u32::from(u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)])))
        .sum();
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

fn send_echo(socket: &OwnedFd, to: Ipv4Addr, id: u16, seq: u16) -> std::io::Result<()> {
    let packet = echo_request(id, seq);
    let to = socket_addr(to);
    // SAFETY: sendto reads packet.len() bytes of packet and a sockaddr_in of the given size.
    let n = unsafe {
        libc::sendto(
            socket.as_raw_fd(),
            packet.as_ptr().cast(),
            packet.len(),
            0,
            (&raw const to).cast(),
            std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t,
        )
    };
    if n < 0 {
        let err = std::io::Error::last_os_error();
        // No route or neighbour for a moment is a lost ping, not a broken pinger.
        return match err.raw_os_error() {
            Some(libc::ENETUNREACH | libc::EHOSTUNREACH | libc::ENOBUFS | libc::EPERM) => Ok(()),
            _ => Err(err),
        };
    }
    Ok(())
}

fn socket_addr(ip: Ipv4Addr) -> libc::sockaddr_in {
    libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: 0,
        sin_addr: libc::in_addr {
            s_addr: u32::from(ip).to_be(),
        },
        sin_zero: [0; 8],
    }
}

/// The sequence number of `packet` (an IPv4 packet as a raw socket receives it) if it is an echo
/// reply from `from` to the request `id`.
fn echo_reply(packet: &[u8], from: Ipv4Addr, id: u16) -> Option<u16> {
    let ihl = usize::from(*packet.first()? & 0x0f) * 4;
    let source = Ipv4Addr::from(<[u8; 4]>::try_from(packet.get(12..16)?).ok()?);
    let icmp = packet.get(ihl..)?;
    let (kind, got_id, seq) = (
        *icmp.first()?,
        u16::from_be_bytes(icmp.get(4..6)?.try_into().ok()?),
        u16::from_be_bytes(icmp.get(6..8)?.try_into().ok()?),
    );
    (kind == ECHO_REPLY && got_id == id && source == from).then_some(seq)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_request_checksums_to_zero_and_its_reply_is_recognised() {
        let request = echo_request(0x1234, 7);
        assert_eq!(
            checksum(&request),
            0,
            "a packet with its checksum sums to 0"
        );
        let from = Ipv4Addr::new(10, 244, 1, 2);
        let mut reply = vec![0x45, 0, 0, 0, 0, 0, 0, 0, 64, 1, 0, 0];
        reply.extend_from_slice(&from.octets());
        reply.extend_from_slice(&[10, 244, 1, 3]);
        let mut icmp = request.clone();
        icmp[0] = ECHO_REPLY;
        reply.extend_from_slice(&icmp);
        assert_eq!(echo_reply(&reply, from, 0x1234), Some(7));
        assert_eq!(echo_reply(&reply, from, 0x1235), None, "another pinger's");
        assert_eq!(
            echo_reply(&reply, Ipv4Addr::new(10, 244, 1, 9), 0x1234),
            None,
            "from another host"
        );
        let mut echoed_request = reply.clone();
        echoed_request[20] = ECHO_REQUEST;
        assert_eq!(echo_reply(&echoed_request, from, 0x1234), None);
        assert_eq!(echo_reply(&reply[..22], from, 0x1234), None, "truncated");
    }

    #[test]
    fn the_longest_run_of_lost_pings() {
        assert_eq!(longest_run_lost(&[]), 0);
        assert_eq!(longest_run_lost(&[true, true]), 0);
        assert_eq!(longest_run_lost(&[true, false, false, true, false]), 2);
        assert_eq!(longest_run_lost(&[false; 3]), 3);
    }

    #[test]
    fn the_pattern_changes_under_any_shift() {
        let bytes: Vec<u8> = (0..4096).map(pattern).collect();
        for shift in 1..1024 {
            assert_ne!(bytes[..1024], bytes[shift..shift + 1024], "shift {shift}");
        }
    }
}
