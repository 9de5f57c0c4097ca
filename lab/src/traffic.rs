//! Real traffic between the lab's namespaces: ping, and TCP streams whose every byte is checked.

use std::{
    io::{Read as _, Write as _},
    net::{Ipv4Addr, TcpListener, TcpStream},
    thread,
    time::{Duration, Instant},
};

use anyhow::{ensure, Context as _, Result};

use crate::namespaces::NetNs;

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
