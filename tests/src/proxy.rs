//! A fault-injecting HTTP/1.1 proxy for retry tests against a real object store.
//!
//! Put it in front of [`S3Server`](crate::s3::S3Server) and point the client at
//! [`FaultProxy::url`]. Each request's line is parsed; [`FaultRule`]s decide, per method and
//! optionally per path, whether the first N matching requests get an HTTP 503 `SlowDown`, an
//! HTTP 500 `InternalError`, a TCP reset, or a delay. Everything else is forwarded unchanged
//! (the `Host` header too, so SigV4 signatures still verify), except that the proxy forces
//! `Connection: close`: one request per connection keeps the parsing trivial and exact. Every
//! request and what was done to it is recorded, so a test can assert the faults really
//! happened.

use std::fmt;
use std::io::{Read, Write};
use std::net::{Ipv4Addr, Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

/// What to do to a matching request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Fault {
    /// `503 Slow Down` with an S3 `SlowDown` error body: S3's throttling answer.
    SlowDown503,
    /// `500 Internal Server Error` with an S3 `InternalError` body.
    InternalError500,
    /// Read the request head, then reset the TCP connection (RST, no response).
    Reset,
    /// Wait this long, then forward the request normally.
    Delay(Duration),
}

impl fmt::Display for Fault {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Fault::SlowDown503 => f.write_str("503 SlowDown"),
            Fault::InternalError500 => f.write_str("500 InternalError"),
            Fault::Reset => f.write_str("connection reset"),
            Fault::Delay(d) => write!(f, "delay {d:?}"),
        }
    }
}

/// Which requests get a [`Fault`], and how many times.
#[derive(Debug, Clone)]
pub struct FaultRule {
    method: Option<String>,
    path_contains: Option<String>,
    remaining: Option<usize>,
    fault: Fault,
}

impl FaultRule {
    /// Applies `fault` to the first request with this HTTP method (`GET`, `PUT`, `POST`,
    /// `DELETE`, `HEAD`, ...); see [`times`](Self::times) and [`always`](Self::always).
    pub fn method(method: &str, fault: Fault) -> FaultRule {
        FaultRule {
            method: Some(method.to_ascii_uppercase()),
            path_contains: None,
            remaining: Some(1),
            fault,
        }
    }

    /// Applies `fault` to the first request whatever its method.
    pub fn any_method(fault: Fault) -> FaultRule {
        FaultRule {
            method: None,
            path_contains: None,
            remaining: Some(1),
            fault,
        }
    }

    /// Applies to the first `n` matching requests.
    pub fn times(mut self, n: usize) -> FaultRule {
        self.remaining = Some(n);
        self
    }

    /// Applies to every matching request: a permanent failure.
    pub fn always(mut self) -> FaultRule {
        self.remaining = None;
        self
    }

    /// Only requests whose target (path and query) contains `s`, e.g. `"partNumber="` for
    /// multipart part uploads or `"uploads"` for CreateMultipartUpload.
    pub fn path_contains(mut self, s: impl Into<String>) -> FaultRule {
        self.path_contains = Some(s.into());
        self
    }

    fn matches(&self, method: &str, target: &str) -> bool {
        self.remaining != Some(0)
            && self.method.as_deref().is_none_or(|m| m == method)
            && self
                .path_contains
                .as_deref()
                .is_none_or(|p| target.contains(p))
    }
}

/// What the proxy did with one request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RequestRecord {
    /// HTTP method.
    pub method: String,
    /// Request target (path and query).
    pub target: String,
    /// The injected fault, or `None` when forwarded untouched.
    pub fault: Option<Fault>,
}

#[derive(Debug, Default)]
struct Shared {
    rules: Mutex<Vec<FaultRule>>,
    records: Mutex<Vec<RequestRecord>>,
}

impl Shared {
    /// Picks (and uses up) the first matching rule and records the request.
    fn decide(&self, method: &str, target: &str) -> Option<Fault> {
        let fault = {
            let mut rules = self.rules.lock().unwrap_or_else(|p| p.into_inner());
            rules
                .iter_mut()
                .find(|r| r.matches(method, target))
                .map(|rule| {
                    if let Some(n) = rule.remaining.as_mut() {
                        *n -= 1;
                    }
                    rule.fault
                })
        };
        self.records
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(RequestRecord {
                method: method.to_string(),
                target: target.to_string(),
                fault,
            });
        fault
    }
}

/// A fault-injecting proxy on 127.0.0.1 in front of one upstream address; stops on drop.
#[derive(Debug)]
pub struct FaultProxy {
    port: u16,
    upstream: SocketAddr,
    shared: Arc<Shared>,
    stop: Arc<AtomicBool>,
    accept: Option<JoinHandle<()>>,
}

impl FaultProxy {
    /// Starts a proxy for `127.0.0.1:upstream_port` (e.g. [`S3Server::port`]).
    ///
    /// [`S3Server::port`]: crate::s3::S3Server::port
    pub fn start(upstream_port: u16) -> FaultProxy {
        FaultProxy::start_for(SocketAddr::from((Ipv4Addr::LOCALHOST, upstream_port)))
    }

    /// Starts a proxy for any upstream address.
    pub fn start_for(upstream: SocketAddr) -> FaultProxy {
        // Binding port 0 here is race-free: the proxy keeps the listener.
        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
            .unwrap_or_else(|e| panic!("fault proxy cannot bind 127.0.0.1:0: {e}"));
        let port = listener
            .local_addr()
            .unwrap_or_else(|e| panic!("fault proxy local_addr: {e}"))
            .port();
        let shared = Arc::new(Shared::default());
        let stop = Arc::new(AtomicBool::new(false));
        let accept = {
            let shared = Arc::clone(&shared);
            let stop = Arc::clone(&stop);
            std::thread::Builder::new()
                .name(format!("fault-proxy-{port}"))
                .spawn(move || accept_loop(listener, upstream, shared, stop))
                .unwrap_or_else(|e| panic!("cannot spawn the fault proxy thread: {e}"))
        };
        FaultProxy {
            port,
            upstream,
            shared,
            stop,
            accept: Some(accept),
        }
    }

    /// The proxy's port on 127.0.0.1.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// `http://127.0.0.1:PORT`: use it as the S3 endpoint.
    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// The address requests are forwarded to.
    pub fn upstream(&self) -> SocketAddr {
        self.upstream
    }

    /// Adds a rule; rules are tried in the order they were added.
    pub fn add_rule(&self, rule: FaultRule) {
        self.shared
            .rules
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(rule);
    }

    /// Shorthand: the first `n` requests with `method` get `fault`.
    pub fn fail_first(&self, method: &str, n: usize, fault: Fault) {
        self.add_rule(FaultRule::method(method, fault).times(n));
    }

    /// Removes every rule (requests are forwarded untouched from now on).
    pub fn clear_rules(&self) {
        self.shared
            .rules
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clear();
    }

    /// Every request seen so far, in arrival order.
    pub fn records(&self) -> Vec<RequestRecord> {
        self.shared
            .records
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// How many requests with `method` arrived (faulted or not).
    pub fn requests(&self, method: &str) -> usize {
        self.records().iter().filter(|r| r.method == method).count()
    }

    /// How many requests with `method` got exactly `fault`.
    pub fn injected(&self, method: &str, fault: Fault) -> usize {
        self.records()
            .iter()
            .filter(|r| r.method == method && r.fault == Some(fault))
            .count()
    }

    /// How many requests got any fault.
    pub fn injected_total(&self) -> usize {
        self.records().iter().filter(|r| r.fault.is_some()).count()
    }

    /// How many requests with `method` were forwarded (including delayed ones).
    pub fn forwarded(&self, method: &str) -> usize {
        self.records()
            .iter()
            .filter(|r| r.method == method && matches!(r.fault, None | Some(Fault::Delay(_))))
            .count()
    }
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        // Wake the blocking accept().
        let _ = TcpStream::connect((Ipv4Addr::LOCALHOST, self.port));
        if let Some(handle) = self.accept.take() {
            let _ = handle.join();
        }
    }
}

fn accept_loop(
    listener: TcpListener,
    upstream: SocketAddr,
    shared: Arc<Shared>,
    stop: Arc<AtomicBool>,
) {
    for conn in listener.incoming() {
        if stop.load(Ordering::SeqCst) {
            return;
        }
        let Ok(client) = conn else { continue };
        let shared = Arc::clone(&shared);
        let _ = std::thread::Builder::new()
            .name("fault-proxy-conn".into())
            .spawn(move || {
                // A failed connection is the client's problem to report, not ours.
                let _ = handle(client, upstream, &shared);
            });
    }
}

/// Largest request head the proxy accepts.
const MAX_HEAD: usize = 64 * 1024;

/// A parsed request head plus any body bytes read past it.
struct Head {
    method: String,
    target: String,
    /// The head re-serialized with `Connection: close`.
    forward: Vec<u8>,
    content_length: Option<u64>,
    expect_continue: bool,
    leftover: Vec<u8>,
}

fn read_head(client: &mut TcpStream) -> std::io::Result<Option<Head>> {
    let mut buf = Vec::with_capacity(4096);
    let mut chunk = [0u8; 4096];
    let end = loop {
        if let Some(pos) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break pos;
        }
        if buf.len() > MAX_HEAD {
            return Err(std::io::Error::other("request head too large"));
        }
        let n = client.read(&mut chunk)?;
        if n == 0 {
            return Ok(None);
        }
        buf.extend_from_slice(&chunk[..n]);
    };
    let head = String::from_utf8_lossy(&buf[..end]).into_owned();
    let leftover = buf[end + 4..].to_vec();
    let mut lines = head.split("\r\n");
    let request_line = lines.next().unwrap_or_default();
    let mut parts = request_line.split(' ');
    let method = parts.next().unwrap_or_default().to_string();
    let target = parts.next().unwrap_or_default().to_string();
    let mut forward = format!("{request_line}\r\n");
    let mut content_length = None;
    let mut expect_continue = false;
    for line in lines {
        let Some((name, value)) = line.split_once(':') else {
            continue;
        };
        let name_lc = name.trim().to_ascii_lowercase();
        match name_lc.as_str() {
            "connection" | "keep-alive" | "proxy-connection" => continue,
            "content-length" => content_length = value.trim().parse().ok(),
            "expect" => expect_continue = value.trim().eq_ignore_ascii_case("100-continue"),
            _ => {}
        }
        forward.push_str(line);
        forward.push_str("\r\n");
    }
    forward.push_str("Connection: close\r\n\r\n");
    Ok(Some(Head {
        method,
        target,
        forward: forward.into_bytes(),
        content_length,
        expect_continue,
        leftover,
    }))
}

fn handle(mut client: TcpStream, upstream: SocketAddr, shared: &Shared) -> std::io::Result<()> {
    client.set_read_timeout(Some(Duration::from_secs(120)))?;
    let Some(head) = read_head(&mut client)? else {
        return Ok(());
    };
    match shared.decide(&head.method, &head.target) {
        Some(Fault::SlowDown503) => respond_error(
            client,
            &head,
            "503 Slow Down",
            "SlowDown",
            "Please reduce your request rate.",
        ),
        Some(Fault::InternalError500) => respond_error(
            client,
            &head,
            "500 Internal Server Error",
            "InternalError",
            "We encountered an internal error. Please try again.",
        ),
        Some(Fault::Reset) => {
            // SO_LINGER 0 makes close() send RST instead of FIN.
            socket2::SockRef::from(&client).set_linger(Some(Duration::ZERO))?;
            drop(client);
            Ok(())
        }
        Some(Fault::Delay(d)) => {
            std::thread::sleep(d);
            forward(client, upstream, head)
        }
        None => forward(client, upstream, head),
    }
}

/// Reads and discards the request body so the client sees our response, not a reset.
fn drain_body(client: &mut TcpStream, head: &Head) -> std::io::Result<()> {
    if head.expect_continue {
        return Ok(());
    }
    if let Some(len) = head.content_length {
        let already = head.leftover.len() as u64;
        if len > already {
            std::io::copy(&mut client.take(len - already), &mut std::io::sink())?;
        }
    }
    Ok(())
}

fn respond_error(
    mut client: TcpStream,
    head: &Head,
    status: &str,
    code: &str,
    message: &str,
) -> std::io::Result<()> {
    drain_body(&mut client, head)?;
    let body = format!(
        "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<Error><Code>{code}</Code><Message>{message}</Message><Resource>{}</Resource><RequestId>fault-proxy</RequestId></Error>",
        xml_escape(&head.target)
    );
    let response = format!(
        "HTTP/1.1 {status}\r\nContent-Type: application/xml\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    client.write_all(response.as_bytes())?;
    if head.method != "HEAD" {
        client.write_all(body.as_bytes())?;
    }
    client.flush()?;
    let _ = client.shutdown(Shutdown::Write);
    Ok(())
}

fn xml_escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

fn forward(mut client: TcpStream, upstream: SocketAddr, head: Head) -> std::io::Result<()> {
    let mut server = match TcpStream::connect_timeout(&upstream, Duration::from_secs(10)) {
        Ok(s) => s,
        Err(e) => {
            let msg = format!("fault proxy cannot reach {upstream}: {e}");
            let response = format!(
                "HTTP/1.1 502 Bad Gateway\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{msg}",
                msg.len()
            );
            client.write_all(response.as_bytes())?;
            return Ok(());
        }
    };
    server.set_nodelay(true)?;
    server.write_all(&head.forward)?;
    server.write_all(&head.leftover)?;
    // Request body (and anything else the client sends) upstream, on a helper thread.
    let mut client_read = client.try_clone()?;
    let mut server_write = server.try_clone()?;
    let uploader = std::thread::Builder::new()
        .name("fault-proxy-up".into())
        .spawn(move || {
            let _ = std::io::copy(&mut client_read, &mut server_write);
        })?;
    // The response back to the client; the upstream closes after it (Connection: close).
    let result = std::io::copy(&mut server, &mut client);
    let _ = client.shutdown(Shutdown::Both);
    let _ = server.shutdown(Shutdown::Both);
    let _ = uploader.join();
    result.map(|_| ())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    /// A one-shot HTTP upstream that answers every request with 200 and the request target.
    fn echo_upstream() -> (u16, JoinHandle<()>) {
        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).unwrap();
        let port = listener.local_addr().unwrap().port();
        let handle = std::thread::spawn(move || {
            for conn in listener.incoming() {
                let mut conn = conn.unwrap();
                let Some(head) = read_head(&mut conn).unwrap() else {
                    return;
                };
                if head.target == "/quit" {
                    return;
                }
                drain_body(&mut conn, &head).unwrap();
                let body = format!("{} {}", head.method, head.target);
                let resp = format!(
                    "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                    body.len()
                );
                conn.write_all(resp.as_bytes()).unwrap();
            }
        });
        (port, handle)
    }

    fn request(port: u16, method: &str, target: &str, body: &str) -> std::io::Result<String> {
        let mut s = TcpStream::connect((Ipv4Addr::LOCALHOST, port))?;
        write!(
            s,
            "{method} {target} HTTP/1.1\r\nHost: x\r\nConnection: keep-alive\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        )?;
        let mut out = String::new();
        s.read_to_string(&mut out)?;
        Ok(out)
    }

    #[test]
    fn injects_per_method_then_forwards_and_counts() {
        let (up, upstream) = echo_upstream();
        let proxy = FaultProxy::start(up);
        proxy.fail_first("PUT", 2, Fault::SlowDown503);
        proxy.add_rule(FaultRule::method("GET", Fault::InternalError500).path_contains("/b"));
        proxy.fail_first("DELETE", 1, Fault::Reset);

        let r = request(proxy.port(), "PUT", "/a", "hello").unwrap();
        assert!(
            r.starts_with("HTTP/1.1 503") && r.contains("<Code>SlowDown</Code>"),
            "{r}"
        );
        let r = request(proxy.port(), "PUT", "/a", "hello").unwrap();
        assert!(r.starts_with("HTTP/1.1 503"), "{r}");
        let r = request(proxy.port(), "PUT", "/a", "hello").unwrap();
        assert!(
            r.starts_with("HTTP/1.1 200") && r.ends_with("PUT /a"),
            "{r}"
        );
        // The keep-alive request header was replaced by Connection: close.
        assert!(r.contains("Connection: close"));

        let r = request(proxy.port(), "GET", "/a", "").unwrap();
        assert!(r.starts_with("HTTP/1.1 200"), "{r}");
        let r = request(proxy.port(), "GET", "/b?x", "").unwrap();
        assert!(
            r.starts_with("HTTP/1.1 500") && r.contains("InternalError"),
            "{r}"
        );

        let r = request(proxy.port(), "DELETE", "/a", "");
        assert!(
            matches!(&r, Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset)
                || matches!(&r, Ok(s) if s.is_empty()),
            "{r:?}"
        );
        let r = request(proxy.port(), "DELETE", "/a", "").unwrap();
        assert!(r.starts_with("HTTP/1.1 200"), "{r}");

        assert_eq!(proxy.injected("PUT", Fault::SlowDown503), 2);
        assert_eq!(proxy.injected("GET", Fault::InternalError500), 1);
        assert_eq!(proxy.injected("DELETE", Fault::Reset), 1);
        assert_eq!(proxy.injected_total(), 4);
        assert_eq!(proxy.requests("PUT"), 3);
        assert_eq!(proxy.forwarded("PUT"), 1);
        assert_eq!(proxy.forwarded("GET"), 1);

        let _ = request(up, "GET", "/quit", "");
        upstream.join().unwrap();
    }

    #[test]
    fn always_rules_never_run_out_and_delay_still_forwards() {
        let (up, upstream) = echo_upstream();
        let proxy = FaultProxy::start(up);
        proxy.add_rule(
            FaultRule::any_method(Fault::InternalError500)
                .always()
                .path_contains("/dead"),
        );
        proxy.add_rule(FaultRule::method(
            "HEAD",
            Fault::Delay(Duration::from_millis(50)),
        ));
        for _ in 0..5 {
            let r = request(proxy.port(), "POST", "/dead", "x").unwrap();
            assert!(r.starts_with("HTTP/1.1 500"), "{r}");
        }
        let r = request(proxy.port(), "HEAD", "/alive", "").unwrap();
        assert!(r.starts_with("HTTP/1.1 200"), "{r}");
        assert_eq!(
            proxy.injected("HEAD", Fault::Delay(Duration::from_millis(50))),
            1
        );
        assert_eq!(proxy.injected("POST", Fault::InternalError500), 5);
        let _ = request(up, "GET", "/quit", "");
        upstream.join().unwrap();
    }
}
