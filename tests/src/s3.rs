//! A throwaway S3-compatible object store (SeaweedFS) and a `file://` repository helper.
//!
//! SeaweedFS runs as one `weed server` process (master, volume server, filer and S3 gateway).
//! Every listening port is given explicitly, or two instances collide on the defaults; the
//! Iceberg and Lance side servers are turned off. Credentials come from an `-s3.config`
//! identities file (<https://github.com/seaweedfs/seaweedfs/wiki/Amazon-S3-API>).
//!
//! The fresh bucket is made with a real S3 `CreateBucket` request signed with AWS Signature
//! Version 4 (<https://docs.aws.amazon.com/AmazonS3/latest/API/sig-v4-header-based-auth.html>),
//! since `object_store` deliberately has no bucket management.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use hmac::{Hmac, Mac};
use object_store::aws::{AmazonS3, AmazonS3Builder};
use sha2::{Digest, Sha256};
use tempfile::TempDir;

use crate::paths;
use crate::process::{free_ports, log_tail, server_temp_dir, wait_ready, ServerProcess};
use crate::tls::{make_test_certs, TestCerts};

/// Region the clients sign for (SeaweedFS accepts any).
pub const REGION: &str = "us-east-1";

/// A running SeaweedFS with S3 gateway and one fresh bucket; killed and removed on drop.
#[derive(Debug)]
pub struct S3Server {
    s3_port: u16,
    bucket: String,
    access_key: String,
    secret_key: String,
    process: Option<ServerProcess>,
    /// HTTPS port and the certificates it serves, when started with
    /// [`start_with_https`](Self::start_with_https).
    https: Option<(u16, TestCerts)>,
    // Declared last: removed after the process is gone.
    dir: crate::process::ServerTempDir,
}

impl S3Server {
    /// Starts SeaweedFS, waits until S3 accepts writes and creates a fresh bucket.
    pub fn start() -> S3Server {
        Self::start_inner(false)
    }

    /// [`start`](Self::start), and the S3 gateway also serves HTTPS (certificate from a
    /// throwaway CA, [`ca_cert`](Self::ca_cert)) on [`https_endpoint`](Self::https_endpoint):
    /// for clients that only speak HTTPS (pgBackRest) and for live TLS tests.
    pub fn start_with_https() -> S3Server {
        Self::start_inner(true)
    }

    fn start_inner(with_https: bool) -> S3Server {
        let weed = paths::weed();
        let dir = server_temp_dir("sb-s3-");
        // Credentials unique to this server: a request that reaches another test's SeaweedFS
        // (a port race) is refused instead of silently succeeding there.
        let unique = unique_suffix();
        let access_key = format!("sbak{}", unique.replace('-', "x"));
        let secret_key = format!("sbsk{}x{}", unique.replace('-', "x"), std::process::id());
        let config = dir.path().join("s3.json");
        std::fs::write(
            &config,
            format!(
                r#"{{"identities":[{{"name":"admin","credentials":[{{"accessKey":"{access_key}","secretKey":"{secret_key}"}}],"actions":["Admin","Read","Write","List","Tagging"]}}]}}"#
            ),
        )
        .unwrap_or_else(|e| panic!("write {}: {e}", config.display()));
        let data = dir.path().join("data");
        std::fs::create_dir(&data).unwrap_or_else(|e| panic!("mkdir {}: {e}", data.display()));
        let certs = with_https.then(|| {
            let d = dir.path().join("tls");
            std::fs::create_dir(&d).unwrap_or_else(|e| panic!("mkdir {}: {e}", d.display()));
            make_test_certs(&d)
        });

        let mut last = String::new();
        for _ in 0..4 {
            match try_start(
                &weed,
                dir.path(),
                &config,
                &data,
                (&access_key, &secret_key),
                certs.as_ref(),
            ) {
                Ok((process, s3_port, https_port)) => {
                    let server = S3Server {
                        s3_port,
                        https: https_port.zip(certs.clone()),
                        bucket: format!("sb-{unique}"),
                        access_key,
                        secret_key,
                        process: Some(process),
                        dir,
                    };
                    let bucket = server.bucket.clone();
                    server.create_bucket(&bucket);
                    server.wait_writable();
                    return server;
                }
                Err(e) => last = e,
            }
        }
        panic!("SeaweedFS did not start after 4 tries: {last}")
    }

    /// `http://127.0.0.1:PORT`, the S3 endpoint (path-style addressing).
    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.s3_port)
    }

    /// `https://127.0.0.1:PORT` when started with [`start_with_https`](Self::start_with_https).
    pub fn https_endpoint(&self) -> Option<String> {
        self.https
            .as_ref()
            .map(|(port, _)| format!("https://127.0.0.1:{port}"))
    }

    /// The CA certificate (PEM) that signed the HTTPS certificate, if any.
    pub fn ca_cert(&self) -> Option<&Path> {
        self.https.as_ref().map(|(_, c)| c.ca.as_path())
    }

    /// [`env`](Self::env) for the HTTPS endpoint, with `AWS_CA_BUNDLE` naming the CA and
    /// plain HTTP not allowed; panics unless started with HTTPS.
    pub fn https_env(&self) -> Vec<(String, String)> {
        let (Some(endpoint), Some(ca)) = (self.https_endpoint(), self.ca_cert()) else {
            panic!("S3Server::https_env: start the server with S3Server::start_with_https");
        };
        let mut env: Vec<(String, String)> = self
            .env_with_endpoint(&endpoint)
            .into_iter()
            .filter(|(k, _)| k != "AWS_ALLOW_HTTP")
            .collect();
        env.push(("AWS_CA_BUNDLE".into(), ca.display().to_string()));
        env
    }

    /// The S3 port on 127.0.0.1.
    pub fn port(&self) -> u16 {
        self.s3_port
    }

    /// The fresh bucket made for this server.
    pub fn bucket(&self) -> &str {
        &self.bucket
    }

    /// The access key id.
    pub fn access_key(&self) -> &str {
        &self.access_key
    }

    /// The secret access key.
    pub fn secret_key(&self) -> &str {
        &self.secret_key
    }

    /// The region clients should sign for.
    pub fn region(&self) -> &str {
        REGION
    }

    /// `s3://BUCKET/PREFIX` (or `s3://BUCKET` for an empty prefix): a repository URL for the
    /// agent, used together with [`env`](Self::env).
    pub fn repo_url(&self, prefix: &str) -> String {
        let prefix = prefix.trim_matches('/');
        if prefix.is_empty() {
            format!("s3://{}", self.bucket)
        } else {
            format!("s3://{}/{prefix}", self.bucket)
        }
    }

    /// The standard AWS environment that points a client at this server: pass it to the agent
    /// binary with `Command::envs`.
    pub fn env(&self) -> Vec<(String, String)> {
        self.env_with_endpoint(&self.endpoint())
    }

    /// [`env`](Self::env) with another endpoint, e.g. a [`FaultProxy`](crate::proxy::FaultProxy)
    /// in front of this server.
    pub fn env_with_endpoint(&self, endpoint: &str) -> Vec<(String, String)> {
        [
            ("AWS_ACCESS_KEY_ID", self.access_key.as_str()),
            ("AWS_SECRET_ACCESS_KEY", self.secret_key.as_str()),
            ("AWS_REGION", REGION),
            ("AWS_DEFAULT_REGION", REGION),
            ("AWS_ENDPOINT_URL", endpoint),
            ("AWS_ALLOW_HTTP", "true"),
            ("AWS_EC2_METADATA_DISABLED", "true"),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
    }

    /// An `object_store` builder for the bucket, endpoint and credentials (path-style, plain
    /// HTTP); change the endpoint or retry settings before `build()`.
    pub fn object_store_builder(&self) -> AmazonS3Builder {
        AmazonS3Builder::new()
            .with_endpoint(self.endpoint())
            .with_bucket_name(&self.bucket)
            .with_access_key_id(&self.access_key)
            .with_secret_access_key(&self.secret_key)
            .with_region(REGION)
            .with_allow_http(true)
            .with_virtual_hosted_style_request(false)
    }

    /// An `object_store` client for the bucket.
    pub fn object_store(&self) -> AmazonS3 {
        self.object_store_builder()
            .build()
            .unwrap_or_else(|e| panic!("object_store client for {}: {e}", self.endpoint()))
    }

    /// Creates another bucket (3–63 lowercase letters, digits, `-`); panics if S3 refuses.
    pub fn create_bucket(&self, name: &str) {
        assert!(
            (3..=63).contains(&name.len())
                && name
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-'),
            "invalid bucket name {name:?}"
        );
        // The filer may still be connecting to the master: retry for a while.
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let result = self.signed_request("PUT", &format!("/{name}"), b"");
            match &result {
                Ok((200, _)) => return,
                _ if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(100)),
                _ => panic!(
                    "CreateBucket {name} failed: {result:?}\nlog:\n{}",
                    self.log_tail()
                ),
            }
        }
    }

    /// Waits until a small object can be written and deleted: the volume server registers
    /// with the master a little after the S3 port opens.
    fn wait_writable(&self) {
        let key = format!("/{}/.harness-probe", self.bucket);
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let put = self.signed_request("PUT", &key, b"probe");
            if matches!(put, Ok((200, _))) {
                match self.signed_request("DELETE", &key, b"") {
                    Ok((204 | 200, _)) => return,
                    other => panic!("deleting the probe object failed: {other:?}"),
                }
            }
            if Instant::now() >= deadline {
                panic!(
                    "SeaweedFS does not accept writes after 60 s: {put:?}\nlog:\n{}",
                    self.log_tail()
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Sends one SigV4-signed request (`path` is `/bucket/key`, already URL-safe) and returns
    /// the status code and body. For bucket management and probes; tests use `object_store`.
    pub fn signed_request(
        &self,
        method: &str,
        path: &str,
        body: &[u8],
    ) -> std::io::Result<(u16, Vec<u8>)> {
        signed_request(
            self.s3_port,
            (&self.access_key, &self.secret_key),
            method,
            path,
            body,
        )
    }

    /// The SeaweedFS process id while running.
    pub fn pid(&self) -> Option<u32> {
        self.process.as_ref().map(ServerProcess::pid)
    }

    /// The temp dir holding data, config and log.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// The server log.
    pub fn log_path(&self) -> PathBuf {
        self.dir.path().join("weed.log")
    }

    /// The last few KiB of the log, for assertion messages.
    pub fn log_tail(&self) -> String {
        log_tail(&self.log_path())
    }

    /// SIGKILLs the server: an object store outage (no restart helper; start a new one).
    pub fn kill9(&mut self) {
        if let Some(mut p) = self.process.take() {
            p.kill_tree();
        }
    }
}

impl Drop for S3Server {
    fn drop(&mut self) {
        // weed takes seconds to honour SIGTERM and a throwaway store has nothing to flush.
        if let Some(mut p) = self.process.take() {
            p.kill_tree();
        }
    }
}

fn try_start(
    weed: &Path,
    dir: &Path,
    config: &Path,
    data: &Path,
    keys: (&str, &str),
    certs: Option<&TestCerts>,
) -> Result<(ServerProcess, u16, Option<u16>), String> {
    let ports = free_ports(9);
    let (s3, s3_grpc, master, master_grpc) = (ports[0], ports[1], ports[2], ports[3]);
    let (volume, volume_grpc, filer, filer_grpc) = (ports[4], ports[5], ports[6], ports[7]);
    let mut cmd = Command::new(weed);
    cmd.arg("server")
        .arg(format!("-dir={}", data.display()))
        .args([
            "-s3",
            "-ip=127.0.0.1",
            "-ip.bind=127.0.0.1",
            "-master.telemetry=false",
            "-s3.port.iceberg=0",
            "-s3.port.lance=0",
            // Small volumes: the tests write little, and a fresh server should not reserve GBs.
            "-master.volumeSizeLimitMB=64",
            "-volume.max=0",
            // The default keeps 1% of the disk free, and refuses every write below that: on a
            // large shared CI disk that is gigabytes, and a nearly full disk failed every S3
            // test with "no volume server capacity". The tests need megabytes.
            "-volume.minFreeSpace=64MiB",
        ])
        .arg(format!("-s3.port={s3}"))
        .arg(format!("-s3.port.grpc={s3_grpc}"))
        .arg(format!("-master.port={master}"))
        .arg(format!("-master.port.grpc={master_grpc}"))
        .arg(format!("-volume.port={volume}"))
        .arg(format!("-volume.port.grpc={volume_grpc}"))
        .arg(format!("-filer.port={filer}"))
        .arg(format!("-filer.port.grpc={filer_grpc}"))
        .arg(format!("-s3.config={}", config.display()))
        .arg(format!(
            "-filer.localSocket={}",
            dir.join("filer.sock").display()
        ))
        .arg(format!("-s3.localSocket={}", dir.join("s3.sock").display()))
        .current_dir(dir);
    // For profiling SeaweedFS in a benchmark (its binary is stripped, so `perf` cannot name
    // its functions; Go's own profiler can): `SB_WEED_PPROF_PORT=6060` serves
    // http://127.0.0.1:6060/debug/pprof/profile. One server at a time only.
    if let Some(port) = std::env::var("SB_WEED_PPROF_PORT")
        .ok()
        .filter(|p| !p.is_empty())
    {
        cmd.arg("-debug").arg(format!("-debug.port={port}"));
    }
    let https = certs.map(|c| {
        cmd.arg(format!("-s3.port.https={}", ports[8]))
            .arg(format!("-s3.cert.file={}", c.server_cert.display()))
            .arg(format!("-s3.key.file={}", c.server_key.display()));
        ports[8]
    });
    let log = dir.join("weed.log");
    let mut process = ServerProcess::spawn("SeaweedFS", cmd, &log);
    let ready = wait_ready(&mut process, Duration::from_secs(60), || {
        // A signed ListBuckets that succeeds proves the gateway is up *and* is ours: only it
        // knows these credentials.
        matches!(signed_request(s3, keys, "GET", "/", b""), Ok((200, _)))
    });
    match ready {
        Ok(()) => Ok((process, s3, https)),
        Err(e) => {
            process.kill_tree();
            Err(e)
        }
    }
}

/// Sends one SigV4-signed HTTP/1.1 request to 127.0.0.1:`port` and reads the whole response.
fn signed_request(
    port: u16,
    keys: (&str, &str),
    method: &str,
    path: &str,
    body: &[u8],
) -> std::io::Result<(u16, Vec<u8>)> {
    let host = format!("127.0.0.1:{port}");
    let amz_date = chrono::Utc::now().format("%Y%m%dT%H%M%SZ").to_string();
    let headers = sigv4_headers(keys, method, &host, path, body, &amz_date);
    let mut request = format!("{method} {path} HTTP/1.1\r\n");
    for (name, value) in &headers {
        request.push_str(&format!("{name}: {value}\r\n"));
    }
    request.push_str(&format!(
        "content-length: {}\r\nconnection: close\r\n\r\n",
        body.len()
    ));
    let mut stream = TcpStream::connect(&host)?;
    stream.set_read_timeout(Some(Duration::from_secs(30)))?;
    stream.write_all(request.as_bytes())?;
    stream.write_all(body)?;
    let mut response = Vec::new();
    stream.read_to_end(&mut response)?;
    parse_response(&response)
}

/// Splits a `Connection: close` HTTP/1.1 response into status and body (chunked bodies are
/// returned undecoded; the harness only looks at status codes and error text).
fn parse_response(response: &[u8]) -> std::io::Result<(u16, Vec<u8>)> {
    let bad = |m: &str| std::io::Error::new(std::io::ErrorKind::InvalidData, m.to_string());
    let head_end = response
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .ok_or_else(|| bad("no end of HTTP response head"))?;
    let head = String::from_utf8_lossy(&response[..head_end]);
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| bad("no HTTP status code"))?;
    Ok((status, response[head_end + 4..].to_vec()))
}

/// The headers of a SigV4-signed request with an unsigned-query, signed-payload canonical form.
fn sigv4_headers(
    (access_key, secret_key): (&str, &str),
    method: &str,
    host: &str,
    path: &str,
    body: &[u8],
    amz_date: &str,
) -> Vec<(String, String)> {
    let payload_hash = hex::encode(Sha256::digest(body));
    let date = &amz_date[..8];
    let canonical_request = format!(
        "{method}\n{path}\n\nhost:{host}\nx-amz-content-sha256:{payload_hash}\nx-amz-date:{amz_date}\n\nhost;x-amz-content-sha256;x-amz-date\n{payload_hash}"
    );
    let scope = format!("{date}/{REGION}/s3/aws4_request");
    let string_to_sign = format!(
        "AWS4-HMAC-SHA256\n{amz_date}\n{scope}\n{}",
        hex::encode(Sha256::digest(canonical_request.as_bytes()))
    );
    let mut key = hmac_sha256(format!("AWS4{secret_key}").as_bytes(), date.as_bytes());
    for part in [REGION, "s3", "aws4_request"] {
        key = hmac_sha256(&key, part.as_bytes());
    }
    let signature = hex::encode(hmac_sha256(&key, string_to_sign.as_bytes()));
    vec![
        ("host".into(), host.to_string()),
        ("x-amz-content-sha256".into(), payload_hash),
        ("x-amz-date".into(), amz_date.to_string()),
        (
            "authorization".into(),
            format!(
                "AWS4-HMAC-SHA256 Credential={access_key}/{scope}, SignedHeaders=host;x-amz-content-sha256;x-amz-date, Signature={signature}"
            ),
        ),
    ]
}

fn hmac_sha256(key: &[u8], data: &[u8]) -> Vec<u8> {
    let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(key)
        .unwrap_or_else(|e| panic!("HMAC accepts any key length: {e}"));
    mac.update(data);
    mac.finalize().into_bytes().to_vec()
}

/// `<pid>-<n>-<nanos>`: unique across parallel test processes; `sb-` + this is a valid
/// bucket name.
fn unique_suffix() -> String {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    format!(
        "{}-{}-{nanos}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    )
}

/// A `file://` repository in a temp dir, removed on drop: the agent's embedded default.
#[derive(Debug)]
pub struct TempRepo {
    dir: TempDir,
}

impl TempRepo {
    /// Creates an empty repository directory.
    pub fn new() -> TempRepo {
        let dir = tempfile::Builder::new()
            .prefix("sb-repo-")
            .tempdir()
            .unwrap_or_else(|e| panic!("cannot create a temp dir: {e}"));
        TempRepo { dir }
    }

    /// The directory.
    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    /// `file:///tmp/sb-repo-XXXX`.
    pub fn url(&self) -> String {
        format!("file://{}", self.dir.path().display())
    }

    /// An `object_store` view of the directory, for checking what the agent wrote.
    pub fn object_store(&self) -> object_store::local::LocalFileSystem {
        object_store::local::LocalFileSystem::new_with_prefix(self.dir.path())
            .unwrap_or_else(|e| panic!("LocalFileSystem at {}: {e}", self.dir.path().display()))
    }
}

impl Default for TempRepo {
    fn default() -> Self {
        TempRepo::new()
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn bucket_names_are_valid_and_unique() {
        let a = format!("sb-{}", unique_suffix());
        let b = format!("sb-{}", unique_suffix());
        assert_ne!(a, b);
        for n in [a, b] {
            assert!((3..=63).contains(&n.len()), "{n}");
            assert!(n
                .bytes()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == b'-'));
        }
    }

    #[test]
    fn signing_key_matches_the_aws_documentation_example() {
        // From "Examples of how to derive a signing key for Signature Version 4" (AWS docs):
        // secret wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY, 20120215, us-east-1, iam.
        let mut key = hmac_sha256(b"AWS4wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY", b"20120215");
        for part in ["us-east-1", "iam", "aws4_request"] {
            key = hmac_sha256(&key, part.as_bytes());
        }
        assert_eq!(
            hex::encode(key),
            "f4780e2d9f65fa895f9c67b32ce1baf0b0d8a43505a000a1a9e090d414db404d"
        );
    }

    #[test]
    fn parses_status_and_body() {
        let (status, body) = parse_response(b"HTTP/1.1 503 Slow Down\r\nA: b\r\n\r\nxyz").unwrap();
        assert_eq!(status, 503);
        assert_eq!(body, b"xyz");
        assert!(parse_response(b"HTTP/1.1 200").is_err());
    }
}
