//! The stdio transport: Portcullis runs the MCP server as a child process and
//! stands in its place on stdin/stdout, so it drops into any MCP client's
//! `command`. It moves newline-delimited frames between the two pipes through
//! the [`Relay`] and owns the child's lifecycle: the server's stderr passes
//! through, EOF on either side shuts down cleanly, the child's exit status
//! becomes Portcullis' own, and the child is always reaped.

use crate::bindings::Direction;
use crate::framing::FrameReader;
use crate::relay::Relay;
use anyhow::{Context, Result};
use std::collections::BTreeMap;
use std::process::{ExitStatus, Stdio};
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, BufReader};
use tokio::process::{Child, Command};
use tokio::sync::mpsc;

/// How long the server may take to exit after its stdin closes before it is
/// terminated.
const EXIT_GRACE: Duration = Duration::from_secs(5);

/// Frames queued towards one side before readers wait.
const QUEUE: usize = 256;

/// The MCP server to run.
#[derive(Debug, Clone)]
pub struct ServerCommand {
    /// Program.
    pub program: String,
    /// Arguments.
    pub args: Vec<String>,
    /// Extra environment.
    pub env: BTreeMap<String, String>,
}

/// Runs the proxy on this process' stdin/stdout until either side ends, and
/// returns the exit code to leave with (the server's).
pub async fn run(relay: Arc<Relay>, server: &ServerCommand, max_message_bytes: usize) -> Result<i32> {
    let mut child = Command::new(&server.program)
        .args(&server.args)
        .envs(&server.env)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .kill_on_drop(true)
        .spawn()
        .with_context(|| format!("cannot start MCP server '{}'", server.program))?;
    let child_in = child.stdin.take().context("no stdin pipe to the server")?;
    let child_out = child.stdout.take().context("no stdout pipe from the server")?;

    let (to_server, server_queue) = mpsc::channel(QUEUE);
    let (to_client, client_queue) = mpsc::channel(QUEUE);
    let close_server = to_server.clone();
    let client_writer = tokio::spawn(write_frames(tokio::io::stdout(), client_queue));
    let server_writer = tokio::spawn(write_frames(child_in, server_queue));

    let mut from_client = tokio::spawn(pump(
        relay.clone(),
        Direction::ClientToServer,
        tokio::io::stdin(),
        max_message_bytes,
        to_server.clone(),
        to_client.clone(),
    ));
    let mut from_server = tokio::spawn(pump(
        relay,
        Direction::ServerToClient,
        child_out,
        max_message_bytes,
        to_client,
        to_server,
    ));

    let status = tokio::select! {
        // The client hung up: deliver what is queued, close the server's
        // stdin, and let the server finish its answers and exit.
        _ = &mut from_client => {
            let _ = close_server.send(Vec::new()).await;
            let _ = server_writer.await;
            let status = shutdown(&mut child).await?;
            let _ = from_server.await;
            status
        }
        // The server closed its stdout (usually: it exited).
        _ = &mut from_server => {
            from_client.abort();
            shutdown(&mut child).await?
        }
        _ = terminated() => {
            tracing::info!("signal received; stopping the server");
            from_client.abort();
            child.start_kill().ok();
            let status = child.wait().await?;
            let _ = from_server.await;
            status
        }
    };
    let _ = client_writer.await;
    Ok(exit_code(status))
}

/// Reads frames from one side, judges them and queues the results. Returns
/// at end of stream.
async fn pump(
    relay: Arc<Relay>,
    direction: Direction,
    input: impl AsyncRead + Unpin,
    max: usize,
    onward: mpsc::Sender<Vec<u8>>,
    back: mpsc::Sender<Vec<u8>>,
) {
    let mut frames = FrameReader::new(BufReader::new(input), max);
    loop {
        let frame = match frames.next().await {
            Ok(Some(frame)) => frame,
            Ok(None) => return,
            Err(e) => {
                tracing::warn!(direction = direction.as_str(), "read failed: {e}");
                return;
            }
        };
        let delivery = relay.handle(direction, frame);
        if let Some(reply) = delivery.reply {
            let _ = back.send(reply).await;
        }
        if let Some(forward) = delivery.forward
            && onward.send(forward).await.is_err()
        {
            return;
        }
    }
}

/// Writes queued frames, one per line, until every sender is gone or an
/// empty frame asks it to close the stream.
async fn write_frames(mut output: impl AsyncWrite + Unpin, mut queue: mpsc::Receiver<Vec<u8>>) {
    while let Some(mut frame) = queue.recv().await {
        if frame.is_empty() {
            break;
        }
        frame.push(b'\n');
        if output.write_all(&frame).await.is_err() || output.flush().await.is_err() {
            return;
        }
    }
    let _ = output.shutdown().await;
}

/// Waits for the server to exit after its stdin closed, terminating it if it
/// does not within [`EXIT_GRACE`]. Always reaps it.
async fn shutdown(child: &mut Child) -> Result<ExitStatus> {
    match tokio::time::timeout(EXIT_GRACE, child.wait()).await {
        Ok(status) => Ok(status?),
        Err(_) => {
            tracing::warn!("the server did not exit within {EXIT_GRACE:?}; killing it");
            child.start_kill().ok();
            Ok(child.wait().await?)
        }
    }
}

/// Resolves on SIGTERM or SIGINT.
async fn terminated() {
    use tokio::signal::unix::{SignalKind, signal};
    let (Ok(mut term), Ok(mut int)) = (signal(SignalKind::terminate()), signal(SignalKind::interrupt())) else {
        return std::future::pending().await;
    };
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
}

/// The shell convention: the exit code, or 128 + the signal that killed it.
fn exit_code(status: ExitStatus) -> i32 {
    use std::os::unix::process::ExitStatusExt;
    status
        .code()
        .or_else(|| status.signal().map(|s| 128 + s))
        .unwrap_or(1)
}
