//! A throwaway Prometheus server (Debian's `prometheus`) scraping one target every second,
//! and `promtool check metrics`, so the agent's `/metrics` is proven against the real
//! consumer rather than a hand-written parser.

use std::io::{Read, Write};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::process::{free_port, ServerProcess};

/// A running Prometheus; stopped and its data removed on drop.
pub struct PrometheusServer {
    _process: ServerProcess,
    _dir: tempfile::TempDir,
    port: u16,
}

impl PrometheusServer {
    /// Starts Prometheus scraping `target` (`host:port`, path `/metrics`) every second.
    pub fn scraping(target: &str) -> PrometheusServer {
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("temp dir: {e}"));
        let config = dir.path().join("prometheus.yml");
        std::fs::write(
            &config,
            format!(
                "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\nscrape_configs:\n  - job_name: syncbridge\n    static_configs:\n      - targets: ['{target}']\n"
            ),
        )
        .unwrap_or_else(|e| panic!("writing {}: {e}", config.display()));
        let port = free_port();
        let mut cmd = Command::new(crate::paths::prometheus());
        cmd.arg(format!("--config.file={}", config.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.path().join("data").display()
            ))
            .arg(format!("--web.listen-address=127.0.0.1:{port}"))
            .arg("--log.level=warn");
        let process = ServerProcess::spawn("prometheus", cmd, &dir.path().join("prometheus.log"));
        let server = PrometheusServer {
            _process: process,
            _dir: dir,
            port,
        };
        let deadline = Instant::now() + Duration::from_secs(60);
        while server.get("/-/ready").map(|(s, _)| s) != Some(200) {
            assert!(
                Instant::now() < deadline,
                "prometheus never became ready:\n{}",
                server._process.log_tail()
            );
            std::thread::sleep(Duration::from_millis(200));
        }
        server
    }

    /// Its HTTP port.
    pub fn port(&self) -> u16 {
        self.port
    }

    fn get(&self, path: &str) -> Option<(u16, String)> {
        http_get(self.port, path)
    }

    /// Runs an instant PromQL query (`/api/v1/query`); returns the JSON answer.
    pub fn query(&self, promql: &str) -> serde_json::Value {
        let encoded: String = promql
            .bytes()
            .map(|b| match b {
                b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                    (b as char).to_string()
                }
                _ => format!("%{b:02X}"),
            })
            .collect();
        let (status, body) = self
            .get(&format!("/api/v1/query?query={encoded}"))
            .unwrap_or_else(|| panic!("prometheus did not answer the query {promql}"));
        assert_eq!(status, 200, "query {promql}: {body}");
        serde_json::from_str(&body).unwrap_or_else(|e| panic!("query {promql}: {e}: {body}"))
    }
}

/// GET `path` on 127.0.0.1:`port` over HTTP/1.1: (status, body), or None when nothing answers.
pub fn http_get(port: u16, path: &str) -> Option<(u16, String)> {
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(10))).ok()?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).ok()?;
    let raw = String::from_utf8_lossy(&raw).into_owned();
    let status = raw.split_whitespace().nth(1)?.parse().ok()?;
    let (head, body) = raw.split_once("\r\n\r\n")?;
    let body = if head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked")
    {
        dechunk(body)
    } else {
        body.to_string()
    };
    Some((status, body))
}

fn dechunk(mut body: &str) -> String {
    let mut out = String::new();
    while let Some((size, rest)) = body.split_once("\r\n") {
        let Ok(n) = usize::from_str_radix(size.trim(), 16) else {
            break;
        };
        if n == 0 || rest.len() < n {
            break;
        }
        out.push_str(&rest[..n]);
        body = rest[n..].trim_start_matches("\r\n");
    }
    out
}

/// `promtool check metrics` on an exposition: Ok, or its complaints.
pub fn promtool_check_metrics(exposition: &str) -> Result<(), String> {
    let mut child = Command::new(crate::paths::promtool())
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run promtool: {e}"));
    child
        .stdin
        .take()
        .unwrap_or_else(|| panic!("promtool stdin"))
        .write_all(exposition.as_bytes())
        .unwrap_or_else(|e| panic!("writing to promtool: {e}"));
    let out = child
        .wait_with_output()
        .unwrap_or_else(|e| panic!("promtool: {e}"));
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ))
    }
}
