//! A one-shot client for plain commands (`INFO`) to a local server the agent started.

use anyhow::{bail, Context, Result};
use bytes::BytesMut;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use wire::redis::resp::{decode_reply, encode_command, Reply};

/// Sends one command to 127.0.0.1:`port` and returns a bulk or simple reply as text.
pub async fn command(port: u16, args: &[&[u8]]) -> Result<String> {
    let mut s = TcpStream::connect(("127.0.0.1", port))
        .await
        .with_context(|| format!("connecting to 127.0.0.1:{port}"))?;
    let mut buf = BytesMut::new();
    encode_command(&mut buf, args);
    s.write_all(&buf).await?;
    let mut rbuf = BytesMut::new();
    loop {
        if let Some(reply) = decode_reply(&mut rbuf)? {
            return match reply {
                Reply::Bulk(Some(b)) => Ok(String::from_utf8_lossy(&b).into_owned()),
                Reply::Simple(s) => Ok(s),
                Reply::Error(e) => bail!("{e}"),
                other => bail!("unexpected reply {other:?}"),
            };
        }
        if s.read_buf(&mut rbuf).await? == 0 {
            bail!("127.0.0.1:{port} closed the connection");
        }
    }
}
