//! Starting `redis-server` / `valkey-server` on restored files (`restore --start`): in its
//! own process group, so it outlives the agent, on a free port of 127.0.0.1, and waiting
//! until it has loaded its data.

use std::path::Path;
use std::time::Duration;

use anyhow::{bail, Context, Result};

/// A free port on 127.0.0.1; with `with_bus`, one whose cluster bus port (port + 10000,
/// Redis's default) is free too. Another process may take it before the server binds it:
/// callers retry.
pub fn free_port(with_bus: bool) -> Result<u16> {
    for _ in 0..100 {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").context("finding a free port")?;
        let port = listener.local_addr()?.port();
        if !with_bus {
            return Ok(port);
        }
        if port < 55_535 && std::net::TcpListener::bind(("127.0.0.1", port + 10_000)).is_ok() {
            return Ok(port);
        }
    }
    bail!("no free port with a free cluster bus port (+10000) on 127.0.0.1")
}

/// Starts `server` on `dir` at `port` with `args`, its log in `dir/server.log`, waits until
/// it has loaded (`loading:0`), writes `dir/server.pid` and returns the pid.
pub async fn spawn_loaded(server: &Path, dir: &Path, port: u16, args: &[&str]) -> Result<u32> {
    let mut cmd = tokio::process::Command::new(server);
    cmd.arg("--port")
        .arg(port.to_string())
        .args(["--bind", "127.0.0.1"])
        .arg("--dir")
        .arg(dir);
    cmd.args(["--daemonize", "no", "--save", ""])
        .arg("--logfile")
        .arg(dir.join("server.log"))
        .args(args);
    cmd.stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .process_group(0);
    let mut child = cmd
        .spawn()
        .with_context(|| format!("starting {}", server.display()))?;
    let pid = child.id().context("the server exited at once")?;
    let deadline = std::time::Instant::now() + Duration::from_secs(600);
    loop {
        if let Some(status) = child.try_wait()? {
            bail!(
                "{} exited with {status} before it finished loading; see {}",
                server.display(),
                dir.join("server.log").display()
            );
        }
        if std::time::Instant::now() > deadline {
            bail!("the server on port {port} did not finish loading in 10 minutes");
        }
        if let Ok(info) = super::admin::command(port, &[b"INFO", b"all"]).await {
            let ours = info
                .lines()
                .any(|l| l.trim() == format!("process_id:{pid}"));
            if ours && info.lines().any(|l| l.trim() == "loading:0") {
                std::fs::write(dir.join("server.pid"), format!("{pid}\n"))
                    .context("writing server.pid")?;
                return Ok(pid);
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
