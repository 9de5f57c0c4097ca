//! Real traffic between the lab's namespaces: ping, TCP streams whose every byte is checked, UDP
//! datagrams that must or must not arrive, and raw frames a hostile pod sends.

use std::{
    io::{Read as _, Write as _},
    net::{Ipv4Addr, TcpListener, TcpStream, UdpSocket},
    thread,
    time::{Duration, Instant},
};

use anyhow::{ensure, Context as _, Result};

use crate::{namespaces::NetNs, packets};

/// Bounds every blocking step against hanging; tests never assert on time.
const TIMEOUT: Duration = Duration::from_secs(20);

/// `ping -c 1` from `from`'s namespace; whether a reply came.
pub fn ping(from: &NetNs, to: Ipv4Addr) -> Result<bool> {
    Ok(from
        .command("ping")
        .args(["-c", "1", "-W", "5", &to.to_string()])
        .output()
        .context("running ping")?
        .status
        .success())
}

/// The byte at offset `i` of the lab's test streams: a pattern that no shifted, dropped or
/// repeated segment keeps.
fn pattern(i: usize) -> u8 {
    (i * 7 + i / 251) as u8
}

/// Sends `len` bytes over TCP from `client` to a server on `server_ip` in `server`, which echoes
/// them; fails unless every byte comes back intact.
pub fn tcp_echo(client: &NetNs, server: &NetNs, server_ip: Ipv4Addr, len: usize) -> Result<()> {
    let listener = server
        .run(|| TcpListener::bind((server_ip, 0)))?
        .with_context(|| format!("listening on {server_ip}"))?;
    let addr = listener.local_addr()?;
    let echo = thread::spawn(move || -> std::io::Result<()> {
        let (mut conn, _) = listener.accept()?;
        conn.set_read_timeout(Some(TIMEOUT))?;
        let mut buf = vec![0u8; len];
        conn.read_exact(&mut buf)?;
        conn.write_all(&buf)
    });
    let mut conn = client
        .run(|| TcpStream::connect_timeout(&addr, TIMEOUT))?
        .with_context(|| format!("connecting {} -> {addr}", client.name()))?;
    conn.set_read_timeout(Some(TIMEOUT))?;
    let data: Vec<u8> = (0..len).map(pattern).collect();
    conn.write_all(&data).context("client write")?;
    let mut back = vec![0u8; len];
    conn.read_exact(&mut back)
        .with_context(|| format!("echo {} -> {addr}", client.name()))?;
    ensure!(
        back == data,
        "bytes from {} to {addr} and back do not arrive intact",
        client.name()
    );
    echo.join()
        .expect("the echo thread does not panic")
        .context("echo server")
}

/// Streams `len` bytes from `client` to a server on `server_ip` in `server`, which checks every
/// byte as it arrives; returns the time it took.
pub fn tcp_transfer(
    client: &NetNs,
    server: &NetNs,
    server_ip: Ipv4Addr,
    len: usize,
) -> Result<Duration> {
    const CHUNK: usize = 1 << 16;
    let listener = server
        .run(|| TcpListener::bind((server_ip, 0)))?
        .with_context(|| format!("listening on {server_ip}"))?;
    let addr = listener.local_addr()?;
    let receiver = thread::spawn(move || -> std::io::Result<usize> {
        let (mut conn, _) = listener.accept()?;
        conn.set_read_timeout(Some(TIMEOUT))?;
        let mut buf = vec![0u8; CHUNK];
        let mut total = 0usize;
        loop {
            let n = conn.read(&mut buf)?;
            if n == 0 {
                return Ok(total);
            }
            if let Some(bad) = (0..n).find(|&j| buf[j] != pattern((total + j) % CHUNK)) {
                return Err(std::io::Error::other(format!(
                    "byte {} corrupted",
                    total + bad
                )));
            }
            total += n;
        }
    });
    let start = Instant::now();
    let mut conn = client
        .run(|| TcpStream::connect_timeout(&addr, TIMEOUT))?
        .with_context(|| format!("connecting {} -> {addr}", client.name()))?;
    let chunk: Vec<u8> = (0..CHUNK).map(pattern).collect();
    for _ in 0..len / CHUNK {
        conn.write_all(&chunk).context("sending")?;
    }
    drop(conn);
    let received = receiver
        .join()
        .expect("the receiver thread does not panic")
        .context("receiving")?;
    ensure!(received == len, "{received} of {len} bytes arrived");
    Ok(start.elapsed())
}

/// Sends `frame` as it is out of `iface` of `ns` (AF_PACKET, SOCK_RAW): what root in a pod with
/// CAP_NET_RAW can send.
pub fn send_frame(ns: &NetNs, iface: &str, frame: &[u8]) -> Result<()> {
    ns.run(|| -> Result<()> {
        RawSender::open(iface)?
            .send(frame)
            .context("sending the raw frame")
    })?
}

/// An AF_PACKET socket sending raw frames out of one interface of the calling thread's network
/// namespace: what a pod root with CAP_NET_RAW can do. Closed on drop.
pub struct RawSender {
    fd: std::os::fd::OwnedFd,
    addr: libc::sockaddr_ll,
}

impl RawSender {
    pub fn open(iface: &str) -> Result<RawSender> {
        use std::os::fd::FromRawFd as _;
        let ifindex =
            nix::net::if_::if_nametoindex(iface).with_context(|| format!("no {iface}"))?;
        // SAFETY: socket(2) has no memory-safety preconditions.
        let fd = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW, 0) };
        ensure!(
            fd >= 0,
            "AF_PACKET socket: {}",
            std::io::Error::last_os_error()
        );
        // SAFETY: fd is a descriptor socket(2) just returned, owned by nothing else.
        let fd = unsafe { std::os::fd::OwnedFd::from_raw_fd(fd) };
        // SAFETY: sockaddr_ll is plain data; all zeroes is a valid value.
        let mut addr: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
        addr.sll_family = libc::AF_PACKET as u16;
        addr.sll_ifindex = ifindex as i32;
        addr.sll_halen = 6;
        Ok(RawSender { fd, addr })
    }

    /// Sends `frame` whole.
    pub fn send(&self, frame: &[u8]) -> std::io::Result<()> {
        use std::os::fd::AsRawFd as _;
        // SAFETY: frame and addr outlive the call, and their lengths are passed with them.
        let sent = unsafe {
            libc::sendto(
                self.fd.as_raw_fd(),
                frame.as_ptr().cast(),
                frame.len(),
                0,
                (&raw const self.addr).cast(),
                std::mem::size_of::<libc::sockaddr_ll>() as u32,
            )
        };
        match sent {
            n if n == frame.len() as isize => Ok(()),
            n if n < 0 => Err(std::io::Error::last_os_error()),
            n => Err(std::io::Error::other(format!(
                "sent {n} of {} bytes",
                frame.len()
            ))),
        }
    }
}

/// Sends what an underlay host or a node can: from a socket bound to `from_ip` in `from`, a VXLAN
/// packet with `vni` to node `to`'s port 4789, carrying UDP `payload` from `inner_src`:40000 to
/// `inner_dst`:`port`.
pub fn send_vxlan(
    from: &NetNs,
    from_ip: Ipv4Addr,
    to: Ipv4Addr,
    vni: u32,
    (inner_src, inner_dst, port): (Ipv4Addr, Ipv4Addr, u16),
    payload: &[u8],
) -> Result<()> {
    let inner = packets::udp_v4_ports(
        [0x02, 0, 0, 0, 0, 9],
        inner_src,
        inner_dst,
        (40000, port),
        payload,
    );
    let socket = from
        .run(|| UdpSocket::bind((from_ip, 0)))?
        .with_context(|| format!("binding UDP on {from_ip}"))?;
    socket
        .send_to(&packets::vxlan(vni, &inner), (to, 4789))
        .with_context(|| format!("sending VXLAN to {to}"))?;
    Ok(())
}

/// A UDP socket bound to `ip` (any port) in `ns`, which waits a bounded time for datagrams.
pub fn udp_listener(ns: &NetNs, ip: Ipv4Addr) -> Result<UdpSocket> {
    let socket = ns
        .run(|| UdpSocket::bind((ip, 0)))?
        .with_context(|| format!("binding UDP on {ip}"))?;
    // Long enough for a datagram that is coming, short enough for one that must not.
    socket.set_read_timeout(Some(Duration::from_secs(2)))?;
    Ok(socket)
}

/// The next datagram `socket` receives and its source, or `None` when none comes.
pub fn receive(socket: &UdpSocket) -> Result<Option<(Vec<u8>, std::net::SocketAddr)>> {
    let mut buf = [0u8; 2048];
    // A signal (a stop and continue of the test process counts) interrupts the wait: wait again.
    let received = loop {
        match socket.recv_from(&mut buf) {
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            received => break received,
        }
    };
    match received {
        Ok((n, from)) => Ok(Some((buf[..n].to_vec(), from))),
        Err(e)
            if matches!(
                e.kind(),
                std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
            ) =>
        {
            Ok(None)
        }
        Err(e) => Err(e).context("receiving a datagram"),
    }
}

/// TCP and UDP echo servers on one port of an address in a namespace, answering every client
/// until dropped: the backends of the lab's Services.
pub struct EchoServers {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    threads: Vec<thread::JoinHandle<()>>,
}

/// How often the servers look for a stop, and how long they wait for a client's bytes.
const ECHO_POLL: Duration = Duration::from_millis(20);

impl EchoServers {
    /// Serves TCP and UDP on `ip`:`port` in `ns`. The answer is the request followed by `|` and
    /// the client's address as the server saw it (see [`seen_from`]): a TCP client gets it once
    /// it shuts its side down, a UDP datagram from the same address and port.
    pub fn start(ns: &NetNs, ip: Ipv4Addr, port: u16) -> Result<EchoServers> {
        use std::sync::{atomic::AtomicBool, Arc};
        let (tcp, udp) = ns.run(|| -> std::io::Result<(TcpListener, UdpSocket)> {
            Ok((TcpListener::bind((ip, port))?, UdpSocket::bind((ip, port))?))
        })??;
        tcp.set_nonblocking(true)?;
        udp.set_read_timeout(Some(ECHO_POLL))?;
        let stop = Arc::new(AtomicBool::new(false));
        let stopped = {
            let stop = stop.clone();
            move || stop.load(std::sync::atomic::Ordering::Relaxed)
        };
        let tcp_stopped = stopped.clone();
        let tcp_thread = thread::spawn(move || {
            while !tcp_stopped() {
                match tcp.accept() {
                    Ok((mut conn, peer)) => {
                        let _ = conn.set_nonblocking(false);
                        let _ = conn.set_read_timeout(Some(TIMEOUT));
                        let mut data = Vec::new();
                        if conn.read_to_end(&mut data).is_ok() {
                            let _ = conn.write_all(&answer(&data, peer));
                        }
                    }
                    Err(_) => thread::sleep(ECHO_POLL),
                }
            }
        });
        let udp_thread = thread::spawn(move || {
            let mut buf = [0u8; 2048];
            while !stopped() {
                if let Ok((n, from)) = udp.recv_from(&mut buf) {
                    let _ = udp.send_to(&answer(&buf[..n], from), from);
                }
            }
        });
        Ok(EchoServers {
            stop,
            threads: vec![tcp_thread, udp_thread],
        })
    }
}

fn answer(request: &[u8], peer: std::net::SocketAddr) -> Vec<u8> {
    let mut answer = request.to_vec();
    answer.push(b'|');
    answer.extend_from_slice(peer.to_string().as_bytes());
    answer
}

/// The request an [`EchoServers`] answer repeats, and the client address the server saw.
pub fn seen_from(answer: &[u8]) -> Result<(Vec<u8>, std::net::SocketAddr)> {
    let split = answer
        .iter()
        .rposition(|&b| b == b'|')
        .context("an echo answer holds '|'")?;
    let peer = std::str::from_utf8(&answer[split + 1..])?
        .parse()
        .context("an echo answer ends with the client's address")?;
    Ok((answer[..split].to_vec(), peer))
}

impl Drop for EchoServers {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        for thread in self.threads.drain(..) {
            let _ = thread.join();
        }
    }
}

/// Sends `payload` over TCP from `client` to `to` and returns what comes back once the client
/// has shut its side down.
pub fn tcp_request(client: &NetNs, to: std::net::SocketAddr, payload: &[u8]) -> Result<Vec<u8>> {
    let mut conn = client
        .run(|| TcpStream::connect_timeout(&to, Duration::from_secs(5)))?
        .with_context(|| format!("connecting {} -> {to}", client.name()))?;
    conn.set_read_timeout(Some(Duration::from_secs(5)))?;
    conn.write_all(payload)?;
    conn.shutdown(std::net::Shutdown::Write)?;
    let mut answer = Vec::new();
    conn.read_to_end(&mut answer)
        .with_context(|| format!("reading the answer of {to} in {}", client.name()))?;
    Ok(answer)
}

/// Sends one UDP datagram from `client` to `to` and returns the answer and where it came from.
pub fn udp_request(
    client: &NetNs,
    to: std::net::SocketAddr,
    payload: &[u8],
) -> Result<(Vec<u8>, std::net::SocketAddr)> {
    let socket = client
        .run(|| UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 0)))?
        .context("binding a UDP client")?;
    socket.set_read_timeout(Some(Duration::from_secs(3)))?;
    socket.send_to(payload, to)?;
    let mut buf = [0u8; 2048];
    let (n, from) = socket
        .recv_from(&mut buf)
        .with_context(|| format!("no answer from {to} in {}", client.name()))?;
    Ok((buf[..n].to_vec(), from))
}
